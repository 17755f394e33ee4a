import csv

import numpy as np
import pytest
from PIL import Image

from conftest import blob_images
from cxr_oneclass.data.specs import assign_splits, load_dataset
from cxr_oneclass.data.types import Record
from cxr_oneclass.errors import DataError


def _write_manifest(root, rows, header=("file", "label", "patient_id")):
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return root / "manifest.csv"


def test_folder_layout_with_splits(folder_dataset):
    ds = load_dataset(f"folder:{folder_dataset}", 32)
    assert ds["train"].n_normal == 24 and ds["train"].n_abnormal == 0
    assert ds["val"].n_normal == 6 and ds["val"].n_abnormal == 6
    assert ds["test"].images.shape == (12, 32, 32) and ds["test"].images.dtype == np.uint8


def test_csv_without_splits_is_split_by_patient(tmp_path):
    imgs = blob_images(40, 24, seed=0)
    rows = []
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", "abnormal" if i % 4 == 0 else "normal", f"p{i // 2}"))
    ds = load_dataset(f"csv:{_write_manifest(tmp_path, rows)}", 32, seed=3)
    assert ds["train"].n_abnormal == 0
    patients = {s: {n.split("/")[-1] for n in ds[s].names} for s in ds.splits}
    by_patient = {}
    for s, files in patients.items():
        for f in files:
            by_patient.setdefault(f"p{int(f.split('.')[0]) // 2}", set()).add(s)
    assert all(len(v) == 1 for v in by_patient.values())  # no patient spans two splits
    assert ds["val"].n_abnormal > 0 and ds["test"].n_abnormal > 0
    again = load_dataset(f"csv:{tmp_path / 'manifest.csv'}", 32, seed=3)
    assert again["test"].names == ds["test"].names


def test_16bit_and_colour_images_are_read(tmp_path):
    grey16 = (blob_images(1, 40, seed=1)[0].astype(np.uint16) * 257)
    Image.fromarray(grey16).save(tmp_path / "a.png")
    rgb = np.repeat(blob_images(1, 40, seed=1)[0][..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=95)
    ds = load_dataset(f"csv:{_write_manifest(tmp_path, [('a.png', 0, 'p1'), ('b.jpg', 0, 'p1')], ('file', 'label', 'patient_id'))}", 32)
    imgs = np.concatenate([s.images for s in ds.splits.values()])
    assert imgs.shape == (2, 32, 32)
    assert abs(int(imgs[0].astype(int).mean()) - int(imgs[1].astype(int).mean())) < 4


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"csv:{tmp_path / 'none.csv'}", 32)
    bad = _write_manifest(tmp_path, [("a.png", "maybe")], ("file", "label"))
    with pytest.raises(DataError, match="unknown label 'maybe'"):
        load_dataset(f"csv:{bad}", 32)
    nocol = _write_manifest(tmp_path, [("a.png",)], ("file",))
    with pytest.raises(DataError, match="missing column"):
        load_dataset(f"csv:{nocol}", 32)
    with pytest.raises(DataError, match="unknown data scheme"):
        load_dataset("zip:foo", 32)
    with pytest.raises(DataError, match="needs a scheme"):
        load_dataset("foo", 32)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'emptydir'}", 32)


def test_unreadable_files_are_skipped_and_reported(folder_dataset):
    (folder_dataset / "train" / "normal" / "broken.png").write_text("not an image")
    ds = load_dataset(f"folder:{folder_dataset}", 32)
    assert ds["train"].n_normal == 24
    assert len(ds.skipped) == 1 and "broken.png" in str(ds.skipped[0])


def test_assign_splits_keeps_abnormal_patients_out_of_train(tmp_path):
    recs = [Record(tmp_path / f"{i}", label=int(i % 3 == 0), patient=f"p{i}") for i in range(60)]
    assign_splits(recs, seed=0)
    assert all(r.split in ("val", "test") for r in recs if r.label == 1)
    assert sum(r.split == "train" for r in recs) > 20
