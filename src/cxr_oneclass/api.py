"""The Python API, for people who embed the tool; the CLI is a thin layer over the same jobs.

    import cxr_oneclass

    run = cxr_oneclass.load_run("runs/mine")
    for r in run.score(["new_studies/", "one.png", pixels]):   # files, folders or grey arrays (H, W)
        print(r.source, r.score, r.flag, r.terms)               # flag: abnormal | normal | error | skipped

    cfg = cxr_oneclass.resolve("best", epochs=5)                 # a preset with single values overridden
    run = cxr_oneclass.train(cfg, "csv:manifest.csv", "runs/new")

Scores are on the run's calibrated scale (0 and 1 = lowest and highest validation score); an image at or above
`run.threshold` is flagged abnormal. A record that could not be scored is flagged `error`, never `normal`; a DICOM
that is not a frontal view is `skipped`, with the reason in `error`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_PRESET, Config, resolve
from .data.types import Dataset
from .errors import ImageError
from .jobs.score import NOT_SCORED, ScoredImage, Scorer, array_to_image, iter_scores
from .jobs.train import train_run
from .scoring.calibration import Calibration


class Run:
    """A trained run folder (or an exported .onnx graph, or an ensemble of runs), loaded once and ready to score."""

    def __init__(self, path: str | Path, batch_size: int = 64) -> None:
        self.path = Path(path)
        self._scorer = Scorer(self.path, batch_size)

    @property
    def config(self) -> Config | None:
        """The resolved config the run was trained with (None for an .onnx graph or an ensemble)."""
        return self._scorer.model.cfg if self._scorer.model is not None else None

    @property
    def calibration(self) -> Calibration | None:
        return self._scorer.calibration

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold if self.calibration else None

    @property
    def image_size(self) -> int:
        return self._scorer.image_size

    @property
    def terms(self) -> list[str]:
        """Every term a record reports; `score_terms` are those the score sums."""
        return list(self._scorer.terms)

    @property
    def score_terms(self) -> list[str]:
        return list(self._scorer.score_terms)

    def score(self, inputs: Iterable[str | Path | np.ndarray] | str | Path | np.ndarray, heatmaps: bool = False,
              heatmap_dir: str | Path | None = None) -> list[ScoredImage]:
        """Score files, folders (recursively) and grey images (H, W) as uint8 or floats in [0, 1]; one record per
        image, in input order. `heatmaps` keeps each heat map (H, W) in its record; `heatmap_dir` also draws them
        as PNG overlays there (for files)."""
        if isinstance(inputs, (str, Path, np.ndarray)):
            inputs = [inputs]
        out: list[ScoredImage] = []
        group: list[Any] = []

        def flush() -> None:
            if not group:
                return
            if isinstance(group[0], np.ndarray):
                out.extend(self._score_arrays(group, heatmaps))
            else:
                out.extend(iter_scores(self._scorer, group, heatmap_dir, keep_maps=heatmaps))
            group.clear()

        for item in inputs:
            if group and isinstance(item, np.ndarray) != isinstance(group[0], np.ndarray):
                flush()
            group.append(item)
        flush()
        return out

    def _score_arrays(self, arrays: list[np.ndarray], keep_maps: bool) -> list[ScoredImage]:
        names, images, results = [], [], {}
        for i, a in enumerate(arrays):
            name = f"array[{i}]"
            try:
                images.append(array_to_image(a, self.image_size, name))
                names.append(name)
            except ImageError as exc:
                results[name] = ScoredImage(name, NOT_SCORED, error=exc.problem)
        if images:
            for rec in self._scorer.records(names, np.stack(images), keep_maps):
                results[rec.source] = rec
        return [results[f"array[{i}]"] for i in range(len(arrays))]


def load_run(path: str | Path, batch_size: int = 64) -> Run:
    """Load a run folder written by `train` (or an .onnx file written by `export`) for scoring."""
    return Run(path, batch_size)


def train(config: Config | str | None, data: str | Dataset, out: str | Path, progress: bool = False, **overrides: Any) -> Run:
    """Train a run into `out` and return it loaded. `config` is a Config, a preset name, or None for the default
    preset; `overrides` change single values (e.g. epochs=5). `data` is a data spec (README) or a Dataset."""
    if config is None or isinstance(config, str):
        config = resolve(config or DEFAULT_PRESET, **overrides)
    elif overrides:
        config = Config.from_dict({**config.to_dict(), **overrides})
    train_run(config, data, out, progress=progress)
    return Run(out)
