"""Decode one image file (PNG, JPEG, 8/16-bit, grey/colour; DICOM through `dicom.py`) to a float32 grey array.

Every failure is an `ImageError` that names the file and the problem; nothing here prints.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
MIN_SIDE = 16  # smaller than this is not a radiograph at any useful resolution
MAX_PIXELS = 20_000 * 20_000  # larger than any detector; PIL's bomb check would otherwise refuse 10k x 10k


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 (many archives store files without a suffix)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path) -> np.ndarray:
    """The image as float32 (H, W) in [0, 1], brightness as displayed (bone bright)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror})") from exc
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if is_dicom(path):
        from .dicom import read_dicom  # local import: pydicom is only loaded when a DICOM shows up

        arr = read_dicom(path)
    else:
        arr = _read_raster(path)
    h, w = arr.shape
    if min(h, w) < MIN_SIDE:
        raise ImageError(path, f"image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return arr


def _read_raster(path: Path) -> np.ndarray:
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return _to_grey(im)
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large (over {MAX_PIXELS:,} pixels)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated", "broken data stream").
        raise ImageError(path, f"corrupt or truncated image ({exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def _to_grey(im: Image.Image) -> np.ndarray:
    """Any PIL mode to float32 grey in [0, 1]; alpha is dropped (composited on black would darken edges)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(arr / top, 0, 1).astype(np.float32)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode not in ("L", "1"):
            im = im.convert("L")  # ITU-R 601 luma; drops alpha
        return np.asarray(im, dtype=np.float32) / 255.0
    raise ValueError(f"unsupported image mode {mode}")


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize float (H, W) to (size, size) with an antialiasing filter (aspect ratio not kept, as the paper)."""
    if arr.shape == (size, size):
        return arr.astype(np.float32, copy=False)
    im = Image.fromarray(arr.astype(np.float32, copy=False), mode="F")
    # Reduce by integer factors first: cheap and keeps huge images from making a Lanczos pass over 10^8 pixels.
    factor = min(arr.shape) // (2 * size)
    if factor >= 2:
        im = im.reduce(factor)
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode + resize one file to uint8 (size, size); the form images are cached and trained in."""
    return to_uint8(resize(read_image(path), size))
