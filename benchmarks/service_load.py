"""Load on the triage service, on localhost, bounded in count and time: C concurrent clients x N uploads each,
then the same with one client; optionally a kill -9 of the server in the middle and a restart.

    python benchmarks/service_load.py --run RUN [--clients 8] [--uploads 50] [--kill] [--out runs/bench/service.json]

Every upload is a different film (no deduplication), so after the run the database must hold exactly the uploads
that got a success response. Reports p50/p99 latency and images/s for both client counts, and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: str, db: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "cxr_oneclass", "serve", run, "--port", str(port), "--db", str(db)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def film(k: int, size: int = 256) -> bytes:
    """A different smooth film per k (PNG)."""
    rng = np.random.default_rng(k)
    coarse = rng.uniform(0.2, 0.8, (8, 8))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load(url: str, clients: int, uploads: int, first: int, stop_after: float | None = None) -> dict:
    """`clients` threads, each posting `uploads` films one after another; returns latencies and what succeeded."""
    latencies: list[float] = []
    ok: list[int] = []
    failed: list[str] = []
    lock = threading.Lock()
    t_end = time.time() + stop_after if stop_after else None

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(uploads):
                k = first + c * uploads + i
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/images", files=[("files", (f"f{k}.png", film(k), "image/png"))])
                    good = r.status_code == 200
                except httpx.HTTPError as exc:
                    good, r = False, exc
                with lock:
                    (ok.append(k) if good else failed.append(f"{k}: {getattr(r, 'status_code', r)}"))
                    if good:
                        latencies.append(time.perf_counter() - t0)
                if t_end and time.time() > t_end:
                    return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "ok": len(ok), "failed": len(failed), "failures": failed[:5], "seconds": round(wall, 2),
            "images_per_s": round(len(ok) / wall, 2) if wall else None,
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None, "ok_keys": ok}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--uploads", type=int, default=50)
    p.add_argument("--kill", action="store_true", help="also: kill -9 the server in the middle of a load, restart, check")
    p.add_argument("--out")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="svc-load-"))
    report: dict = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(args.run, work / "db.sqlite", port)
    try:
        load(url, 2, 4, first=10**6)  # warm-up (first batches, allocations); its films are counted below
        one = load(url, 1, args.uploads, first=0)
        many = load(url, args.clients, args.uploads, first=10**5)
        stored = httpx.get(f"{url}/healthz").json()["images"]
        expected = one["ok"] + many["ok"] + 8
        report.update({"one_client": {k: v for k, v in one.items() if k != "ok_keys"},
                       "concurrent": {k: v for k, v in many.items() if k != "ok_keys"},
                       "speedup": round(many["images_per_s"] / one["images_per_s"], 2),
                       "database_images": stored, "expected_images": expected})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    if args.kill:
        db = work / "killed.sqlite"
        server = start(args.run, db, port)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(load(url, args.clients, args.uploads, first=2 * 10**5)))
        worker.start()
        time.sleep(3.0)
        server.send_signal(signal.SIGKILL)
        worker.join()
        server = start(args.run, db, port)
        try:
            items = httpx.get(f"{url}/v1/studies", params={"limit": 1000}).json()
            listed = {s["study_key"] for s in items["items"]}
            count = httpx.get(f"{url}/healthz").json()["images"]
            names = set()
            for s in items["items"]:
                study = httpx.get(f"{url}/v1/studies/{s['study_key']}").json()
                names |= {i["file_name"] for i in study["images"]}
            acked = {f"f{k}.png" for k in result["ok_keys"]}
            report["kill9"] = {"acknowledged": len(acked), "failed_during_kill": result["failed"], "in_database": count,
                               "studies_listed": len(listed), "acknowledged_missing": len(acked - names),
                               "duplicates": count - len(names)}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
