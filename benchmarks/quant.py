"""int8 against fp32 scoring, in one run per model: throughput, batch-1 latency, and AUC on the run's own splits.

    python benchmarks/quant.py --runs runs/nih runs/kermany     # trained runs (their data must be reachable)
    python benchmarks/quant.py --quick                          # trains a tiny phantom run: a smoke test in seconds
    make bench

For each run: the fp32 ONNX export and the int8 one (`export --int8`, calibrated on the run's training normals);
images/s at batch 64 (median of repeats) for onnxruntime fp32, onnxruntime int8 and PyTorch (the run folder, what
`score RUN` uses); batch-1 latency p50/p99 over `--latency-calls` single-image calls on a warm model, each of the
three; and AUC on the run's validation and test splits with each, with sensitivity, specificity and the share of
normal films cleared at the run's stored threshold (set on validation, fp32). Test labels choose nothing here:
the threshold, the score and the int8 recipe were all fixed before. Writes JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cxr_oneclass.io_utils import write_json  # noqa: E402
from cxr_oneclass.jobs.export import export_run  # noqa: E402
from cxr_oneclass.jobs.score import Scorer  # noqa: E402
from cxr_oneclass.metrics import auc  # noqa: E402
from cxr_oneclass.runs import load_run, run_dataset  # noqa: E402

QUICK_TRAIN = ["--image-size", "32", "--width", "8", "--batch-size", "8", "--epochs", "1", "--detector-width", "4",
               "--detector-steps", "8", "--score-terms", "ssim+seg+sdist"]
QUICK_DATA = "phantom:n_train=48,n_val_normal=16,n_val_abnormal=16,n_test_normal=16,n_test_abnormal=16,size=32"


def throughput(scorer: Scorer, images: np.ndarray, reps: int) -> float:
    """Images/s scoring `images` in the scorer's batches (median of `reps` passes after one warm-up)."""
    scorer.score(images)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        scorer.score(images)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def latency(scorer: Scorer, image: np.ndarray, calls: int) -> dict:
    """Milliseconds for one image (1, S, S) on a warm model: p50, p99, mean."""
    for _ in range(10):
        scorer.score(image)
    ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        scorer.score(image)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms))}


def operating_point(scores: np.ndarray, labels: np.ndarray, scorer: Scorer) -> dict:
    """AUC, and at the run's stored threshold: sensitivity, specificity, share of normals cleared."""
    out: dict = {"auc": auc(labels, scores)}
    cal = scorer.calibration
    if cal is not None:
        flagged = cal.normalise(scores) >= cal.threshold
        out["sensitivity"] = float(flagged[labels == 1].mean()) if (labels == 1).any() else None
        out["specificity"] = float((~flagged[labels == 0]).mean()) if (labels == 0).any() else None
    return out


def bench_run(run: Path, work: Path, reps: int, calls: int, n_speed: int) -> dict:
    model, _, doc = load_run(run)
    size = model.cfg.image_size
    fp32_path, int8_path = work / f"{run.name}.fp32.onnx", work / f"{run.name}.int8.onnx"
    t0 = time.perf_counter()
    export_run(run, fp32_path)
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = export_run(run, int8_path, int8=True)
    t_int8 = time.perf_counter() - t0
    scorers = {"torch": Scorer(run), "onnx_fp32": Scorer(fp32_path), "onnx_int8": Scorer(int8_path)}
    ds = run_dataset(run, doc, size, ("train", "val", "test"))
    train = ds.splits["train"]
    speed_images = np.resize(train.images, (n_speed, size, size))  # real films, repeated to n_speed
    out: dict = {"run": str(run), "data": ds.spec, "image_size": size, "score_terms": model.cfg.score_terms,
                 "export_seconds": {"fp32": round(t_fp32, 1), "int8": round(t_int8, 1)}, "int8": info["int8"],
                 "int8_check": info["diff_by_output"], "int8_calibration": info.get("int8_calibration"), "bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size}}
    for name, scorer in scorers.items():
        row: dict = {"images_per_s_b64": throughput(scorer, speed_images, reps), "latency_b1": latency(scorer, speed_images[:1], calls)}
        for split in ("val", "test"):
            s = ds.splits.get(split)
            if s is not None and len(s):
                scores = scorer.score(s.images)["score"]
                row[split] = operating_point(scores, s.labels, scorer)
                row[split]["n"] = len(s)
        out[name] = row
    f, q = out["onnx_fp32"], out["onnx_int8"]
    out["int8_speedup_b64"] = q["images_per_s_b64"] / f["images_per_s_b64"]
    out["int8_speedup_b1"] = f["latency_b1"]["p50_ms"] / q["latency_b1"]["p50_ms"]
    if "test" in f and f["test"]["auc"] is not None:
        out["test_auc_delta"] = q["test"]["auc"] - f["test"]["auc"]
    return out


def quick_run(work: Path) -> Path:
    from cxr_oneclass.cli import main as cli

    out = work / "quick-run"
    if cli(["-q", "train", "--data", QUICK_DATA, "--out", str(out), "--threads", "1", *QUICK_TRAIN]) != 0:
        raise SystemExit("could not train the quick run")
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="trained run folders (default: a tiny phantom run)")
    ap.add_argument("--quick", action="store_true", help="tiny phantom run, few repeats: a smoke test")
    ap.add_argument("--out", default="runs/bench/quant.json")
    ap.add_argument("--reps", type=int, help="timed passes for images/s (default 5, quick 2)")
    ap.add_argument("--latency-calls", type=int, help="single-image calls for p50/p99 (default 300, quick 20)")
    ap.add_argument("--speed-images", type=int, default=256, help="images per throughput pass (default 256)")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    calls = args.latency_calls or (20 if args.quick else 300)
    with tempfile.TemporaryDirectory(prefix="cxr-quant-") as tmp:
        work = Path(tmp)
        runs = [Path(r) for r in args.runs] or [quick_run(work)]
        results = [bench_run(r, work, reps, calls, 64 if args.quick else args.speed_images) for r in runs]
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
           "quick": args.quick, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, doc)
    print(f"{'run':28s} {'scorer':10s} {'img/s b64':>9s} {'b1 p50':>7s} {'b1 p99':>7s} {'val AUC':>7s} {'test AUC':>8s} {'sens':>5s} {'spec':>5s}")
    for r in results:
        for name in ("torch", "onnx_fp32", "onnx_int8"):
            row = r[name]
            t, v = row.get("test", {}), row.get("val", {})
            fmt = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
            print(f"{Path(r['run']).name[:28]:28s} {name:10s} {row['images_per_s_b64']:9.1f} {row['latency_b1']['p50_ms']:7.2f} "
                  f"{row['latency_b1']['p99_ms']:7.2f} {fmt(v.get('auc')):>7s} {fmt(t.get('auc')):>8s} {fmt(t.get('sensitivity'), '.2f'):>5s} "
                  f"{fmt(t.get('specificity'), '.2f'):>5s}")
        print(f"  int8 / fp32 onnx: {r['int8_speedup_b64']:.2f}x images/s at batch 64, {r['int8_speedup_b1']:.2f}x batch-1 p50; "
              f"test AUC change {r.get('test_auc_delta', float('nan')):+.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
