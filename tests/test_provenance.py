"""A run records its data with the split seed and absolute paths: evaluate, rescore and report reproduce exactly
the split it was trained on, from any working folder, for experiment runs too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import write_folder_dataset
from cxr_oneclass.config import resolve
from cxr_oneclass.data.specs import load_dataset, resolve_spec
from cxr_oneclass.jobs.evaluate import evaluate_run
from cxr_oneclass.jobs.experiment import ExperimentPlan, run_experiment
from cxr_oneclass.jobs.rescore import rescore_run
from cxr_oneclass.jobs.train import train_run
from cxr_oneclass.runs import DataProvenance, experiment_run

TINY = dict(image_size=32, width=8, batch_size=8, epochs=1, num_threads=1)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A manifest without a split column: the split is drawn with a seed, by file."""
    data = write_folder_dataset(tmp_path / "imgs", n_train=30, n_eval=10)
    rows = [{"file": str(p.relative_to(tmp_path)), "label": "abnormal" if p.parent.name == "abnormal" else "normal"}
            for p in sorted(data.rglob("*.png"))]
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["file", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def _names(scores_csv: Path) -> list[str]:
    return sorted(r["file"] for r in csv.DictReader(open(scores_csv)))


def test_the_split_seed_changes_the_split(manifest):
    a = load_dataset(f"csv:{manifest}", 32, seed=0, splits=("test",))
    b = load_dataset(f"csv:{manifest}", 32, seed=7, splits=("test",))
    assert sorted(a["test"].names) != sorted(b["test"].names)  # else the tests below prove nothing


def test_evaluating_an_experiment_run_without_data_uses_the_experiment_split(manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(manifest.parent)
    plan = ExperimentPlan(data="csv:manifest.csv", out=tmp_path / "exp", methods=["u"], repeats=1,
                          base=resolve("paper", **TINY), split_seed=7)
    run_experiment(plan, progress=False)
    run = experiment_run(plan.out, "u", 0)
    doc = json.loads((run.model_dir / "config.json").read_text())
    assert doc["split_seed"] == 7 and doc["data"] == f"csv:{manifest}"  # absolute, though given relative
    assert json.loads((plan.out / "experiment.json").read_text())["data"] == f"csv:{manifest}"
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the recorded path still finds the data
    evaluate_run(run.model_dir, out_dir=tmp_path / "again")
    assert _names(tmp_path / "again" / "scores.csv") == _names(run.eval_dir / "scores.csv")
    # ... and not the split the model seed (0) would have drawn
    other = load_dataset(f"csv:{manifest}", 32, seed=0, splits=("test",))
    assert sorted(other["test"].names) != _names(run.eval_dir / "scores.csv")


def test_runs_written_before_the_split_seed_was_recorded_use_their_experiment_seed(manifest, tmp_path):
    plan = ExperimentPlan(data=f"csv:{manifest}", out=tmp_path / "exp", methods=["u"], repeats=1,
                          base=resolve("paper", **TINY), split_seed=7)
    run_experiment(plan, progress=False)
    cfg_file = experiment_run(plan.out, "u", 0).model_dir / "config.json"
    doc = json.loads(cfg_file.read_text())
    del doc["split_seed"]  # as an older run
    cfg_file.write_text(json.dumps(doc))
    assert DataProvenance.from_doc(doc, cfg_file.parent) == DataProvenance(f"csv:{manifest}", 7)
    doc["data"] = f"csv:{manifest}"
    assert DataProvenance.from_doc(doc) == DataProvenance(f"csv:{manifest}", 0)  # a lone run: its model seed


def test_train_rescore_and_evaluate_share_one_split(manifest, tmp_path):
    out = train_run(resolve("paper", seed=3, **TINY), f"csv:{manifest}", tmp_path / "run", progress=False)
    assert out.extra["data_summary"] and json.loads((tmp_path / "run" / "config.json").read_text())["split_seed"] == 3
    rescore_run(tmp_path / "run", tmp_path / "re", score_terms="ssim", score_norm="standardised")
    re_doc = json.loads((tmp_path / "re" / "config.json").read_text())
    assert (re_doc["data"], re_doc["split_seed"]) == (f"csv:{manifest}", 3)
    evaluate_run(tmp_path / "run")
    evaluate_run(tmp_path / "re")
    assert _names(tmp_path / "run" / "eval-test" / "scores.csv") == _names(tmp_path / "re" / "eval-test" / "scores.csv")


def test_resolve_spec_makes_paths_absolute_and_keeps_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("csv:m.csv") == f"csv:{tmp_path / 'm.csv'}"
    assert resolve_spec("nih:data/nih?findings=Pneumonia&views=PA") == f"nih:{tmp_path / 'data/nih'}?findings=Pneumonia&views=PA"
    assert resolve_spec("phantom:n_train=8") == "phantom:n_train=8" and resolve_spec("phantom") == "phantom"
