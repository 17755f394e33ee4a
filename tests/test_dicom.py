"""DICOM decoding: bit depths, signedness, rescale, windows, MONOCHROME1, compression, multi-frame, and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from cxr_oneclass.data.dicom import apply_window, read_dicom
from cxr_oneclass.data.images import load_image, read_image
from cxr_oneclass.errors import ImageError

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def make_dataset(
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    patient_id: str = "anon",
) -> Dataset:
    """A minimal uncompressed DICOM dataset around arr: (H, W) uint8/uint16/int16, (F, H, W) or (H, W, 3) RGB."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "CR"
    rgb = photometric == "RGB"
    if arr.ndim == 3 and not rgb:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = (arr.shape[-2], arr.shape[-1]) if not rgb else arr.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def write_dicom(path: Path, arr: np.ndarray, **kw) -> Path:
    """Write arr as DICOM; keyword extras: photometric, bits_stored, patient_id, slope, intercept,
    window=(center, width), voi_function, compress ('rle')."""
    slope, intercept, window = kw.pop("slope", None), kw.pop("intercept", None), kw.pop("window", None)
    voi_function, compress = kw.pop("voi_function", None), kw.pop("compress", None)
    ds = make_dataset(arr, **kw)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    if compress == "rle":
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_dicom(path: Path, arr8: np.ndarray, patient_id: str = "anon") -> Path:
    """8-bit MONOCHROME2 DICOM with JPEG Baseline pixel data, as the RSNA release ships (decoded via Pillow)."""
    ds = make_dataset(arr8, patient_id=patient_id)
    buf = io.BytesIO()
    Image.fromarray(arr8).save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(h: int = 32, w: int = 40, lo: int = 0, hi: int = 255, dtype=np.uint8) -> np.ndarray:
    return np.linspace(lo, hi, h * w).reshape(h, w).round().astype(dtype)


def test_monochrome2_8bit_is_scaled_by_min_max(tmp_path):
    arr = ramp(lo=10, hi=200)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr))
    assert out.dtype == np.float32 and out.shape == arr.shape
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, (arr - 10) / 190.0, atol=1e-6)


@pytest.mark.parametrize("bits_stored", [12, 16])
def test_16bit_storage_with_12_and_16_bits(tmp_path, bits_stored):
    top = 2**bits_stored - 1
    arr = ramp(lo=0, hi=top, dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=bits_stored))
    np.testing.assert_allclose(out, arr / top, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    arr = ramp(dtype=np.uint16) * 16
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", arr, bits_stored=12))
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", arr, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0  # lowest stored value is white in MONOCHROME1


def test_rescale_then_window(tmp_path):
    arr = ramp(lo=0, hi=4000, dtype=np.uint16)
    slope, intercept, center, width = 0.5, -1000.0, 0.0, 801.0
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, slope=slope, intercept=intercept,
                                 window=(center, width)))
    hu = arr * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert (out == 0).any() and (out == 1).any() and ((out > 0) & (out < 1)).any()


def test_rescale_without_window_uses_min_max_of_rescaled_values(tmp_path):
    arr = ramp(lo=100, hi=300, dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr, slope=-1.0, intercept=0.0))
    np.testing.assert_allclose(out, (300 - arr) / 200.0, atol=1e-6)  # negative slope flips the scale


def test_signed_pixels(tmp_path):
    arr = ramp(lo=-1000, hi=1000, dtype=np.int16)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr))
    np.testing.assert_allclose(out, (arr + 1000) / 2000.0, atol=1e-6)


@pytest.mark.parametrize("func", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions(tmp_path, func):
    arr = ramp(lo=0, hi=1000, dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr, window=(500, 400), voi_function=func))
    np.testing.assert_allclose(out, apply_window(arr.astype(float), 500, 400, func), atol=1e-5)
    assert 0 <= out.min() and out.max() <= 1


def test_multi_valued_window_uses_the_first(tmp_path):
    arr = ramp(lo=0, hi=1000, dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "a.dcm", arr, window=([500, 100], [201, 50])))
    np.testing.assert_allclose(out, apply_window(arr.astype(float), 500, 201), atol=1e-5)


def test_rle_lossless_equals_uncompressed(tmp_path):
    arr = ramp(dtype=np.uint16) * 16
    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", arr, bits_stored=12))
    path = write_dicom(tmp_path / "rle.dcm", arr, bits_stored=12, compress="rle")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_dicom(path), plain)


def test_jpeg_baseline_as_in_rsna(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    arr = (40 + 3 * xx + yy).astype(np.uint8)
    out = read_dicom(write_jpeg_dicom(tmp_path / "j.dcm", arr))
    expected = (arr - arr.min()) / float(arr.max() - arr.min())
    assert np.abs(out - expected).mean() < 0.02


def test_multi_frame_gives_first_frame(tmp_path):
    frames = np.stack([ramp(dtype=np.uint16), 4095 - ramp(dtype=np.uint16)])
    out = read_dicom(write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12))
    np.testing.assert_allclose(out, frames[0] / 255.0, atol=1e-6)


def test_load_image_dispatches_dicom_by_suffix_and_by_magic(tmp_path):
    arr = ramp(64, 64)
    a = load_image(write_dicom(tmp_path / "a.dcm", arr), 32)
    (tmp_path / "a.dcm").rename(tmp_path / "IM0001")  # archives often have no suffix
    b = load_image(tmp_path / "IM0001", 32)
    assert a.shape == (32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert a[0].mean() < a[-1].mean()


def test_errors_name_the_file(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ImageError, match=r"rgb\.dcm: DICOM is RGB; only greyscale"):
        read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))

    ds = make_dataset(ramp())
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match=r"nopix\.dcm: DICOM has no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")

    (tmp_path / "text.dcm").write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageError, match=r"text\.dcm: not a DICOM file"):
        read_image(tmp_path / "text.dcm")

    good = write_dicom(tmp_path / "good.dcm", ramp(64, 64, dtype=np.uint16), bits_stored=12).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[: len(good) - 3000])
    with pytest.raises(ImageError, match=r"cut\.dcm: .*(pixel data|unreadable)"):
        read_dicom(tmp_path / "cut.dcm")


def test_compressed_without_decoder_says_so(tmp_path):
    ds = make_dataset(ramp(dtype=np.uint16), bits_stored=12)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(tmp_path / "jll.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match=r"jll\.dcm: cannot decode JPEG Lossless"):
        read_dicom(tmp_path / "jll.dcm")
