"""Ensembles of runs (issue 14): `train --ensemble K` and `ensemble RUN... --out ENS`. The members' scores are
standardised on the shared validation normals and averaged; the ensemble is calibrated on validation, scored by
`score`, `evaluate` and the Python API, fails closed, and refuses members of different splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxr_oneclass
from conftest import PHANTOM, TINY
from cxr_oneclass.cli import main
from cxr_oneclass.data import phantom
from cxr_oneclass.errors import RunError
from cxr_oneclass.jobs.ensemble import build_ensemble
from cxr_oneclass.jobs.score import NOT_SCORED, Scorer
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import load_run, run_dataset
from cxr_oneclass.scoring.ensemble import ENSEMBLE_FILE, load_ensemble
from cxr_oneclass.scoring.inference import score_images


@pytest.fixture(scope="module")
def ens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "ens"
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(out), "--ensemble", "2", *TINY]) == 0
    return out


def _images(n: int = 6, seed: int = 4) -> np.ndarray:
    return (phantom.render(n, size=32, seed=seed, kind="consolidation")[0] * 255).astype(np.uint8)


def test_train_ensemble_writes_members_of_one_split_and_cleans_up(ens):
    doc = json.loads((ens / ENSEMBLE_FILE).read_text())
    assert [m["path"] for m in doc["members"]] == ["members/0", "members/1"]
    assert not ens.with_name("ens.members").exists()  # the members' training folder is gone once the ensemble is written
    members = [load_run(ens / m["path"]) for m in doc["members"]]
    assert [d["config"]["seed"] for _, _, d in members] == [0, 1]
    assert {d["split_seed"] for _, _, d in members} == {0}  # one split, drawn once
    w0, w1 = (dict(m.state_dict()) for m, _, _ in members)
    assert any(not np.array_equal(w0[k].numpy(), w1[k].numpy()) for k in w0)  # two models, not one copied


def test_ensemble_score_is_the_mean_of_standardised_member_scores(ens):
    doc = json.loads((ens / ENSEMBLE_FILE).read_text())
    members = [load_run(ens / m["path"]) for m in doc["members"]]
    _, _, d0 = members[0]
    val = run_dataset(ens / "members/0", d0, 32, ("val",))["val"]
    raw = [score_images(m, val.images)["score"] for m, _, _ in members]
    for m, r in zip(doc["members"], raw):  # standardised on the validation normals
        assert m["center"] == pytest.approx(r[val.labels == 0].mean(), rel=1e-6, abs=1e-9)
        assert m["scale"] == pytest.approx(r[val.labels == 0].std(), rel=1e-6)
    mean = np.mean([(r - m["center"]) / m["scale"] for m, r in zip(doc["members"], raw)], axis=0)
    assert doc["val_auc"] == pytest.approx(auc(val.labels, mean))
    loaded = load_ensemble(ens)
    np.testing.assert_allclose(loaded.score(val.images)["score"], mean, rtol=1e-6, atol=1e-9)
    # one image at a time scores as in a batch: no image's score depends on its peers
    imgs = _images()
    together = loaded.score(imgs, batch_size=6)["score"]
    alone = np.array([loaded.score(imgs[i : i + 1])["score"][0] for i in range(len(imgs))])
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_score_and_evaluate_take_an_ensemble(ens, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_images()):
        Image.fromarray(img).save(folder / f"f{i}.png")
    out_csv = tmp_path / "s.csv"
    assert main(["-q", "score", str(ens), str(folder), "--csv", str(out_csv), "--heatmaps", str(tmp_path / "maps")]) == 0
    rows = out_csv.read_text().splitlines()
    assert len(rows) == 1 + 6 and "seg" in rows[0]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 6
    scorer = Scorer(ens)
    recs = scorer.records([f"f{i}" for i in range(6)], _images(), keep_maps=True)
    cal = load_ensemble(ens).calibration
    for r in recs:
        assert r.flag == ("abnormal" if r.score >= cal.threshold else "normal")
        assert r.heatmap is not None and r.heatmap.shape == (32, 32)
    assert "ensemble of 2" in scorer.model_info().name
    api_recs = cxr_oneclass.load_run(ens).score(list(_images()))  # the Python API scores it as the CLI does
    np.testing.assert_allclose([r.score for r in api_recs], [r.score for r in recs], rtol=1e-6)
    assert main(["-q", "evaluate", str(ens), "--split", "test", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_normal"] == 4 and 0 <= metrics["auc"] <= 1 and "seg" in metrics["component_auc"]


def test_a_member_that_cannot_score_an_image_never_clears_it(ens, monkeypatch):
    scorer = Scorer(ens)
    real = scorer._ensemble.member_scores

    def one_nan(images, *a, **k):
        outs = real(images, *a, **k)
        outs[1]["score"][0] = np.nan
        return outs

    monkeypatch.setattr(scorer._ensemble, "member_scores", one_nan)
    recs = scorer.records(["a", "b", "c"], _images(3))
    assert recs[0].flag == NOT_SCORED and "not finite" in recs[0].error
    assert recs[1].flag != NOT_SCORED and recs[2].flag != NOT_SCORED


def test_ensemble_command_builds_from_runs_and_refuses_bad_ones(ens, tmp_path, capsys):
    a, b = ens / "members/0", ens / "members/1"
    out = tmp_path / "again"
    assert main(["-q", "ensemble", str(a), str(b), "--out", str(out)]) == 0
    assert "validation AUC" in capsys.readouterr().out
    built, trained = (json.loads((p / ENSEMBLE_FILE).read_text()) for p in (out, ens))
    assert built["val_auc"] == pytest.approx(trained["val_auc"])  # same members, same ensemble
    with pytest.raises(RunError, match="at least 2"):
        build_ensemble([a], tmp_path / "one")
    with pytest.raises(RunError, match="twice"):
        build_ensemble([a, a], tmp_path / "twice")
    # a run on another split of the phantom data (split seed 3): its validation films are another run's training films
    other = tmp_path / "other"
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(other), *TINY, "--seed", "3"]) == 0
    with pytest.raises(RunError, match="different splits"):
        build_ensemble([a, other], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "mixed.partial").exists()


def test_an_ensemble_is_refused_clearly_where_a_run_is_needed(ens, tmp_path, capsys):
    assert main(["-q", "export", str(ens), "--out", str(tmp_path / "m.onnx")]) != 0
    assert "is an ensemble" in capsys.readouterr().err
    with pytest.raises(RunError, match="is an ensemble"):
        Scorer(ens, int8=True)


def test_a_broken_ensemble_file_is_named(ens, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ens, broken)
    doc = json.loads((broken / ENSEMBLE_FILE).read_text())
    doc["members"][1]["path"] = "../elsewhere"
    (broken / ENSEMBLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(RunError, match="inside the ensemble folder"):
        load_ensemble(broken)
    doc["members"][1].update(path="members/1", scale=0.0)
    (broken / ENSEMBLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(RunError, match="scale > 0"):
        load_ensemble(broken)
    (broken / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(RunError, match=str(broken / ENSEMBLE_FILE).replace(".", r"\.")):
        load_ensemble(broken)


def test_the_triage_service_serves_an_ensemble(ens, tmp_path):
    import httpx

    from test_service_api import Server, png

    server = Server(ens, tmp_path / "db.sqlite")
    try:
        files = [("files", (f"film{i}.png", png(f), "image/png")) for i, f in enumerate(_images(2))]
        r = httpx.post(f"{server.url}/v1/images", files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert [i["flag"] in ("normal", "abnormal") for i in r.json()["images"]] == [True, True]
        card = httpx.get(f"{server.url}/v1/model-card").text
        assert "ensemble of 2" in card and "research use only" in card.lower()
    finally:
        server.stop()


def test_calibrate_moves_an_ensembles_threshold_only(ens, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(ens, moved)
    members_before = (moved / "members/0/config.json").read_text()
    assert main(["-q", "calibrate", str(moved), "--threshold", "0.5"]) == 0
    assert "ensemble.json" in capsys.readouterr().out
    assert load_ensemble(moved).calibration.threshold == 0.5
    assert (moved / "members/0/config.json").read_text() == members_before
    assert "threshold 0.5000" in (moved / "MODEL_CARD.md").read_text()
    rec = Scorer(moved).records(["a"], _images(1))[0]
    assert rec.flag == ("abnormal" if rec.score >= 0.5 else "normal")


def test_an_interrupted_ensemble_continues_where_it_stopped(tmp_path, monkeypatch):
    from cxr_oneclass.config import resolve
    from cxr_oneclass.jobs import ensemble as job

    cfg = resolve("detect", image_size=32, width=8, batch_size=8, num_threads=1, epochs=1, detector_width=4, detector_steps=8)
    out = tmp_path / "ens"
    real, calls = job.train_run, []

    def second_fails(c, data, d, progress=True):
        calls.append(c.seed)
        if c.seed == 1:
            raise KeyboardInterrupt
        return real(c, data, d, progress=False)

    monkeypatch.setattr(job, "train_run", second_fails)
    with pytest.raises(KeyboardInterrupt):
        job.train_ensemble(cfg, PHANTOM, out, 2, progress=False)
    first = tmp_path / "ens.members" / "seed0" / "model.safetensors"
    assert first.is_file() and not out.exists()
    trained = first.read_bytes()
    monkeypatch.setattr(job, "train_run", lambda c, data, d, progress=True: (calls.append(c.seed), real(c, data, d, progress=False))[1])
    job.train_ensemble(cfg, PHANTOM, out, 2, progress=False)
    assert calls == [0, 1, 1]  # seed 0 was trained once and kept
    assert (out / ENSEMBLE_FILE).is_file() and not (tmp_path / "ens.members").exists()
    assert (out / "members/0/model.safetensors").read_bytes() == trained
