"""PACS exports: discovery by suffix and content, DICOMDIR file sets, views, skipping, studies, pseudonyms."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_oneclass.data.studies import (
    DEFAULT_VIEWS,
    KNOWN_VIEWS,
    ImageInfo,
    discover,
    group_studies,
    parse_views,
    pseudonymise,
    read_info,
    skip_reason,
    sniff_dicom,
    studies,
)
from cxr_oneclass.errors import ImageError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def make_ds(
    patient: str = "P1",
    study_uid: str | None = None,
    view_position: str | None = None,
    sop_class: str = DX_STORAGE,
    number: int = 1,
    **elements: object,
) -> Dataset:
    """A 16x16 DX/CR radiograph with the identifiers a DICOMDIR record needs; `elements` are set as given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.PatientName = f"Doe^{patient}"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", f"A{patient}"
    ds.SeriesNumber, ds.InstanceNumber = number, number
    ds.Modality = "DX" if sop_class == DX_STORAGE else "CR"
    if view_position is not None:
        ds.ViewPosition = view_position
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.arange(256, dtype=np.uint16).reshape(16, 16).tobytes()
    return ds


def write(ds: Dataset, path: Path, bare: bool = False) -> Path:
    """A Part 10 file (preamble, 'DICM', meta), or with `bare` the dataset alone, implicit VR, as old archives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:
        ds = ds.copy()
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_discover_finds_dicom_by_content_and_not_other_files(tmp_path: Path) -> None:
    root = tmp_path / "export"
    part10 = write(make_ds(), root / "IM00001")
    bare = write(make_ds(), root / "sub" / "1.2.3.4.5", bare=True)  # UID-named: its "suffix" is .5
    png = root / "sub" / "scan.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    (root / "notes").write_text("not an image\n")
    (root / "blob").write_bytes(np.random.default_rng(0).bytes(10_000))
    # Starts like a group 0008 element, then nonsense: a cheap check must not be fooled by two bytes.
    (root / "lookalike").write_bytes(b"\x08\x00\x05\x00" + bytes(range(256)) * 4)
    (root / "empty").write_bytes(b"")

    files, errors = discover([root])

    assert errors == []
    assert files == sorted([part10, bare, png])
    assert sniff_dicom(part10) == "part10" and sniff_dicom(bare) == "bare" and sniff_dicom(png) == ""
    info = read_info(bare)  # read with force=True, as it was accepted by content
    assert info.is_dicom and info.patient_id == "P1" and info.modality == "DX"


def test_discover_inputs_missing_direct_empty_and_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "export"
    a = write(make_ds(), root / "a.dcm")
    direct = tmp_path / "given.bin"  # given by name: taken as it is, whatever its suffix
    direct.write_bytes(b"anything")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")

    files, errors = discover([root, a, str(direct), tmp_path / "missing.dcm", empty, root])

    assert files == sorted([a, direct])
    assert [(Path(e.path).name, e.problem) for e in errors] == [
        ("missing.dcm", "file not found"),
        ("empty", "folder has no image or DICOM files"),
    ]


def test_dicomdir_lists_referenced_files_and_reports_missing_ones(tmp_path: Path) -> None:
    fs = FileSet()
    for i, patient in enumerate(("P1", "P1", "P2")):
        fs.add(make_ds(patient, view_position="PA", number=i + 1))
    cd = tmp_path / "cd"
    fs.write(cd)
    referenced = sorted(Path(instance.path) for instance in FileSet(cd / "DICOMDIR"))
    assert len(referenced) == 3

    files, errors = discover([cd])
    assert errors == [] and files == referenced  # the DICOMDIR itself is no image
    files, errors = discover([cd / "DICOMDIR"])  # a DICOMDIR given by name: its files
    assert errors == [] and files == referenced

    referenced[1].unlink()
    files, errors = discover([cd / "DICOMDIR"])
    assert files == [referenced[0], referenced[2]]
    assert len(errors) == 1 and errors[0].path == str(referenced[1])
    assert errors[0].problem == f"file not found (listed in {cd / 'DICOMDIR'})"


def test_dicomdir_file_ids_match_lower_cased_copies(tmp_path: Path) -> None:
    fs = FileSet()
    fs.add(make_ds())
    fs.write(tmp_path / "cd")
    copy = tmp_path / "copy"
    for src in sorted((tmp_path / "cd").rglob("*")):  # a CD copied by a tool that lower-cases names
        dst = copy / str(src.relative_to(tmp_path / "cd")).lower()
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    files, errors = discover([copy / "dicomdir"])
    assert errors == [] and len(files) == 1 and files[0].name == "im000000"


def test_two_studies_group_and_laterals_are_skipped(tmp_path: Path) -> None:
    paths = []
    for patient in ("P1", "P2"):
        uid = generate_uid()
        paths.append(write(make_ds(patient, uid, "PA", number=1), tmp_path / patient / "pa.dcm"))
        paths.append(write(make_ds(patient, uid, "LL", number=2), tmp_path / patient / "lat.dcm"))
    files, errors = discover([tmp_path])
    assert errors == [] and files == sorted(paths)
    infos = [read_info(p) for p in files]

    groups = group_studies(infos)
    assert len(groups) == 2 and all(len(images) == 2 for images in groups.values())
    assert all(key == images[0].study_uid for key, images in groups.items())
    assert [s.patient_id for s in studies(infos)] == ["P1", "P2"]

    reasons = {Path(i.path).name + "/" + i.patient_id: skip_reason(i, DEFAULT_VIEWS) for i in infos}
    assert reasons["pa.dcm/P1"] is None and reasons["pa.dcm/P2"] is None
    assert reasons["lat.dcm/P1"] == reasons["lat.dcm/P2"] == "view LATERAL (ViewPosition LL) is not one of PA, AP (--views)"
    assert all(skip_reason(i, parse_views("all")) is None for i in infos)


@pytest.mark.parametrize(
    ("elements", "view", "source"),
    [
        ({"ViewPosition": "AP"}, "AP", "ViewPosition AP"),
        ({"ViewPosition": "rl"}, "LATERAL", "ViewPosition rl"),
        ({"ViewPosition": "LLO"}, "OTHER", "ViewPosition LLO"),
        ({"ViewCodeSequence": [code_item("R-10214", "SRT", "postero-anterior")]}, "PA", "ViewCodeSequence SRT R-10214 (postero-anterior)"),
        ({"ViewCodeSequence": [code_item("399173006", "SCT", "left lateral")]}, "LATERAL", "ViewCodeSequence SCT 399173006 (left lateral)"),
        ({"ViewCodeSequence": [code_item("X-1", "99LOCAL", "Antero-posterior")]}, "AP", "ViewCodeSequence 99LOCAL X-1 (Antero-posterior)"),
        ({"SeriesDescription": "Chest LAT"}, "LATERAL", "SeriesDescription 'Chest LAT'"),
        ({"ProtocolName": "Thorax p.a."}, "PA", "ProtocolName 'Thorax p.a.'"),
        ({"ViewPosition": "XYZ", "SeriesDescription": "CHEST_AP_PORTABLE"}, "AP", "SeriesDescription 'CHEST_AP_PORTABLE'"),
        ({"SeriesDescription": "PA oblique"}, "OTHER", "SeriesDescription 'PA oblique'"),
        ({"SeriesDescription": "Chest PA and lateral"}, "", "unknown"),  # a two-view series: no safe choice
        ({}, "", "unknown"),
    ],
)
def test_view_sources(tmp_path: Path, elements: dict[str, object], view: str, source: str) -> None:
    info = read_info(write(make_ds(**elements), tmp_path / "x.dcm"))
    assert (info.view, info.view_source) == (view, source)


def test_unknown_view_is_scored_unless_strict_and_non_images_skipped(tmp_path: Path) -> None:
    unknown = read_info(write(make_ds(), tmp_path / "unknown.dcm"))
    assert unknown.view == "" and unknown.view_source == "unknown"
    assert skip_reason(unknown, DEFAULT_VIEWS) is None
    assert "view unknown" in (skip_reason(unknown, DEFAULT_VIEWS, strict=True) or "")

    sr = read_info(write(make_ds(sop_class=BASIC_TEXT_SR, view_position="PA"), tmp_path / "sr.dcm"))
    assert skip_reason(sr, set(KNOWN_VIEWS)) == "not an image (Basic Text SR Storage)"
    private = read_info(write(make_ds(sop_class="1.2.3.4.5", view_position="PA"), tmp_path / "private.dcm"))
    assert skip_reason(private, DEFAULT_VIEWS) is None


def test_non_dicom_files_and_broken_dicoms(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    info = read_info(png)
    assert info == ImageInfo(path=str(png))
    assert skip_reason(info, {"LATERAL"}, strict=True) is None  # no view information: always scored

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ImageError, match="not a DICOM file"):
        read_info(junk)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"garbage after the magic")
    with pytest.raises(ImageError, match="unreadable DICOM header"):
        read_info(garbage)
    with pytest.raises(ImageError, match="file not found"):
        read_info(tmp_path / "gone.png")


def test_images_without_study_uid_are_studies_of_their_own(tmp_path: Path) -> None:
    ds = make_ds()
    del ds.StudyInstanceUID
    infos = [read_info(write(ds, tmp_path / "no_uid.dcm")), ImageInfo(path="a.png"), ImageInfo(path="b.png")]
    assert list(group_studies(infos)) == [f"file:{tmp_path / 'no_uid.dcm'}", "file:a.png", "file:b.png"]


def test_parse_views() -> None:
    assert parse_views("PA,AP") == {"PA", "AP"} == DEFAULT_VIEWS
    assert parse_views(" pa , Lat ") == {"PA", "LATERAL"}
    assert parse_views("all") == parse_views("ALL") == set(KNOWN_VIEWS)
    with pytest.raises(ValueError, match="unknown view 'XY' in 'PA,xy'"):
        parse_views("PA,xy")
    with pytest.raises(ValueError, match="no view given"):
        parse_views(" , ")


def test_pseudonymise_is_stable_per_salt() -> None:
    a = pseudonymise("12345", "salt-a")
    assert a == pseudonymise("12345 ", "salt-a") and len(a) == 16 and int(a, 16) >= 0
    assert a != pseudonymise("12345", "salt-b")
    assert a != pseudonymise("12346", "salt-a")
    assert pseudonymise("", "salt-a") == ""
    with pytest.raises(ValueError, match="salt"):
        pseudonymise("12345", "")


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target = write(make_ds(), outside / "IM1")  # no suffix: found by content through the link
    root = tmp_path / "root"
    root.mkdir()
    try:
        os.symlink(outside, root / "link1", target_is_directory=True)
        os.symlink(outside, root / "link2", target_is_directory=True)
        os.symlink(root, root / "loop", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links not supported here")
    files, errors = discover([root])
    assert errors == []
    assert len(files) == 1 and files[0].name == "IM1" and files[0].parent.parent == root
    assert files[0].samefile(target)
