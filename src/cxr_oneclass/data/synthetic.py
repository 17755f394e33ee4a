"""Synthetic abnormalities rendered onto real normal films, mostly inside the lung fields, for training a detector.

Two parts:
- `lung_masks`: a coarse lung-field mask per training film, computed from the normal films themselves (no downloaded
  model): the lungs are the two large dark regions of the average film; each film's own mask is the darker part of
  that region on the film (so a film placed off-centre gets its own lungs), smoothed. Config `lung_keep` is the share
  of that region kept (1: all of it, opaque lung too); `lung_floor` raises the mask everywhere, so that a share of
  the lesions lands outside the lungs (the `detect` preset: 1 and 0.25, issue 14, session 9).
- `Lesions`: a batched renderer (torch, on the training device) of the lesion models a radiologist would name,
  following the phantoms' models (`data/phantom.py`) but drawn on real anatomy: consolidation and diffuse opacity
  (brightening towards soft tissue with a mottled texture), nodules, pleural effusion (a basal opacity with a
  meniscus), pneumothorax (a dark rim without lung markings), plus generic corruptions blended in smoothly
  (a patch from another normal film, local blur that erases vessel markings), as FPI/NSA/CutPaste do.
- `jitter` and `reacquire`: the films moved and exposed as real ones are, before the lesions; and, with config
  `acquisition_p`, imaged again by another chain (blur, sharpening, resolution, noise) after them; with `lut_p`,
  shown through another site's display curve (`relut`).

Every lesion is a soft shape times a strength; the target mask is where the film changed visibly (> `MASK_TAU` of the
grey range), as the phantoms' masks are. Images are (B, 1, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..config import LESION_KINDS

MASK_TAU = 0.02  # |change| (of the [0, 1] grey range, ~5 grey levels) above which a pixel counts as abnormal
KINDS = LESION_KINDS
DEFAULT_MIX = {"opacity": 3.0, "diffuse": 2.0, "nodule": 1.0, "effusion": 1.0, "pneumothorax": 0.5, "patch": 2.0,
               "blur": 0.5}


def lesion_mix(kinds: str) -> dict[str, float] | None:
    """The draw weights of config `lesion_kinds`: DEFAULT_MIX's weights of the kinds named ('+'-joined); None for all."""
    if kinds == "all":
        return None
    return {k: DEFAULT_MIX[k] for k in kinds.split("+")}


def _lung_prior(h: int, w: int) -> np.ndarray:
    """Where lungs can be on a frontal film: two generous ellipses either side of the midline."""
    ys, xs = np.mgrid[0:h, 0:w]
    ys, xs = ys / (h - 1) * 2 - 1, xs / (w - 1) * 2 - 1
    return sum(((xs - cx) / 0.36) ** 2 + ((ys - 0.0) / 0.66) ** 2 <= 1 for cx in (-0.42, 0.42)) > 0


def population_lung_mask(images: np.ndarray, lung_share: float = 0.5) -> np.ndarray:
    """Coarse lung fields of the average of `images` (uint8 (N, H, W)): the darker `lung_share` of the average film
    inside the lung prior (two ellipses, which keeps out the air around the body), the two largest parts, filled."""
    n, h, w = images.shape
    mean = ndimage.gaussian_filter(images.astype(np.float32).mean(0) / 255.0, sigma=h / 40)
    prior = _lung_prior(h, w)
    dark = prior & (mean <= np.quantile(mean[prior], lung_share))
    labels, count = ndimage.label(dark)
    if count == 0:
        return prior.astype(np.float32)
    sizes = ndimage.sum(dark, labels, index=range(1, count + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    mask = ndimage.binary_fill_holes(np.isin(labels, keep))
    return mask.astype(np.float32)


def lung_masks(images: np.ndarray, population: np.ndarray | None = None, keep: float = 0.7, floor: float = 0.0) -> np.ndarray:
    """Per-film lung masks (float32 (N, H, W) in [0, 1]): inside the population mask grown by ~6% of the size, the
    darker `keep` of each film's own smoothed pixels, opened and softened, then raised to at least `floor`
    everywhere (lesion centres are drawn in proportion to the mask, so `floor` > 0 puts a share of them outside)."""
    n, h, w = images.shape
    pop = population_lung_mask(images) if population is None else population
    grown = ndimage.binary_dilation(pop > 0.5, iterations=max(1, h // 16)) & _lung_prior(h, w)
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        s = ndimage.gaussian_filter(images[i].astype(np.float32), sigma=h / 40)
        own = grown & (s <= np.quantile(s[grown], keep))
        own = ndimage.binary_opening(own, iterations=max(1, h // 32))
        if own.sum() < 0.25 * pop.sum():  # a film the rule cannot read: fall back to the average lungs
            own = pop > 0.5
        out[i] = ndimage.gaussian_filter(own.astype(np.float32), sigma=h / 64)
    return np.maximum(out, np.float32(floor)) if floor > 0 else out


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W), reflect-padded."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1))


def _smooth_noise(b: int, size: int, cells: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Low-frequency noise (B, 1, size, size) in about [-1, 1]: a random `cells`-square grid, bicubic upsampled."""
    grid = torch.rand(b, 1, cells, cells, generator=gen).to(device) * 2 - 1
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False).clamp(-1.5, 1.5)


def jitter(x: torch.Tensor, lungs: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Films moved and exposed as real ones are: shift (±6%), zoom (±8%), rotation (±4.6 degrees), gamma, contrast
    and brightness; the lung masks move with them. No flips: the heart sits on the left. x, lungs (B, 1, H, W).
    `strength` k scales the geometric ranges; above 1 one axis is also stretched against the other by up to
    ±10%·(k - 1) (another aspect ratio). At 1 the draws are exactly those of every run before it existed."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * 2 * (0.08 * strength)
    sc = 1 + (torch.rand(b, generator=gen) - 0.5) * 2 * (0.08 * strength)
    tx, ty = [(torch.rand(b, generator=gen) - 0.5) * 2 * (0.06 * strength) for _ in range(2)]
    sx = sy = sc
    if strength > 1:  # drawn after the others, so that strength 1 leaves the stream as it was
        stretch = 1 + (torch.rand(b, generator=gen) - 0.5) * 2 * (0.1 * (strength - 1))
        sx, sy = sc * stretch.sqrt(), sc / stretch.sqrt()
    theta = torch.stack([torch.stack([sx * torch.cos(ang), -sy * torch.sin(ang), tx], 1),
                         torch.stack([sx * torch.sin(ang), sy * torch.cos(ang), ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    both = F.grid_sample(torch.cat([x, lungs], 1), grid, padding_mode="border", align_corners=False)
    x, lungs = both[:, :1], both[:, 1:]
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4)
    x = x.clamp(1e-4, 1) ** gamma
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.3
    mean = x.mean((2, 3), keepdim=True)
    shift = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1
    return ((x - mean) * contrast + mean + shift).clamp(0, 1), lungs


def reacquire(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Each film, with probability `p`, imaged again by another acquisition chain *after* its lesions were drawn (the
    lesion is in the patient, the chain blurs everything): a little blur or unsharp-mask sharpening, a pass through a
    lower resolution, quantum noise; one to three of them. S then cannot tell lesions from one site's texture, which
    the simulated shifts of research/shift_robustness.py found it did (blur and low resolution cost it most).
    x (B, 1, H, W) in [0, 1]; draws from `gen` only when p > 0, so p = 0 leaves a seeded run as it was."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    out = x.clone()
    for i in torch.nonzero(torch.rand(b, generator=gen) < p).flatten().tolist():
        img = out[i : i + 1]
        ops = torch.randperm(4, generator=gen)[: int(torch.randint(1, 4, (), generator=gen))].tolist()
        for op in sorted(ops):  # optics, then the detector's sampling, then its noise
            u = float(torch.rand((), generator=gen))
            if op == 0:  # blur: sigma 0.3-1.0 px at 64 px
                img = _blur(img, (0.3 + 0.7 * u) * h / 64)
            elif op == 1:  # unsharp mask, amount 0.3-1.0
                img = img + (0.3 + 0.7 * u) * (img - _blur(img, h / 64))
            elif op == 2:  # through 50-85% of the resolution and back
                side = max(8, round(h * (0.5 + 0.35 * u)))
                img = F.interpolate(F.interpolate(img, size=(side, side), mode="bilinear", antialias=True, align_corners=False),
                                    size=(h, w), mode="bicubic", align_corners=False)
            else:  # noise: std 0.5-3% of the grey range
                img = img + (0.005 + 0.025 * u) * torch.randn(img.shape, generator=gen).to(img.device)
        out[i : i + 1] = img.clamp(0, 1)
    return out


def relut(x: torch.Tensor, gen: torch.Generator, p: float, knots: int = 6) -> torch.Tensor:
    """Each film, with probability `p`, through a random monotone display curve (another site's LUT or its image
    processing: equalisation, windowing), applied last, after any re-imaging: the curve is piecewise linear through
    `knots` random increasing points from 0 to 1, blended with the identity by a random 30-100%. A monotone curve keeps
    every lesion where it was (the mask stays) and changes its contrast. x (B, 1, H, W) in [0, 1]; draws from `gen`
    only when p > 0."""
    if p <= 0:
        return x
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0], generator=gen) < p).flatten().tolist():
        steps = -torch.log(torch.rand(knots - 1, generator=gen).clamp_min(1e-6))  # exponential: a Dirichlet's increments
        ys = torch.cat([torch.zeros(1), torch.cumsum(steps, 0) / steps.sum()]).to(x)  # (knots,) from 0 to 1
        w = 0.3 + 0.7 * float(torch.rand((), generator=gen))
        pos = out[i].clamp(0, 1) * (knots - 1)
        lo = pos.floor().clamp(max=knots - 2).long()
        curve = ys[lo] + (pos - lo) * (ys[lo + 1] - ys[lo])
        out[i] = (1 - w) * out[i] + w * curve
    return out


@dataclass
class LesionSpec:
    """Ranges of the lesion draws, as fractions of the image size or of the grey range."""

    p_abnormal: float = 0.5  # share of training films that get a lesion
    max_lesions: int = 3  # lesions per abnormal film: 1..max
    opacity_radius: tuple[float, float] = (0.06, 0.2)
    diffuse_radius: tuple[float, float] = (0.15, 0.35)
    nodule_radius: tuple[float, float] = (0.02, 0.06)
    strength: tuple[float, float] = (0.15, 0.7)  # share of the way towards soft-tissue brightness


class Lesions:
    """Draws synthetic lesions on a batch of normal films inside their lung masks.

    `__call__(x, lungs)` -> (x_abnormal, mask, is_abnormal): x and lungs (B, 1, H, W) in [0, 1]; mask (B, 1, H, W)
    binary float; is_abnormal (B,) float. Randomness comes from `gen` only (seeded runs repeat)."""

    def __init__(self, spec: LesionSpec | None = None, mix: dict[str, float] | None = None,
                 gen: torch.Generator | None = None, p_abnormal: float | None = None) -> None:
        self.spec = spec or LesionSpec()
        if p_abnormal is not None:  # a copy: a spec the caller passed stays as it was
            self.spec = dataclasses.replace(self.spec, p_abnormal=p_abnormal)
        mix = dict(DEFAULT_MIX if mix is None else mix)
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0]
        w = torch.tensor([mix[k] for k in self.kinds], dtype=torch.float64)
        self.weights = w / w.sum()
        self.gen = gen or torch.Generator().manual_seed(0)

    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def _centre(self, lung: torch.Tensor) -> tuple[float, float]:
        """A pixel inside the lung mask (H, W), drawn in proportion to the mask; normalised coords in [-1, 1]."""
        h, w = lung.shape
        flat = lung.flatten().clamp_min(0).cpu().double() + 1e-9
        i = int(torch.multinomial(flat, 1, generator=self.gen))
        return (i % w) / (w - 1) * 2 - 1, (i // w) / (h - 1) * 2 - 1

    def _blob(self, h: int, w: int, cx: float, cy: float, r: float, edge: float, device) -> torch.Tensor:
        """A soft irregular blob (H, W) in [0, 1]: an ellipse whose radius wanders with angle (3 harmonics)."""
        ys = torch.linspace(-1, 1, h, device=device).view(h, 1)
        xs = torch.linspace(-1, 1, w, device=device).view(1, w)
        rot, aspect = self._u(0, math.pi), self._u(0.6, 1.6)
        dx, dy = xs - cx, ys - cy
        u = (dx * math.cos(rot) + dy * math.sin(rot)) / aspect**0.5
        v = (-dx * math.sin(rot) + dy * math.cos(rot)) * aspect**0.5
        d, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)
        rad = torch.ones_like(theta)
        for k in (2, 3, 5):
            rad = rad + self._u(0, 0.25) * torch.cos(k * theta + self._u(0, 2 * math.pi))
        rel = 1 - d / (r * rad.clamp_min(0.3))
        return torch.sigmoid(rel / max(edge, 1e-3))

    def _one(self, x: torch.Tensor, lung: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
        """One lesion on one film: x, lung, donor (H, W) -> changed film (H, W)."""
        s, (h, w), dev = self.spec, x.shape, x.device
        kind = self.kinds[int(torch.multinomial(self.weights, 1, generator=self.gen))]
        cx, cy = self._centre(lung)
        soft_lung = lung.clamp(0, 1)
        # Soft tissue brightness of this film: what an airless lung looks like (the mediastinum, the diaphragm).
        tissue = torch.quantile(x.flatten(), self._u(0.8, 0.97))
        if kind in ("opacity", "diffuse", "nodule"):
            lo, hi = {"opacity": s.opacity_radius, "diffuse": s.diffuse_radius, "nodule": s.nodule_radius}[kind]
            r = self._u(lo, hi)
            edge = self._u(0.05, 0.4) if kind != "nodule" else self._u(0.03, 0.15)
            shape = self._blob(h, w, cx, cy, r, edge, dev)
            if kind != "nodule":
                shape = shape * soft_lung  # airspace disease stops at the lung's edge
            texture = 1 + self._u(0.0, 0.6) * _smooth_noise(1, h, int(self._u(4, 12)), self.gen, dev)[0, 0]
            a = self._u(*s.strength) * (0.5 if kind == "diffuse" else 1.0) * (1.3 if kind == "nodule" else 1.0)
            return x + (a * shape * texture).clamp(0, 1) * (tissue - x).clamp_min(0)
        if kind == "effusion":
            ys = torch.linspace(-1, 1, h, device=dev).view(h, 1)
            xs = torch.linspace(-1, 1, w, device=dev).view(1, w)
            side = 1.0 if cx > 0 else -1.0
            level = self._u(0.1, 0.6)  # fluid top, in normalised y (lungs end near 0.7)
            meniscus = level - self._u(0.05, 0.3) * (xs * side).clamp_min(0)  # higher at the lateral wall
            shape = torch.sigmoid((ys - meniscus) / self._u(0.02, 0.08)) * ((xs * side) > -0.05).float()
            shape = shape * _blur(soft_lung.view(1, 1, h, w), h / 40)[0, 0].clamp(0, 1)
            a = self._u(0.4, 0.9)
            return x + a * shape * (tissue - x).clamp_min(0)
        if kind == "pneumothorax":
            ys = torch.linspace(-1, 1, h, device=dev).view(h, 1)
            xs = torch.linspace(-1, 1, w, device=dev).view(1, w)
            side = 1.0 if cx > 0 else -1.0
            rim = self._u(0.05, 0.2)
            inner = _blur((soft_lung > 0.5).float().view(1, 1, h, w), rim * h / 2)[0, 0]
            shape = ((soft_lung - inner).clamp(0, 1) * 2).clamp(0, 1) * ((xs * side) > 0.1).float()
            shape = shape * torch.sigmoid((self._u(-0.2, 0.5) - ys) / 0.1)  # apical and lateral
            dark = _blur(x.view(1, 1, h, w), 2.0)[0, 0] * (1 - self._u(0.1, 0.35))
            return x + shape * (dark - x)
        if kind == "patch":
            r = self._u(0.08, 0.25)
            shape = self._blob(h, w, cx, cy, r, self._u(0.1, 0.4), dev) * soft_lung
            oy, ox = int(self._u(-0.25, 0.25) * h), int(self._u(-0.25, 0.25) * w)
            src = torch.roll(donor, shifts=(oy, ox), dims=(0, 1))
            src = (src - src.mean()) * self._u(0.7, 1.4) + x.mean() + self._u(-0.1, 0.2)
            return x + self._u(0.5, 1.0) * shape * (src - x)
        # blur: a region loses its vessel markings (the smooth look of ground glass or of an over-inflated lung)
        shape = self._blob(h, w, cx, cy, self._u(0.08, 0.25), self._u(0.1, 0.4), dev) * soft_lung
        smooth = _blur(x.view(1, 1, h, w), self._u(1.0, 3.0) * h / 64)[0, 0] + self._u(-0.05, 0.1)
        return x + shape * (smooth - x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, lungs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        hit = torch.rand(b, generator=self.gen) < self.spec.p_abnormal
        out = x.clone()
        for i in torch.nonzero(hit).flatten().tolist():
            donor = x[(i + 1 + int(torch.randint(0, max(1, b - 1), (), generator=self.gen))) % b, 0]
            img = out[i, 0]
            for _ in range(int(torch.randint(1, self.spec.max_lesions + 1, (), generator=self.gen))):
                img = self._one(img, lungs[i, 0], donor)
            out[i, 0] = img.clamp(0, 1)
        mask = ((out - x).abs() > MASK_TAU).float()
        return out, mask, (mask.flatten(1).amax(1) > 0).float()
