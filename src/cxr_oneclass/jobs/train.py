"""`cxr-oneclass train`: train on the normal images of the train split, fit the score and calibrate on
validation, write the run folder. The test split is never read here.

The run is written into RUN.partial (history every epoch, a checkpoint every epoch) and moved into place when
complete; `train --resume RUN` continues an interrupted one from its last checkpoint, bit-identical on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.specs import load_dataset
from ..data.types import Dataset, ImageSet
from ..errors import DataError, RunError
from ..io_utils import write_csv
from ..metrics import auc
from ..model.networks import OneClassGAN
from ..reporting.model_card import write_model_card
from ..runs import (
    HISTORY_FILE,
    DataProvenance,
    Lock,
    load_checkpoint,
    partial_dir,
    remove_checkpoint,
    save_checkpoint,
    save_run,
    staged,
)
from ..runtime import environment
from ..scoring.calibration import Calibration
from ..scoring.inference import score_images
from ..scoring.population import fit_population
from ..scoring.selection import fit_score_and_calibration, select_score_terms
from ..scoring.stats import fit_score_stats, needs_stats
from ..training import distributed
from ..training.detector import fit_detectors
from ..training.loop import Checkpoint, TrainingDiverged, fit

log = logging.getLogger(__name__)

DETECTOR_HISTORY_FILE = "detector_history.csv"  # S's readings (loss, validation AUC of seg) over its training


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


def lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".lock")


def train_run(cfg: Config, data: str | Dataset, out_dir: str | Path, progress: bool = True, monitor: dict[str, ImageSet] | None = None,
              resume: bool = False) -> TrainOutcome:
    """Train on the train split, calibrate on val, save model.safetensors + config.json + history.csv.

    `data` is a spec (split with `cfg.seed`) or a loaded `Dataset` (its own split seed is recorded). `monitor` maps
    a column name to an image set whose AUC is logged per epoch, for analysis only (experiments log the test
    split as `test_auc_not_for_selection`); nothing here reads those columns. With `resume`, training continues
    from the checkpoint in OUT.partial (see `resume_run`).
    """
    out_dir = Path(out_dir)
    main = distributed.is_main()  # under torchrun every rank trains the same model; only rank 0 writes
    lock = Lock(lock_path(out_dir)) if main else contextlib.nullcontext()
    with lock:
        start = None
        partial = partial_dir(out_dir)
        if main:
            found = load_checkpoint(partial)
            if resume and found is None:
                raise RunError(f"nothing to resume: {partial} holds no checkpoint")
            if found is not None and not resume:
                raise RunError(f"{partial} holds an unfinished training (epoch {found[1].get('epoch')}): continue it with "
                               f"`cxr-oneclass train --resume {out_dir}`, or remove {partial} to start over")
            if found is not None:
                start = Checkpoint(found[1]["epoch"], found[1]["history"], found[0], found[1]["trainer"])
        writing = staged(out_dir, keep_on_error=True, fresh=not resume) if main else contextlib.nullcontext(partial)
        try:
            with writing as part:
                return _train(cfg, data, out_dir, part, progress, monitor, start)
        except BaseException:
            if main and partial.is_dir() and load_checkpoint(partial) is None:
                shutil.rmtree(partial, ignore_errors=True)  # nothing to resume: leave nothing behind
            raise


def resume_run(out_dir: str | Path, progress: bool = True) -> TrainOutcome:
    """Continue the interrupted training of OUT from its last checkpoint, with the config and data it started with."""
    out_dir = Path(out_dir)
    found = load_checkpoint(partial_dir(out_dir))
    if found is None:
        raise RunError(f"nothing to resume: {partial_dir(out_dir)} holds no checkpoint")
    info = found[1]
    cfg = Config.from_dict(info["config"])
    prov = DataProvenance(info["data"], info["split_seed"])
    ds = load_dataset(prov.spec, cfg.image_size, prov.split_seed, splits=("train", "val"))
    return train_run(cfg, ds, out_dir, progress=progress, resume=True)


def _train(cfg: Config, data: str | Dataset, out_dir: Path, part: Path, progress: bool, monitor: dict[str, ImageSet] | None,
           start: Checkpoint | None) -> TrainOutcome:
    ds = data if isinstance(data, Dataset) else load_dataset(data, cfg.image_size, cfg.seed, splits=("train", "val"))
    train = ds.splits.get("train")
    if train is None or train.n_normal == 0:
        raise DataError(f"data {ds.spec!r}: no normal training images (found: {ds.summary() or 'nothing'})")
    val = ds.splits.get("val")
    train_normals = train.images[train.labels == 0]
    val_normals = val.images[val.labels == 0] if val is not None else None
    so_far: list[dict] = [dict(r) for r in start.history] if start else []
    val_has_both = val is not None and bool(val.n_abnormal and val.n_normal)
    main = distributed.is_main()
    prov = DataProvenance.of(ds)

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
        if main:  # written every epoch so that a long run can be followed
            write_csv(part / HISTORY_FILE, so_far)

    def on_checkpoint(ckpt: Checkpoint) -> None:
        if main:
            info = {"epoch": ckpt.epoch, "history": ckpt.history, "trainer": ckpt.info, "config": cfg.to_dict(), **prov.to_doc()}
            save_checkpoint(part, ckpt.tensors, info)

    t0 = time.perf_counter()
    try:
        result = fit(cfg, train_normals, on_epoch_end=on_epoch_end, progress=progress, start=start, on_checkpoint=on_checkpoint)
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc} (checkpoints in {part})") from None
    model = result.model
    detector_history, detector_summary = None, {}
    if model.det is not None:  # S, second stage: after the GAN (a resumed run retrains it, seeded: same weights)
        detector_history, detector_summary = fit_detectors(model.det, cfg, train_normals, val, progress)
        if main:
            write_csv(part / DETECTOR_HISTORY_FILE, detector_history)
    scored = fit_score_and_calibration(model, train, val)
    model.cfg = scored.cfg  # the run's score from now on (auto: the terms chosen on validation)
    population = fit_population(train_normals, val_normals)
    extra = {
        "population": population.to_dict(),
        "data_summary": ds.summary(),
        "train_seconds": round(result.seconds, 2),
        "val_auc": scored.val_auc,
        "skipped_files": [str(e) for e in ds.skipped],
        "environment": environment(),  # where a seed's numbers repeat bit for bit
    }
    if scored.selection:
        extra["score_selection"] = scored.selection
    extra.update(detector_summary)
    if main:
        save_run(part, model, scored.calibration, extra, prov)
        write_csv(part / HISTORY_FILE, result.history)
        write_model_card(part, val)
        remove_checkpoint(part)
    return TrainOutcome(out_dir, model, scored.calibration, result.history, ds, time.perf_counter() - t0, scored.val_auc, extra)
