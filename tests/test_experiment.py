import csv
import json

import pytest

from cxr_oneclass.cli import main
from cxr_oneclass.config import ConfigError, resolve
from cxr_oneclass.jobs.experiment import ExperimentPlan, run_experiment

DATA = "phantom:n_train=32,n_val_normal=8,n_val_abnormal=10,n_test_normal=8,n_test_abnormal=10"
BASE = dict(image_size=32, width=8, batch_size=16, epochs=1, num_threads=2)


def test_tiny_experiment_writes_results_and_resumes(tmp_path):
    plan = ExperimentPlan(DATA, tmp_path / "x", ["u", "full"], 2, resolve("paper", **BASE))
    calls, so_far = [], []

    def on_run(m, r, row):
        calls.append((m, r, row is None))
        so_far.append(len(json.loads((tmp_path / "x" / "results.json").read_text())["runs"]))

    rows = run_experiment(plan, progress=False, on_run=on_run)
    assert [(r["method"], r["seed"]) for r in rows] == [("u", 0), ("u", 1), ("full", 0), ("full", 1)]
    assert so_far == [1, 2, 3, 4]  # results files are rewritten after every finished run
    assert all(skipped is False for *_, skipped in calls)
    for name in ("results.md", "results.csv", "results.json"):
        assert (tmp_path / "x" / name).is_file()
    summary = json.loads((tmp_path / "x" / "results.json").read_text())["summary"]
    assert [s["method"] for s in summary] == ["u", "full"] and all(s["runs"] == 2 for s in summary)
    assert "| full |" in (tmp_path / "x" / "results.md").read_text()
    hist = list(csv.DictReader(open(tmp_path / "x" / "runs" / "full" / "seed1" / "model" / "history.csv")))
    assert "test_auc_not_for_selection" in hist[0] and "val_auc" in hist[0]
    # different seeds, different models: the same test image gets different raw scores
    raw = [next(csv.DictReader(open(tmp_path / "x" / "runs" / "u" / s / "eval" / "scores.csv")))["raw_score"] for s in ("seed0", "seed1")]
    assert raw[0] != raw[1]

    # resume: finished runs are kept; an interrupted one (no metrics.json) is redone from scratch
    (tmp_path / "x" / "runs" / "full" / "seed1" / "metrics.json").unlink()
    (tmp_path / "x" / "runs" / "full" / "seed1" / "model" / "junk.tmp").write_text("half-written")
    calls.clear()
    rows2 = run_experiment(plan, progress=False, on_run=lambda m, r, row: calls.append((m, r, row is None)))
    assert [c[2] for c in calls] == [True, True, True, False]
    assert not (tmp_path / "x" / "runs" / "full" / "seed1" / "model" / "junk.tmp").exists()
    assert rows2[:3] == rows[:3]


def test_baselines_train_and_score(tmp_path):
    plan = ExperimentPlan(DATA, tmp_path / "b", ["ae", "ganomaly"], 1, resolve("paper", **BASE))
    rows = run_experiment(plan, progress=False)
    ae, gan = rows
    assert ae["auc_rec"] is not None and "auc_enc" not in ae  # AE: U only, scored by reconstruction
    assert gan["auc_enc"] is not None
    cfg = json.loads((tmp_path / "b" / "runs" / "ganomaly" / "seed0" / "model" / "config.json").read_text())["config"]
    assert cfg["skips"] == 0 and cfg["adv_loss"] == "feature" and cfg["score_terms"] == "enc"


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        run_experiment(ExperimentPlan(DATA, tmp_path / "z", ["vae"], 1, resolve("paper", **BASE)), progress=False)


SMALL_S = ["--detector-width", "4", "--detector-steps", "4"]  # the default preset trains the lesion detector too


def test_experiment_cli(tmp_path, capsys):
    args = ["-q", "experiment", "--data", DATA, "--out", str(tmp_path / "c"), "--variants", "u", "--repeats", "1",
            "--image-size", "32", "--width", "8", "--batch-size", "16", "--epochs", "1", *SMALL_S]
    assert main(args) == 0
    assert "test AUC" in capsys.readouterr().out
    assert main(args) == 0
    assert "finished earlier" in capsys.readouterr().out


def test_sharded_repeats_are_collected_without_training(tmp_path, capsys):
    """Repeats sharded over processes (--seed K --repeats N) land in one layout; --collect gathers them and
    trains nothing, leaving unfinished runs out."""
    out = tmp_path / "s"
    common = ["-q", "experiment", "--data", DATA, "--out", str(out), "--variants", "u", "--image-size", "32", "--width", "8",
              "--batch-size", "16", "--epochs", "1", *SMALL_S]
    assert main([*common, "--seed", "0", "--repeats", "1"]) == 0
    assert main([*common, "--seed", "1", "--repeats", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--seed", "0", "--repeats", "3", "--collect"]) == 0
    assert "collected 2 finished run(s) of 3" in capsys.readouterr().out
    assert not (out / "runs" / "u" / "seed2").exists()  # nothing was trained for the missing repeat
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert json.loads((out / "experiment.json").read_text())["repeats"] == 3


def test_quiet_experiment_prints_no_progress_bars(tmp_path, capsys):
    """-q silences every bar, also the test split's scoring bar that large splits (> 500 images) get."""
    big = "phantom:n_train=32,n_val_normal=8,n_val_abnormal=10,n_test_normal=260,n_test_abnormal=260"
    args = ["-q", "experiment", "--data", big, "--out", str(tmp_path / "q"), "--variants", "u", "--repeats", "1",
            "--image-size", "32", "--width", "8", "--batch-size", "16", "--epochs", "1", *SMALL_S]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "test AUC" in out
    assert "scoring" not in err and "batch/s" not in err
