"""The score terms, in one table.

`TERMS` says, for each term, what it measures, which network it needs, its weight in the paper's score, whether
`score_terms auto` may choose it, the statistics it fits on training normals, how it is computed from one forward
pass, and which heat map it draws. Everything else reads this table: config validation, the checkpoint's
standardisation slots, CLI help, the CSV and metrics columns, the ONNX outputs and the reports. Adding a term
touches this file and its test.

A(x) of Tang et al. §2.3 is λ1·rec + λ2·adv + λ3·enc (`score_norm weights`); the other terms are this project's
(docs/RESULTS.md, issues 3 and 7).

A leaf of the package: it imports only `model.geometry`, so that `config` can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..model.geometry import encoder_channels
from .gaussian import fit_gaussian

if TYPE_CHECKING:  # types only: config imports this module
    from ..config import Config

SSIM_WINDOW = 7  # px at 64 px: about one rib space
SDIST_CHANNELS = 4  # principal directions of U's first feature map that sdist keeps
SDIST_SIDE = 8  # sdist's grid: the map is average-pooled to 8x8 cells (8x8 px each at 64 px)
RESIDUAL = "residual"  # the heat map of scores without a term that draws its own: |x - x'|


@dataclass
class Forward:
    """One forward pass of the networks on a batch, what every term is computed from (model units, [-1, 1])."""

    cfg: Config
    x: torch.Tensor  # (B, 1, H, W) input, fp32
    x_rec: torch.Tensor  # (B, 1, H, W) U's reconstruction x', fp32
    z: torch.Tensor  # (B, latent) U's latent
    feats_u: list[torch.Tensor]  # U's encoder maps, shallow to deep
    z_rec: torch.Tensor | None = None  # (B, latent) E's latent of x' (variants with E)
    logit: torch.Tensor | None = None  # (B,) D's logit of x' (variants with D)
    lesion: torch.Tensor | None = None  # (B, 1, H, W) S's lesion logits of x (with the detector)


@dataclass(frozen=True)
class Fitted:
    """Statistics a term fits on the training normals after training, saved with the weights as `stats.<name>`.

    buffers(cfg): the unfitted buffers (name -> tensor; the names are checkpoint keys, keep them stable).
    features(fwd): what to collect from each batch of training normals (B, ...).
    fit(features, cfg): the fitted buffers from all collected features (N, ...) as float64 arrays or tensors.
    """

    buffers: Callable[[Config], dict[str, torch.Tensor]]
    features: Callable[[Forward], torch.Tensor]
    fit: Callable[[np.ndarray, Config], dict[str, Any]]


@dataclass(frozen=True)
class Term:
    """One score term. `compute(fwd, stats)` -> (B,); `stats` is the model's `ScoreStats` (its buffers by name)."""

    name: str
    help: str
    compute: Callable[[Forward, Any], torch.Tensor]
    needs: str = ""  # "D", "E" or "S": the network the term needs ("" = U alone, every variant has it)
    paper_weight: str | None = None  # Config field holding its λ under score_norm weights (None: weight 1)
    auto: bool = False  # a candidate of score_terms auto
    fitted: Fitted | None = None
    # Its own heat map (B, H', W') in place of the residual, and how it is drawn: (label, value at full colour).
    heatmap: Callable[[Forward, Any], torch.Tensor] | None = None
    display: tuple[str, float] | None = None


# ----------------------------------------------------------------------------------------------- helpers

def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of images in [-1, 1], box window, same size as the input: (B,1,H,W)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # K1, K2 times the data range 2
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, 1, pad, count_include_pad=False)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def feature_vector(fwd: Forward) -> torch.Tensor:
    """(B, F) features that fdist measures: U's encoder maps below the first, each averaged over space ("u"),
    U's latent ("z") or E's latent of the reconstruction ("ez")."""
    kind = fwd.cfg.fdist_features
    if kind == "u":
        return torch.cat([f.float().mean(dim=(2, 3)) for f in fwd.feats_u[1:]], dim=1)
    if kind == "z":
        return fwd.z.float()
    if fwd.z_rec is None:
        raise ValueError("fdist features 'ez' need the encoder E")
    return fwd.z_rec.float()


def fdist_dim(cfg: Config) -> int:
    """Length of the feature vector that fdist measures."""
    if cfg.fdist_features == "u":
        return sum(encoder_channels(cfg.image_size, cfg.width)[1:])
    return cfg.latent_dim


def sdist_shape(cfg: Config) -> tuple[int, int, int]:
    """(channels of U's first feature map, principal directions kept, grid side) for sdist."""
    first = encoder_channels(cfg.image_size, cfg.width)[0]
    return first, min(SDIST_CHANNELS, first), min(SDIST_SIDE, cfg.image_size // 2)


def sdist_grid(first_map: torch.Tensor, side: int) -> torch.Tensor:
    """U's first feature map (B, C, h, w) average-pooled to (B, C, side, side): a coarse map of what is where."""
    k = first_map.shape[-1] // side
    return F.avg_pool2d(first_map.float(), k) if k > 1 else first_map.float()


# ----------------------------------------------------------------------------------------------- the terms

def _rec(fwd: Forward, stats: Any) -> torch.Tensor:
    return (fwd.x - fwd.x_rec).abs().mean(dim=(1, 2, 3))


def _adv(fwd: Forward, stats: Any) -> torch.Tensor:
    return 1.0 - torch.sigmoid(fwd.logit.float())


def _enc(fwd: Forward, stats: Any) -> torch.Tensor:
    return (fwd.z.float() - fwd.z_rec.float()).pow(2).mean(dim=1)


def _ssim(fwd: Forward, stats: Any) -> torch.Tensor:
    return 1.0 - ssim_map(fwd.x, fwd.x_rec).mean(dim=(1, 2, 3))


def _fdist(fwd: Forward, stats: Any) -> torch.Tensor:
    w = (feature_vector(fwd) - stats.feat_mean.float()) @ stats.feat_whiten.float()  # (B, F) whitened deviation
    return w.pow(2).mean(dim=1)  # squared Mahalanobis distance / F


def _fdist_buffers(cfg: Config) -> dict[str, torch.Tensor]:
    n = fdist_dim(cfg)
    return {"feat_mean": torch.zeros(n), "feat_whiten": torch.eye(n)}


def _fdist_fit(feats: np.ndarray, cfg: Config) -> dict[str, Any]:
    location, whiten = fit_gaussian(feats, "fdist")
    return {"feat_mean": location, "feat_whiten": whiten}


def _seg(fwd: Forward, stats: Any) -> torch.Tensor:
    return torch.sigmoid(fwd.lesion.float()).mean(dim=(1, 2, 3))


def _seg_heatmap(fwd: Forward, stats: Any) -> torch.Tensor:
    return torch.sigmoid(fwd.lesion.float())[:, 0]  # (B, H, W): the map whose mean is the seg term


def _sdist_parts(fwd: Forward, stats: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid projected on its principal channels g (B, P, side, side), its deviation from the normals' mean
    d (B, G) and the whitened deviation w (B, G), G = P·side²."""
    grid = sdist_grid(fwd.feats_u[0], sdist_shape(fwd.cfg)[2])
    g = torch.einsum("bchw,cp->bphw", grid - stats.sd_chan_mean.float()[None, :, None, None], stats.sd_proj.float())
    d = g.flatten(1) - stats.sd_mean.float()
    return g, d, d @ stats.sd_whiten.float()


def _sdist(fwd: Forward, stats: Any) -> torch.Tensor:
    return _sdist_parts(fwd, stats)[2].pow(2).mean(dim=1)


def _sdist_heatmap(fwd: Forward, stats: Any) -> torch.Tensor:
    """Each grid cell's share of the distance (B, side, side): d_i·(Σ⁻¹d)_i sums to dᵀΣ⁻¹d over i; per cell,
    divided by P, so that the map's mean is the sdist term. This is where the image left the normals' distribution."""
    g, d, w = _sdist_parts(fwd, stats)
    kept, side = stats.sd_proj.shape[1], g.shape[-1]
    return (d * (w @ stats.sd_whiten.float().T)).view(-1, kept, side, side).sum(dim=1) / kept


def _sdist_buffers(cfg: Config) -> dict[str, torch.Tensor]:
    channels, kept, side = sdist_shape(cfg)
    grid = kept * side * side
    return {"sd_chan_mean": torch.zeros(channels), "sd_proj": torch.zeros(channels, kept),
            "sd_mean": torch.zeros(grid), "sd_whiten": torch.eye(grid)}


def _sdist_features(fwd: Forward) -> torch.Tensor:
    return sdist_grid(fwd.feats_u[0], sdist_shape(fwd.cfg)[2])


def _sdist_fit(grids: np.ndarray, cfg: Config) -> dict[str, Any]:
    """Principal channel directions of the pooled first map over every cell of every image, then a Gaussian over
    the projected grid as one vector (where a structure sits matters, as on a film). grids: (N, C, side, side)."""
    kept = sdist_shape(cfg)[1]
    cells = grids.transpose(0, 2, 3, 1).reshape(-1, grids.shape[1])
    chan_mean = cells.mean(axis=0)
    _, _, vt = np.linalg.svd(cells - chan_mean, full_matrices=False)
    proj = vt[:kept].T  # (C, P)
    projected = np.einsum("nchw,cp->nphw", grids - chan_mean[None, :, None, None], proj).reshape(len(grids), -1)
    location, whiten = fit_gaussian(projected, "sdist")
    return {"sd_chan_mean": chan_mean, "sd_proj": np.ascontiguousarray(proj), "sd_mean": location, "sd_whiten": whiten}


# The order is the order of columns and of ONNX outputs; checkpoints record it (runs.py maps slots by name).
TERMS: tuple[Term, ...] = (
    Term("rec", "mean |x - x'|: what U fails to reconstruct (paper, λ1)", _rec, paper_weight="w_rec"),
    Term("adv", "1 - D(x'): how fake D finds the reconstruction (paper, λ2)", _adv, needs="D", paper_weight="w_adv"),
    Term("enc", "mean (z - E(x'))²: latent disagreement of U and E (paper, λ3)", _enc, needs="E", paper_weight="w_enc"),
    Term("ssim", "1 - mean SSIM(x, x'), 7x7 windows: structure U fails to reproduce", _ssim, auto=True),
    Term("fdist", "squared Mahalanobis distance / dim of a feature vector (fdist-features) from the training normals'",
         _fdist, auto=True, fitted=Fitted(_fdist_buffers, feature_vector, _fdist_fit)),
    Term("seg", "mean lesion probability that the detector S, trained on synthetic lesions drawn (mostly in the lung "
         "fields) onto normal films, gives the film's pixels", _seg, needs="S", auto=True, heatmap=_seg_heatmap,
         display=("lesion probability", 1.0)),
    Term("sdist", "the same distance for U's first map on an 8x8 grid, 4 principal channels: keeps where a lesion is",
         _sdist, auto=True, fitted=Fitted(_sdist_buffers, _sdist_features, _sdist_fit),
         heatmap=_sdist_heatmap, display=("sdist cell share", 20.0)),
)
TERM_NAMES: tuple[str, ...] = tuple(t.name for t in TERMS)
# The table's order when runs did not yet record their slot names (runs.py maps their stats slots by it): seg came
# later, between fdist and sdist.
LEGACY_SLOT_ORDER: tuple[str, ...] = ("rec", "adv", "enc", "ssim", "fdist", "sdist")
TERM_BY_NAME: dict[str, Term] = {t.name: t for t in TERMS}
TERM_INDEX: dict[str, int] = {t.name: i for i, t in enumerate(TERMS)}  # a term's slot in ScoreStats.center/.scale
# score_terms "auto": the sum of a subset of these (standardised) with the highest validation AUC.
AUTO_TERMS: tuple[str, ...] = tuple(t.name for t in TERMS if t.auto)
# How each heat map is drawn: (what the map is, value at full colour; larger values saturate). A residual of 0.5
# is a quarter of the [-1, 1] image range; an sdist cell share of 20 is about 20x an average cell of a training
# normal (a normal film's hottest cell is typically 5-15).
HEATMAP_DISPLAY: dict[str, tuple[str, float]] = {RESIDUAL: ("|x - x'|", 0.5), **{t.name: t.display for t in TERMS if t.heatmap}}


def terms_help() -> str:
    """One line per term, for CLI help and docs."""
    return "; ".join(f"{t.name}: {t.help}" for t in TERMS)


def score_term_names(cfg: Config) -> list[str]:
    """The terms `cfg.score_terms` names, in table order; "auto", before its choice on validation, names every
    candidate whose network the config has."""
    if cfg.score_terms == "auto":
        chosen = {n for n in AUTO_TERMS if has_term(TERM_BY_NAME[n], cfg.uses_d, cfg.uses_e, cfg.uses_s)}
    else:
        chosen = set(cfg.score_terms.split("+"))
    return [n for n in TERM_NAMES if n in chosen]


def heatmap_kind(cfg: Config) -> str:
    """Which map the score draws: the first of its terms with a heat map of its own, else the residual."""
    names = score_term_names(cfg)
    return next((t.name for t in TERMS if t.heatmap is not None and t.name in names), RESIDUAL)


def has_term(term: Term, has_d: bool, has_e: bool, has_s: bool = False) -> bool:
    return term.needs == "" or {"D": has_d, "E": has_e, "S": has_s}[term.needs]


def weights_of(cfg: Config, available: list[str]) -> dict[str, float]:
    """Weights of the score's terms among `available`: the paper's λ (1 for terms without one) under `weights`,
    1 for every term under `standardised`."""
    chosen = score_term_names(cfg)
    out = {}
    for t in TERMS:
        if t.name in available and t.name in chosen:
            standard = cfg.score_norm == "standardised" or t.paper_weight is None
            out[t.name] = 1.0 if standard else float(getattr(cfg, t.paper_weight))
    return out
