import numpy as np
import pytest
import torch

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.metrics import auc, operating_point
from cxr_oneclass.scoring.calibration import fit_calibration
from cxr_oneclass.scoring.inference import score_images, score_tensor
from cxr_oneclass.scoring.stats import build_scoring_model as build_model
from cxr_oneclass.scoring.terms import TERM_INDEX
from cxr_oneclass.training.loop import fit

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


# ------------------------------------------------------------------ ssim, fdist and standardised scores

def test_ssim_map_is_one_for_identical_images_and_lower_for_changed_structure():
    from cxr_oneclass.scoring.terms import ssim_map

    x = torch.from_numpy(blob_images(2, 32, seed=3)).float().div(127.5).sub(1).unsqueeze(1)
    same = ssim_map(x, x)
    torch.testing.assert_close(same, torch.ones_like(same))
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    assert float(ssim_map(x, blurred).mean()) < 0.95  # blur loses the noise texture: lower structural similarity
    shifted = x + 0.1  # a small brightness change keeps the structure
    assert float(ssim_map(x, shifted).mean()) > float(ssim_map(x, blurred).mean())


def test_fdist_is_the_mahalanobis_distance_of_training_features():
    from sklearn.covariance import LedoitWolf

    from cxr_oneclass.scoring.inference import inference_model
    from cxr_oneclass.scoring.stats import fit_score_stats

    model = fit(resolve("paper", epochs=1, **TINY), blob_images(48, 32, seed=1), progress=False).model
    train = blob_images(48, 32, seed=1)
    fit_score_stats(model, train)
    probe = blob_images(5, 32, seed=9, abnormal=True)
    got = score_images(model, probe)["fdist"]

    def feats(images):
        with torch.no_grad():
            x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
            _, z, fu = inference_model(model).U(x)
            return torch.cat([f.mean(dim=(2, 3)) for f in fu[1:]], dim=1).double().numpy()  # U's maps below the first, pooled

    lw = LedoitWolf().fit(feats(train))
    expect = lw.mahalanobis(feats(probe)) / feats(probe).shape[1]
    np.testing.assert_allclose(got, expect, rtol=2e-3)
    assert got.mean() > np.median(score_images(model, blob_images(20, 32, seed=30))["fdist"])


def test_standardised_score_centres_validation_normals_and_sums_terms():
    from cxr_oneclass.scoring.stats import fit_score_stats

    cfg = resolve("paper", epochs=1, score_norm="standardised", score_terms="ssim+fdist+rec", **TINY)
    model = fit(cfg, blob_images(48, 32, seed=1), progress=False).model
    val_normals = blob_images(40, 32, seed=2)
    fit_score_stats(model, blob_images(48, 32, seed=1), val_normals)
    out = score_images(model, val_normals)
    assert abs(np.median(out["score"])) < 1.0  # each term's median on these images is 0: the sum sits near 0
    stats = model.stats
    expect = sum((out[k] - float(stats.center[TERM_INDEX[k]])) / float(stats.scale[TERM_INDEX[k]]) for k in ("ssim", "fdist", "rec"))
    np.testing.assert_allclose(out["score"], expect, rtol=1e-5, atol=1e-6)
    # a standardised score is unchanged by how large a term's raw units are
    assert float(stats.scale[TERM_INDEX["fdist"]]) != 1.0 and float(stats.scale[TERM_INDEX["ssim"]]) != 1.0


def test_score_stats_survive_save_and_load(tmp_path):
    from cxr_oneclass.runs import load_run, save_run
    from cxr_oneclass.scoring.stats import fit_score_stats

    cfg = resolve("paper", epochs=1, score_norm="standardised", score_terms="ssim+fdist", **TINY)
    model = fit(cfg, blob_images(32, 32, seed=1), progress=False).model
    fit_score_stats(model, blob_images(32, 32, seed=1), blob_images(12, 32, seed=2))
    save_run(tmp_path / "run", model, None)
    loaded, _, _ = load_run(tmp_path / "run")
    probe = blob_images(4, 32, seed=5, abnormal=True)
    np.testing.assert_allclose(score_images(loaded, probe)["score"], score_images(model, probe)["score"], rtol=1e-6)


def test_best_preset_scores_variants_without_e_on_u_latent():
    from cxr_oneclass.config import method_config

    best = resolve("best", **TINY)
    assert method_config("u", best).fdist_features == "z"
    assert method_config("full", best).fdist_features == "ez"
    out = score_tensor(build_model(method_config("u+d", best)).eval(), torch.zeros(2, 1, 32, 32))
    assert {"ssim", "fdist", "adv"} <= set(out) and "enc" not in out


def test_fdist_fits_on_very_few_training_normals():
    from cxr_oneclass.scoring.stats import fit_score_stats

    model = build_model(resolve("best", **TINY)).eval()
    for n in (1, 2, 3):
        fit_score_stats(model, blob_images(n, 32, seed=1), blob_images(12, 32, seed=2))
        out = score_images(model, blob_images(3, 32, seed=3))
        assert np.isfinite(out["score"]).all() and np.isfinite(out["fdist"]).all(), n


def test_sdist_is_the_mahalanobis_distance_of_the_pooled_first_map_and_flags_a_small_lesion():
    from sklearn.covariance import LedoitWolf

    from cxr_oneclass.scoring.inference import inference_model
    from cxr_oneclass.scoring.stats import fit_score_stats
    from cxr_oneclass.scoring.terms import sdist_grid, sdist_shape

    model = fit(resolve("paper", epochs=1, **TINY), blob_images(48, 32, seed=1), progress=False).model
    train = blob_images(64, 32, seed=1)
    fit_score_stats(model, train)
    channels, kept, side = sdist_shape(model.cfg)
    assert (channels, kept, side) == (8, 4, 8) and model.stats.sd_whiten.shape == (4 * 64, 4 * 64)
    normal = blob_images(12, 32, seed=40)
    lesion = normal.copy()
    lesion[:, 12:15, 8:11] = 255  # a 3x3 px bright spot in the left lobe: a few cells of the 8x8 grid
    got, got_normal = score_images(model, lesion)["sdist"], score_images(model, normal)["sdist"]
    assert (got > got_normal).all()  # pairwise: the same image with and without the spot

    def grid(images):  # the projected, pooled first map, computed here from the stored statistics
        with torch.no_grad():
            x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
            g = sdist_grid(inference_model(model).U(x)[2][0], side) - model.stats.sd_chan_mean[None, :, None, None]
            return torch.einsum("bchw,cp->bphw", g, model.stats.sd_proj).flatten(1).double().numpy()

    lw = LedoitWolf().fit(grid(train))
    np.testing.assert_allclose(got, lw.mahalanobis(grid(lesion)) / grid(lesion).shape[1], rtol=2e-3)
    # the kept directions are orthonormal principal directions of the channels
    proj = model.stats.sd_proj.double()
    np.testing.assert_allclose((proj.T @ proj).numpy(), np.eye(kept), atol=1e-5)


def test_auto_score_terms_pick_the_best_validation_combination_and_prefer_fewer_terms():
    from cxr_oneclass.config import ConfigError
    from cxr_oneclass.scoring.selection import select_score_terms
    from cxr_oneclass.scoring.stats import new_score_stats

    stats = new_score_stats(resolve("best", **TINY))
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    noise = {k: rng.normal(size=100) for k in ("ssim", "fdist", "sdist", "rec")}
    comps = {**noise, "sdist": noise["sdist"] + 3.0 * labels, "rec": 10.0 * labels}  # rec is not a candidate
    chosen, table = select_score_terms(comps, labels, stats)
    assert chosen == "sdist" and len(table) == 7 and "rec" not in chosen
    same = {k: np.where(labels == 1, 5.0, 0.0) + 0.0 for k in ("ssim", "fdist", "sdist")}  # all perfect: a tie
    assert select_score_terms(same, labels, stats)[0] == "ssim"
    with pytest.raises(ValueError, match="normal and abnormal"):
        select_score_terms(comps, np.zeros(100, int), stats)
    with pytest.raises(ConfigError, match="standardised"):
        resolve("best", score_norm="weights")


def test_heat_map_follows_the_score_sdist_cells_point_at_a_small_lesion():
    from cxr_oneclass.scoring.stats import fit_score_stats
    from cxr_oneclass.scoring.terms import heatmap_kind

    assert heatmap_kind(resolve("paper", **TINY)) == "residual" and heatmap_kind(resolve("best", **TINY)) == "sdist"
    cfg = resolve("paper", epochs=1, score_terms="sdist", score_norm="standardised", **TINY)
    model = fit(cfg, blob_images(48, 32, seed=1), progress=False).model
    fit_score_stats(model, blob_images(64, 32, seed=1), blob_images(16, 32, seed=2))
    normal = blob_images(8, 32, seed=40)
    lesion = normal.copy()
    lesion[:, 12:15, 8:11] = 255  # centred at (13, 9)
    out = score_images(model, lesion, keep_maps=True)
    heat = out["heatmap"].astype(np.float64)
    assert heat.shape == (8, 32, 32)
    # the map's mean is the sdist term (cell shares, enlarged bilinearly: equal up to the border)
    np.testing.assert_allclose(heat.mean(axis=(1, 2)), out["sdist"], rtol=0.1)
    for h in heat:
        r, c = np.unravel_index(np.argmax(h), h.shape)
        assert abs(r - 13) <= 5 and abs(c - 9) <= 5, (r, c)  # the hottest spot is on the lesion
    # a paper-score model keeps the residual map, whose mean is rec
    paper = fit(resolve("paper", epochs=1, **TINY), blob_images(48, 32, seed=1), progress=False).model
    res = score_images(paper, lesion, keep_maps=True)
    np.testing.assert_allclose(res["heatmap"].astype(np.float64).mean(axis=(1, 2)), res["rec"], rtol=1e-2)
