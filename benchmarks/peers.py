"""The default model beside its peers, measured in one run on one machine: training images/s and scoring ms/image.

    python benchmarks/peers.py                 # detect (the default), ganomaly, u+d (skip-GANomaly's architecture)
    python benchmarks/peers.py --quick         # 32 px, few steps: a smoke test
    make bench

Peers: `ganomaly` (the project's GANomaly baseline: encoder-decoder-encoder without skips) and `u+d` (a U-Net
generator and a discriminator, skip-GANomaly's architecture), both as `experiment` trains them, at the default's
size. For each: the GAN's training step (images/s, GFLOP/s and its fraction of the fp32 matmul ceiling, through
`training.loop.Trainer` as `fit` runs it); for the default also the lesion detector's training (`fit_detector`, its
synthetic lesions included); the seconds one model costs on nih-pneumonia-128 (286 training normals, the preset's
epochs and detector steps); scoring ms/image at batch 64 and batch-1 latency with PyTorch, onnxruntime fp32 and,
for the default, onnxruntime int8. Settings are timed in turns, so a change of load hits all alike; compare ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import bench_train, count_flops, matmul_gflops, timed  # noqa: E402

from cxr_oneclass.config import method_config, replace, resolve  # noqa: E402
from cxr_oneclass.data.phantom import render  # noqa: E402
from cxr_oneclass.io_utils import write_json  # noqa: E402
from cxr_oneclass.model.networks import build_model  # noqa: E402
from cxr_oneclass.scoring.inference import score_images  # noqa: E402
from cxr_oneclass.training.detector import fit_detector  # noqa: E402
from cxr_oneclass.training.loop import Tuning  # noqa: E402

PEERS = ("default", "ganomaly", "u+d")
NIH_TRAIN = 286  # training normals of nih-pneumonia-128: what one model's cost is quoted for


def peer_config(name: str, quick: bool):
    base = resolve(image_size=32, width=16, batch_size=16, detector_width=4) if quick else resolve()
    return base if name == "default" else replace(method_config(name, base), detector_width=0)  # peers as published


def bench_detector(cfg, normals: np.ndarray, steps: int) -> dict:
    """The detector's training as `fit_detector` runs it (lesions drawn on the CPU), `steps` steps after a warm-up."""
    model = build_model(cfg)
    fit_detector(model.det, replace(cfg, detector_steps=2), normals, progress=False)  # warm-up
    x = torch.zeros(cfg.detector_batch, 1, cfg.image_size, cfg.image_size)

    def one() -> None:
        loss = model.det(x).mean()
        loss.backward()

    flops = count_flops(one) / cfg.detector_batch
    t0, c0 = time.perf_counter(), time.process_time()
    fit_detector(model.det, replace(cfg, detector_steps=steps), normals, progress=False)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = steps * cfg.detector_batch
    return {"images_per_s": n / sec, "flops_per_image": flops, "gflops": flops * n / sec / 1e9, "gflops_cpu": flops * n / cpu / 1e9}


def bench_scoring(model, images: np.ndarray, int8_from: np.ndarray | None, reps: int) -> dict:
    """ms/image at batch 64 and batch-1 latency (median) with PyTorch, onnxruntime fp32 and (given normals) int8."""
    from cxr_oneclass.scoring.onnx import OnnxScorer, export_onnx
    from cxr_oneclass.scoring.quantize import quantize_model

    out = {}
    b64, b1 = images[:64], images[:1]
    out["torch"] = {"ms_per_image_b64": timed(lambda: score_images(model, b64, 64), reps) * 1e3 / len(b64),
                    "latency_b1_ms": timed(lambda: score_images(model, b1, 1), reps * 4) * 1e3}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "m.onnx")
        engines = {"onnx_fp32": Path(tmp) / "m.onnx"}
        if int8_from is not None:
            quantize_model(model, Path(tmp) / "m8.onnx", int8_from)
            engines["onnx_int8"] = Path(tmp) / "m8.onnx"
        for name, path in engines.items():
            s = OnnxScorer(path)
            out[name] = {"ms_per_image_b64": timed(lambda s=s: s.score(b64, 64), reps, warmup=2) * 1e3 / len(b64),
                         "latency_b1_ms": timed(lambda s=s: s.score(b1, 1), reps * 4, warmup=3) * 1e3}
    return out


def with_stats(cfg, normals: np.ndarray):
    """An untrained model with score statistics fitted on `normals`: what a saved run carries. Scoring computes
    every component the networks have, whatever the score sums, so the cost is a trained model's."""
    from cxr_oneclass.scoring.stats import attach_stats, fit_score_stats

    if cfg.score_terms == "auto":  # a trained run holds the sum validation chose; any valid one costs the same
        cfg = replace(cfg, score_terms="ssim")
    torch.manual_seed(0)
    model = attach_stats(build_model(cfg))
    fit_score_stats(model, normals, normals, cfg.batch_size)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/peers.json")
    ap.add_argument("--steps", type=int, help="timed GAN training steps per peer (default 4, quick 2)")
    ap.add_argument("--detector-steps", type=int, help="timed detector steps (default 30, quick 3)")
    ap.add_argument("--reps", type=int, help="scoring repeats (default 5, quick 2)")
    args = ap.parse_args(argv)
    quick = args.quick
    steps, dsteps, reps = args.steps or (2 if quick else 4), args.detector_steps or (3 if quick else 30), args.reps or (2 if quick else 5)
    cfgs = {p: peer_config(p, quick) for p in PEERS}
    size = cfgs["default"].image_size
    ceiling = matmul_gflops(torch.float32, 512 if quick else 2048, 2.0 if quick else 8.0)
    normals = (render(64 if quick else 256, size, seed=0)[0] * 255).round().astype(np.uint8)  # phantom normals
    images = torch.from_numpy(np.resize(normals, (max(256, 4 * cfgs["default"].batch_size), size, size)))
    result: dict = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_before": os.getloadavg(), "ceiling_fp32": ceiling,
                    "image_size": size, "peers": {}}
    for name, cfg in cfgs.items():
        row = bench_train(cfg, images, "fp32", [("", Tuning())], steps)[0]
        peer: dict = {"variant": cfg.variant, "skips": cfg.skips, "score_terms": cfg.score_terms, "detector_width": cfg.detector_width,
                      "train_gan": {k: row[k] for k in ("images_per_s", "flops_per_image", "gflops", "gflops_cpu")}}
        peer["train_gan"]["fraction_of_ceiling"] = row["gflops"] / ceiling["gflops"]
        seconds = cfg.epochs * NIH_TRAIN / row["images_per_s"]
        if cfg.detector_width:
            det = bench_detector(cfg, normals, dsteps)
            det["fraction_of_ceiling"] = det["gflops"] / ceiling["gflops"]
            peer["train_detector"] = det
            seconds += cfg.detector_steps * cfg.detector_batch / det["images_per_s"]
        peer["nih_model_seconds"] = seconds
        model = with_stats(cfg, normals)
        peer["score"] = bench_scoring(model, normals, normals if name == "default" else None, reps)
        result["peers"][name] = peer
        print(f"  {name}: {row['images_per_s']:.1f} train img/s", file=sys.stderr)
    result["load_after"] = os.getloadavg()
    write_json(args.out, result)
    d = result["peers"]["default"]
    print(f"peers at {size} px; fp32 matmul ceiling {ceiling['gflops']:.0f} GFLOP/s; load {result['load_before'][0]:.2f}")
    print(f"{'peer':10s} {'GAN img/s':>9s} {'of ceil':>7s} {'det img/s':>9s} {'of ceil':>7s} {'NIH s':>6s} {'torch b64':>9s} {'onnx b64':>8s} {'int8 b64':>8s} {'torch b1':>8s} {'onnx b1':>7s} {'int8 b1':>7s}")
    for name, p in result["peers"].items():
        det, sc = p.get("train_detector"), p["score"]
        q = sc.get("onnx_int8")
        print(f"{name:10s} {p['train_gan']['images_per_s']:9.1f} {p['train_gan']['fraction_of_ceiling']:7.2f} "
              f"{det['images_per_s'] if det else float('nan'):9.1f} {det['fraction_of_ceiling'] if det else float('nan'):7.2f} "
              f"{p['nih_model_seconds']:6.0f} {sc['torch']['ms_per_image_b64']:9.2f} {sc['onnx_fp32']['ms_per_image_b64']:8.2f} "
              f"{q['ms_per_image_b64'] if q else float('nan'):8.2f} {sc['torch']['latency_b1_ms']:8.2f} {sc['onnx_fp32']['latency_b1_ms']:7.2f} "
              f"{q['latency_b1_ms'] if q else float('nan'):7.2f}")
    for name in PEERS[1:]:
        p = result["peers"][name]
        print(f"default vs {name}: its GAN step takes {p['train_gan']['images_per_s'] / d['train_gan']['images_per_s']:.2f}x the time, "
              f"{d['nih_model_seconds'] / p['nih_model_seconds']:.2f}x one NIH model's training, "
              f"{d['score']['onnx_fp32']['ms_per_image_b64'] / p['score']['onnx_fp32']['ms_per_image_b64']:.2f}x scoring (onnx fp32 b64)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
