"""The lesion detector S (issue 14): trained after the GAN on synthetic lesions, scored as term seg, drawn as the
heat map, saved, loaded, exported, and chosen on validation only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PHANTOM, TINY
from cxr_oneclass.cli import main
from cxr_oneclass.config import Config, resolve
from cxr_oneclass.data import phantom
from cxr_oneclass.errors import ConfigError
from cxr_oneclass.model.detector import Detector
from cxr_oneclass.model.networks import build_model
from cxr_oneclass.runs import load_run
from cxr_oneclass.scoring.inference import score_images
from cxr_oneclass.training.detector import fit_detector, lesion_score

DETECTOR = ["--detector-width", "4", "--detector-steps", "24"]


@pytest.fixture(scope="module")
def det_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "run"
    # one S: these tests read its own history and reading (two S's: test_two_detectors_train_apart_...)
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(out), *TINY, *DETECTOR, "--detectors", "1"]) == 0
    return out


def test_run_with_detector_scores_seg_and_draws_its_map(det_run):
    model, calib, doc = load_run(det_run)
    assert model.det is not None and doc["config"]["detector_width"] == 4
    history = (det_run / "detector_history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss,seconds,val_auc") and len(history) == 1 + 8  # 8 readings
    card = (det_run / "MODEL_CARD.md").read_text()  # the card says how S was taught (detect's placement, re-imaging)
    assert "lung floor 0.25" in card and "50% of its training films imaged again" in card
    images = (phantom.render(6, size=32, seed=9, kind="consolidation")[0] * 255).astype(np.uint8)
    model.cfg.score_terms = "seg"  # the map is the detector's only when seg is scored
    out = score_images(model, images, batch_size=3, keep_maps=True)
    assert "seg" in out and np.all((out["seg"] >= 0) & (out["seg"] <= 1))
    # The heat map is the predicted lesion probability, whose mean is the seg term: map and score agree.
    np.testing.assert_allclose(out["heatmap"].astype(np.float64).mean(axis=(1, 2)), out["seg"], atol=2e-3)


def test_seg_score_does_not_depend_on_the_batch(det_run):
    model, _, _ = load_run(det_run)
    images = (phantom.render(8, size=32, seed=2, kind="nodule")[0] * 255).astype(np.uint8)
    alone = np.array([score_images(model, images[i : i + 1])["seg"][0] for i in range(len(images))])
    together = score_images(model, images, batch_size=8)["seg"]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


def test_seg_needs_a_detector_and_paper_has_none():
    with pytest.raises(ConfigError, match="seg needs the lesion detector"):
        resolve("best", score_terms="seg", score_norm="standardised")
    with pytest.raises(ConfigError, match="detector-ema"):
        resolve("best", detector_width=4, lesion_p=0.0)
    paper = resolve("paper")
    assert paper.detector_width == 0 and build_model(paper).det is None
    # A model without S draws the same initial weights as before S existed (S is built after the others).
    torch.manual_seed(0)
    a = build_model(paper).state_dict()
    torch.manual_seed(0)
    b = build_model(Config(detector_width=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_detector_learns_lesions_and_repeats_with_its_seed():
    """Trained on synthetic lesions only, S ranks real phantom abnormalities above normals (it never saw one),
    and the same seed gives the same weights."""
    normals = (phantom.render(48, size=32, seed=1)[0] * 255).astype(np.uint8)
    cfg = Config(image_size=32, detector_width=8, detector_steps=150, detector_batch=16, detector_ema=0.9, detector_lr=3e-3)
    torch.manual_seed(0)
    det = Detector(8)
    fit_detector(det, cfg, normals, None, progress=False)
    test_n = (phantom.render(24, size=32, seed=5)[0] * 255).astype(np.uint8)
    test_a = (phantom.render(24, size=32, seed=5, kind="consolidation", severity=0.8)[0] * 255).astype(np.uint8)
    from cxr_oneclass.metrics import auc

    s = np.concatenate([lesion_score(det, test_n), lesion_score(det, test_a)])
    assert auc(np.r_[np.zeros(24), np.ones(24)], s) > 0.7
    torch.manual_seed(0)
    det2 = Detector(8)
    fit_detector(det2, cfg, normals, None, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(det.state_dict().values(), det2.state_dict().values()))


@pytest.mark.parametrize("steps", [1, 10, 11])
def test_detector_trains_for_a_handful_of_steps(steps):
    """Short S trainings (a smoke run, `--detector-steps 10`) train and keep a reading instead of crashing in the
    learning-rate schedule after the GAN has trained."""
    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    cfg = Config(image_size=32, detector_width=4, detector_steps=steps, detector_batch=4)
    torch.manual_seed(0)
    det = Detector(4)
    before = [p.clone() for p in det.parameters()]
    history = fit_detector(det, cfg, normals, None, progress=False)
    assert history[-1]["step"] == steps and np.isfinite(history[-1]["loss"])
    assert any(not torch.equal(p, q) for p, q in zip(before, det.parameters()))


def test_detector_takes_the_callers_lung_masks():
    """Masks the caller computed (films pooled from two sources, each masked against its own population) steer where
    the lesions land: the default masks passed in train S bit for bit as without them, other masks train it
    differently, and masks of the wrong shape are refused by name."""
    from cxr_oneclass.data.synthetic import lung_masks

    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    cfg = Config(image_size=32, detector_width=4, detector_steps=3, detector_batch=4)

    def trained(lungs=None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        det = Detector(4)
        fit_detector(det, cfg, normals, None, progress=False, lungs=lungs)
        return [p.detach().clone() for p in det.parameters()]

    default = trained()
    same = trained(lung_masks(normals, keep=cfg.lung_keep, floor=cfg.lung_floor))
    assert all(torch.equal(a, b) for a, b in zip(default, same))
    other = trained(np.ones(normals.shape, np.float32))  # lesions anywhere on the film
    assert any(not torch.equal(a, b) for a, b in zip(default, other))
    with pytest.raises(ValueError, match=r"lung masks of shape \(8, 16, 16\) for films of shape \(8, 32, 32\)"):
        fit_detector(Detector(4), cfg, normals, None, progress=False, lungs=np.ones((8, 16, 16), np.float32))


def test_detector_keeps_the_best_validation_reading(det_run):
    rows = [r.split(",") for r in (det_run / "detector_history.csv").read_text().splitlines()[1:]]
    best = max(float(r[3]) for r in rows)
    doc = json.loads((det_run / "config.json").read_text())
    assert doc["detector_val_auc"] == pytest.approx(best)
    model, _, _ = load_run(det_run)
    from cxr_oneclass.data.specs import load_dataset

    val = load_dataset(PHANTOM, 32, 0, splits=("val",))["val"]
    from cxr_oneclass.metrics import auc

    assert auc(val.labels, lesion_score(model.det, val.images)) == pytest.approx(best, abs=0.02)


def test_export_carries_the_detector(det_run, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(det_run), "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_lesion_kinds_choose_what_s_is_taught(monkeypatch):
    from cxr_oneclass.data import synthetic
    from cxr_oneclass.training import detector as training

    assert synthetic.lesion_mix("all") is None
    assert synthetic.lesion_mix("patch+blur") == {"patch": synthetic.DEFAULT_MIX["patch"], "blur": synthetic.DEFAULT_MIX["blur"]}
    with pytest.raises(ConfigError, match="lesion-kinds"):
        resolve("detect", lesion_kinds="patch+tumour")
    drawn = []
    real = synthetic.Lesions

    def spy(*a, **k):  # the kinds the training's renderer draws from
        les = real(*a, **k)
        drawn.append(les.kinds)
        return les

    monkeypatch.setattr(training, "Lesions", spy)
    normals = (phantom.render(16, size=32, seed=1)[0] * 255).astype(np.uint8)
    for kinds in ("all", "nodule+blur"):
        fit_detector(Detector(4), Config(image_size=32, detector_width=4, detector_steps=2, detector_batch=4, lesion_kinds=kinds),
                     normals, None, progress=False)
    assert drawn == [list(synthetic.KINDS), ["nodule", "blur"]]


def test_lesion_placement_is_config(monkeypatch):
    """fit_detector draws lesions in the masks that config lung_keep / lung_floor describe; detect's are not paper's."""
    from cxr_oneclass.data import synthetic
    from cxr_oneclass.training import detector as training

    detect, best = resolve("detect"), resolve("best")
    assert (detect.lung_floor, detect.lung_keep) == (0.25, 1.0) and (best.lung_floor, best.lung_keep) == (0.0, 0.7)
    for bad in ({"lung_floor": 1.5}, {"lung_floor": -0.1}, {"lung_keep": 0.0}):
        with pytest.raises(ConfigError, match="lung-floor"):
            resolve("detect", **bad)
    asked = []

    def spy(images, **kw):
        asked.append(kw)
        return synthetic.lung_masks(images, **kw)

    monkeypatch.setattr(training, "lung_masks", spy)
    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    fit_detector(Detector(4), Config(image_size=32, detector_width=4, detector_steps=2, detector_batch=4, lung_floor=0.5, lung_keep=0.9),
                 normals, None, progress=False)
    assert asked == [{"keep": 0.9, "floor": 0.5}]


def test_acquisition_p_reaches_the_detector_training(monkeypatch):
    """Config acquisition_p re-images S's training films after their lesions (data/synthetic.reacquire); paper and
    best have no S and keep 0."""
    from cxr_oneclass.data import synthetic
    from cxr_oneclass.training import detector as training

    assert resolve("paper").acquisition_p == 0.0 and resolve("best").acquisition_p == 0.0
    assert resolve("detect").acquisition_p == 0.5  # chosen on validation, session 10
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="acquisition-p"):
            resolve("detect", acquisition_p=bad)
    seen = []

    def spy(x, gen, p):
        seen.append((tuple(x.shape), p))
        return synthetic.reacquire(x, gen, p)

    monkeypatch.setattr(training, "reacquire", spy)
    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    fit_detector(Detector(4), Config(image_size=32, detector_width=4, detector_steps=3, detector_batch=4, acquisition_p=0.5),
                 normals, None, progress=False)
    assert seen == [((4, 1, 32, 32), 0.5)] * 3


def test_detector_pick_shifted_keeps_the_reading_that_holds_under_shifts():
    """Config detector_pick "shifted": each reading is judged by seg's mean validation AUC over the films as they are
    and each simulated acquisition shift of them (data/acquisition.SHIFTS); the reading kept is the best by that mean,
    and the history says both figures. "val" (every preset) judges the films as they are, as before."""
    from cxr_oneclass.data.acquisition import SHIFTS
    from cxr_oneclass.data.types import ImageSet
    from cxr_oneclass.training.detector import reading_aucs

    assert all(resolve(p).detector_pick == "val" for p in ("paper", "best", "detect"))
    with pytest.raises(ConfigError, match="detector-pick"):
        resolve("detect", detector_pick="test")
    normals = (phantom.render(16, size=32, seed=1)[0] * 255).astype(np.uint8)
    vn = (phantom.render(6, size=32, seed=3)[0] * 255).astype(np.uint8)
    va = (phantom.render(6, size=32, seed=3, kind="consolidation", severity=0.8)[0] * 255).astype(np.uint8)
    val = ImageSet(np.concatenate([vn, va]), np.r_[np.zeros(6), np.ones(6)].astype(int), [f"v{i}" for i in range(12)])
    cfg = Config(image_size=32, detector_width=4, detector_steps=8, detector_batch=4, detector_pick="shifted")
    states = []
    torch.manual_seed(0)
    det = Detector(4)
    history = fit_detector(det, cfg, normals, val, progress=False,
                           on_reading=lambda step, ema: states.append({k: v.clone() for k, v in ema.state_dict().items()}))
    assert len(history) == 8 and all("val_auc_shifted" in r for r in history)
    merits = [r["val_auc_shifted"] for r in history]
    kept = int(np.argmax(merits))
    assert all(torch.equal(det.state_dict()[k], states[kept][k]) for k in states[kept])
    probe = Detector(4).to(memory_format=torch.channels_last)  # as S is read in training
    probe.load_state_dict(states[kept])
    aucs = reading_aucs(probe, val.labels, {k: fn(val.images) for k, fn in SHIFTS.items()})
    # 6 x 6 films: one pair of near-tied scores ordered the other way by rounding moves an AUC by 0.028
    assert len(aucs) == len(SHIFTS) == 12 and np.mean(list(aucs.values())) == pytest.approx(merits[kept], abs=0.01)
    assert aucs["none"] == pytest.approx(history[kept]["val_auc"], abs=0.06)


def test_lut_p_reaches_the_detector_training(monkeypatch):
    """Config lut_p shows S's training films through another display curve (data/synthetic.relut) after re-imaging."""
    from cxr_oneclass.data import synthetic
    from cxr_oneclass.training import detector as training

    with pytest.raises(ConfigError, match="lut-p"):
        resolve("detect", lut_p=2.0)
    seen = []

    def spy(x, gen, p):
        seen.append(p)
        return synthetic.relut(x, gen, p)

    monkeypatch.setattr(training, "relut", spy)
    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    fit_detector(Detector(4), Config(image_size=32, detector_width=4, detector_steps=2, detector_batch=4, lut_p=0.5),
                 normals, None, progress=False)
    assert seen == [0.5, 0.5]


def test_two_detectors_train_apart_and_score_their_mean(tmp_path):
    """Config detectors 2: two S's, member k trained from stream k (member 0 is the one S a run had before, bit for
    bit), the seg term and heat map their mean lesion probability; saved, loaded and exported like one S."""
    from cxr_oneclass.jobs.export import export_run
    from cxr_oneclass.model.detector import DetectorEnsemble

    with pytest.raises(ConfigError, match="detectors"):
        resolve("detect", detectors=0)
    assert all(resolve(p).detectors == 1 for p in ("paper", "best")) and resolve("detect").detectors == 1
    # one S keeps the checkpoint keys it always had (det.*), so runs saved before load unchanged
    assert not any(".members." in k for k in build_model(resolve("detect", detectors=1, image_size=32, width=8)).state_dict())
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(out), *TINY, *DETECTOR, "--detectors", "2"]) == 0
    model, _, doc = load_run(out)
    assert isinstance(model.det, DetectorEnsemble) and len(model.det.members) == 2
    assert len(doc["detector_val_auc_members"]) == 2 and 0 <= doc["detector_val_auc"] <= 1
    history = (out / "detector_history.csv").read_text().splitlines()
    assert history[0].startswith("member,step") and len(history) == 1 + 2 * 8
    assert "2 lesion detectors S" in (out / "MODEL_CARD.md").read_text()
    a, b = (dict(m.state_dict()) for m in model.det.members)
    assert not torch.equal(a["head.weight"], b["head.weight"])
    # member 0 is what fit_detector makes of the same initial weights from stream 0
    normals = (phantom.render(12, size=32, seed=1)[0] * 255).astype(np.uint8)
    cfg = Config(image_size=32, detector_width=4, detector_steps=3, detector_batch=4)
    torch.manual_seed(5)
    first, twin = Detector(4), Detector(4)
    twin.load_state_dict(first.state_dict())
    fit_detector(first, cfg, normals, None, progress=False)
    fit_detector(twin, cfg, normals, None, progress=False, stream=0)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in first.state_dict().items())
    images = (phantom.render(5, size=32, seed=9, kind="consolidation")[0] * 255).astype(np.uint8)
    means = np.mean([lesion_score(m, images) for m in model.det.members], axis=0)
    np.testing.assert_allclose(lesion_score(model.det, images), means, rtol=1e-5, atol=1e-6)
    model.cfg.score_terms = "seg"
    scored = score_images(model, images, keep_maps=True)
    np.testing.assert_allclose(scored["seg"], means, rtol=1e-5, atol=1e-6)
    assert export_run(out, tmp_path / "m.onnx")["max_rel_diff"] < 1e-3
