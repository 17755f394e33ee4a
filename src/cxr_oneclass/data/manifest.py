"""The two generic readers: `csv:MANIFEST` (a table of files and labels) and `folder:PATH` (class folders)."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_SUFFIXES
from .types import SPLITS, Record, parse_label


def csv_records(path: str, seed: int = 0) -> list[Record]:
    """`csv:PATH`: columns `file,label` and optional `split,patient_id`; other columns are kept as extras."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest {p} not found")
    root = p.parent
    with open(p, newline="", encoding="utf-8-sig") as fh:
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
                    path=root / row["file"].strip(),
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
    """`folder:PATH`: `PATH/{train,val,test}/{normal,abnormal}/` or just `PATH/{normal,abnormal}/`."""
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
                records += [Record(f, label, split) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not records:
        raise DataError(
            f"folder {root} has no images in normal/ or abnormal/ (nor in train|val|test/normal|abnormal/)"
        )
    return records
