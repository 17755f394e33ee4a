"""Anomaly score of Tang et al. §2.3, its components, heat maps, and the calibration fitted on validation data.

A(x) = λ1·mean|x − x'| + λ2·(1 − D(x')) + λ3·mean(z − z')², with the terms a variant lacks left out.
The paper min-max normalises A over the *test* set; a deployed tool cannot see one, so `Calibration` fits the
normalisation and an operating threshold on validation data and is stored with the model.

Scoring always runs the networks in eval mode (batch norm on running statistics), so an image's score never
depends on the other images in its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from .nets import OneClassGAN
from .runtime import autocast, to_model_range

COMPONENTS = ("rec", "adv", "enc")


def component_weights(model: OneClassGAN) -> dict[str, float]:
    cfg = model.cfg
    weights = {"rec": cfg.w_rec}
    if model.D is not None:
        weights["adv"] = cfg.w_adv
    if model.E is not None:
        weights["enc"] = cfg.w_enc
    return weights


@torch.no_grad()
def score_tensor(model: OneClassGAN, x: torch.Tensor, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """x (B,1,H,W) in [-1,1] -> per-image components (B,), raw score (B,), reconstruction and heat map (B,H,W)."""
    if model.training:
        raise RuntimeError("score_tensor needs the model in eval mode (batch norm on running statistics)")
    with autocast(x.device, precision):
        x_rec, z, _ = model.U(x)
        out = {"rec": (x - x_rec.float()).abs().mean(dim=(1, 2, 3))}
        if model.E is not None:
            z_rec, _ = model.E(x_rec)
            out["enc"] = (z.float() - z_rec.float()).pow(2).mean(dim=1)
        if model.D is not None:
            logit, _ = model.D(x_rec)
            out["adv"] = 1.0 - torch.sigmoid(logit.float())
    weights = component_weights(model)
    out["score"] = sum(weights[k] * out[k] for k in weights)
    out["heatmap"] = (x - x_rec.float()).abs()[:, 0]  # (B, H, W), same units as the rec component
    out["reconstruction"] = x_rec.float()[:, 0]
    return out


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
