"""Metrics from scores and labels: AUC overall and per term, operating points at a threshold. Numbers in, numbers out."""

from __future__ import annotations

import numpy as np

from .scoring.terms import TERM_NAMES


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (abnormal = positive); None when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels[labels >= 0])) < 2:
        return None
    keep = labels >= 0
    from sklearn.metrics import roc_auc_score  # imported here: 0.7 s that `score` and the service never need

    return float(roc_auc_score(labels[keep], np.asarray(scores)[keep]))


def threshold_at_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """Highest threshold that flags (score >= threshold) at least `sensitivity` of the abnormals."""
    abn = np.sort(np.asarray(scores)[np.asarray(labels) == 1])
    if abn.size == 0:
        raise ValueError("no abnormal images to set a sensitivity on")
    return float(abn[int(np.floor((1.0 - sensitivity) * abn.size))])


def predictive_values(sensitivity: float | None, specificity: float | None, prevalence: float) -> tuple[float | None, float | None]:
    """PPV and NPV at a stated prevalence of abnormal films (Bayes), not the test set's own mix."""
    if sensitivity is None or specificity is None:
        return None, None
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return (tp / (tp + fp) if tp + fp else None), (tn / (tn + fn) if tn + fn else None)


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float, prevalence: float | None = None) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV and the fraction of normals auto-cleared (below threshold); with
    `prevalence`, PPV and NPV at that prevalence too."""
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
        **_at_prevalence(ratio(tp, tp + fn), ratio(tn, tn + fp), prevalence),
    }


def _at_prevalence(sens: float | None, spec: float | None, prevalence: float | None) -> dict[str, float | None]:
    if prevalence is None:
        return {}
    ppv, npv = predictive_values(sens, spec, prevalence)
    return {"prevalence": prevalence, "ppv_at_prevalence": ppv, "npv_at_prevalence": npv}


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, threshold: float | None, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals for AUC, sensitivity and specificity: `n` resamples, stratified (normals
    and abnormals resampled separately, so each keeps its count). None where a class is missing."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    if not normal.size or not abnormal.size:
        return {"auc": None, "sensitivity": None, "specificity": None}
    rng = np.random.default_rng(seed)
    n0, n1 = normal.size, abnormal.size
    aucs, sens, spec = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        a, b = normal[rng.integers(0, n0, n0)], abnormal[rng.integers(0, n1, n1)]
        # Mann-Whitney: P(abnormal > normal) + 0.5 P(tie), from sorted normals (no sklearn call per resample)
        a.sort()
        below = np.searchsorted(a, b, side="left")
        ties = np.searchsorted(a, b, side="right") - below
        aucs[i] = (below.sum() + 0.5 * ties.sum()) / (n0 * n1)
        if threshold is not None:
            sens[i], spec[i] = np.mean(b >= threshold), np.mean(a < threshold)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out: dict[str, list[float] | None] = {"auc": [float(v) for v in np.percentile(aucs, q)]}
    out["sensitivity"] = [float(v) for v in np.percentile(sens, q)] if threshold is not None else None
    out["specificity"] = [float(v) for v in np.percentile(spec, q)] if threshold is not None else None
    return out


def compute_metrics(labels: np.ndarray, scored: dict[str, np.ndarray], normalised: np.ndarray, threshold: float | None,
                    prevalence: float | None = None, bootstrap: int = 1000) -> dict:
    """AUC (with a bootstrap 95% interval), per-term AUC, the operating point at the stored threshold (with
    intervals for sensitivity and specificity) and at 90/95/99% sensitivity; PPV/NPV at `prevalence` if given."""
    labels = np.asarray(labels)
    metrics: dict = {
        "auc": auc(labels, scored["score"]),
        "n_normal": int((labels == 0).sum()),
        "n_abnormal": int((labels == 1).sum()),
        "component_auc": {k: auc(labels, scored[k]) for k in TERM_NAMES if k in scored},
    }
    if threshold is not None:
        metrics["at_threshold"] = operating_point(labels, normalised, threshold, prevalence)
    if bootstrap and metrics["auc"] is not None:
        metrics["ci95"] = bootstrap_ci(labels, normalised, threshold, n=bootstrap)
    if metrics["auc"] is not None:
        # What a triage user asks: at a fixed sensitivity, how many normals could be auto-cleared?
        metrics["at_sensitivity"] = {
            f"{s:.2f}": operating_point(labels, normalised, threshold_at_sensitivity(labels, normalised, s), prevalence)
            for s in (0.90, 0.95, 0.99)
        }
    return metrics
