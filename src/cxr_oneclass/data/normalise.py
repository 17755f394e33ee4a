"""Per-film intensity normalisation in front of every network (config film_norm).

Sites differ in their display processing: window, LUT, equalisation. A model that reads a film's grey levels as they
come takes one site's processing for normal anatomy (session 11: histogram equalisation of the validation films
alone broke every term on NIH, 0.78 -> 0.59). Equalising each film before U, D, E and S sees it makes every score
invariant to any monotone display curve by construction: only the order of the film's grey levels is left.

Written with plain tensor ops (scatter-add, cumsum, gather) so that the ONNX scoring graph carries it too; an image's
normalisation depends on that image alone, never on its batch.
"""

from __future__ import annotations

import torch

FILM_NORMS = ("none", "equalise")
LEVELS = 256  # the films are 8-bit; equalising at their own grey levels loses nothing


def equalise(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each film of x (B, 1, H, W) in [-1, 1]: every pixel goes to the mid-rank of its
    grey level within its own film, scaled to (-1, 1). A constant film maps to 0."""
    b = x.shape[0]
    flat = x.detach().float().reshape(b, -1)  # (B, H*W)
    q = ((flat + 1) * ((LEVELS - 1) / 2)).round().clamp(0, LEVELS - 1).long()
    hist = torch.zeros(b, LEVELS, dtype=flat.dtype, device=x.device).scatter_add(1, q, torch.ones_like(flat))
    mid = (hist.cumsum(1) - 0.5 * hist) / flat.shape[1]  # (B, LEVELS) share of the film below each level, in (0, 1)
    return (mid.gather(1, q) * 2 - 1).reshape(x.shape).to(x.dtype)


def normalise_films(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (B, 1, H, W) in [-1, 1] as the networks take it under config film_norm `how`."""
    if how == "none":
        return x
    if how == "equalise":
        return equalise(x)
    raise ValueError(f"unknown film normalisation {how!r}; choose one of {', '.join(FILM_NORMS)}")
