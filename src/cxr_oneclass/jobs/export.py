"""`cxr-oneclass export RUN --out FILE.onnx`: the run's whole scoring graph as ONNX, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import RunError
from ..runs import load_run
from ..scoring.inference import model_components, score_tensor
from ..scoring.onnx import OPSET, OnnxScorer, export_onnx


def export_run(run_dir: str | Path, out: str | Path, opset: int = OPSET, verify: bool = True) -> dict:
    """Export a trained run; with `verify`, score random images with onnxruntime and PyTorch and return the
    largest relative difference of the scores (raises if it exceeds 1e-4)."""
    model, calibration, _ = load_run(run_dir)
    path = export_onnx(model, out, calibration, opset)
    info = {"path": str(path), "bytes": path.stat().st_size, "max_rel_diff": None}
    if verify:
        rng = np.random.default_rng(0)
        size = model.cfg.image_size
        images = rng.integers(0, 256, (5, size, size), dtype=np.uint8)
        ref = score_tensor(model, torch.from_numpy(images).unsqueeze(1).float().div(127.5).sub(1.0))
        got = OnnxScorer(path).score(images)
        # A standardised score is in units of the validation normals' spread and crosses zero, where a relative
        # difference means nothing: compare it relative to max(|score|, 1 spread). Components: plain relative.
        floor = {"score": 1.0 if model.cfg.score_norm == "standardised" else 1e-12}
        rel = max(
            float(np.max(np.abs(got[k] - ref[k].double().numpy()) / np.maximum(np.abs(ref[k].double().numpy()), floor.get(k, 1e-12))))
            for k in ("score", *model_components(model))
        )
        info["max_rel_diff"] = rel
        if rel > 1e-4:
            raise RunError(f"{path}: onnxruntime scores differ from PyTorch by {rel:.2e} (relative)")
    return info
