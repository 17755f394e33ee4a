"""`cxr-oneclass export RUN --out FILE.onnx [--int8]`: the run's whole scoring graph as ONNX, checked against
PyTorch before the file is put in place (a graph that fails the check leaves no file). `--int8`: the graph with its
networks quantised to int8 (`scoring/quantize.py`), calibrated on the run's training normals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrError, RunError
from ..io_utils import atomic_path
from ..runs import MODEL_FILE, file_sha256, load_run, run_dataset
from ..scoring.calibration import Calibration, fit_calibration
from ..scoring.inference import model_components, score_tensor
from ..scoring.onnx import OPSET, OnnxScorer, export_onnx, set_metadata
from ..scoring.quantize import pick_calibration, quantize_model

log = logging.getLogger(__name__)

# Agreement needed, as a fraction of each output's own scale (below). The whitened distances (fdist, sdist)
# magnify float rounding in the features: onnxruntime and PyTorch sum in other orders, so their relative
# differences reach 1e-3 on small, freshly trained models, while no decision moves at that size.
TOLERANCE = 1e-3
# int8 rounds every activation to 1 of 256 levels: its scores differ from PyTorch's by design. What must hold is that
# a film's place on the calibrated scale barely moves: the score's difference in units of the validation range
# (normalised 0..1), on real training normals.
INT8_TOLERANCE = 0.05


def check_images(size: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """Smooth, film-like uint8 test images (N, S, S): coarse random fields enlarged bilinearly. Pure noise would be
    far outside any training distribution, where whitened distances are huge and magnify rounding most."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 6, 6, generator=g) * 0.6 + 0.2
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (fine * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], keys: list[str], score_scale: float) -> dict[str, float]:
    """Largest difference per output in units of its scale: the score's is the calibration's validation range
    (what a threshold is set in); a term's is its typical size on these images."""
    out = {}
    for k in keys:
        a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        scale = score_scale if k == "score" else max(float(np.median(np.abs(a))), 1e-12)
        out[k] = float(np.max(np.abs(a - b))) / scale
    return out


def training_normals(run_dir: str | Path, doc: dict, size: int, data: str | None = None) -> tuple[np.ndarray, str]:
    """The run's training normals (uint8 (N, S, S)) and where they came from: the data the run was trained on,
    or `data` (a spec, split with the run's split seed) when the run's data is elsewhere."""
    ds = run_dataset(run_dir, doc, size, ("train",), data)
    train = ds.splits.get("train")
    if train is None or train.n_normal == 0:
        raise RunError(f"data {ds.spec!r}: no normal training images to calibrate int8 on; give --calibration-data")
    return train.images[train.labels == 0], ds.spec


def int8_threshold(run_dir: str | Path, doc: dict, size: int, graph: Path, calibration: Calibration) -> tuple[Calibration, dict]:
    """The run's operating point for the int8 graph: its threshold refitted, at the run's target sensitivity, on
    the split it was set on (the run's validation split, or the one `calibrate` used), scored by the int8 graph;
    the normalisation stays. int8 moves scores a little, and at a 95%-sensitivity threshold a little is a few
    points of sensitivity. A fixed threshold stays; so does the fp32 one when that split cannot be read."""
    note: dict = {"fp32_threshold": calibration.threshold}
    if calibration.target_sensitivity is None:
        return calibration, {**note, "refitted": False, "why": f"kept: {calibration.rule}"}
    where = doc.get("calibrated") or {}
    split = where.get("split", "val")
    try:
        images = run_dataset(run_dir, doc, size, (split,), where.get("data")).splits[split]
    except (CxrError, KeyError) as exc:
        log.warning("int8: the run's threshold is kept (could not read the %s split it was set on: %s)", split, exc)
        return calibration, {**note, "refitted": False, "why": f"{split} split not readable: {exc}"}
    if not images.n_abnormal:
        return calibration, {**note, "refitted": False, "why": f"no abnormal films in the {split} split"}
    raw = OnnxScorer(graph).score(images.images)["score"]
    new = fit_calibration(raw, images.labels, calibration.target_sensitivity, scale=calibration)
    return new, {**note, "refitted": True, "threshold": new.threshold, "split": split, "n": len(images)}


def export_run(run_dir: str | Path, out: str | Path, opset: int = OPSET, verify: bool = True, int8: bool = False,
               calibration_data: str | None = None) -> dict:
    """Export a trained run; with `verify`, score film-like images with onnxruntime and PyTorch and return the
    largest difference (see `agreement`); above TOLERANCE it raises and writes nothing. `int8`: the quantised
    graph, calibrated on the run's training normals (or `calibration_data`); its check scores real training normals
    instead and allows INT8_TOLERANCE on the score (the terms are reported, not held to a bound)."""
    model, calibration, doc = load_run(run_dir)
    out = Path(out)
    info = {"path": str(out), "bytes": 0, "max_rel_diff": None, "diff_by_output": None, "precision": "int8" if int8 else "fp32"}
    normals = None
    if int8:
        try:
            normals, spec = training_normals(run_dir, doc, model.cfg.image_size, calibration_data)
        except CxrError as exc:
            raise RunError(f"{run_dir}: int8 export needs the training normals to calibrate on: {exc}") from exc
    meta = {"weights_sha256": doc.get("weights_sha256") or file_sha256(Path(run_dir) / MODEL_FILE)}
    with atomic_path(out) as tmp:  # renamed onto `out` only when the check passed
        if int8:
            meta["run_calibration"] = json.dumps(calibration.to_dict() if calibration else None)  # what it was made from
            info["int8"] = quantize_model(model, tmp, normals, calibration, source=spec, opset=opset, extra_meta=meta)
            if calibration is not None:
                int8_cal, info["int8_calibration"] = int8_threshold(run_dir, doc, model.cfg.image_size, tmp, calibration)
                set_metadata(tmp, {"calibration": json.dumps(int8_cal.to_dict())})
        else:
            export_onnx(model, tmp, calibration, opset, extra_meta=meta)
        if verify:
            # int8 is checked on real films: its ranges were set on them, and on film-like fields far from the
            # training films the whitened distances are huge and magnify int8's rounding without bound.
            images = pick_calibration(normals, 64) if normals is not None else check_images(model.cfg.image_size)
            ref = {k: v.double().numpy() for k, v in score_tensor(model, torch.from_numpy(images).unsqueeze(1).float().div(127.5).sub(1.0)).items()}
            got = OnnxScorer(tmp).score(images)
            if calibration is not None and calibration.hi > calibration.lo:
                scale = calibration.hi - calibration.lo
            else:
                scale = max(float(np.median(np.abs(ref["score"]))), 1.0)
            diffs = agreement(ref, got, ["score", *model_components(model)], scale)
            info["diff_by_output"], info["max_rel_diff"] = diffs, max(diffs.values())
            held = {"score": diffs["score"]} if int8 else diffs
            bound = INT8_TOLERANCE if int8 else TOLERANCE
            worst = max(held, key=held.get)
            if held[worst] > bound:
                raise RunError(f"{out}: onnxruntime ({info['precision']}) and PyTorch disagree on {worst} by {held[worst]:.1e} of "
                               f"its scale (tolerance {bound:.0e}); no file was written")
        info["bytes"] = tmp.stat().st_size
    return info
