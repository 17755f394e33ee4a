"""Anomaly score of Tang et al. §2.3, its components, heat maps, and the calibration fitted on validation data.

A(x) = λ1·mean|x − x'| + λ2·(1 − D(x')) + λ3·mean(z − z')², with the terms a variant lacks left out.
The paper min-max normalises A over the *test* set; a deployed tool cannot see one, so `Calibration` fits the
normalisation and an operating threshold on validation data and is stored with the model.

Scoring always runs the networks in eval mode (batch norm on running statistics), so an image's score never
depends on the other images in its batch.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from itertools import chain, combinations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import AUTO_TERMS, SCORE_TERMS
from .nets import OneClassGAN, fold_batchnorm, sdist_shape
from .runtime import exact_fp32, to_model_range, warn_if_bf16_is_emulated

log = logging.getLogger(__name__)

COMPONENTS = SCORE_TERMS  # every term a score can use; a model reports those it has
TERM_INDEX = {k: i for i, k in enumerate(COMPONENTS)}  # a term's slot in ScoreStats.center and .scale
SSIM_WINDOW = 7  # px at 64 px: about one rib space


def has_component(model: OneClassGAN, name: str) -> bool:
    return (name != "adv" or model.D is not None) and (name != "enc" or model.E is not None)


def model_components(model: OneClassGAN) -> list[str]:
    """The components `model` reports: rec, ssim, fdist and sdist always; adv with D; enc with E."""
    return [k for k in COMPONENTS if has_component(model, k)]


def score_term_names(cfg) -> set[str]:
    """The terms `cfg.score_terms` names; "auto", before its choice on validation (select_score_terms), names
    every candidate."""
    return set(AUTO_TERMS if cfg.score_terms == "auto" else cfg.score_terms.split("+"))


def component_weights(model: OneClassGAN) -> dict[str, float]:
    """Weights of the score terms that the variant has and the config scores with (`score_terms`): the paper's
    λ for rec/adv/enc (1 for ssim/fdist/sdist) under `weights`; 1 for every term under `standardised`."""
    cfg = model.cfg
    chosen = score_term_names(cfg)
    lam = {"rec": cfg.w_rec, "adv": cfg.w_adv, "enc": cfg.w_enc, "ssim": 1.0, "fdist": 1.0, "sdist": 1.0}
    if cfg.score_norm == "standardised":
        lam = dict.fromkeys(lam, 1.0)
    return {k: lam[k] for k in model_components(model) if k in chosen}


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of images in [-1, 1], box window, same size as the input: (B,1,H,W)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # K1, K2 times the data range 2
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, 1, pad, count_include_pad=False)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def feature_vector(cfg_features: str, z: torch.Tensor, feats_u: list[torch.Tensor], z_rec: torch.Tensor | None) -> torch.Tensor:
    """(B, F) features that fdist measures: U's encoder maps below the first, each averaged over space ("u"),
    U's latent ("z") or E's latent of the reconstruction ("ez")."""
    if cfg_features == "u":
        return torch.cat([f.float().mean(dim=(2, 3)) for f in feats_u[1:]], dim=1)
    if cfg_features == "z":
        return z.float()
    if z_rec is None:
        raise ValueError("fdist features 'ez' need the encoder E")
    return z_rec.float()


def heatmap_kind(cfg) -> str:
    """Which map `compute_components` returns as the heat map for this config's score (viz.HEATMAP_DISPLAY says
    how each is drawn)."""
    return "sdist" if "sdist" in score_term_names(cfg) else "residual"


def sdist_grid(first_map: torch.Tensor, side: int) -> torch.Tensor:
    """U's first feature map (B, C, h, w) average-pooled to (B, C, side, side): a coarse map of what is where."""
    k = first_map.shape[-1] // side
    return F.avg_pool2d(first_map.float(), k) if k > 1 else first_map.float()


def compute_components(net: OneClassGAN, x: torch.Tensor, x_net: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Networks of `net` (eval mode) on x (B,1,H,W) in [-1,1] -> components (B,), score (B,), residual map and
    reconstruction (B,H,W). `x_net` is x as the networks take it (dtype, layout); default x.

    Shared by PyTorch scoring and the ONNX graph, so the two cannot drift apart.
    """
    x_net = x if x_net is None else x_net
    x_rec, z, feats_u = net.U(x_net)
    x_rec = x_rec.float()
    resid = (x - x_rec).abs()
    out = {"rec": resid.mean(dim=(1, 2, 3)), "ssim": 1.0 - ssim_map(x, x_rec).mean(dim=(1, 2, 3))}
    z_rec = None
    if net.E is not None:
        z_rec, _ = net.E(x_rec.to(x_net.dtype))
        out["enc"] = (z.float() - z_rec.float()).pow(2).mean(dim=1)
    if net.D is not None:
        logit, _ = net.D(x_rec.to(x_net.dtype))
        out["adv"] = 1.0 - torch.sigmoid(logit.float())
    stats = net.stats
    f = feature_vector(net.cfg.fdist_features, z, feats_u, z_rec)
    w = (f - stats.feat_mean.float()) @ stats.feat_whiten.float()  # (B, F): whitened deviation from normals
    out["fdist"] = w.pow(2).mean(dim=1)  # squared Mahalanobis distance / F
    # sdist: the same distance for U's first map, pooled to a grid and projected on its principal channels, so a
    # lesion a few pixels wide still moves the cell it sits in (fdist's global vectors average it away).
    grid = sdist_grid(feats_u[0], sdist_shape(net.cfg)[2])
    g = torch.einsum("bchw,cp->bphw", grid - stats.sd_chan_mean.float()[None, :, None, None], stats.sd_proj.float())
    d = g.flatten(1) - stats.sd_mean.float()  # (B, G), G = P·side²
    w = d @ stats.sd_whiten.float()
    out["sdist"] = w.pow(2).mean(dim=1)
    weights = component_weights(net)
    if not weights:
        raise ValueError(f"score terms {net.cfg.score_terms!r} name none of the variant's components {sorted(out)}")
    center, scale = stats.center.float(), stats.scale.float()
    out["score"] = sum(weights[k] * (out[k] - center[TERM_INDEX[k]]) / scale[TERM_INDEX[k]] for k in weights)
    if heatmap_kind(net.cfg) == "sdist":  # the heat map shows what the score measures: sdist's cells, enlarged
        # Each cell's share of the distance: d_i·(Σ⁻¹d)_i sums to dᵀΣ⁻¹d over i; per cell, divided by P, so that
        # the map's mean is the sdist term. This is where the image left the normals' distribution.
        kept, side = stats.sd_proj.shape[1], g.shape[-1]
        cells = (d * (w @ stats.sd_whiten.float().T)).view(-1, kept, side, side).sum(dim=1) / kept  # (B, side, side)
        out["heatmap"] = F.interpolate(cells[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    else:
        out["heatmap"] = resid[:, 0]  # (B, H, W), same units as the rec component
    out["reconstruction"] = x_rec[:, 0]
    return out


@torch.no_grad()
def score_tensor(model: OneClassGAN, x: torch.Tensor, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """x (B,1,H,W) in [-1,1] -> per-image components (B,), raw score (B,), reconstruction and heat map (B,H,W)."""
    if model.training:
        raise RuntimeError("score_tensor needs the model in eval mode (batch norm on running statistics)")
    net = inference_model(model, precision)
    x = x.float()
    x_net = x.to(dtype=torch.bfloat16 if precision == "bf16" else torch.float32, memory_format=torch.channels_last)
    with exact_fp32():  # the same scores on a GPU as on a CPU (see runtime.exact_fp32)
        return compute_components(net, x, x_net)


# Eval-only copies for scoring, one per (model, precision), rebuilt when the model's weights or statistics change
# (in-place updates bump a tensor's version; moving the model gives new storage).
_INFERENCE: "weakref.WeakKeyDictionary[OneClassGAN, dict]" = weakref.WeakKeyDictionary()


def inference_model(model: OneClassGAN, precision: str = "fp32") -> OneClassGAN:
    """The networks as scoring runs them: batch norm folded into the convolutions (eval-mode statistics),
    channels-last weights, and for bf16 the weights themselves in bfloat16 (no per-call autocast casts).
    Cached until `model` changes; computes what `model` in eval mode computes, up to rounding."""
    state = [(t.data_ptr(), t._version) for t in chain(model.parameters(), model.buffers())]
    cache = _INFERENCE.setdefault(model, {})
    hit = cache.get(precision)
    if hit is not None and hit[0] == state:
        hit[1].cfg = model.cfg  # the score's terms can change without the weights (auto selection, rescore)
        return hit[1]
    net = fold_batchnorm(model).to(memory_format=torch.channels_last)
    if precision == "bf16":
        warn_if_bf16_is_emulated(next(model.parameters()).device)
        net = net.to(torch.bfloat16)
        net.stats.float()  # the whitening matrix needs fp32 precision; it is a small matmul
    cache[precision] = (state, net)
    return net


def score_images(
    model: OneClassGAN,
    images: np.ndarray,
    batch_size: int = 64,
    keep_maps: bool = False,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Score uint8 images (N, H, W). Returns score and components (N,), and with keep_maps heat maps and
    reconstructions (N, H, W) as float16 to bound memory."""
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=not progress):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))).to(device)
        out = score_tensor(model, x, precision)
        for k, v in out.items():
            if k in ("heatmap", "reconstruction"):
                if keep_maps:
                    chunks.setdefault(k, []).append(v.cpu().numpy().astype(np.float16))
            else:
                chunks.setdefault(k, []).append(v.cpu().numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def needs_stats(cfg) -> bool:
    """Whether the score uses fitted statistics (an fdist or sdist term, or standardised terms)."""
    return cfg.score_norm == "standardised" or bool({"fdist", "sdist"} & score_term_names(cfg))


def _gaussian(f: np.ndarray, what: str) -> tuple[np.ndarray, torch.Tensor]:
    """Mean and whitening matrix L (L Lᵀ = Σ⁻¹) of the rows of f (N, F), Σ shrunk by Ledoit-Wolf."""
    from sklearn.covariance import LedoitWolf

    if len(f) < 2:
        log.warning("%s fitted on %d training normal(s): its covariance is a guess (identity)", what, len(f))
    lw = LedoitWolf().fit(f) if len(f) >= 2 else None
    location = lw.location_ if lw is not None else f.mean(axis=0)
    whiten = None
    if lw is not None:  # shrinkage keeps the precision well conditioned for any N and F, except with a handful
        precision = torch.from_numpy(lw.precision_)
        try:
            whiten = torch.linalg.cholesky(0.5 * (precision + precision.T))
        except RuntimeError:
            whiten = None
    if whiten is None or not torch.isfinite(whiten).all():
        # Very few images: add a ridge of 0.1% of the mean variance (identity when every feature is constant).
        cov = lw.covariance_ if lw is not None else np.zeros((f.shape[1], f.shape[1]))
        mean_var = float(np.trace(cov)) / cov.shape[0]
        cov = cov + (1e-3 * mean_var if mean_var > 0 else 1.0) * np.eye(cov.shape[0])
        precision = torch.from_numpy(np.linalg.inv(cov))
        whiten = torch.linalg.cholesky(0.5 * (precision + precision.T))
    return location, whiten


def _fit_features(net: OneClassGAN, fdist_features: str, images: np.ndarray, batch_size: int, device: torch.device,
                  side: int) -> tuple[np.ndarray, np.ndarray]:
    """fdist feature vectors (N, F) and sdist grids (N, C, side, side) of uint8 images, float64 on the host."""
    feats, grids = [], []
    with exact_fp32():  # the features that scoring computes, on any device
        for s in range(0, len(images), batch_size):
            x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))).to(device)
            x_rec, z, feats_u = net.U(x.contiguous(memory_format=torch.channels_last))
            z_rec = net.E(x_rec)[0] if net.E is not None else None
            feats.append(feature_vector(fdist_features, z, feats_u, z_rec).double().cpu().numpy())
            grids.append(sdist_grid(feats_u[0], side).double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(grids)


@torch.no_grad()
def fit_score_stats(
    model: OneClassGAN,
    train_normals: np.ndarray,
    reference_normals: np.ndarray | None = None,
    batch_size: int = 64,
    max_fit: int = 2000,
) -> None:
    """Fit the score's statistics into `model.stats`, in place.

    fdist: mean and Ledoit-Wolf-shrunk covariance of the features of (up to `max_fit`) training normals, stored as
    the mean and a whitening matrix L with L Lᵀ = Σ⁻¹. sdist: the same for U's first map on a coarse grid, after
    projecting its channels on their principal directions. Standardised scores: each term's median and IQR/1.349 on
    `reference_normals` (validation normals: not trained on, so their reconstruction errors are those of unseen
    normals), else on the training normals, which look more normal than new images do.
    """
    model.eval()
    stats = model.stats
    stats.center.zero_()
    stats.scale.fill_(1.0)
    if len(train_normals) == 0:
        raise ValueError("no training normals to fit the score statistics on")
    pick = np.linspace(0, len(train_normals) - 1, min(max_fit, len(train_normals))).round().astype(int)
    net = inference_model(model)
    device = next(model.parameters()).device
    side = sdist_shape(model.cfg)[2]
    feats, grids = _fit_features(net, model.cfg.fdist_features, train_normals[pick], batch_size, device, side)
    location, whiten = _gaussian(feats, "fdist")
    stats.feat_mean.copy_(torch.from_numpy(location))
    stats.feat_whiten.copy_(whiten)
    # sdist: principal channel directions of the pooled first map over every cell of every image, then a
    # Gaussian over the projected grid as one vector (where a structure sits matters, as on a film).
    cells = grids.transpose(0, 2, 3, 1).reshape(-1, grids.shape[1])  # grids: (N, C, side, side)
    chan_mean = cells.mean(axis=0)
    _, _, vt = np.linalg.svd(cells - chan_mean, full_matrices=False)
    proj = vt[: stats.sd_proj.shape[1]].T  # (C, P)
    projected = np.einsum("nchw,cp->nphw", grids - chan_mean[None, :, None, None], proj).reshape(len(grids), -1)
    location, whiten = _gaussian(projected, "sdist")
    stats.sd_chan_mean.copy_(torch.from_numpy(chan_mean))
    stats.sd_proj.copy_(torch.from_numpy(np.ascontiguousarray(proj)))
    stats.sd_mean.copy_(torch.from_numpy(location))
    stats.sd_whiten.copy_(whiten)
    if model.cfg.score_norm != "standardised":
        return
    ref = reference_normals if reference_normals is not None and len(reference_normals) >= 10 else None
    if ref is None:
        log.warning("standardising score terms on training normals: fewer than 10 validation normals")
        ref = train_normals[pick]
    comps = score_images(model, ref, batch_size)
    for i, k in enumerate(COMPONENTS):
        if k in comps:
            q25, q50, q75 = np.quantile(comps[k], [0.25, 0.5, 0.75])
            spread = (q75 - q25) / 1.349 or float(np.std(comps[k])) or 1.0
            stats.center[i] = float(q50)
            stats.scale[i] = float(spread)


def select_score_terms(components: dict[str, np.ndarray], labels: np.ndarray, stats) -> tuple[str, dict[str, float]]:
    """score_terms "auto": the sum of standardised AUTO_TERMS with the highest AUC on (validation) `components`
    and `labels`; ties go to fewer terms. Returns the choice and every candidate's AUC."""
    from .evaluate import auc

    labels = np.asarray(labels)
    if not (labels == 0).any() or not (labels == 1).any():
        raise ValueError("choosing score terms needs normal and abnormal validation images")
    z = {k: (components[k] - float(stats.center[TERM_INDEX[k]])) / float(stats.scale[TERM_INDEX[k]]) for k in AUTO_TERMS if k in components}
    table = {}
    for r in range(1, len(z) + 1):
        for combo in combinations(z, r):
            table["+".join(combo)] = auc(labels, sum(z[k] for k in combo))
    best = max(table, key=lambda k: (round(table[k], 4), -k.count("+")))
    return best, table


def threshold_at_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """Highest threshold that flags (score >= threshold) at least `sensitivity` of the abnormals."""
    abn = np.sort(np.asarray(scores)[np.asarray(labels) == 1])
    if abn.size == 0:
        raise ValueError("no abnormal images to set a sensitivity on")
    return float(abn[int(np.floor((1.0 - sensitivity) * abn.size))])


@dataclass
class Calibration:
    """Normalisation and operating threshold, fitted on validation data only.

    normalised = (raw − lo) / (hi − lo): 0 and 1 are the lowest and highest validation scores (test images can
    fall outside). `threshold` is on the normalised scale; an image at or above it is flagged abnormal.
    """

    lo: float
    hi: float
    threshold: float
    rule: str
    n_val_normal: int
    n_val_abnormal: int

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        span = self.hi - self.lo
        return (np.asarray(raw, dtype=np.float64) - self.lo) / (span if span > 0 else 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**d)


def fit_calibration(raw_val: np.ndarray, labels_val: np.ndarray, target_sensitivity: float = 0.95) -> Calibration:
    """Min-max over validation scores; threshold at `target_sensitivity` on validation abnormals when there are
    any, else at the 95th percentile of validation normals (5% of normals flagged)."""
    raw_val = np.asarray(raw_val, dtype=np.float64)
    labels_val = np.asarray(labels_val)
    if raw_val.size == 0:
        raise ValueError("cannot calibrate on an empty validation set")
    lo, hi = float(raw_val.min()), float(raw_val.max())
    cal = Calibration(lo, hi, 0.0, "", int((labels_val == 0).sum()), int((labels_val == 1).sum()))
    norm = cal.normalise(raw_val)
    abn = norm[labels_val == 1]
    if abn.size:
        cal.threshold = threshold_at_sensitivity(labels_val, norm, target_sensitivity)
        cal.rule = f"sensitivity {target_sensitivity:.0%} on validation abnormals"
    else:
        cal.threshold = float(np.quantile(norm[labels_val == 0], 0.95))
        cal.rule = "95th percentile of validation normals"
    return cal
