"""Scoring cost of the default against `best`, by the number of lesion detectors S: PyTorch ms/image at batch 64.

    python benchmarks/scoring_cost.py                    # 64 px, 1 thread, 7 rounds
    python benchmarks/scoring_cost.py --quick            # 32 px, 2 rounds: a smoke test

Issue 14 caps the default's scoring cost at 2x `best`'s. The settings (`best`; `detect` with 1, 2 and 3 S's) are
timed in turns, one pass of 256 films each per round, so a change of load hits all alike; the medians and their ratios
to `best` are reported (quote the ratios: they are measured in one run). Untrained weights with fitted statistics
cost what a trained run costs (benchmarks/peers.with_stats).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import with_stats  # noqa: E402

from cxr_oneclass.config import replace, resolve  # noqa: E402
from cxr_oneclass.data.phantom import render  # noqa: E402
from cxr_oneclass.io_utils import write_json  # noqa: E402
from cxr_oneclass.scoring.inference import score_images  # noqa: E402

SETTINGS = {"best": ("best", {}), "detect, 1 S": ("detect", {"detectors": 1}), "detect, 2 S": ("detect", {"detectors": 2}),
            "detect, 3 S": ("detect", {"detectors": 3})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="timed passes per setting (default 7, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core cost, what a worker pays)")
    ap.add_argument("--out", default="runs/bench/scoring_cost.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    size, rounds = (32, a.rounds or 2) if a.quick else (64, a.rounds or 7)
    films = (render(256, size, seed=0)[0] * 255).round().astype(np.uint8)  # (N, H, W) phantoms: the cost does not depend on what is drawn
    models = {}
    for name, (preset, over) in SETTINGS.items():
        cfg = replace(resolve(preset, image_size=size), **over)
        models[name] = with_stats(cfg, films[:64])
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        score_images(m, films[:64], 64)
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            score_images(m, films, 64)
            times[name].append((time.perf_counter() - t0) * 1e3 / len(films))
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "image_size": size, "threads": a.threads,
           "rounds": rounds, "ms_per_image": med, "ratio_to_best": {k: v / med["best"] for k, v in med.items()}}
    for k in models:
        print(f"{k:14s} {med[k]:7.3f} ms/image  {med[k] / med['best']:.2f}x best")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
