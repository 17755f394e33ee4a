"""Read a greyscale DICOM radiograph to float32 (H, W) in [0, 1], brightness as displayed (bone bright).

Steps: pydicom reads the file; the pixels of the first frame are decoded (a multi-frame file gives its first frame
only); the modality LUT is applied (Rescale Slope/Intercept or a Modality LUT Sequence); then the VOI transform:
the first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID) maps straight onto [0, 1], else a
VOI LUT Sequence is applied and scaled by its output range, else the values are scaled by their min/max;
MONOCHROME1 is inverted. 8- to 16-bit, signed or not, are handled alike.

Compressed transfer syntaxes are decoded by whatever pydicom pixel-data plugin is installed: RLE Lossless natively,
JPEG Baseline/Extended and JPEG 2000 through Pillow; JPEG Lossless and JPEG-LS need `pylibjpeg-libjpeg` (GPL) or
`pyjpegls`, and without one the error says so.

Every failure is an `ImageError` naming the file: not DICOM / unreadable, no pixel data, not greyscale (e.g. RGB,
YBR), too large, or pixel data that cannot be decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from ..errors import ImageError

MAX_PIXELS = 20_000 * 20_000
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no 'DICM' preamble: some archives store bare datasets; accept those only if they hold an image
    except Exception as exc:  # pydicom raises many kinds for truncated or corrupt files
        raise ImageError(path, f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    try:
        ds = pydicom.dcmread(path, force=True)
        if "Rows" in ds and any(t in ds for t in PIXEL_TAGS):
            return ds
    except Exception:
        pass
    raise ImageError(path, "not a DICOM file (no DICOM header found)")


def _first(value: object) -> float:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _window(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0 or (func == "LINEAR" and width < 1):
        return None
    return center, width, func


def apply_window(arr: np.ndarray, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if func == "LINEAR_EXACT":
        out = (arr - center) / width + 0.5
    elif width == 1:
        out = (arr >= center - 0.5).astype(np.float64)
    else:  # LINEAR (default)
        out = (arr - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0)


def _minmax(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path: str | Path) -> np.ndarray:
    """The first frame of a MONOCHROME1/2 DICOM as float32 (H, W) in [0, 1] (see the module docstring)."""
    path = Path(path)
    ds = _read_dataset(path)
    if not any(t in ds for t in PIXEL_TAGS):
        raise ImageError(path, "DICOM has no pixel data (not an image object, or a truncated file)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        what = photometric or "no PhotometricInterpretation"
        raise ImageError(path, f"DICOM is {what}; only greyscale (MONOCHROME1/MONOCHROME2) images are supported")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageError(path, f"DICOM has {ds.SamplesPerPixel} samples per pixel; greyscale needs 1")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageError(path, f"DICOM has no image size (Rows {rows}, Columns {cols})")
    if rows * cols > MAX_PIXELS:
        raise ImageError(path, f"image too large ({cols}x{rows}, over {MAX_PIXELS:,} pixels)")

    try:
        arr = pixel_array(ds, index=0)
    except Exception as exc:  # decoder plugins raise RuntimeError, ValueError, NotImplementedError, ...
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if ts is not None and getattr(ts, "is_compressed", False) and ("plugin" in msg.lower() or "decod" in msg.lower()):
            raise ImageError(
                path, f"cannot decode {ts_name} pixel data: no decoder for it is installed "
                "(pydicom plugins: pylibjpeg + pylibjpeg-libjpeg for JPEG Lossless, pyjpegls for JPEG-LS)"
            ) from exc
        raise ImageError(path, f"cannot decode DICOM pixel data ({ts_name}: {msg})") from exc
    if arr.ndim == 3:  # a plugin that ignored index=0
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageError(path, f"DICOM pixel array has shape {arr.shape}; expected one greyscale frame")

    values = arr.astype(np.float64)
    try:
        values = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageError(path, f"invalid modality LUT / rescale ({exc})") from exc
    window = _window(ds)
    if window is not None:
        out = apply_window(values, *window)
    elif "VOILUTSequence" in ds:
        try:
            lut = ds.VOILUTSequence[0]
            out_bits = int(lut.LUTDescriptor[2])
            values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
            out = _minmax(values, 0.0, float(2**out_bits - 1))
        except Exception as exc:
            raise ImageError(path, f"invalid VOI LUT ({exc})") from exc
    else:
        out = _minmax(values)
    if not np.all(np.isfinite(out)):
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)
