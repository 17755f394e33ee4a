"""Data specs (`csv:`, `folder:`, `nih:`, `rsna:`, `phantom:`): the reader registry, splits by patient, and
`load_dataset`, which turns a spec into decoded image sets. Adding a reader touches this table and its module."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError
from . import phantom
from .decode import decode_records
from .manifest import csv_records, folder_records
from .nih import nih_records
from .rsna import rsna_records
from .types import SPLITS, Dataset, ImageSet, Record

log = logging.getLogger(__name__)

# A reader gets the spec's argument and the split seed (for readers that choose their own splits).
RecordSource = Callable[[str, int], list[Record]]
RECORD_SOURCES: dict[str, RecordSource] = {
    "csv": csv_records,
    "folder": folder_records,
    "nih": nih_records,
    "rsna": rsna_records,
}


def _phantom(arg: str, image_size: int, seed: int) -> Dataset:
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
    return Dataset(splits, spec=f"phantom:{arg}", split_seed=seed)


InMemorySource = Callable[[str, int, int], Dataset]
IN_MEMORY_SOURCES: dict[str, InMemorySource] = {"phantom": _phantom}


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


def resolve_spec(spec: str, base: str | Path | None = None) -> str:
    """The spec with its path made absolute (relative paths are taken from `base`, default the working folder), so
    that a run records data it can find again from anywhere. Options after `?` and phantom specs are kept as given."""
    scheme, arg = parse_spec(spec)
    if scheme not in RECORD_SOURCES or not arg:
        return spec
    path, sep, options = arg.partition("?")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or Path.cwd()) / p
    return f"{scheme}:{os.path.abspath(p)}{sep}{options}"  # abspath: normalised, symbolic links kept as given


def load_dataset(spec: str, image_size: int, seed: int = 0, splits: tuple[str, ...] = SPLITS, workers: int = 0) -> Dataset:
    """Resolve a data spec to decoded, split image sets (only the `splits` asked for are decoded).

    `seed` draws the split of sources without one (and a phantom set's images); the returned `Dataset` records it
    as `split_seed` and the spec with absolute paths, which together reproduce exactly this split."""
    spec = resolve_spec(spec)
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
    return build_dataset(records, spec, image_size, splits, workers, split_seed=seed)


def build_dataset(records: list[Record], spec: str, image_size: int, splits: tuple[str, ...] = SPLITS, workers: int = 0,
                  split_seed: int = 0) -> Dataset:
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
    check_overlap(out, spec)
    return Dataset(out, spec, skipped, split_seed)


def check_overlap(splits: dict[str, ImageSet], spec: str) -> None:
    """Refuse an image in two splits, by resolved path or by identical decoded pixels (a copy under another name):
    a test image that was trained on inflates AUC. Duplicates within a split are only warned about."""
    seen: dict[str, str] = {}  # path or pixel digest -> the split it was first seen in
    clashes: list[str] = []
    for name, images in splits.items():
        here: set[str] = set()
        dups = 0
        for path, pixels in zip(images.names, images.images):
            keys = (os.path.realpath(path), "pixels:" + hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest())
            if any(k in here for k in keys):
                dups += 1
            for k in keys:
                other = seen.get(k)
                if other is not None and other != name:
                    clashes.append(f"{path} ({other} and {name}{', same pixels' if k.startswith('pixels:') else ''})")
                    break
            here.update(keys)
        if dups:
            log.warning("data %s: %d duplicate image(s) in the %s split (same file or same pixels)", spec, dups, name)
        for k in here:
            seen.setdefault(k, name)
    if clashes:
        raise DataError(f"data {spec!r}: {len(clashes)} image(s) are in two splits, e.g. {'; '.join(clashes[:3])}: a "
                        "split must not see another's images (fix the manifest's split column or remove the copies)")
