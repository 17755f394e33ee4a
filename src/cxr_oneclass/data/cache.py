"""On-disk cache of decoded, resized images, so a second run skips decoding.

Where: `$CXR_ONECLASS_CACHE` if set (`off`, `0`, `none` or `false` turn the cache off), else
`~/.cache/cxr-oneclass`. Layout: `<root>/v1/s<image size>/<shard>.npy` (uint8 (n, S, S)) with `<shard>.json`
listing the n keys. A key is (absolute path, size in bytes, mtime in ns): a changed file, or another image size,
misses and is decoded again. Shards are written as they fill (temp file, then `os.replace`; the JSON last, so a
shard counts only once complete), so an interrupted build resumes where it stopped. Only files that decoded are
stored, so unreadable files are reported again on every run. Cache trouble (read-only folder, full disk, a corrupt
shard) is logged once and never fatal. Old entries of changed files stay on disk until the folder is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "CXR_ONECLASS_CACHE"
FORMAT = "v1"  # bump when decoding changes so old pixels are not reused
OFF_WORDS = {"off", "0", "none", "false", "no", "disabled"}
SHARD_BYTES = 64 * 2**20

Key = tuple[str, int, int]

_lock = threading.Lock()
_shard_keys: dict[str, tuple[int, list[Key]]] = {}  # json path -> (mtime_ns, keys): parsed once per process


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF_WORDS:
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "cxr-oneclass"


def file_key(path: str | os.PathLike[str]) -> Key | None:
    """(absolute path, size, mtime_ns), or None when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns))


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
        self._index: dict[Key, tuple[str, int]] | None = None
        self._pending_keys: list[Key] = []
        self._pending: list[np.ndarray] = []
        self._broken = False
        self.written = 0

    @classmethod
    def from_env(cls, image_size: int) -> ImageCache | None:
        root = cache_root()
        return None if root is None else cls(root, image_size)

    # ------------------------------------------------------------------ reading

    def _load_index(self) -> dict[Key, tuple[str, int]]:
        if self._index is not None:
            return self._index
        index: dict[Key, tuple[str, int]] = {}
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
        for js in entries:
            keys = self._shard_keys(js)
            if keys is None:
                continue
            for row, key in enumerate(keys):
                index[key] = (js.stem, row)
        self._index = index
        return index

    def _shard_keys(self, js: Path) -> list[Key] | None:
        try:
            mtime = js.stat().st_mtime_ns
            with _lock:
                memo = _shard_keys.get(str(js))
            if memo and memo[0] == mtime:
                return memo[1]
            doc = json.loads(js.read_text(encoding="utf-8"))
            if doc.get("image_size") != self.image_size:
                raise ValueError("image size differs from its folder")
            keys = [(str(k[0]), int(k[1]), int(k[2])) for k in doc["keys"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("image cache: ignoring unreadable shard index %s (%s)", js, exc)
            return None
        with _lock:
            _shard_keys[str(js)] = (mtime, keys)
        return keys

    def fill(self, keys: list[Key | None], out: np.ndarray) -> list[int]:
        """Copy the cached images of these keys into out[i]; the indices found."""
        index = self._load_index()
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            if key is not None and key in index:
                shard, row = index[key]
                by_shard.setdefault(shard, []).append((i, row))
        found: list[int] = []
        for shard, pairs in by_shard.items():
            try:
                arr = np.load(self.dir / f"{shard}.npy", mmap_mode="r")
                if arr.dtype != np.uint8 or arr.shape[1:] != (self.image_size, self.image_size):
                    raise ValueError(f"holds {arr.dtype} {arr.shape}")
                for i, row in pairs:
                    out[i] = arr[row]
                    found.append(i)
            except (OSError, ValueError, IndexError) as exc:
                log.warning("image cache: shard %s unreadable (%s); its images are decoded again", shard, exc)
        return sorted(found)

    # ------------------------------------------------------------------ writing

    def add(self, key: Key | None, image: np.ndarray) -> None:
        """Queue one decoded image; a full shard is written at once."""
        if key is None or self._broken:
            return
        self._pending_keys.append(key)
        self._pending.append(np.array(image, dtype=np.uint8, copy=True))
        if len(self._pending) >= self.shard_images:
            self.flush()

    def flush(self) -> None:
        """Write the queued images as one shard (no-op when none are queued)."""
        if not self._pending or self._broken:
            self._pending, self._pending_keys = [], []
            return
        keys, images = self._pending_keys, np.stack(self._pending)
        self._pending, self._pending_keys = [], []
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.dir / f"{name}.npy", lambda fh: np.save(fh, images, allow_pickle=False))
            doc = {"format": FORMAT, "image_size": self.image_size, "keys": [list(k) for k in keys]}
            _atomic_write(self.dir / f"{name}.json", lambda fh: fh.write(json.dumps(doc).encode("utf-8")))
        except OSError as exc:
            self._broken = True
            log.warning("image cache: cannot write to %s (%s); continuing without caching", self.dir, exc)
            return
        self.written += len(keys)
        if self._index is not None:
            for row, key in enumerate(keys):
                self._index[key] = (name, row)
