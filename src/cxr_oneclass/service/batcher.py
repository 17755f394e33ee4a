"""Micro-batching: one model in memory, concurrent requests scored together. A request's images wait at most
`max_wait_s` for others to join, and a batch holds at most `max_batch` images, so one request never waits long
and many requests share the matrix multiplications (scoring 32 images costs far less than 32 x one)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MicroBatcher:
    """`submit(image)` -> a Future of `score_fn`'s result for that image. `score_fn` takes a stack (N, S, S) and
    returns N results; it runs on one worker thread only (the model is not shared across threads)."""

    def __init__(self, score_fn: Callable[[np.ndarray], list[Any]], max_batch: int = 32, max_wait_s: float = 0.01) -> None:
        self.score_fn = score_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._run, name="scorer", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        fut: Future = Future()
        self._queue.put((image, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                results = self.score_fn(np.stack([img for img, _ in batch]))
                for (_, fut), res in zip(batch, results):
                    fut.set_result(res)
            except Exception as exc:  # noqa: BLE001 - every waiting request learns of it; the worker goes on
                log.exception("scoring a batch of %d failed", len(batch))
                for _, fut in batch:
                    fut.set_exception(exc)
            self.batches += 1
            self.images += len(batch)
