"""`cxr-oneclass calibrate RUN`: set the operating point again without training: a target sensitivity or a fixed
threshold, on the run's validation split or on another labelled set (a new site's films). The weights, the
score and its normalisation stay; only the threshold moves."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from ..data.types import Dataset
from ..errors import DataError
from ..io_utils import write_json
from ..metrics import operating_point
from ..reporting.model_card import write_model_card
from ..runs import CONFIG_FILE, ENSEMBLE_FILE, load_run, run_dataset
from ..scoring.calibration import fit_calibration
from ..scoring.ensemble import is_ensemble, load_ensemble
from .ensemble import write_ensemble_card
from .evaluate import score_set


def calibrate_run(run_dir: str | Path, data: str | Dataset | None = None, split: str = "val",
                  target_sensitivity: float | None = None, threshold: float | None = None) -> dict:
    """Refit the run's threshold on `split` of `data` (default: the run's own data) at `target_sensitivity`
    (default: the run's) or to a fixed `threshold` (calibrated scale). Returns the operating point on that split
    before and after. Evaluations made at the old threshold are removed (their flags no longer hold)."""
    if target_sensitivity is not None and threshold is not None:
        raise DataError("give a target sensitivity or a threshold, not both")
    run_dir = Path(run_dir)
    ens = load_ensemble(run_dir) if is_ensemble(run_dir) else None
    if ens is not None:  # K runs scored as one: the ensemble's own calibration moves, its members' stay
        model, old, doc, data_dir = ens, ens.calibration, ens.doc, ens.data_dir
        data_doc = ens.docs[0]
    else:
        model, old, doc = load_run(run_dir)
        data_dir, data_doc = run_dir, doc
    cfg = model.cfg
    ds = run_dataset(data_dir, data_doc, cfg.image_size, (split,), data)
    images = ds[split]
    if threshold is None and not images.n_abnormal:
        raise DataError(f"{split} split of {ds.spec!r} has no abnormal images: a sensitivity cannot be set on it "
                        "(give --threshold, or labelled abnormal films)")
    raw = score_set(model, None, images, cfg.batch_size, progress=False)["score"]
    target = target_sensitivity if target_sensitivity is not None else cfg.target_sensitivity
    new = fit_calibration(raw, images.labels, target, threshold, scale=old)
    before = operating_point(images.labels, old.normalise(raw), old.threshold) if old else None
    after = operating_point(images.labels, new.normalise(raw), new.threshold)
    doc["calibration"] = new.to_dict()
    doc["calibrated"] = {"data": ds.spec, "split": split, "split_seed": ds.split_seed, "n_normal": images.n_normal,
                         "n_abnormal": images.n_abnormal, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for stale in run_dir.glob("eval-*"):  # first: an evaluation must never sit beside a threshold it was not made at
        shutil.rmtree(stale, ignore_errors=True)
    written = run_dir / (ENSEMBLE_FILE if ens is not None else CONFIG_FILE)
    write_json(written, doc)  # one atomic write; the weights (and their checksum) are unchanged
    if ens is not None:
        ens.calibration = new
        write_ensemble_card(ens)
    else:
        write_model_card(run_dir)
    return {"before": before, "after": after, "calibration": new.to_dict(), "split": split, "data": ds.spec, "wrote": str(written)}
