"""Issue 14: where S's synthetic lesions land (config lung_floor / lung_keep), 3 seeds on both shared sets, in parallel.

One command for a lent GPU machine (16 cores, one GPU; the same script runs on a CPU, slowly):
1. trains the default preset (`train`, seeds 0-2) on each set: the base runs, whose S is today's placement;
2. retrains S of every base run under each placement variant (research/detector_readings.py, pick rule, run written);
3. chooses a variant by a rule fixed here, on validation AUC only (the full score `train` would ship):
   the largest mean over the two sets of (variant's mean over seeds - f0's), among variants that lower neither
   set's mean by more than TOLERANCE; today's placement stays unless that mean gain is positive (f0: today's
   placement retrained by the same script, so that every variant is compared with a twin);
4. only then reads the test split, once, for the chosen variant's runs and the base runs (`evaluate --split test`).

Everything lands in WORK; a summary (sweep.json, test.json) and a tar of the small files in OUT.

    python research/lesion_placement_sweep.py --data-root .gpu/data --work /tmp/w --out $OUT --jobs 15   # sweep 1
    python research/lesion_placement_sweep.py ... --variants f25k100,f25k100w32,f25k100p70,f25k100nopatch,f25k100ema995 \
        --reference f25k100 --no-test --figures                                                               # sweep 2

Sweep 1 ran when `train`'s default placed lesions as f0 does; since then the base runs place them as f25k100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SETS = ("nih-pneumonia-128", "kermany-pediatric-128")
SEEDS = (0, 1, 2)
K70 = ["--lung-keep", "0.7"]
NEW = ["--lung-floor", "0.25", "--lung-keep", "1.0"]  # the detect preset's placement since session 9
VARIANTS = {  # tag: detector_readings.py flags (explicit: its defaults are the base run's own config)
    # Session 9, sweep 1 (base runs then placed lesions as f0 does): today's placement retrained by the same script
    # (the reference), then the candidates.
    "f0": ["--lung-floor", "0"] + K70,
    "f10": ["--lung-floor", "0.1"] + K70,
    "f25": ["--lung-floor", "0.25"] + K70,
    "f50": ["--lung-floor", "0.5"] + K70,
    "k100": ["--lung-floor", "0", "--lung-keep", "1.0"],
    "f25k100": NEW,
    "f25s2k": ["--lung-floor", "0.25", "--detector-steps", "2000"] + K70,
    # Sweep 2, validation only, on the new placement (reference f25k100): S's width, lesion share, kinds, averaging.
    "f25k100w32": NEW + ["--set", "detector_width=32"],
    "f25k100p70": NEW + ["--set", "lesion_p=0.7"],
    "f25k100nopatch": NEW + ["--mix", "opacity=3,diffuse=2,nodule=1,effusion=1,pneumothorax=0.5,blur=0.5"],
    "f25k100ema995": NEW + ["--set", "detector_ema=0.995"],
}
SWEEP1 = "f0,f10,f25,f50,k100,f25k100,f25s2k"
TOLERANCE = 0.005  # a set's mean validation AUC may fall this much (about half a seed's spread) and still count as held
HERE = Path(__file__).resolve().parent


def run(cmd: list[str], log: Path, deadline: float) -> bool:
    """Run `cmd` logging to `log`; skipped (False) once past the deadline, killed at it."""
    left = deadline - time.time()
    if left < 30:
        log.write_text("skipped: past the deadline\n")
        return False
    with log.open("w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left).returncode == 0
        except subprocess.TimeoutExpired:
            f.write("\nkilled at the deadline\n")
            return False


def val_auc(run_dir: Path) -> float | None:
    cfg = run_dir / "config.json"
    return json.loads(cfg.read_text())["val_auc"] if cfg.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--budget", type=float, default=540, help="seconds: nothing starts after this")
    ap.add_argument("--variants", default=SWEEP1)
    ap.add_argument("--reference", default="f0", help="the variant the others are compared with (its twin)")
    ap.add_argument("--no-test", action="store_true", help="validation only: no choice is acted on, test is not read")
    ap.add_argument("--figures", action="store_true", help="README figures of the seed-0 base runs (validation films)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: a few steps of everything, one set, one seed")
    a = ap.parse_args()
    t0 = time.time()
    deadline = t0 + a.budget
    work, out = Path(a.work), Path(a.out)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    sets, seeds = (SETS[:1], SEEDS[:1]) if a.quick else (SETS, SEEDS)
    quick_train = ["--steps", "2", "--detector-steps", "16"] if a.quick else []
    variants = {k: VARIANTS[k] + (["--detector-steps", "16"] if a.quick else []) for k in a.variants.split(",")}
    env_note = {"python": sys.version.split()[0], "jobs": a.jobs}
    try:
        import torch
        env_note.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # noqa: BLE001 - a note only
        env_note["torch_error"] = repr(e)

    def base(s: str, seed: int) -> Path:
        return work / f"{s.split('-')[0]}-s{seed}"

    with ThreadPoolExecutor(a.jobs) as pool:
        jobs = [pool.submit(run, py + ["-m", "cxr_oneclass", "-q", "train", "--data", f"csv:{a.data_root}/{s}/manifest.csv",
                                       "--out", str(base(s, seed)), "--seed", str(seed)] + quick_train,
                            work / "logs" / f"train-{base(s, seed).name}.log", deadline)
                for s in sets for seed in seeds]
        [j.result() for j in jobs]
        t_base = time.time() - t0
        tasks = [(tag, base(s, seed)) for tag in sorted(variants, key=lambda t: "s2k" not in t and "w32" not in t) for s in sets for seed in seeds
                 if (base(s, seed) / "config.json").exists()]  # the long variants first
        jobs = [pool.submit(run, py + [str(HERE / "detector_readings.py"), str(b), "--out", str(work / "r"), "--tag", tag,
                                       "--strategies", "pick", "--write-runs", "pick"] + variants[tag],
                            work / "logs" / f"{b.name}-{tag}.log", deadline) for tag, b in tasks]
        [j.result() for j in jobs]
    t_sweep = time.time() - t0

    table: dict[str, dict] = {}
    for tag in ["base", *variants]:
        row = {}
        for s in sets:
            runs = [base(s, seed) if tag == "base" else work / "r" / f"{base(s, seed).name}-{tag}-pick" for seed in seeds]
            v = [val_auc(r) for r in runs]
            row[s] = {"val_auc": v, "mean": float(np.mean(v)) if None not in v else None,
                      "std": float(np.std(v)) if None not in v else None}
        table[tag] = row
    ref = a.reference if a.reference in variants else "base"
    b = table[ref]
    chosen, best_gain = ref, 0.0
    for tag in variants:
        if any(table[tag][s]["mean"] is None or b[s]["mean"] is None for s in sets):
            continue
        deltas = [table[tag][s]["mean"] - b[s]["mean"] for s in sets]
        table[tag]["delta"] = deltas
        if min(deltas) >= -TOLERANCE and float(np.mean(deltas)) > best_gain:
            chosen, best_gain = tag, float(np.mean(deltas))
    sweep = {"env": env_note, "rule": f"max mean delta over sets vs {ref}, each delta >= -{TOLERANCE}", "chosen": chosen,
             "table": table, "seconds": {"base": round(t_base), "sweep": round(t_sweep)}}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    print(json.dumps({"chosen": chosen, **{t: {s: r[s]["mean"] for s in sets} for t, r in table.items()}}, indent=1), flush=True)

    if a.figures:
        for s in sets:
            run(py + [str(HERE / "figure_lesions.py"), str(base(s, 0)), "--out", str(out / f"synthetic_vs_real_{s.split('-')[0]}.png")],
                work / "logs" / f"figure-{s}.log", t0 + a.budget + 60)
    if a.no_test:
        pack(work, out)
        print("seconds", round(time.time() - t0), flush=True)
        return
    # Test: read once, after the choice above, for the chosen runs and the base runs (paired, same machine).
    test = {}
    names = ["base"] + ([chosen] if chosen not in ("base", ref) else [])
    evals = [(tag, s, seed) for tag in names for s in sets for seed in seeds]
    final_deadline = t0 + a.budget + 45
    with ThreadPoolExecutor(a.jobs) as pool:
        def one(tag: str, s: str, seed: int) -> tuple:
            r = base(s, seed) if tag == "base" else work / "r" / f"{base(s, seed).name}-{tag}-pick"
            dst = work / "eval" / f"{r.name}-{tag}"
            ok = run(py + ["-m", "cxr_oneclass", "-q", "evaluate", str(r), "--split", "test", "--out", str(dst)],
                     work / "logs" / f"eval-{r.name}-{tag}.log", final_deadline)
            return tag, s, seed, json.loads((dst / "metrics.json").read_text()) if ok else None
        for tag, s, seed, m in pool.map(lambda t: one(*t), evals):
            test.setdefault(tag, {}).setdefault(s, {})[str(seed)] = m
    (out / "test.json").write_text(json.dumps(test, indent=1))
    pack(work, out)
    print("seconds", round(time.time() - t0), flush=True)


def pack(work: Path, out: Path) -> None:
    """The small files of WORK (configs, logs, metrics, scores) in one tar: the device returns few files."""
    with tarfile.open(out / "small.tar.gz", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".log", ".csv", ".md") and p.stat().st_size < 2_000_000:
                tar.add(p, arcname=str(p.relative_to(work)))


if __name__ == "__main__":
    main()
