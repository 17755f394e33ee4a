"""Decode one image file (PNG, JPEG, 8/16-bit, grey/colour; DICOM through `dicom.py`) to a float32 grey array.

Every failure is an `ImageError` that names the file and the problem in one line, whatever raised it (a decoder's
own exception, a MemoryError), so one bad file never ends a batch; nothing here prints.

Decompression bombs: a file whose decoded pixels (at its own bit depth, all frames) would exceed `MAX_DECODE_BYTES`
is refused from its header, before any pixel is decoded. Pillow's own bomb check stays on as Pillow sets it
(over 2 x `Image.MAX_IMAGE_PIXELS`, about 179 million pixels, is refused at open); only its warning between one
and two times that limit is silenced, per call.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from .sniff import sniff_dicom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
MIN_SIDE = 16  # smaller than this is not a radiograph at any useful resolution
MAX_PIXELS = 20_000 * 20_000  # larger than any detector
# Decoded pixel bytes (width x height x bytes per pixel, x frames for DICOM) above which a file is refused before
# decoding; the working memory of a decode is about 3x this (the raw pixels plus float32 copies). A 43 cm detector
# at 0.1 mm is 4300 x 4300 x 2 bytes = 37 MB; 256 MB still admits a 10000 x 10000 16-bit scan. Read at call time
# and passed on to `read_dicom`, so lowering it (monkeypatch) lowers every decode path.
MAX_DECODE_BYTES = 256 * 2**20


def problem_of(exc: BaseException) -> str:
    """An unexpected exception as one short line: its type and message, without the tracebacks that some
    pydicom messages carry (`tag_in_exception` appends one)."""
    text = " ".join(str(exc).split("Traceback (most recent call last)")[0].split())
    if len(text) > 300:
        text = text[:297] + "..."
    name = type(exc).__name__
    if name.lower() == "error":  # struct.error, zlib.error, binascii.Error: the bare name says nothing
        name = f"{type(exc).__module__}.{name}"
    return f"{name}: {text}" if text else name


def error_for(path: str | os.PathLike[str], exc: BaseException, what: str = "cannot decode") -> ImageError:
    """The `ImageError` of a file whose decode raised something unexpected."""
    if isinstance(exc, MemoryError):
        return ImageError(path, "out of memory while decoding (MemoryError)")
    return ImageError(path, f"{what} ({problem_of(exc)})")


def human_bytes(n: float) -> str:
    """'312 KB', '1.5 MB', '549 MB'."""
    if n < 2**20:
        return f"{n / 2**10:,.0f} KB"
    return f"{n / 2**20:,.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MB"


@contextmanager
def one_file(path: str | os.PathLike[str], what: str = "cannot decode") -> Iterator[None]:
    """Turn any exception but our own `ImageError` into one for `path`: decoders raise whatever they like
    (ValueError, KeyError, struct.error, OSError, MemoryError, ...) and a batch must lose only this file.
    KeyboardInterrupt and SystemExit are not `Exception`s and pass through."""
    try:
        yield
    except ImageError:
        raise
    except Exception as exc:
        raise error_for(path, exc, what) from exc


def walk_files(root: str | os.PathLike[str], keep: Callable[[os.DirEntry], bool]) -> tuple[list[Path], list[ImageError]]:
    """Regular files below `root` that `keep` accepts, following symbolic links to folders (`Path.rglob` does not
    before Python 3.13), each folder once by its device and inode (a link loop ends; two links to one folder do not
    list it twice); and an error for each folder or file that could not be read (it may hold images)."""
    found: list[Path] = []
    errors: list[ImageError] = []
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            errors.append(ImageError(folder, f"cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # follows links
                    stack.append(entry.path)
                elif entry.is_file() and keep(entry):  # not a broken link, socket or fifo
                    found.append(Path(entry.path))
            except OSError as exc:
                errors.append(ImageError(entry.path, f"cannot read ({exc.strerror or exc})"))
    return found, errors


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Image files (by suffix) anywhere below `root`, following symbolic links to folders, sorted; unreadable
    folders and broken links are skipped, as `rglob` does."""
    return sorted(walk_files(root, lambda e: Path(e.name).suffix.lower() in IMAGE_SUFFIXES)[0])


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by content (`sniff`: the 'DICM' magic, or a dataset without preamble), since many
    archives store files without a suffix."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        return bool(sniff_dicom(path))
    except OSError:
        return False


def read_image(path: str | Path, target: int | None = None, accept_any_modality: bool = False) -> np.ndarray:
    """The image as float32 (H, W) in [0, 1], brightness as displayed (bone bright).

    With `target` (the side it will be resized to), a large raster is shrunk while decoding (JPEG DCT scaling,
    then an integer-factor box reduction before the float conversion) to no less than 2 * target per side, so a
    10000 x 10000 file costs its 8/16-bit pixels once, not float copies of them. `accept_any_modality` reads
    DICOMs that are not projection radiographs too (CT, MR, ...; see `dicom.py`).
    """
    path = Path(path)
    with one_file(path):
        return _read_image(path, target, accept_any_modality)


def _read_image(path: Path, target: int | None, accept_any_modality: bool) -> np.ndarray:
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

        arr = read_dicom(path, accept_any_modality=accept_any_modality, max_decode_bytes=MAX_DECODE_BYTES)
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
                    raise ImageError(path, f"image too large to decode ({w}x{h} {im.mode}, {human_bytes(need)}; "
                                           f"the limit is {human_bytes(MAX_DECODE_BYTES)})")
                if min(w, h) < MIN_SIDE:
                    raise ImageError(path, f"image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
                if target and im.format == "JPEG":
                    im.draft("L", (2 * target, 2 * target))  # decode at 1/2, 1/4 or 1/8 scale when that suffices
                im.load()
                return _shrink_to_grey(im, target), (h, w)
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large ({_bomb_size(exc)})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated", "broken data stream").
        raise ImageError(path, f"corrupt or truncated image ({exc})") from exc


def _bomb_size(exc: Exception) -> str:
    """Pillow's 'Image size (N pixels) exceeds limit of M pixels, ...' as 'N pixels; ...' with thousands marks."""
    numbers = [int(n) for n in re.findall(r"\d+", str(exc))]
    if len(numbers) >= 2:
        return f"{numbers[0]:,} pixels; Pillow refuses over {numbers[1]:,} as a possible decompression bomb"
    return str(exc)


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
        arr = np.asarray(im, dtype=np.float32)  # exact up to 2**24; the values are 8/16-bit grey in practice
        top = 65535.0 if arr.max() > 255 else 255.0
        arr /= top
        return np.clip(arr, 0, 1, out=arr)
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


def load_image(path: str | Path, size: int, accept_any_modality: bool = False) -> np.ndarray:
    """Decode + resize one file to uint8 (size, size); the form images are cached and trained in.

    Any failure is an `ImageError` naming the file (see `read_image`; `accept_any_modality` as there)."""
    arr = read_image(path, target=size, accept_any_modality=accept_any_modality)
    with one_file(path, "cannot resize"):
        return to_uint8(resize(arr, size))
