"""Speed of training and scoring against this machine's compute ceiling, measured in one run.

    python benchmarks/speed.py                      # paper preset at 64 px (a few minutes on 2 cores)
    python benchmarks/speed.py --quick              # tiny model, seconds: a smoke test
    python benchmarks/speed.py --ablate             # also time each training/scoring speed-up switched off
    python benchmarks/speed.py --device cuda --score-batches 1024   # on a GPU: CUDA ceilings, synchronised timings
    make bench

Measures: the ceilings (large fp32 and bf16 matmuls, GFLOP/s); FLOPs per training and per scored image
(torch.utils.flop_counter.FlopCounterMode: convolutions and matmuls, forward and backward); training throughput
(images/s, through `train.Trainer`, the code `fit` runs) and scoring throughput (batch 64) and latency (batch 1),
in fp32 and bf16, with PyTorch and with onnxruntime on the exported graph; each as a fraction of the ceiling of
its precision. Prints a table and writes JSON (--out, default runs/bench/speed.json). Other processes on the
machine depress all figures alike: compare the ratios of one run, and see `env.load` / `env.busy` in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import busy_processes  # noqa: E402

from cxr_oneclass.config import replace, resolve  # noqa: E402
from cxr_oneclass.io_utils import write_json  # noqa: E402
from cxr_oneclass.runtime import autocast, bf16_native, to_model_range  # noqa: E402
from cxr_oneclass.scoring.inference import score_tensor  # noqa: E402
from cxr_oneclass.scoring.stats import build_scoring_model as build_model  # noqa: E402
from cxr_oneclass.training.loop import Trainer, Tuning  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


CPU_SECONDS: list[float] = []  # CPU time (all threads of this process) of the calls `timed` measured last
SYNC = [lambda: None]  # waits for queued GPU work (torch.cuda.synchronize on CUDA), so a timing covers it


def _call(fn) -> None:
    fn()
    SYNC[0]()


def timed(fn, reps: int, min_seconds: float = 0.0, warmup: int = 1) -> float:
    """Median wall seconds of one call, after `warmup` calls; at least `reps` calls and `min_seconds` in all.
    The median CPU seconds of the same calls go to CPU_SECONDS[0]: on a machine shared with other jobs, wall
    time counts the waits for a core and CPU time does not, so FLOPs per CPU-second is the steadier measure."""
    for _ in range(warmup):
        _call(fn)
    times: list[float] = []
    cpu: list[float] = []
    t_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_all < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        _call(fn)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_SECONDS[:] = [statistics.median(cpu)]
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, n_max: int, budget_s: float, device: torch.device = torch.device("cpu")) -> dict:
    """GFLOP/s of an n x n matmul; n grows to n_max unless one call would take longer than the budget allows
    (bf16 without hardware support runs ~100x slower than fp32)."""
    n, best = 256, None
    while True:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        t = timed(lambda a=a, b=b: a @ b, reps=3, min_seconds=min(0.5, budget_s / 4))
        best = {"n": n, "gflops": 2 * n**3 / t / 1e9, "gflops_cpu": 2 * n**3 / CPU_SECONDS[0] / 1e9}
        if n >= n_max or t * 8 * 4 > budget_s:
            return best
        n *= 2


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ training

def bench_train(cfg, images: torch.Tensor, precision: str, settings: list[tuple[str, Tuning]], steps: int) -> list[dict]:
    """Training steps of each setting, timed in turns (round r times step r of every setting), so a change in
    the machine's load during the run hits all settings alike. The FLOP-counting step is the warm-up."""
    cfg = replace(cfg, precision=precision)
    bs = cfg.batch_size
    runs = []
    for label, tuning in settings:
        trainer = Trainer(cfg, tuning=tuning)
        trainer.model.train()
        gen = torch.Generator().manual_seed(0)

        def one_step(trainer=trainer, gen=gen):
            idx = torch.randint(0, len(images), (bs,), generator=gen)
            x, x_in, share = trainer.batch(images, idx)
            trainer.step(x, x_in, share)

        flops = count_flops(one_step) / bs
        trainer.data_seconds = 0.0
        runs.append({"label": label, "tuning": tuning, "trainer": trainer, "fn": one_step, "flops": flops, "wall": [], "cpu": []})
    for _ in range(steps):
        for run in runs:
            run["wall"].append(timed(run["fn"], reps=1, warmup=0))
            run["cpu"].append(CPU_SECONDS[0])
    rows = []
    for run in runs:
        sec, cpu = statistics.median(run["wall"]), statistics.median(run["cpu"])
        rows.append({
            "name": f"train {precision} {run['label']}".strip(),
            "precision": precision,
            "tuning": run["tuning"].__dict__.copy(),
            "images_per_s": bs / sec,
            "ms_per_step": sec * 1e3,
            "flops_per_image": run["flops"],
            "gflops": run["flops"] * bs / sec / 1e9,
            "gflops_cpu": run["flops"] * bs / cpu / 1e9,
            "data_share": run["trainer"].data_seconds / sum(run["wall"]),
        })
    return rows


# ------------------------------------------------------------------------------------------------ scoring

@torch.no_grad()
def naive_score(model, x: torch.Tensor, precision: str) -> None:
    """The scoring forward before the speed work: autocast over the unfolded eval model, NCHW."""
    with autocast(x.device, precision):
        x_rec, z, _ = model.U(x)
        model.E(x_rec)
        model.D(x_rec)


def bench_score_torch(model, size: int, precision: str, batch: int, reps: int, naive: bool = False) -> dict:
    device = next(model.parameters()).device
    x = to_model_range(torch.randint(0, 256, (batch, size, size), dtype=torch.uint8)).to(device)
    fn = (lambda: naive_score(model, x, precision)) if naive else (lambda: score_tensor(model, x, precision))
    flops = count_flops(fn) / batch
    sec = timed(fn, reps=reps, min_seconds=1.0 if batch == 1 else 0.0, warmup=1)
    return {"engine": ("torch" if device.type == "cpu" else "torch-" + device.type) + (" naive" if naive else ""), "precision": precision, "batch": batch, "ms_per_image": sec * 1e3 / batch,
            "latency_ms": sec * 1e3, "flops_per_image": flops, "gflops": flops * batch / sec / 1e9,
            "gflops_cpu": flops * batch / CPU_SECONDS[0] / 1e9}


def bench_score_onnx(model, size: int, batch: int, reps: int, flops: float, threads: int) -> dict:
    from cxr_oneclass.scoring.onnx import OnnxScorer, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - t0
        scorer = OnnxScorer(path, threads=threads)
        images = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
        sec = timed(lambda: scorer.score(images, batch), reps=reps, min_seconds=1.0 if batch == 1 else 0.0, warmup=2)
    return {"engine": "onnxruntime", "precision": "fp32", "batch": batch, "ms_per_image": sec * 1e3 / batch,
            "latency_ms": sec * 1e3, "flops_per_image": flops, "gflops": flops * batch / sec / 1e9,
            "gflops_cpu": flops * batch / CPU_SECONDS[0] / 1e9, "export_s": export_s}


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and few repetitions: a smoke test in seconds")
    ap.add_argument("--out", default="runs/bench/speed.json", help="JSON file to write")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, help="timed training steps per setting (default 4, quick 2)")
    ap.add_argument("--ablate", action="store_true", help="also time each speed-up switched off")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where PyTorch trains and scores (onnxruntime stays on CPU)")
    ap.add_argument("--score-batches", default="", help="comma-separated extra scoring batch sizes (e.g. 1024 on a GPU)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    overrides = dict(image_size=32, width=16, batch_size=16) if quick else {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = resolve(args.preset, device=args.device, **overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        SYNC[0] = torch.cuda.synchronize
    precisions = [p for p in args.precisions.split(",") if p]
    steps = args.steps or (2 if quick else 20 if device.type == "cuda" else 4)
    size, bs = cfg.image_size, cfg.batch_size
    score_batch = 16 if quick else 64
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "speed.py " + " ".join(argv),
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "env": {
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bf16_native(device),
            "load_before": os.getloadavg(), "busy": busy_processes(), "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "config": {"preset": args.preset, "image_size": size, "width": cfg.width, "batch_size": bs},
    }
    t_start = time.perf_counter()

    # -- ceilings
    n_max = 512 if quick else 8192 if device.type == "cuda" else 2048
    ceil = {p: matmul_gflops(DTYPES[p], n_max, 2.0 if quick else 8.0, device) for p in precisions}
    result["ceilings"] = ceil

    # -- training
    images = torch.randint(0, 256, (max(256, bs * 4), size, size), dtype=torch.uint8).to(device)  # where `fit` holds them
    train_rows = []
    settings = [("", Tuning())]
    if args.ablate:
        settings += [("naive", Tuning(False, False, False)), ("-channels_last", Tuning(channels_last=False)),
                     ("-fused_adam", Tuning(fused_adam=False)), ("-freeze_d_in_g", Tuning(freeze_d_in_g=False))]
    for p in precisions:
        slow = p == "bf16" and not result["env"]["bf16_native"]  # emulated bf16: ~100x slower, time it briefly
        chosen = [(label, t) for label, t in settings if p == "fp32" or label in ("", "naive")]
        for row in bench_train(cfg, images, p, chosen, 1 if slow else steps):
            row["fraction_of_ceiling"] = row["gflops"] / ceil[p]["gflops"]
            row["fraction_of_ceiling_cpu"] = row["gflops_cpu"] / ceil[p]["gflops_cpu"]
            train_rows.append(row)
            print(f"  {row['name']}: {row['images_per_s']:.1f} img/s", file=sys.stderr)
    result["train"] = train_rows

    # -- scoring
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(device)
    extra = [(int(b), 3 if quick else 10) for b in args.score_batches.split(",") if b]
    score_rows = []
    for p in precisions:
        slow = p == "bf16" and not result["env"]["bf16_native"]
        for batch, reps in ((score_batch, 1 if slow else 3 if quick else 5), (1, 1 if slow else 5 if quick else 20), *extra):
            row = bench_score_torch(model, size, p, batch, reps)
            score_rows.append(row)
            if args.ablate:
                score_rows.append(bench_score_torch(model, size, p, batch, reps, naive=True))
    if not args.no_onnx:
        flops = next(r["flops_per_image"] for r in score_rows if r["engine"].startswith("torch"))
        for batch, reps in ((score_batch, 3 if quick else 5), (1, 5 if quick else 20)):
            score_rows.append(bench_score_onnx(copy.deepcopy(model).cpu(), size, batch, reps, flops, args.threads))
    for row in score_rows:
        row["name"] = f"score {row['engine']} {row['precision']} b{row['batch']}"
        c = ceil.get(row["precision"], ceil[precisions[0]])
        row["fraction_of_ceiling"] = row["gflops"] / c["gflops"]
        row["fraction_of_ceiling_cpu"] = row["gflops_cpu"] / c["gflops_cpu"]
        print(f"  {row['name']}: {row['ms_per_image']:.2f} ms/img", file=sys.stderr)
    result["score"] = score_rows
    result["flops"] = {
        "train_per_image": train_rows[0]["flops_per_image"],
        "score_per_image": next(r["flops_per_image"] for r in score_rows if r["engine"].startswith("torch")),
    }
    result["env"]["load_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t_start
    # The targets are for the paper preset at 64 px; a quick or resized run is a smoke test only.
    result["targets"] = targets(result) if (args.preset, size, cfg.width) == ("paper", 64, 64) else {}
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


def _best(rows: list[dict], key, **match) -> dict | None:
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=key) if rows else None


def targets(res: dict) -> dict:
    """The issue's targets, checked on this run's figures (None where not measured)."""
    train, score = res["train"], res["score"]
    default = Tuning().__dict__
    tr = {p: _best(train, lambda r: r["images_per_s"], precision=p, tuning=default) for p in ("fp32", "bf16")}
    sb = {p: _best([r for r in score if r["batch"] > 1 and r["engine"].startswith("torch") and "naive" not in r["engine"]], lambda r: -r["ms_per_image"], precision=p) for p in ("fp32", "bf16")}
    s1 = {p: _best([r for r in score if r["batch"] == 1 and r["engine"].startswith("torch") and "naive" not in r["engine"]], lambda r: -r["latency_ms"], precision=p) for p in ("fp32", "bf16")}
    any_b = _best([r for r in score if r["batch"] > 1 and "naive" not in r["engine"]], lambda r: -r["ms_per_image"])
    any_1 = _best([r for r in score if r["batch"] == 1 and "naive" not in r["engine"]], lambda r: -r["latency_ms"])
    best_train = max((r for r in tr.values() if r), key=lambda r: r["images_per_s"])

    def check(value, op, limit):
        return None if value is None else {"value": round(value, 3), "target": f"{op} {limit}", "met": value >= limit if op == ">=" else value <= limit}

    out = {
        "fp32 training, fraction of fp32 ceiling": check(tr["fp32"] and tr["fp32"]["fraction_of_ceiling"], ">=", 0.7),
        "fp32 scoring b64, fraction of fp32 ceiling": check(sb["fp32"] and sb["fp32"]["fraction_of_ceiling"], ">=", 0.6),
        "latency batch 1 (ms, fastest engine)": check(any_1 and any_1["latency_ms"], "<=", 15),
        "training images/s (fastest precision)": check(best_train["images_per_s"], ">=", 65),
        "scoring ms/image b64 (fastest engine)": check(any_b and any_b["ms_per_image"], "<=", 3),
    }
    if tr["bf16"] and tr["fp32"]:
        out["bf16/fp32 training speed-up"] = check(tr["bf16"]["images_per_s"] / tr["fp32"]["images_per_s"], ">=", 1.5)
    if sb["bf16"] and sb["fp32"]:
        out["bf16/fp32 scoring speed-up"] = check(sb["fp32"]["ms_per_image"] / sb["bf16"]["ms_per_image"], ">=", 1.5)
    if s1["fp32"]:
        out["latency batch 1 (ms, torch fp32)"] = check(s1["fp32"]["latency_ms"], "<=", 15)
    return out


def table(res: dict) -> str:
    env, c = res["env"], res["config"]
    lines = [
        f"speed of {c['preset']} at {c['image_size']} px (width {c['width']}, batch {c['batch_size']}); torch {env['torch']}, "
        f"{env['threads']} threads, {env['cpu_capability']}, native bf16: {env['bf16_native']}, load {env['load_before'][0]:.2f}",
        "ceilings: " + ", ".join(f"{p} {v['gflops']:.1f} GFLOP/s, {v['gflops_cpu']:.1f} GFLOP/CPU-s (matmul n={v['n']})" for p, v in res["ceilings"].items()),
        f"FLOPs: {res['flops']['train_per_image'] / 1e9:.3f} GFLOP per training image, {res['flops']['score_per_image'] / 1e9:.3f} GFLOP per scored image",
        "",
        "(of ceil: GFLOP/s over the matmul's; cpu: the same per CPU-second, which waits for a busy core do not inflate)",
        "",
        f"{'measurement':<30} {'img/s':>7} {'ms/img':>7} {'lat ms':>7} {'GFLOP/s':>8} {'of ceil':>7} {'cpu':>5} {'data':>6}",
    ]
    for r in res["train"]:
        lines.append(f"{r['name']:<30} {r['images_per_s']:>7.1f} {1e3 / r['images_per_s']:>7.2f} {'':>7} {r['gflops']:>8.1f} "
                     f"{r['fraction_of_ceiling']:>7.2f} {r['fraction_of_ceiling_cpu']:>5.2f} {r['data_share']:>6.1%}")
    for r in res["score"]:
        lines.append(f"{r['name']:<30} {1e3 / r['ms_per_image']:>7.1f} {r['ms_per_image']:>7.2f} {r['latency_ms']:>7.1f} {r['gflops']:>8.1f} "
                     f"{r['fraction_of_ceiling']:>7.2f} {r['fraction_of_ceiling_cpu']:>5.2f} {'':>6}")
    lines.append("")
    if not res["targets"]:
        lines.append("targets: not checked (they are for the paper preset at 64 px)")
    for name, t in res["targets"].items():
        if t is not None:
            lines.append(f"{'met' if t['met'] else 'NOT met':<8} {name}: {t['value']} (target {t['target']})")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
