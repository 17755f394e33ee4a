"""The run folder, in one place: which files a run holds, what makes it complete, where its data came from, and
how an experiment lays out its runs. Every job that writes or reads a run asks this module.

    RUN/model.safetensors   weights, batch-norm statistics and the score's statistics (loading never unpickles)
    RUN/config.json         resolved config, calibration, version, data provenance, score selection, ...
    RUN/history.csv         one row per epoch
    RUN/eval-SPLIT/         metrics.json + scores.csv of `evaluate`

    EXP/experiment.json     the plan;  EXP/results.{md,csv,json}
    EXP/runs/METHOD/seedK/  model/ (a run folder), eval/ (metrics.json, scores.csv); seedK/metrics.json last
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import Config
from .data.specs import load_dataset
from .data.types import Dataset
from .errors import ConfigError, DataError, RunError
from .io_utils import atomic_path, write_json
from .model.networks import OneClassGAN, build_model
from .scoring.calibration import Calibration
from .scoring.stats import new_score_stats
from .scoring.terms import TERM_NAMES

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
FORMAT = "cxr-oneclass/1"

EXPERIMENT_FILE = "experiment.json"
RESULTS_FILES = ("results.md", "results.csv", "results.json")
SLOT_NAMES_KEY = "score_slots"  # safetensors metadata: the term of each stats.center/.scale slot


def eval_dir(run_dir: str | Path, split: str) -> Path:
    """Where `evaluate` writes a split's metrics and scores by default."""
    return Path(run_dir) / f"eval-{split}"


def is_run(path: str | Path) -> bool:
    """A trained run: weights and config both present."""
    p = Path(path)
    return (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file()


def find_eval(run_dir: str | Path) -> Path | None:
    """RUN/eval-test, else the first RUN/eval-* with scores; None when the run was never evaluated."""
    run_dir = Path(run_dir)
    test = eval_dir(run_dir, "test")
    if (test / SCORES_FILE).is_file() or (test / METRICS_FILE).is_file():
        return test
    found = sorted(d for d in run_dir.glob("eval-*") if d.is_dir() and (d / SCORES_FILE).is_file())
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------- provenance

@dataclass(frozen=True)
class DataProvenance:
    """What reproduces a run's data exactly: the spec with absolute paths and the seed its split was drawn with
    (the model seed for `train`, the experiment's split seed for its runs)."""

    spec: str
    split_seed: int

    def to_doc(self) -> dict[str, Any]:
        return {"data": self.spec, "split_seed": self.split_seed}

    @classmethod
    def of(cls, ds: Dataset) -> DataProvenance:
        return cls(ds.spec, ds.split_seed)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], run_dir: str | Path | None = None) -> DataProvenance | None:
        """From a config.json; None when it records no data. Runs written before the split seed was recorded
        were split with their model seed, except an experiment's runs, which used the experiment's split seed."""
        spec = doc.get("data")
        if not spec:
            return None
        seed = doc.get("split_seed")
        if seed is None and run_dir is not None:
            exp = experiment_of(run_dir)
            if exp is not None:
                seed = _read_json(exp / EXPERIMENT_FILE).get("split_seed")
        if seed is None:
            seed = (doc.get("config") or {}).get("seed", 0)
        return cls(str(spec), int(seed))


def run_dataset(run_dir: str | Path, doc: dict[str, Any], image_size: int, splits: tuple[str, ...],
                data: str | Dataset | None = None) -> Dataset:
    """The data a run was trained on (exactly its split), or `data` when given (a spec is split with the run's
    split seed)."""
    if isinstance(data, Dataset):
        return data
    prov = DataProvenance.from_doc(doc, run_dir)
    if data is None and prov is None:
        raise DataError(f"{run_dir}: the run does not record its data; give --data")
    spec = data if data is not None else prov.spec
    seed = prov.split_seed if prov is not None else int((doc.get("config") or {}).get("seed", 0))
    return load_dataset(spec, image_size, seed, splits=splits)


# ----------------------------------------------------------------------------------------------- experiments

@dataclass(frozen=True)
class ExperimentRun:
    """One (method, seed) of an experiment: `root` holds `model/` (a run), `eval/` and, last, `metrics.json`."""

    method: str
    seed: int
    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def done_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def finished(self) -> bool:
        return self.done_file.is_file()


def experiment_run(exp_dir: str | Path, method: str, seed: int) -> ExperimentRun:
    return ExperimentRun(method, seed, Path(exp_dir) / "runs" / method / f"seed{seed}")


def experiment_runs(exp_dir: str | Path, methods: list[str] | None = None) -> list[ExperimentRun]:
    """The runs found under EXP/runs/ (trained ones: their model/ is a run), methods in the given order first,
    seeds in numeric order."""
    root = Path(exp_dir) / "runs"
    found = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    order = [m for m in (methods or []) if m in found] + [m for m in found if m not in (methods or [])]
    out = []
    for m in order:
        seeds = []
        for d in (root / m).glob("seed*"):
            match = re.fullmatch(r"seed(-?\d+)", d.name)
            if d.is_dir() and match:
                seeds.append(int(match.group(1)))
        out += [r for r in (experiment_run(exp_dir, m, s) for s in sorted(seeds)) if is_run(r.model_dir)]
    return out


def experiment_of(path: str | Path) -> Path | None:
    """The experiment folder that a run (EXP/runs/M/seedK/model) or an experiment run (…/seedK) belongs to."""
    p = Path(path).resolve()
    for up in (p.parent.parent.parent, p.parent.parent.parent.parent):
        if (up / EXPERIMENT_FILE).is_file() and p.is_relative_to(up / "runs"):
            return up
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------------------------- save / load

def save_run(run_dir: str | Path, model: OneClassGAN, calibration: Calibration | None, extra: dict[str, Any] | None = None,
             data: DataProvenance | None = None) -> None:
    """Write the weights and config.json of a trained run (each file atomically; config.json last)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": __version__, "config": json.dumps(cfg.to_dict()), SLOT_NAMES_KEY: json.dumps(list(TERM_NAMES))}
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata=meta)
    doc = {"version": __version__, "config": cfg.to_dict(), "calibration": calibration.to_dict() if calibration else None}
    doc.update(extra or {})
    if data is not None:
        doc.update(data.to_doc())
    write_json(run_dir / CONFIG_FILE, doc)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} not found")
    if not is_run(run_dir):
        raise RunError(f"{run_dir} has no trained model ({MODEL_FILE} + {CONFIG_FILE}); train one with `cxr-oneclass train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from exc


def _slot_names(path: Path) -> list[str] | None:
    """The term of each standardisation slot as saved, or None for runs saved before it was recorded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        names = (fh.metadata() or {}).get(SLOT_NAMES_KEY)
    return json.loads(names) if names else None


def _map_slots(state: dict[str, torch.Tensor], saved: list[str] | None) -> None:
    """stats.center/.scale as saved -> one slot per term of today's table. Runs saved before a term was added
    have fewer slots (the table's first ones, before names were recorded); a term they lack is left as is."""
    for key, fill in (("stats.center", 0.0), ("stats.scale", 1.0)):
        have = state.get(key)
        if have is None or have.ndim != 1:
            continue
        names = saved if saved is not None else list(TERM_NAMES[: have.numel()])
        if len(names) != have.numel():
            raise RunError(f"{key}: {have.numel()} values for {len(names)} named score terms")
        value = dict(zip(names, have.tolist()))
        state[key] = torch.tensor([value.get(n, fill) for n in TERM_NAMES], dtype=have.dtype)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[OneClassGAN, Calibration | None, dict[str, Any]]:
    """(model in eval mode with its score statistics, calibration, the whole config.json)."""
    doc = read_run_config(run_dir)
    try:
        cfg = Config.from_dict(doc["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise RunError(f"{Path(run_dir) / CONFIG_FILE}: unusable config ({exc})") from exc
    model = build_model(cfg)
    model.stats = new_score_stats(cfg)
    path = Path(run_dir) / MODEL_FILE
    try:
        state = load_file(str(path))
        _map_slots(state, _slot_names(path))
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise RunError(f"{path}: weights do not match the config ({str(exc).splitlines()[0]})") from exc
    # Runs saved before the score had fitted statistics lack `stats.*`; their defaults leave rec/adv/enc as they were.
    missing = [k for k in result.missing_keys if not k.startswith("stats.")]
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise RunError(f"{path}: weights do not match the config (e.g. {', '.join(bad)})")
    model.to(device).eval()
    cal = Calibration.from_dict(doc["calibration"]) if doc.get("calibration") else None
    return model, cal, doc
