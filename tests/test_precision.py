"""The speed paths compute what the plain ones do: folded batch norm, the scoring cache, bf16, training switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.model.networks import fold_batchnorm
from cxr_oneclass.scoring.inference import inference_model, score_images, score_tensor
from cxr_oneclass.scoring.stats import build_scoring_model as build_model
from cxr_oneclass.training.loop import Tuning, fit

TINY = dict(image_size=32, width=8, batch_size=16, num_threads=1)


def _model_with_statistics(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(resolve("paper", **{**TINY, **kw}))
    for m in model.modules():  # non-trivial running statistics and affine terms
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@torch.no_grad()
def _plain_scores(model, x):
    x_rec, z, _ = model.U(x)
    z_rec, _ = model.E(x_rec)
    logit, _ = model.D(x_rec)
    return 20 * (x - x_rec).abs().mean((1, 2, 3)) + 4 * (1 - torch.sigmoid(logit)) + 8 * (z - z_rec).pow(2).mean(1), x_rec


@pytest.mark.parametrize("skips", [-1, 0])
def test_folded_batchnorm_computes_the_eval_model(skips):
    model = _model_with_statistics(skips=skips)
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    ref, x_rec = _plain_scores(model, x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.U(x)[0], x_rec, rtol=1e-4, atol=1e-5)
    out = score_tensor(model, x)
    torch.testing.assert_close(out["score"], ref, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched


def test_inference_copy_follows_the_model():
    model = _model_with_statistics()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    first = inference_model(model)
    assert inference_model(model) is first  # cached
    before = score_tensor(model, x)["score"]
    with torch.no_grad():
        model.U.encoder.layers[1][1].running_mean.add_(0.5)  # in-place change: a new copy
    assert inference_model(model) is not first
    after = score_tensor(model, x)["score"]
    torch.testing.assert_close(after, _plain_scores(model, x)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_bf16_scoring_stays_close_to_fp32():
    model = _model_with_statistics()
    images = np.concatenate([blob_images(4, 32, seed=1), blob_images(4, 32, seed=2, abnormal=True)])
    fp32 = score_images(model, images, precision="fp32")
    bf16 = score_images(model, images, precision="bf16")
    np.testing.assert_allclose(bf16["score"], fp32["score"], rtol=2e-2)
    assert np.argsort(bf16["score"])[-1] == np.argsort(fp32["score"])[-1]


def test_bf16_training_runs_and_learns():
    res = fit(resolve("paper", epochs=2, precision="bf16", **TINY), blob_images(32, 32, seed=3), progress=False)
    assert all(np.isfinite(r["loss_g_total"]) for r in res.history)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # fp32 master weights


def test_freezing_d_in_the_g_step_changes_nothing():
    images = blob_images(32, 32, seed=4)
    cfg = resolve("paper", epochs=1, **TINY)
    a = fit(cfg, images, progress=False, tuning=Tuning(freeze_d_in_g=True)).model.state_dict()
    b = fit(cfg, images, progress=False, tuning=Tuning(freeze_d_in_g=False)).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_plain_and_fast_training_agree_on_the_first_steps():
    """channels_last and fused Adam change the arithmetic's order only: after one epoch the weights agree."""
    images = blob_images(32, 32, seed=5)
    cfg = resolve("paper", epochs=1, **TINY)
    a = fit(cfg, images, progress=False).model.state_dict()
    b = fit(cfg, images, progress=False, tuning=Tuning(False, False, False)).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_history_reports_the_data_share():
    res = fit(resolve("paper", epochs=1, **TINY), blob_images(32, 32, seed=6), progress=False)
    assert 0 <= res.history[0]["data_share"] < 0.5
    assert all(p.is_contiguous() for p in res.model.parameters())
