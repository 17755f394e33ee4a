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

import hashlib
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
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
from .scoring.terms import LEGACY_SLOT_ORDER, TERM_NAMES

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ENSEMBLE_FILE = "ensemble.json"  # an ensemble of runs (scoring/ensemble.py), not a run
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
FORMAT = "cxr-oneclass/1"

EXPERIMENT_FILE = "experiment.json"
RESULTS_FILES = ("results.md", "results.csv", "results.json")
SLOT_NAMES_KEY = "score_slots"  # in the weights' metadata: the term of each stats.center/.scale slot
META_KEY = "cxr_oneclass"  # the weights' one metadata entry


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
    found = sorted(d for d in run_dir.glob("eval-*") if d.is_dir() and not d.name.endswith(PARTIAL_SUFFIX) and (d / SCORES_FILE).is_file())
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------- writing as one unit

PARTIAL_SUFFIX = ".partial"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_INFO = "checkpoint.json"


def partial_dir(target: str | Path) -> Path:
    """Where a run (or an evaluation folder) is written until it is complete: TARGET.partial, beside it."""
    target = Path(target)
    return target.with_name(target.name + PARTIAL_SUFFIX)


def commit_dir(partial: Path, target: Path) -> None:
    """Put the finished `partial` folder in place of `target`. An earlier run there (its evaluations included)
    stays whole until then and goes away as a whole: a crash leaves the old or the new folder, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(partial, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(target: str | Path, keep_on_error: bool = False, fresh: bool = True) -> Iterator[Path]:
    """Yield TARGET.partial to write into; on success it replaces TARGET (see commit_dir). On an error the partial
    folder is removed, or kept with `keep_on_error` (a training's checkpoints, for --resume). `fresh` empties
    a partial folder left by an earlier attempt first."""
    target = Path(target)
    partial = partial_dir(target)
    if fresh and partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot write {partial}: {exc.strerror or exc}") from exc
    try:
        yield partial
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    commit_dir(partial, target)


def check_writable(target: str | Path) -> None:
    """Fail now, not after the work, when `target` (a folder to write) cannot be created."""
    partial = partial_dir(target)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        probe = partial.parent / f".{partial.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write {target}: {exc.strerror or exc}") from exc


class Lock:
    """An exclusive lock file (pid and host inside), for work two processes must not do at once (training one
    run, writing one experiment run). A lock left by a process that no longer runs on this host is taken over."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.held = False

    def acquire(self) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot write {self.path.parent}: {exc.strerror or exc}") from exc
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return True
        return False

    def owner(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def _stale(self) -> bool:
        parts = self.owner().split()
        if len(parts) != 2 or parts[1] != socket.gethostname() or not parts[0].isdigit():
            return False  # another host's lock, or unreadable: assume it is alive
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise RunError(f"{self.path.parent} is being written by another process (lock {self.path.name}: pid/host "
                           f"{self.owner()}); wait for it, or remove {self.path} if that process is gone")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """A training checkpoint: tensors in safetensors, the rest in JSON (written last: it marks it complete)."""
    with atomic_path(folder / CHECKPOINT_FILE) as tmp:
        save_file(tensors, str(tmp))
        info = {**info, "tensors_sha256": file_sha256(tmp)}
    write_json(folder / CHECKPOINT_INFO, info)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint in `folder`, None when there is none; a RunError when it is damaged."""
    info_path, path = folder / CHECKPOINT_INFO, folder / CHECKPOINT_FILE
    if not info_path.is_file() or not path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("tensors_sha256") != file_sha256(path):
            raise RunError(f"{path} does not match {info_path.name} (checksum): the checkpoint is damaged")
        return load_file(str(path)), info
    except (ValueError, OSError) as exc:
        raise RunError(f"{path}: unreadable checkpoint ({str(exc)[:200]})") from exc


def remove_checkpoint(folder: Path) -> None:
    for name in (CHECKPOINT_INFO, CHECKPOINT_FILE):
        (folder / name).unlink(missing_ok=True)


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

    @property
    def lock_file(self) -> Path:
        """Beside the run's folder (which is removed when a run starts over), held while it trains."""
        return self.root.with_name(self.root.name + ".lock")


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

def _weights_metadata(cfg: Config) -> dict[str, str]:
    """One metadata entry, sorted JSON: safetensors writes several entries in a random order, and a run's weights
    file must be byte-identical for the same seed (a checksum proves a run reproduces)."""
    doc = {"format": FORMAT, "version": __version__, "config": cfg.to_dict(), SLOT_NAMES_KEY: list(TERM_NAMES)}
    return {META_KEY: json.dumps(doc, sort_keys=True)}


def read_weights_metadata(path: Path) -> dict[str, Any]:
    """The metadata a weights file was saved with (this format, or the separate entries of runs saved before)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if META_KEY in meta:
        return json.loads(meta[META_KEY])
    out: dict[str, Any] = {k: v for k, v in meta.items() if k in ("format", "version")}
    for key in ("config", SLOT_NAMES_KEY):
        if key in meta:
            out[key] = json.loads(meta[key])
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_run(run_dir: str | Path, model: OneClassGAN, calibration: Calibration | None, extra: dict[str, Any] | None = None,
             data: DataProvenance | None = None) -> None:
    """Write the weights and config.json of a trained run, each atomically, config.json last: it records the
    weights' checksum, so a folder whose weights and config come from two different writes does not load."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata=_weights_metadata(cfg))
        digest = file_sha256(tmp)
    doc = {"version": __version__, "config": cfg.to_dict(), "calibration": calibration.to_dict() if calibration else None}
    doc.update(extra or {})
    if data is not None:
        doc.update(data.to_doc())
    doc["weights_sha256"] = digest
    write_json(run_dir / CONFIG_FILE, doc)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        partial = partial_dir(run_dir)
        if (partial / CONFIG_FILE).is_file():
            raise RunError(f"run folder {run_dir} not found, but {partial} holds a finished run that was not moved into "
                           f"place (interrupted at the last step): rename it to {run_dir.name}")
        if partial.is_dir():
            raise RunError(f"run folder {run_dir} not found: its training did not finish ({partial}; continue it with "
                           f"`cxr-oneclass train --resume {run_dir}`)")
        raise RunError(f"run folder {run_dir} not found")
    if not is_run(run_dir) and (run_dir / ENSEMBLE_FILE).is_file():
        raise RunError(f"{run_dir} is an ensemble of runs: `score`, `evaluate`, `calibrate`, `serve` and `listen` take it; this command "
                       f"takes one run (e.g. its member {run_dir / 'members' / '0'})")
    if not is_run(run_dir):
        raise RunError(f"{run_dir} has no trained model ({MODEL_FILE} + {CONFIG_FILE}); train one with `cxr-oneclass train`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # bad JSON, a 5,000-digit number, deep nesting
        raise RunError(f"{path}: not a usable config.json ({str(exc)[:200]})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise RunError(f"{path}: not a cxr-oneclass config.json (no \"config\" object)")
    return doc


def _map_slots(state: dict[str, torch.Tensor], saved: list[str] | None) -> None:
    """stats.center/.scale as saved -> one slot per term of today's table. Runs saved before a term was added
    have fewer slots (the table's first ones, before names were recorded); a term they lack is left as is."""
    for key, fill in (("stats.center", 0.0), ("stats.scale", 1.0)):
        have = state.get(key)
        if have is None or have.ndim != 1:
            continue
        names = saved if saved is not None else list(LEGACY_SLOT_ORDER[: have.numel()])
        if len(names) != have.numel():
            raise RunError(f"{key}: {have.numel()} values for {len(names)} named score terms")
        value = dict(zip(names, have.tolist()))
        state[key] = torch.tensor([value.get(n, fill) for n in TERM_NAMES], dtype=have.dtype)


def _check_weights(path: Path, model: OneClassGAN) -> dict[str, Any]:
    """Read the weights file's header (no tensor data) and check it against the model the config describes,
    before anything of the config's size is allocated. Returns the file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        meta = read_weights_metadata(path)
    except Exception as exc:  # safetensors raises its own error types for a pickle, an empty or a cut file
        raise RunError(f"{path}: not a safetensors weights file ({str(exc).splitlines()[0][:200]})") from exc
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, shape in want.items() if not k.startswith("stats.") and shapes.get(k) != shape]
    extra = [k for k in shapes if k not in want]
    if wrong or extra:
        bad = (wrong + extra)[:3]
        raise RunError(f"{path}: weights do not match the config (e.g. {', '.join(bad)})")
    return meta


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise RunError(f"{path}: {k} holds NaN or infinite values: the model cannot score; retrain it")


def _calibration(doc: dict[str, Any], where: Path) -> Calibration | None:
    raw = doc.get("calibration")
    if raw is None:
        return None
    try:
        cal = Calibration.from_dict(raw)
        numbers = [float(cal.lo), float(cal.hi), float(cal.threshold)]
    except (TypeError, ValueError, OverflowError) as exc:
        raise RunError(f"{where}: unusable calibration ({str(exc)[:200]})") from exc
    if not all(math.isfinite(v) for v in numbers):
        raise RunError(f"{where}: calibration is not finite (lo, hi, threshold = {numbers}): refit it (`rescore`)")
    return cal


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[OneClassGAN, Calibration | None, dict[str, Any]]:
    """(model in eval mode with its score statistics, calibration, the whole config.json).

    Refuses, with a RunError naming the file, a run whose parts do not belong together (weights checksum, the
    config in the weights' metadata), whose weights do not fit its config (checked on the header before
    anything is allocated), or whose weights or calibration are not finite: such a run must never score."""
    run_dir = Path(run_dir)
    doc = read_run_config(run_dir)
    where = run_dir / CONFIG_FILE
    try:
        cfg = Config.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise RunError(f"{where}: unusable config ({exc})") from exc
    cal = _calibration(doc, where)
    path = run_dir / MODEL_FILE
    digest = doc.get("weights_sha256")
    if digest is not None and digest != file_sha256(path):
        raise RunError(f"{path} is not the file {CONFIG_FILE} was written with (checksum differs): the run folder was "
                       "changed or half-written; train it again or restore both files")
    with torch.device("meta"):  # shapes only: a crafted config cannot allocate gigabytes before the check
        skeleton = build_model(cfg)
        skeleton.stats = new_score_stats(cfg)
    meta = _check_weights(path, skeleton)
    saved_cfg = meta.get("config")
    if isinstance(saved_cfg, dict) and saved_cfg != doc["config"]:
        diff = sorted(k for k in set(saved_cfg) | set(doc["config"]) if saved_cfg.get(k) != doc["config"].get(k))
        raise RunError(f"{where} and {path.name}'s metadata disagree on {', '.join(diff[:5])}: the files come from two runs")
    model = build_model(cfg)
    model.stats = new_score_stats(cfg)
    try:
        state = load_file(str(path))
        _check_finite(path, state)
        _map_slots(state, meta.get(SLOT_NAMES_KEY))
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise RunError(f"{path}: weights do not match the config ({str(exc).splitlines()[0]})") from exc
    # Runs saved before the score had fitted statistics lack `stats.*`; their defaults leave rec/adv/enc as they were.
    missing = [k for k in result.missing_keys if not k.startswith("stats.")]
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise RunError(f"{path}: weights do not match the config (e.g. {', '.join(bad)})")
    model.to(device).eval()
    return model, cal, doc
