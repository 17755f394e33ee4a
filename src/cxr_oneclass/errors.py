"""Exceptions with messages a user can act on. The CLI turns them into one line and an exit code."""

from __future__ import annotations


class CxrError(Exception):
    """Base class: anything the user can fix (bad input, bad path, bad option)."""


class DataError(CxrError):
    """A data spec, manifest or label file that cannot be used."""


class ImageError(CxrError):
    """One image file that cannot be read; the message names the file and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class RunError(CxrError):
    """A run folder without a usable model or config."""


class ConfigError(CxrError):
    """An unknown preset, variant or out-of-range option."""
