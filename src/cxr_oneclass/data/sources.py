"""Data specs (`csv:PATH`, `folder:PATH`, `phantom:...`, ...) to labelled, split image sets.

A file-based source lists `Record`s; `load_dataset` assigns patient-wise splits where the source has none, decodes
every file once (in parallel) into a uint8 array, and reports the files it had to skip.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import DataError, ImageError
from .cache import ImageCache, file_key
from .images import IMAGE_SUFFIXES, load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NORMAL_WORDS = {"normal": 0, "0": 0, "no finding": 0, "negative": 0}
ABNORMAL_WORDS = {"abnormal": 1, "1": 1, "positive": 1}


@dataclass
class Record:
    """One image file: where it is, its label (0 normal, 1 abnormal, -1 unknown), split, patient, extras."""

    path: Path
    label: int = -1
    split: str | None = None
    patient: str | None = None
    extras: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageSet:
    """Decoded images of one split: uint8 (N, H, W), labels (N,), names, per-image metadata columns."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]
    meta: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def n_normal(self) -> int:
        return int((self.labels == 0).sum())

    @property
    def n_abnormal(self) -> int:
        return int((self.labels == 1).sum())

    def subset(self, idx: np.ndarray) -> "ImageSet":
        idx = np.asarray(idx)
        return ImageSet(
            self.images[idx],
            self.labels[idx],
            [self.names[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.meta.items()},
        )


@dataclass
class Dataset:
    splits: dict[str, ImageSet]
    spec: str
    skipped: list[ImageError] = field(default_factory=list)

    def __getitem__(self, split: str) -> ImageSet:
        if split not in self.splits:
            raise DataError(f"data {self.spec!r} has no {split!r} split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[split]

    def summary(self) -> str:
        parts = [f"{name} {s.n_normal} normal + {s.n_abnormal} abnormal" for name, s in self.splits.items()]
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable files skipped")
        return "; ".join(parts)


def parse_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in NORMAL_WORDS:
        return NORMAL_WORDS[v]
    if v in ABNORMAL_WORDS:
        return ABNORMAL_WORDS[v]
    raise DataError(f"{where}: unknown label {value!r}; use normal/abnormal (or 0/1)")


# ----------------------------------------------------------------------------------------------- sources

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


def nih_records(arg: str, seed: int = 0) -> list[Record]:
    """`nih:PATH[?options]`: NIH ChestX-ray14 as released, paper split (see `data/nih.py`)."""
    from .nih import nih_records as read

    return read(arg, seed)


def rsna_records(arg: str, seed: int = 0) -> list[Record]:
    """`rsna:PATH[?options]`: RSNA Pneumonia stage 2 as released, paper split (see `data/rsna.py`)."""
    from .rsna import rsna_records as read

    return read(arg, seed)


# A source gets the spec's argument and the run's seed (for sources that choose their own splits).
RecordSource = Callable[[str, int], list[Record]]
RECORD_SOURCES: dict[str, RecordSource] = {
    "csv": csv_records,
    "folder": folder_records,
    "nih": nih_records,
    "rsna": rsna_records,
}


def _phantom(arg: str, image_size: int, seed: int) -> Dataset:
    from . import phantom

    opts = phantom.parse_options(arg)
    # The model's image size and seed win over the spec's unless the spec names them.
    overrides = {}
    if "size=" not in arg:
        overrides["size"] = image_size
    if "seed=" not in arg:
        overrides["seed"] = seed
    if overrides:
        opts = dataclasses.replace(opts, **overrides)
    splits = {}
    for name, s in phantom.make_splits(opts).items():
        splits[name] = ImageSet(s.images, s.labels.astype(np.int64), list(s.names), {"kind": list(s.kinds)})
    return Dataset(splits, spec=f"phantom:{arg}")


InMemorySource = Callable[[str, int, int], Dataset]
IN_MEMORY_SOURCES: dict[str, InMemorySource] = {"phantom": _phantom}


# ----------------------------------------------------------------------------------------------- splits

def assign_splits(records: list[Record], seed: int, val_frac: float = 0.15, test_frac: float = 0.15) -> None:
    """Give records without a split one, by patient (by file without patient IDs), in place.

    Train gets normal images only: patients with any abnormal image go to val or test (half each); patients with
    only normal images go to train/val/test by the fractions. The seed fixes the assignment.
    """
    todo = [r for r in records if r.split is None]
    if not todo:
        return
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in todo:
        groups[r.patient or str(r.path)].append(r)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    normal_keys = [k for k in keys if all(r.label == 0 for r in groups[k])]
    other_keys = [k for k in keys if k not in set(normal_keys)]
    n = len(normal_keys)
    n_val, n_test = int(round(n * val_frac)), int(round(n * test_frac))
    for i, k in enumerate(normal_keys):
        split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
        for r in groups[k]:
            r.split = split
    for i, k in enumerate(other_keys):
        for r in groups[k]:
            r.split = "val" if i % 2 == 0 else "test"


# ----------------------------------------------------------------------------------------------- decoding

def decode_records(records: list[Record], image_size: int, workers: int = 0, desc: str = "decoding", cache: bool = True) -> tuple[np.ndarray, list[bool], list[ImageError]]:
    """Decode files in parallel to uint8 (N, S, S); failed files give a zero image, ok=False and an error.

    With `cache` (and the cache not turned off, see `data/cache.py`) images decoded before are read from the
    on-disk cache and newly decoded ones are added to it.
    """
    out = np.zeros((len(records), image_size, image_size), dtype=np.uint8)
    ok = [False] * len(records)
    errors: list[ImageError] = []
    store = ImageCache.from_env(image_size) if cache else None
    keys = [file_key(r.path) for r in records] if store is not None else [None] * len(records)
    todo = list(range(len(records)))
    if store is not None:
        for i in store.fill(keys, out):
            ok[i] = True
        todo = [i for i in todo if not ok[i]]
        if len(todo) < len(records):
            log.info("%s: %d of %d images from the cache %s", desc, len(records) - len(todo), len(records), store.dir)

    def work(i: int) -> tuple[int, ImageError | None]:
        try:
            out[i] = load_image(records[i].path, image_size)
            return i, None
        except ImageError as exc:
            return i, exc

    n_workers = workers or min(8, (os.cpu_count() or 1) * 2)
    pool = ThreadPoolExecutor(n_workers)
    try:
        it = pool.map(work, todo)
        for i, err in tqdm(it, total=len(todo), desc=desc, unit="img", leave=False, disable=len(todo) < 200):
            if err is None:
                ok[i] = True
                if store is not None:
                    store.add(keys[i], out[i])
            else:
                errors.append(err)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the queued files instead of decoding them
        if store is not None:
            store.flush()  # also after an interruption: what was decoded is kept for the next run
    return out, ok, errors


def parse_spec(spec: str) -> tuple[str, str]:
    """'scheme:arg' -> (scheme, arg); a bare in-memory scheme ('phantom') needs no arg."""
    scheme, sep, arg = spec.partition(":")
    scheme = scheme.strip().lower()
    if not sep and scheme not in IN_MEMORY_SOURCES:
        raise DataError(
            f"data spec {spec!r} needs a scheme: csv:PATH, folder:PATH, nih:PATH[?OPTIONS], rsna:PATH[?OPTIONS] "
            "or phantom[:OPTIONS]"
        )
    return scheme, arg


def load_dataset(spec: str, image_size: int, seed: int = 0, splits: tuple[str, ...] = SPLITS, workers: int = 0) -> Dataset:
    """Resolve a data spec to decoded, split image sets (only the `splits` asked for are decoded)."""
    scheme, arg = parse_spec(spec)
    if scheme in IN_MEMORY_SOURCES:
        ds = IN_MEMORY_SOURCES[scheme](arg, image_size, seed)
        ds.splits = {k: v for k, v in ds.splits.items() if k in splits}
        return ds
    if scheme not in RECORD_SOURCES:
        known = ", ".join(sorted(set(RECORD_SOURCES) | set(IN_MEMORY_SOURCES)))
        raise DataError(f"unknown data scheme {scheme!r} in {spec!r}; known: {known}")
    records = RECORD_SOURCES[scheme](arg, seed)
    assign_splits(records, seed)
    dropped = [r for r in records if r.split == "train" and r.label == 1]
    if dropped:
        log.warning("%d abnormal images listed in train were left out: training uses normal images only", len(dropped))
    return build_dataset(records, spec, image_size, splits, workers)


def build_dataset(records: list[Record], spec: str, image_size: int, splits: tuple[str, ...] = SPLITS, workers: int = 0) -> Dataset:
    """Decode the records of the wanted splits into `ImageSet`s; unreadable files are skipped and reported."""
    out: dict[str, ImageSet] = {}
    skipped: list[ImageError] = []
    for split in splits:
        recs = [r for r in records if r.split == split and not (split == "train" and r.label == 1)]
        if not recs:
            continue
        images, ok, errors = decode_records(recs, image_size, workers, desc=f"decoding {split}")
        skipped += errors
        keep = np.flatnonzero(ok)
        recs = [recs[i] for i in keep]
        extra_keys = sorted({k for r in recs for k in r.extras})
        out[split] = ImageSet(
            images[keep],
            np.array([r.label for r in recs], dtype=np.int64),
            [str(r.path) for r in recs],
            {k: [r.extras.get(k, "") for r in recs] for k in extra_keys},
        )
    for err in skipped[:5]:
        log.warning("skipped %s", err)
    if len(skipped) > 5:
        log.warning("... and %d more unreadable files", len(skipped) - 5)
    if not out:
        raise DataError(f"data {spec!r} has no images in split(s) {', '.join(splits)}")
    return Dataset(out, spec, skipped)
