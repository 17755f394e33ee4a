import numpy as np
import pytest
import torch

from cxr_oneclass.config import resolve
from cxr_oneclass.evaluate import auc, operating_point
from cxr_oneclass.nets import build_model
from cxr_oneclass.scoring import fit_calibration, score_images, score_tensor
from cxr_oneclass.train import fit

from conftest import blob_images

TINY = dict(image_size=32, width=8, batch_size=16, num_threads=2)


@pytest.fixture(scope="module")
def trained():
    return fit(resolve("paper", epochs=3, **TINY), blob_images(64, 32, seed=1), progress=False).model


def test_score_of_an_image_does_not_depend_on_its_batch(trained):
    normals = blob_images(8, 32, seed=10)
    abnormals = blob_images(8, 32, seed=11, abnormal=True)
    probe = normals[:1]
    alone = score_images(trained, probe)["score"][0]
    with_normals = score_images(trained, np.concatenate([probe, normals[1:]]))["score"][0]
    with_abnormals = score_images(trained, np.concatenate([probe, abnormals]))["score"][0]
    assert alone == pytest.approx(with_normals, rel=1e-5)
    assert alone == pytest.approx(with_abnormals, rel=1e-5)


def test_score_is_weighted_sum_of_components(trained):
    out = score_images(trained, blob_images(4, 32, seed=12, abnormal=True), keep_maps=True)
    expect = 20 * out["rec"] + 4 * out["adv"] + 8 * out["enc"]
    np.testing.assert_allclose(out["score"], expect, rtol=1e-6)
    assert out["heatmap"].shape == (4, 32, 32)
    np.testing.assert_allclose(out["heatmap"].astype(np.float64).mean(axis=(1, 2)), out["rec"], rtol=1e-2)


def test_variant_drops_its_score_terms():
    model = build_model(resolve("paper", variant="u+d", **TINY)).eval()
    out = score_tensor(model, torch.zeros(2, 1, 32, 32))
    assert "adv" in out and "enc" not in out
    torch.testing.assert_close(out["score"], 20 * out["rec"] + 4 * out["adv"])


def test_scoring_refuses_train_mode():
    model = build_model(resolve("paper", **TINY)).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        score_tensor(model, torch.zeros(2, 1, 32, 32))


def test_trained_model_separates_blob_anomalies(trained):
    normals = blob_images(20, 32, seed=20)
    abnormals = blob_images(20, 32, seed=21, abnormal=True)
    rec = score_images(trained, np.concatenate([normals, abnormals]))["rec"]
    assert auc(np.r_[np.zeros(20), np.ones(20)], rec) > 0.8


def test_calibration_threshold_hits_sensitivity_on_validation():
    rng = np.random.default_rng(0)
    raw = np.r_[rng.normal(0, 1, 100), rng.normal(2, 1, 100)]
    labels = np.r_[np.zeros(100), np.ones(100)].astype(int)
    cal = fit_calibration(raw, labels)
    norm = cal.normalise(raw)
    assert norm.min() == 0 and norm.max() == 1
    op = operating_point(labels, norm, cal.threshold)
    assert 0.95 <= op["sensitivity"] < 0.97
    only_normals = fit_calibration(raw[:100], labels[:100])
    assert "95th percentile" in only_normals.rule
    assert np.mean(only_normals.normalise(raw[:100]) >= only_normals.threshold) == pytest.approx(0.05, abs=0.011)


def test_score_terms_select_components():
    model = build_model(resolve("paper", score_terms="enc", **TINY)).eval()
    out = score_tensor(model, torch.zeros(2, 1, 32, 32))
    torch.testing.assert_close(out["score"], 8 * out["enc"])
    assert "rec" in out and "adv" in out  # components are still reported
    with pytest.raises(ValueError, match="name none"):
        score_tensor(build_model(resolve("paper", variant="u", score_terms="enc", **TINY)).eval(), torch.zeros(1, 1, 32, 32))
