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
from itertools import chain

import numpy as np
import torch
from tqdm import tqdm

from .nets import OneClassGAN, fold_batchnorm
from .runtime import to_model_range, warn_if_bf16_is_emulated

COMPONENTS = ("rec", "adv", "enc")


def component_weights(model: OneClassGAN) -> dict[str, float]:
    """Weights of the score terms that the variant has and the config scores with (`score_terms`)."""
    cfg = model.cfg
    chosen = set(cfg.score_terms.split("+"))
    weights = {"rec": cfg.w_rec}
    if model.D is not None:
        weights["adv"] = cfg.w_adv
    if model.E is not None:
        weights["enc"] = cfg.w_enc
    return {k: w for k, w in weights.items() if k in chosen}


@torch.no_grad()
def score_tensor(model: OneClassGAN, x: torch.Tensor, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """x (B,1,H,W) in [-1,1] -> per-image components (B,), raw score (B,), reconstruction and heat map (B,H,W)."""
    if model.training:
        raise RuntimeError("score_tensor needs the model in eval mode (batch norm on running statistics)")
    net = inference_model(model, precision)
    x = x.float()
    x_net = x.to(dtype=torch.bfloat16 if precision == "bf16" else torch.float32, memory_format=torch.channels_last)
    x_rec, z, _ = net.U(x_net)
    x_rec = x_rec.float()
    resid = (x - x_rec).abs()
    out = {"rec": resid.mean(dim=(1, 2, 3))}
    if net.E is not None:
        z_rec, _ = net.E(x_rec.to(x_net.dtype))
        out["enc"] = (z.float() - z_rec.float()).pow(2).mean(dim=1)
    if net.D is not None:
        logit, _ = net.D(x_rec.to(x_net.dtype))
        out["adv"] = 1.0 - torch.sigmoid(logit.float())
    weights = component_weights(model)
    if not weights:
        raise ValueError(f"score terms {model.cfg.score_terms!r} name none of the variant's components {sorted(out)}")
    out["score"] = sum(weights[k] * out[k] for k in weights)
    out["heatmap"] = resid[:, 0]  # (B, H, W), same units as the rec component
    out["reconstruction"] = x_rec[:, 0]
    return out


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
        return hit[1]
    net = fold_batchnorm(model).to(memory_format=torch.channels_last)
    if precision == "bf16":
        warn_if_bf16_is_emulated(next(model.parameters()).device)
        net = net.to(torch.bfloat16)
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
