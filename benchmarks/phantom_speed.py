"""Phantom generation speed on ONE CPU core (numpy only; torch is not imported).

    .venv/bin/python benchmarks/phantom_speed.py [--size 64] [--n 2000] [--repeat 3]

Pins itself to one core and limits BLAS/OpenMP threads to 1 before importing numpy.
Prints images/s per kind, by wall clock and by process CPU time (the latter is what
to compare with the 500 images/s target when the machine is busy).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

try:
    from cxr_oneclass.data.phantom import ABNORMALITIES, render  # noqa: E402
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cxr_oneclass.data.phantom import ABNORMALITIES, render  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000, help="images per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per kind (best is reported)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    assert "torch" not in sys.modules
    render(256, size=args.size)  # warm-up
    print(f"phantom render, {args.size}x{args.size}, n={args.n}, one core")
    worst = float("inf")
    for kind in ("normal",) + ABNORMALITIES:
        best_wall = best_cpu = 0.0
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            render(args.n, size=args.size, seed=1, kind=kind)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best_wall, best_cpu = max(best_wall, args.n / wall), max(best_cpu, args.n / cpu)
        worst = min(worst, best_cpu)
        print(f"  {kind:14s} {best_wall:8.0f} images/s (wall)  {best_cpu:8.0f} images/s (cpu)")
    print(f"slowest kind: {worst:.0f} images/s (cpu) -> {'OK' if worst >= 500 else 'BELOW'} target 500")


if __name__ == "__main__":
    main()
