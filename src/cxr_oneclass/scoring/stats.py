"""The score's statistics: fitted on training normals after training (or on a rescored run) and saved with the
weights, so a run scores a single image the same way wherever it is loaded."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..model.networks import OneClassGAN, build_model
from ..runtime import exact_fp32, to_model_range
from .inference import forward, inference_model, score_images
from .terms import TERM_BY_NAME, TERM_NAMES, TERMS, score_term_names

log = logging.getLogger(__name__)


class ScoreStats(nn.Module):
    """Buffers of every fitted term (`terms.Fitted.buffers`, e.g. fdist's feature mean and whitening matrix) and,
    for standardised scores, a centre and scale per term (`center`, `scale`, one slot per term in table order;
    0 and 1 leave a term as it is)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        for term in TERMS:
            if term.fitted is not None:
                for name, value in term.fitted.buffers(cfg).items():
                    self.register_buffer(name, value)
        self.register_buffer("center", torch.zeros(len(TERMS)))
        self.register_buffer("scale", torch.ones(len(TERMS)))


def new_score_stats(cfg: Config) -> ScoreStats:
    """Unfitted statistics for `cfg`'s score (identity whitening, no centring)."""
    return ScoreStats(cfg)


def build_scoring_model(cfg: Config) -> OneClassGAN:
    """A new model of `cfg` with unfitted score statistics: scores as-is (identity whitening, no centring)."""
    return attach_stats(build_model(cfg))


def attach_stats(model: OneClassGAN) -> OneClassGAN:
    """Give `model` unfitted statistics for its config (replacing any it has), on its device; returns it."""
    model.stats = new_score_stats(model.cfg).to(next(model.parameters()).device)
    return model


def needs_stats(cfg: Config) -> bool:
    """Whether the score uses fitted statistics (a fitted term, or standardised terms)."""
    return cfg.score_norm == "standardised" or any(TERM_BY_NAME[n].fitted is not None for n in score_term_names(cfg))


def _collect(net: OneClassGAN, images: np.ndarray, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Each fitted term's features (N, ...) of uint8 images, float64 on the host."""
    fitted = [t for t in TERMS if t.fitted is not None]
    out: dict[str, list[np.ndarray]] = {t.name: [] for t in fitted}
    with exact_fp32():  # the features that scoring computes, on any device
        for s in range(0, len(images), batch_size):
            x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))).to(device)
            fwd = forward(net, x, x.contiguous(memory_format=torch.channels_last), with_d=False, with_s=False)
            for t in fitted:
                out[t.name].append(t.fitted.features(fwd).double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and IQR/1.349 (a normal distribution's sigma) of `values`; the std, then 1, where the IQR is 0."""
    q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return float(q50), float((q75 - q25) / 1.349 or np.std(values) or 1.0)


@torch.no_grad()
def fit_score_stats(
    model: OneClassGAN,
    train_normals: np.ndarray,
    reference_normals: np.ndarray | None = None,
    batch_size: int = 64,
    max_fit: int = 2000,
) -> None:
    """Fit the score's statistics into `model.stats`, in place (creating them when the model has none).

    Every fitted term: on the features of (up to `max_fit`) training normals (`terms.Fitted`). Standardised
    scores: each term's median and IQR/1.349 on `reference_normals` (validation normals: not trained on, so their
    reconstruction errors are those of unseen normals), else on the training normals, which look more normal
    than new images do.
    """
    if len(train_normals) == 0:
        raise ValueError("no training normals to fit the score statistics on")
    model.eval()
    if model.stats is None:
        attach_stats(model)
    stats = model.stats
    stats.center.zero_()
    stats.scale.fill_(1.0)
    pick = np.linspace(0, len(train_normals) - 1, min(max_fit, len(train_normals))).round().astype(int)
    device = next(model.parameters()).device
    features = _collect(inference_model(model), train_normals[pick], batch_size, device)
    for term in TERMS:
        if term.fitted is not None:
            for name, value in term.fitted.fit(features[term.name], model.cfg).items():
                getattr(stats, name).copy_(torch.from_numpy(value) if isinstance(value, np.ndarray) else value)
    if model.cfg.score_norm != "standardised":
        return
    ref = reference_normals if reference_normals is not None and len(reference_normals) >= 10 else None
    if ref is None:
        log.warning("standardising score terms on training normals: fewer than 10 validation normals")
        ref = train_normals[pick]
    comps = score_images(model, ref, batch_size)
    for i, k in enumerate(TERM_NAMES):
        if k in comps:
            stats.center[i], stats.scale[i] = robust_center_scale(comps[k])
