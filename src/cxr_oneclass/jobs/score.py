"""`cxr-oneclass score RUN PATH...`: score image files, folders, PACS exports (DICOM found by content, DICOMDIR
file sets) or in-memory arrays with a run folder or an exported .onnx graph.

One record per input file, in input order, with its DICOM identifiers; an input that could not be scored is a
record too, flagged `error`, and one that is not a frontal view is flagged `skipped` with the reason: neither is
ever `normal`. Records are grouped into studies (StudyInstanceUID); a study's score is its highest image score.
Outputs: CSV (streamed as scored), a per-study table, JSON, and DICOM objects back into each study (a Structured
Report and the heat maps as Secondary Captures)."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from .._version import __version__
from ..data.images import load_image, resize, to_uint8
from ..data.studies import DEFAULT_VIEWS, ImageInfo, discover, pseudonymise, read_info, skip_reason
from ..errors import CxrError, ImageError, RunError
from ..reporting.dicom_out import ImageResult, ModelInfo, StudyResult, model_uid, write_heatmap_sc, write_study_sr
from ..runs import MODEL_FILE, file_sha256, load_run, read_run_config
from ..scoring.calibration import Calibration
from ..scoring.ensemble import Ensemble, is_ensemble, load_ensemble
from ..scoring.inference import model_components, score_images
from ..scoring.population import BatchCheck, Population
from ..scoring.terms import HEATMAP_DISPLAY, TERM_NAMES, heatmap_kind, score_term_names
from ..viz import overlay, save_overlay

log = logging.getLogger(__name__)

ABNORMAL, NORMAL, NOT_SCORED, SKIPPED = "abnormal", "normal", "error", "skipped"  # the flag words, everywhere
ID_COLUMNS = ("patient_id", "accession", "study_uid", "series_uid", "sop_uid", "view")


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
    normal_percentile: float | None = None  # share of validation normals scoring lower (0-100)
    population_distance: float | None = None  # from the training normals' global look (scoring/population.py)
    outside_population: bool | None = None
    info: ImageInfo | None = None  # what the file's DICOM header says (identifiers, view)
    image: np.ndarray | None = None  # the decoded image (S, S) uint8, kept only for DICOM outputs

    @property
    def flagged(self) -> bool:
        """True unless the image was scored and cleared: errors count as flagged (fail closed)."""
        return self.flag != NORMAL

    def row(self, terms: list[str], salt: str | None = None) -> dict[str, object]:
        """A CSV/JSON row: file, identifiers (patient ID pseudonymised with `salt`), score, normal percentile, flag,
        raw score, each of `terms`, population check, heat-map file, error (or why it was skipped)."""
        fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
        out: dict[str, object] = {"file": self.source}
        info = self.info or ImageInfo(self.source)
        out.update({k: getattr(info, k) for k in ID_COLUMNS})
        if salt is not None:
            out["patient_id"] = pseudonymise(info.patient_id, salt)
        out.update({"score": fmt(self.score), "normal_percentile": "" if self.normal_percentile is None else f"{self.normal_percentile:.1f}",
                    "flag": self.flag, "raw_score": fmt(self.raw_score)})
        out.update({k: fmt(self.terms.get(k)) for k in terms})
        out["population_distance"] = fmt(self.population_distance)
        out["outside_population"] = "" if self.outside_population is None else int(self.outside_population)
        out["heatmap_file"] = self.heatmap_file or ""
        out["error"] = self.error or ""
        return out


INT8_FILE = "model.int8.onnx"  # a run's int8 scoring graph, built by `score RUN --int8` on first use


def int8_graph(run_dir: str | Path, doc: dict) -> Path:
    """RUN/model.int8.onnx, built (and checked) when missing or made from other weights or another operating point
    (`calibrate` moved it since); needs the run's training normals to build (to calibrate on), and refits the
    threshold on its validation split (`export.int8_threshold`). A run folder that cannot be written gets it in a
    temp folder."""
    import onnx

    from ..scoring.onnx import META

    run_dir = Path(run_dir)
    path = run_dir / INT8_FILE
    digest = doc.get("weights_sha256") or file_sha256(run_dir / MODEL_FILE)
    if path.is_file():
        try:  # the metadata only (no inference session: the Scorer makes the one it scores with)
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            made_from = json.loads(meta.get(META + "run_calibration", "null"))
            if meta.get(META + "precision") == "int8" and meta.get(META + "weights_sha256") == digest and made_from == doc.get("calibration"):
                return path
        except Exception:  # noqa: BLE001 - unreadable or foreign: rebuilt below
            pass
        log.info("%s: made from other weights or another operating point; rebuilding it", path)
    from .export import export_run

    if not os.access(run_dir, os.W_OK):
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="cxr-int8-")) / INT8_FILE
    log.info("quantising %s to int8 (once; calibrated on its training normals) -> %s", run_dir, path)
    export_run(run_dir, path, int8=True)
    return path


class Scorer:
    """A run folder or an exported .onnx graph, ready to score uint8 images (N, S, S) of its size. `int8` with a
    run folder: score with its int8 graph (`int8_graph`), keeping the run's population check and identity."""

    def __init__(self, source: str | Path, batch_size: int = 64, int8: bool = False) -> None:
        self.source = Path(source)
        self.batch_size = batch_size
        onnx_file = self.source if self.source.suffix.lower() == ".onnx" else None
        self.doc: dict = {}
        self.population = None  # an export carries no population statistics
        self._ensemble: Ensemble | None = None
        if onnx_file is None and is_ensemble(self.source):
            if int8:
                raise RunError(f"{self.source} is an ensemble: --int8 scores a run or an exported graph; score the ensemble in fp32 "
                               f"or one member (e.g. {self.source / 'members' / '0'}) with --int8")
            ens = self._ensemble = load_ensemble(self.source)
            self.doc, self.model, self.calibration = ens.doc, None, ens.calibration
            self.population = Population.from_dict(ens.population) if ens.population else None
            self.image_size, self.heatmap_kind = ens.image_size, ens.heatmap_kind
            self.terms, self.score_terms, self.precision = ens.components, ens.score_terms, "fp32"
            return
        if onnx_file is None and int8:
            self.doc = read_run_config(self.source)  # the graph scores: the weights need not load
            self.population = Population.from_dict(self.doc["population"]) if self.doc.get("population") else None
            onnx_file = int8_graph(self.source, self.doc)
        if onnx_file is not None:
            from ..scoring.onnx import OnnxScorer  # onnxruntime loads only for .onnx sources

            self._onnx = OnnxScorer(onnx_file)
            if int8 and self._onnx.precision != "int8":
                raise RunError(f"{onnx_file}: an {self._onnx.precision} graph; for --int8 export one with `export RUN --out FILE --int8`")
            self.image_size, self.calibration = self._onnx.image_size, self._onnx.calibration
            self.heatmap_kind = self._onnx.heatmap_kind
            self.terms = [o for o in self._onnx.outputs if o in TERM_NAMES]
            self.score_terms = [t for t in self._onnx.score_terms if t in self.terms] or self.terms
            self.model = None
            self.precision = self._onnx.precision
        else:
            self.model, self.calibration, self.doc = load_run(self.source)
            self.population = Population.from_dict(self.doc["population"]) if self.doc.get("population") else None
            self.image_size = self.model.cfg.image_size
            self.heatmap_kind = heatmap_kind(self.model.cfg)
            self.terms = model_components(self.model)
            self.score_terms = [t for t in score_term_names(self.model.cfg) if t in self.terms]
            self.precision = "fp32"

    @property
    def heatmap_max(self) -> float:
        return HEATMAP_DISPLAY[self.heatmap_kind][1]

    def score(self, images: np.ndarray, keep_maps: bool = False) -> dict[str, np.ndarray]:
        if self._ensemble is not None:
            return self._ensemble.score(images, self.batch_size, keep_maps=keep_maps)
        if self.model is None:
            return self._onnx.score(images, self.batch_size, keep_maps=keep_maps)
        return score_images(self.model, images, self.batch_size, keep_maps=keep_maps)

    def records(self, names: list[str], images: np.ndarray, keep_maps: bool = False, batch: BatchCheck | None = None) -> list[ScoredImage]:
        """Score a stack of images and make one record each; `batch` accumulates the population check of a whole
        run of stacks (each image's features are computed once either way)."""
        scored = self.score(images, keep_maps)
        norm = self.calibration.normalise(scored["score"]) if self.calibration else scored["score"]
        pct = self.calibration.percentile(scored["score"]) if self.calibration else None
        if batch is not None:
            dist, outside = batch.add(images)
        elif self.population is not None:
            dist, outside = self.population.check(images)
        else:
            dist, outside = None, None
        out = []
        for i, name in enumerate(names):
            if not np.isfinite(norm[i]):  # a NaN never clears a film: the image is reported as not scored
                out.append(ScoredImage(name, NOT_SCORED, error=f"the score is not finite ({norm[i]}): the run cannot score this image"))
                continue
            out.append(ScoredImage(
                name, flag_of(float(norm[i]), self.calibration), float(norm[i]), float(scored["score"][i]),
                {k: float(scored[k][i]) for k in self.terms if k in scored},
                scored["heatmap"][i].astype(np.float32) if keep_maps else None,
                normal_percentile=float(pct[i]) if pct is not None else None,
                population_distance=float(dist[i]) if dist is not None else None,
                outside_population=bool(outside[i]) if outside is not None else None,
            ))
        return out

    def model_info(self) -> ModelInfo:
        """What DICOM results say about the model: name, version, a UID from the weights' checksum, operating point."""
        preset = f"score {'+'.join(self.score_terms)}"
        if self._ensemble is not None:
            digest, preset = self._ensemble.digest, f"ensemble of {len(self._ensemble.models)}, {preset}"
        else:
            digest = self.doc.get("weights_sha256") or file_sha256(self.source if self.source.is_file() else self.source / MODEL_FILE)
        cal = self.calibration
        return ModelInfo(name=f"cxr-oneclass ({preset})", version=str(self.doc.get("version") or __version__), uid=model_uid(digest),
                         operating_point=(f"threshold {cal.threshold:.4f}: {cal.rule}" if cal else "none"),
                         threshold=float(cal.threshold) if cal else 0.0)


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
                accept_any_modality: bool = False, views: AbstractSet[str] = DEFAULT_VIEWS, keep_images: bool = False,
                population: BatchCheck | None = None) -> Iterator[ScoredImage]:
    """Score files, folders and DICOM file sets in bounded-memory chunks, yielding records in input order.

    Files are found by suffix or DICOM content (`studies.discover`); each DICOM header is read first, and an image
    that is not one of `views` (or not an image) is yielded as `skipped` with the reason, never decoded. Threads,
    one a core, decode chunk k+1 while chunk k is scored: at most two chunks of images are in memory, whatever the
    number of files. Unreadable inputs are yielded as `error` records, never fatal for the others. Heat maps are
    drawn into `heatmap_dir` when given, and kept in the records with `keep_maps` (the decoded images with
    `keep_images`). DICOM files that are not projection radiographs are refused unless `accept_any_modality`.
    `population` accumulates the batch's population check.
    """
    draw = heatmap_dir is not None
    files, missing = discover(paths)
    for err in missing:
        yield ScoredImage(err.path, NOT_SCORED, error=err.problem)
    used_names: set[str] = set()
    size = scorer.image_size

    def prepare(p: Path) -> tuple[ImageInfo | None, np.ndarray | ImageError | str]:
        """(header info, decoded image | error | reason to skip)"""
        try:
            info = read_info(p)
        except ImageError as exc:
            return None, exc
        except Exception as exc:  # noqa: BLE001 - whatever breaks one file is that file's error, never the batch's
            return None, ImageError(p, f"could not read its header ({type(exc).__name__}: {str(exc)[:200]})")
        reason = skip_reason(info, views)
        if reason is not None:
            return info, reason
        try:
            return info, load_image(p, size, accept_any_modality=accept_any_modality)
        except ImageError as exc:
            return info, exc
        except Exception as exc:  # noqa: BLE001
            return info, ImageError(p, f"could not be decoded ({type(exc).__name__}: {str(exc)[:200]})")

    bs = scorer.batch_size
    chunks = [files[s : s + bs] for s in range(0, len(files), bs)]
    # A decoding thread per core this process may use (its affinity mask, which containers and taskset narrow;
    # decoders release the GIL): with many cores and large files, decoding must not hold back a fast model.
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    with ThreadPoolExecutor(max(2, min(32, cores))) as pool:
        pending = [pool.submit(prepare, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            prepared = [f.result() for f in pending]
            # Decode the next chunk in the background while this one is scored.
            pending = [pool.submit(prepare, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            ok = [(p, a) for p, (_, a) in zip(chunk, prepared) if isinstance(a, np.ndarray)]
            stack = np.stack([a for _, a in ok]) if ok else None
            records = iter(scorer.records([str(p) for p, _ in ok], stack, keep_maps or draw, population) if ok else [])
            for p, (info, a) in zip(chunk, prepared):
                if isinstance(a, str):
                    yield ScoredImage(str(p), SKIPPED, error=a, info=info)
                    continue
                if isinstance(a, ImageError):
                    yield ScoredImage(str(p), NOT_SCORED, error=a.problem, info=info)
                    continue
                rec = next(records)
                rec.info = info
                if keep_images:
                    rec.image = a
                if draw and rec.heatmap is not None:
                    target = Path(heatmap_dir) / heatmap_name(p, used_names)
                    save_overlay(target, a, rec.heatmap, heat_max=scorer.heatmap_max)
                    rec.heatmap_file = str(target)
                if not keep_maps:
                    rec.heatmap = None
                yield rec


# ----------------------------------------------------------------------------------------------- studies

STUDY_COLUMNS = ("study", "patient_id", "accession", "study_uid", "study_date", "n_images", "n_scored", "n_skipped",
                 "n_errors", "score", "normal_percentile", "flag", "top_image", "outside_population")


def study_flag(records: list[ScoredImage]) -> str:
    """A study is abnormal when any of its scored images is; otherwise it needs review (`error`) when an image it
    should have scored failed; `normal` only when every image to score was scored and cleared; `skipped` when it
    had nothing to score (laterals only, say). Fail closed: a study is never cleared on fewer images than it has."""
    flags = {r.flag for r in records}
    if ABNORMAL in flags:
        return ABNORMAL
    if NOT_SCORED in flags:
        return NOT_SCORED
    return NORMAL if NORMAL in flags else SKIPPED


def study_rows(records: list[ScoredImage], salt: str | None = None) -> list[dict[str, object]]:
    """One row per study (StudyInstanceUID; a file without one is a study of its own): its score is the highest
    image score (a study is as abnormal as its most abnormal film), with that image named."""
    groups: dict[str, list[ScoredImage]] = {}
    for r in records:
        uid = r.info.study_uid if r.info is not None else ""
        groups.setdefault(uid or f"file:{r.source}", []).append(r)
    rows = []
    for key, recs in groups.items():
        first = next((r.info for r in recs if r.info is not None), None) or ImageInfo(recs[0].source)
        scored = [r for r in recs if r.score is not None and r.flag in (ABNORMAL, NORMAL)]
        top = max(scored, key=lambda r: r.score) if scored else None
        patient = pseudonymise(first.patient_id, salt) if salt is not None else first.patient_id
        rows.append({
            "study": key, "patient_id": patient, "accession": first.accession, "study_uid": first.study_uid,
            "study_date": first.study_date, "n_images": len(recs), "n_scored": len(scored),
            "n_skipped": sum(r.flag == SKIPPED for r in recs), "n_errors": sum(r.flag == NOT_SCORED for r in recs),
            "score": f"{top.score:.6f}" if top else "", "normal_percentile": f"{top.normal_percentile:.1f}" if top and top.normal_percentile is not None else "",
            "flag": study_flag(recs), "top_image": top.source if top else "",
            "outside_population": sum(bool(r.outside_population) for r in recs),
        })
    return rows


class DicomResults:
    """`--dicom-out DIR`: DICOM objects to store back into each study, under DIR/<StudyInstanceUID>/: an RGB
    Secondary Capture of each scored image's heat map over the image, and one Structured Report per study with
    every image's score and flag (`reporting/dicom_out.py`). Only DICOM inputs with a StudyInstanceUID take part."""

    def __init__(self, scorer: Scorer, out_dir: str | Path) -> None:
        self.scorer = scorer
        self.model = scorer.model_info()
        self.out = Path(out_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CxrError(f"cannot write DICOM results to {self.out}: {exc.strerror or exc}") from exc
        self.headers: dict[str, list[ImageResult]] = {}
        self.sc_series: dict[str, str] = {}
        self.written: list[Path] = []

    def add(self, rec: ScoredImage) -> None:
        """Write the image's Secondary Capture now (its pixels need not wait for the study) and keep its header."""
        info = rec.info
        if info is None or not info.is_dicom or not info.study_uid or rec.flag == SKIPPED:
            return
        ds = pydicom.dcmread(rec.source, stop_before_pixels=True, force=True)
        folder = self.out / info.study_uid
        if rec.heatmap is not None and rec.image is not None and rec.flag != NOT_SCORED:
            rgb = overlay(rec.image, rec.heatmap, heat_max=self.scorer.heatmap_max)
            rgb = np.repeat(np.repeat(rgb, 4, axis=0), 4, axis=1)  # enlarged (nearest) so a 64 px map is readable
            series = self.sc_series.setdefault(info.study_uid, str(generate_uid()))
            number = sum(1 for r in self.headers.get(info.study_uid, []) if r.flag != NOT_SCORED) + 1
            self.written.append(write_heatmap_sc(ImageResult(ds, rec.score, rec.flag, rec.terms, rgb), self.model, folder, series, number))
        self.headers.setdefault(info.study_uid, []).append(ImageResult(ds, rec.score, rec.flag, rec.terms))

    def finish(self, studies: list[dict[str, object]]) -> list[Path]:
        """One Structured Report per study that had a DICOM image to score."""
        for row in studies:
            uid = str(row["study_uid"])
            images = self.headers.get(uid)
            if not images or row["flag"] == SKIPPED:
                continue
            score = float(row["score"]) if row["score"] != "" else None
            self.written.append(write_study_sr(StudyResult(uid, score, str(row["flag"])), images, self.model, self.out / uid))
        return self.written


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
    """Score files and folders with a run folder or an .onnx file. Returns the scored records and the inputs not
    scored (errors, and skipped views with their reason); `on_record` sees every record as it is made."""
    scorer = Scorer(source, batch_size)
    results, errors = [], []
    for rec in iter_scores(scorer, paths, heatmap_dir):
        if on_record is not None:
            on_record(rec)
        if rec.flag in (NOT_SCORED, SKIPPED):
            errors.append(ImageError(rec.source, rec.error or "not scored"))
        else:
            results.append(rec)
    return results, errors
