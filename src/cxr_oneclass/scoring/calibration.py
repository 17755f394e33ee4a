"""The normalisation and operating threshold of a run, fitted on validation data only.

The paper min-max normalises A(x) over the *test* set; a deployed tool cannot see one, so `Calibration` fits the
normalisation and a threshold on validation data and is stored with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..metrics import threshold_at_sensitivity


@dataclass
class Calibration:
    """normalised = (raw − lo) / (hi − lo): 0 and 1 are the lowest and highest validation scores (test images can
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
    def from_dict(cls, d: dict) -> Calibration:
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
