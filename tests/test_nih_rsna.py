"""`nih:` and `rsna:` sources on small trees laid out as the releases are, and the shared sized patient split."""

from __future__ import annotations

import csv
import gzip
import logging
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_oneclass.data import nih, rsna
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.splits import SplitSizes, fit_sizes, parse_source_arg, split_by_patient_with_sizes
from cxr_oneclass.data.types import Record
from cxr_oneclass.errors import DataError
from test_dicom import ramp, write_dicom, write_jpeg_dicom

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # as released: unquoted commas


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.setenv("CXR_ONECLASS_CACHE", "off")


def nih_rows(n_patients: int = 60) -> list[tuple[str, str, int, str, int]]:
    """(file, finding labels, patient, view, follow-up): 1-3 images per patient, about 40% abnormal."""
    findings = ["Cardiomegaly|Effusion", "Pneumonia", "Nodule", "Pleural_Thickening|Pneumonia", "Mass"]
    rows = []
    for p in range(1, n_patients + 1):
        for f in range(1 + p % 3):
            label = findings[(p + f) % len(findings)] if (p * 7 + f) % 5 < 2 else "No Finding"
            rows.append((f"{p:08d}_{f:03d}.png", label, p, "PA" if (p + f) % 3 else "AP", f))
    return rows


def unique_ramp(side: int, i: int) -> np.ndarray:
    """A ramp with a block whose place and brightness depend on i: every file differs, as real films do (the
    loader refuses identical pixels in two splits)."""
    img = ramp(side, side)
    r, c = divmod(i % 16, 4)
    img[4 * r + 2 : 4 * r + 5, 4 * c + 2 : 4 * c + 5] = 40 + 13 * (i // 16) % 200
    return img


def write_nih(root: Path, rows=None, label_name: str = "Data_Entry_2017.csv", gz: bool = False) -> Path:
    rows = nih_rows() if rows is None else rows
    lines = [NIH_HEADER]
    for i, (name, labels, pid, view, fu) in enumerate(rows):
        img = unique_ramp(20, i)
        lines.append(f"{name},{labels},{fu},{pid},{30 + pid % 50},{'MF'[pid % 2]},{view},2500,2048,0.168,0.168,")
        d = root / f"images_{1 + i * 3 // len(rows):03d}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / name)
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(root / (label_name + ".gz"), "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        (root / label_name).write_text(text)
    return root


def split_counts(records) -> dict[tuple[str, int], int]:
    return Counter((r.split, r.label) for r in records)


def assert_patient_disjoint(records) -> None:
    where: dict[str, set[str]] = {}
    for r in records:
        where.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in where.values())


# ------------------------------------------------------------------------------------ shared sized split

def _records(n_normal_patients: int, n_abnormal: int, per_patient: int = 1) -> list[Record]:
    recs = []
    for p in range(n_normal_patients):
        recs += [Record(Path(f"n{p}_{i}.png"), 0, patient=f"n{p}") for i in range(per_patient)]
    recs += [Record(Path(f"a{i}.png"), 1, patient=f"a{i}") for i in range(n_abnormal)]
    return recs


def test_paper_sizes_exact_when_enough_images():
    chosen = split_by_patient_with_sizes(_records(7000, 2000), nih.PAPER_SIZES, seed=1)
    c = split_counts(chosen)
    assert c == {("train", 0): 4479, ("val", 0): 849, ("val", 1): 857, ("test", 0): 677, ("test", 1): 667}


def test_sizes_scale_down_by_one_factor():
    sizes = fit_sizes(nih.PAPER_SIZES, 600, 100)  # abnormal is the scarce class: f = 100 / 1524
    assert sizes.val_abnormal + sizes.test_abnormal == 100
    assert sizes.train == round(4479 * 100 / 1524) and sizes.normal <= 600
    chosen = split_by_patient_with_sizes(_records(600, 100), nih.PAPER_SIZES, seed=0)
    c = split_counts(chosen)
    assert (c[("train", 0)], c[("val", 0)], c[("val", 1)], c[("test", 0)], c[("test", 1)]) == (
        sizes.train, sizes.val_normal, sizes.val_abnormal, sizes.test_normal, sizes.test_abnormal)


def test_split_is_seeded_patient_disjoint_and_order_free():
    recs = _records(300, 60, per_patient=3)
    sizes = SplitSizes(200, 40, 30, 40, 30)
    a = split_by_patient_with_sizes([Record(r.path, r.label, patient=r.patient) for r in recs], sizes, seed=5)
    b = split_by_patient_with_sizes([Record(r.path, r.label, patient=r.patient) for r in reversed(recs)], sizes, seed=5)
    c = split_by_patient_with_sizes([Record(r.path, r.label, patient=r.patient) for r in recs], sizes, seed=6)
    assert [(str(r.path), r.split) for r in a] == [(str(r.path), r.split) for r in b]
    assert [(str(r.path), r.split) for r in a] != [(str(r.path), r.split) for r in c]
    assert_patient_disjoint(a)
    assert split_counts(a) == {("train", 0): 200, ("val", 0): 40, ("val", 1): 30, ("test", 0): 40, ("test", 1): 30}


def test_option_syntax_errors():
    assert parse_source_arg("/d/nih?findings=A+B&views=PA", "nih", nih.OPTIONS) == (
        Path("/d/nih"), {"findings": "A+B", "views": "PA"})
    with pytest.raises(DataError, match="unknown option 'finding'; known options: findings, views"):
        parse_source_arg("/d?finding=Mass", "nih", nih.OPTIONS)
    with pytest.raises(DataError, match="needs a value"):
        parse_source_arg("/d?views", "nih", nih.OPTIONS)


# ------------------------------------------------------------------------------------ NIH

def test_nih_labels_extras_and_spread_folders(tmp_path):
    root = write_nih(tmp_path / "nih")
    recs = nih.nih_records(str(root), seed=0)
    assert {r.path.parent.parent.name for r in recs} >= {"images_001", "images_002"}
    for r in recs:
        assert r.label == (0 if r.extras["finding_labels"] == "No Finding" else 1)
        assert r.extras["view"] in ("PA", "AP") and r.extras["sex"] in ("M", "F") and r.extras["age"].isdigit()
        assert r.patient == str(int(r.path.name[:8]))
    assert all(r.label == 0 for r in recs if r.split == "train")
    assert_patient_disjoint(recs)
    # scaled paper sizes: the abnormal images present bound the common factor
    rows = nih_rows()
    n1 = sum(lab != "No Finding" for _, lab, *_ in rows)
    want = fit_sizes(nih.PAPER_SIZES, len(rows) - n1, n1)
    got = split_counts(recs)
    assert got[("val", 1)] + got[("test", 1)] == want.abnormal
    assert abs(got[("train", 0)] - want.train) <= 3  # multi-image patients may leave a few short
    assert abs(got[("val", 0)] - want.val_normal) <= 2 and abs(got[("test", 0)] - want.test_normal) <= 2


def test_nih_seed_fixes_split(tmp_path):
    root = write_nih(tmp_path / "nih")
    a = [(r.path.name, r.split) for r in nih.nih_records(str(root), seed=3)]
    assert a == [(r.path.name, r.split) for r in nih.nih_records(str(root), seed=3)]
    assert a != [(r.path.name, r.split) for r in nih.nih_records(str(root), seed=4)]


def test_nih_findings_and_views_options(tmp_path):
    root = write_nih(tmp_path / "nih")
    recs = nih.nih_records(f"{root}?findings=pneumonia+Pleural_Thickening&views=pa", seed=0)
    assert recs and all(r.extras["view"] == "PA" for r in recs)
    abn = [r for r in recs if r.label == 1]
    assert abn and all(set(r.extras["finding_labels"].split("|")) & {"Pneumonia", "Pleural_Thickening"} for r in abn)
    with pytest.raises(DataError, match="unknown finding 'Pneumonitis'; known: Atelectasis"):
        nih.nih_records(f"{root}?findings=Pneumonitis", seed=0)
    with pytest.raises(DataError, match="unknown view 'LL'; known: PA, AP"):
        nih.nih_records(f"{root}?views=LL", seed=0)
    with pytest.raises(DataError, match="val= takes NORMAL\\+ABNORMAL"):
        nih.nih_records(f"{root}?val=10", seed=0)
    small = nih.nih_records(f"{root}?train=10&val=3+4&test=2+3", seed=0)
    assert split_counts(small) == {("train", 0): 10, ("val", 0): 3, ("val", 1): 4, ("test", 0): 2, ("test", 1): 3}


def test_nih_missing_and_unlisted_images_are_counted(tmp_path, caplog):
    root = write_nih(tmp_path / "nih")
    for name in ("00000001_000.png", "00000002_000.png", "00000002_001.png"):
        next(root.rglob(name)).unlink()
    Image.fromarray(ramp(20, 20)).save(root / "images_001" / "images" / "99999999_000.png")
    with caplog.at_level(logging.INFO, logger="cxr_oneclass"):
        recs = nih.nih_records(str(root), seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of" in warnings[0] and "missing" in warnings[0]
    assert any("1 PNGs not in Data_Entry_2017.csv ignored" in r.getMessage() for r in caplog.records)
    assert not {"00000001_000.png", "99999999_000.png"} & {r.path.name for r in recs}


@pytest.mark.parametrize("name,gz", [("Data_Entry_2017.csv", True), ("Data_Entry_2017_v2020.csv", False)])
def test_nih_label_file_variants_and_path_to_file(tmp_path, name, gz):
    root = write_nih(tmp_path / "nih", label_name=name, gz=gz)
    recs = nih.nih_records(str(root), seed=0)
    label_file = root / (name + (".gz" if gz else ""))
    assert [r.path for r in nih.nih_records(str(label_file), seed=0)] == [r.path for r in recs]


def test_nih_label_file_errors(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    with pytest.raises(DataError, match="none of data_entry_2017_v2020.csv.*found at or below"):
        nih.nih_records(str(root), seed=0)
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,View Position\n00000001_000.png,Mass,PA\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: missing column\(s\) 'Patient ID'"):
        nih.nih_records(str(root), seed=0)
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n00000002_000.png,Cardiomegaly|Lung Cancer,2\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv line 3: unknown finding 'Lung Cancer'"):
        nih.nih_records(str(root), seed=0)
    with pytest.raises(DataError, match="nih: .* not found"):
        nih.nih_records(str(tmp_path / "nowhere"), seed=0)


def test_load_dataset_nih_end_to_end(tmp_path):
    root = write_nih(tmp_path / "nih")
    ds = load_dataset(f"nih:{root}", 16, seed=2)
    assert set(ds.splits) == {"train", "val", "test"} and ds["train"].n_abnormal == 0
    assert ds["val"].images.shape[1:] == (16, 16) and ds["val"].n_abnormal > 0
    assert set(ds["test"].meta) == {"finding_labels", "view", "age", "sex"}
    again = load_dataset(f"nih:{root}", 16, seed=2)
    assert again["test"].names == ds["test"].names


# ------------------------------------------------------------------------------------ RSNA

def write_rsna(root: Path, n_normal: int = 24, n_opacity: int = 20, n_other: int = 10) -> dict[str, str]:
    """The stage-2 layout; returns patientId -> class. Opacity patients get 1-2 boxes (rows)."""
    rng = np.random.default_rng(0)
    classes = {}
    for cls, n in ((rsna.NORMAL, n_normal), (rsna.OPACITY, n_opacity), (rsna.NOT_NORMAL, n_other)):
        for _ in range(n):
            classes[str(uuid.UUID(int=int(rng.integers(2**62)) << 60 | int(rng.integers(2**60))))] = cls
    img_dir = root / "stage_2_train_images"
    img_dir.mkdir(parents=True)
    with open(root / "stage_2_train_labels.csv", "w", newline="") as lf, \
            open(root / "stage_2_detailed_class_info.csv", "w", newline="") as cf:
        lw, cw = csv.writer(lf), csv.writer(cf)
        lw.writerow(["patientId", "x", "y", "width", "height", "Target"])
        cw.writerow(["patientId", "class"])
        for i, (pid, cls) in enumerate(classes.items()):
            boxes = 1 + i % 2 if cls == rsna.OPACITY else 0
            for b in range(max(boxes, 1)):
                lw.writerow([pid, *([264.0 + b, 152.0, 213.0, 379.0] if boxes else ["", "", "", ""]), int(boxes > 0)])
                cw.writerow([pid, cls])
            if i % 2:
                write_jpeg_dicom(img_dir / f"{pid}.dcm", unique_ramp(24, i), patient_id=pid)
            else:
                write_dicom(img_dir / f"{pid}.dcm", unique_ramp(24, i), patient_id=pid)
    write_dicom(root / "stage_2_test_images" / f"{uuid.UUID(int=7)}.dcm", ramp(24, 24))
    return classes


def test_rsna_labels_boxes_and_sizes(tmp_path):
    classes = write_rsna(tmp_path / "rsna")
    recs = rsna.rsna_records(str(tmp_path / "rsna"), seed=0)
    assert all(r.label == {rsna.NORMAL: 0, rsna.OPACITY: 1}[classes[r.patient]] for r in recs)
    assert all(r.extras["class"] == classes[r.patient] for r in recs)
    assert {r.extras["boxes"] for r in recs if r.label == 1} == {"1", "2"}
    assert all(r.label == 0 for r in recs if r.split == "train")
    want = fit_sizes(rsna.PAPER_SIZES, 24, 20)
    assert split_counts(recs) == {("train", 0): want.train, ("val", 0): want.val_normal, ("val", 1): want.val_abnormal,
                                  ("test", 0): want.test_normal, ("test", 1): want.test_abnormal}

    with_other = rsna.rsna_records(f"{tmp_path / 'rsna'}?not_normal=abnormal", seed=0)
    assert any(r.extras["class"] == rsna.NOT_NORMAL and r.label == 1 for r in with_other)
    want = fit_sizes(rsna.PAPER_SIZES, 24, 30)
    assert sum(r.label for r in with_other) == want.abnormal
    with pytest.raises(DataError, match="not_normal= takes exclude or abnormal"):
        rsna.rsna_records(f"{tmp_path / 'rsna'}?not_normal=normal", seed=0)


def test_rsna_missing_dicoms_counted_and_end_to_end(tmp_path, caplog):
    classes = write_rsna(tmp_path / "rsna")
    gone = [pid for pid, c in classes.items() if c == rsna.NORMAL][:2]
    for pid in gone:
        (tmp_path / "rsna" / "stage_2_train_images" / f"{pid}.dcm").unlink()
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(f"rsna:{tmp_path / 'rsna'}", 16, seed=1)
    msgs = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(msgs) == 1 and f"2 of {len(classes)}" in msgs[0]
    assert not ds.skipped and ds["train"].n_abnormal == 0 and ds["test"].n_abnormal > 0
    assert ds["val"].images.shape[1:] == (16, 16) and ds["val"].images.max() > 200  # DICOMs decoded
    assert not any(gone_pid in n for n in ds["train"].names for gone_pid in gone)


def test_rsna_label_file_errors(tmp_path):
    root = tmp_path / "rsna"
    write_rsna(root, 3, 3, 0)
    text = (root / "stage_2_detailed_class_info.csv").read_text().splitlines()
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(text[:3] + [text[3].rsplit(",", 1)[0] + ",Pneumonia"]) + "\n")
    with pytest.raises(DataError, match=r"stage_2_detailed_class_info\.csv line 4: unknown class 'Pneumonia'"):
        rsna.rsna_records(str(root), seed=0)
    (root / "stage_2_detailed_class_info.csv").write_text("patientId,label\nabc,Normal\n")
    with pytest.raises(DataError, match=r"stage_2_detailed_class_info\.csv: missing column\(s\) 'class'"):
        rsna.rsna_records(str(root), seed=0)
    (root / "stage_2_detailed_class_info.csv").unlink()
    with pytest.raises(DataError, match="none of stage_2_detailed_class_info.csv"):
        rsna.rsna_records(str(root), seed=0)
