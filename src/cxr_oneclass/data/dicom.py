"""Read a greyscale DICOM radiograph to float32 (H, W) in [0, 1], brightness as displayed (bone bright).

Steps: pydicom reads the file; the pixels of the first frame are decoded (a multi-frame file gives its first frame
only); the modality LUT is applied (Rescale Slope/Intercept or a Modality LUT Sequence); then the VOI transform:
the first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID) maps straight onto [0, 1], else a
VOI LUT Sequence is applied and scaled by its output range, else the values are scaled by their min/max;
MONOCHROME1 is inverted. 8- to 16-bit, signed or not, are handled alike. All arithmetic is float32 (exact for
stored values up to 24 bits), done in place where it can be: a frame costs its raw pixels plus one float32 copy.

Compressed transfer syntaxes are decoded by whatever pydicom pixel-data plugin is installed: RLE Lossless natively,
JPEG Baseline/Extended and JPEG 2000 through Pillow; JPEG Lossless and JPEG-LS need `pylibjpeg-libjpeg` (GPL) or
`pyjpegls`, and without one the error says so.

Only projection radiographs are read unless `accept_any_modality`: Modality CR, DX or RG (digitised film), or
Modality OT / none, the form a radiograph exported as Secondary Capture usually takes in research sets. CT, MR, NM,
PT, US, XA, RF, MG, SEG, ... are refused, as is any SOP class pydicom knows that is neither a CR/DX nor a Secondary
Capture image storage class (so a CT slice with an empty Modality is refused too). Unknown or private SOP classes
are decided by the Modality alone.

Decompression bombs: before anything is decoded, Rows x Columns x SamplesPerPixel x frames x bytes per sample is
checked against the decode budget (`max_decode_bytes`: `images.read_image` passes `images.MAX_DECODE_BYTES`, the
one knob of the whole decode path; a direct call defaults to this module's `MAX_DECODE_BYTES`, the same 256 MB);
a file larger than the budget is refused unread, and a Deflated Explicit VR file is inflated once, counting and
discarding, to check it stays within the budget (pydicom inflates the whole dataset in memory).

Every failure is an `ImageError` naming the file in one line: not DICOM / unreadable, no pixel data, not a
radiograph, not greyscale (e.g. RGB, YBR), too large, pixel data that cannot be decoded, or any corrupt element
(a bad VR or transfer syntax UID surfaces as ValueError, NotImplementedError, struct.error, ... when read).
pydicom logs a decoder plugin's failure as an ERROR with a full traceback; those records are dropped (filter on
pydicom's own loggers, installed on import), as the failure reaches the caller as that file's `ImageError`.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, PrivateTransferSyntaxes

from ..errors import ImageError

# This module must not import images.py (which imports it, lazily, to keep pydicom unloaded until a DICOM shows
# up): the budget comes in as an argument, and the two small message helpers below are twins of those there.
MAX_DECODE_BYTES = 256 * 2**20  # the budget of a direct read_dicom call (read_image passes images.MAX_DECODE_BYTES)
MAX_PIXELS = 20_000 * 20_000
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
# Secondary Capture exports of radiographs (research sets, PACS exports) carry Modality OT or none at all.
LENIENT_MODALITIES = frozenset({"OT", ""})
RADIOGRAPH_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture (refused later as not greyscale)
})
OVERRIDE_HINT = "use --any-modality (accept_any_modality=True) to read it anyway"
_DEFLATE_UID = str(DeflatedExplicitVRLittleEndian).encode()


class _DropTracebacks(logging.Filter):
    """Drop pydicom records that carry a traceback (`LOGGER.exception` when a decoder plugin fails): the failure
    is raised to us as well and becomes that file's one-line `ImageError`."""

    name_tag = "cxr_oneclass.drop_tracebacks"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info


def _quiet_pydicom_tracebacks() -> None:
    # Filters act on records logged to that very logger (not its children), so each logger that logs exceptions.
    for name in ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base", "pydicom.pixels.utils"):
        logger = logging.getLogger(name)
        if not any(getattr(f, "name_tag", None) == _DropTracebacks.name_tag for f in logger.filters):
            logger.addFilter(_DropTracebacks())


_quiet_pydicom_tracebacks()


def _problem(exc: BaseException) -> str:
    """One line: the exception's type and message, without the traceback `tag_in_exception` appends to some."""
    if isinstance(exc, MemoryError):
        return "out of memory while decoding (MemoryError)"
    text = " ".join(str(exc).split("Traceback (most recent call last)")[0].split())
    name = type(exc).__name__
    if name.lower() == "error":  # struct.error, zlib.error: the bare name says nothing
        name = f"{type(exc).__module__}.{name}"
    return f"{name}: {text[:300]}" if text else name


def human_bytes(n: float) -> str:
    """'312 KB', '1.5 MB', '549 MB'."""
    if n < 2**20:
        return f"{n / 2**10:,.0f} KB"
    return f"{n / 2**20:,.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MB"


def _check_file_budget(path: Path, budget: int) -> None:
    """Refuse, before pydicom reads it, a file larger than the budget, or a deflated one that inflates past it."""
    slack = min(2**20, budget // 8)  # room for the header besides the pixels
    size = path.stat().st_size
    if size > budget + slack:  # its pixels would be over the budget (compressed pixels only grow when decoded)
        raise ImageError(path, f"file too large to decode ({human_bytes(size)}; the limit is {human_bytes(budget)} of pixel data)")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if _DEFLATE_UID not in head:
        return
    try:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble + 'DICM', group length element, group
    except Exception:
        return  # leave the verdict to dcmread
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(2**20):
            while chunk:
                total += len(inflater.decompress(chunk, 2**24))  # bounded: 16 MB at a time, then discarded
                if total > budget + slack:
                    raise ImageError(path, f"deflated DICOM inflates to over {human_bytes(budget)} (the decode limit); "
                                           "refused as a possible decompression bomb")
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break


def _read_dataset(path: Path, budget: int) -> pydicom.Dataset:
    try:
        _check_file_budget(path, budget)
    except OSError as exc:
        raise ImageError(path, f"cannot read ({exc.strerror or exc})") from exc
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no 'DICM' preamble: some archives store bare datasets; accept those only if they hold an image
    except Exception as exc:  # pydicom raises many kinds for truncated or corrupt files
        raise ImageError(path, f"unreadable DICOM ({_problem(exc)})") from exc
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


def _window_in_place(out: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    if func == "SIGMOID":
        out -= center
        out *= -4.0 / width
        with np.errstate(over="ignore"):  # exp overflows to inf far below the window: 1 / (1 + inf) = 0, as wanted
            np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    if func == "LINEAR_EXACT":
        out -= center
        out /= width
        out += 0.5
    elif width == 1:
        out[...] = out >= center - 0.5
    else:  # LINEAR (default)
        out -= center - 0.5
        out /= width - 1
        out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def apply_window(arr: np.ndarray, center: float, width: float, func: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]; float input keeps its dtype, integers become float32."""
    arr = np.asarray(arr)
    out = np.array(arr, dtype=arr.dtype if arr.dtype.kind == "f" else np.float32, copy=True)
    return _window_in_place(out, center, width, func)


def _minmax_in_place(out: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(out.min()) if lo is None else lo
    hi = float(out.max()) if hi is None else hi
    if not hi > lo:
        return np.zeros(out.shape, dtype=np.float32)
    out -= lo
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)


def _refusal(ds: pydicom.Dataset) -> str | None:
    """Why this dataset is not a projection radiograph (see the module docstring), or None when it is one."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    if not sop and hasattr(ds, "file_meta"):
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    uid = UID(sop)
    known_class = bool(sop) and uid.type == "SOP Class"
    if modality in RADIOGRAPH_MODALITIES | LENIENT_MODALITIES and (not known_class or sop in RADIOGRAPH_SOP_CLASSES):
        return None
    what = f"is modality {modality}" if modality else "has no modality"
    if known_class:
        what += f" ({uid.name})"
    return f"DICOM {what}, not a projection radiograph (CR, DX or a Secondary Capture); {OVERRIDE_HINT}"


def _decoded_bytes(ds: pydicom.Dataset, rows: int, cols: int, samples: int) -> tuple[int, int, int]:
    """(bytes all frames decode to, frames, bits allocated), from the header alone."""
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return rows * cols * samples * frames * max(1, (bits + 7) // 8), frames, bits


def read_dicom(path: str | Path, accept_any_modality: bool = False, max_decode_bytes: int | None = None) -> np.ndarray:
    """The first frame of a MONOCHROME1/2 DICOM as float32 (H, W) in [0, 1] (see the module docstring).

    `accept_any_modality` skips the check that the file is a projection radiograph (CT, MR, ... are read too);
    `max_decode_bytes` is the decode budget (default `MAX_DECODE_BYTES`). Every failure is an `ImageError`."""
    path = Path(path)
    budget = MAX_DECODE_BYTES if max_decode_bytes is None else max_decode_bytes
    try:
        return _read_dicom(path, accept_any_modality, budget)
    except ImageError:
        raise
    except Exception as exc:  # corrupt elements surface lazily: ValueError, NotImplementedError, struct.error, ...
        raise ImageError(path, f"corrupt DICOM ({_problem(exc)})") from exc


def _read_dicom(path: Path, accept_any_modality: bool, budget: int) -> np.ndarray:
    ds = _read_dataset(path, budget)
    if not accept_any_modality:
        refusal = _refusal(ds)
        if refusal:
            raise ImageError(path, refusal)
    if not any(t in ds for t in PIXEL_TAGS):
        raise ImageError(path, "DICOM has no pixel data (not an image object, or a truncated file)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        what = photometric or "no PhotometricInterpretation"
        raise ImageError(path, f"DICOM is {what}; only greyscale (MONOCHROME1/MONOCHROME2) images are supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageError(path, f"DICOM has {samples} samples per pixel; greyscale needs 1")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise ImageError(path, f"DICOM has no image size (Rows {rows}, Columns {cols})")
    if rows * cols > MAX_PIXELS:
        raise ImageError(path, f"image too large ({cols}x{rows}, over {MAX_PIXELS:,} pixels)")
    need, frames, bits = _decoded_bytes(ds, rows, cols, samples)
    if need > budget:
        size = f"{cols}x{rows}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageError(path, f"image too large to decode ({size}, {bits}-bit: {human_bytes(need)}; "
                               f"the limit is {human_bytes(budget)})")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and not (UID(ts).is_transfer_syntax or ts in PrivateTransferSyntaxes):
        raise ImageError(path, f"DICOM has an unknown Transfer Syntax UID {str(ts)!r} (corrupt file?)")

    try:
        arr = pixel_array(ds, index=0)
    except Exception as exc:  # decoder plugins raise RuntimeError, ValueError, NotImplementedError, ...
        ts_name = getattr(ts, "name", None) or str(ts or "unknown transfer syntax")
        if ts is not None and "missing dependencies" in str(exc):
            raise ImageError(
                path, f"cannot decode {ts_name} pixel data: no decoder for it is installed "
                "(pydicom plugins: pylibjpeg + pylibjpeg-libjpeg for JPEG Lossless, pyjpegls for JPEG-LS)"
            ) from exc
        raise ImageError(path, f"cannot decode DICOM pixel data ({ts_name}: {_problem(exc)})") from exc
    if arr.ndim == 3:  # a plugin that ignored index=0
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageError(path, f"DICOM pixel array has shape {arr.shape}; expected one greyscale frame")

    try:
        if ds.get("ModalityLUTSequence"):
            values = np.asarray(apply_modality_lut(arr, ds)).astype(np.float32)  # the LUT indexes by the raw integers
        else:
            values = arr.astype(np.float32)  # a copy: the steps below work in place
            if "RescaleSlope" in ds and "RescaleIntercept" in ds:
                values *= np.float32(_first(ds.RescaleSlope))
                values += np.float32(_first(ds.RescaleIntercept))
    except Exception as exc:
        raise ImageError(path, f"invalid modality LUT / rescale ({_problem(exc)})") from exc
    del arr
    window = _window(ds)
    if window is not None:
        out = _window_in_place(values, *window)
    elif "VOILUTSequence" in ds:
        try:
            lut = ds.VOILUTSequence[0]
            out_bits = int(lut.LUTDescriptor[2])
            mapped = np.asarray(apply_voi_lut(values, ds, prefer_lut=True)).astype(np.float32)
            out = _minmax_in_place(mapped, 0.0, float(2**out_bits - 1))
        except Exception as exc:
            raise ImageError(path, f"invalid VOI LUT ({_problem(exc)})") from exc
    else:
        out = _minmax_in_place(values)
    if not np.all(np.isfinite(out)):
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    return out.astype(np.float32, copy=False)
