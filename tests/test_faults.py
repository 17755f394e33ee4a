"""Fault injection (issue 15): tampered run folders, diverging training, crashes and kills, concurrent work, bad
output paths. Each case ends in a correct result or a clear error naming the file and the problem, with the rest
of the batch kept, and never in a `normal` flag for an image that was not scored. The decoding half (corrupt
DICOM, bombs, cache tampering, encodings) is in test_faults_data.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blob_images, write_folder_dataset
from cxr_oneclass.cli import main
from cxr_oneclass.config import resolve
from cxr_oneclass.errors import ConfigError, DataError, RunError
from cxr_oneclass.jobs.experiment import ExperimentPlan, run_experiment
from cxr_oneclass.jobs.train import train_run
from cxr_oneclass.runs import Lock, experiment_run, load_run, partial_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--width", "8", "--batch-size", "8", "--threads", "1"]
PHANTOM = "phantom:n_train=48,n_val_normal=8,n_val_abnormal=8,n_test_normal=6,n_test_abnormal=6,size=32"


def _cfg(**kw):
    return resolve("paper", **{"image_size": 32, "width": 8, "batch_size": 8, "epochs": 1, "num_threads": 1, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder data set, a trained run (best preset) and a folder of images to score."""
    root = tmp_path_factory.mktemp("faults")
    data = write_folder_dataset(root / "data", n_train=24, n_eval=6)
    run = root / "run"
    assert main(["-q", "train", "--data", f"folder:{data}", "--out", str(run), "--epochs", "1", *TINY, "--detector-width", "4",
                 "--detector-steps", "8"]) == 0
    return root, data, run


def _copy_run(world, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(world[2], dst)
    return dst


def _edit_config(run: Path, change) -> None:
    doc = json.loads((run / "config.json").read_text())
    change(doc)
    (run / "config.json").write_text(json.dumps(doc))


def _score_rows(capsys) -> list[dict]:
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


# ----------------------------------------------------------------------------------------------- fail closed

def test_nan_weights_are_refused_and_nothing_is_flagged_normal(world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _copy_run(world, tmp_path)
    state = load_file(str(run / "model.safetensors"))
    key = next(k for k in state if k.startswith("U.") and state[k].is_floating_point())
    state[key][...] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    _edit_config(run, lambda d: d.pop("weights_sha256"))  # as if written so: the finite check must catch it
    with pytest.raises(RunError, match="NaN or infinite"):
        load_run(run)
    assert main(["score", str(run), str(world[1] / "test")]) == 2
    out = capsys.readouterr()
    assert "normal" not in out.out and "NaN or infinite" in out.err


@pytest.mark.parametrize("field", ["threshold", "lo"])
def test_a_nan_calibration_is_refused(world, tmp_path, capsys, field):
    run = _copy_run(world, tmp_path)
    _edit_config(run, lambda d: d["calibration"].__setitem__(field, float("nan")))
    assert main(["score", str(run), str(world[1] / "test")]) == 2
    out = capsys.readouterr()
    assert "normal" not in out.out and "calibration is not finite" in out.err


def test_a_nan_score_is_an_error_row_never_normal(world, monkeypatch, capsys):
    from cxr_oneclass.jobs import score as score_job

    real = score_job.Scorer.score

    def nan_first(self, images, keep_maps=False):
        out = real(self, images, keep_maps)
        out["score"][0] = np.nan
        return out

    monkeypatch.setattr(score_job.Scorer, "score", nan_first)
    assert main(["score", str(world[2]), str(world[1] / "test" / "normal")]) == 1
    rows = _score_rows(capsys)
    assert rows[0]["flag"] == "error" and "not finite" in rows[0]["error"] and rows[0]["score"] == ""
    assert all(r["flag"] in ("normal", "abnormal") for r in rows[1:])


@pytest.mark.parametrize("val_abnormal", [0, 8])
def test_diverging_training_stops_with_a_clear_message_and_saves_nothing(tmp_path, capsys, val_abnormal):
    data = PHANTOM.replace("n_val_abnormal=8", f"n_val_abnormal={val_abnormal}")
    out = tmp_path / "run"
    rc = main(["train", "--preset", "paper", "--lr", "1e6", "--data", data, "--out", str(out), "--epochs", "3", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "training diverged in epoch" in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- data that lies

def test_an_image_in_two_splits_is_refused_and_duplicates_are_warned(tmp_path, caplog):
    data = write_folder_dataset(tmp_path / "d", n_train=12, n_eval=4)
    rows = [("train/normal/normal_000.png", "normal", "train"), ("train/normal/normal_001.png", "normal", "train"),
            ("test/normal/normal_000.png", "normal", "test"), ("test/abnormal/abnormal_000.png", "abnormal", "test")]
    manifest = tmp_path / "m.csv"

    def write(extra):
        with open(manifest, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "label", "split"])
            w.writerows([(f"d/{f}", lab, sp) for f, lab, sp in rows + extra])

    from cxr_oneclass.data.specs import load_dataset

    write([("train/normal/normal_000.png", "normal", "test")])  # the same file in train and test
    with pytest.raises(DataError, match="in two splits"):
        load_dataset(f"csv:{manifest}", 32)
    shutil.copy(data / "train/normal/normal_001.png", data / "test/normal/copy.png")  # a copy under another name
    write([("test/normal/copy.png", "normal", "test")])
    with pytest.raises(DataError, match="same pixels"):
        load_dataset(f"csv:{manifest}", 32)
    write([("train/normal/normal_001.png", "normal", "train")])  # listed twice in one split: a warning
    load_dataset(f"csv:{manifest}", 32)
    assert "duplicate image" in caplog.text


def test_evaluate_records_the_test_files_it_could_not_read(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world[1], data)
    (data / "test" / "normal" / "broken.png").write_bytes(b"not a png")
    run = _copy_run(world, tmp_path)
    assert main(["-q", "evaluate", str(run), "--data", f"folder:{data}"]) == 0
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert m["unreadable"]["count"] == 1 and m["unreadable"]["files"][0]["file"].endswith("broken.png")


def test_symlinked_subfolders_are_scored(world, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    shutil.copytree(world[1] / "test" / "abnormal", target)
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "linked").symlink_to(target, target_is_directory=True)
    assert main(["score", str(world[2]), str(tmp_path / "scan")]) == 0
    assert len(_score_rows(capsys)) == 6


# ----------------------------------------------------------------------------------------------- run folders

def test_weights_and_config_from_two_runs_do_not_load(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seed in ((a, 1), (b, 2)):
        train_run(_cfg(seed=seed), f"folder:{world[1]}", d, progress=False)
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # new weights, old calibration
    with pytest.raises(RunError, match="checksum differs"):
        load_run(a)
    _edit_config(a, lambda d: d.pop("weights_sha256"))  # an older run without a checksum: the metadata still tells
    _edit_config(a, lambda d: d["config"].__setitem__("seed", 1))
    with pytest.raises(RunError, match="disagree on seed"):
        load_run(a)


def test_a_killed_retraining_leaves_the_old_run_whole(world, tmp_path, monkeypatch):
    from cxr_oneclass.jobs import train as train_job

    run = _copy_run(world, tmp_path)
    assert main(["-q", "evaluate", str(run)]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    real_fit = train_job.fit

    def killed_after_one_epoch(*a, **k):
        inner = k["on_checkpoint"]

        def boom(ckpt):
            inner(ckpt)
            raise KeyboardInterrupt  # as a kill between epochs

        return real_fit(*a, **{**k, "on_checkpoint": boom})

    monkeypatch.setattr(train_job, "fit", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(epochs=3), f"folder:{world[1]}", run, progress=False)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # old model, old history, old eval-test: untouched and still loadable
    load_run(run)
    assert (partial_dir(run) / "checkpoint.json").is_file()  # the new training can be resumed...
    with pytest.raises(RunError, match="unfinished training"):  # ...and is not silently thrown away
        train_run(_cfg(epochs=3), f"folder:{world[1]}", run, progress=False)


@pytest.mark.parametrize("case", ["width 1024", "width 8.0", "pickle", "empty", "calibration", "nesting", "digits"])
def test_crafted_run_folders_give_one_clear_error(world, tmp_path, case, capsys):
    run = _copy_run(world, tmp_path)
    cfg_path = run / "config.json"
    if case == "width 1024":
        _edit_config(run, lambda d: d["config"].__setitem__("width", 512))  # passes the limits, not the weights
    elif case == "width 8.0":
        _edit_config(run, lambda d: d["config"].__setitem__("width", 8.0))
    elif case == "pickle":
        (run / "model.safetensors").write_bytes(pickle.dumps({"U.x": [1, 2, 3]}))
        _edit_config(run, lambda d: d.pop("weights_sha256"))
    elif case == "empty":
        (run / "model.safetensors").write_bytes(b"")
        _edit_config(run, lambda d: d.pop("weights_sha256"))
    elif case == "calibration":
        _edit_config(run, lambda d: d.__setitem__("calibration", {"lo": 0, "bogus": 1}))
    elif case == "nesting":
        cfg_path.write_text('{"config": ' + "[" * 100000 + "]" * 100000 + "}")
    elif case == "digits":
        cfg_path.write_text('{"config": {"width": ' + "9" * 5000 + "}}")
    t0 = time.perf_counter()
    assert main(["score", str(run), str(world[1] / "test" / "normal")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.splitlines()) == 1 and str(run) in err
    assert time.perf_counter() - t0 < 10  # refused before anything of the crafted size was built


def test_same_seed_same_weights_file_byte_for_byte(tmp_path):
    digests = []
    for name in ("a", "b"):
        train_run(_cfg(seed=5), PHANTOM, tmp_path / name, progress=False)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_run_files_and_evaluations_replace_earlier_ones_whole(world, tmp_path):
    run = _copy_run(world, tmp_path)
    assert main(["-q", "evaluate", str(run)]) == 0
    stale = run / "eval-test" / "stale.txt"
    stale.write_text("from an earlier evaluation")
    assert main(["-q", "evaluate", str(run)]) == 0
    assert not stale.exists() and (run / "eval-test" / "metrics.json").is_file()
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))


# ----------------------------------------------------------------------------------------------- experiments

def test_an_experiment_refuses_other_settings_and_shards_do_not_collide(tmp_path):
    plan = ExperimentPlan(data=PHANTOM, out=tmp_path / "exp", methods=["u"], repeats=1, base=_cfg())
    run_experiment(plan, progress=False)
    other = ExperimentPlan(data=PHANTOM, out=tmp_path / "exp", methods=["u"], repeats=1, base=_cfg(epochs=2))
    with pytest.raises(ConfigError, match="other settings.*epochs"):
        run_experiment(other, progress=False)
    with pytest.raises(ConfigError, match="data"):
        run_experiment(ExperimentPlan(data=PHANTOM + ",seed=3", out=tmp_path / "exp", methods=["u"], repeats=1, base=_cfg()), progress=False)
    # a second shard over a run that another process is training leaves it alone
    more = ExperimentPlan(data=PHANTOM, out=tmp_path / "exp", methods=["u"], repeats=2, base=_cfg())
    busy = experiment_run(more.out, "u", 1)
    busy.root.mkdir(parents=True)
    (busy.root / "marker").write_text("another process's work")
    lock = Lock(busy.lock_file)
    assert lock.acquire()
    try:
        rows = run_experiment(more, progress=False)
    finally:
        lock.release()
    assert len(rows) == 1 and (busy.root / "marker").is_file()


# ----------------------------------------------------------------------------------------------- output paths

def test_bad_output_paths_fail_before_any_work(world, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    assert main(["score", str(world[2]), str(world[1]), "--csv", str(blocker / "s.csv")]) == 2
    assert main(["score", str(world[2]), str(world[1]), "--heatmaps", str(blocker / "maps")]) == 2
    assert main(["train", "--data", f"folder:{world[1]}", "--out", str(blocker / "run"), *TINY]) == 2
    assert main(["evaluate", str(world[2]), "--out", str(blocker / "ev")]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err
    assert err.count("error: cannot write") == 4 and "Traceback" not in err


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cxr_oneclass", *args], env=env, cwd=ROOT, **kw)


def test_sigterm_keeps_the_scores_already_written(world, tmp_path):
    images = tmp_path / "many"
    images.mkdir()
    for i, img in enumerate(blob_images(600, 32, seed=9)):
        Image.fromarray(img).save(images / f"i{i:04d}.png")
    out = tmp_path / "s.csv"
    proc = _cli("score", str(world[2]), str(images), "--csv", str(out), stderr=subprocess.PIPE, text=True)
    partial = out.with_name("s.csv.partial")
    deadline = time.time() + 60
    while time.time() < deadline and (not partial.is_file() or len(partial.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    rows = list(csv.DictReader(open(partial)))
    assert proc.returncode == 143 and "Traceback" not in err and "rows scored so far" in err
    assert 2 <= len(rows) < 600 and all(r["flag"] in ("normal", "abnormal") for r in rows) and not out.exists()


def test_score_into_a_closed_pipe_stops_quietly(world):
    proc = _cli("score", str(world[2]), str(world[1]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1`
    err = proc.communicate(timeout=60)[1].decode()
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_file_names_that_are_not_utf8_are_scored_and_printed(world, tmp_path, capsys):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))  # latin-1 bytes, not valid UTF-8
    shutil.copy(world[1] / "test" / "normal" / "normal_000.png", odd)
    assert main(["score", str(world[2]), str(odd)]) == 0
    rows = _score_rows(capsys)
    assert len(rows) == 1 and rows[0]["flag"] in ("normal", "abnormal") and "caf" in rows[0]["file"]


# ----------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("preset", ["best", "paper"])
def test_export_of_a_fresh_small_model_passes_its_check(world, tmp_path, preset, capsys):
    run = tmp_path / "run"
    assert main(["-q", "train", "--preset", preset, "--data", f"folder:{world[1]}", "--out", str(run), "--epochs", "1", *TINY]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0 and (tmp_path / "m.onnx").is_file()


def test_a_failed_export_check_leaves_no_file(world, tmp_path, monkeypatch, capsys):
    from cxr_oneclass.jobs import export as export_job

    monkeypatch.setattr(export_job, "TOLERANCE", -1.0)
    assert main(["export", str(world[2]), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no file was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- resume

def test_resume_after_sigkill_ends_bit_identical(tmp_path):
    args = ["-q", "train", "--preset", "best", "--data", PHANTOM, "--epochs", "4", "--seed", "3", *TINY]
    whole = tmp_path / "whole"
    assert _cli(*args, "--out", str(whole)).wait(timeout=300) == 0
    run = tmp_path / "killed"
    proc = _cli(*args, "--out", str(run))
    info = partial_dir(run) / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (info.is_file() and json.loads(info.read_text() or "{}").get("epoch", 0) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not run.exists() and info.is_file()
    assert _cli("-q", "train", "--resume", str(run)).wait(timeout=300) == 0
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "config.json").read_text()) for d in (whole, run))
    assert a["calibration"] == b["calibration"] and a["score_selection"] == b["score_selection"]
    hist = [list(csv.DictReader(open(d / "history.csv"))) for d in (whole, run)]
    assert [r["loss_g_total"] for r in hist[0]] == [r["loss_g_total"] for r in hist[1]]
    assert not partial_dir(run).exists()
