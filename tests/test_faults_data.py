"""Faults in the data layer: cache integrity, per-file failures, decompression bombs, non-radiographs, encodings,
symbolic links and pydicom's log noise. Small synthetic files; each test takes well under a second or two."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from conftest import blob_images
from cxr_oneclass.data import decode as sources
from cxr_oneclass.data import dicom as dicom_mod
from cxr_oneclass.data import images as images_mod
from cxr_oneclass.data.cache import ImageCache, file_key
from cxr_oneclass.data.decode import decode_records
from cxr_oneclass.data.dicom import apply_window, read_dicom
from cxr_oneclass.data.images import load_image, read_image
from cxr_oneclass.data.manifest import csv_records, folder_records
from cxr_oneclass.data.types import Record
from cxr_oneclass.errors import ImageError
from test_dicom import make_dataset, ramp, write_dicom


def _pngs(root: Path, n: int = 6, size: int = 24) -> list[Record]:
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, img in enumerate(blob_images(n, size, seed=3)):
        Image.fromarray(img).save(root / f"{i:03d}.png")
        recs.append(Record(root / f"{i:03d}.png", 0, "train"))
    return recs


def _one_line(err: Exception) -> bool:
    return "\n" not in str(err) and "Traceback" not in str(err)


def _local_testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never the network: only files shipped with pydicom
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return str(path)


# ---------------------------------------------------------------------------------------------- 1. cache integrity


def test_zeroed_shard_is_a_miss_with_one_warning(tmp_path, cache_dir, counted, caplog):
    recs = _pngs(tmp_path / "imgs")
    first, ok, _ = decode_records(recs, 16)
    assert all(ok) and len(counted) == 6
    (shard,) = list(cache_dir.rglob("*.npy"))
    arr = np.load(shard, mmap_mode="r+")
    arr[:] = 0  # the header stays valid: only the checksums can tell
    arr.flush()
    del arr
    counted.clear()
    with caplog.at_level(logging.WARNING):
        again, ok, _ = decode_records(recs, 16)
    assert all(ok) and len(counted) == 6  # every entry failed its checksum and was decoded again
    np.testing.assert_array_equal(again, first)
    warnings = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert len(warnings) == 1 and shard.name in warnings[0]
    counted.clear()
    decode_records(recs, 16)  # the re-decoded entries were written again and are used from now on
    assert counted == []


def test_rewrite_with_same_size_and_mtime_misses(tmp_path, cache_dir, counted):
    root = tmp_path / "imgs"
    root.mkdir()
    recs = []
    for i in range(3):  # BMP: the file size depends on the image size only
        Image.fromarray(np.full((24, 24), 40 * i, np.uint8)).save(root / f"{i}.bmp")
        recs.append(Record(root / f"{i}.bmp", 0, "train"))
    first, _, _ = decode_records(recs, 16)
    target = recs[1].path
    st = target.stat()
    Image.fromarray(np.full((24, 24), 250, np.uint8)).save(target)  # as `cp -p` / `rsync -a` / `tar x` leave it:
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # new bytes, same size, same mtime
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    counted.clear()
    again, ok, _ = decode_records(recs, 16)
    assert all(ok) and counted == ["1.bmp"]
    assert (again[1] == 250).all() and not (first[1] == 250).all()


def test_large_files_are_hashed_by_their_ends(tmp_path, monkeypatch):
    from cxr_oneclass.data import cache

    monkeypatch.setattr(cache, "HASH_WHOLE_BYTES", 4096)
    monkeypatch.setattr(cache, "HASH_EDGE_BYTES", 1024)
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(10_000))
    path.write_bytes(data)
    key = file_key(path)
    assert len(key) == 4 and key[0] == os.path.abspath(path)
    data[5000] ^= 1  # the middle is not read ...
    path.write_bytes(data)
    assert file_key(path)[3] == key[3]
    data[-1] ^= 1  # ... the last KB is
    path.write_bytes(data)
    assert file_key(path)[3] != key[3]
    assert cache.FORMAT != "v1"  # caches without content hashes and checksums are not reused


# ---------------------------------------------------------------------------------- 2. per-file failures in a batch


def _dicom_bytes(tmp_path: Path) -> bytes:
    return write_dicom(tmp_path / "good.dcm", ramp(64, 64, dtype=np.uint16), bits_stored=12).read_bytes()


def test_flipped_transfer_syntax_byte_fails_that_file_only(tmp_path, cache_dir):
    good = _dicom_bytes(tmp_path)
    at = good.index(b"1.2.840.10008.1.2.1\x00")
    bad = bytearray(good)
    bad[at + 18] ^= 0x01  # ...1.2.1 -> ...1.2.0: not a transfer syntax
    (tmp_path / "ts.dcm").write_bytes(bytes(bad))
    recs = _pngs(tmp_path / "imgs", n=2) + [Record(tmp_path / "ts.dcm", 0, "train"), Record(tmp_path / "good.dcm", 0, "train")]
    _, ok, errors = decode_records(recs, 16)
    assert ok == [True, True, False, True]
    (err,) = errors
    assert isinstance(err, ImageError) and Path(err.path).name == "ts.dcm" and _one_line(err)
    assert "1.2.840.10008.1.2.0" in err.problem


def test_corrupted_vr_is_one_line_image_error(tmp_path):
    good = _dicom_bytes(tmp_path)
    at = good.index(struct.pack("<HH", 0x0028, 0x0010) + b"US")  # Rows, explicit VR
    bad = bytearray(good)
    bad[at + 4 : at + 6] = b"ZZ"
    (tmp_path / "vr.dcm").write_bytes(bytes(bad))
    with pytest.raises(ImageError, match=r"vr\.dcm: corrupt DICOM \(NotImplementedError: Unknown Value Representation") as info:
        read_dicom(tmp_path / "vr.dcm")
    assert _one_line(info.value)
    _, ok, errors = decode_records([Record(tmp_path / "vr.dcm", 0, "train"), Record(tmp_path / "good.dcm", 0, "train")], 16, cache=False)
    assert ok == [False, True] and len(errors) == 1


def test_memory_error_costs_one_file(tmp_path, cache_dir, monkeypatch):
    recs = _pngs(tmp_path / "imgs", n=4)
    real_resize = images_mod.resize

    def resize(arr, size):  # inside load_image, after the decode
        if arr.shape and resize.calls == 1:
            resize.calls += 1
            raise MemoryError
        resize.calls += 1
        return real_resize(arr, size)

    resize.calls = 0
    monkeypatch.setattr(images_mod, "resize", resize)
    _, ok, errors = decode_records(recs, 16, workers=1)
    assert ok.count(False) == 1 and len(errors) == 1
    assert "out of memory while decoding (MemoryError)" in errors[0].problem and _one_line(errors[0])
    assert errors[0].__traceback__ is None and errors[0].__cause__ is None  # the failed decode's arrays are let go

    real_load = sources.load_image

    def load(path, size):
        if Path(path).name == "002.png":
            raise MemoryError
        return real_load(path, size)

    monkeypatch.setattr(sources, "load_image", load)
    _, ok, errors = decode_records(recs, 16, cache=False)
    assert ok == [True, True, False, True]
    assert Path(errors[0].path).name == "002.png" and "MemoryError" in errors[0].problem


def test_other_unexpected_exceptions_cost_one_file(tmp_path, monkeypatch):
    good = write_dicom(tmp_path / "a.dcm", ramp(64, 64))

    def broken(ds, index=0):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(dicom_mod, "pixel_array", broken)
    with pytest.raises(ImageError, match=r"a\.dcm: cannot decode DICOM pixel data \(.*struct\.error: unpack"):
        read_dicom(good)
    monkeypatch.setattr(dicom_mod, "_refusal", lambda ds: {}["Modality"])  # a KeyError from our own code
    with pytest.raises(ImageError, match=r"a\.dcm: corrupt DICOM \(KeyError: 'Modality'\)"):
        load_image(good, 32)


# ------------------------------------------------------------------------------------- 3. decompression bombs


def test_pillow_bomb_check_is_left_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


def test_dicom_over_the_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_DECODE_BYTES", 100_000)
    calls = []
    monkeypatch.setattr(dicom_mod, "pixel_array", lambda *a, **k: calls.append(1))
    path = write_dicom(tmp_path / "rle.dcm", np.zeros((400, 400), np.uint16), compress="rle")
    assert path.stat().st_size < 20_000  # small file, 320 KB of pixels
    with pytest.raises(ImageError, match=r"rle\.dcm: image too large to decode \(400x400, 16-bit: 312 KB; the limit is 98 KB\)"):
        load_image(path, 32)  # images.MAX_DECODE_BYTES governs the whole decode path
    frames = write_dicom(tmp_path / "frames.dcm", np.zeros((8, 128, 128), np.uint16), compress="rle")
    with pytest.raises(ImageError, match=r"frames\.dcm: image too large to decode \(128x128 x 8 frames"):
        read_image(frames)  # 32 KB per frame, 256 KB in all
    with pytest.raises(ImageError, match=r"frames\.dcm: image too large to decode"):
        read_dicom(frames, max_decode_bytes=100_000)  # a direct call takes the budget as an argument
    assert calls == []
    plain = write_dicom(tmp_path / "plain.dcm", np.zeros((400, 400), np.uint16))
    with pytest.raises(ImageError, match=r"plain\.dcm: file too large to decode"):
        read_image(plain)


def test_deflated_dicom_bomb_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    path = tmp_path / "dfl.dcm"
    shutil.copy(_local_testdata("image_dfl.dcm"), path)  # 4.6 KB deflated, 512 x 512 8-bit: 256 KB
    assert read_dicom(path).shape == (512, 512)  # within the default budget, and an OT Secondary Capture
    monkeypatch.setattr(images_mod, "MAX_DECODE_BYTES", 100_000)

    def dcmread(*a, **k):
        raise AssertionError("pydicom inflated the dataset")

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    with pytest.raises(ImageError, match=r"dfl\.dcm: deflated DICOM inflates to over 98 KB"):
        read_image(path)


def test_raster_over_the_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    Image.new("I;16", (800, 600)).save(tmp_path / "wide16.png")  # 960 KB of pixels in a tiny file
    monkeypatch.setattr(images_mod, "MAX_DECODE_BYTES", 500_000)
    with pytest.raises(ImageError, match=r"wide16\.png: image too large to decode \(800x600 I;16"):
        load_image(tmp_path / "wide16.png", 32)


def test_decoding_works_in_float32(tmp_path):
    arr = (np.arange(1024 * 1024) % 4096).reshape(1024, 1024).astype(np.uint16)
    path = write_dicom(tmp_path / "a.dcm", arr, bits_stored=12, slope=0.5, intercept=-1000.0, window=(0.0, 801.0))
    read_dicom(path)
    tracemalloc.start()
    try:
        out = read_dicom(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32
    # raw pixel data (2 B/px) + decoded frame (2) + one float32 copy (4); float64 steps needed 28 B/px
    assert peak < 12 * arr.size, f"peak {peak / 2**20:.1f} MB"
    assert apply_window(arr, 2048, 1000).dtype == np.float32
    Image.fromarray(np.full((32, 32), 40000, np.int32)).save(tmp_path / "i32.tif")  # mode I
    assert read_image(tmp_path / "i32.tif").dtype == np.float32


# ------------------------------------------------------------------------------ 4. not a chest radiograph


NON_RADIOGRAPHS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
}


def _dicom_as(path: Path, modality: str | None, sop: str) -> Path:
    ds = make_dataset(ramp(64, 64, dtype=np.uint16), bits_stored=12)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("modality", sorted(NON_RADIOGRAPHS))
def test_non_radiographs_are_refused_unless_asked(tmp_path, modality):
    path = _dicom_as(tmp_path / f"{modality}.dcm", modality, NON_RADIOGRAPHS[modality])
    with pytest.raises(ImageError, match=rf"{modality}\.dcm: DICOM is modality {modality} \(.*\), not a projection "
                                         r"radiograph .*--any-modality"):
        read_dicom(path)
    assert read_dicom(path, accept_any_modality=True).shape == (64, 64)
    assert load_image(path, 32, accept_any_modality=True).shape == (32, 32)


def test_pydicom_ct_and_mr_samples_are_refused(tmp_path):
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")):
        with pytest.raises(ImageError, match=rf"modality {modality} .*--any-modality"):
            load_image(_local_testdata(name), 32)


def test_secondary_capture_and_unknown_modality_are_radiographs(tmp_path):
    sc = "1.2.840.10008.5.1.4.1.1.7"
    assert read_dicom(_dicom_as(tmp_path / "ot.dcm", "OT", sc)).shape == (64, 64)
    assert read_dicom(_dicom_as(tmp_path / "none.dcm", None, sc)).shape == (64, 64)
    assert read_dicom(_dicom_as(tmp_path / "dx.dcm", "DX", "1.2.840.10008.5.1.4.1.1.1.1")).shape == (64, 64)
    assert read_dicom(_dicom_as(tmp_path / "private.dcm", "CR", "1.2.3.4.5")).shape == (64, 64)
    # no modality, but the SOP class says CT
    with pytest.raises(ImageError, match=r"ct_class\.dcm: DICOM has no modality \(CT Image Storage\)"):
        read_dicom(_dicom_as(tmp_path / "ct_class.dcm", None, NON_RADIOGRAPHS["CT"]))


def test_decode_records_passes_the_override(tmp_path, cache_dir):
    recs = [Record(_dicom_as(tmp_path / "ct.dcm", "CT", NON_RADIOGRAPHS["CT"]), 0, "test"),
            Record(_dicom_as(tmp_path / "cr.dcm", "CR", "1.2.840.10008.5.1.4.1.1.1"), 0, "test")]
    _, ok, errors = decode_records(recs, 16)
    assert ok == [False, True] and "--any-modality" in errors[0].problem
    _, ok, errors = decode_records(recs, 16, accept_any_modality=True)
    assert ok == [True, True] and errors == []


# --------------------------------------------------------------------------------------------- 5. encodings


def test_latin1_manifest_is_read_with_a_warning(tmp_path, caplog):
    for i, img in enumerate(blob_images(2, 24, seed=5)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    with open(tmp_path / "m.csv", "w", newline="", encoding="cp1252") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "site"])
        w.writerows([["0.png", "normal", "Hôpital Saint-Éloi"], ["1.png", "abnormal", "Zürich – Süd"]])
    with caplog.at_level(logging.WARNING):
        recs = csv_records(str(tmp_path / "m.csv"))
    assert [r.extras["site"] for r in recs] == ["Hôpital Saint-Éloi", "Zürich – Süd"]
    assert any("m.csv is not UTF-8" in r.getMessage() and "cp1252" in r.getMessage() for r in caplog.records)


def test_utf8_bom_manifest_is_read_quietly(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("file,label,site\n0.png,normal,Hôpital\n", encoding="utf-8-sig")
    with caplog.at_level(logging.WARNING):
        (rec,) = csv_records(str(tmp_path / "m.csv"))
    assert rec.extras["site"] == "Hôpital" and not caplog.records


def _non_utf8_png(folder: Path, value: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # latin-1 bytes: not valid UTF-8
    Image.fromarray(np.full((24, 24), value, np.uint8)).save(os.fsdecode(raw))
    return Path(os.fsdecode(raw))


def test_latin1_manifest_finds_a_latin1_file_name(tmp_path, cache_dir):
    path = _non_utf8_png(tmp_path)
    (tmp_path / "m.csv").write_bytes(b"file,label\ncaf\xe9.png,normal\n")
    (rec,) = csv_records(str(tmp_path / "m.csv"))
    assert rec.path == path and rec.path.is_file()
    for _ in range(2):  # decoded, then from the cache
        out, ok, errors = decode_records([rec], 16)
        assert ok == [True] and (out[0] == 200).all()


def test_non_utf8_file_names_through_folder_decode_and_cache(tmp_path, cache_dir):
    data = tmp_path / "data"
    path = _non_utf8_png(data / "normal")
    Image.fromarray(np.full((24, 24), 90, np.uint8)).save(data / "normal" / "plain.png")
    recs = folder_records(str(data))
    assert [r.path for r in recs] == sorted([path, data / "normal" / "plain.png"])
    for _ in range(2):
        out, ok, _ = decode_records(recs, 16)
        assert all(ok)
    (shard,) = list(cache_dir.rglob("*.json"))
    shard.read_bytes().decode("ascii")  # escaped, so valid UTF-8 (ASCII even)
    keys = ImageCache(cache_dir, 16)._load_index()
    assert file_key(path) in keys


# --------------------------------------------------------------------------------------- 6. symlinked folders


def test_symlinked_subfolders_are_followed_once(tmp_path):
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    (data / "abnormal").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i, img in enumerate(blob_images(3, 24, seed=7)):
        Image.fromarray(img).save((data / "normal" if i == 0 else elsewhere) / f"{i}.png")
    Image.fromarray(blob_images(1, 24, seed=8)[0]).save(data / "abnormal" / "a.png")
    (data / "normal" / "more").symlink_to(elsewhere, target_is_directory=True)
    (data / "normal" / "again").symlink_to(elsewhere, target_is_directory=True)  # a second link: not listed twice
    (elsewhere / "loop").symlink_to(data / "normal", target_is_directory=True)  # a loop ends
    (data / "normal" / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link is no image file

    found = images_mod.find_images(data / "normal")
    assert sorted(p.name for p in found) == ["0.png", "1.png", "2.png"] and found == sorted(found)
    recs = folder_records(str(data))
    assert sorted((r.path.name, r.label) for r in recs) == [("0.png", 0), ("1.png", 0), ("2.png", 0), ("a.png", 1)]


# ------------------------------------------------------------------------------------ 7. quiet decoder failures


def test_failed_decoder_logs_no_traceback(tmp_path, caplog):
    ds = make_dataset(ramp(64, 64))
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9"])  # not a JPEG Pillow can read
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "j.dcm", enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        _, ok, errors = decode_records([Record(tmp_path / "j.dcm", 0, "train")], 16, cache=False)
    assert ok == [False] and _one_line(errors[0])
    assert "cannot decode DICOM pixel data (JPEG Baseline" in errors[0].problem
    assert "no decoder for it is installed" not in errors[0].problem  # a decoder is installed: the data is bad
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]

