"""A PACS export end to end, through the CLI: DICOM files without extensions and a DICOMDIR, two studies with a PA
and a lateral each; per-image and per-study results keyed by the DICOM identifiers, laterals skipped with the
reason, DICOM results (SR + SC) that dciodvfy accepts without errors and that read back."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from conftest import blob_images, write_dx
from cxr_oneclass.cli import main


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_run):
    """A trained tiny run, and a PACS export: study A as loose files without extensions, study B through a DICOMDIR."""
    root = tmp_path_factory.mktemp("pacs")
    run = tiny_run
    images = blob_images(4, 64, seed=3)
    studies = {}
    for k, (patient, accession) in enumerate((("PAT-A", "ACC1"), ("PAT-B", "ACC2"))):
        uid = generate_uid()
        studies[patient] = uid
        folder = root / ("loose" if k == 0 else "cd")
        for j, view in enumerate(("PA", "LL")):
            write_dx(folder / f"S{k}" / f"IM{j}", uid, view, patient, accession, pixels=images[2 * k + j])
    fs = FileSet()
    for f in sorted((root / "cd").rglob("IM*")):
        fs.add(pydicom.dcmread(f))
    fs.write(root / "cdset")
    shutil.rmtree(root / "cd")
    return root, run, studies


def test_a_pacs_export_scores_by_study_with_dicom_results(export, tmp_path, capsys):
    root, run, studies = export
    out = tmp_path / "out"
    argv = ["score", str(run), str(root / "loose"), str(root / "cdset" / "DICOMDIR"), "--csv", str(out / "images.csv"),
            "--studies-csv", str(out / "studies.csv"), "--json", str(out / "results.json"), "--dicom-out", str(out / "dicom"),
            "--pseudonymise", "secret"]
    assert main(argv) == 0
    images = list(csv.DictReader(open(out / "images.csv")))
    assert len(images) == 4  # files without extensions found by content, and through the DICOMDIR
    laterals = [r for r in images if r["view"] == "LATERAL"]
    frontals = [r for r in images if r["view"] == "PA"]
    assert len(laterals) == 2 and all(r["flag"] == "skipped" and "not one of PA, AP" in r["error"] for r in laterals)
    assert len(frontals) == 2 and all(r["flag"] in ("normal", "abnormal") and r["sop_uid"] and r["series_uid"] for r in frontals)
    assert {r["study_uid"] for r in images} == set(studies.values()) and {r["accession"] for r in images} == {"ACC1", "ACC2"}
    assert not {"PAT-A", "PAT-B"} & {r["patient_id"] for r in images}  # pseudonymised
    assert all(r["normal_percentile"] != "" for r in frontals)
    study_rows = list(csv.DictReader(open(out / "studies.csv")))
    assert len(study_rows) == 2
    for row in study_rows:
        frontal = next(r for r in frontals if r["study_uid"] == row["study_uid"])
        assert (row["n_images"], row["n_scored"], row["n_skipped"]) == ("2", "1", "1")
        assert row["score"] == frontal["score"] and row["flag"] == frontal["flag"] and row["top_image"] == frontal["file"]
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["images"]) == 4 and len(doc["studies"]) == 2 and doc["model"]["threshold"] is not None
    # DICOM results: per study one SR, and one SC per scored image, in that study
    for patient, uid in studies.items():
        objects = [pydicom.dcmread(f) for f in sorted((out / "dicom" / uid).glob("*.dcm"))]
        assert sorted(o.SOPClassUID.name for o in objects) == ["Comprehensive SR Storage", "Secondary Capture Image Storage"]
        frontal = next(r for r in frontals if r["study_uid"] == uid)
        for o in objects:  # in the study, with the real patient (DICOM results go back to the PACS, not out of it)
            assert o.StudyInstanceUID == uid and o.PatientID == patient and "Not for diagnostic use" in o.SeriesDescription
        sr = next(o for o in objects if o.Modality == "SR")
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert {item.ReferencedSOPInstanceUID for item in evidence} == {frontal["sop_uid"]}  # the scored image, not the lateral
        numbers = [float(v.MeasuredValueSequence[0].NumericValue) for v in _items(sr) if "MeasuredValueSequence" in v]
        assert any(abs(n - float(frontal["score"])) < 1e-4 for n in numbers)  # the study's (and the image's) score
        sc = next(o for o in objects if o.Modality != "SR")
        assert sc.SamplesPerPixel == 3 and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal["sop_uid"]
        if shutil.which("dciodvfy") is None:
            pytest.skip("dciodvfy (dicom3tools) not installed")
        for f in (out / "dicom" / uid).glob("*.dcm"):
            result = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
            errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
            assert not errors, (f, errors)


def _items(ds):
    """Every content item of an SR, depth first."""
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def test_views_flag_and_unknown_views(export, tmp_path, capsys):
    root, run, _ = export
    assert main(["score", str(run), str(root / "loose"), "--views", "all"]) == 0
    rows = list(csv.DictReader(__import__("io").StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 and all(r["flag"] in ("normal", "abnormal") for r in rows)
    assert main(["score", str(run), str(root / "loose"), "--views", "sideways"]) == 2
    assert "sideways" in capsys.readouterr().err
