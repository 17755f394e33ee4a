"""Simulated acquisition shifts of whole films: what the same patients would look like from another site (issue 14).

Each shift maps uint8 films (N, H, W) to uint8 films of the same shape, deterministically. Two families:

- `SHIFTS`: exposure curve, contrast, blur, sharpening, noise, JPEG, a lower resolution, a tighter or wider field.
  S's training simulates some of these (data/synthetic.jitter and reacquire), so they can steer S's choices
  (config detector_pick "shifted").
- `HELDOUT_SHIFTS`: changes that no training step simulates (an anode heel gradient, scatter veil, grid lines,
  collimator edges, a lead marker, another display LUT, histogram equalisation). They only *judge* a choice made
  on the first family; a rule that tuned on them would have no unseen shift left to be judged by.

None of this is a real second site; it is a validation-side proxy for one, used because the test pools may not be.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Shift = Callable[[np.ndarray], np.ndarray]


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Field of view: >1 crops the centre and scales it back up (tighter collimation), <1 pads with edge values."""
    h, w = img.shape
    im = Image.fromarray(img)
    if factor >= 1:
        ch, cw = round(h / factor), round(w / factor)
        t, left = (h - ch) // 2, (w - cw) // 2
        return np.asarray(im.crop((left, t, left + cw, t + ch)).resize((w, h), Image.Resampling.LANCZOS))
    small = np.asarray(im.resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS))
    pt, pl = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    return np.pad(small, ((pt, h - small.shape[0] - pt), (pl, w - small.shape[1] - pl)), mode="edge")


def _lowres(x: np.ndarray) -> np.ndarray:
    side = x.shape[2] * 5 // 8
    return np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.Resampling.BILINEAR)
                                .resize(x.shape[1:][::-1], Image.Resampling.BICUBIC)) for i in x])


def _f(fn: Callable[[np.ndarray], np.ndarray]) -> Shift:
    """A float [0, 1] transform of (N, H, W) applied to uint8 films."""
    return lambda x: np.clip(np.rint(fn(x.astype(np.float32) / 255) * 255), 0, 255).astype(np.uint8)


def _mean(v: np.ndarray) -> np.ndarray:
    return v.mean((1, 2), keepdims=True)


SHIFTS: dict[str, Shift] = {
    "none": lambda x: x,
    "gamma0.7": _f(lambda v: v**0.7),
    "gamma1.4": _f(lambda v: v**1.4),
    "contrast0.75": _f(lambda v: (v - _mean(v)) * 0.75 + _mean(v)),
    "contrast1.25": _f(lambda v: (v - _mean(v)) * 1.25 + _mean(v)),
    "blur0.8": _f(lambda v: ndimage.gaussian_filter(v, (0, 0.8, 0.8))),
    "sharpen": _f(lambda v: v + 0.8 * (v - ndimage.gaussian_filter(v, (0, 1.0, 1.0)))),
    "noise0.02": _f(lambda v: v + np.random.default_rng(0).normal(0, 0.02, v.shape)),
    "jpeg30": lambda x: np.stack([_jpeg(i, 30) for i in x]),
    "lowres": _lowres,
    "zoom1.1": lambda x: np.stack([_zoom(i, 1.1) for i in x]),
    "zoom0.9": lambda x: np.stack([_zoom(i, 0.9) for i in x]),
}


def _ramp(v: np.ndarray, axis: int) -> np.ndarray:
    """0 at one edge of the film, 1 at the other, along `axis` (1: rows, 2: columns), broadcastable to v."""
    n = v.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = n
    return np.linspace(0, 1, n, dtype=np.float32).reshape(shape)


def _collimate(v: np.ndarray) -> np.ndarray:
    """Collimator blades: unexposed (white) bands on both sides, 7% of the width each, with a soft edge."""
    c = np.abs(_ramp(v, 2) * 2 - 1)  # 0 at the centre line, 1 at the edges
    blade = 1 / (1 + np.exp(-(c - 0.86) / 0.01))
    return v * (1 - blade) + 0.92 * blade


def _marker(v: np.ndarray) -> np.ndarray:
    """A lead side marker: a bright letter-like block near the top-left corner (about 8% of the side)."""
    out = v.copy()
    h, w = v.shape[1:]
    s = max(4, round(0.08 * h))
    t, left = round(0.06 * h), round(0.08 * w)
    out[:, t : t + s, left : left + max(1, s // 3)] = 0.97  # the stem of an "L"
    out[:, t + s - max(1, s // 3) : t + s, left : left + s * 2 // 3] = 0.97  # its foot
    return out


def _equalise(v: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of each film (strong processing some sites apply)."""
    out = np.empty_like(v)
    for i, img in enumerate(v):
        q = np.rint(img * 255).astype(np.int64).ravel()
        cdf = np.cumsum(np.bincount(q, minlength=256)).astype(np.float32)
        cdf = (cdf - cdf.min()) / max(1.0, cdf[-1] - cdf.min())
        out[i] = cdf[q].reshape(img.shape)
    return out


HELDOUT_SHIFTS: dict[str, Shift] = {
    # anode heel effect: exposure falls off along the tube axis (about ±10%)
    "heel": _f(lambda v: v * (0.9 + 0.2 * _ramp(v, 1))),
    # scatter without a grid: a low-frequency veil that lifts the blacks and flattens local contrast
    "scatter": _f(lambda v: 0.8 * v + 0.2 * ndimage.gaussian_filter(v, (0, v.shape[1] / 8, v.shape[2] / 8)) + 0.04),
    # a stationary anti-scatter grid's line pattern (and its moire at this resolution)
    "grid": _f(lambda v: v + 0.025 * np.cos(2 * np.pi * np.arange(v.shape[2], dtype=np.float32) / 3.3).reshape(1, 1, -1)),
    "collimate": _f(_collimate),
    "marker": _f(_marker),
    # another display LUT: a sigmoid window instead of the site's curve
    "lut": _f(lambda v: (1 / (1 + np.exp(-(v - 0.5) / 0.18)) - 1 / (1 + np.exp(0.5 / 0.18)))
              / (1 / (1 + np.exp(-0.5 / 0.18)) - 1 / (1 + np.exp(0.5 / 0.18)))),
    "equalise": _f(_equalise),
}
