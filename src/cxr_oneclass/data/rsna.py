"""`rsna:PATH`: RSNA Pneumonia Detection Challenge (stage 2) as released, split as in the paper.

Below PATH: `stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`, one row per box, so several rows
per patientId), `stage_2_detailed_class_info.csv` (`patientId,class`, likewise repeated) and the DICOMs,
`stage_2_train_images/<patientId>.dcm` (found by name anywhere below PATH). Rows whose DICOM is missing are left
out and counted in one warning; DICOMs not in the label files (e.g. `stage_2_test_images/`) are ignored.

Normal = class `Normal`; abnormal = `Lung Opacity`; `No Lung Opacity / Not Normal` is left out unless
`not_normal=abnormal`.

Options follow a `?` as `key=value` pairs joined by `&` (lists join items with `+`):

    not_normal=exclude|abnormal   what to do with 'No Lung Opacity / Not Normal' (default: exclude)
    train=N  val=N+M  test=N+M    image counts (default: 6000; 1025+1025; 1000+1000)
    scale=F                       all counts times F (0 < F <= 1)

e.g. `rsna:/data/rsna?not_normal=abnormal&scale=0.5`.

A patientId names one image, so the split is by image; counts are scaled down by one factor when fewer images
are present; the seed fixes the split. Records keep `class` and `boxes` (the number of opacity boxes) as extras.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..errors import DataError
from .nih import open_text
from .splits import (
    SIZE_KEYS,
    SplitSizes,
    describe_records,
    index_files,
    locate_label_file,
    parse_source_arg,
    sizes_from_options,
    split_by_patient_with_sizes,
)
from .types import Record

log = logging.getLogger(__name__)

NORMAL = "Normal"
OPACITY = "Lung Opacity"
NOT_NORMAL = "No Lung Opacity / Not Normal"
CLASSES = (NORMAL, OPACITY, NOT_NORMAL)
LABELS_FILES = ("stage_2_train_labels.csv", "stage_2_train_labels.csv.gz")
CLASS_FILES = ("stage_2_detailed_class_info.csv", "stage_2_detailed_class_info.csv.gz")
PAPER_SIZES = SplitSizes(train=6000, val_normal=1025, val_abnormal=1025, test_normal=1000, test_abnormal=1000)
OPTIONS = ("not_normal",) + SIZE_KEYS


def _read_csv(path: Path, required: tuple[str, ...]):
    """Yield (line number, row) of a CSV after checking its columns."""
    try:
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            missing = [c for c in required if c not in cols]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                                f"(found: {', '.join(c for c in cols if c) or 'none'})")
            n = 0
            for lineno, row in enumerate(reader, start=2):
                n += 1
                yield lineno, row
            if n == 0:
                raise DataError(f"{path}: no rows")
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable label file ({exc})") from exc


def read_classes(path: Path) -> dict[str, str]:
    classes: dict[str, str] = {}
    for lineno, row in _read_csv(path, ("patientId", "class")):
        where = f"{path} line {lineno}"
        pid, cls = (row.get("patientId") or "").strip(), (row.get("class") or "").strip()
        if not pid:
            raise DataError(f"{where}: empty 'patientId'")
        if cls not in CLASSES:
            raise DataError(f"{where}: unknown class {cls!r} for {pid} (known: {', '.join(CLASSES)})")
        if classes.setdefault(pid, cls) != cls:
            raise DataError(f"{where}: {pid} has two classes, {classes[pid]!r} and {cls!r}")
    return classes


def read_boxes(path: Path) -> dict[str, int]:
    """patientId -> number of boxes (rows with Target 1)."""
    boxes: dict[str, int] = {}
    for lineno, row in _read_csv(path, ("patientId", "Target")):
        where = f"{path} line {lineno}"
        pid, target = (row.get("patientId") or "").strip(), (row.get("Target") or "").strip()
        if not pid:
            raise DataError(f"{where}: empty 'patientId'")
        if target not in ("0", "1"):
            raise DataError(f"{where}: unknown Target {target!r} for {pid}; expected 0 or 1")
        boxes[pid] = boxes.get(pid, 0) + (target == "1")
    return boxes


def rsna_records(arg: str, seed: int = 0) -> list[Record]:
    """Records of the chosen train/val/test images (see the module docstring for the spec)."""
    root, opts = parse_source_arg(arg, "rsna", OPTIONS)
    not_normal = opts.get("not_normal", "exclude").lower()
    if not_normal not in ("exclude", "abnormal"):
        raise DataError(f"rsna: not_normal= takes exclude or abnormal, got {opts['not_normal']!r}")
    sizes = sizes_from_options(PAPER_SIZES, opts, "rsna")
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DataError(f"rsna: {root} not found")
    index, found, dupes = index_files(root, (".dcm",), LABELS_FILES + CLASS_FILES)
    labels_file = locate_label_file(root, found, LABELS_FILES, "rsna")
    class_file = locate_label_file(root, found, CLASS_FILES, "rsna")
    if dupes:
        log.warning("rsna: %d DICOM names occur more than once below %s; the first in sorted order is used", dupes, root)

    classes = read_classes(class_file)
    boxes = read_boxes(labels_file)
    no_class = [p for p in boxes if p not in classes]
    if no_class:
        log.warning("rsna: %d patientIds in %s have no class in %s (e.g. %s); they are left out",
                    len(no_class), labels_file.name, class_file.name, no_class[0])
    mismatch = [p for p, c in classes.items() if p in boxes and (boxes[p] > 0) != (c == OPACITY)]
    if mismatch:
        log.warning("rsna: %d patientIds have Target and class that disagree (e.g. %s); the class is used",
                    len(mismatch), mismatch[0])

    label_of = {NORMAL: 0, OPACITY: 1, NOT_NORMAL: 1 if not_normal == "abnormal" else None}
    missing: list[str] = []
    records: list[Record] = []
    for pid in sorted(classes):
        name = f"{pid}.dcm"
        if name not in index:
            missing.append(name)
            continue
        label = label_of[classes[pid]]
        if label is None:
            continue
        records.append(Record(index[name], label, patient=pid,
                              extras={"class": classes[pid], "boxes": str(boxes.get(pid, 0))}))
    if missing:
        log.warning("rsna: %d of %d labelled images are missing below %s (e.g. %s); they are left out",
                    len(missing), len(classes), root, ", ".join(missing[:3]))
    unlisted = sum(1 for n in index if n[:-4] not in classes)
    if unlisted:
        log.info("rsna: %d DICOMs below %s are not in %s and are ignored", unlisted, root, class_file.name)
    if not records:
        raise DataError(f"rsna: none of the {len(classes)} labelled images were found below {root}")
    chosen = split_by_patient_with_sizes(records, sizes, seed, "rsna")
    log.info("rsna: %s", describe_records(chosen))
    return chosen
