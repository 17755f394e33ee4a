"""The data types every reader, decoder and job shares: a file record, a decoded split, a data set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ImageError

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

    def subset(self, idx: np.ndarray) -> ImageSet:
        idx = np.asarray(idx)
        return ImageSet(
            self.images[idx],
            self.labels[idx],
            [self.names[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.meta.items()},
        )


@dataclass
class Dataset:
    """Decoded splits of one data spec. `split_seed` is the seed the split (and a phantom set's images) was drawn
    with: with `spec` it reproduces exactly this data (runs record both, see `runs.DataProvenance`)."""

    splits: dict[str, ImageSet]
    spec: str
    skipped: list[ImageError] = field(default_factory=list)
    split_seed: int = 0

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
