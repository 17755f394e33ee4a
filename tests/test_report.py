"""`cxr-oneclass report`: a self-contained HTML + Markdown report of an experiment folder or of a single run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from cxr_oneclass.cli import main
from cxr_oneclass.config import resolve
from cxr_oneclass.jobs.evaluate import evaluate_run
from cxr_oneclass.jobs.experiment import ExperimentPlan, run_experiment
from cxr_oneclass.jobs.report import FIG_DIR, TEST_AUC_LABEL, write_report
from cxr_oneclass.jobs.train import train_run

DATA = "phantom:n_train=32,n_val_normal=8,n_val_abnormal=10,n_test_normal=8,n_test_abnormal=10"
SECTION_IDS = ("summary", "roc", "histograms", "training", "operating-points", "reconstructions", "subgroups")


def _tiny(**kw):
    return resolve("paper", **{"image_size": 32, "width": 8, "batch_size": 16, "epochs": 1, "num_threads": 1, **kw})


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _move_data_away(exp: Path, where: Path) -> None:
    """As if the data had moved: the experiment and each run record a folder that is not there."""
    for cfg_file in [exp / "experiment.json", *exp.glob("runs/*/*/model/config.json")]:
        doc = json.loads(cfg_file.read_text())
        doc["data"] = f"folder:{where}"
        cfg_file.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "exp"
    run_experiment(ExperimentPlan(data=DATA, out=out, methods=["u", "full"], repeats=2, base=_tiny()), progress=False)
    return out


@pytest.fixture(scope="module")
def experiment_report(experiment) -> Path:
    assert main(["report", str(experiment)]) == 0  # through the CLI: the same as write_report(experiment)
    return experiment / "report.html"


def _assert_self_contained(text: str) -> None:
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))  # only in-page anchors
    assert 'src="http' not in text and "<link" not in text and "<script" not in text and "file://" not in text


def test_experiment_report_has_every_section(experiment, experiment_report):
    text = experiment_report.read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in text, sid
    _assert_self_contained(text)
    assert text.count("data:image/png;base64,") == 4  # roc, histograms, training curves, reconstructions
    assert TEST_AUC_LABEL in text
    # results.md table in the header, per method
    summary = text.split('<section id="summary">')[1].split("</section>")[0]
    assert "paper (NIH / RSNA)" in summary and "<td>u</td>" in summary and "<td>full</td>" in summary
    assert "repeats: 2" in summary
    # operating points at the stored threshold and at fixed sensitivities, for both methods
    ops = text.split('<section id="operating-points">')[1].split("</section>")[0]
    for label in ("stored threshold", "sensitivity ≥ 90%", "sensitivity ≥ 95%", "sensitivity ≥ 99%", "normals auto-cleared"):
        assert label in ops
    assert ops.count("<td>full</td>") == 4 and ops.count("<td>u</td>") == 4
    assert "±" in ops  # mean ± std over the two repeats
    assert "95% CI" in ops and "population shift" in ops  # bootstrap intervals and the population check, per run


def test_experiment_subgroups_by_kind(experiment_report):
    text = experiment_report.read_text(encoding="utf-8")
    sub = text.split('<section id="subgroups">')[1].split("</section>")[0]
    assert "kind" in sub and "abnormals vs all normals" in sub
    for kind in ("nodule", "consolidation", "effusion", "cardiomegaly", "pneumothorax"):
        assert f"<td>{kind}</td>" in sub
    assert "<th>n normal</th>" in sub and "<th>AUC full</th>" in sub
    assert "<td>normal</td>" not in sub  # normals are the reference group, not a subgroup


def test_experiment_markdown_links_existing_pngs(experiment, experiment_report):
    md = (experiment / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all(link.startswith(f"{FIG_DIR}/") and link.endswith(".png") for link in links)
    for link in links:
        png = experiment / link
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for sid in SECTION_IDS:
        assert f'<a id="{sid}"></a>' in md
    assert "| cardiomegaly |" in md
    assert not list(experiment.glob(".*.tmp")) and not list((experiment / FIG_DIR).glob(".*.tmp"))


def test_report_skips_reconstructions_when_data_is_gone(experiment, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("report*"))
    _move_data_away(copy, tmp_path / "moved-away")
    html = write_report(copy, out=tmp_path / "elsewhere").read_text(encoding="utf-8")
    recon = html.split('<section id="reconstructions">')[1].split("</section>")[0]
    assert 'class="note"' in recon and "Skipped" in recon and "<img" not in recon
    assert '<section id="roc">' in html and not (copy / "report.html").exists()


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a run" in capsys.readouterr().err


def test_single_run_report(tmp_path):
    run = tmp_path / "run"
    train_run(resolve("best", **{**_tiny().to_dict(), "score_terms": "auto", "score_norm": "standardised", "fdist_features": "ez"}), DATA, run, progress=False)
    partial = write_report(run).read_text(encoding="utf-8")  # not evaluated yet: notes, no failure
    assert "cxr-oneclass evaluate" in partial and '<section id="training">' in partial
    evaluate_run(run)
    html = write_report(run).read_text(encoding="utf-8")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
    _assert_self_contained(html)
    assert html.count("data:image/png;base64,") == 4
    assert "validation AUC" in html and "stored threshold" in html and "<td>nodule</td>" in html
    assert TEST_AUC_LABEL not in html  # a plain run logs no test AUC per epoch
    doc = json.loads((run / "config.json").read_text())
    assert f"{doc['score_selection']['chosen']}, chosen on validation" in html  # best preset: says what validation chose
    md = (run / "report.md").read_text(encoding="utf-8")
    assert all((run / link).is_file() for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))


def test_rewritten_report_leaves_no_stale_figures(experiment, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("report*"))
    out = tmp_path / "rep"
    write_report(copy, out=out)
    assert (out / "report_figures" / "reconstructions.png").is_file()
    _move_data_away(copy, tmp_path / "moved-away")  # the second report cannot draw reconstructions
    write_report(copy, out=out)
    assert not (out / "report_figures" / "reconstructions.png").exists()
    assert (out / "report_figures" / "roc.png").is_file()
