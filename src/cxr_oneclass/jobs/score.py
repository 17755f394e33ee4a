"""`cxr-oneclass score RUN PATH...`: score image files or folders (or in-memory arrays) with a run folder or an
exported .onnx graph. One record per input, in input order; an input that could not be scored is a record too,
flagged `error`, never `normal`."""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from ..data.images import find_images, load_image, resize, to_uint8
from ..errors import CxrError, ImageError
from ..runs import load_run
from ..scoring.calibration import Calibration
from ..scoring.inference import model_components, score_images
from ..scoring.terms import HEATMAP_DISPLAY, TERM_NAMES, heatmap_kind, score_term_names
from ..viz import save_overlay

log = logging.getLogger(__name__)

ABNORMAL, NORMAL, NOT_SCORED = "abnormal", "normal", "error"  # the flag words, on screen and in every file


def flag_of(normalised: float, calibration: Calibration | None) -> str:
    """`normal` only for a finite score below the threshold: a NaN score, or none, is never cleared."""
    if calibration is None or not np.isfinite(normalised) or not np.isfinite(calibration.threshold):
        return ABNORMAL
    return NORMAL if normalised < calibration.threshold else ABNORMAL


@dataclass
class ScoredImage:
    """The result for one input. `score` is normalised (0 and 1 = lowest and highest validation score); `terms`
    holds every term the model reports (those of the score and the others); `heatmap` (H, W) when asked for."""

    source: str
    flag: str
    score: float | None = None
    raw_score: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    heatmap: np.ndarray | None = None
    heatmap_file: str | None = None
    error: str | None = None

    @property
    def flagged(self) -> bool:
        """True unless the image was scored and cleared: errors count as flagged (fail closed)."""
        return self.flag != NORMAL

    def row(self, terms: list[str]) -> dict[str, object]:
        """A CSV/JSON row: file, score, flag, raw_score, each of `terms`, heatmap file, error."""
        fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
        out: dict[str, object] = {"file": self.source, "score": fmt(self.score), "flag": self.flag, "raw_score": fmt(self.raw_score)}
        out.update({k: fmt(self.terms.get(k)) for k in terms})
        out["heatmap_file"] = self.heatmap_file or ""
        out["error"] = self.error or ""
        return out


class Scorer:
    """A run folder or an exported .onnx graph, ready to score uint8 images (N, S, S) of its size."""

    def __init__(self, source: str | Path, batch_size: int = 64) -> None:
        self.source = Path(source)
        self.batch_size = batch_size
        if self.source.suffix.lower() == ".onnx":
            from ..scoring.onnx import OnnxScorer  # onnxruntime loads only for .onnx sources

            self._onnx = OnnxScorer(self.source)
            self.image_size, self.calibration = self._onnx.image_size, self._onnx.calibration
            self.heatmap_kind = self._onnx.heatmap_kind
            self.terms = [o for o in self._onnx.outputs if o in TERM_NAMES]
            self.score_terms = [t for t in self._onnx.score_terms if t in self.terms] or self.terms
            self.model = None
        else:
            self.model, self.calibration, self.doc = load_run(self.source)
            self.image_size = self.model.cfg.image_size
            self.heatmap_kind = heatmap_kind(self.model.cfg)
            self.terms = model_components(self.model)
            self.score_terms = [t for t in score_term_names(self.model.cfg) if t in self.terms]

    @property
    def heatmap_max(self) -> float:
        return HEATMAP_DISPLAY[self.heatmap_kind][1]

    def score(self, images: np.ndarray, keep_maps: bool = False) -> dict[str, np.ndarray]:
        if self.model is None:
            return self._onnx.score(images, self.batch_size, keep_maps=keep_maps)
        return score_images(self.model, images, self.batch_size, keep_maps=keep_maps)

    def records(self, names: list[str], images: np.ndarray, keep_maps: bool = False) -> list[ScoredImage]:
        """Score a stack of images and make one record each."""
        scored = self.score(images, keep_maps)
        norm = self.calibration.normalise(scored["score"]) if self.calibration else scored["score"]
        out = []
        for i, name in enumerate(names):
            if not np.isfinite(norm[i]):  # a NaN never clears a film: the image is reported as not scored
                out.append(ScoredImage(name, NOT_SCORED, error=f"the score is not finite ({norm[i]}): the run cannot score this image"))
                continue
            out.append(ScoredImage(
                name, flag_of(float(norm[i]), self.calibration), float(norm[i]), float(scored["score"][i]),
                {k: float(scored[k][i]) for k in self.terms if k in scored},
                scored["heatmap"][i].astype(np.float32) if keep_maps else None,
            ))
        return out


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[ImageError]]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    files: list[Path] = []
    errors: list[ImageError] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)  # symbolic links to folders are followed
            if not found:
                errors.append(ImageError(p, "folder has no image files"))
            files += found
        elif p.exists():
            files.append(p)
        else:
            errors.append(ImageError(p, "file not found"))
    return files, errors


def array_to_image(arr: np.ndarray, size: int, name: str) -> np.ndarray:
    """An in-memory grey image (H, W): uint8 as is, floats in [0, 1]; resized to the model's size like a file."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or min(a.shape) < 1:
        raise ImageError(name, f"expected a grey image (H, W), got an array of shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(name, "array has NaN or infinite pixels")
        f = a.astype(np.float32)
    else:
        raise ImageError(name, f"pixel type {a.dtype} not supported: give uint8 or floats in [0, 1]")
    return to_uint8(resize(f, size))


def heatmap_name(p: Path, used: set[str]) -> str:
    """`<stem>_heatmap.png`, made unique when two inputs share a stem."""
    name = f"{p.stem}_heatmap.png"
    if name in used:
        name = f"{p.parent.name}_{p.stem}_{len(used)}_heatmap.png"
    used.add(name)
    return name


def iter_scores(scorer: Scorer, paths: list[str | Path], heatmap_dir: str | Path | None = None, keep_maps: bool = False,
                accept_any_modality: bool = False) -> Iterator[ScoredImage]:
    """Score files and folders in bounded-memory chunks, yielding records in input order as they are scored.

    Threads decode chunk k+1 while chunk k is scored: at most two chunks of images are in memory, whatever the
    number of files. Unreadable inputs are yielded as `error` records, never fatal for the others. Heat maps are
    drawn into `heatmap_dir` when given, and kept in the records with `keep_maps`. DICOM files that are not
    projection radiographs are refused unless `accept_any_modality`.
    """
    draw = heatmap_dir is not None
    files, missing = expand_paths(paths)
    for err in missing:
        yield ScoredImage(err.path, NOT_SCORED, error=err.problem)
    used_names: set[str] = set()
    size = scorer.image_size

    def decode(p: Path) -> np.ndarray | ImageError:
        try:
            return load_image(p, size, accept_any_modality=accept_any_modality)
        except ImageError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - whatever breaks one file is that file's error, never the batch's
            return ImageError(p, f"could not be decoded ({type(exc).__name__}: {str(exc)[:200]})")

    bs = scorer.batch_size
    chunks = [files[s : s + bs] for s in range(0, len(files), bs)]
    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        pending = [pool.submit(decode, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            # Decode the next chunk in the background while this one is scored.
            pending = [pool.submit(decode, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            ok = [(p, a) for p, a in zip(chunk, decoded) if not isinstance(a, ImageError)]
            records = iter(scorer.records([str(p) for p, _ in ok], np.stack([a for _, a in ok]), keep_maps or draw) if ok else [])
            for p, a in zip(chunk, decoded):
                if isinstance(a, ImageError):
                    yield ScoredImage(str(p), NOT_SCORED, error=a.problem)
                    continue
                rec = next(records)
                if draw:
                    target = Path(heatmap_dir) / heatmap_name(p, used_names)
                    save_overlay(target, a, rec.heatmap, heat_max=scorer.heatmap_max)
                    rec.heatmap_file = str(target)
                    if not keep_maps:
                        rec.heatmap = None
                yield rec


class CsvSink:
    """Rows written as they are scored, flushed, so an interruption loses nothing scored. A file goes to
    FILE.partial and is renamed to FILE when complete; printing goes to a stream. Names that are not valid UTF-8
    are written with backslash escapes rather than failing."""

    def __init__(self, columns: list[str], path: str | Path | None = None, stream: TextIO | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.partial = self.path.with_name(self.path.name + ".partial") if self.path is not None else None
        if self.partial is not None:
            try:  # checked before any work: a bad --csv must not cost a whole scoring run
                self.partial.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.partial, "w", newline="", encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise CxrError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        else:
            self._fh = stream or sys.stdout
        self._writer = csv.DictWriter(self._fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        self._writer.writeheader()
        self.rows = 0

    def write(self, row: dict[str, object]) -> None:
        self._writer.writerow(row)
        self._fh.flush()
        self.rows += 1

    def close(self, complete: bool = True) -> None:
        """Close; a complete file replaces FILE, an interrupted one stays as FILE.partial (its rows are whole)."""
        if self.partial is None:
            return
        self._fh.close()
        if complete:
            os.replace(self.partial, self.path)


def score_paths(source: str | Path, paths: list[str | Path], heatmap_dir: str | Path | None = None, batch_size: int = 64,
                on_record: Callable[[ScoredImage], None] | None = None) -> tuple[list[ScoredImage], list[ImageError]]:
    """Score files and folders with a run folder or an .onnx file. Returns the scored records and the errors
    (inputs that could not be scored); `on_record` sees every record, errors included, as it is made."""
    scorer = Scorer(source, batch_size)
    results, errors = [], []
    for rec in iter_scores(scorer, paths, heatmap_dir):
        if on_record is not None:
            on_record(rec)
        if rec.flag == NOT_SCORED:
            errors.append(ImageError(rec.source, rec.error or "not scored"))
        else:
            results.append(rec)
    return results, errors
