import numpy as np
import torch

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.training.loop import fit

TINY = dict(image_size=32, width=8, batch_size=16, num_threads=2)


def test_training_lowers_reconstruction_loss():
    images = blob_images(64, 32, seed=1)
    res = fit(resolve("paper", epochs=6, image_size=32, width=16, batch_size=8), images, progress=False)
    rec = [row["loss_rec"] for row in res.history]
    assert rec[-1] < 0.6 * rec[0]
    assert {"loss_rec", "loss_adv", "loss_enc", "loss_feat", "loss_d", "seconds", "images_per_s"} <= set(res.history[0])
    assert not res.model.training


def test_variant_u_logs_only_its_terms():
    res = fit(resolve("paper", variant="u", epochs=1, **TINY), blob_images(32, 32, seed=2), progress=False)
    row = res.history[0]
    assert "loss_rec" in row and "loss_adv" not in row and "loss_enc" not in row and "loss_d" not in row


def test_same_seed_same_weights_on_cpu():
    images = blob_images(32, 32, seed=3)
    cfg = resolve("paper", epochs=1, seed=7, **TINY)
    a = fit(cfg, images, progress=False).model.state_dict()
    b = fit(cfg, images, progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = fit(resolve("paper", epochs=1, seed=8, **TINY), images, progress=False).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_epoch_callback_sees_eval_mode_and_adds_columns():
    seen = []

    def cb(model, row):
        seen.append(model.training)
        row["extra"] = 1.0

    res = fit(resolve("paper", epochs=2, **TINY), blob_images(32, 32, seed=4), on_epoch_end=cb, progress=False)
    assert seen == [False, False]
    assert all(r["extra"] == 1.0 for r in res.history)
    assert np.isfinite(res.history[-1]["loss_g_total"])


def test_step_budget_replaces_epochs():
    from cxr_oneclass.config import resolve as _resolve

    cfg = _resolve("paper", image_size=32, width=8, batch_size=8, epochs=50, steps=5, num_threads=2)
    result = fit(cfg, blob_images(16, 32, seed=1), progress=False)  # 2 batches per pass: 2 + 2 + 1 steps
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["images_per_s"] > 0
