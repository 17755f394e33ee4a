"""A Gaussian model of feature vectors for Mahalanobis distances: mean and whitening matrix, Ledoit-Wolf shrunk."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def fit_gaussian(f: np.ndarray, what: str) -> tuple[np.ndarray, torch.Tensor]:
    """Mean and whitening matrix L (L Lᵀ = Σ⁻¹) of the rows of f (N, F), Σ shrunk by Ledoit-Wolf."""
    from sklearn.covariance import LedoitWolf  # sklearn is slow to import; only fitting needs it

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
