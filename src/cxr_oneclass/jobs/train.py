"""`cxr-oneclass train`: train on the normal images of the train split, fit the score and calibrate on
validation, write the run folder. The test split is never read here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.specs import load_dataset
from ..data.types import Dataset, ImageSet
from ..errors import DataError
from ..io_utils import write_csv
from ..metrics import auc
from ..model.networks import OneClassGAN
from ..runs import HISTORY_FILE, DataProvenance, save_run
from ..scoring.calibration import Calibration
from ..scoring.inference import score_images
from ..scoring.selection import fit_score_and_calibration, select_score_terms
from ..scoring.stats import fit_score_stats, needs_stats
from ..training import distributed
from ..training.loop import fit


@dataclass
class TrainOutcome:
    run_dir: Path
    model: OneClassGAN
    calibration: Calibration
    history: list[dict]
    dataset: Dataset
    seconds: float
    val_auc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def train_run(cfg: Config, data: str | Dataset, out_dir: str | Path, progress: bool = True, monitor: dict[str, ImageSet] | None = None) -> TrainOutcome:
    """Train on the train split, calibrate on val, save model.safetensors + config.json + history.csv.

    `data` is a spec (split with `cfg.seed`) or a loaded `Dataset` (its own split seed is recorded). `monitor` maps
    a column name to an image set whose AUC is logged per epoch, for analysis only (experiments log the test
    split as `test_auc_not_for_selection`); nothing here reads those columns.
    """
    out_dir = Path(out_dir)
    ds = data if isinstance(data, Dataset) else load_dataset(data, cfg.image_size, cfg.seed, splits=("train", "val"))
    train = ds.splits.get("train")
    if train is None or train.n_normal == 0:
        raise DataError(f"data {ds.spec!r}: no normal training images (found: {ds.summary() or 'nothing'})")
    val = ds.splits.get("val")
    train_normals = train.images[train.labels == 0]
    val_normals = val.images[val.labels == 0] if val is not None else None
    so_far: list[dict] = []
    val_has_both = val is not None and bool(val.n_abnormal and val.n_normal)

    def on_epoch_end(model: OneClassGAN, row: dict) -> None:
        # Validation AUC per epoch: for the user's eyes (and later model selection); never the test split.
        if needs_stats(cfg) and (val_has_both or monitor):
            # A subset of the training normals is enough for a per-epoch reading and keeps monitoring cheap; the
            # statistics saved with the model are fitted on all of them after training.
            fit_score_stats(model, train_normals, val_normals, cfg.batch_size, max_fit=512)
        score_cfg = cfg
        if val_has_both:
            comps = score_images(model, val.images, cfg.batch_size)
            if cfg.score_terms == "auto":  # the choice the end of training would make now, for the record
                row["score_terms"], table = select_score_terms(comps, val.labels, model.stats)
                row["val_auc"] = table[row["score_terms"]]
                score_cfg = replace(cfg, score_terms=row["score_terms"])
            else:
                row["val_auc"] = auc(val.labels, comps["score"])
        for name, images in (monitor or {}).items():
            row[name] = auc(images.labels, score_images(model, images.images, cfg.batch_size, cfg=score_cfg)["score"])
        so_far.append(dict(row))
        if distributed.is_main():  # written every epoch so that a long run can be followed
            write_csv(out_dir / HISTORY_FILE, so_far)

    t0 = time.perf_counter()
    result = fit(cfg, train_normals, on_epoch_end=on_epoch_end, progress=progress)
    model = result.model
    scored = fit_score_and_calibration(model, train, val)
    model.cfg = scored.cfg  # the run's score from now on (auto: the terms chosen on validation)
    extra = {
        "data_summary": ds.summary(),
        "train_seconds": round(result.seconds, 2),
        "val_auc": scored.val_auc,
        "skipped_files": [str(e) for e in ds.skipped],
    }
    if scored.selection:
        extra["score_selection"] = scored.selection
    if distributed.is_main():  # under torchrun every rank trains the same model; only rank 0 writes it
        save_run(out_dir, model, scored.calibration, extra, DataProvenance.of(ds))
        write_csv(out_dir / HISTORY_FILE, result.history)
    return TrainOutcome(out_dir, model, scored.calibration, result.history, ds, time.perf_counter() - t0, scored.val_auc, extra)
