"""DICOM results of a study: the Comprehensive SR and the heat-map Secondary Captures, read back with pydicom and
highdicom and validated with dciodvfy (when installed)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_oneclass.errors import CxrError
from cxr_oneclass.reporting.dicom_out import (
    RESEARCH_USE,
    SCHEME,
    ImageResult,
    ModelInfo,
    StudyResult,
    model_uid,
    write_heatmap_sc,
    write_study_sr,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PATIENT = "Müller^Jürgen"  # non-ASCII in the source's Latin-1: the outputs are UTF-8


def make_source(study_uid: str, series_uid: str, number: int, view: str) -> Dataset:
    """A CR image with the patient, study and series attributes a PACS export carries; 64x64 16-bit MONOCHROME2."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = "PID-0042"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = "20240105", "101500"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.StudyID = "S1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Modality = "CR"
    ds.Manufacturer = "ACME"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if number == 1 else ""  # the second image leaves it unknown
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).tobytes()
    return ds


def overlay(h: int, w: int) -> np.ndarray:
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgb[..., 2] = 128
    return rgb


MODEL = ModelInfo(
    name="cxr-oneclass best preset",
    version="0.1.0",
    uid=model_uid(hashlib.sha256(b"weights").hexdigest()),
    operating_point="threshold 0.62 = 95% sensitivity on validation abnormals",
    threshold=0.62,
)


@dataclass
class Written:
    images: list[ImageResult]
    study: StudyResult
    sr: Path
    scs: list[Path]
    sc_series: str
    out: Path


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    study_uid, series_uid = generate_uid(), generate_uid()
    src = [make_source(study_uid, series_uid, 1, "PA"), make_source(study_uid, series_uid, 2, "AP")]
    images = [
        ImageResult(src[0], 0.81, "abnormal", {"rec": 1.25, "sdist": 3.5}, overlay(48, 40)),
        ImageResult(src[1], 0.12, "normal", {"rec": -0.4, "sdist": 0.1}, overlay(32, 32)),
    ]
    study = StudyResult(study_uid, 0.81, "abnormal")
    out = tmp_path_factory.mktemp("dicom_out") / "results"  # not there yet: the writers create it
    sr = write_study_sr(study, images, MODEL, out)
    sc_series = generate_uid()
    scs = [write_heatmap_sc(im, MODEL, out, sc_series, i + 1) for i, im in enumerate(images)]
    return Written(images, study, sr, scs, sc_series, out)


def content_items(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out


def code_of(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return c.CodingSchemeDesignator, c.CodeValue


def num(item: Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def children(container: Dataset, code: tuple[str, str]) -> list[Dataset]:
    return [i for i in container.get("ContentSequence", []) if code_of(i) == code]


def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------------------------- tests


def test_model_uid_is_valid_and_stable():
    h = hashlib.sha256(b"weights").hexdigest()
    uid = model_uid(h)
    assert uid == model_uid(h.upper()) and uid != model_uid(hashlib.sha256(b"other").hexdigest())
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    with pytest.raises(ValueError):
        model_uid("not-a-hash")


def test_files_are_named_by_sop_instance_uid_and_written_atomically(written: Written):
    for path in [written.sr, *written.scs]:
        assert path.is_file() and path.parent == written.out
        assert path.name == f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm"
    assert sorted(p.name for p in written.out.iterdir()) == sorted(p.name for p in [written.sr, *written.scs])  # no temp files


def test_sr_in_the_source_study_with_scores_references_model_and_research_text(written: Written):
    ds = pydicom.dcmread(written.sr)
    src = written.images[0].dataset
    assert ds.SOPClassUID == COMPREHENSIVE_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == written.study.study_uid and ds.PatientID == src.PatientID
    assert str(ds.PatientName) == PATIENT and ds.AccessionNumber == src.AccessionNumber
    assert ds.SeriesInstanceUID not in {im.dataset.SeriesInstanceUID for im in written.images}
    assert RESEARCH_USE in ds.SeriesDescription and ds.ContentQualification == "RESEARCH"
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == SCHEME
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {im.dataset.SOPInstanceUID for im in written.images}

    items = content_items(ds)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert RESEARCH_USE in texts and MODEL.operating_point in texts and MODEL.name in texts and MODEL.version in texts
    assert [i.UID for i in items if code_of(i) == ("DCM", "121012")] == [MODEL.uid]  # Device Observer UID
    assert [num(i) for i in items if code_of(i) == ("DCM", "122411")] == [pytest.approx(MODEL.threshold)]

    (study,) = children(ds, (SCHEME, "STUDY-RESULT"))
    assert [num(i) for i in children(study, (SCHEME, "SCORE"))] == [pytest.approx(written.study.score)]
    assert [i.ConceptCodeSequence[0].CodeValue for i in children(study, (SCHEME, "FLAG"))] == ["263654008"]  # SCT Abnormal

    per_image = children(ds, (SCHEME, "IMAGE-RESULT"))
    assert len(per_image) == len(written.images)
    for container, im in zip(per_image, written.images):
        (ref,) = children(container, ("DCM", "121112"))
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == im.dataset.SOPInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == im.dataset.SOPClassUID
        assert [num(i) for i in children(container, (SCHEME, "SCORE"))] == [pytest.approx(im.score)]
        flag = children(container, (SCHEME, "FLAG"))[0].ConceptCodeSequence[0].CodeValue
        assert flag == {"abnormal": "263654008", "normal": "17621005"}[im.flag]
        for name, value in im.terms.items():
            assert [num(i) for i in children(container, (SCHEME, f"TERM-{name.upper()}"))] == [pytest.approx(value)]


def test_sr_reads_back_with_highdicom(written: Written):
    sr = hd.sr.srread(written.sr)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    refs = hd.sr.utils.find_content_items(sr.content[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs} == {im.dataset.SOPInstanceUID for im in written.images}
    assert {e[2] for e in sr.get_evidence()} == {im.dataset.SOPInstanceUID for im in written.images}


def test_heatmap_sc_is_rgb_of_the_overlay_and_references_its_source(written: Written):
    for path, im, n in zip(written.scs, written.images, (1, 2)):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SC_STORAGE
        assert ds.StudyInstanceUID == im.dataset.StudyInstanceUID and ds.PatientID == im.dataset.PatientID
        assert ds.SeriesInstanceUID == written.sc_series and ds.InstanceNumber == n
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.pixel_array.shape == im.heatmap_rgb.shape
        np.testing.assert_array_equal(ds.pixel_array, im.heatmap_rgb)
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == im.dataset.SOPInstanceUID and ref.ReferencedSOPClassUID == im.dataset.SOPClassUID
        assert RESEARCH_USE in ds.ImageComments and RESEARCH_USE in ds.DerivationDescription
        assert RESEARCH_USE in ds.SeriesDescription and ds.ContentQualification == "RESEARCH"
    assert list(pydicom.dcmread(written.scs[0]).PatientOrientation) == ["L", "F"]  # copied from the source
    assert not pydicom.dcmread(written.scs[1]).get("PatientOrientation")  # unknown in the source: left empty


def test_outputs_pass_dciodvfy(written: Written):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for path in [written.sr, *written.scs]:
        assert dciodvfy_errors(path) == [], path.name


def test_unscored_image_and_minimal_source(tmp_path: Path):
    """An image that failed: no score item, flag NOT-SCORED; a source without the optional Type 2 attributes."""
    ds = make_source(generate_uid(), generate_uid(), 1, "PA")
    for kw in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID", "PixelData"):
        delattr(ds, kw)
    im = ImageResult(ds, None, "error", {"rec": float("nan")}, None)
    path = write_study_sr(StudyResult(ds.StudyInstanceUID, None, "error"), [im], MODEL, tmp_path)
    sr = pydicom.dcmread(path)
    (container,) = children(sr, (SCHEME, "IMAGE-RESULT"))
    assert children(container, (SCHEME, "SCORE")) == [] and children(container, (SCHEME, "TERM-REC")) == []
    assert children(container, (SCHEME, "FLAG"))[0].ConceptCodeSequence[0].CodeValue == "NOT-SCORED"
    assert sr.PatientBirthDate == "" and sr.AccessionNumber == ""
    if shutil.which("dciodvfy") is not None:
        assert dciodvfy_errors(path) == []
    with pytest.raises(ValueError, match="no heat map"):
        write_heatmap_sc(im, MODEL, tmp_path, generate_uid(), 1)


def test_bad_input_is_refused(tmp_path: Path):
    a = make_source(generate_uid(), generate_uid(), 1, "PA")
    b = make_source(generate_uid(), generate_uid(), 2, "PA")  # another study
    ok = ImageResult(a, 0.5, "normal", {}, overlay(8, 8))
    with pytest.raises(CxrError, match="belongs to study"):
        write_study_sr(StudyResult(a.StudyInstanceUID, 0.5, "normal"), [ok, ImageResult(b, 0.5, "normal", {}, None)], MODEL, tmp_path)
    with pytest.raises(ValueError, match="flag"):
        write_study_sr(StudyResult(a.StudyInstanceUID, 0.5, "maybe"), [ok], MODEL, tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        write_heatmap_sc(ImageResult(a, 0.5, "normal", {}, np.zeros((8, 8), np.float32)), MODEL, tmp_path, generate_uid(), 1)
    with pytest.raises(ValueError, match="model UID"):
        write_study_sr(StudyResult(a.StudyInstanceUID, 0.5, "normal"), [ok], replace(MODEL, uid="sha-abc"), tmp_path)
    del a.SOPInstanceUID
    with pytest.raises(CxrError, match="SOPInstanceUID"):
        write_study_sr(StudyResult(a.StudyInstanceUID, 0.5, "normal"), [ok], MODEL, tmp_path)
    assert list(tmp_path.iterdir()) == []
