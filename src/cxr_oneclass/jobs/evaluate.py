"""`cxr-oneclass evaluate RUN`: score a labelled split with a trained run; AUC and operating points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._version import __version__
from ..data.types import Dataset, ImageSet
from ..io_utils import write_csv, write_json
from ..metrics import compute_metrics
from ..model.networks import OneClassGAN
from ..runs import METRICS_FILE, SCORES_FILE, check_writable, eval_dir, load_run, run_dataset, staged
from ..scoring.calibration import Calibration
from ..scoring.ensemble import Ensemble, is_ensemble, load_ensemble
from ..scoring.inference import model_components, score_images
from ..scoring.population import BatchCheck, Population


def score_set(model: OneClassGAN | Ensemble, calibration: Calibration | None, images: ImageSet, batch_size: int = 64,
              keep_maps: bool = False, progress: bool = True) -> dict[str, np.ndarray]:
    """Every term, the raw score and the normalised score (`normalised`) of an image set, by a run's model or an
    ensemble."""
    show = progress and len(images) > 500
    if isinstance(model, Ensemble):
        scored = model.score(images.images, batch_size, keep_maps=keep_maps, progress=show)
    else:
        scored = score_images(model, images.images, batch_size, keep_maps=keep_maps, progress=show)
    scored["normalised"] = calibration.normalise(scored["score"]) if calibration else scored["score"]
    return scored


def evaluate_run(run_dir: str | Path, data: str | Dataset | None = None, split: str = "test", out_dir: str | Path | None = None,
                 progress: bool = True, prevalence: float | None = None) -> dict:
    """Score a split with a trained run; write metrics.json and scores.csv; return the metrics.

    Without `data`, the split comes from the data and split seed the run recorded, so it is exactly the split the
    run was trained beside. `prevalence` adds PPV and NPV at that prevalence of abnormal films."""
    if is_ensemble(run_dir):  # K runs scored as one (scoring/ensemble.py); its data is its first member's
        model = load_ensemble(run_dir)
        calibration, components, data_dir = model.calibration, model.components, model.data_dir
        doc = {**model.docs[0], "population": model.population}
    else:
        model, calibration, doc = load_run(run_dir)
        components, data_dir = model_components(model), Path(run_dir)
    out = Path(out_dir) if out_dir is not None else eval_dir(run_dir, split)
    check_writable(out)  # before the work, not after it
    ds = run_dataset(data_dir, doc, model.cfg.image_size, (split,), data)
    images = ds[split]
    scored = score_set(model, calibration, images, model.cfg.batch_size, progress=progress)
    metrics = compute_metrics(images.labels, scored, scored["normalised"], calibration.threshold if calibration else None, prevalence)
    if doc.get("population"):  # does this split look like the training population? (it should, for a test split)
        check = BatchCheck(Population.from_dict(doc["population"]))
        check.add(images.images)
        metrics["population"] = check.verdict()
    metrics.update({"split": split, "data": ds.spec, "split_seed": ds.split_seed, "run": str(run_dir), "version": __version__})
    # Files of the split that could not be read are not in the metrics: say how many and which.
    metrics["unreadable"] = {"count": len(ds.skipped), "files": [{"file": e.path, "problem": e.problem} for e in ds.skipped]}
    rows = []
    for i, name in enumerate(images.names):
        row = {"file": name, "label": int(images.labels[i]), "score": scored["normalised"][i], "raw_score": scored["score"][i]}
        row.update({k: scored[k][i] for k in components})
        row.update({k: v[i] for k, v in images.meta.items()})
        rows.append(row)
    with staged(out) as part:  # metrics and scores replace an earlier evaluation together
        write_json(part / METRICS_FILE, metrics)
        write_csv(part / SCORES_FILE, rows)
    return metrics
