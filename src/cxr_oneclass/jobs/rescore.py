"""`cxr-oneclass rescore RUN --out NEW`: the same weights with another anomaly score, refitted on the run's own
train and validation splits, without training again."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..data.types import Dataset
from ..errors import ConfigError, DataError
from ..io_utils import write_text
from ..reporting.model_card import write_model_card
from ..runs import HISTORY_FILE, DataProvenance, load_run, run_dataset, save_run, staged
from ..scoring.selection import fit_score_and_calibration
from ..scoring.stats import attach_stats
from .train import TrainOutcome

SCORE_FIELDS = ("score_terms", "score_norm", "fdist_features")


def rescore_run(run_dir: str | Path, out_dir: str | Path, data: str | Dataset | None = None, **score: Any) -> TrainOutcome:
    """A copy of a trained run with another anomaly score (`score_terms`, `score_norm`, `fdist_features`): same
    weights, score statistics refitted on the train and validation splits, new calibration. Ablates the score
    without training again. Without `data`, exactly the split the run was trained on."""
    bad = sorted(set(score) - set(SCORE_FIELDS))
    if bad:
        raise ConfigError(f"rescore changes only {', '.join(SCORE_FIELDS)}; not {', '.join(bad)}")
    model, _, doc = load_run(run_dir)
    cfg = replace(model.cfg, **{k: v for k, v in score.items() if v is not None})
    ds = run_dataset(run_dir, doc, cfg.image_size, ("train", "val"), data)
    train, val = ds.splits.get("train"), ds.splits.get("val")
    if train is None or train.n_normal == 0:
        raise DataError(f"data {ds.spec!r}: no normal training images to fit the score statistics on")
    t0 = time.perf_counter()
    model.cfg = cfg
    attach_stats(model)
    scored = fit_score_and_calibration(model, train, val)
    model.cfg = scored.cfg
    dropped = ("version", "config", "calibration", "score_selection", *DataProvenance("", 0).to_doc())
    extra = {k: v for k, v in doc.items() if k not in dropped}
    extra.update({"val_auc": scored.val_auc, "rescored_from": str(run_dir)})
    if scored.selection:
        extra["score_selection"] = scored.selection
    out_dir = Path(out_dir)
    history = Path(run_dir) / HISTORY_FILE
    history_text = history.read_text(encoding="utf-8") if history.is_file() else None
    with staged(out_dir) as part:  # rescoring a run in place replaces it whole (its old evaluations go with it)
        save_run(part, model, scored.calibration, extra, DataProvenance.of(ds))
        if history_text is not None:
            write_text(part / HISTORY_FILE, history_text)
        write_model_card(part, val)
    return TrainOutcome(out_dir, model, scored.calibration, [], ds, time.perf_counter() - t0, scored.val_auc, extra)
