"""Decoding many files at once: threads, the on-disk cache, and a report of what could not be read.

A file that fails, whatever it raises (an `ImageError`, a decoder's ValueError, a MemoryError), costs only itself:
it gives a zero image, ok=False and an `ImageError` naming it; only KeyboardInterrupt / SystemExit end a batch.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from tqdm import tqdm

from ..errors import ImageError
from .cache import ImageCache, Key, file_key, stat_key
from .images import error_for, load_image
from .types import Record

log = logging.getLogger(__name__)


def _detached(err: ImageError) -> ImageError:
    """The error without its traceback and cause: kept in a list of skipped files, those would keep the failed
    decode's frames (and their arrays) alive."""
    err.__traceback__ = err.__cause__ = err.__context__ = None
    return err


def decode_records(records: list[Record], image_size: int, workers: int = 0, desc: str = "decoding", cache: bool = True,
                   accept_any_modality: bool = False) -> tuple[np.ndarray, list[bool], list[ImageError]]:
    """Decode files in parallel to uint8 (N, S, S); failed files give a zero image, ok=False and an error.

    With `cache` (and the cache not turned off, see `data/cache.py`) images decoded before are read from the
    on-disk cache and newly decoded ones are added to it. `accept_any_modality` reads DICOMs that are not
    projection radiographs too (see `data/dicom.py`); such images are cached like any other.
    """
    out = np.zeros((len(records), image_size, image_size), dtype=np.uint8)
    ok = [False] * len(records)
    errors: list[ImageError] = []
    store = ImageCache.from_env(image_size) if cache else None
    # Looked up at call time (tests replace `load_image`); the keyword only when set, so a plain (path, size)
    # stand-in still fits.
    load = partial(load_image, accept_any_modality=True) if accept_any_modality else load_image

    keys: list[Key | None] = [None] * len(records)

    def work(i: int) -> tuple[int, ImageError | None]:
        path = records[i].path
        if store is not None and keys[i] is None:
            # Hashed before decoding: a file changed meanwhile is stored under its old content's hash and misses
            # next time, never the reverse. The read also warms the page cache for the decode.
            keys[i] = file_key(path)
        try:
            out[i] = load(path, image_size)
            return i, None
        except ImageError as exc:
            return i, _detached(exc)
        except Exception as exc:  # anything else (a MemoryError, a decoder bug) must cost this file only
            return i, _detached(error_for(path, exc))

    n_workers = workers or min(8, (os.cpu_count() or 1) * 2)
    pool = ThreadPoolExecutor(n_workers)
    try:
        todo = list(range(len(records)))
        if store is not None:
            # Content hashes only where the cache has an entry for the file's (path, size, mtime), so a first run
            # reads each file once; in the pool, as zlib releases the GIL while hashing.
            maybe = [i for i, r in enumerate(records) if store.known(stat_key(r.path))]
            batches = [maybe[k : k + 32] for k in range(0, len(maybe), 32)]  # a task per file costs more than its hash
            for batch, found in zip(batches, pool.map(lambda batch: [file_key(records[i].path) for i in batch], batches)):
                for i, key in zip(batch, found):
                    keys[i] = key
            for i in store.fill(keys, out):
                ok[i] = True
            todo = [i for i in todo if not ok[i]]
            if len(todo) < len(records):
                log.info("%s: %d of %d images from the cache %s", desc, len(records) - len(todo), len(records), store.dir)
        it = pool.map(work, todo)
        for i, err in tqdm(it, total=len(todo), desc=desc, unit="img", leave=False, disable=len(todo) < 200):
            if err is None:
                ok[i] = True
                if store is not None:
                    store.add(keys[i], out[i])
            else:
                errors.append(err)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the queued files instead of decoding them
        if store is not None:
            store.flush()  # also after an interruption: what was decoded is kept for the next run
    return out, ok, errors
