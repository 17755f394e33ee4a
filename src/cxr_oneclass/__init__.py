"""cxr-oneclass: a generative adversarial one-class classifier for abnormal chest X-rays (Tang et al., ISBI 2019).

The Python API (see `api`): `load_run(path).score(inputs)`, `train(config, data, out)`, `resolve(preset, ...)`.
They load on first use, so `import cxr_oneclass` stays light (no torch) for `__version__` and the CLI's help.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "load_run", "train", "resolve", "Run", "ScoredImage", "Config"]

_API = {"load_run": "api", "train": "api", "Run": "api", "ScoredImage": "jobs.score", "resolve": "config", "Config": "config"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
