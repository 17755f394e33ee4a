"""Is this the population the model knows? A check of the films being scored against the training normals.

An anomaly score cannot tell "abnormal" from "unlike anything trained on": pediatric films given to a model of
adult films, another scanner or another view all score high, and a triage tool would surface them as abnormal
(or, with a miscalibrated scale, clear them). So the check looks at what disease changes little and acquisition
changes much: the image's global look (intensity quantiles, contrast, sharpness, how much is black or burnt out,
an 8x8 layout of brightness). A Gaussian of these on the training normals gives each image a distance, and an
image beyond the 99th percentile of validation normals' distances is `outside` the population (information: one
odd film says little). The batch verdict looks at where the batch lies as a whole: the mean of its whitened
features, squared and averaged over the dimensions (`shift`). A population the model knows stays low (on the
shared sets' validation splits, at most 0.20, for a batch of abnormal films only); another population moves it far
(the other set's validation films: 0.53 and more); a batch above SHIFT_LIMIT gets a warning (docs/RESULTS.md,
issue 16; the test splits, looked at afterwards, agree: own test split at most 0.27, the other set 0.60 and more).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .gaussian import fit_gaussian

QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
GRID = 8
LIMIT_QUANTILE = 0.99  # of the reference normals' distances: 1% of normal films of the population are outside
# Chosen on the shared sets' validation splits: between the most a batch of the model's own population moved (0.20,
# abnormal films only) and the least another population did (0.53), at their geometric mean; far above the noise
# of a batch of 20 (about 1/20 = 0.05).
SHIFT_LIMIT = 0.33
MIN_BATCH = 20  # fewer films than this: per-image information only, no batch verdict


def image_features(images: np.ndarray) -> np.ndarray:
    """(N, F) global-look features of uint8 images (N, S, S), float64 in [0, 1] units."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    n, s = x.shape[0], x.shape[-1]
    flat = x.reshape(n, -1)
    qs = np.quantile(flat, QUANTILES, axis=1).T  # (N, 7)
    gx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    gy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2))
    k = s // GRID
    grid = x[:, : k * GRID, : k * GRID].reshape(n, GRID, k, GRID, k).mean(axis=(2, 4)).reshape(n, -1)
    dark, bright = (flat < 0.04).mean(axis=1), (flat > 0.96).mean(axis=1)
    return np.column_stack([qs, flat.mean(axis=1), flat.std(axis=1), gx, gy, dark, bright, grid])


@dataclass
class Population:
    """The training normals' feature mean and whitening matrix, and the distance limit set on reference normals."""

    mean: list[float]
    whiten: list[list[float]]
    limit: float
    reference: str

    def whitened(self, images: np.ndarray) -> np.ndarray:
        return (image_features(images) - np.asarray(self.mean)) @ np.asarray(self.whiten)

    def distances(self, images: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance / dimension of each image's features from the training normals'."""
        return (self.whitened(images) ** 2).mean(axis=1)

    def check(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image: (distance, outside the population)."""
        d = self.distances(images)
        return d, d > self.limit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Population:
        return cls(**d)


def fit_population(train_normals: np.ndarray, reference_normals: np.ndarray | None) -> Population:
    """Fit on the training normals; the limit on `reference_normals` (validation normals: unseen, as new films
    are) when there are at least 20, else on the training normals (which makes the limit tighter)."""
    mean, whiten = fit_gaussian(image_features(train_normals), "population")
    w = whiten.numpy() if isinstance(whiten, torch.Tensor) else whiten
    pop = Population([float(v) for v in mean], [[float(v) for v in row] for row in w], 0.0, "")
    use_val = reference_normals is not None and len(reference_normals) >= MIN_BATCH
    ref = reference_normals if use_val else train_normals
    pop.limit = float(np.quantile(pop.distances(ref), LIMIT_QUANTILE))
    pop.reference = f"{'validation' if use_val else 'training'} normals ({len(ref)})"
    return pop


class BatchCheck:
    """Accumulates a batch (in chunks, as scoring streams) and gives its verdict."""

    def __init__(self, population: Population) -> None:
        self.population = population
        self.n = 0
        self.outside = 0
        self._sum: np.ndarray | None = None

    def add(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.population.whitened(images)
        d = (w**2).mean(axis=1)
        self._sum = w.sum(axis=0) if self._sum is None else self._sum + w.sum(axis=0)
        self.n += len(images)
        self.outside += int(np.sum(d > self.population.limit))
        return d, d > self.population.limit

    def verdict(self) -> dict:
        shift = float(((self._sum / self.n) ** 2).mean()) if self.n else 0.0
        warn = self.n >= MIN_BATCH and shift > SHIFT_LIMIT
        text = None
        if warn:
            text = (f"these {self.n} films do not look like the population the model was trained on (shift {shift:.2f}, "
                    f"limit {SHIFT_LIMIT}; {self.outside} of them outside it one by one): another site, age group, scanner "
                    "or view? Scores and flags may not mean here what they mean on the training data")
        return {"n": self.n, "outside": self.outside, "share_outside": self.outside / self.n if self.n else 0.0,
                "shift": shift, "shift_limit": SHIFT_LIMIT, "warning": text}
