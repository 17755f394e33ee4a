"""Scoring a batch: one forward pass, every term of the table, the weighted score and its heat map.

Scoring always runs the networks in eval mode (batch norm on running statistics), so an image's score never
depends on the other images in its batch.
"""

from __future__ import annotations

import weakref
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config
from ..data.normalise import normalise_films
from ..model.networks import OneClassGAN, fold_batchnorm
from ..runtime import exact_fp32, to_model_range, warn_if_bf16_is_emulated
from .terms import RESIDUAL, TERM_BY_NAME, TERM_INDEX, TERMS, Forward, has_term, heatmap_kind, weights_of


def model_components(model: OneClassGAN) -> list[str]:
    """The terms `model` reports, in table order: every term whose network the variant has."""
    return [t.name for t in TERMS if has_term(t, model.D is not None, model.E is not None, getattr(model, "det", None) is not None)]


def component_weights(model: OneClassGAN) -> dict[str, float]:
    """Weights of the terms the score sums (see terms.weights_of)."""
    return weights_of(model.cfg, model_components(model))


def forward(net: OneClassGAN, x: torch.Tensor, x_net: torch.Tensor | None = None, with_d: bool = True,
            with_s: bool = True) -> Forward:
    """The networks of `net` on x (B,1,H,W) in [-1, 1]; `x_net` is x as the networks take it (dtype, layout).

    Under config film_norm each film is normalised first (data/normalise.py): every term, the heat map and the
    reconstruction are then of the film so normalised (`Forward.x`)."""
    if net.cfg.film_norm != "none":
        x = normalise_films(x.float(), net.cfg.film_norm)
        x_net = None if x_net is None else x.to(dtype=x_net.dtype).contiguous(memory_format=torch.channels_last)
    x_net = x if x_net is None else x_net
    x_rec, z, feats_u = net.U(x_net)
    x_rec = x_rec.float()
    z_rec = net.E(x_rec.to(x_net.dtype))[0] if net.E is not None else None
    logit = net.D(x_rec.to(x_net.dtype))[0] if (with_d and net.D is not None) else None
    lesion = net.det(x_net).float() if (with_s and getattr(net, "det", None) is not None) else None
    return Forward(net.cfg, x, x_rec, z, feats_u, z_rec, logit, lesion)


def compute_components(net: OneClassGAN, x: torch.Tensor, x_net: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Networks of `net` (eval mode) on x (B,1,H,W) in [-1,1] -> every term the model has (B,), score (B,), heat
    map and reconstruction (B,H,W). `x_net` is x as the networks take it (dtype, layout); default x.

    Shared by PyTorch scoring and the ONNX graph, so the two cannot drift apart.
    """
    fwd = forward(net, x, x_net)
    stats = net.stats
    out = {name: TERM_BY_NAME[name].compute(fwd, stats) for name in model_components(net)}
    weights = component_weights(net)
    if not weights:
        raise ValueError(f"score terms {net.cfg.score_terms!r} name none of the variant's components {sorted(out)}")
    center, scale = stats.center.float(), stats.scale.float()
    out["score"] = sum(weights[k] * (out[k] - center[TERM_INDEX[k]]) / scale[TERM_INDEX[k]] for k in weights)
    kind = heatmap_kind(net.cfg)
    if kind == RESIDUAL:
        out["heatmap"] = (fwd.x - fwd.x_rec).abs()[:, 0]  # (B, H, W), same units as the rec term
    else:  # the heat map shows what the score measures, enlarged to the image
        cells = TERM_BY_NAME[kind].heatmap(fwd, stats)  # (B, h, w)
        out["heatmap"] = F.interpolate(cells[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    out["reconstruction"] = fwd.x_rec[:, 0]
    return out


@torch.no_grad()
def score_tensor(model: OneClassGAN, x: torch.Tensor, precision: str = "fp32", cfg: Config | None = None) -> dict[str, torch.Tensor]:
    """x (B,1,H,W) in [-1,1] -> per-image components (B,), raw score (B,), reconstruction and heat map (B,H,W).

    `cfg` scores with another score config than the model's (same networks and statistics): e.g. the terms that
    score_terms auto is choosing between, before the choice is the run's."""
    if model.training:
        raise RuntimeError("score_tensor needs the model in eval mode (batch norm on running statistics)")
    if model.stats is None:
        raise RuntimeError("the model has no fitted score statistics (scoring.stats.fit_score_stats)")
    net = inference_model(model, precision)
    net.cfg = cfg if cfg is not None else model.cfg
    x = x.float()
    x_net = x.to(dtype=torch.bfloat16 if precision == "bf16" else torch.float32, memory_format=torch.channels_last)
    with exact_fp32():  # the same scores on a GPU as on a CPU (see runtime.exact_fp32)
        return compute_components(net, x, x_net)


# Eval-only copies for scoring, one per (model, precision), rebuilt when the model's weights or statistics change
# (in-place updates bump a tensor's version; moving the model gives new storage).
_INFERENCE: weakref.WeakKeyDictionary[OneClassGAN, dict] = weakref.WeakKeyDictionary()


def inference_model(model: OneClassGAN, precision: str = "fp32") -> OneClassGAN:
    """The networks as scoring runs them: batch norm folded into the convolutions (eval-mode statistics),
    channels-last weights, and for bf16 the weights themselves in bfloat16 (no per-call autocast casts).
    Cached until `model` changes; computes what `model` in eval mode computes, up to rounding."""
    state = [(t.data_ptr(), t._version) for t in chain(model.parameters(), model.buffers())]
    cache = _INFERENCE.setdefault(model, {})
    hit = cache.get(precision)
    if hit is not None and hit[0] == state:
        return hit[1]
    net = fold_batchnorm(model).to(memory_format=torch.channels_last)
    if precision == "bf16":
        warn_if_bf16_is_emulated(next(model.parameters()).device)
        net = net.to(torch.bfloat16)
        if net.stats is not None:
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
    cfg: Config | None = None,
) -> dict[str, np.ndarray]:
    """Score uint8 images (N, H, W). Returns score and components (N,), and with keep_maps heat maps and
    reconstructions (N, H, W) as float16 to bound memory. `cfg`: as in `score_tensor`."""
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=not progress):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))).to(device)
        out = score_tensor(model, x, precision, cfg)
        for k, v in out.items():
            if k in ("heatmap", "reconstruction"):
                if keep_maps:
                    chunks.setdefault(k, []).append(v.cpu().numpy().astype(np.float16))
            else:
                chunks.setdefault(k, []).append(v.cpu().numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in chunks.items()}
