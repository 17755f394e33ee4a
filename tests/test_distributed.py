"""Data-parallel training: 2 CPU processes (gloo) on one machine end with identical weights; only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.data.types import Dataset, ImageSet
from cxr_oneclass.jobs.train import train_run
from cxr_oneclass.training import distributed

TINY = dict(image_size=32, width=8, batch_size=16, epochs=2, num_threads=1, device="cpu")


def _dataset() -> Dataset:
    train = blob_images(48, 32, seed=1)
    val = np.concatenate([blob_images(6, 32, seed=2), blob_images(6, 32, seed=3, abnormal=True)])
    labels = np.r_[np.zeros(6), np.ones(6)].astype(np.int64)
    return Dataset(
        {"train": ImageSet(train, np.zeros(48, np.int64), [f"t{i}" for i in range(48)]),
         "val": ImageSet(val, labels, [f"v{i}" for i in range(12)])},
        spec="blobs",
    )


def _worker(rank: int, world: int, tmp: str) -> None:
    tmp_path = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=rank, world_size=world)
    try:
        out = train_run(resolve("paper", **TINY), _dataset(), tmp_path / f"run{rank}", progress=False)
        state = {k: v.clone() for k, v in out.model.state_dict().items()}
        torch.save({"state": state, "history": out.history}, tmp_path / "results" / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "results").mkdir()
    mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, start_method="spawn", join=True)
    return tmp, [torch.load(tmp / "results" / f"rank{r}.pt") for r in range(2)]


def test_ranks_end_with_identical_weights_and_buffers(two_ranks):
    _, (a, b) = two_ranks
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert [r["loss_rec"] for r in a["history"]] == [r["loss_rec"] for r in b["history"]]


def test_only_rank_0_writes_the_run(two_ranks):
    tmp, (a, _) = two_ranks
    assert (tmp / "run0" / "model.safetensors").is_file() and (tmp / "run0" / "history.csv").is_file()
    assert not (tmp / "run1").exists()
    from safetensors.torch import load_file

    saved = load_file(str(tmp / "run0" / "model.safetensors"))
    assert all(torch.equal(saved[k], a["state"][k]) for k in saved)
    assert json.loads((tmp / "run0" / "config.json").read_text())["config"]["batch_size"] == 16


def test_matches_one_process_up_to_batch_norm(two_ranks):
    """Same global batch, same steps, same noise: two processes train like one, except that batch norm sees
    half batches; the losses stay close."""
    _, (a, _) = two_ranks
    single = train_run(resolve("paper", **TINY), _dataset(), two_ranks[0] / "single", progress=False)
    assert len(single.history) == len(a["history"])
    for r1, r2 in zip(single.history, a["history"]):
        assert r2["loss_rec"] == pytest.approx(r1["loss_rec"], rel=0.25)


def test_local_slices_cover_the_global_batch(monkeypatch):
    assert not distributed.is_active() and distributed.is_main() and distributed.local_slice(16) == slice(0, 16)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    rows = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        s = distributed.local_slice(16)
        rows += list(range(16))[s]
    assert rows == list(range(16))
