"""jobs.rescore.rescore_run: another anomaly score on a trained run, without retraining."""

import pytest
import torch

from cxr_oneclass.config import resolve
from cxr_oneclass.errors import ConfigError
from cxr_oneclass.jobs.rescore import rescore_run
from cxr_oneclass.jobs.train import train_run
from cxr_oneclass.runs import load_run
from cxr_oneclass.scoring.terms import TERM_INDEX


def test_rescore_keeps_weights_and_changes_only_the_score(tmp_path, folder_dataset):
    cfg = resolve("paper", image_size=32, width=8, batch_size=8, epochs=1, num_threads=2)
    train_run(cfg, f"folder:{folder_dataset}", tmp_path / "run", progress=False)
    out = rescore_run(tmp_path / "run", tmp_path / "re", score_terms="ssim+fdist", score_norm="standardised", fdist_features="ez")
    old, _, _ = load_run(tmp_path / "run")
    new, cal, doc = load_run(tmp_path / "re")
    assert new.cfg.score_terms == "ssim+fdist" and new.cfg.epochs == old.cfg.epochs
    assert doc["rescored_from"] == str(tmp_path / "run") and cal is not None and out.val_auc is not None
    for (k, a), b in zip(old.U.state_dict().items(), new.U.state_dict().values()):
        assert torch.equal(a, b), k
    assert float(new.stats.scale[TERM_INDEX["ssim"]]) != 1.0  # ssim standardised on validation normals
    with pytest.raises(ConfigError, match="rescore changes only"):
        rescore_run(tmp_path / "run", tmp_path / "bad", width=16)


def test_best_preset_trains_the_paper_networks_and_rescore_reproduces_it(tmp_path, folder_dataset):
    """`best` differs from `paper` only in the score: same seed, same weights; and `rescore` of a paper run gives
    the scores a `best` run gives."""
    tiny = dict(image_size=32, width=8, batch_size=8, epochs=2, num_threads=2)
    data = f"folder:{folder_dataset}"
    paper = train_run(resolve("paper", **tiny), data, tmp_path / "paper", progress=False)
    best = train_run(resolve("best", **tiny), data, tmp_path / "best", progress=False)
    for (k, a), b in zip(paper.model.state_dict().items(), best.model.state_dict().values()):
        if not k.startswith("stats."):
            assert torch.equal(a, b), k
    re = rescore_run(tmp_path / "paper", tmp_path / "re", score_terms="auto", score_norm="standardised", fdist_features="ez")
    assert re.model.cfg.score_terms == best.model.cfg.score_terms != "auto"  # the same choice on the same validation
    assert re.extra["score_selection"]["val_auc_by_terms"] == pytest.approx(best.extra["score_selection"]["val_auc_by_terms"], abs=1e-6)
    assert re.val_auc == pytest.approx(best.val_auc, abs=1e-6)
    assert re.calibration.threshold == pytest.approx(best.calibration.threshold, rel=1e-5)
