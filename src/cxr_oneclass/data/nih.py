"""`nih:PATH`: NIH ChestX-ray14 as released, split as in the paper.

PATH is the release folder (or the label file itself). The label file, `Data_Entry_2017.csv` or
`Data_Entry_2017_v2020.csv` (gzipped or not), is looked for at or below PATH; the PNGs are found by name anywhere
below PATH (the release spreads them over `images_001/images/` ... `images_012/images/`). Labelled rows whose
image is missing are left out and counted in one warning; images not in the label file are ignored.

Normal = `No Finding`; abnormal = any of the 14 findings in `Finding Labels` (`|`-separated), or of the findings
chosen with `findings=`. Images whose only findings are not chosen are left out.

Options follow a `?` as `key=value` pairs joined by `&`; lists join items with `+` (case does not matter):

    findings=Pneumonia+Effusion   abnormal = images with any of these findings (default: all 14)
    views=PA                      only these view positions (PA, AP; default: both)
    train=N  val=N+M  test=N+M    image counts (default: the paper's 4479; 849+857; 677+667)
    scale=F                       all counts times F (0 < F <= 1)

e.g. `nih:/data/nih?findings=Pneumonia&views=PA&scale=0.25`.

Splits are by patient (`Patient ID`): train has normal images only; the counts are scaled down by one factor when
fewer images are present; the seed fixes the split. Each record keeps `finding_labels`, `view`, `age` and `sex` as
extras for per-subgroup reports.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from pathlib import Path

from ..errors import DataError
from .splits import (
    SIZE_KEYS,
    SplitSizes,
    describe_records,
    index_files,
    locate_label_file,
    parse_source_arg,
    sizes_from_options,
    split_by_patient_with_sizes,
    split_list,
)
from .types import Record

log = logging.getLogger(__name__)

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
VIEWS = ("PA", "AP")
LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
PAPER_SIZES = SplitSizes(train=4479, val_normal=849, val_abnormal=857, test_normal=677, test_abnormal=667)
OPTIONS = ("findings", "views") + SIZE_KEYS


def _choose(values: list[str], known: tuple[str, ...], what: str) -> set[str]:
    lookup = {k.lower(): k for k in known}
    if what == "finding":
        lookup.update({k.lower().replace("_", " "): k for k in known})  # 'Pleural Thickening' too
    out = set()
    for v in values:
        if v.lower() not in lookup:
            raise DataError(f"nih: unknown {what} {v!r}; known: {', '.join(known)}")
        out.add(lookup[v.lower()])
    if not out:
        raise DataError(f"nih: {what}s= needs at least one of: {', '.join(known)}")
    return out


def open_text(path: Path) -> io.TextIOBase:
    """A label file as text; gzip by suffix or by its magic bytes."""
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_label_file(path: Path, findings: set[str], views: set[str] | None) -> tuple[list[dict[str, str]], dict[str, int], set[str]]:
    """Rows kept by the options as {name, label, patient, extras...}; counts of rows left out; all image names."""
    rows: list[dict[str, str]] = []
    counts = {"rows": 0, "view": 0, "finding": 0, "duplicate": 0}
    seen: set[str] = set()
    known = set(FINDINGS)
    try:
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            need = list(REQUIRED) + (["View Position"] if views else [])
            missing = [c for c in need if c not in cols]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                                f"(found: {', '.join(c for c in cols if c) or 'none'})")
            for lineno, row in enumerate(reader, start=2):
                where = f"{path} line {lineno}"
                name = (row.get("Image Index") or "").strip()
                if not name:
                    raise DataError(f"{where}: empty 'Image Index'")
                counts["rows"] += 1
                if name in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(name)
                labels = [x.strip() for x in (row.get("Finding Labels") or "").split("|") if x.strip()]
                if not labels:
                    raise DataError(f"{where}: empty 'Finding Labels' for {name}")
                unknown = [x for x in labels if x not in known and x != NO_FINDING]
                if unknown:
                    raise DataError(f"{where}: unknown finding {unknown[0]!r} in 'Finding Labels' for {name} "
                                    f"(known: {NO_FINDING}, {', '.join(FINDINGS)})")
                if NO_FINDING in labels and len(labels) > 1:
                    raise DataError(f"{where}: {name} has {NO_FINDING!r} together with findings {row['Finding Labels']!r}")
                patient = (row.get("Patient ID") or "").strip()
                if not patient:
                    raise DataError(f"{where}: empty 'Patient ID' for {name}")
                view = (row.get("View Position") or "").strip().upper()
                if views and view not in views:
                    counts["view"] += 1
                    continue
                if labels == [NO_FINDING]:
                    label = 0
                elif findings & set(labels):
                    label = 1
                else:
                    counts["finding"] += 1
                    continue
                rows.append({
                    "name": name,
                    "label": str(label),
                    "patient": (patient.lstrip("0") or "0") if patient.isdigit() else patient,
                    "finding_labels": "|".join(labels),
                    "view": view,
                    "age": (row.get("Patient Age") or "").strip(),
                    "sex": (row.get("Patient Gender") or "").strip(),
                })
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable label file ({exc})") from exc
    if counts["rows"] == 0:
        raise DataError(f"{path}: label file has no rows")
    return rows, counts, seen


def nih_records(arg: str, seed: int = 0) -> list[Record]:
    """Records of the chosen train/val/test images (see the module docstring for the spec)."""
    root, opts = parse_source_arg(arg, "nih", OPTIONS)
    findings = _choose(split_list(opts["findings"]), FINDINGS, "finding") if "findings" in opts else set(FINDINGS)
    views = _choose([v.upper() for v in split_list(opts["views"])], VIEWS, "view") if "views" in opts else None
    sizes = sizes_from_options(PAPER_SIZES, opts, "nih")
    if root.is_file():
        label_file, image_root = root, root.parent
        index, _, dupes = index_files(image_root, (".png",))
    elif root.is_dir():
        image_root = root
        index, found, dupes = index_files(root, (".png",), LABEL_FILES)
        label_file = locate_label_file(root, found, LABEL_FILES, "nih")
    else:
        raise DataError(f"nih: {root} not found")
    if dupes:
        log.warning("nih: %d image names occur more than once below %s; the first in sorted order is used", dupes, image_root)

    rows, counts, listed = read_label_file(label_file, findings, views)
    if counts["duplicate"]:
        log.warning("nih: %s lists %d image names twice; the first row is used", label_file, counts["duplicate"])
    missing = [r["name"] for r in rows if r["name"] not in index]
    if missing:
        log.warning("nih: %d of %d labelled images are missing below %s (e.g. %s); they are left out",
                    len(missing), len(rows), image_root, ", ".join(missing[:3]))
    unlisted = sum(1 for n in index if n not in listed)
    left_out = counts["view"] + counts["finding"]
    if unlisted or left_out:
        log.info("nih: %d PNGs not in %s ignored; %d rows left out by views=/findings=", unlisted, label_file.name, left_out)
    records = [
        Record(
            path=index[r["name"]],
            label=int(r["label"]),
            patient=r["patient"],
            extras={k: r[k] for k in ("finding_labels", "view", "age", "sex")},
        )
        for r in rows
        if r["name"] in index
    ]
    if not records:
        raise DataError(f"nih: none of the {len(rows)} usable images in {label_file} were found below {image_root}")
    chosen = split_by_patient_with_sizes(records, sizes, seed, "nih")
    log.info("nih: %s", describe_records(chosen))
    return chosen

