"""Config film_norm (data/normalise.py): each film histogram-equalised within itself before every network, in
training and scoring, PyTorch and ONNX alike, so that another site's display curve changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.data import phantom
from cxr_oneclass.data.normalise import equalise, normalise_films
from cxr_oneclass.errors import ConfigError
from cxr_oneclass.model.detector import Detector
from cxr_oneclass.runtime import to_model_range
from cxr_oneclass.scoring.inference import score_images
from cxr_oneclass.scoring.onnx import OnnxScorer, export_onnx
from cxr_oneclass.scoring.stats import fit_score_stats
from cxr_oneclass.training.detector import fit_detector, lesion_score
from cxr_oneclass.training.loop import fit

TINY = dict(image_size=32, width=8, batch_size=16, num_threads=1, epochs=2)
# A strictly increasing display curve on grey levels 0..127: another site's LUT that merges no two levels.
LUT = np.rint(255 * (np.arange(128) / 127) ** 0.7).astype(np.uint8)


def films(n: int, seed: int, abnormal: bool = False) -> np.ndarray:
    return blob_images(n, 32, seed, abnormal) // 2  # grey levels 0..127, so that LUT is one-to-one on them


def test_equalise_is_blind_to_display_curves_and_to_the_batch():
    assert len(set(LUT.tolist())) == 128
    x = to_model_range(torch.from_numpy(films(4, seed=1)))
    y = to_model_range(torch.from_numpy(LUT[films(4, seed=1)]))
    assert not torch.allclose(x, y, atol=0.05)
    ex, ey = equalise(x), equalise(y)
    torch.testing.assert_close(ex, ey)  # only the order of the grey levels is left
    assert ex.shape == x.shape and ex.min() > -1 and ex.max() < 1
    assert abs(float(ex.mean())) < 0.05  # equalised: grey on average
    torch.testing.assert_close(equalise(x[2:3]), ex[2:3])  # a film's normalisation is its own, whatever its batch
    assert torch.equal(equalise(torch.full((1, 1, 8, 8), 0.3)), torch.zeros(1, 1, 8, 8))
    assert normalise_films(x, "none") is x
    with pytest.raises(ValueError, match="film normalisation"):
        normalise_films(x, "clahe")
    assert all(resolve(p).film_norm == "none" for p in ("paper", "best"))
    with pytest.raises(ConfigError, match="film-norm"):
        resolve("best", film_norm="clahe")


@pytest.fixture(scope="module")
def pair():
    """The same GAN trained on the same films as two sites would show them (as they are, and through LUT)."""
    normals = films(32, seed=2)
    out = {}
    for how in ("none", "equalise"):
        cfg = resolve("best", film_norm=how, score_terms="ssim+fdist+sdist", **TINY)
        out[how] = [fit(cfg, shown, progress=False).model for shown in (normals, LUT[normals])]
    ref = films(12, seed=5)  # validation normals: the standardised terms' centre and scale
    for models in out.values():
        fit_score_stats(models[0], normals, ref)
        fit_score_stats(models[1], LUT[normals], LUT[ref])
    return out, np.concatenate([films(8, seed=3), films(8, seed=4, abnormal=True)])


def test_equalised_training_and_scoring_do_not_see_the_display_curve(pair):
    """Trained and scored on films through another LUT, an equalising model is the same model with the same
    scores; without equalisation the LUT changes both (so the test can fail)."""
    out, val = pair
    a, b = out["equalise"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)
    ra, rb = score_images(a, val), score_images(b, LUT[val])
    np.testing.assert_allclose(ra["score"], rb["score"], rtol=1e-4, atol=1e-4)
    n0, n1 = out["none"]
    assert not all(torch.allclose(n0.state_dict()[k].float(), n1.state_dict()[k].float(), atol=1e-5) for k in n0.state_dict())
    assert not np.allclose(score_images(n0, val)["score"], score_images(n0, LUT[val])["score"], atol=1e-3)


def test_onnx_graph_carries_the_equalisation(pair, tmp_path):
    out, val = pair
    model = out["equalise"][0]
    export_onnx(model, tmp_path / "m.onnx")
    scorer = OnnxScorer(tmp_path / "m.onnx")
    got, ref = scorer.score(val, batch_size=5, keep_maps=True), score_images(model, val, keep_maps=True)
    scale = np.ptp(ref["score"])
    assert np.abs(got["score"] - ref["score"]).max() < 1e-4 * scale  # as jobs/export.TOLERANCE judges an export
    hot, want = got["heatmap"].astype(np.float32), ref["heatmap"].astype(np.float32)  # stored as float16
    assert np.abs(hot - want).max() < 2e-3 * np.abs(want).max()
    assert np.abs(scorer.score(LUT[val])["score"] - got["score"]).max() < 1e-4 * scale


def test_film_norm_reaches_the_detector(monkeypatch):
    """S trains on its lesioned films normalised as the run says, and reads validation films the same way."""
    from cxr_oneclass.training import detector as training

    seen = []

    def spy(x, how):
        seen.append((tuple(x.shape), how))
        return normalise_films(x, how)

    monkeypatch.setattr(training, "normalise_films", spy)
    normals = (phantom.render(8, size=32, seed=1)[0] * 255).astype(np.uint8)
    cfg = resolve("detect", image_size=32, detector_width=4, detector_steps=2, detector_batch=4, film_norm="equalise")
    det = Detector(4)
    fit_detector(det, cfg, normals, None, progress=False)
    assert seen == [((4, 1, 32, 32), "equalise")] * 2
    shown = normals // 2
    torch.testing.assert_close(torch.from_numpy(lesion_score(det, shown, film_norm="equalise")),
                               torch.from_numpy(lesion_score(det, LUT[shown], film_norm="equalise")))
