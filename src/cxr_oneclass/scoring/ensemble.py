"""An ensemble of K runs trained on one data split (issue 14): each member's score is standardised on the shared
validation normals and the K standardised scores are averaged; the ensemble is calibrated on validation like a run.

Self-supervised detectors swing from seed to seed; their average swings less (docs/RESULTS.md, issue 14). The
folder: `ensemble.json` (written last: its presence marks a complete ensemble) and `members/<i>/`, each a complete
run folder (weights + config.json), so that the ensemble moves as one folder and each member still loads alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import RunError
from ..model.networks import OneClassGAN
from ..runs import ENSEMBLE_FILE, load_run
from .calibration import Calibration
from .inference import model_components, score_images
from .terms import TERM_NAMES, heatmap_kind, score_term_names

MEMBERS_DIR = "members"
FORMAT = "cxr-oneclass-ensemble/1"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


@dataclass
class Ensemble:
    """K loaded members and what standardises and calibrates their mean score."""

    path: Path
    models: list[OneClassGAN]
    docs: list[dict[str, Any]]  # each member's config.json
    center: np.ndarray  # (K,) each member's mean raw score on the validation normals
    scale: np.ndarray  # (K,) and its standard deviation there
    calibration: Calibration | None
    doc: dict[str, Any]  # ensemble.json

    @property
    def cfg(self) -> Config:
        """The first member's config: image size, batch size and target sensitivity are the ensemble's."""
        return self.models[0].cfg

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def data_dir(self) -> Path:
        """The first member's folder: its config.json records the data and split every member shares."""
        return self.path / self.doc["members"][0]["path"]

    @property
    def components(self) -> list[str]:
        """The terms any member reports, in table order (each image's value: the mean over the members that have it)."""
        have = {t for m in self.models for t in model_components(m)}
        return [t for t in TERM_NAMES if t in have]

    @property
    def score_terms(self) -> list[str]:
        have = {t for m in self.models for t in score_term_names(m.cfg)}
        return [t for t in TERM_NAMES if t in have]

    @property
    def heatmap_kind(self) -> str:
        """The map most members draw (ties: the first member's); the ensemble's map averages those members' maps."""
        kinds = [heatmap_kind(m.cfg) for m in self.models]
        return max(kinds, key=lambda k: (kinds.count(k), -kinds.index(k)))

    @property
    def population(self) -> dict | None:
        return self.docs[0].get("population")  # members share their training normals (checked when built)

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.path / ENSEMBLE_FILE).read_bytes()).hexdigest()

    def member_scores(self, images: np.ndarray, batch_size: int = 64, keep_maps: bool = False,
                      progress: bool = False) -> list[dict[str, np.ndarray]]:
        return [score_images(m, images, batch_size, keep_maps=keep_maps, progress=progress) for m in self.models]

    def combine(self, outs: list[dict[str, np.ndarray]], keep_maps: bool = False) -> dict[str, np.ndarray]:
        """The ensemble's outputs from its members' (`member_scores`). A member's NaN makes the image's score NaN:
        an image one member cannot score is not scored (never cleared)."""
        z = [(o["score"] - c) / s for o, c, s in zip(outs, self.center, self.scale)]
        out: dict[str, np.ndarray] = {"score": np.mean(z, axis=0)}
        for t in self.components:
            out[t] = np.mean([o[t] for o in outs if t in o], axis=0)
        if keep_maps:
            kind = self.heatmap_kind
            maps = [o["heatmap"].astype(np.float32) for o, m in zip(outs, self.models) if heatmap_kind(m.cfg) == kind]
            out["heatmap"] = np.mean(maps, axis=0).astype(np.float16)
            out["reconstruction"] = np.mean([o["reconstruction"].astype(np.float32) for o in outs], axis=0).astype(np.float16)
        return out

    def score(self, images: np.ndarray, batch_size: int = 64, keep_maps: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
        """Score uint8 images (N, H, W) as `scoring.inference.score_images` does a run: score (N,), each term, and
        with keep_maps the heat map and reconstruction (N, H, W)."""
        return self.combine(self.member_scores(images, batch_size, keep_maps, progress), keep_maps)


def standardisation(outs: list[dict[str, np.ndarray]], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each member's mean and standard deviation of its raw score on the validation normals."""
    normal = np.asarray(labels) == 0
    center = np.array([float(np.mean(o["score"][normal])) for o in outs])
    scale = np.array([float(np.std(o["score"][normal])) for o in outs])
    return center, scale


def read_ensemble_doc(path: str | Path) -> dict[str, Any]:
    """ensemble.json, checked: members, their standardisation, the calibration."""
    where = Path(path) / ENSEMBLE_FILE
    try:
        doc = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise RunError(f"{where}: not a usable ensemble file ({str(exc)[:200]})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RunError(f"{where}: not a {FORMAT} file")
    members = doc.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise RunError(f"{where}: lists no members")
    for m in members:
        try:
            c, s = float(m["center"]), float(m["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{where}: a member without a usable standardisation ({exc})") from exc
        if not (math.isfinite(c) and math.isfinite(s) and s > 0):
            raise RunError(f"{where}: member {m.get('path')!r} has standardisation {c}, {s}: it must be finite with scale > 0")
        rel = Path(str(m.get("path", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise RunError(f"{where}: member path {str(rel)!r} must lie inside the ensemble folder")
    return doc


def load_ensemble(path: str | Path) -> Ensemble:
    """The ensemble in folder `path`, every member loaded and checked as `runs.load_run` checks a run."""
    path = Path(path)
    doc = read_ensemble_doc(path)
    models, docs = [], []
    for m in doc["members"]:
        model, _, mdoc = load_run(path / m["path"])
        models.append(model)
        docs.append(mdoc)
    sizes = {mod.cfg.image_size for mod in models}
    if len(sizes) > 1:
        raise RunError(f"{path}: members of different image sizes ({sorted(sizes)})")
    cal = None
    if doc.get("calibration") is not None:
        try:
            cal = Calibration.from_dict(doc["calibration"])
        except (TypeError, ValueError, KeyError) as exc:
            raise RunError(f"{path / ENSEMBLE_FILE}: unusable calibration ({str(exc)[:200]})") from exc
        if not all(math.isfinite(float(v)) for v in (cal.lo, cal.hi, cal.threshold)):
            raise RunError(f"{path / ENSEMBLE_FILE}: calibration is not finite")
    center = np.array([float(m["center"]) for m in doc["members"]])
    scale = np.array([float(m["scale"]) for m in doc["members"]])
    return Ensemble(path, models, docs, center, scale, cal, doc)


__all__ = ["ENSEMBLE_FILE", "MEMBERS_DIR", "Ensemble", "is_ensemble", "load_ensemble", "read_ensemble_doc", "standardisation"]
