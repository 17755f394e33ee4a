"""What a report reads: the runs of a run folder or an experiment folder (found through `runs`, which owns the
layout) and what training and evaluation wrote about each."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunError
from ..runs import (
    CONFIG_FILE,
    EXPERIMENT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RESULTS_FILES,
    SCORES_FILE,
    DataProvenance,
    experiment_runs,
    find_eval,
    is_run,
)


@dataclass
class RunRecord:
    """One trained run and what was written about it."""

    method: str
    seed: int | None
    model_dir: Path
    eval_dir: Path | None
    doc: dict[str, Any]
    history: list[dict[str, float]]
    metrics: dict[str, Any] | None
    scores: list[dict[str, str]] | None

    @property
    def name(self) -> str:
        return self.method if self.seed is None else f"{self.method} seed {self.seed}"

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(float(r["label"])) for r in self.scores or []], dtype=np.int64)

    @property
    def score_values(self) -> np.ndarray:
        return np.array([to_float(r.get("score")) for r in self.scores or []], dtype=np.float64)

    @property
    def threshold(self) -> float | None:
        cal = self.doc.get("calibration") or {}
        return cal.get("threshold")


@dataclass
class Source:
    kind: str  # "run" | "experiment"
    path: Path
    runs: list[RunRecord]
    methods: list[str]
    data: str | None
    data_seed: int | None  # the seed the data spec was loaded with (experiments: the split seed)
    experiment: dict[str, Any] | None = None
    results_md: str | None = None

    def by_method(self, method: str) -> list[RunRecord]:
        return [r for r in self.runs if r.method == method]

    @property
    def repeats(self) -> int:
        return max((len(self.by_method(m)) for m in self.methods), default=0)


def to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_csv(path: Path) -> list[dict[str, str]] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return None


def _read_history(path: Path) -> list[dict[str, float]]:
    rows = read_csv(path) or []
    return [{k: to_float(v) for k, v in r.items() if k} for r in rows]


def _read_run(method: str | None, seed: int | None, model_dir: Path, eval_dir: Path | None) -> RunRecord:
    doc = read_json(model_dir / CONFIG_FILE) or {}
    if method is None:
        method = (doc.get("config") or {}).get("variant", "run")
    metrics = scores = None
    if eval_dir is not None:
        metrics = read_json(eval_dir / METRICS_FILE)
        scores = read_csv(eval_dir / SCORES_FILE)
    return RunRecord(method, seed, model_dir, eval_dir, doc, _read_history(model_dir / HISTORY_FILE), metrics, scores)


def read_source(path: str | Path) -> Source:
    """Detect a single run, an experiment's run (DIR/model + DIR/eval) or an experiment folder (see `runs`) and
    read everything a report needs."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such folder (give a run folder or an experiment folder)")
    single = path if is_run(path) else path / "model" if is_run(path / "model") else None
    if single is not None:
        ev = find_eval(path) if single == path else (path / "eval" if (path / "eval").is_dir() else None)
        run = _read_run(None, None, single, ev)
        prov = DataProvenance.from_doc(run.doc, single)
        return Source("run", path, [run], [run.method], prov.spec if prov else None, prov.split_seed if prov else None)
    exp = read_json(path / EXPERIMENT_FILE)
    if exp is None and not (path / "runs").is_dir():
        raise RunError(f"{path}: neither a run ({MODEL_FILE} + {CONFIG_FILE}) nor an experiment ({EXPERIMENT_FILE}, runs/)")
    exp = exp or {}
    found = experiment_runs(path, exp.get("methods", []))
    runs = [_read_run(r.method, r.seed, r.model_dir, r.eval_dir if r.eval_dir.is_dir() else None) for r in found]
    methods = list(dict.fromkeys(r.method for r in runs))
    if not runs:
        raise RunError(f"{path}: experiment has no finished runs under runs/<method>/seed<k>/model")
    md = path / RESULTS_FILES[0]
    results_md = md.read_text(encoding="utf-8") if md.is_file() else None
    prov = DataProvenance.from_doc(runs[0].doc, runs[0].model_dir)
    data = exp.get("data") or (prov.spec if prov else None)
    return Source("experiment", path, runs, methods, data, exp.get("split_seed", prov.split_seed if prov else 0), exp, results_md)
