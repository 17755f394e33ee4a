"""What both front doors (HTTP uploads, DICOM C-STORE) do with a received file: check it, read its identifiers,
skip what is not a frontal view, score it through the micro-batcher, store the result and its pictures. One model,
one database, any number of threads calling `ingest`."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..data.studies import DEFAULT_VIEWS, ImageInfo, pseudonymise, read_info, skip_reason
from ..errors import ImageError
from ..jobs.score import NOT_SCORED, SKIPPED, ScoredImage, Scorer
from ..runs import file_sha256
from ..viz import overlay
from .batcher import MicroBatcher
from .store import ResultStore

log = logging.getLogger(__name__)

THUMB = 1  # stored at the model's resolution: the page enlarges them (pixelated), and encoding is per request


def png_bytes(rgb_or_grey: np.ndarray, upscale: int = THUMB) -> bytes:
    im = Image.fromarray(rgb_or_grey)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class Triage:
    """A run, a results database and a micro-batcher, shared by every request."""

    def __init__(self, run_dir: str | Path, db_path: str | Path, views: frozenset[str] | set[str] = DEFAULT_VIEWS,
                 salt: str | None = None, max_batch: int = 32, max_wait_s: float = 0.01, accept_any_modality: bool = False,
                 timeout_s: float = 120.0, int8: bool = False) -> None:
        self.scorer = Scorer(run_dir, int8=int8)  # int8: the run's quantised graph (jobs.score.int8_graph)
        self.store = ResultStore(db_path)
        self.views, self.salt, self.accept_any_modality, self.timeout_s = set(views), salt, accept_any_modality, timeout_s
        self.batcher = MicroBatcher(self._score_stack, max_batch, max_wait_s)
        self._locks = [threading.Lock() for _ in range(64)]  # striped by content hash

    def close(self) -> None:
        self.batcher.close()
        self.store.close()

    def _score_stack(self, stack: np.ndarray) -> list[ScoredImage]:
        return self.scorer.records([f"#{i}" for i in range(len(stack))], stack, keep_maps=True)

    def _lock_for(self, key: str) -> threading.Lock:
        """One upload of a given content at a time: two identical uploads racing must store it once."""
        return self._locks[int(key[:8], 16) % len(self._locks)]

    def ingest(self, path: Path, file_name: str, source: str) -> dict[str, Any]:
        """Score and store the file at `path` (a private temporary copy; `file_name` is for display only, never a
        path). Returns the stored image record, with `duplicate` True when it was there already. Never raises for
        a bad file: that is a stored `error` record naming the problem."""
        sha = file_sha256(path)
        with self._lock_for(sha):
            known = self.store.find(sha256=sha)
            if known is not None:
                return {**known, "duplicate": True}
            rec, info = self._score_file(path, file_name)
            if info is not None and info.sop_uid:
                known = self.store.find(sop_uid=info.sop_uid)
                if known is not None:
                    return {**known, "duplicate": True}
            row = self._record(rec, info, sha, file_name, source)
            heat = png_bytes(overlay(rec.image, rec.heatmap, heat_max=self.scorer.heatmap_max)) if rec.heatmap is not None else None
            thumb = png_bytes(rec.image) if rec.image is not None else None
            image_id, created = self.store.add(row, heat, thumb)
        stored = self.store.image(image_id) or row
        return {**stored, "duplicate": not created}

    def _score_file(self, path: Path, file_name: str) -> tuple[ScoredImage, ImageInfo | None]:
        try:
            info = read_info(path)
        except ImageError as exc:
            return ScoredImage(file_name, NOT_SCORED, error=exc.problem), None
        except Exception as exc:  # noqa: BLE001 - a file's failure is that file's result
            return ScoredImage(file_name, NOT_SCORED, error=f"could not read its header ({type(exc).__name__})"), None
        reason = skip_reason(info, self.views)
        if reason is not None:
            return ScoredImage(file_name, SKIPPED, error=reason, info=info), info
        try:
            image = load_image(path, self.scorer.image_size, accept_any_modality=self.accept_any_modality)
        except ImageError as exc:
            return ScoredImage(file_name, NOT_SCORED, error=exc.problem, info=info), info
        except Exception as exc:  # noqa: BLE001
            return ScoredImage(file_name, NOT_SCORED, error=f"could not be decoded ({type(exc).__name__})", info=info), info
        try:
            rec = self.batcher.submit(image).result(timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the scorer failed: the film is not scored, and says so
            return ScoredImage(file_name, NOT_SCORED, error=f"scoring failed ({type(exc).__name__})", info=info), info
        rec.source, rec.info, rec.image = file_name, info, image
        return rec, info

    def _record(self, rec: ScoredImage, info: ImageInfo | None, sha: str, file_name: str, source: str) -> dict[str, Any]:
        info = info or ImageInfo(file_name)
        study_uid = info.study_uid
        patient = pseudonymise(info.patient_id, self.salt) if self.salt else info.patient_id
        return {
            "sha256": sha, "sop_uid": info.sop_uid, "study_key": study_uid or f"file:{sha[:16]}", "file_name": file_name,
            "patient_id": patient, "accession": info.accession, "study_uid": study_uid, "series_uid": info.series_uid,
            "view": info.view, "study_date": info.study_date, "score": rec.score, "normal_percentile": rec.normal_percentile,
            "flag": rec.flag, "raw_score": rec.raw_score, "terms": rec.terms, "error": rec.error or "",
            "outside_population": None if rec.outside_population is None else int(rec.outside_population),
            "population_distance": rec.population_distance, "source": source,
        }
