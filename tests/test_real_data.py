"""A short run on the real sets in ../shared/data (skipped when absent)."""

import numpy as np

from cxr_oneclass.config import resolve
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.jobs.evaluate import evaluate_run
from cxr_oneclass.jobs.train import train_run


def test_manifests_load_with_their_splits(shared_data):
    for name, n_train in (("nih-pneumonia-128", 286), ("kermany-pediatric-128", 1241)):
        ds = load_dataset(f"csv:{shared_data / name / 'manifest.csv'}", 64, splits=("train",))
        assert ds["train"].n_normal == n_train and ds["train"].n_abnormal == 0


def test_short_run_on_nih_pneumonia(shared_data, tmp_path):
    spec = f"csv:{shared_data / 'nih-pneumonia-128' / 'manifest.csv'}"
    cfg = resolve("paper", epochs=1, width=16, num_threads=2)
    out = train_run(cfg, spec, tmp_path / "run", progress=False)
    assert out.calibration.n_val_normal == 79 and out.calibration.n_val_abnormal == 127
    m = evaluate_run(tmp_path / "run", spec, "test")
    assert m["n_normal"] == 135 and m["n_abnormal"] == 359
    assert 0.0 <= m["auc"] <= 1.0 and np.isfinite(m["auc"])
