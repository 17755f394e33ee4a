"""Pictures for people: heat-map overlays. Headless (Agg) matplotlib; files written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402

from .io_utils import atomic_path  # noqa: E402

HEAT_MAX = 0.5  # residual (in [-1,1] units) shown at full colour; larger residuals saturate


def overlay(image_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Grey image with the residual heat map blended on top as colour: uint8 (H, W, 3)."""
    grey = np.repeat(image_u8[..., None].astype(np.float32) / 255.0, 3, axis=2)
    h = np.clip(heat / HEAT_MAX, 0, 1)
    colour = colormaps["inferno"](h)[..., :3]
    a = alpha * h[..., None]  # transparent where the residual is small, so the anatomy stays readable
    return np.clip(np.rint(255 * ((1 - a) * grey + a * colour)), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image_u8: np.ndarray, heat: np.ndarray, upscale: int = 4) -> None:
    """PNG of the image with its heat map, enlarged (nearest) so 64 px maps are visible."""
    rgb = overlay(image_u8, heat)
    im = Image.fromarray(rgb)
    if upscale > 1:
        im = im.resize((rgb.shape[1] * upscale, rgb.shape[0] * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
