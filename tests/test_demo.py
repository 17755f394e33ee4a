import json

from PIL import Image

from cxr_oneclass.data.phantom import ABNORMALITIES, PhantomOptions
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.jobs.demo import run_demo


def test_phantom_spec_loads_as_data_source():
    ds = load_dataset("phantom:n_train=20,n_val_normal=5,n_val_abnormal=5,n_test_normal=5,n_test_abnormal=10", 32, seed=1)
    assert ds["train"].images.shape == (20, 32, 32) and ds["train"].n_abnormal == 0
    assert ds["test"].n_abnormal == 10 and set(ds["test"].meta["kind"]) == {"normal", *ABNORMALITIES}
    again = load_dataset("phantom:n_train=20,n_val_normal=5,n_val_abnormal=5,n_test_normal=5,n_test_abnormal=10", 32, seed=1)
    assert (again["test"].images == ds["test"].images).all()


def test_demo_writes_its_report(tmp_path):
    small = PhantomOptions(n_train=32, n_val_normal=10, n_val_abnormal=10, n_test_normal=10, n_test_abnormal=10, size=32)
    summary = run_demo(tmp_path / "demo", epochs=1, data=small, progress=False, width=8, batch_size=16, detector_width=4,
                       detector_steps=8)
    assert "test AUC" in summary and str(tmp_path / "demo") in summary
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(m["auc_by_type"]) == set(ABNORMALITIES)
    assert 0 <= m["auc"] <= 1 and m["n_normal"] == 10 and m["n_abnormal"] == 10
    for name in ("roc.png", "examples.png"):
        with Image.open(tmp_path / "demo" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 300
    assert (tmp_path / "demo" / "run" / "model.safetensors").is_file()
