"""Tests of the synthetic chest radiograph phantom generator (fast: a few seconds)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cxr_oneclass.data import phantom as ph
from cxr_oneclass.data.phantom import ABNORMALITIES, PhantomOptions, PhantomSplit, make_splits, parse_options, render

KINDS = ("normal",) + ABNORMALITIES


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """8-connected binary dilation of (n, H, W) masks (the blur is separable, so it reaches diagonals)."""
    for _ in range(steps):
        pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        h, w = mask.shape[1:]
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= pad[:, dy:dy + h, dx:dx + w]
    return mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [32, 64, 100])
def test_render_shapes_dtype_range(kind, size):
    img, mask = render(5, size=size, seed=1, kind=kind)
    assert img.shape == mask.shape == (5, size, size)
    assert img.dtype == np.float32 and mask.dtype == np.bool_
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.1  # not blank
    if kind == "normal":
        assert not mask.any()
    else:
        assert mask.any(axis=(1, 2)).all()


def test_render_empty_and_bad_arguments():
    img, mask = render(0, size=32)
    assert img.shape == (0, 32, 32) and mask.shape == (0, 32, 32)
    with pytest.raises(ValueError, match="kind"):
        render(1, kind="fracture")
    with pytest.raises(ValueError, match="size"):
        render(1, size=8)
    with pytest.raises(ValueError, match="severity"):
        render(1, severity=1.5)


@pytest.mark.parametrize("kind", ["normal", "nodule", "pneumothorax"])
def test_deterministic_per_seed_and_index(kind):
    a, ma = render(10, size=64, seed=3, kind=kind)
    b, mb = render(10, size=64, seed=3, kind=kind)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    # image i depends only on (seed, i): not on n or how the batch is chunked
    c, mc = render(3, size=64, seed=3, kind=kind)
    np.testing.assert_array_equal(a[:3], c)
    np.testing.assert_array_equal(ma[:3], mc)
    d, _ = render(10, size=64, seed=4, kind=kind)
    assert all(np.abs(a[i] - d[i]).mean() > 0.005 for i in range(10))
    assert all(np.abs(a[i] - a[i + 1]).mean() > 0.005 for i in range(9))


@pytest.mark.parametrize("kind", ABNORMALITIES)
def test_abnormality_only_inside_mask(kind):
    n, size = 12, 64
    normal, nmask = render(n, size=size, seed=7)
    img, mask = render(n, size=size, seed=7, kind=kind, severity=0.5)
    assert not nmask.any()
    assert mask.any(axis=(1, 2)).all()
    diff = np.abs(img - normal)
    # outside the mask grown by the 1-px detector blur the images are identical
    assert diff[~dilate(mask)].max() < 1e-6
    # inside the mask the abnormality is clearly visible at moderate severity
    for i in range(n):
        assert diff[i][mask[i]].mean() > 0.02, (kind, i)
    # masks are localised, not the whole image
    assert mask.mean(axis=(1, 2)).max() < 0.25


@pytest.mark.parametrize("kind", ABNORMALITIES)
def test_severity_scales_abnormality(kind):
    normal, _ = render(8, size=48, seed=2)
    effect = []
    for sev in (0.0, 0.5, 1.0):
        img, mask = render(8, size=48, seed=2, kind=kind, severity=sev)
        assert mask.any(axis=(1, 2)).all()  # even at severity 0 there is something (barely) there
        effect.append(np.abs(img - normal).sum())
    assert effect[0] < effect[1] < effect[2]


def test_pa_film_anatomy_looks_right():
    img, _ = render(16, size=64, seed=0)
    mean = img.mean(axis=0)

    def at(x, y):  # normalised coordinates -> mean intensity of a 3x3 patch
        r, c = int((y + 1) * 32), int((x + 1) * 32)
        return float(mean[r - 1:r + 2, c - 1:c + 2].mean())

    lungs = min(at(-0.45, -0.2), at(0.45, -0.2))
    assert lungs + 0.15 < at(0.0, -0.2)  # aerated lungs darker than the mediastinum
    assert lungs + 0.2 < at(0.0, 0.85)  # ... and than the abdomen below the diaphragm
    assert at(-0.95, 0.2) < 0.15  # air outside the body is black
    assert at(0.3, 0.3) > at(-0.3, 0.3) + 0.1  # heart lies left of the patient's midline: image right


def test_cardiothoracic_ratio():
    """Normal hearts have CTR ~0.4-0.5; cardiomegaly hearts > 0.55 (measured on the drawn shapes)."""
    p, _ = ph._normal_params([(0, 0, 0, i) for i in range(12)])
    for k in ("rot", "dx", "dy"):
        p[k][:] = 0.0
    X, Y = ph._grid(p, 256)
    c = ph._anatomy(X, Y, p)

    def widths(m):
        cols = m.any(axis=1)
        return np.array([np.ptp(np.nonzero(r)[0]) + 1 for r in cols], dtype=float)

    thorax = widths(c["lung_occ"] > 0.5)
    above = c["above"] > 0.5
    ctr = widths((c["heart"] > 0.5) & above) / thorax
    assert 0.38 <= ctr.min() and ctr.max() <= 0.52
    q = np.random.default_rng(0).random((12, ph._N_ABN_DRAWS)).astype(np.float32)
    big_A = ph._cardiomegaly(X, Y, p, c, q, np.zeros((12, 1, 1), np.float32), 2.0 / 256)
    c["A"] = ph._compose(c)
    grown = (big_A - c["A"]) > ph._TAU
    ctr_big = widths(((c["heart"] > 0.5) | grown) & above) / thorax
    assert ctr_big.min() > 0.55


def _digests(split: PhantomSplit) -> set[str]:
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in split.images}


def test_make_splits_sizes_labels_masks():
    opts = PhantomOptions(n_train=20, n_val_normal=6, n_val_abnormal=7, n_test_normal=5, n_test_abnormal=10,
                          size=32, seed=1)
    splits = make_splits(opts)
    assert set(splits) == {"train", "val", "test"}
    expect = {"train": (20, 0), "val": (6, 7), "test": (5, 10)}
    for split, sp in splits.items():
        n_norm, n_abn = expect[split]
        n = n_norm + n_abn
        assert len(sp) == n and sp.images.shape == sp.masks.shape == (n, 32, 32)
        assert sp.images.dtype == np.uint8 and sp.masks.dtype == np.bool_ and sp.labels.dtype == np.int64
        assert len(sp.kinds) == len(sp.names) == n and len(set(sp.names)) == n
        assert int(sp.labels.sum()) == n_abn
        for label, kind, mask, name in zip(sp.labels, sp.kinds, sp.masks, sp.names):
            assert label == (kind != "normal")
            assert mask.any() == bool(label)
            assert name.startswith(f"phantom/{split}/{kind}/")
        assert all(k == "normal" for k in sp.kinds) == (split == "train")
    # abnormal counts spread evenly over the types (7 over 5 -> 2, 2, 1, 1, 1)
    val_counts = [splits["val"].kinds.count(t) for t in ABNORMALITIES]
    assert val_counts == [2, 2, 1, 1, 1]
    assert [splits["test"].kinds.count(t) for t in ABNORMALITIES] == [2] * 5
    # disjoint streams: no image appears twice, within or across splits
    all_digests = [_digests(sp) for sp in splits.values()]
    assert sum(len(d) for d in all_digests) == sum(len(sp) for sp in splits.values())
    assert len(set().union(*all_digests)) == sum(len(d) for d in all_digests)
    # deterministic
    again = make_splits(opts)
    np.testing.assert_array_equal(again["test"].images, splits["test"].images)


def test_make_splits_type_subset_and_seed():
    opts = PhantomOptions(n_train=2, n_val_normal=1, n_val_abnormal=3, n_test_normal=1, n_test_abnormal=4,
                          size=32, types=("effusion", "nodule"))
    splits = make_splits(opts)
    assert splits["test"].kinds == ["normal", "effusion", "effusion", "nodule", "nodule"]
    assert splits["val"].kinds == ["normal", "effusion", "effusion", "nodule"]
    other = make_splits(PhantomOptions(**{**opts.__dict__, "seed": 1}))
    assert not np.array_equal(other["train"].images, splits["train"].images)


def test_parse_options_valid():
    assert parse_options("") == PhantomOptions()
    assert parse_options("  ") == PhantomOptions()
    o = parse_options("n_train=2000,size=128,seed=3,severity=0.3,types=nodule+effusion")
    assert (o.n_train, o.size, o.seed, o.severity, o.types) == (2000, 128, 3, 0.3, ("nodule", "effusion"))
    assert o.n_test_normal == PhantomOptions().n_test_normal
    o = parse_options(" n_val_abnormal = 10 , types = cardiomegaly ")
    assert o.n_val_abnormal == 10 and o.types == ("cardiomegaly",)
    assert parse_options("phantom:size=32").size == 32


@pytest.mark.parametrize("text, words", [
    ("foo=1", ["'foo'", "n_train", "types"]),
    ("size=abc", ["'size'", "integer"]),
    ("size=8", ["'size'", "32"]),
    ("n_train=-1", ["'n_train'"]),
    ("seed=1.5", ["'seed'"]),
    ("severity=2", ["'severity'"]),
    ("severity=x", ["'severity'"]),
    ("types=nodule+fracture", ["'types'", "fracture", "pneumothorax"]),
    ("types=nodule+nodule", ["'types'"]),
    ("n_train", ["'n_train'"]),
    ("size=64,size=32", ["'size'"]),
])
def test_parse_options_invalid(text, words):
    with pytest.raises(ValueError) as err:
        parse_options(text)
    for w in words:
        assert w in str(err.value)


def test_options_validated_directly():
    with pytest.raises(ValueError, match="severity"):
        PhantomOptions(severity=-0.1)
    with pytest.raises(ValueError, match="types"):
        PhantomOptions(types=())
    assert PhantomOptions(types=["nodule"]).types == ("nodule",)
