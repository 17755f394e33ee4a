"""The operating point is the user's (calibrate, target sensitivity, threshold), with intervals and PPV/NPV at a
stated prevalence; every run has a model card; scoring warns when the films are not the training population."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, TINY
from cxr_oneclass.cli import main
from cxr_oneclass.metrics import bootstrap_ci, operating_point, predictive_values
from cxr_oneclass.scoring.calibration import MIN_ABNORMAL_FOR_THRESHOLD, fit_calibration

PHANTOM = "phantom:n_train=48,n_val_normal=40,n_val_abnormal=40,n_test_normal=20,n_test_abnormal=20,size=32"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("op") / "run"
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(out), *TINY]) == 0
    return out


def test_calibrate_moves_sensitivity_to_the_target_on_validation(run, capsys):
    assert main(["-q", "evaluate", str(run)]) == 0
    for target in (0.8, 0.99):
        assert main(["calibrate", str(run), "--target-sensitivity", str(target)]) == 0
        out = capsys.readouterr().out
        after = float(out.split("after")[1].split("sensitivity ")[1].split(",")[0])
        assert after >= target and after - target < 1 / 40 + 1e-9  # the smallest threshold step: one of 40 abnormals
        doc = json.loads((run / "config.json").read_text())
        assert doc["calibration"]["target_sensitivity"] == target and doc["calibrated"]["split"] == "val"
        assert not (run / "eval-test").exists()  # flags made at the old threshold are gone
    assert main(["calibrate", str(run), "--threshold", "0.5"]) == 0
    assert json.loads((run / "config.json").read_text())["calibration"]["threshold"] == 0.5
    assert main(["-q", "evaluate", str(run), "--prevalence", "0.1"]) == 0  # still a loadable, consistent run
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    op = m["at_threshold"]
    assert op["threshold"] == 0.5 and op["prevalence"] == 0.1 and "ppv_at_prevalence" in op
    assert m["ci95"]["auc"][0] <= m["auc"] <= m["ci95"]["auc"][1]


def test_intervals_prevalence_and_the_few_abnormals_warning():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)]
    scores = np.r_[rng.normal(0, 1, 200), rng.normal(1.5, 1, 200)]
    ci = bootstrap_ci(labels, scores, 0.7)
    op = operating_point(labels, scores, 0.7, prevalence=0.05)
    assert ci["auc"][0] < 0.85 < ci["auc"][1] and ci["sensitivity"][0] < op["sensitivity"] < ci["sensitivity"][1]
    ppv, npv = predictive_values(0.9, 0.8, 0.05)
    assert ppv == pytest.approx(0.045 / (0.045 + 0.19)) and npv == pytest.approx(0.76 / (0.76 + 0.005))
    assert op["ppv_at_prevalence"] < op["ppv"]  # a 5% prevalence makes a flag less telling than the test set's 50%
    few = fit_calibration(scores[:220], labels[:220])  # 20 abnormals
    assert MIN_ABNORMAL_FOR_THRESHOLD > 20 and "only 20 validation abnormals" in few.warnings[0]
    assert fit_calibration(scores, labels).warnings == []
    pct = fit_calibration(scores, labels).percentile(np.array([-10.0, np.median(scores[:200]), 10.0]))
    assert pct[0] == 0 and abs(pct[1] - 50) < 1 and pct[2] == 100


def test_every_run_has_a_model_card(run):
    card = (run / "MODEL_CARD.md").read_text()
    for needed in ("research use only", "Training data", "Operating point", "Validation results", "95% CI", "Limits"):
        assert needed in card, needed


@pytest.mark.slow
def test_a_model_warns_on_the_other_sets_normal_films_only(tmp_path, capsys):
    sets = {n: SHARED_DATA / n for n in ("nih-pneumonia-128", "kermany-pediatric-128")}
    if not all((p / "manifest.csv").is_file() for p in sets.values()):
        pytest.skip("shared real data absent")
    for own, other in (("nih-pneumonia-128", "kermany-pediatric-128"), ("kermany-pediatric-128", "nih-pneumonia-128")):
        run = tmp_path / own
        args = ["--image-size", "64", "--width", "8", "--batch-size", "64", "--threads", "2", "--steps", "2", "--detector-width", "4",
                "--detector-steps", "4"]
        assert main(["-q", "train", "--data", f"csv:{sets[own]}/manifest.csv", "--out", str(run), *args]) == 0
        assert main(["-q", "evaluate", str(run)]) == 0  # its own test split, pneumonia included: no warning
        assert "do not look like the population" not in capsys.readouterr().err
        pop = json.loads((run / "eval-test" / "metrics.json").read_text())["population"]
        assert pop["warning"] is None and pop["shift"] < pop["shift_limit"]
        normals = sets[other] / "normal"
        assert main(["score", str(run), str(normals), "--json", str(tmp_path / "other.json")]) in (0, 1)
        err = capsys.readouterr().err
        assert "do not look like the population" in err
        doc = json.loads((tmp_path / "other.json").read_text())
        assert doc["population"]["warning"] and doc["population"]["shift"] > doc["population"]["shift_limit"]
