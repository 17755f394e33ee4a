"""Archive-scale scoring: throughput and peak memory of `cxr-oneclass score` over 1k to 100k files, against the
model alone, and the parse + patient-wise split of a full-size NIH `Data_Entry` manifest. Measured in one run.

    python benchmarks/scale.py                            # 1k, 10k, 100k images; a 64 px default-preset model
    python benchmarks/scale.py --quick                    # smoke test: 200 and 1,000 images, tiny model, 5,000 rows
    python benchmarks/scale.py --run runs/mine --sizes 1000,10000
    python benchmarks/scale.py --onnx mine.onnx --threads 1   # one torch thread: steadier on a shared machine

Images: phantom radiographs (`data.phantom`), grey PNGs of --image-px (default 128) px, generated once at the
largest size on every core into --images-dir (default runs/bench/scale-images/all/, 1,000 files a folder) and
reused by later runs; a smaller size scores a folder of hard links to the first N files, laid out alike.

Per size, in a subprocess each (so one child's peak RSS is its own, from `os.wait4`):
  score        the real CLI, `python -m cxr_oneclass score RUN FOLDER --csv out.csv`; wall time, the child's
               peak RSS and CPU time (cores busy = CPU s / wall s), RSS sampled from /proc over the run; the CSV
               is checked for one row per image and no errors. Images/s "steady" counts from the CSV's first rows
               (the model loaded, the first batch scored) to the CSV complete: without the fixed start-up
               (imports, loading the run, listing the files), the first batch's warm-up and the exit, as
               model-only.
  model-only   the same scorer (`jobs.score.Scorer(source).score`) on the same number of images already decoded
               in memory (decoded from the same files first, untimed); `records` also times `Scorer.records`
               (score + calibration + population check, what `score` adds per chunk besides decoding).
The ratio score/model-only (steady) is what the issue's >= 0.9 is about; images/s at each size and the marginal
images/s between sizes ((N2 - N1) / (t2 - t1): start-up cancels) show whether the cost grows linearly; the RSS
growth from the smallest to the largest size whether memory stays constant (< 200 MB).

Manifest: a synthetic NIH ChestX-ray14 `Data_Entry_2017.csv` of --manifest-rows rows (default 112,120: ~30,805
patients, follow-ups, the 14 findings '|'-joined or 'No Finding', AP/PA, ages, sexes, sizes, spacings) and one
empty PNG per row (`nih:` indexes the files below its folder by name and never opens them before decoding), then
`data.nih.nih_records` + `specs.assign_splits` timed in a subprocess: what `train --data nih:PATH` does before it
decodes anything. The bar is < 10 s.

Prints a table and writes JSON (--out, default runs/bench/scale.json). Other processes on the machine depress
the figures: see `env.load_*` and `env.busy`. `--quick` is a smoke test: small sizes, nothing checked.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import busy_processes  # noqa: E402

from cxr_oneclass.io_utils import write_json  # noqa: E402

# The tiny run of the tests (tests/conftest.py: TINY, PHANTOM): 32 px, width 8, one epoch, a tiny lesion detector.
TINY_FLAGS = ["--image-size", "32", "--width", "8", "--batch-size", "8", "--threads", "1", "--epochs", "1",
              "--detector-width", "4", "--detector-steps", "8"]
TINY_DATA = "phantom:n_train=48,n_val_normal=16,n_val_abnormal=16,n_test_normal=4,n_test_abnormal=4,size=32"
# A run of the default preset's architecture (64 px, width 64, the lesion detector), trained for one step: its
# weights mean nothing, but scoring costs what a real run's does.
FULL_FLAGS = ["--steps", "1", "--detector-steps", "8"]
FULL_DATA = "phantom:n_train=64,n_val_normal=16,n_val_abnormal=16,n_test_normal=4,n_test_abnormal=4"

BLOCK = 500  # images rendered per generator task (and per phantom seed): the cache grows in whole blocks
SHARD = 1000  # files per folder
MARKER = "scale-images.json"
NIH_FINDINGS = {  # ChestX-ray14 label counts (of 112,120 images), for realistic draws
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Consolidation": 4667, "Edema": 2303, "Effusion": 13317,
    "Emphysema": 2516, "Fibrosis": 1686, "Hernia": 227, "Infiltration": 19894, "Mass": 5782, "Nodule": 6331,
    "Pleural_Thickening": 3385, "Pneumonia": 1431, "Pneumothorax": 5302,
}
NIH_ROWS, NIH_PATIENTS, NIH_NO_FINDING = 112_120, 30_805, 60_361
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # as released: unquoted commas


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


THREADS: list[int] = [0]  # --threads: torch's intra-op threads in every child (0: torch's choice, all cores)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS[0]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS[0])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["CXR_ONECLASS_CACHE"] = "off"  # nothing here should read or fill the user's decode cache
    return env


# ------------------------------------------------------------------------------------------------ children

def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_child(cmd: list[str], log_dir: Path, name: str, watch: Path | None = None, done_file: Path | None = None) -> dict:
    """Run `cmd`, reaped with `os.wait4` so its rusage (peak RSS, CPU seconds) is its own. While it runs, its
    RSS is sampled from /proc every 0.1 s. With `watch` (the CSV the child writes): `ready` is when it appears
    (the model is loaded, the header written), `first` when its first rows do (the first batch is scored), each
    with the child's CPU seconds by then (and `first_rows`, the rows there were); `done` when `done_file` appears
    (the CSV complete: what follows is the process's exit)."""
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(), cwd=ROOT)
        samples: list[tuple[float, float]] = []
        marks: dict[str, float | None] = {}
        done = threading.Event()

        def mark(t: float) -> None:
            try:
                text = watch.read_bytes()
            except OSError:
                return
            if "ready_s" not in marks:
                marks.update(ready_s=t, ready_cpu_s=_cpu_s(proc.pid))
            if text.count(b"\n") > 1:  # the header and at least one row
                marks.update(first_s=t, first_cpu_s=_cpu_s(proc.pid), first_rows=text.count(b"\n") - 1)

        def sample() -> None:
            while not done.is_set():
                t = time.perf_counter() - t0
                rss = _rss_mb(proc.pid)
                if rss is not None:
                    samples.append((round(t, 2), round(rss, 1)))
                if watch is not None and "first_s" not in marks:
                    mark(t)
                if done_file is not None and "done_s" not in marks and done_file.exists():
                    marks.update(done_s=t, done_cpu_s=_cpu_s(proc.pid))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            wall = time.perf_counter() - t0
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        sampler.join()
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-3000:]}")
    step = max(1, len(samples) // 60)
    return {"wall_s": wall, **marks, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "rss_samples": [list(s) for s in samples[::step]],
            "stdout": stdout, "stderr": stderr}


def worker_json(res: dict) -> dict:
    """The JSON a worker printed last on stdout."""
    return json.loads(res["stdout"].strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the model

def train_run(out: Path, arch: str, log_dir: Path) -> dict:
    data, flags = (TINY_DATA, TINY_FLAGS) if arch == "tiny" else (FULL_DATA, FULL_FLAGS)
    cmd = [sys.executable, "-m", "cxr_oneclass", "-q", "train", "--data", data, "--out", str(out), *flags]
    res = run_child(cmd, log_dir, "train")
    return {"command": " ".join(["cxr-oneclass", *cmd[3:]]), "seconds": res["wall_s"]}


def model_summary(source: Path) -> dict:
    if source.suffix.lower() == ".onnx":
        return {"source": str(source), "kind": "onnx"}
    cfg = json.loads((source / "config.json").read_text()).get("config", {})
    return {"source": str(source), "kind": "run", **{k: cfg.get(k) for k in ("image_size", "width", "detector_width", "score_terms", "batch_size")}}


# ------------------------------------------------------------------------------------------------ images

def image_path(root: Path, i: int) -> Path:
    return root / f"{i // SHARD:03d}" / f"img_{i:06d}.png"


def _render_block(args: tuple[str, int, int, int]) -> int:
    """Render block b (BLOCK images, its own phantom seed; every other block abnormal) and write the PNGs of it
    whose index is below `n`; each file is written whole (temp name, then renamed)."""
    from PIL import Image

    from cxr_oneclass.data import phantom

    root, b, px, n = Path(args[0]), args[1], args[2], args[3]
    kinds = phantom.KINDS
    kind = "normal" if b % 2 == 0 else kinds[1 + (b // 2) % (len(kinds) - 1)]
    images, _ = phantom.render(BLOCK, px, seed=1 + b, kind=kind)
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    written = 0
    for j in range(BLOCK):
        i = b * BLOCK + j
        if i >= n:
            break
        target = image_path(root, i)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(pixels[j]).save(tmp, format="PNG")
        os.replace(tmp, target)
        written += 1
    return written


def count_pngs(root: Path) -> int:
    n = 0
    if root.is_dir():
        for shard in os.scandir(root):
            if shard.is_dir():
                n += sum(1 for e in os.scandir(shard.path) if e.name.endswith(".png") and not e.name.startswith("."))
    return n


def ensure_images(images_dir: Path, n: int, px: int) -> dict:
    """`images_dir/all/` holding at least n phantom PNGs of px pixels (image i = `image_path(all, i)`): reused when
    the marker says so and the files are there, else the missing blocks are rendered on every core."""
    root = images_dir / "all"
    marker = images_dir / MARKER
    meta = json.loads(marker.read_text()) if marker.is_file() else {}
    if meta.get("px") != px and root.exists():  # another pixel size: start again, subsets (links to the old) too
        for old in [root, *images_dir.glob("n[0-9]*")]:
            shutil.rmtree(old)
        meta = {}
    have = count_pngs(root)
    t0 = time.perf_counter()
    if have < n:
        root.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        blocks = [b for b in range((n + BLOCK - 1) // BLOCK)
                  if not all(image_path(root, i).exists() for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)))]
        print(f"  generating {n - have:,} phantom PNGs of {px} px in {images_dir} ({os.cpu_count()} processes)", file=sys.stderr)
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            written = sum(pool.map(_render_block, [(str(root), b, px, n) for b in blocks]))
        have = count_pngs(root)
        if have < n:
            raise RuntimeError(f"{root}: {have} PNGs after generating, {n} wanted")
        write_json(marker, {"px": px, "count": have, "generator": "data.phantom.render, seed 1 + block, block 500"})
    else:
        written = 0
    seconds = time.perf_counter() - t0
    size = sum(e.stat().st_size for s in os.scandir(root) if s.is_dir() for e in os.scandir(s.path))
    return {"dir": str(root), "count": have, "px": px, "generated": written, "generate_s": seconds if written else 0.0,
            "mean_file_bytes": size / max(have, 1)}


def subset(images_dir: Path, n: int, total: int) -> Path:
    """A folder of the first n images: `all/` itself when it holds exactly n, else `n<N>/` of hard links (symbolic
    links where the file system has none) in the same layout."""
    root = images_dir / "all"
    if n == total:
        return root
    folder = images_dir / f"n{n}"
    if count_pngs(folder) == n and image_path(folder, n - 1).exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    for i in range(n):
        src, dst = image_path(root, i), image_path(folder, i)
        if i % SHARD == 0:
            dst.parent.mkdir(parents=True)
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)
    return folder


def check_csv(path: Path, n: int) -> dict:
    """One row per image, each file once, none failed."""
    files, flags = set(), {}
    rows = 0
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows += 1
            files.add(row["file"])
            flags[row["flag"]] = flags.get(row["flag"], 0) + 1
    return {"rows": rows, "unique_files": len(files), "flags": flags,
            "ok": rows == n and len(files) == n and flags.get("error", 0) == 0 and flags.get("skipped", 0) == 0}


# ------------------------------------------------------------------------------------------------ workers

def worker_model_only(source: str, folder: str, n: int, pool_max: int = 2048) -> dict:
    """Scorer.score on n images already in memory (a pool of up to `pool_max` decoded from `folder`, cycled), in
    chunks of 16 batches; then Scorer.records on the pool. Start-up and decoding are not in the timings; the
    decoding of the pool (header + decode + resize, as `score` does per file, one thread) is timed on its own."""
    t_start = time.perf_counter()
    import torch

    from cxr_oneclass.data.images import load_image
    from cxr_oneclass.data.studies import DEFAULT_VIEWS, discover, read_info, skip_reason
    from cxr_oneclass.jobs.score import Scorer
    from cxr_oneclass.scoring.population import BatchCheck

    scorer = Scorer(source)
    files, _ = discover([folder])
    files = files[: min(n, pool_max)]
    t0, c0 = time.perf_counter(), time.process_time()
    decoded = []
    for p in files:
        assert skip_reason(read_info(p), DEFAULT_VIEWS) is None
        decoded.append(load_image(p, scorer.image_size))
    decode = {"wall_ms_per_image": (time.perf_counter() - t0) * 1e3 / len(files), "cpu_ms_per_image": (time.process_time() - c0) * 1e3 / len(files)}
    pool = np.stack(decoded)
    startup_s = time.perf_counter() - t_start
    scorer.score(pool[: scorer.batch_size])  # warm-up: the first calls allocate
    chunk = scorer.batch_size * 16
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    while done < n:
        k = min(chunk, n - done)
        out = scorer.score(pool[np.arange(done, done + k) % len(pool)])
        assert len(out["score"]) == k
        done += k
    score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
    population = BatchCheck(scorer.population) if scorer.population is not None else None
    t0 = time.perf_counter()
    for s in range(0, len(pool), scorer.batch_size):
        scorer.records([str(p) for p in files[s : s + scorer.batch_size]], pool[s : s + scorer.batch_size], False, population)
    records_s = time.perf_counter() - t0
    return {"n": n, "images_per_s": n / score_s, "images_per_cpu_s": n / score_cpu, "score_s": score_s,
            "records_images_per_s": len(pool) / records_s, "decode": decode, "startup_s": startup_s,
            "batch_size": scorer.batch_size, "image_size": scorer.image_size, "torch_threads": torch.get_num_threads()}


def worker_manifest(folder: str) -> dict:
    """What `train --data nih:FOLDER` does before decoding (`nih_records`, `assign_splits`), timed; then each
    stage again on its own, for a profile."""
    t0 = time.perf_counter()
    from cxr_oneclass.data import nih
    from cxr_oneclass.data.specs import assign_splits
    from cxr_oneclass.data.splits import index_files, split_by_patient_with_sizes
    from cxr_oneclass.data.types import Record

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = nih.nih_records(folder, seed=0)
    assign_splits(records, 0)
    total_s = time.perf_counter() - t0

    stages = {}
    t0 = time.perf_counter()
    index, _, _ = index_files(Path(folder), (".png",), nih.LABEL_FILES)
    stages["index_files"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, counts, _ = nih.read_label_file(Path(folder) / "Data_Entry_2017.csv", set(nih.FINDINGS), None)
    stages["read_label_file"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs = [Record(index[r["name"]], int(r["label"]), patient=r["patient"]) for r in rows if r["name"] in index]
    stages["records"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    split_by_patient_with_sizes(recs, nih.PAPER_SIZES, 0, "nih")
    stages["split_by_patient"] = time.perf_counter() - t0
    splits: dict[str, int] = {}
    for r in records:
        key = f"{r.split}_{'abnormal' if r.label else 'normal'}"
        splits[key] = splits.get(key, 0) + 1
    return {"rows": counts["rows"], "usable": len(recs), "patients": len({r["patient"] for r in rows}), "chosen": len(records),
            "splits": splits, "seconds": total_s, "import_s": import_s, "stages_s": stages}


# ------------------------------------------------------------------------------------------------ manifest

def write_manifest(folder: Path, rows: int, seed: int = 0) -> dict:
    """A Data_Entry_2017.csv of `rows` rows shaped like the release, and an empty PNG per row spread over
    images_001/images/ ... images_012/images/ as released."""
    rng = np.random.default_rng(seed)
    n_patients = max(1, round(rows * NIH_PATIENTS / NIH_ROWS))
    # Images per patient: heavy-tailed as in the release (most patients have 1-3, a few over 100; mean 3.6).
    per = np.ceil(rng.lognormal(0.41, 1.2, n_patients)).astype(np.int64)
    per = np.clip(per, 1, max(1, rows // 100))
    while per.sum() != rows:  # adjust to exactly `rows`
        diff = rows - int(per.sum())
        idx = rng.integers(0, n_patients, abs(diff))
        if diff > 0:
            np.add.at(per, idx, 1)
        else:
            per[idx] = np.maximum(per[idx] - 1, 1)
    names = list(NIH_FINDINGS)
    p = np.array([NIH_FINDINGS[k] for k in names], dtype=float)
    p /= p.sum()
    lines = [NIH_HEADER]
    files = []
    normal_share = NIH_NO_FINDING / NIH_ROWS
    for pid in range(n_patients):
        age, sex = int(rng.integers(1, 95)), "MF"[int(rng.integers(0, 2))]
        for fu in range(int(per[pid])):
            if rng.random() < normal_share:
                labels = "No Finding"
            else:
                k = 1 + min(int(rng.geometric(0.55)) - 1, 4)
                labels = "|".join(sorted(set(rng.choice(names, size=k, p=p))))
            name = f"{pid + 1:08d}_{fu:03d}.png"
            view = "PA" if rng.random() < 0.6 else "AP"
            w, h, sp = (2500, 2048, 0.168) if rng.random() < 0.5 else (3056, 2544, 0.139)
            lines.append(f"{name},{labels},{fu},{pid + 1},{min(age + fu // 10, 94)},{sex},{view},{w},{h},{sp},{sp},")
            files.append(name)
    (folder / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    per_folder = -(-len(files) // 12)
    for k in range(12):
        d = folder / f"images_{k + 1:03d}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        for name in files[k * per_folder : (k + 1) * per_folder]:
            os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    return {"rows": rows, "patients": n_patients, "max_images_per_patient": int(per.max()), "files_s": time.perf_counter() - t0}


def bench_manifest(rows: int, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-nih-") as tmp:
        t0 = time.perf_counter()
        made = write_manifest(Path(tmp), rows)
        made["write_s"] = time.perf_counter() - t0
        res = run_child([sys.executable, __file__, "--worker", "manifest", "--worker-args", tmp], log_dir, "manifest")
    out = worker_json(res)
    out.update({"synthetic": made, "peak_rss_mb": res["peak_rss_mb"], "process_wall_s": res["wall_s"]})
    print(f"  manifest: {out['rows']:,} rows parsed and split in {out['seconds']:.2f} s", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------ scoring

def bench_size(source: Path, folder: Path, n: int, work: Path, log_dir: Path) -> dict:
    out_csv = work / f"scores-{n}.csv"
    cmd = [sys.executable, "-m", "cxr_oneclass", "-q", "score"]
    cmd += ["--onnx", str(source), str(folder)] if source.suffix.lower() == ".onnx" else [str(source), str(folder)]
    cmd += ["--csv", str(out_csv)]
    e2e = run_child(cmd, log_dir, f"score-{n}", watch=out_csv.with_name(out_csv.name + ".partial"), done_file=out_csv)
    checked = check_csv(out_csv, n)
    out_csv.unlink()
    # Steady state: from the first rows (model loaded, first batch scored: the warm-up model-only leaves out too)
    # to the end. Without the mark (a run too short for the 0.1 s sampling), from the start.
    first_rows = e2e.get("first_rows") or 0
    steady_n = n - first_rows
    steady_s = (e2e.get("done_s") or e2e["wall_s"]) - (e2e.get("first_s") or 0.0)
    steady_cpu = (e2e.get("done_cpu_s") or e2e["cpu_s"]) - (e2e.get("first_cpu_s") or 0.0)
    mo = run_child([sys.executable, __file__, "--worker", "model-only", "--worker-args", str(source), str(folder), str(n)], log_dir, f"model-only-{n}")
    model = worker_json(mo)
    row = {
        "n": n, "folder": str(folder),
        "score": {"wall_s": e2e["wall_s"], "ready_s": e2e.get("ready_s"), "first_rows_s": e2e.get("first_s"), "first_rows": first_rows, "done_s": e2e.get("done_s"),
                  "images_per_s": n / e2e["wall_s"],
                  "images_per_s_steady": steady_n / steady_s if steady_n > 0 and steady_s > 0 else None,
                  "images_per_cpu_s_steady": steady_n / steady_cpu if steady_n > 0 and steady_cpu > 0 else None,
                  "peak_rss_mb": e2e["peak_rss_mb"],
                  "cpu_s": e2e["cpu_s"], "cores_busy": e2e["cpu_s"] / e2e["wall_s"], "csv": checked, "rss_samples": e2e["rss_samples"]},
        "model_only": {**model, "peak_rss_mb": mo["peak_rss_mb"], "process_wall_s": mo["wall_s"],
                       "cores_busy": mo["cpu_s"] / mo["wall_s"]},
    }
    row["ratio"] = row["score"]["images_per_s"] / model["images_per_s"]
    row["ratio_steady"] = row["score"]["images_per_s_steady"] / model["images_per_s"] if row["score"]["images_per_s_steady"] else None
    # Per CPU-second: what waits for a core taken by another process do not move. The bound: if decoding (one
    # thread's CPU per image) and the model shared the cores perfectly, score/model-only could reach this.
    row["ratio_cpu"] = row["score"]["images_per_cpu_s_steady"] / model["images_per_cpu_s"] if row["score"]["images_per_cpu_s_steady"] else None
    model_cpu_ms = 1e3 / model["images_per_cpu_s"]
    row["ratio_bound"] = model_cpu_ms / (model_cpu_ms + model["decode"]["cpu_ms_per_image"])
    print(f"  {n:>7,} images: score {row['score']['images_per_s']:.1f} img/s ({row['score']['images_per_s_steady'] or 0:.1f} steady), "
          f"model only {model['images_per_s']:.1f} img/s, peak RSS {e2e['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return row


def summarise(sizes: list[dict]) -> dict:
    """Growth of peak RSS and the linearity of cost: marginal images/s between successive sizes (fixed start-up
    cancels), and the spread of steady images/s over sizes."""
    first, last = sizes[0], sizes[-1]
    marginal = []
    for a, b in zip(sizes, sizes[1:]):
        dt = b["score"]["wall_s"] - a["score"]["wall_s"]
        marginal.append({"from": a["n"], "to": b["n"], "images_per_s": (b["n"] - a["n"]) / dt if dt > 0 else None})
    steady = [s["score"]["images_per_s_steady"] for s in sizes if s["score"]["images_per_s_steady"]]
    return {
        "rss_growth_mb": last["score"]["peak_rss_mb"] - first["score"]["peak_rss_mb"],
        "rss_growth_from_to": [first["n"], last["n"]],
        "marginal": marginal,
        "steady_images_per_s_min_over_max": min(steady) / max(steady) if steady else None,
        "ratio_steady_at_largest": last["ratio_steady"],
    }


def targets(res: dict) -> dict:
    """The issue's bars on this run's figures; only meaningful at 1k..100k (a quick run checks nothing)."""
    s, m = res["summary"], res["manifest"]

    def check(value, op, limit):
        return None if value is None else {"value": round(value, 3), "target": f"{op} {limit}", "met": value >= limit if op == ">=" else value < limit}

    out = {
        f"peak RSS growth {s['rss_growth_from_to'][0]:,} -> {s['rss_growth_from_to'][1]:,} images (MB)": check(s["rss_growth_mb"], "<", 200),
        "score / model-only images/s at the largest size (steady)": check(s["ratio_steady_at_largest"], ">=", 0.9),
        "steady images/s, slowest size / fastest (linear cost: ~1)": check(s["steady_images_per_s_min_over_max"], ">=", 0.9),
    }
    if m:
        out[f"NIH manifest of {m['rows']:,} rows: parse + split (s)"] = check(m["seconds"], "<", 10)
    return out


def table(res: dict) -> str:
    env, model = res["env"], res["model"]
    lines = [
        f"archive-scale scoring with {model['source']} ({model.get('image_size', '?')} px, width {model.get('width', '?')}); "
        f"{res['images']['px']} px PNGs; {env['cpus']} CPUs, load {env['load_before'][0]:.2f} -> {env['load_after'][0]:.2f}",
        "",
        f"{'images':>8} {'score img/s':>11} {'steady':>7} {'model-only':>10} {'ratio':>6} {'steady':>6} {'cpu':>5} {'bound':>5} "
        f"{'records':>8} {'dec ms':>6} {'cores':>5} {'peak RSS MB':>11} {'model-only RSS':>14}",
    ]
    for r in res["sizes"]:
        s, m = r["score"], r["model_only"]
        lines.append(f"{r['n']:>8,} {s['images_per_s']:>11.1f} {s['images_per_s_steady'] or 0:>7.1f} {m['images_per_s']:>10.1f} "
                     f"{r['ratio']:>6.2f} {r['ratio_steady'] or 0:>6.2f} {r['ratio_cpu'] or 0:>5.2f} {r['ratio_bound']:>5.2f} "
                     f"{m['records_images_per_s']:>8.1f} {m['decode']['cpu_ms_per_image']:>6.2f} {s['cores_busy']:>5.2f} "
                     f"{s['peak_rss_mb']:>11.0f} {m['peak_rss_mb']:>14.0f}")
    lines += ["", "(steady: from the first rows to the CSV complete; cpu: the same ratio per CPU-second; bound: the most it could be "
              "if one thread's decoding and the model shared the cores perfectly; dec ms: decode CPU ms per image; cores: "
              "CPU-s per wall-s of `score`)"]
    sm = res["summary"]
    lines.append("")
    lines.append(f"peak RSS growth {sm['rss_growth_from_to'][0]:,} -> {sm['rss_growth_from_to'][1]:,} images: {sm['rss_growth_mb']:+.0f} MB; "
                 + "; ".join(f"marginal {m['from']:,}->{m['to']:,}: {m['images_per_s'] or 0:.1f} img/s" for m in sm["marginal"]))
    if res["manifest"]:
        mf = res["manifest"]
        lines.append(f"NIH manifest: {mf['rows']:,} rows, {mf['patients']:,} patients: parse + split {mf['seconds']:.2f} s "
                     f"(" + ", ".join(f"{k} {v:.2f}" for k, v in mf["stages_s"].items()) + f"), peak RSS {mf['peak_rss_mb']:.0f} MB")
    lines.append("")
    if not res["targets"]:
        lines.append("targets: not checked (a quick run is a smoke test)")
    for name, t in res["targets"].items():
        if t is not None:
            lines.append(f"{'met' if t['met'] else 'NOT met':<8} {name}: {t['value']} (target {t['target']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes 200,1000, a tiny model, a 5,000-row manifest: a smoke test, nothing checked")
    ap.add_argument("--out", default="runs/bench/scale.json", help="JSON file to write")
    ap.add_argument("--run", help="a trained run folder to score with")
    ap.add_argument("--onnx", help="an exported .onnx graph to score with")
    ap.add_argument("--arch", choices=("tiny", "full"), help="without --run/--onnx, the run trained to score with: tiny (32 px, "
                    "width 8, as the tests'), or full (the default preset, 64 px, trained one step: scoring costs what a real run's does); "
                    "default full, quick tiny")
    ap.add_argument("--sizes", help="comma-separated image counts (default 1000,10000,100000; quick 200,1000)")
    ap.add_argument("--images-dir", default="runs/bench/scale-images", help="where the generated PNGs are kept and reused")
    ap.add_argument("--image-px", type=int, default=128, help="side of the generated PNGs")
    ap.add_argument("--manifest-rows", type=int, help=f"rows of the synthetic NIH manifest (default {NIH_ROWS:,}; quick 5,000; 0: skip)")
    ap.add_argument("--threads", type=int, help="torch threads in `score` and the model-only child (OMP_NUM_THREADS; 0: torch's "
                    "choice, every core; the default, quick 1). On a machine other jobs share, 1 avoids OpenMP barrier stalls "
                    "(a thread waiting for one another job has taken off its core), which can slow a model 10x")
    ap.add_argument("--keep-logs", action="store_true", help="keep the children's stdout/stderr (printed where)")
    ap.add_argument("--worker", choices=("model-only", "manifest"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "model-only":
        source, folder, n = args.worker_args
        print(json.dumps(worker_model_only(source, folder, int(n))))
        return 0
    if args.worker == "manifest":
        print(json.dumps(worker_manifest(args.worker_args[0])))
        return 0

    if args.run and args.onnx:
        ap.error("give --run or --onnx, not both")
    quick = args.quick
    THREADS[0] = args.threads if args.threads is not None else 1 if quick else 0
    sizes = sorted({int(s) for s in (args.sizes or ("200,1000" if quick else "1000,10000,100000")).split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        ap.error("--sizes needs counts >= 1")
    manifest_rows = args.manifest_rows if args.manifest_rows is not None else 5000 if quick else NIH_ROWS
    arch = args.arch or ("tiny" if quick else "full")
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "scale.py " + " ".join(argv),
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "env": {"python": platform.python_version(), "torch": version_of("torch"), "onnxruntime": version_of("onnxruntime"),
                "cxr_oneclass": version_of("cxr-oneclass"), "cpus": os.cpu_count(), "platform": platform.platform(),
                "threads": THREADS[0] or None, "load_before": os.getloadavg(), "busy": busy_processes()},
    }
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    log_dir = work / "logs"
    log_dir.mkdir()
    try:
        # -- the model
        if args.run or args.onnx:
            source = Path(args.run or args.onnx).resolve()
            if not source.exists():
                ap.error(f"{source} not found")
            result["trained"] = None
        else:
            source = work / "run"
            print(f"  training a {arch} phantom run to score with", file=sys.stderr)
            result["trained"] = train_run(source, arch, log_dir)
        result["model"] = model_summary(source)

        # -- the images
        images_dir = Path(args.images_dir)
        result["images"] = ensure_images(images_dir, sizes[-1], args.image_px)
        total = result["images"]["count"]

        # -- scoring at each size, smallest first
        rows = []
        for n in sizes:
            rows.append(bench_size(source, subset(images_dir, n, total), n, work, log_dir))
        result["sizes"] = rows
        result["summary"] = summarise(rows)

        # -- the NIH manifest
        result["manifest"] = bench_manifest(manifest_rows, log_dir) if manifest_rows > 0 else None
    finally:
        if args.keep_logs:
            print(f"children's logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["env"]["load_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t_start
    result["targets"] = {} if quick else targets(result)
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
