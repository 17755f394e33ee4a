"""The on-disk cache of decoded images: reuse, invalidation, resume after interruption, off switch, failures."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blob_images, write_folder_dataset
from cxr_oneclass.data import decode as sources
from cxr_oneclass.data.cache import FORMAT, ImageCache, cache_root, file_key
from cxr_oneclass.data.decode import decode_records
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.types import Record


def _records(root: Path, n: int = 12, size: int = 24) -> list[Record]:
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, img in enumerate(blob_images(n, size, seed=n)):
        Image.fromarray(img).save(root / f"{i:03d}.png")
        recs.append(Record(root / f"{i:03d}.png", 0, "train"))
    return recs


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_ONECLASS_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "cxr-oneclass"
    monkeypatch.setenv("CXR_ONECLASS_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    for off in ("off", "OFF", "0", "none"):
        monkeypatch.setenv("CXR_ONECLASS_CACHE", off)
        assert cache_root() is None and ImageCache.from_env(32) is None


def test_second_load_reads_the_cache_without_decoding(tmp_path, cache_dir, monkeypatch):
    data = write_folder_dataset(tmp_path / "data")
    first = load_dataset(f"folder:{data}", 32)
    shards = sorted((cache_dir / FORMAT / "s32").glob("*.npy"))
    assert shards and len(list((cache_dir / FORMAT / "s32").glob("*.json"))) == len(shards)
    assert not list((cache_dir / FORMAT / "s32").glob("*.tmp"))

    def boom(path, size):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(sources, "load_image", boom)
    second = load_dataset(f"folder:{data}", 32)
    for split in first.splits:
        np.testing.assert_array_equal(first[split].images, second[split].images)
        assert first[split].names == second[split].names


def test_changed_file_and_other_size_are_decoded_again(tmp_path, cache_dir, counted):
    recs = _records(tmp_path / "imgs")
    a, ok, _ = decode_records(recs, 16)
    assert all(ok) and len(counted) == 12
    counted.clear()
    decode_records(recs, 16)
    assert counted == []

    changed = recs[3].path
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(changed)  # new content ...
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # ... and certainly a new mtime
    touched = recs[5].path
    os.utime(touched, ns=(st.st_atime_ns, touched.stat().st_mtime_ns + 2 * 10**9))  # same bytes, new mtime
    b, ok, _ = decode_records(recs, 16)
    assert sorted(counted) == ["003.png", "005.png"]
    assert (b[3] == 255).all() and not (a[3] == 255).all()
    np.testing.assert_array_equal(np.delete(a, 3, axis=0), np.delete(b, 3, axis=0))

    counted.clear()
    c, ok, _ = decode_records(recs, 20)  # another image size: its own entries
    assert len(counted) == 12 and c.shape == (12, 20, 20)
    assert file_key(recs[0].path)[0] == os.path.abspath(recs[0].path)


def test_cache_off_writes_nothing(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("CXR_ONECLASS_CACHE", "off")
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    recs = _records(tmp_path / "imgs", n=4)
    decode_records(recs, 16)
    decode_records(recs, 16)
    assert len(counted) == 8 and not (tmp_path / "home").exists()


def test_failed_files_are_not_cached_and_reported_again(tmp_path, cache_dir):
    recs = _records(tmp_path / "imgs", n=4)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    recs.append(Record(tmp_path / "imgs" / "bad.png", 0, "train"))
    for _ in range(2):
        _, ok, errors = decode_records(recs, 16)
        assert ok == [True] * 4 + [False]
        assert len(errors) == 1 and "bad.png" in str(errors[0])


def test_interrupted_build_resumes(tmp_path, cache_dir, monkeypatch):
    recs = _records(tmp_path / "imgs", n=20)
    real = sources.load_image
    calls: list[str] = []

    def interrupted(path, size):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(sources, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decode_records(recs, 16, workers=1)
    assert len(list((cache_dir / FORMAT / "s16").glob("*.json"))) == 1  # the 7 decoded were written

    calls.clear()
    monkeypatch.setattr(sources, "load_image", lambda p, s: (calls.append(Path(p).name), real(p, s))[1])
    out, ok, _ = decode_records(recs, 16, workers=1)
    assert all(ok) and len(calls) == 13 and calls[0] == "007.png"
    full = np.stack([real(r.path, 16) for r in recs])
    np.testing.assert_array_equal(out, full)


def test_shards_fill_and_split(tmp_path, cache_dir):
    recs = _records(tmp_path / "imgs", n=10)
    store = ImageCache(cache_dir, 16, shard_images=4)
    for r in recs:
        store.add(file_key(r.path), np.full((16, 16), int(r.path.stem), np.uint8))
    store.flush()
    assert store.written == 10 and len(list(store.dir.glob("*.npy"))) == 3
    out = np.zeros((10, 16, 16), np.uint8)
    found = ImageCache(cache_dir, 16).fill([file_key(r.path) for r in recs], out)
    assert found == list(range(10)) and [int(o[0, 0]) for o in out] == list(range(10))


def test_cache_trouble_is_not_fatal(tmp_path, monkeypatch, caplog, counted):
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("CXR_ONECLASS_CACHE", str(tmp_path / "file"))
    recs = _records(tmp_path / "imgs", n=4)
    with caplog.at_level(logging.WARNING):
        _, ok, _ = decode_records(recs, 16)
    assert all(ok) and any("cannot write" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("CXR_ONECLASS_CACHE", str(tmp_path / "cache"))
    decode_records(recs, 16)
    for npy in (tmp_path / "cache").rglob("*.npy"):
        npy.write_bytes(b"garbage")
    counted.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out, ok, _ = decode_records(recs, 16)
    assert all(ok) and len(counted) == 4 and any("unreadable" in r.getMessage() for r in caplog.records)
