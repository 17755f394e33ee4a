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
# Set once, process-wide (not per call: decoding runs in threads). PIL's bomb check is off because ours, on the
# header's size and the bytes a decode would need, runs right after open and before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
MAX_DECODE_BYTES = 2**30  # decoded size above which a file is refused (a 20k x 20k RGBA would need 1.6 GB)


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


def read_image(path: str | Path, target: int | None = None) -> np.ndarray:
    """The image as float32 (H, W) in [0, 1], brightness as displayed (bone bright).

    With `target` (the side it will be resized to), a large raster is shrunk while decoding (JPEG DCT scaling,
    then an integer-factor box reduction before the float conversion) to no less than 2 * target per side, so a
    10000 x 10000 file costs its 8/16-bit pixels once, not float copies of them.
    """
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
        h, w = arr.shape
    else:
        arr, (h, w) = _read_raster(path, target)
    if min(h, w) < MIN_SIDE:
        raise ImageError(path, f"image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return arr


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def _read_raster(path: Path, target: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Grey float32 pixels (shrunk towards 2 * target when given) and the file's own (height, width)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(path, f"image too large ({w}x{h}, over {MAX_PIXELS:,} pixels)")
                need = w * h * _BYTES_PER_PIXEL.get(im.mode, 2 if im.mode.startswith("I;16") else 4)
                if need > MAX_DECODE_BYTES:
                    raise ImageError(path, f"image too large to decode ({w}x{h} {im.mode}, {need / 2**20:,.0f} MB)")
                if min(w, h) < MIN_SIDE:
                    raise ImageError(path, f"image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
                if target and im.format == "JPEG":
                    im.draft("L", (2 * target, 2 * target))  # decode at 1/2, 1/4 or 1/8 scale when that suffices
                im.load()
                return _shrink_to_grey(im, target), (h, w)
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large (over {MAX_PIXELS:,} pixels)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated", "broken data stream").
        raise ImageError(path, f"corrupt or truncated image ({exc})") from exc


def _shrink_to_grey(im: Image.Image, target: int | None) -> np.ndarray:
    """`_to_grey`, after an integer-factor box reduction that keeps both sides >= 2 * target."""
    factor = min(im.size) // (2 * target) if target else 0
    if factor < 2:
        return _to_grey(im)
    if im.mode.startswith("I;16"):  # PIL cannot reduce these: block-mean the uint16 array instead
        arr = np.asarray(im)
        h, w = (arr.shape[0] // factor) * factor, (arr.shape[1] // factor) * factor
        blocks = arr[:h, :w].reshape(h // factor, factor, w // factor, factor)
        return (blocks.mean(axis=(1, 3), dtype=np.float32) / 65535.0).astype(np.float32)
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    return _to_grey(im.reduce(factor))


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
    return to_uint8(resize(read_image(path, target=size), size))
