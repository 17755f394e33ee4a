"""Results of scoring one study, written back as DICOM objects to be stored in that study (research use only).

- `write_study_sr`: one Comprehensive SR document (no template: TID 1500 would force measurement groups, tracking
  identifiers and a report title that do not fit a study-level anomaly flag) with the study's score and flag, each
  image's score, flag and score terms with a reference to its SOP instance, the operating point and threshold, the
  model (observer context and algorithm identification) and the research-use statement.
- `write_heatmap_sc`: one RGB Secondary Capture of an image's heat-map overlay, referencing its source image.

Both go to the source study (patient and study attributes copied from the source datasets), each in a new series,
as `<SOPInstanceUID>.dcm`, written atomically, and carry Content Qualification RESEARCH.

Content tree of the SR (relationship, value type, concept name):

    CONTAINER (99CXR1C, REPORT, "Chest X-ray anomaly report")
      HAS CONCEPT MOD CODE (DCM 121049 Language of Content Item and Descendants) = (RFC5646 en-US)
      HAS OBS CONTEXT  CODE (DCM 121005 Observer Type) = (DCM 121007 Device)
      HAS OBS CONTEXT  UIDREF (DCM 121012 Device Observer UID) = model UID, + TEXT name (121013), manufacturer (121014)
      CONTAINS TEXT (99CXR1C RUO) = "For research use only. Not for diagnostic use."
      CONTAINS CONTAINER (99CXR1C ALGORITHM)
        HAS CONCEPT MOD TEXT (DCM 111001 Algorithm Name), TEXT (DCM 111003 Algorithm Version)   [TID 4019]
        CONTAINS TEXT (DCM 111081 CAD Operating Point Description), NUM (DCM 122411 Threshold Value)
      CONTAINS CONTAINER (99CXR1C STUDY-RESULT)
        CONTAINS NUM (99CXR1C SCORE) [absent when not scored], CODE (99CXR1C FLAG)
      CONTAINS CONTAINER (99CXR1C IMAGE-RESULT), one per image
        CONTAINS IMAGE (DCM 121112 Source of Measurement) = the image's SOP Class/Instance UID
        CONTAINS NUM (99CXR1C SCORE) [absent when not scored], CODE (99CXR1C FLAG), NUM (99CXR1C TERM-<NAME>) ...

Private codes, coding scheme designator 99CXR1C (declared in the Coding Scheme Identification Sequence):

    REPORT        Chest X-ray anomaly report          document title (a research CAD output, not a diagnostic report)
    ALGORITHM     Algorithm and operating point        container
    STUDY-RESULT  Study anomaly result                 container
    IMAGE-RESULT  Image anomaly result                 container
    SCORE         Anomaly score                        NUM, calibrated, higher = more abnormal, unit UCUM "1"
    FLAG          Anomaly flag at operating point      CODE: SCT 263654008 Abnormal | SCT 17621005 Normal | NOT-SCORED
    NOT-SCORED    Not scored (error)                   value of FLAG when the image or study could not be scored
    RUO           Research use statement               TEXT
    TERM-<NAME>   Score term <name>                    NUM, one per score term (e.g. TERM-REC), unit UCUM "1"

A missing score is left out rather than written as a NUM with an empty value: highdicom cannot read the latter back.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem  # not re-exported at the top level
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from .._version import __version__
from ..errors import CxrError
from ..io_utils import atomic_path

log = logging.getLogger(__name__)

RESEARCH_USE = "For research use only. Not for diagnostic use."
MANUFACTURER = "cxr-oneclass"
SCHEME = "99CXR1C"
SR_SERIES_NUMBER = 9901  # high, so that the results sort after the acquired series in a viewer
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = f"AI scores - {RESEARCH_USE}"  # LO: at most 64 characters
SC_SERIES_DESCRIPTION = f"Heat map - {RESEARCH_USE}"
# UTF-8 always: model names and operating-point text may be non-ASCII, and pydicom re-encodes the copied patient
# attributes (decoded with the source's character set) on write.
CHARSET = "ISO_IR 192"
FLAGS = ("abnormal", "normal", "error")


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


CODE_REPORT = _private("REPORT", "Chest X-ray anomaly report")
CODE_ALGORITHM = _private("ALGORITHM", "Algorithm and operating point")
CODE_STUDY_RESULT = _private("STUDY-RESULT", "Study anomaly result")
CODE_IMAGE_RESULT = _private("IMAGE-RESULT", "Image anomaly result")
CODE_SCORE = _private("SCORE", "Anomaly score")
CODE_FLAG = _private("FLAG", "Anomaly flag at operating point")
CODE_NOT_SCORED = _private("NOT-SCORED", "Not scored (error)")
CODE_RUO = _private("RUO", "Research use statement")
CODE_OPERATING_POINT = hd.sr.CodedConcept("111081", "DCM", "CAD Operating Point Description")
CODE_THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
CODE_SOURCE = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")
UNIT_NONE = hd.sr.CodedConcept("1", "UCUM", "no units")
FLAG_VALUES = {
    "abnormal": hd.sr.CodedConcept("263654008", "SCT", "Abnormal"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
    "error": CODE_NOT_SCORED,
}


def term_code(name: str) -> hd.sr.CodedConcept:
    """The private code of a score term: TERM-<NAME> (highdicom switches to Long Code Value past 16 characters)."""
    return _private(f"TERM-{name.upper()}", f"Score term {name}")


# Type 2 patient and study attributes that highdicom copies from the source: a missing one is written empty.
_TYPE2_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "StudyID")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass
class ModelInfo:
    """The trained model that produced the results."""

    name: str  # e.g. "cxr-oneclass best preset"
    version: str  # package version
    uid: str  # identifies the trained model: `model_uid(sha256 of the weights)`
    operating_point: str  # human text, e.g. "threshold 0.62 = 95% sensitivity on validation abnormals"
    threshold: float


@dataclass
class ImageResult:
    """One scored (or failed) image of the study."""

    dataset: Dataset  # the source image's dataset (the header is enough; pixel data may be absent)
    score: float | None  # calibrated score; None when not scored
    flag: str  # "abnormal" | "normal" | "error"
    terms: dict[str, float] = field(default_factory=dict)
    heatmap_rgb: np.ndarray | None = None  # (H, W, 3) uint8 overlay of the heat map on the image, any size


@dataclass
class StudyResult:
    """The study's result (the caller takes the max over its images)."""

    study_uid: str
    score: float | None
    flag: str


def model_uid(sha256_hex: str) -> str:
    """A UID for a trained model, stable for its weights: 2.25.<name-based UUID (RFC 4122 v5) of the sha256>."""
    h = sha256_hex.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    # v5 rather than the raw hash bits, so that the 2.25 UID holds a well-formed UUID as ISO/IEC 9834-8 asks.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'urn:cxr-oneclass:weights:sha256:{h}').int}"


# ----------------------------------------------------------------------------------------------- helpers


def _check_flag(flag: str, what: str) -> None:
    if flag not in FLAGS:
        raise ValueError(f"{what}: flag {flag!r} is not one of {', '.join(FLAGS)}")


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _check_model(model: ModelInfo) -> None:
    if not pydicom.uid.UID(model.uid).is_valid:
        raise ValueError(f"model UID {model.uid!r} is not a valid DICOM UID (make it with model_uid)")
    if not math.isfinite(float(model.threshold)):
        raise ValueError(f"model threshold {model.threshold!r} is not a finite number")


def _version(model: ModelInfo) -> str:
    return model.version or __version__  # text items and LO attributes may not be empty


def _header(ds: Dataset, what: str) -> Dataset:
    """A header-only copy of a source dataset, with missing Type 2 patient/study attributes empty (highdicom reads
    them as attributes). The source itself is left as it is."""
    missing = [k for k in _REQUIRED_UIDS if not ds.get(k)]
    if missing:
        raise CxrError(f"{what}: the source DICOM dataset lacks {', '.join(missing)}; cannot write results into its study")
    hdr = Dataset()
    for elem in ds:  # iterating converts raw elements with the source's character set
        if elem.tag.group < 0x7FE0:  # pixel data can be large and is not needed
            hdr.add(elem)
    for kw in _TYPE2_STUDY:
        if kw not in hdr:
            setattr(hdr, kw, "")
    return hdr


def _short(text: str, limit: int = 64) -> str:
    """Text cut to a VR's length (LO 64), for header attributes; the full text goes into the content tree."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _save(ds: Dataset, out_dir: Path) -> Path:
    """Write ds as out_dir/<SOPInstanceUID>.dcm through a temp file in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{ds.SOPInstanceUID}.dcm"
    with atomic_path(target) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.info("wrote %s %s", ds.SOPClassUID.name, target)
    return target


def _result_items(score: float | None, flag: str, terms: dict[str, float] | None = None) -> list[hd.sr.ContentItem]:
    rel = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = []
    score = _finite(score)
    if score is not None:
        items.append(hd.sr.NumContentItem(CODE_SCORE, score, UNIT_NONE, relationship_type=rel))
    items.append(hd.sr.CodeContentItem(CODE_FLAG, FLAG_VALUES[flag], relationship_type=rel))
    for name, value in (terms or {}).items():
        v = _finite(value)
        if v is None:  # DS cannot hold NaN/inf; a term that failed is simply not reported
            log.debug("score term %s is not finite (%s): left out of the SR", name, value)
            continue
        items.append(hd.sr.NumContentItem(term_code(name), v, UNIT_NONE, relationship_type=rel))
    return items


def _container(name: hd.sr.CodedConcept, items: list[hd.sr.ContentItem], rel: str | None = "CONTAINS") -> hd.sr.ContainerContentItem:
    # SEPARATE: the items are distinct results, not one running text
    c = hd.sr.ContainerContentItem(name=name, is_content_continuous=False, relationship_type=rel)
    c.ContentSequence = hd.sr.ContentSequence(items)
    return c


def _coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [CodingSchemeIdentificationItem(
        designator=SCHEME, name="cxr-oneclass private codes", responsible_organization="cxr-oneclass project")]


# ----------------------------------------------------------------------------------------------- writers


def write_study_sr(study: StudyResult, images: list[ImageResult], model: ModelInfo, out_dir: Path) -> Path:
    """Write the study's Comprehensive SR (new series of the study) to out_dir/<SOPInstanceUID>.dcm; return the path."""
    if not images:
        raise ValueError("write_study_sr: no images; the SR takes patient and study from its source images")
    _check_flag(study.flag, "study")
    _check_model(model)
    headers = [_header(im.dataset, f"image {i + 1}") for i, im in enumerate(images)]
    for i, (im, hdr) in enumerate(zip(images, headers)):
        _check_flag(im.flag, f"image {hdr.SOPInstanceUID}")
        if hdr.StudyInstanceUID != study.study_uid:
            raise CxrError(f"image {i + 1} ({hdr.SOPInstanceUID}) belongs to study {hdr.StudyInstanceUID}, "
                           f"not to {study.study_uid}; an SR describes one study")
    rel = hd.sr.RelationshipTypeValues
    algorithm = _container(CODE_ALGORITHM, [
        *hd.sr.AlgorithmIdentification(name=model.name, version=_version(model)),
        hd.sr.TextContentItem(CODE_OPERATING_POINT, model.operating_point, relationship_type=rel.CONTAINS),
        hd.sr.NumContentItem(CODE_THRESHOLD, float(model.threshold), UNIT_NONE, relationship_type=rel.CONTAINS),
    ])
    per_image = [
        _container(CODE_IMAGE_RESULT, [
            hd.sr.ImageContentItem(CODE_SOURCE, hdr.SOPClassUID, hdr.SOPInstanceUID, relationship_type=rel.CONTAINS),
            *_result_items(im.score, im.flag, im.terms),
        ])
        for im, hdr in zip(images, headers)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.uid, name=model.name, manufacturer_name=MANUFACTURER),
    )
    root = _container(CODE_REPORT, [
        *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")),
        *observer,
        hd.sr.TextContentItem(CODE_RUO, RESEARCH_USE, relationship_type=rel.CONTAINS),
        algorithm,
        _container(CODE_STUDY_RESULT, _result_items(study.score, study.flag)),
        *per_image,
    ], rel=None)
    sr = hd.sr.ComprehensiveSR(
        evidence=headers,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # PRELIMINARY: a research output nobody has verified
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=_short(model.name),
        software_versions=_short(_version(model)),
        content_qualification="RESEARCH",
        coding_schemes=_coding_schemes(),
        specific_character_set=CHARSET,
    )
    return _save(sr, out_dir)


def _patient_orientation(src: Dataset) -> tuple[tuple[str, str], bool]:
    """The source's Patient Orientation if it has two values; else a placeholder (highdicom demands one) and False,
    so that the caller empties it (Type 2: unknown) rather than claim an orientation nobody measured."""
    po = src.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2 and all(po):
        return (str(po[0]), str(po[1])), True
    return ("L", "F"), False


def write_heatmap_sc(image: ImageResult, model: ModelInfo, out_dir: Path, series_uid: str, instance_number: int) -> Path:
    """Write image's heat-map overlay as an RGB Secondary Capture (series series_uid of the source study) to
    out_dir/<SOPInstanceUID>.dcm; return the path."""
    _check_model(model)
    src = _header(image.dataset, "heat-map source")
    if image.heatmap_rgb is None:
        raise ValueError(f"image {src.SOPInstanceUID}: no heat map to write")
    rgb = np.ascontiguousarray(image.heatmap_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"image {src.SOPInstanceUID}: heat map must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    orientation, known = _patient_orientation(src)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=_short(model.name),
        software_versions=_short(_version(model)),
        content_qualification="RESEARCH",
        specific_character_set=CHARSET,
    )
    if not known:
        sc.PatientOrientation = None  # Type 2: present and empty
    sc.ConversionType = "WSD"  # made on a workstation, not captured from a device's interface (highdicom's "DI")
    score = "not scored" if _finite(image.score) is None else f"score {image.score:.3f}"
    sc.ImageComments = f"{RESEARCH_USE} Heat map of {model.name} {_version(model)}: {score}, flag {image.flag}."
    sc.DerivationDescription = (f"{RESEARCH_USE} Heat map of the anomaly score of model {model.name} "
                                f"{_version(model)} (UID {model.uid}) overlaid on the source image; {model.operating_point}.")[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")]
    sc.SourceImageSequence = [ref]
    # The overlay shows the source pixels: whatever they carry (burned-in text, a face) carries over.
    for kw in ("BurnedInAnnotation", "RecognizableVisualFeatures", "BodyPartExamined", "Laterality"):
        if src.get(kw):
            setattr(sc, kw, src.get(kw))
    return _save(sc, out_dir)
