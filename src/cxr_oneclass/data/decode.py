"""Decoding many files at once: threads, the on-disk cache, and a report of what could not be read."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from ..errors import ImageError
from .cache import ImageCache, file_key
from .images import load_image
from .types import Record

log = logging.getLogger(__name__)


def decode_records(records: list[Record], image_size: int, workers: int = 0, desc: str = "decoding", cache: bool = True) -> tuple[np.ndarray, list[bool], list[ImageError]]:
    """Decode files in parallel to uint8 (N, S, S); failed files give a zero image, ok=False and an error.

    With `cache` (and the cache not turned off, see `data/cache.py`) images decoded before are read from the
    on-disk cache and newly decoded ones are added to it.
    """
    out = np.zeros((len(records), image_size, image_size), dtype=np.uint8)
    ok = [False] * len(records)
    errors: list[ImageError] = []
    store = ImageCache.from_env(image_size) if cache else None
    keys = [file_key(r.path) for r in records] if store is not None else [None] * len(records)
    todo = list(range(len(records)))
    if store is not None:
        for i in store.fill(keys, out):
            ok[i] = True
        todo = [i for i in todo if not ok[i]]
        if len(todo) < len(records):
            log.info("%s: %d of %d images from the cache %s", desc, len(records) - len(todo), len(records), store.dir)

    def work(i: int) -> tuple[int, ImageError | None]:
        try:
            out[i] = load_image(records[i].path, image_size)
            return i, None
        except ImageError as exc:
            return i, exc

    n_workers = workers or min(8, (os.cpu_count() or 1) * 2)
    pool = ThreadPoolExecutor(n_workers)
    try:
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
