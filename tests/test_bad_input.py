"""Bad input gets a clear error naming the file and the problem; odd-but-valid input is decoded."""

from __future__ import annotations

import csv
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blob_images
from cxr_oneclass.data.images import load_image, read_image
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.errors import DataError, ImageError
from test_dicom import make_dataset, ramp


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.setenv("CXR_ONECLASS_CACHE", "off")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_black_png(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = 0,
                    pixels: bool = True) -> Path:
    """A black PNG streamed row by row (never the whole image in memory); pixels=False writes the header only."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    idat = bytearray()
    if pixels:
        for _ in range(height):
            idat += z.compress(row)
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b""))
    return path


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.png", 32)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated image"):
        load_image(tmp_path / "cut.png", 32)


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("patient list, not an image\n")
    with pytest.raises(ImageError, match=r"notes\.png: not a readable image"):
        load_image(tmp_path / "notes.png", 32)


def test_dicom_without_pixels(tmp_path):
    ds = make_dataset(ramp())
    del ds.PixelData
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(ImageError, match=r"report\.dcm: DICOM has no pixel data"):
        load_image(tmp_path / "report.dcm", 32)


def test_rgba_is_read_as_luma_ignoring_alpha(tmp_path):
    grey = blob_images(1, 40, seed=0)[0]
    rgba = np.dstack([grey, grey, grey, np.zeros_like(grey)])  # fully transparent: alpha must not blank it
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", 32), load_image(tmp_path / "grey.png", 32))


def test_one_pixel_image(tmp_path):
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError, match=r"dot\.png: image is 1x1 pixels; at least 16x16 is needed"):
        load_image(tmp_path / "dot.png", 32)


def test_10000_square_png_is_decoded_cheaply(tmp_path):
    path = write_black_png(tmp_path / "huge.png", 10_000, 10_000)
    assert path.stat().st_size < 200_000
    t0 = time.perf_counter()
    out = load_image(path, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and not out.any()
    assert time.perf_counter() - t0 < 15
    # the reduction happens before the float conversion: read_image returns about 2 * target per side
    assert read_image(path, target=64).shape == (129, 129)  # 10000 / (10000 // 128), rounded up


def test_large_16bit_png_is_reduced_too(tmp_path):
    path = write_black_png(tmp_path / "big16.png", 4_000, 3_000, bit_depth=16)
    arr = read_image(path, target=64)
    assert arr.dtype == np.float32 and arr.shape == (3000 // 23, 4000 // 23) and not arr.any()


def test_oversized_images_are_refused_before_decoding(tmp_path):
    path = write_black_png(tmp_path / "giant.png", 25_000, 25_000, pixels=False)
    # Pillow's own decompression-bomb check (left on) refuses it at open
    with pytest.raises(ImageError, match=r"giant\.png: image too large \(625,000,000 pixels; Pillow refuses"):
        load_image(path, 64)
    path = write_black_png(tmp_path / "rgba.png", 12_000, 12_000, colour_type=6, pixels=False)
    with pytest.raises(ImageError, match=r"rgba\.png: image too large to decode \(12000x12000 RGBA, 549 MB; "
                                         r"the limit is 256 MB\)"):
        load_image(path, 64)


def _manifest(root: Path, header, rows) -> Path:
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return root / "manifest.csv"


def test_label_file_with_missing_column(tmp_path):
    m = _manifest(tmp_path, ("file", "diagnosis"), [("a.png", "normal")])
    with pytest.raises(DataError, match=r"manifest\.csv: missing column\(s\) label \(found: file, diagnosis\)"):
        load_dataset(f"csv:{m}", 32)


def test_label_file_with_unknown_label(tmp_path):
    m = _manifest(tmp_path, ("file", "label"), [("a.png", "normal"), ("b.png", "maybe")])
    with pytest.raises(DataError, match=r"manifest\.csv line 3: unknown label 'maybe'"):
        load_dataset(f"csv:{m}", 32)


def test_bad_files_in_a_dataset_are_skipped_and_named(tmp_path):
    rows = []
    for i, img in enumerate(blob_images(8, 24, seed=1)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", "normal", "train"))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    rows += [("empty.png", "normal", "train"), ("text.png", "normal", "train"), ("gone.png", "normal", "train")]
    ds = load_dataset(f"csv:{_manifest(tmp_path, ('file', 'label', 'split'), rows)}", 16, splits=("train",))
    assert len(ds["train"]) == 8
    problems = {Path(e.path).name: e.problem for e in ds.skipped}
    assert problems == {"empty.png": "empty file (0 bytes)",
                        "text.png": "not a readable image (unknown or corrupt format)",
                        "gone.png": "file not found"}
    assert "3 unreadable files skipped" in ds.summary()
