"""The normalisation and operating threshold of a run, fitted on validation data only.

The paper min-max normalises A(x) over the *test* set; a deployed tool cannot see one, so `Calibration` fits the
normalisation and a threshold on validation data and is stored with the model. The operating point is the
user's: a target sensitivity (default 95%) or a fixed threshold, when training or later (`calibrate`).

Two readings of a score:
- `score`: (raw − lo) / (hi − lo); 0 and 1 are the lowest and highest validation scores. Flagged at >= threshold.
- `normal_percentile`: the share (0-100) of validation normals that score lower. "Above 99% of normal films" reads
  the same for every run, whatever its raw scale.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..metrics import threshold_at_sensitivity

log = logging.getLogger(__name__)

# Fewer validation abnormals than this and a sensitivity threshold rests on a handful of films: at 95% with 20
# abnormals it is set by the single lowest-scoring one.
MIN_ABNORMAL_FOR_THRESHOLD = 30


@dataclass
class Calibration:
    """normalised = (raw − lo) / (hi − lo): 0 and 1 are the lowest and highest validation scores (test images can
    fall outside). `threshold` is on the normalised scale; an image at or above it is flagged abnormal.
    `normal_quantiles` are the validation normals' raw scores at 0, 1, ..., 100 % (for `percentile`)."""

    lo: float
    hi: float
    threshold: float
    rule: str
    n_val_normal: int
    n_val_abnormal: int
    target_sensitivity: float | None = None  # None: a fixed threshold, or no abnormals to aim at
    normal_quantiles: list[float] | None = None  # None in runs calibrated before they were kept
    warnings: list[str] = field(default_factory=list)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        span = self.hi - self.lo
        return (np.asarray(raw, dtype=np.float64) - self.lo) / (span if span > 0 else 1.0)

    def percentile(self, raw: np.ndarray) -> np.ndarray | None:
        """Share (0-100) of validation normals that score below each raw score; None without stored quantiles."""
        if not self.normal_quantiles:
            return None
        q = np.asarray(self.normal_quantiles, dtype=np.float64)
        return np.interp(np.asarray(raw, dtype=np.float64), q, np.linspace(0.0, 100.0, q.size), left=0.0, right=100.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown calibration keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def fit_calibration(raw_val: np.ndarray, labels_val: np.ndarray, target_sensitivity: float = 0.95,
                    threshold: float | None = None, scale: Calibration | None = None) -> Calibration:
    """Min-max over validation scores (or the normalisation of `scale`, kept when only the threshold is refitted);
    the threshold at `target_sensitivity` on validation abnormals when there are any, else at the 95th percentile of
    validation normals (5% of normals flagged); or `threshold` as given (on the normalised scale)."""
    raw_val = np.asarray(raw_val, dtype=np.float64)
    labels_val = np.asarray(labels_val)
    if raw_val.size == 0:
        raise ValueError("cannot calibrate on an empty validation set")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    lo, hi = (scale.lo, scale.hi) if scale is not None else (float(raw_val.min()), float(raw_val.max()))
    n_abn = int((labels_val == 1).sum())
    cal = Calibration(lo, hi, 0.0, "", int((labels_val == 0).sum()), n_abn)
    normals = raw_val[labels_val == 0]
    if normals.size:
        cal.normal_quantiles = [float(v) for v in np.quantile(normals, np.linspace(0, 1, 101))]
    norm = cal.normalise(raw_val)
    if threshold is not None:
        cal.threshold, cal.rule = float(threshold), f"fixed at {threshold:g} (set by the user)"
    elif n_abn:
        cal.threshold = threshold_at_sensitivity(labels_val, norm, target_sensitivity)
        cal.target_sensitivity = target_sensitivity
        cal.rule = f"sensitivity {target_sensitivity:.0%} on validation abnormals"
        if n_abn < MIN_ABNORMAL_FOR_THRESHOLD:
            cal.warnings.append(f"only {n_abn} validation abnormals: the {target_sensitivity:.0%}-sensitivity threshold "
                                f"rests on a few films and will move on new data (want >= {MIN_ABNORMAL_FOR_THRESHOLD})")
    else:
        cal.threshold = float(np.quantile(norm[labels_val == 0], 0.95))
        cal.rule = "95th percentile of validation normals"
        cal.warnings.append("no validation abnormals: the threshold flags 5% of validation normals, its sensitivity is unknown")
    for w in cal.warnings:
        log.warning("calibration: %s", w)
    return cal
