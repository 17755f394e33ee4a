"""Fitting a trained model's score: statistics on the training normals, for score_terms auto the choice of terms
on validation, then the calibration on validation. The test split never enters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

from ..config import Config
from ..data.types import ImageSet
from ..metrics import auc
from ..model.networks import OneClassGAN
from .calibration import Calibration, fit_calibration
from .inference import score_images
from .stats import fit_score_stats
from .terms import AUTO_TERMS, TERM_INDEX

log = logging.getLogger(__name__)


def select_score_terms(components: dict[str, np.ndarray], labels: np.ndarray, stats) -> tuple[str, dict[str, float]]:
    """score_terms "auto": the sum of standardised AUTO_TERMS with the highest AUC on (validation) `components`
    and `labels`; ties go to fewer terms. Returns the choice and every candidate's AUC."""
    labels = np.asarray(labels)
    if not (labels == 0).any() or not (labels == 1).any():
        raise ValueError("choosing score terms needs normal and abnormal validation images")
    z = {k: (components[k] - float(stats.center[TERM_INDEX[k]])) / float(stats.scale[TERM_INDEX[k]]) for k in AUTO_TERMS if k in components}
    table = {name: auc(labels, summed) for name, summed in candidate_sums(z).items()}
    return best_candidate(table), table


def candidate_sums(z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every non-empty sum of the standardised terms `z`, named '+'-joined, in a fixed order."""
    return {"+".join(c): sum(z[k] for k in c) for r in range(1, len(z) + 1) for c in combinations(z, r)}


def best_candidate(table: dict[str, float]) -> str:
    """The candidate with the highest AUC (to 4 decimals); ties go to fewer terms, then to the earlier one."""
    return max(table, key=lambda k: (round(table[k], 4), -k.count("+")))


@dataclass
class ScoreFit:
    """What fitting the score decided. `cfg` is the config to score with from now on: the model's, with
    score_terms auto replaced by the terms chosen on validation."""

    cfg: Config
    calibration: Calibration
    val_auc: float | None  # None without both classes in validation
    selection: dict | None  # for score_terms auto: what was asked, chosen, and every candidate's validation AUC


def fit_score_and_calibration(model: OneClassGAN, train: ImageSet, val: ImageSet | None) -> ScoreFit:
    """Fit the score's statistics into `model` (training normals; validation normals standardise), choose the
    terms for score_terms auto on validation, and fit the calibration on validation. The caller applies the
    returned config to the model (`model.cfg = fit.cfg`): the choice is a result, not a side effect."""
    cfg = model.cfg
    val_normals = val.images[val.labels == 0] if val is not None else None
    fit_score_stats(model, train.images[train.labels == 0], val_normals, cfg.batch_size)
    if val is not None and len(val):
        calib_set = val
    else:
        log.warning("no validation split: calibrating on training images (thresholds will be optimistic)")
        calib_set = train
    scored = score_images(model, calib_set.images, cfg.batch_size)
    selection = None
    if cfg.score_terms == "auto":
        if calib_set is val and val.n_normal and val.n_abnormal:
            chosen, table = select_score_terms(scored, val.labels, model.stats)
            selection = {"requested": "auto", "chosen": chosen, "val_auc_by_terms": table}
            log.info("score terms chosen on validation: %s (AUC %.3f)", chosen, table[chosen])
        else:
            chosen = "+".join(AUTO_TERMS)
            selection = {"requested": "auto", "chosen": chosen, "val_auc_by_terms": None}
            log.warning("score terms auto: no validation abnormals to choose on; using %s", chosen)
        cfg = replace(cfg, score_terms=chosen)
        # Scored again through the model, not summed here, so the calibration sees the very float32 scores that
        # scoring (and the ONNX graph) will produce for the chosen terms.
        scored = score_images(model, calib_set.images, cfg.batch_size, cfg=cfg)
    calibration = fit_calibration(scored["score"], calib_set.labels, cfg.target_sensitivity)
    return ScoreFit(cfg, calibration, auc(calib_set.labels, scored["score"]) if calib_set is val else None, selection)
