"""A run folder: `model.safetensors` (weights + batch-norm statistics) and `config.json` (resolved config,
calibration, package version, data). Loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config
from .errors import ConfigError, RunError
from .io_utils import atomic_path, write_json
from .nets import OneClassGAN, build_model
from .scoring import Calibration

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_run(run_dir: str | Path, model: OneClassGAN, cfg: Config, calibration: Calibration | None, extra: dict[str, Any] | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "cxr-oneclass/1", "version": __version__, "config": json.dumps(cfg.to_dict())}
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata=meta)
    doc = {
        "version": __version__,
        "config": cfg.to_dict(),
        "calibration": calibration.to_dict() if calibration else None,
    }
    doc.update(extra or {})
    write_json(run_dir / CONFIG_FILE, doc)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} not found")
    if not (run_dir / MODEL_FILE).is_file() or not path.is_file():
        raise RunError(f"{run_dir} has no trained model ({MODEL_FILE} + {CONFIG_FILE}); train one with `cxr-oneclass train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from exc


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[OneClassGAN, Calibration | None, dict[str, Any]]:
    """(model in eval mode, calibration, the whole config.json)."""
    doc = read_run_config(run_dir)
    try:
        cfg = Config.from_dict(doc["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise RunError(f"{Path(run_dir) / CONFIG_FILE}: unusable config ({exc})") from exc
    model = build_model(cfg)
    try:
        state = load_file(str(Path(run_dir) / MODEL_FILE))
        for key, fill in (("stats.center", 0.0), ("stats.scale", 1.0)):  # runs saved before a score term was added
            have, want = state.get(key), getattr(model.stats, key.split(".")[1])
            if have is not None and have.ndim == 1 and have.numel() < want.numel():
                state[key] = torch.cat([have, torch.full((want.numel() - have.numel(),), fill, dtype=have.dtype)])
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise RunError(f"{Path(run_dir) / MODEL_FILE}: weights do not match the config ({str(exc).splitlines()[0]})") from exc
    # Runs saved before the score had fitted statistics lack `stats.*`; their defaults leave rec/adv/enc as they were.
    missing = [k for k in result.missing_keys if not k.startswith("stats.")]
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise RunError(f"{Path(run_dir) / MODEL_FILE}: weights do not match the config (e.g. {', '.join(bad)})")
    model.to(device).eval()
    cal = Calibration.from_dict(doc["calibration"]) if doc.get("calibration") else None
    return model, cal, doc
