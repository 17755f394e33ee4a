import json

import numpy as np
import pytest
import torch

from conftest import blob_images
from cxr_oneclass.config import resolve
from cxr_oneclass.errors import RunError
from cxr_oneclass.runs import load_run, save_run
from cxr_oneclass.scoring.calibration import fit_calibration
from cxr_oneclass.scoring.inference import score_images
from cxr_oneclass.training.loop import fit


def test_saved_and_reloaded_model_scores_identically(tmp_path):
    cfg = resolve("paper", image_size=32, width=8, batch_size=16, epochs=1)
    model = fit(cfg, blob_images(32, 32, seed=1), progress=False).model
    images = blob_images(6, 32, seed=2, abnormal=True)
    before = score_images(model, images)["score"]
    cal = fit_calibration(before, np.array([0, 0, 0, 1, 1, 1]))
    save_run(tmp_path / "run", model, cal, {"data": "x"})
    loaded, cal2, doc = load_run(tmp_path / "run")
    np.testing.assert_array_equal(score_images(loaded, images)["score"], before)
    assert cal2 == cal
    assert doc["config"]["image_size"] == 32 and doc["version"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_missing_or_broken_runs_give_clear_errors(tmp_path):
    with pytest.raises(RunError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no trained model"):
        load_run(tmp_path / "empty")
    cfg = resolve("paper", image_size=32, width=8)
    from cxr_oneclass.model.networks import build_model

    save_run(tmp_path / "r", build_model(cfg), None)
    doc = json.loads((tmp_path / "r" / "config.json").read_text())
    doc["config"]["width"] = 16  # weights no longer match
    (tmp_path / "r" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="do not match"):
        load_run(tmp_path / "r")


def test_runs_saved_before_the_sdist_term_still_load_and_score_the_same(tmp_path):
    """Older checkpoints have 5 score-term centres/scales and no sdist statistics: they load, unchanged."""
    from safetensors.torch import load_file, save_file

    cfg = resolve("paper", image_size=32, width=8, batch_size=16, epochs=1)
    model = fit(cfg, blob_images(32, 32, seed=1), progress=False).model
    save_run(tmp_path / "run", model, None)
    path = tmp_path / "run" / "model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("stats.sd_")}
    state["stats.center"], state["stats.scale"] = state["stats.center"][:5], state["stats.scale"][:5]
    save_file(state, str(path))
    _as_older_run(tmp_path / "run")
    loaded, _, _ = load_run(tmp_path / "run")
    images = blob_images(4, 32, seed=3, abnormal=True)
    np.testing.assert_allclose(score_images(loaded, images)["score"], score_images(model, images)["score"], rtol=1e-6)
    from cxr_oneclass.scoring.terms import TERM_INDEX, TERM_NAMES

    assert loaded.stats.center.shape == (len(TERM_NAMES),) and float(loaded.stats.scale[TERM_INDEX["sdist"]]) == 1.0


def _as_older_run(run) -> None:
    """Runs saved before config.json recorded the weights' checksum (the tests rewrite their weights)."""
    doc = json.loads((run / "config.json").read_text())
    doc.pop("weights_sha256")
    (run / "config.json").write_text(json.dumps(doc))


def test_run_files_respect_the_umask(tmp_path):
    """Run folders are shared by a team: files get what the umask allows any new file, not mkstemp's 0600."""
    import os
    import stat

    from cxr_oneclass.io_utils import _umask

    cfg = resolve("paper", image_size=32, width=8, batch_size=16, epochs=1)
    model = fit(cfg, blob_images(16, 32, seed=1), progress=False).model
    save_run(tmp_path / "run", model, None)
    want = 0o666 & ~_umask()
    assert want & 0o044, "this test needs a umask that lets group/others read"
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == want, name


def test_standardisation_slots_are_mapped_by_name(tmp_path):
    """A checkpoint records which term each centre/scale slot belongs to, so the table's order may change."""
    from safetensors.torch import load_file, save_file

    from cxr_oneclass.runs import SLOT_NAMES_KEY
    from cxr_oneclass.scoring.terms import TERM_INDEX, TERM_NAMES

    cfg = resolve("paper", image_size=32, width=8, batch_size=16, epochs=1)
    model = fit(cfg, blob_images(16, 32, seed=1), progress=False).model
    model.stats.center.copy_(torch.arange(len(TERM_NAMES), dtype=torch.float32))
    save_run(tmp_path / "run", model, None)
    path = tmp_path / "run" / "model.safetensors"
    state = load_file(str(path))
    order = list(reversed(TERM_NAMES))  # as a table in another order would have saved it
    state["stats.center"] = torch.tensor([float(TERM_INDEX[n]) for n in order])
    save_file(state, str(path), metadata={SLOT_NAMES_KEY: json.dumps(order)})
    _as_older_run(tmp_path / "run")
    loaded, _, _ = load_run(tmp_path / "run")
    assert loaded.stats.center.tolist() == list(range(len(TERM_NAMES)))
