"""On-disk cache of decoded, resized images, so a second run skips decoding.

Where: `$CXR_ONECLASS_CACHE` if set (`off`, `0`, `none` or `false` turn the cache off), else
`~/.cache/cxr-oneclass`. Layout: `<root>/v2/s<image size>/<shard>.npy` (uint8 (n, S, S)) with `<shard>.json`
listing the n keys and a checksum (CRC-32) of each entry's pixels. A key is (absolute path, size in bytes, mtime in
ns, content hash): the hash is a CRC-32 of the file's bytes (over 64 MB: of its first and last MB and its size), so
a file rewritten with the same size and mtime (as `cp -p`, `rsync -a` or `tar x` leave it) misses too, as does a
touched file or another image size. The hash is computed only for files with an entry of the same (path, size,
mtime), so a first run reads each file once (hashed just before it is decoded). Each entry's pixels are checked
against their checksum when read: a mismatch (a corrupted or zeroed shard) is a miss, decoded again, with one
warning per shard.

Cost of a hit, 200 PNGs at 128 x 128 on 2 cores (page cache warm): 40 KB files (8 MB in all) 15-20 ms, against
3 ms for the former stat-only key and 200 ms to decode them; 650 KB files (130 MB) 40-50 ms, against 2.3 ms and
800 ms (with BLAKE2b instead of CRC-32: 115 ms). Reading the files is the price of keying on content.

Shards are written as they fill (temp file, then `os.replace`; the JSON last, so a shard counts only once complete),
so an interrupted build resumes where it stopped. Only files that decoded are stored, so unreadable files are
reported again on every run. Cache trouble (read-only folder, full disk, a corrupt shard) is logged once and never
fatal. Old entries of changed files stay on disk until the folder is deleted. Paths that are not valid UTF-8 (names
read with surrogateescape) are written to the JSON as `\\udcXX` escapes and read back unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "CXR_ONECLASS_CACHE"
FORMAT = "v2"  # bump when decoding or the key changes so old pixels are not reused (v2: content hash, checksums)
OFF_WORDS = {"off", "0", "none", "false", "no", "disabled"}
SHARD_BYTES = 64 * 2**20
HASH_WHOLE_BYTES = 64 * 2**20  # files up to this size are hashed whole; larger ones by their first and last MB
HASH_EDGE_BYTES = 2**20

Key = tuple[str, int, int, str]  # (absolute path, size, mtime_ns, content hash)

_lock = threading.Lock()
# json path -> (mtime_ns, keys, checksums): each shard index is parsed once per process
_shard_keys: dict[str, tuple[int, list[Key], list[str]]] = {}


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF_WORDS:
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "cxr-oneclass"


def content_hash(path: str | os.PathLike[str], size: int) -> str:
    """CRC-32 of the file's bytes (of its first and last MB and its size when over 64 MB), as 8 hex digits.

    CRC-32 rather than a cryptographic hash: zlib computes it at several GB/s with the GIL released (BLAKE2b made
    a hit on 650 KB files 2.5x slower, see the module docstring), and it only has to tell apart versions of one
    path that also share their size and mtime, where a 1 in 2**32 chance of a clash is no risk."""
    crc = 0
    with open(path, "rb") as fh:
        if size <= HASH_WHOLE_BYTES:
            while chunk := fh.read(HASH_EDGE_BYTES):
                crc = zlib.crc32(chunk, crc)
        else:
            crc = zlib.crc32(fh.read(HASH_EDGE_BYTES), crc)
            fh.seek(-HASH_EDGE_BYTES, os.SEEK_END)
            crc = zlib.crc32(fh.read(HASH_EDGE_BYTES), crc)
            crc = zlib.crc32(str(size).encode(), crc)
    return f"{crc:08x}"


def pixel_sum(image: np.ndarray) -> str:
    """Checksum (CRC-32) of one cached entry's pixels: catches a zeroed, truncated or bit-flipped shard."""
    return f"{zlib.crc32(np.ascontiguousarray(image, dtype=np.uint8).data):08x}"


def stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """(absolute path, size, mtime_ns): a key without its content hash, from one stat; None when that fails."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return (os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns))


def file_key(path: str | os.PathLike[str]) -> Key | None:
    """(absolute path, size, mtime_ns, content hash), or None when the file cannot be stat'ed or read."""
    try:
        st = os.stat(path)
        digest = content_hash(path, st.st_size)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return (os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns), digest)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


class ImageCache:
    """Decoded uint8 (S, S) images of one image size, looked up by file key."""

    def __init__(self, root: str | os.PathLike[str], image_size: int, shard_images: int | None = None) -> None:
        self.dir = Path(root) / FORMAT / f"s{image_size}"
        self.image_size = image_size
        self.shard_images = shard_images or max(64, min(4096, SHARD_BYTES // (image_size * image_size)))
        self._index: dict[Key, tuple[str, int, str]] | None = None  # key -> (shard, row, pixel checksum)
        self._stat_keys: set[tuple[str, int, int]] = set()  # the keys' (path, size, mtime) parts
        self._pending_keys: list[Key] = []
        self._pending: list[np.ndarray] = []
        self._pending_sums: list[str] = []
        self._broken = False
        self.written = 0

    @classmethod
    def from_env(cls, image_size: int) -> ImageCache | None:
        root = cache_root()
        return None if root is None else cls(root, image_size)

    # ------------------------------------------------------------------ reading

    def _load_index(self) -> dict[Key, tuple[str, int, str]]:
        if self._index is not None:
            return self._index
        index: dict[Key, tuple[str, int, str]] = {}
        try:
            entries = sorted(self.dir.glob("*.json"), key=lambda p: p.name)
        except OSError:
            entries = []
        try:
            for tmp in self.dir.glob("*.tmp"):  # left by a killed process; a live writer's are minutes old at most
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        except OSError:
            pass
        for js in entries:  # by name, i.e. by time written: a key written again later points to its newest entry
            parsed = self._shard_keys(js)
            if parsed is None:
                continue
            for row, (key, checksum) in enumerate(zip(*parsed)):
                index[key] = (js.stem, row, checksum)
        self._stat_keys = {key[:3] for key in index}
        self._index = index
        return index

    def known(self, key: tuple[str, int, int] | None) -> bool:
        """Whether an entry exists for this (path, size, mtime): only then is the file's content hash worth
        computing before decoding (it decides hit or miss)."""
        self._load_index()
        return key is not None and key[:3] in self._stat_keys

    def _shard_keys(self, js: Path) -> tuple[list[Key], list[str]] | None:
        try:
            mtime = js.stat().st_mtime_ns
            with _lock:
                memo = _shard_keys.get(str(js))
            if memo and memo[0] == mtime:
                return memo[1], memo[2]
            doc = json.loads(js.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or doc.get("image_size") != self.image_size:
                raise ValueError("format or image size differs from its folder")
            keys = [(str(k[0]), int(k[1]), int(k[2]), str(k[3])) for k in doc["keys"]]
            sums = [str(c) for c in doc["sums"]]
            if len(sums) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(sums)} checksums")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("image cache: ignoring unreadable shard index %s (%s)", js, exc)
            return None
        with _lock:
            _shard_keys[str(js)] = (mtime, keys, sums)
        return keys, sums

    def fill(self, keys: list[Key | None], out: np.ndarray) -> list[int]:
        """Copy the cached images of these keys into out[i]; the indices found."""
        index = self._load_index()
        by_shard: dict[str, list[tuple[int, int, str]]] = {}
        for i, key in enumerate(keys):
            if key is not None and key in index:
                shard, row, checksum = index[key]
                by_shard.setdefault(shard, []).append((i, row, checksum))
        found: list[int] = []
        for shard, rows in by_shard.items():
            bad = 0
            try:
                arr = np.load(self.dir / f"{shard}.npy", mmap_mode="r")
                if arr.dtype != np.uint8 or arr.shape[1:] != (self.image_size, self.image_size):
                    raise ValueError(f"holds {arr.dtype} {arr.shape}")
                for i, row, checksum in rows:
                    image = np.array(arr[row])  # one read from the map; checked before it is used
                    if pixel_sum(image) != checksum:
                        bad += 1
                        continue
                    out[i] = image
                    found.append(i)
            except (OSError, ValueError, IndexError) as exc:
                log.warning("image cache: shard %s unreadable (%s); its images are decoded again", shard, exc)
            if bad:
                log.warning("image cache: %d of %d entries of shard %s fail their checksum (corrupted on disk?); "
                            "they are decoded again", bad, len(rows), self.dir / f"{shard}.npy")
        return sorted(found)

    # ------------------------------------------------------------------ writing

    def add(self, key: Key | None, image: np.ndarray) -> None:
        """Queue one decoded image; a full shard is written at once."""
        if key is None or self._broken:
            return
        self._pending_keys.append(key)
        self._pending.append(np.array(image, dtype=np.uint8, copy=True))
        self._pending_sums.append(pixel_sum(self._pending[-1]))
        if len(self._pending) >= self.shard_images:
            self.flush()

    def flush(self) -> None:
        """Write the queued images as one shard (no-op when none are queued)."""
        if not self._pending or self._broken:
            self._pending, self._pending_keys, self._pending_sums = [], [], []
            return
        keys, sums, images = self._pending_keys, self._pending_sums, np.stack(self._pending)
        self._pending, self._pending_keys, self._pending_sums = [], [], []
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.dir / f"{name}.npy", lambda fh: np.save(fh, images, allow_pickle=False))
            doc = {"format": FORMAT, "image_size": self.image_size, "keys": [list(k) for k in keys], "sums": sums}
            # ensure_ascii: a path that is not valid UTF-8 holds lone surrogates (surrogateescape), which only an
            # escaped \udcXX can carry through UTF-8; json.loads gives back the very same str
            text = json.dumps(doc, ensure_ascii=True)
            _atomic_write(self.dir / f"{name}.json", lambda fh: fh.write(text.encode("ascii")))
        except OSError as exc:
            self._broken = True
            log.warning("image cache: cannot write to %s (%s); continuing without caching", self.dir, exc)
            return
        self.written += len(keys)
        if self._index is not None:
            for row, (key, checksum) in enumerate(zip(keys, sums)):
                self._index[key] = (name, row, checksum)
                self._stat_keys.add(key[:3])
