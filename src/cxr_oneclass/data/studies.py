"""What a PACS export looks like to the scorer: the files to consider, what each DICOM header says about its
patient, study and view, which images to score, and the images grouped into studies.

Discovery (`discover`): files named as inputs are taken as they are. Folders are walked recursively, following
symbolic links to folders (each folder once, by device and inode, as `images.find_images`), and a file is taken
when its suffix is an image suffix (`images.IMAGE_SUFFIXES`) or its content is DICOM (`sniff_dicom`): the 'DICM'
magic after the 128-byte preamble, or, for a bare dataset without preamble and meta header (old archives,
ACR-NEMA style), a cheap walk of its first data elements read from the first 4 KB of the file: the first tag is
in group 0002 or 0008, at least three elements in a row have ascending tags, a valid VR (explicit VR) and a
length that fits in the file. No file is read past its first 4 KB to decide. A file named DICOMDIR is not an image:
its directory records are read and the files they reference (Referenced File ID, relative to the DICOMDIR's
folder; matched case-insensitively when the exact case is missing, as CD copies are often lower-cased) are added;
a referenced file that is missing is an `ImageError` naming it. The result is sorted, without duplicates (one
file reached twice, by two inputs or a link, by device and inode, is listed once).

View (`view_of`), normalised to PA, AP, LATERAL, OTHER (oblique or decubitus: known, but not frontal or lateral)
or "" (unknown), from the first of these that gives one:
1. ViewPosition: PA, AP; LL, RL, LAT, LATERAL -> LATERAL; RLD, LLD, RLO, LLO, RAO, LAO, RPO, LPO -> OTHER;
   any other value is not trusted and the next source is tried;
2. ViewCodeSequence: the code value (SNOMED RT R-10214 / SCT 399348003 postero-anterior, R-10206 / 272479009
   antero-posterior, R-102CD / 399067008 lateral, R-10232 / 399198007 right lateral, R-10236 / 399173006 left
   lateral), else its Code Meaning read as text (as in 3);
3. the words of SeriesDescription, ProtocolName, then AcquisitionDeviceProcessingDescription: PA (or
   postero-anterior, "p.a."), AP (antero-posterior, "a.p."), LAT / LATERAL, OBL / OBLIQUE / DECUBITUS -> OTHER.
   A text naming two views ("PA and lateral", the description of a two-view series) gives none; oblique or
   decubitus with one other view ("PA oblique", "left lateral decubitus") gives OTHER. StudyDescription is not
   read: it describes every image of the study ("chest PA and lateral").
`view_source` says which tag gave the view ("ViewPosition LL"), or "unknown".

Scoring (`skip_reason`): non-DICOM files carry no view and are always scored. A DICOM is scored when its view is
one of `views` (default PA, AP). A DICOM whose view is unknown is scored too (PACS exports often lack
ViewPosition, and refusing those would silently drop whole exports) and is recognisable by
`view_source == "unknown"`; with `strict=True` it is skipped. A DICOM of a known non-image SOP class (structured
report, presentation state, encapsulated PDF, DICOMDIR, ...) is skipped whatever its view.

Studies (`group_studies`): images are grouped by StudyInstanceUID. An image without one (any non-DICOM file, or a
DICOM lacking the tag) is a study of its own, keyed 'file:<path>': patient names or folder layouts are no safe
way to tell which files belong together, and a wrong merge would mix two patients' images in one result.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageError
from .images import IMAGE_SUFFIXES, problem_of, walk_files
from .sniff import sniff_dicom

if TYPE_CHECKING:  # pydicom is imported when a DICOM shows up, as images.py does
    from pydicom import Dataset

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOMDIR_NAME = "DICOMDIR"
KNOWN_VIEWS = ("PA", "AP", "LATERAL", "OTHER")  # the order views are listed in messages
DEFAULT_VIEWS: frozenset[str] = frozenset({"PA", "AP"})
UNKNOWN_SOURCE = "unknown"  # view_source of a DICOM without any view information

# ---------------------------------------------------------------------------------------------------- discovery


def discover(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[ImageError]]:
    """Every file to consider below `paths` (see the module docstring): inputs in the order given, each folder's
    files sorted, without duplicates (a file reached twice is kept where first met); and the
    problems met: a missing input, a folder with nothing usable, an unlistable folder, a DICOMDIR that cannot be
    read or references a missing file."""
    found: list[Path] = []
    errors: list[ImageError] = []
    for raw in paths:
        path = Path(raw)
        try:
            mode = path.stat().st_mode  # follows links
        except FileNotFoundError:
            errors.append(ImageError(path, "file not found"))
            continue
        except OSError as exc:
            errors.append(ImageError(path, f"cannot read ({exc.strerror or exc})"))
            continue
        if stat.S_ISDIR(mode):
            # A walk of its own per input: a folder inside an earlier input must not look empty.
            files, problems = _walk(path)
            errors += problems
            if not files and not any(e.path == str(path) for e in problems):
                errors.append(ImageError(path, "folder has no image or DICOM files"))
            found += sorted(files)
        elif path.name.upper() == DICOMDIR_NAME:
            files, problems = _dicomdir_files(path)
            errors += problems
            if not files and not problems:
                errors.append(ImageError(path, "DICOMDIR references no files"))
            found += files
        else:
            found.append(path)
    return _unique(found), errors


def _walk(root: Path) -> tuple[list[Path], list[ImageError]]:
    """Image and DICOM files below `root` (`images.walk_files`: folder links followed, each folder once); a
    DICOMDIR found there brings the files it references."""
    def keep(entry: os.DirEntry) -> bool:
        name = entry.name
        return name.upper() == DICOMDIR_NAME or Path(name).suffix.lower() in IMAGE_SUFFIXES or bool(sniff_dicom(entry.path))

    walked, errors = walk_files(root, keep)
    found: list[Path] = []
    for path in walked:
        if path.name.upper() == DICOMDIR_NAME:
            files, problems = _dicomdir_files(path)
            found += files
            errors += problems
        else:
            found.append(path)
    return found, errors


def _dicomdir_files(dicomdir: Path) -> tuple[list[Path], list[ImageError]]:
    """The files a DICOMDIR's directory records reference, and one error per record that cannot be followed."""
    import pydicom

    try:
        ds = pydicom.dcmread(dicomdir)
        records = ds.get("DirectoryRecordSequence")
    except Exception as exc:  # pydicom raises many kinds for corrupt files
        return [], [ImageError(dicomdir, f"unreadable DICOMDIR ({problem_of(exc)})")]
    if records is None:
        return [], [ImageError(dicomdir, "not a DICOMDIR (no Directory Record Sequence)")]
    found: list[Path] = []
    errors: list[ImageError] = []
    for record in records:
        try:
            file_id = record.get("ReferencedFileID")
        except Exception as exc:
            errors.append(ImageError(dicomdir, f"unreadable directory record ({problem_of(exc)})"))
            continue
        if not file_id:
            continue  # PATIENT, STUDY, SERIES records reference no file
        parts = [str(file_id)] if isinstance(file_id, str) else [str(p) for p in file_id]
        parts = [p.strip() for p in parts]
        shown = "\\".join(parts)
        # Components are plain names (PS3.10 8.2); anything else could point outside the file set.
        if any(p in ("", ".", "..") or "/" in p or "\\" in p or ":" in p for p in parts):
            errors.append(ImageError(dicomdir, f"DICOMDIR references a malformed file ID {shown!r}"))
            continue
        path = _resolve(dicomdir.parent, parts)
        if path is None:
            errors.append(ImageError(dicomdir.parent.joinpath(*parts), f"file not found (listed in {dicomdir})"))
        else:
            found.append(path)
    return found, errors


def _resolve(folder: Path, parts: list[str]) -> Path | None:
    """folder/parts as a file, else matched case-insensitively (file IDs are upper case; copies of a CD on a
    case-sensitive file system are often lower case), else None."""
    exact = folder.joinpath(*parts)
    if exact.is_file():
        return exact
    current = folder
    for part in parts:
        try:
            names = {name.upper(): name for name in os.listdir(current)}
        except OSError:
            return None
        if part.upper() not in names:
            return None
        current = current / names[part.upper()]
    return current if current.is_file() else None


def _unique(paths: list[Path]) -> list[Path]:
    """In order; one file reached by two paths (two inputs, a folder link, a DICOMDIR) kept once, where first met."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for path in dict.fromkeys(paths):
        try:
            st = path.stat()
        except OSError:
            out.append(path)  # left for the reader to report
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


# ---------------------------------------------------------------------------------------------------- headers


@dataclass
class ImageInfo:
    """What one file's header says (all "" for a non-DICOM file). `view` is PA, AP, LATERAL, OTHER or ""."""

    path: str
    is_dicom: bool = False
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    sop_class_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    modality: str = ""
    view: str = ""
    view_source: str = ""
    body_part: str = ""


def read_info(path: str | os.PathLike[str]) -> ImageInfo:
    """The header of one file, read without its pixels. A non-DICOM file (PNG, JPEG, ...) gives an `ImageInfo`
    with `is_dicom` False and nothing else; a DICOM (by content, or a .dcm/.dicom suffix) that cannot be parsed,
    or a file that cannot be read, is an `ImageError`."""
    path = Path(path)
    try:
        kind = sniff_dicom(path)
    except FileNotFoundError as exc:
        raise ImageError(path, "file not found") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror or exc})") from exc
    if not kind:
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise ImageError(path, "not a DICOM file (no DICOM header found)")
        return ImageInfo(path=str(path))
    ds = _read_header(path, force=kind == "bare")
    # pydicom reads garbage after a 'DICM' magic as private elements without complaint: that is no header.
    if not getattr(ds, "file_meta", None) and not any(tag.group % 2 == 0 for tag in ds.keys()):
        raise ImageError(path, "unreadable DICOM header (no standard data elements)")
    return _info_of(ds, path)


def _read_header(path: Path, force: bool) -> Dataset:
    import pydicom

    from . import images
    from .dicom import _check_file_budget

    try:
        # pydicom inflates a deflated file whole, header reads too: the decode path's bomb check applies here.
        _check_file_budget(path, images.MAX_DECODE_BYTES)
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)
    except ImageError:
        raise
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # InvalidDicomError, EOFError, ValueError, struct.error, ...
        raise ImageError(path, f"unreadable DICOM header ({problem_of(exc)})") from exc


def _text(ds: object, keyword: str, path: Path) -> str:
    """One element as stripped text ("" when absent); a corrupt element is logged and read as absent."""
    if ds is None:
        return ""
    try:
        value = ds.get(keyword)  # type: ignore[attr-defined]
        if value is None:
            return ""
        if not isinstance(value, (str, bytes)) and isinstance(value, Sequence):
            return "\\".join(str(v).strip(" \0") for v in value)
        return str(value).strip(" \0")
    except Exception as exc:  # values are decoded lazily: a bad charset or VR surfaces here
        logger.warning("%s: %s unreadable (%s); read as empty", path, keyword, problem_of(exc))
        return ""


def _info_of(ds: Dataset, path: Path) -> ImageInfo:
    meta = getattr(ds, "file_meta", None)
    text = lambda keyword: _text(ds, keyword, path)
    try:
        view, source = view_of(ds)
    except Exception as exc:  # a corrupt sequence: the view is unknown, the image still has its study
        logger.warning("%s: view unreadable (%s); treated as unknown", path, problem_of(exc))
        view, source = "", UNKNOWN_SOURCE
    return ImageInfo(
        path=str(path),
        is_dicom=True,
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        accession=text("AccessionNumber"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_uid=text("SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID", path),
        sop_class_uid=text("SOPClassUID") or _text(meta, "MediaStorageSOPClassUID", path),
        study_date=text("StudyDate"),
        study_description=text("StudyDescription"),
        modality=text("Modality").upper(),
        view=view,
        view_source=source,
        body_part=text("BodyPartExamined").upper(),
    )


# ---------------------------------------------------------------------------------------------------- views

_VIEW_POSITIONS = {
    "PA": "PA",
    "AP": "AP",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    # Decubitus and oblique (DX defined terms and the usual obliques): known views, neither frontal nor lateral.
    **dict.fromkeys(("RLD", "LLD", "RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBL", "OBLIQUE"), "OTHER"),
}
# CID 4010 "DX View": SNOMED RT codes (SRT, 99SDM, SNM3) and their SNOMED CT twins (SCT); the values never clash.
_VIEW_CODES = {
    "R-10214": "PA",
    "399348003": "PA",
    "R-10206": "AP",
    "272479009": "AP",
    "R-102CD": "LATERAL",
    "399067008": "LATERAL",
    "R-10232": "LATERAL",  # right lateral
    "399198007": "LATERAL",
    "R-10236": "LATERAL",  # left lateral
    "399173006": "LATERAL",
}
# Phrases of upper-case words, matched whole in text reduced to upper-case words separated by single spaces.
_VIEW_WORDS = (
    ("PA", ("PA", "P A", "POSTEROANTERIOR", "POSTERO ANTERIOR", "POSTERIOR ANTERIOR")),
    ("AP", ("AP", "A P", "ANTEROPOSTERIOR", "ANTERO POSTERIOR", "ANTERIOR POSTERIOR")),
    ("LATERAL", ("LAT", "LATERAL", "LATERALE")),
    ("OTHER", ("OBL", "OBLIQUE", "DECUB", "DECUBITUS", "RAO", "LAO", "RPO", "LPO")),
)
_TEXT_TAGS = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")


def view_in_text(text: str) -> str:
    """The view a free text names (see the module docstring, rule 3), or "" when none or ambiguous."""
    words = " " + " ".join(w for w in re.split(r"[^A-Z0-9]+", text.upper()) if w) + " "
    hits = {view for view, phrases in _VIEW_WORDS if any(f" {p} " in words for p in phrases)}
    if len(hits) == 1:
        return hits.pop()
    if len(hits) == 2 and "OTHER" in hits:
        return "OTHER"  # "PA oblique", "left lateral decubitus": the qualifier decides
    return ""  # none, or several: "PA and lateral" describes a series, not this image


def view_of(ds: Dataset) -> tuple[str, str]:
    """(view, view_source) of a DICOM header, by the rule of the module docstring; ("", "unknown") if none."""
    raw = str(ds.get("ViewPosition", "") or "").strip()
    view = _VIEW_POSITIONS.get(re.sub(r"[^A-Z]", "", raw.upper()), "")
    if view:
        return view, f"ViewPosition {raw}"
    for item in ds.get("ViewCodeSequence", None) or ():
        code = str(item.get("CodeValue", "") or "").strip()
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "").strip()
        view = _VIEW_CODES.get(code.upper(), "") or view_in_text(meaning)
        if view:
            return view, " ".join(filter(None, ("ViewCodeSequence", scheme, code, f"({meaning})" if meaning else "")))
    for keyword in _TEXT_TAGS:
        value = str(ds.get(keyword, "") or "").strip()
        view = view_in_text(value)
        if view:
            return view, f"{keyword} {value!r}"
    return "", UNKNOWN_SOURCE


def parse_views(text: str) -> set[str]:
    """The views of a CLI flag: comma-separated PA, AP, LATERAL (or LAT), OTHER, any case, or 'all'.
    ValueError names what is wrong."""
    tokens = [t.strip().upper() for t in text.split(",") if t.strip()]
    usage = f"use a comma-separated list of {', '.join(KNOWN_VIEWS)} (LAT for LATERAL), or 'all'"
    if not tokens:
        raise ValueError(f"no view given in {text!r}; {usage}")
    aliases = {**{v: v for v in KNOWN_VIEWS}, "LAT": "LATERAL", "ALL": "ALL"}
    unknown = [t for t in tokens if t not in aliases]
    if unknown:
        raise ValueError(f"unknown view {unknown[0]!r} in {text!r}; {usage}")
    if "ALL" in tokens:
        return set(KNOWN_VIEWS)
    return {aliases[t] for t in tokens}


def _non_image_class(sop_class_uid: str) -> str:
    """The name of a SOP class pydicom knows to be no image (an SR, a presentation state, ...), else ""."""
    if not sop_class_uid:
        return ""
    from pydicom.uid import UID

    uid = UID(sop_class_uid)
    if uid.type != "SOP Class" or "Image" in uid.name:
        return ""  # an image class, or one pydicom does not know (private): the modality check decides later
    return uid.name.removesuffix(" SOP Class")


def skip_reason(info: ImageInfo, views: AbstractSet[str] = DEFAULT_VIEWS, strict: bool = False) -> str | None:
    """Why this image is not scored, or None to score it.

    Non-DICOM files always pass: they carry no view information. A DICOM of a known non-image SOP class is
    skipped. A DICOM passes when its view is in `views`; one whose view is unknown (`view_source` "unknown")
    passes too, since PACS exports often lack ViewPosition, unless `strict`."""
    if not info.is_dicom:
        return None
    not_image = _non_image_class(info.sop_class_uid)
    if not_image:
        return f"not an image ({not_image})"
    if not info.view:
        if strict:
            return "view unknown (no ViewPosition, ViewCodeSequence or view in the series descriptions) and views are strict"
        return None
    if info.view in views:
        return None
    wanted = ", ".join(v for v in KNOWN_VIEWS if v in views) or "none"
    return f"view {info.view} ({info.view_source}) is not one of {wanted} (--views)"


# ---------------------------------------------------------------------------------------------------- patients, studies


def pseudonymise(value: str, salt: str) -> str:
    """A stable stand-in for a patient ID: HMAC-SHA256 keyed by `salt`, hex, first 16 characters ("" for "").

    The salt is a secret key: patient IDs are few and guessable, so anyone who has it can hash every candidate ID
    and find the patient. Surrounding spaces (DICOM pads values) do not change the result."""
    value = value.strip()
    if not value:
        return ""
    if not salt:
        raise ValueError("pseudonymise needs a non-empty salt: an unsalted hash of a patient ID is reversed by hashing every candidate ID")
    return hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


@dataclass
class Study:
    """One study: its key (StudyInstanceUID, or 'file:<path>'), the first non-empty value its images give for
    each study field, and its images in the order given."""

    key: str
    images: list[ImageInfo] = field(default_factory=list)
    study_uid: str = ""
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    study_description: str = ""

    @classmethod
    def of(cls, key: str, images: list[ImageInfo]) -> Study:
        first = lambda name: next((getattr(i, name) for i in images if getattr(i, name)), "")
        return cls(key, list(images), first("study_uid"), first("patient_id"), first("accession"), first("study_date"),
                   first("study_description"))


def group_studies(infos: list[ImageInfo]) -> dict[str, list[ImageInfo]]:
    """Images by study key, keys and images in the order first met: StudyInstanceUID, or 'file:<path>' for an
    image without one (see the module docstring). A study whose images name different patients, or one SOP
    instance in two files, is logged as a warning: an export to check, not one to fix silently."""
    groups: dict[str, list[ImageInfo]] = {}
    for info in infos:
        groups.setdefault(info.study_uid or f"file:{info.path}", []).append(info)
    for key, images in groups.items():
        patients = sorted({i.patient_id for i in images if i.patient_id})
        if len(patients) > 1:
            logger.warning("study %s: images of %d different patient IDs", key, len(patients))
        sops: dict[str, str] = {}
        for info in images:
            if info.sop_uid and info.sop_uid in sops:
                logger.warning("study %s: SOP instance %s is in two files: %s and %s", key, info.sop_uid, sops[info.sop_uid], info.path)
            sops.setdefault(info.sop_uid, info.path)
    return groups


def studies(infos: list[ImageInfo]) -> list[Study]:
    """`group_studies` as `Study` records."""
    return [Study.of(key, images) for key, images in group_studies(infos).items()]
