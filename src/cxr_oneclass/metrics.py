"""Metrics from scores and labels: AUC overall and per term, operating points at a threshold. Numbers in, numbers out."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from .scoring.terms import TERM_NAMES


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (abnormal = positive); None when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels[labels >= 0])) < 2:
        return None
    keep = labels >= 0
    return float(roc_auc_score(labels[keep], np.asarray(scores)[keep]))


def threshold_at_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """Highest threshold that flags (score >= threshold) at least `sensitivity` of the abnormals."""
    abn = np.sort(np.asarray(scores)[np.asarray(labels) == 1])
    if abn.size == 0:
        raise ValueError("no abnormal images to set a sensitivity on")
    return float(abn[int(np.floor((1.0 - sensitivity) * abn.size))])


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV and the fraction of normals auto-cleared (below threshold)."""
    labels = np.asarray(labels)
    flag = np.asarray(scores) >= threshold
    tp = int(np.sum(flag & (labels == 1)))
    fn = int(np.sum(~flag & (labels == 1)))
    tn = int(np.sum(~flag & (labels == 0)))
    fp = int(np.sum(flag & (labels == 0)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "normals_cleared": ratio(tn, tn + fp),
        "flagged_fraction": ratio(tp + fp, len(labels)),
    }


def compute_metrics(labels: np.ndarray, scored: dict[str, np.ndarray], normalised: np.ndarray, threshold: float | None) -> dict:
    labels = np.asarray(labels)
    metrics: dict = {
        "auc": auc(labels, scored["score"]),
        "n_normal": int((labels == 0).sum()),
        "n_abnormal": int((labels == 1).sum()),
        "component_auc": {k: auc(labels, scored[k]) for k in TERM_NAMES if k in scored},
    }
    if threshold is not None:
        metrics["at_threshold"] = operating_point(labels, normalised, threshold)
    if metrics["auc"] is not None:
        # What a triage user asks: at a fixed sensitivity, how many normals could be auto-cleared?
        metrics["at_sensitivity"] = {
            f"{s:.2f}": operating_point(labels, normalised, threshold_at_sensitivity(labels, normalised, s))
            for s in (0.90, 0.95, 0.99)
        }
    return metrics
