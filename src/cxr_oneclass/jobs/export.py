"""`cxr-oneclass export RUN --out FILE.onnx`: the run's whole scoring graph as ONNX, checked against PyTorch
before the file is put in place (a graph that fails the check leaves no file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RunError
from ..io_utils import atomic_path
from ..runs import load_run
from ..scoring.inference import model_components, score_tensor
from ..scoring.onnx import OPSET, OnnxScorer, export_onnx

# Agreement needed, as a fraction of each output's own scale (below). The whitened distances (fdist, sdist)
# magnify float rounding in the features: onnxruntime and PyTorch sum in other orders, so their relative
# differences reach 1e-3 on small, freshly trained models, while no decision moves at that size.
TOLERANCE = 1e-3


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


def export_run(run_dir: str | Path, out: str | Path, opset: int = OPSET, verify: bool = True) -> dict:
    """Export a trained run; with `verify`, score film-like images with onnxruntime and PyTorch and return the
    largest difference (see `agreement`); above TOLERANCE it raises and writes nothing."""
    model, calibration, _ = load_run(run_dir)
    out = Path(out)
    info = {"path": str(out), "bytes": 0, "max_rel_diff": None, "diff_by_output": None}
    with atomic_path(out) as tmp:  # renamed onto `out` only when the check passed
        export_onnx(model, tmp, calibration, opset)
        if verify:
            images = check_images(model.cfg.image_size)
            ref = {k: v.double().numpy() for k, v in score_tensor(model, torch.from_numpy(images).unsqueeze(1).float().div(127.5).sub(1.0)).items()}
            got = OnnxScorer(tmp).score(images)
            if calibration is not None and calibration.hi > calibration.lo:
                scale = calibration.hi - calibration.lo
            else:
                scale = max(float(np.median(np.abs(ref["score"]))), 1.0)
            diffs = agreement(ref, got, ["score", *model_components(model)], scale)
            info["diff_by_output"], info["max_rel_diff"] = diffs, max(diffs.values())
            if info["max_rel_diff"] > TOLERANCE:
                worst = max(diffs, key=diffs.get)
                raise RunError(f"{out}: onnxruntime and PyTorch disagree on {worst} by {diffs[worst]:.1e} of its scale "
                               f"(tolerance {TOLERANCE:.0e}); no file was written")
        info["bytes"] = tmp.stat().st_size
    return info
