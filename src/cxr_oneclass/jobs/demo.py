"""`cxr-oneclass demo`: the main job on embedded data: generate phantom radiographs, train the full model, evaluate, report.

`cxr-oneclass demo --out DIR` writes DIR/metrics.json (overall AUC and per abnormality type), DIR/roc.png,
DIR/examples.png, DIR/scores.csv and the trained run in DIR/run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..config import DEFAULT_PRESET, resolve
from ..data.phantom import ABNORMALITIES, PhantomOptions
from ..data.specs import load_dataset
from ..io_utils import write_csv, write_json
from ..metrics import auc, compute_metrics
from ..scoring.terms import HEATMAP_DISPLAY, heatmap_kind
from ..viz import examples_figure, roc_figure
from .evaluate import score_set
from .train import train_run

log = logging.getLogger(__name__)

# Sized so that set-up + demo finish within 10 minutes on a 2-core CPU.
DEMO_DATA = PhantomOptions(n_train=1000, n_val_normal=100, n_val_abnormal=100, n_test_normal=250, n_test_abnormal=250, size=64, severity=0.5)
DEMO_EPOCHS = 10
# Each lesion detector's steps in the demo: the phantoms' lesions are learnt fast, and `make demo` stays under
# 10 minutes on 2 cores (a real set gets the preset's 1,000). 300 again since the default went back to one S
# (session 14); with two S's it was 200 each.
DEMO_DETECTOR_STEPS = 300


def demo_spec(opts: PhantomOptions) -> str:
    return (
        f"phantom:n_train={opts.n_train},n_val_normal={opts.n_val_normal},n_val_abnormal={opts.n_val_abnormal},"
        f"n_test_normal={opts.n_test_normal},n_test_abnormal={opts.n_test_abnormal},size={opts.size},"
        f"seed={opts.seed},severity={opts.severity}"
    )


def run_demo(out_dir: str | Path = "runs/demo", epochs: int | None = None, seed: int = 0, progress: bool = True, data: PhantomOptions | None = None, preset: str = DEFAULT_PRESET, **overrides) -> str:
    """Run the whole job; returns a short text summary for the CLI to print."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    opts = data or DEMO_DATA
    spec = demo_spec(PhantomOptions(**{**opts.__dict__, "seed": seed}))
    overrides.setdefault("detector_steps", DEMO_DETECTOR_STEPS)
    cfg = resolve(preset, variant="full", epochs=epochs or DEMO_EPOCHS, seed=seed, image_size=opts.size, **overrides)
    ds = load_dataset(spec, cfg.image_size, seed)
    outcome = train_run(cfg, ds, out / "run", progress=progress)
    test = ds["test"]
    scored = score_set(outcome.model, outcome.calibration, test, cfg.batch_size, keep_maps=True)
    kinds = np.array(test.meta["kind"])
    metrics = compute_metrics(test.labels, scored, scored["normalised"], outcome.calibration.threshold)
    normal = kinds == "normal"
    metrics["auc_by_type"] = {}
    curves = {"all": (test.labels, scored["score"])}
    for kind in ABNORMALITIES:
        sel = normal | (kinds == kind)
        if (kinds == kind).any():
            metrics["auc_by_type"][kind] = auc(test.labels[sel], scored["score"][sel])
            curves[kind] = (test.labels[sel], scored["score"][sel])
    metrics.update({"data": spec, "val_auc": outcome.val_auc, "train_seconds": round(outcome.seconds, 1), "total_seconds": None})
    roc_figure(out / "roc.png", curves, title="Phantom test set: normal vs each abnormality")
    # One example per row: a normal and each abnormality, the median-scored image of its kind (typical, not cherry-picked).
    rows = []
    for kind in ("normal",) + tuple(ABNORMALITIES):
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            i = idx[np.argsort(scored["normalised"][idx])[idx.size // 2]]
            rows.append((kind, test.images[i], scored["reconstruction"][i], scored["heatmap"][i], float(scored["normalised"][i])))
    heat_label, heat_max = HEATMAP_DISPLAY[heatmap_kind(outcome.model.cfg)]
    examples_figure(out / "examples.png", rows, title="median-scored test image of each kind (score: 0-1 = validation range)",
                    heat_label=heat_label, heat_max=heat_max)
    write_csv(
        out / "scores.csv",
        [{"file": n, "kind": k, "label": int(y), "score": s} for n, k, y, s in zip(test.names, kinds, test.labels, scored["normalised"])],
    )
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "metrics.json", metrics)
    lines = [
        f"demo: trained the full model ({preset} preset) on {int(np.sum(ds['train'].labels == 0))} phantom normals for {cfg.epochs} epochs ({outcome.seconds:.0f} s)",
        f"test AUC {metrics['auc']:.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in metrics["auc_by_type"].items()) + ")",
        f"report: {out / 'metrics.json'}, {out / 'roc.png'}, {out / 'examples.png'}",
    ]
    return "\n".join(lines)
