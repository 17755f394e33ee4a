"""What the published-dataset sources (`nih:`, `rsna:`) share: option parsing, one-pass file index, sized splits.

Spec options follow the path after a `?`, as `key=value` pairs joined by `&`; a value that is a list joins its
items with `+`:  `nih:/data/nih?findings=Pneumonia+Effusion&views=PA&scale=0.5`.

Size options common to every sized source (each defaults to the paper's protocol for that dataset):

    train=N        normal training images
    val=N+M        N normal + M abnormal validation images
    test=N+M       N normal + M abnormal test images
    scale=F        multiply all sizes by F (0 < F <= 1), e.g. for a quick run

When fewer images are present than the sizes ask for, every size is scaled down by the same factor.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .types import Record

log = logging.getLogger(__name__)

SIZE_KEYS = ("train", "val", "test", "scale")


@dataclass(frozen=True)
class SplitSizes:
    """Image counts per split: train is normal only; val/test have normal + abnormal."""

    train: int
    val_normal: int
    val_abnormal: int
    test_normal: int
    test_abnormal: int

    @property
    def normal(self) -> int:
        return self.train + self.val_normal + self.test_normal

    @property
    def abnormal(self) -> int:
        return self.val_abnormal + self.test_abnormal

    def describe(self) -> str:
        return (f"train {self.train} normal; val {self.val_normal} + {self.val_abnormal}; "
                f"test {self.test_normal} + {self.test_abnormal}")


def parse_source_arg(arg: str, scheme: str, allowed: Iterable[str]) -> tuple[Path, dict[str, str]]:
    """`PATH?k=v&k=v` -> (PATH, {k: v}); unknown or repeated keys are a DataError listing the known ones."""
    allowed = tuple(allowed)
    path, sep, query = arg.rpartition("?")
    if not sep or (Path(arg).exists() and not Path(path).exists()):
        path, query = arg, ""  # no options (or a path that itself contains '?')
    path = path.strip()
    if not path:
        raise DataError(f"{scheme}: needs a path, e.g. {scheme}:/data/{scheme}")
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise DataError(f"{scheme}: option {part!r} needs a value (key=value; options: {', '.join(allowed)})")
        if key not in allowed:
            raise DataError(f"{scheme}: unknown option {key!r}; known options: {', '.join(allowed)}")
        if key in opts:
            raise DataError(f"{scheme}: option {key!r} given twice")
        opts[key] = value.strip()
    return Path(path).expanduser(), opts


def split_list(value: str) -> list[str]:
    """`a+b+c` -> ['a', 'b', 'c'] (empty items dropped)."""
    return [v.strip() for v in value.split("+") if v.strip()]


def sizes_from_options(default: SplitSizes, opts: dict[str, str], scheme: str) -> SplitSizes:
    """Apply the `train=`, `val=`, `test=` and `scale=` options to a source's default sizes."""

    def count(text: str, key: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise DataError(f"{scheme}: {key}= needs whole numbers >= 0, got {text!r}")
        return n

    def pair(key: str, normal: int, abnormal: int) -> tuple[int, int]:
        if key not in opts:
            return normal, abnormal
        parts = opts[key].split("+")
        if len(parts) != 2:
            raise DataError(f"{scheme}: {key}= takes NORMAL+ABNORMAL counts, e.g. {key}=849+857; got {opts[key]!r}")
        return count(parts[0], key), count(parts[1], key)

    train = count(opts["train"], "train") if "train" in opts else default.train
    vn, va = pair("val", default.val_normal, default.val_abnormal)
    tn, ta = pair("test", default.test_normal, default.test_abnormal)
    sizes = SplitSizes(train, vn, va, tn, ta)
    if "scale" in opts:
        try:
            f = float(opts["scale"])
        except ValueError:
            f = -1.0
        if not 0 < f <= 1:
            raise DataError(f"{scheme}: scale= needs a number in (0, 1], got {opts['scale']!r}")
        sizes = scale_sizes(sizes, f)
    return sizes


def _scale_group(values: list[int], f: float, cap: int) -> list[int]:
    """Scale counts by f, keeping the total at round(f * sum) (at most cap) by largest remainders."""
    exact = [v * f for v in values]
    out = [int(np.floor(x + 1e-9)) for x in exact]
    total = min(int(round(sum(exact))), cap)
    order = sorted(range(len(values)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order:
        if sum(out) >= total:
            break
        out[i] += 1
    while sum(out) > total:  # only when cap < floor total
        i = max(range(len(out)), key=lambda j: out[j])
        out[i] -= 1
    return out


def scale_sizes(sizes: SplitSizes, f: float, n_normal: int | None = None, n_abnormal: int | None = None) -> SplitSizes:
    tr, vn, tn = _scale_group([sizes.train, sizes.val_normal, sizes.test_normal], f,
                              n_normal if n_normal is not None else sizes.normal)
    va, ta = _scale_group([sizes.val_abnormal, sizes.test_abnormal], f,
                          n_abnormal if n_abnormal is not None else sizes.abnormal)
    return SplitSizes(tr, vn, va, tn, ta)


def fit_sizes(sizes: SplitSizes, n_normal: int, n_abnormal: int) -> SplitSizes:
    """The sizes, scaled down by one factor so that the available normal and abnormal images suffice."""
    ratios = [1.0]
    if sizes.normal:
        ratios.append(n_normal / sizes.normal)
    if sizes.abnormal:
        ratios.append(n_abnormal / sizes.abnormal)
    f = min(ratios)
    return sizes if f >= 1 else scale_sizes(sizes, f, n_normal, n_abnormal)


def split_by_patient_with_sizes(records: list[Record], sizes: SplitSizes, seed: int, scheme: str = "data") -> list[Record]:
    """Pick records for train (normal only) / val / test with the given image counts, patient-disjoint.

    `records` carry label 0/1 and a patient ID (records without one are their own patient). Sizes are first
    scaled down by one common factor when fewer images are present. Every patient goes to one split: in a
    seeded random order, a patient with abnormal images goes to val or test while they still need abnormal
    images (bringing its normal images along as far as that split needs them), a normal-only patient to the
    split with the largest share of its normal count still open (preferring one it fits in whole). Patients
    with abnormal images not needed in val/test only fill normal counts that normal-only patients could not.
    Within a patient, images are taken in a seeded random order up to what the split still needs. Returns the
    chosen records, their `split` set, in a stable order; the seed fixes the choice (input order does not matter).
    """
    usable = [r for r in records if r.label in (0, 1)]
    n_normal = sum(r.label == 0 for r in usable)
    n_abnormal = len(usable) - n_normal
    if sizes.abnormal and n_abnormal == 0:
        raise DataError(f"{scheme}: no abnormal images found; val/test need some")
    if sizes.normal and n_normal == 0:
        raise DataError(f"{scheme}: no normal images found; training needs some")
    target = fit_sizes(sizes, n_normal, n_abnormal)
    if target != sizes:
        log.info("%s: %d normal + %d abnormal images present; sizes scaled down to %s",
                 scheme, n_normal, n_abnormal, target.describe())

    groups: dict[str, list[Record]] = defaultdict(list)
    for r in sorted(usable, key=lambda r: str(r.path)):
        groups[r.patient or f"file:{r.path}"].append(r)
    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    rng.shuffle(keys)
    for k in keys:
        perm = rng.permutation(len(groups[k]))
        groups[k] = [groups[k][i] for i in perm]

    want = {("train", 0): target.train, ("val", 0): target.val_normal, ("val", 1): target.val_abnormal,
            ("test", 0): target.test_normal, ("test", 1): target.test_abnormal}
    need = dict(want)
    chosen: list[Record] = []

    def open_share(split: str, label: int) -> float:
        return need.get((split, label), 0) / want[(split, label)] if want.get((split, label)) else 0.0

    def take(split: str, recs: list[Record]) -> None:
        for r in recs:
            key = (split, r.label)
            if need.get(key, 0) > 0:
                need[key] -= 1
                r.split = split
                chosen.append(r)

    def place_normal_donor(k: str) -> None:
        n0 = sum(r.label == 0 for r in groups[k])
        cands = [s for s in ("train", "val", "test") if need[(s, 0)] > 0]
        if cands:
            fits = [s for s in cands if n0 <= need[(s, 0)]] or cands
            take(max(fits, key=lambda s: open_share(s, 0)), groups[k])

    # One pass in seeded order, so val/test normals mix patients with and without abnormal images as they occur.
    # Patients with abnormal images go to val/test while abnormal images are needed there; after that they are
    # kept back and give their normal images only if normal-only patients do not suffice.
    deferred: list[str] = []
    for k in keys:
        if any(r.label == 1 for r in groups[k]):
            cands = [s for s in ("val", "test") if need[(s, 1)] > 0]
            if cands:
                n1 = sum(r.label == 1 for r in groups[k])
                fits = [s for s in cands if n1 <= need[(s, 1)]] or cands
                take(max(fits, key=lambda s: open_share(s, 1)), groups[k])
            else:
                deferred.append(k)
        else:
            place_normal_donor(k)
    for k in deferred:
        place_normal_donor(k)

    short = {k: v for k, v in need.items() if v > 0}
    if short:
        got = {k: want[k] - short.get(k, 0) for k in want}
        log.warning("%s: patient grouping left the splits short of %s: got train %d; val %d + %d; test %d + %d",
                    scheme, target.describe(), got[("train", 0)], got[("val", 0)], got[("val", 1)],
                    got[("test", 0)], got[("test", 1)])
    order = {"train": 0, "val": 1, "test": 2}
    chosen.sort(key=lambda r: (order[r.split or "test"], str(r.path)))
    return chosen


def index_files(root: Path, suffixes: Iterable[str], also_names: Iterable[str] = ()) -> tuple[dict[str, Path], dict[str, list[Path]], int]:
    """One walk below root: {file name: path} for files with these suffixes, plus paths of the `also_names` files.

    Walk order is sorted, so with duplicate names the first in sorted order wins (the count of others is the
    third return value).
    """
    suffixes = {s.lower() for s in suffixes}
    wanted = {n.lower() for n in also_names}
    index: dict[str, Path] = {}
    found: dict[str, list[Path]] = defaultdict(list)
    dupes = 0
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to a folder already indexed
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            low = name.lower()
            if low in wanted:
                found[low].append(Path(dirpath) / name)
            dot = low.rfind(".")
            if dot >= 0 and low[dot:] in suffixes:
                if name in index:
                    dupes += 1
                else:
                    index[name] = Path(dirpath) / name
    return index, dict(found), dupes


def locate_label_file(root: Path, found: dict[str, list[Path]], names: Iterable[str], scheme: str) -> Path:
    """The shallowest of the named label files found below root (earlier names win at equal depth)."""
    names = [n.lower() for n in names]
    cands = [(len(p.relative_to(root).parts), names.index(n), str(p), p) for n in names for p in found.get(n, [])]
    if not cands:
        raise DataError(f"{scheme}: none of {', '.join(names)} found at or below {root}")
    best = min(cands)[3]
    if len(cands) > 1:
        log.info("%s: using label file %s (%d candidates)", scheme, best, len(cands))
    return best


def describe_records(records: list[Record]) -> str:
    """'train 4479 normal + 0 abnormal; val ...' for records with splits."""
    parts = []
    for split in ("train", "val", "test"):
        n0 = sum(r.split == split and r.label == 0 for r in records)
        n1 = sum(r.split == split and r.label == 1 for r in records)
        parts.append(f"{split} {n0} normal + {n1} abnormal")
    return "; ".join(parts)
