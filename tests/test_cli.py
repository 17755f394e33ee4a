"""End to end through the command line: train -> evaluate -> score, on a tiny generated folder dataset."""

import csv
import io
import json

import pytest

from cxr_oneclass.cli import main

TINY = ["--image-size", "32", "--width", "8", "--batch-size", "8", "--epochs", "2", "--threads", "2", "--detector-width", "4",
        "--detector-steps", "8"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import write_folder_dataset

    root = tmp_path_factory.mktemp("cli")
    data = write_folder_dataset(root / "data")
    run = root / "run"
    assert main(["-q", "train", "--data", f"folder:{data}", "--out", str(run), *TINY]) == 0
    return data, run


def test_train_writes_model_config_history(trained_run):
    _, run = trained_run
    assert (run / "model.safetensors").is_file()
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["epochs"] == 2 and doc["config"]["image_size"] == 32
    assert doc["calibration"]["threshold"] is not None and doc["version"]
    import numpy
    import torch

    env = doc["environment"]  # what a seed's bit-for-bit repeat depends on beyond the config
    assert env["torch"] == torch.__version__ and env["numpy"] == numpy.__version__ and env["torch_threads"] == 2
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 2 and float(rows[0]["images_per_s"]) > 0 and "val_auc" in rows[0]


def test_evaluate_writes_metrics_and_scores(trained_run, tmp_path, capsys):
    data, run = trained_run
    assert main(["evaluate", str(run), "--data", f"folder:{data}", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_normal"] == 6 and m["n_abnormal"] == 6 and 0 <= m["auc"] <= 1
    assert set(m["component_auc"]) == {"rec", "adv", "enc", "ssim", "fdist", "seg", "sdist"}  # detect: S too
    assert {"sensitivity", "specificity"} <= set(m["at_threshold"])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "scores.csv")))
    assert len(rows) == 12 and {"file", "label", "score", "rec", "adv", "enc"} <= set(rows[0])
    assert "AUC" in capsys.readouterr().out


def test_score_files_folders_and_bad_input(trained_run, tmp_path, capsys):
    data, run = trained_run
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    out_csv = tmp_path / "s.csv"
    rc = main(["score", str(run), str(data / "test" / "abnormal"), str(bad), str(tmp_path / "missing.png"), "--csv", str(out_csv), "--heatmaps", str(tmp_path / "hm")])
    assert rc == 1  # some inputs failed, the rest were scored
    rows = list(csv.DictReader(open(out_csv)))
    scored = [r for r in rows if r["flag"] != "error"]
    assert len(rows) == 8 and len(scored) == 6 and all(r["flag"] in ("normal", "abnormal") for r in scored)
    # every term the run reports, and the score's (auto's choice) among them; each row names its heat map
    doc = json.loads((run / "config.json").read_text())
    assert {"raw_score", "rec", "adv", "enc", "ssim", "fdist", "sdist"} <= set(rows[0])
    assert all(float(r[t]) >= 0 for r in scored for t in doc["config"]["score_terms"].split("+"))
    assert sorted(r["heatmap_file"] for r in scored) == sorted(str(p) for p in (tmp_path / "hm").glob("*.png"))
    # unreadable inputs are rows too, flagged error (never normal), with the reason
    failed = {r["file"].rsplit("/", 1)[-1]: r for r in rows if r["flag"] == "error"}
    assert set(failed) == {"bad.png", "missing.png"} and failed["missing.png"]["error"] == "file not found"
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing.png: file not found" in err


def test_printed_scores_are_csv_with_the_same_flag_words(trained_run, tmp_path, capsys):
    data, run = trained_run
    odd = tmp_path / 'a, "quoted"\nname.png'  # a comma, quotes and a newline in a file name
    odd.write_bytes((data / "test" / "abnormal" / "abnormal_000.png").read_bytes())
    assert main(["score", str(run), str(odd), str(data / "test" / "normal")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7 and rows[0]["file"] == str(odd)
    assert {r["flag"] for r in rows} <= {"normal", "abnormal"} and "heatmap_file" not in rows[0]
    main(["score", str(run), str(odd), "--csv", str(tmp_path / "s.csv")])
    assert [r["flag"] for r in csv.DictReader(open(tmp_path / "s.csv"))] == [rows[0]["flag"]]


def test_quiet_and_verbose_after_the_verb_and_defaults_in_help(trained_run, tmp_path, capsys):
    data, run = trained_run
    assert main(["evaluate", str(run), "-q", "--out", str(tmp_path / "ev")]) == 0
    assert main(["-q", "evaluate", "-v", str(run), "--out", str(tmp_path / "ev2")]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert "(default: 15 in detect" in help_text and "(default: detect)" in help_text


def test_clear_errors_without_traceback(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "norun")]) == 2
    assert main(["train", "--data", f"folder:{tmp_path}", "--out", str(tmp_path / "r"), *TINY]) == 2
    (tmp_path / "d" / "abnormal").mkdir(parents=True)
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "d" / "abnormal" / "a.png")
    assert main(["train", "--data", f"folder:{tmp_path / 'd'}", "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("error:") == 3 and "no normal training images" in err


def test_history_is_written_every_epoch(tmp_path, monkeypatch):
    from conftest import write_folder_dataset
    from cxr_oneclass.config import resolve
    from cxr_oneclass.jobs import train as workflow

    written = []
    real = workflow.write_csv
    monkeypatch.setattr(workflow, "write_csv", lambda path, rows, *a, **k: (written.append(len(rows)), real(path, rows, *a, **k)))
    data = write_folder_dataset(tmp_path / "data", n_train=16, n_eval=4)
    cfg = resolve("paper", image_size=32, width=8, batch_size=8, epochs=3, num_threads=1)
    workflow.train_run(cfg, f"folder:{data}", tmp_path / "run", progress=False)
    assert written == [1, 2, 3, 3]  # after each epoch, then the final history


def test_default_preset_is_detect_and_rescore_gives_the_paper_score(trained_run, tmp_path, capsys):
    data, run = trained_run
    doc = json.loads((run / "config.json").read_text())
    # the detect preset's score terms "auto" are chosen on validation and saved resolved, with every candidate's AUC:
    # every non-empty subset of ssim, fdist, seg (the lesion detector's) and sdist
    sel = doc["score_selection"]
    assert doc["config"]["score_norm"] == "standardised" and doc["config"]["score_terms"] == sel["chosen"]
    assert doc["config"]["detector_width"] > 0
    from itertools import combinations

    subsets = {"+".join(c) for r in range(1, 5) for c in combinations(["ssim", "fdist", "seg", "sdist"], r)}
    assert sel["requested"] == "auto" and set(sel["val_auc_by_terms"]) == subsets
    assert sel["val_auc_by_terms"][sel["chosen"]] == max(sel["val_auc_by_terms"].values()) == pytest.approx(doc["val_auc"])
    out = tmp_path / "paper-score"
    argv = ["rescore", str(run), "--out", str(out), "--data", f"folder:{data}", "--score-terms", "rec+adv+enc", "--score-norm", "weights"]
    assert main(argv) == 0
    re_doc = json.loads((out / "config.json").read_text())
    assert re_doc["config"]["score_terms"] == "rec+adv+enc" and re_doc["rescored_from"] == str(run)
    assert (out / "history.csv").is_file() and "validation AUC" in capsys.readouterr().out
    assert main(["-q", "evaluate", str(out), "--data", f"folder:{data}", "--out", str(tmp_path / "ev")]) == 0
