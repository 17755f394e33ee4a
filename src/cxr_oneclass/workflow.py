"""The jobs behind the CLI, as library functions: train a run, evaluate it, score files.

Validation data picks the normalisation and threshold; the test split is only ever scored for final metrics.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, distributed
from .checkpoint import load_run, save_run
from .config import AUTO_TERMS, Config, replace
from .data.images import IMAGE_SUFFIXES, load_image
from .data.sources import Dataset, ImageSet, load_dataset
from .errors import ConfigError, DataError, ImageError
from .evaluate import auc, compute_metrics
from .io_utils import write_csv, write_json, write_text
from .nets import OneClassGAN, new_score_stats
from .scoring import COMPONENTS, Calibration, heatmap_kind, fit_calibration, fit_score_stats, needs_stats, score_images, select_score_terms
from .train import fit
from .viz import HEATMAP_DISPLAY, save_overlay

log = logging.getLogger(__name__)


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

    `monitor` maps a column name to an image set whose AUC is logged per epoch, for analysis only (experiments log
    the test split as `test_auc_not_for_selection`); nothing here reads those columns.
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
        if val_has_both:
            comps = score_images(model, val.images, cfg.batch_size)
            if cfg.score_terms == "auto":  # the choice the end of training would make now, for the record
                row["score_terms"], table = select_score_terms(comps, val.labels, model.stats)
                row["val_auc"] = table[row["score_terms"]]
                model.cfg = replace(cfg, score_terms=row["score_terms"])
            else:
                row["val_auc"] = auc(val.labels, comps["score"])
        for name, images in (monitor or {}).items():
            row[name] = auc(images.labels, score_images(model, images.images, cfg.batch_size)["score"])
        model.cfg = cfg
        so_far.append(dict(row))
        if distributed.is_main():  # written every epoch so that a long run can be followed
            write_csv(out_dir / "history.csv", so_far)

    t0 = time.perf_counter()
    result = fit(cfg, train_normals, on_epoch_end=on_epoch_end, progress=progress)
    model = result.model
    calibration, val_auc, selection = fit_score_and_calibration(model, train, val)
    extra = {
        "data": ds.spec,
        "data_summary": ds.summary(),
        "train_seconds": round(result.seconds, 2),
        "val_auc": val_auc,
        "skipped_files": [str(e) for e in ds.skipped],
    }
    if selection:
        extra["score_selection"] = selection
    if distributed.is_main():  # under torchrun every rank trains the same model; only rank 0 writes it
        save_run(out_dir, model, model.cfg, calibration, extra)
        write_csv(out_dir / "history.csv", result.history)
    return TrainOutcome(out_dir, model, calibration, result.history, ds, time.perf_counter() - t0, val_auc, extra)


def fit_score_and_calibration(model: OneClassGAN, train: ImageSet, val: ImageSet | None) -> tuple[Calibration, float | None, dict | None]:
    """After training (or on a rescored run): fit the score's statistics on the training normals (and validation
    normals); for score terms "auto", choose the terms on validation and set them in `model.cfg`; then fit the
    calibration on validation. Returns it, the validation AUC (None without both classes) and the choice made
    (None unless auto)."""
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
        model.cfg = replace(cfg, score_terms=chosen)
        # Scored again through the model, not summed here, so the calibration sees the very float32 scores that
        # scoring (and the ONNX graph) will produce for the chosen terms.
        scored = score_images(model, calib_set.images, cfg.batch_size)
    calibration = fit_calibration(scored["score"], calib_set.labels)
    return calibration, (auc(calib_set.labels, scored["score"]) if calib_set is val else None), selection


SCORE_FIELDS = ("score_terms", "score_norm", "fdist_features")


def rescore_run(run_dir: str | Path, out_dir: str | Path, data: str | Dataset | None = None, **score: Any) -> TrainOutcome:
    """A copy of a trained run with another anomaly score (`score_terms`, `score_norm`, `fdist_features`): same
    weights, score statistics refitted on the train and validation splits, new calibration. Ablates the score
    without training again."""
    bad = sorted(set(score) - set(SCORE_FIELDS))
    if bad:
        raise ConfigError(f"rescore changes only {', '.join(SCORE_FIELDS)}; not {', '.join(bad)}")
    model, _, doc = load_run(run_dir)
    cfg = replace(model.cfg, **{k: v for k, v in score.items() if v is not None})
    spec = data if data is not None else doc.get("data")
    if spec is None:
        raise DataError("no --data given and the run does not record its data spec")
    ds = spec if isinstance(spec, Dataset) else load_dataset(spec, cfg.image_size, cfg.seed, splits=("train", "val"))
    train, val = ds.splits.get("train"), ds.splits.get("val")
    if train is None or train.n_normal == 0:
        raise DataError(f"data {ds.spec!r}: no normal training images to fit the score statistics on")
    t0 = time.perf_counter()
    model.cfg = cfg
    model.stats = new_score_stats(cfg)
    calibration, val_auc, selection = fit_score_and_calibration(model, train, val)
    extra = {k: v for k, v in doc.items() if k not in ("version", "config", "calibration", "score_selection")}
    extra.update({"val_auc": val_auc, "rescored_from": str(run_dir), "data": ds.spec})
    if selection:
        extra["score_selection"] = selection
    out_dir = Path(out_dir)
    save_run(out_dir, model, model.cfg, calibration, extra)
    history = Path(run_dir) / "history.csv"
    if history.is_file() and out_dir.resolve() != Path(run_dir).resolve():
        write_text(out_dir / "history.csv", history.read_text(encoding="utf-8"))
    return TrainOutcome(out_dir, model, calibration, [], ds, time.perf_counter() - t0, val_auc, extra)


def score_set(model: OneClassGAN, calibration: Calibration | None, images: ImageSet, batch_size: int = 64, keep_maps: bool = False,
              progress: bool = True) -> dict[str, np.ndarray]:
    scored = score_images(model, images.images, batch_size, keep_maps=keep_maps, progress=progress and len(images) > 500)
    scored["normalised"] = calibration.normalise(scored["score"]) if calibration else scored["score"]
    return scored


def evaluate_run(run_dir: str | Path, data: str | Dataset | None = None, split: str = "test", out_dir: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Score a split with a trained run; write metrics.json and scores.csv; return the metrics."""
    model, calibration, doc = load_run(run_dir)
    cfg = model.cfg
    spec = data if data is not None else doc.get("data")
    if spec is None:
        raise DataError("no --data given and the run does not record its data spec")
    ds = spec if isinstance(spec, Dataset) else load_dataset(spec, cfg.image_size, cfg.seed, splits=(split,))
    images = ds[split]
    scored = score_set(model, calibration, images, cfg.batch_size, progress=progress)
    metrics = compute_metrics(images.labels, scored, scored["normalised"], calibration.threshold if calibration else None)
    metrics.update({"split": split, "data": ds.spec, "run": str(run_dir), "version": __version__})
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"eval-{split}"
    write_json(out / "metrics.json", metrics)
    rows = []
    for i, name in enumerate(images.names):
        row = {"file": name, "label": int(images.labels[i]), "score": scored["normalised"][i], "raw_score": scored["score"][i]}
        row.update({k: scored[k][i] for k in COMPONENTS if k in scored})
        row.update({k: v[i] for k, v in images.meta.items()})
        rows.append(row)
    write_csv(out / "scores.csv", rows)
    return metrics


# ----------------------------------------------------------------------------------------------- score files

@dataclass
class FileScore:
    path: str
    score: float
    flagged: bool
    components: dict[str, float]


def expand_paths(paths: list[str | Path]) -> tuple[list[Path], list[ImageError]]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    files: list[Path] = []
    errors: list[ImageError] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(ImageError(p, "folder has no image files"))
            files += found
        elif p.exists():
            files.append(p)
        else:
            errors.append(ImageError(p, "file not found"))
    return files, errors


def score_paths(run_dir: str | Path, paths: list[str | Path], heatmap_dir: str | Path | None = None, batch_size: int = 64) -> tuple[list[FileScore], list[ImageError]]:
    """Score image files in bounded-memory chunks; unreadable files are reported, never fatal for the others.

    `run_dir` is a run folder, or an .onnx file written by `export` (scored with onnxruntime; the file carries
    image size and calibration). Threads decode chunk k+1 while chunk k is scored: at most two chunks of images
    are in memory, whatever the number of files.
    """
    keep_maps = heatmap_dir is not None
    if Path(run_dir).suffix.lower() == ".onnx":
        from .export import OnnxScorer

        onnx_scorer = OnnxScorer(run_dir)
        size, calibration = onnx_scorer.image_size, onnx_scorer.calibration
        heat_kind = onnx_scorer.heatmap_kind

        def score(arr: np.ndarray) -> dict[str, np.ndarray]:
            return onnx_scorer.score(arr, batch_size, keep_maps=keep_maps)
    else:
        model, calibration, _ = load_run(run_dir)
        size = model.cfg.image_size
        heat_kind = heatmap_kind(model.cfg)

        def score(arr: np.ndarray) -> dict[str, np.ndarray]:
            return score_images(model, arr, batch_size, keep_maps=keep_maps)

    files, errors = expand_paths(paths)
    results: list[FileScore] = []
    used_names: set[str] = set()

    def decode(p: Path) -> np.ndarray | ImageError:
        try:
            return load_image(p, size)
        except ImageError as exc:
            return exc

    chunks = [files[s : s + batch_size] for s in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(decode, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            # Decode the next chunk in the background while this one is scored.
            pending = [pool.submit(decode, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            ok = [(p, a) for p, a in zip(chunk, decoded) if not isinstance(a, ImageError)]
            errors += [a for a in decoded if isinstance(a, ImageError)]
            if not ok:
                continue
            arr = np.stack([a for _, a in ok])
            scored = score(arr)
            norm = calibration.normalise(scored["score"]) if calibration else scored["score"]
            thr = calibration.threshold if calibration else float("inf")
            for i, (p, _) in enumerate(ok):
                comps = {k: float(scored[k][i]) for k in COMPONENTS if k in scored}
                results.append(FileScore(str(p), float(norm[i]), bool(norm[i] >= thr), comps))
                if heatmap_dir is not None:
                    name = f"{p.stem}_heatmap.png"
                    if name in used_names:  # same stem in two folders: keep both
                        name = f"{p.parent.name}_{p.stem}_{len(used_names)}_heatmap.png"
                    used_names.add(name)
                    save_overlay(Path(heatmap_dir) / name, arr[i], scored["heatmap"][i].astype(np.float32), heat_max=HEATMAP_DISPLAY[heat_kind][1])
    return results, errors
