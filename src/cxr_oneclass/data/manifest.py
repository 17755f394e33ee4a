"""The two generic readers: `csv:MANIFEST` (a table of files and labels) and `folder:PATH` (class folders).

Manifest encoding: UTF-8, with or without a BOM. A manifest that is not valid UTF-8 (Excel on Windows saves
Windows-1252) is read as Windows-1252 (latin-1 for the few bytes that has no character for) with one warning
naming the file; a listed file that is not found under its decoded name is then looked for under the manifest's
own bytes, as a file name that is not UTF-8 either.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from ..errors import DataError
from .images import find_images
from .types import SPLITS, Record, parse_label

log = logging.getLogger(__name__)


def _manifest_text(p: Path) -> tuple[str, str]:
    """The manifest's text and its encoding (see the module docstring)."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"manifest {p}: cannot read ({exc.strerror})") from exc
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        try:
            text, encoding = data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            text, encoding = data.decode("latin-1"), "latin-1"
        log.warning("%s is not UTF-8 (line %d, byte %d); read as %s", p, line, exc.start, encoding)
        return text, encoding


def _listed_path(root: Path, name: str, encoding: str) -> Path:
    path = root / name
    if encoding != "utf-8" and not path.exists():
        raw = root / os.fsdecode(name.encode(encoding))  # the manifest's bytes as the file name's bytes
        if raw.exists():
            return raw
    return path


def csv_records(path: str, seed: int = 0) -> list[Record]:
    """`csv:PATH`: columns `file,label` and optional `split,patient_id`; other columns are kept as extras."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest {p} not found")
    root = p.parent
    text, encoding = _manifest_text(p)
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in ("file", "label") if c not in cols]
        if missing:
            raise DataError(f"{p}: missing column(s) {', '.join(missing)} (found: {', '.join(cols) or 'none'})")
        records = []
        for lineno, row in enumerate(reader, start=2):
            where = f"{p} line {lineno}"
            if not (row.get("file") or "").strip():
                raise DataError(f"{where}: empty 'file'")
            split = (row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLITS + ("unused",):
                raise DataError(f"{where}: unknown split {split!r}; use train/val/test/unused")
            extras = {k: v for k, v in row.items() if k not in ("file", "label", "split", "patient_id") and k}
            records.append(
                Record(
                    path=_listed_path(root, row["file"].strip(), encoding),
                    label=parse_label(row["label"] or "", where),
                    split=split,
                    patient=(row.get("patient_id") or "").strip() or None,
                    extras={k: (v or "") for k, v in extras.items()},
                )
            )
    if not records:
        raise DataError(f"{p}: manifest has no rows")
    return records


def folder_records(path: str, seed: int = 0) -> list[Record]:
    """`folder:PATH`: `PATH/{train,val,test}/{normal,abnormal}/` or just `PATH/{normal,abnormal}/`.

    Images anywhere below a class folder count, symbolic links to folders followed (see `images.find_images`)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"folder {root} not found")
    records: list[Record] = []
    split_dirs = [(s, root / s) for s in SPLITS if (root / s).is_dir()]
    layouts = split_dirs if split_dirs else [(None, root)]
    for split, base in layouts:
        for cls_name, label in (("normal", 0), ("abnormal", 1)):
            d = base / cls_name
            if d.is_dir():
                records += [Record(f, label, split) for f in find_images(d)]
    if not records:
        raise DataError(
            f"folder {root} has no images in normal/ or abnormal/ (nor in train|val|test/normal|abnormal/)"
        )
    return records
