"""Training S, the lesion detector (model/detector.py), on normal films with synthetic lesions (issue 14).

A second stage after the GAN: each step draws a batch of training normals, moves them as films move (shift, zoom,
small rotation, exposure), draws synthetic lesions into their lung fields (a share outside them with config
lung_floor; data/synthetic.py), images a share of them again (config acquisition_p), shows a share through another
display curve (config lut_p) and teaches S the lesion mask with a focal loss. An exponential moving average of the
weights is what scores (self-supervised detectors swing from step to step; the average swings less). With a labelled
validation split, the average is read every `detector_steps // 8` steps and the best reading is kept (selection on
validation, never on test): best on the validation films as they are (config detector_pick "val") or on average over
them and simulated acquisition shifts of them ("shifted", data/acquisition.SHIFTS).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..data.acquisition import SHIFTS
from ..data.normalise import normalise_films
from ..data.synthetic import Lesions, jitter, lesion_mix, lung_masks, reacquire, relut
from ..data.types import ImageSet
from ..metrics import auc
from ..model.detector import detector_members
from ..runtime import to_model_range

log = logging.getLogger(__name__)

SEED_OFFSET = 7919  # S's random stream is its own: adding S does not change what the GAN draws
STREAM_STRIDE = 104729  # apart from any seed's: member k of run seed s never draws what another run's S draws
READINGS = 8  # validation readings over the training


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy down-weighted where the pixel is already right. Lesions are a
    few percent of the pixels; plain cross-entropy would learn 'never a lesion'."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    pt = p * target + (1 - p) * (1 - target)
    return (ce * (1 - pt) ** gamma).mean()


@torch.no_grad()
def lesion_score(det: nn.Module, images: np.ndarray, batch_size: int = 128, film_norm: str = "none") -> np.ndarray:
    """The seg term of uint8 films (N, H, W) under `det` in eval mode: the mean predicted lesion probability.
    `film_norm`: the run's config film_norm (each film as S takes it)."""
    det.eval()
    device = next(det.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size]))).to(device)
        x = normalise_films(x, film_norm)
        out.append(torch.sigmoid(det(x)).mean(dim=(1, 2, 3)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def pick_films(images: np.ndarray, pick: str) -> dict[str, np.ndarray]:
    """The versions of the validation films (N, H, W) a reading of S is judged on under config detector_pick."""
    if pick == "val":
        return {"none": images}
    return {name: fn(images) for name, fn in SHIFTS.items()}


def reading_aucs(det: nn.Module, labels: np.ndarray, films: dict[str, np.ndarray], film_norm: str = "none") -> dict[str, float]:
    """Seg's validation AUC on each version of the films; their mean is what picks the reading."""
    return {name: auc(labels, lesion_score(det, f, film_norm=film_norm)) for name, f in films.items()}


def reading_merit(row: dict) -> float:
    """What a reading of S is picked by, from its history row: the mean AUC over the shifted versions where they
    were read (detector_pick "shifted"), else the AUC on the films as they are."""
    return row.get("val_auc_shifted", row["val_auc"])


def _ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(ema.buffers(), live.buffers()):
            e.copy_(b)  # batch-norm running statistics: the live ones (already averages)


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle schedule with a 10% warm-up; a constant rate for runs of 10 steps or fewer, which have no room for
    a warm-up (torch's OneCycleLR divides by zero there: `--detector-steps 10` crashed after the GAN had trained)."""
    if steps <= 10:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


def fit_detector(det: nn.Module, cfg: Config, train_normals: np.ndarray, val: ImageSet | None = None,
                 progress: bool = True, on_reading: Callable[[int, nn.Module], None] | None = None,
                 stream: int = 0, lungs: np.ndarray | None = None) -> list[dict]:
    """Train `det` in place (on its device; lesions are drawn on the CPU) and leave in it the weights chosen; returns one history row per reading.

    train_normals: uint8 (N, H, W). `val` with normal and abnormal films picks the reading with the highest
    validation AUC of the seg term (the mean over its shifted versions too under detector_pick "shifted"; see
    `reading_merit`); without, the last reading is kept. `on_reading(step, ema)` sees the averaged weights at each
    reading (analysis: research/detector_readings.py). `stream` k > 0: the k-th member of config detectors, its
    lesions and batches drawn from a stream of its own (0: the one S of every run before). `lungs`: the films' lung
    masks, float (N, H, W) in [0, 1], when the caller computed them (films pooled from several sources, each masked
    against its own population: research/pooled_normals.py); default: `lung_masks` of train_normals."""
    if lungs is None:
        lungs = lung_masks(train_normals, keep=cfg.lung_keep, floor=cfg.lung_floor)
    elif lungs.shape != train_normals.shape:
        raise ValueError(f"lung masks of shape {lungs.shape} for films of shape {train_normals.shape}: one mask per film, same size")
    seed = cfg.seed + SEED_OFFSET + stream * STREAM_STRIDE
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lung_fields = torch.from_numpy(np.ascontiguousarray(lungs, dtype=np.float32)).unsqueeze(1)  # (N, 1, H, W) soft
    films = torch.from_numpy(np.ascontiguousarray(train_normals)).float().div(255).unsqueeze(1)
    lesions = Lesions(gen=gen, p_abnormal=cfg.lesion_p, mix=lesion_mix(cfg.lesion_kinds))
    device = next(det.parameters()).device
    # channels-last: 1.2x faster steps on CPU (its convolutions are mostly 3x3 at 16-256 channels; benchmarks/peers.py)
    det.to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(det)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(det.parameters(), lr=cfg.detector_lr, weight_decay=1e-4)
    sched = one_cycle(opt, cfg.detector_lr, cfg.detector_steps)
    every = max(1, cfg.detector_steps // READINGS)
    can_pick = val is not None and val.n_normal > 0 and val.n_abnormal > 0
    val_films = pick_films(val.images, cfg.detector_pick) if can_pick else {}
    best, best_auc, history = None, -1.0, []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.detector_steps + 1), desc="detector", unit="step", leave=False, disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(films), (min(cfg.detector_batch, len(films)),), generator=gen)
        x, lung = jitter(films[idx], lung_fields[idx], gen, cfg.detector_jitter)
        x_bad, mask, _ = lesions(x, lung)
        x_bad = reacquire(x_bad, gen, cfg.acquisition_p)  # the mask stays: a blurred lesion is still a lesion
        x_bad = relut(x_bad, gen, cfg.lut_p)  # and so does a lesion seen through another display curve
        x_bad, mask = x_bad.to(device).contiguous(memory_format=torch.channels_last), mask.to(device)
        loss = focal_loss(det(normalise_films(x_bad * 2 - 1, cfg.film_norm)), mask) * 10  # x10: the focal loss is small; keeps Adam's steps sane
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detector loss is {float(loss)} at step {step}; lower --detector-lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, det, cfg.detector_ema if step > every else 0.0)
        if step % every == 0 or step == cfg.detector_steps:
            row = {"step": step, "loss": round(float(loss.detach()), 5), "seconds": round(time.perf_counter() - t0, 1)}
            if can_pick:
                aucs = reading_aucs(ema, val.labels, val_films, cfg.film_norm)
                row["val_auc"] = aucs["none"]
                if len(aucs) > 1:
                    row["val_auc_shifted"] = float(np.mean(list(aucs.values())))
                if reading_merit(row) > best_auc:
                    best_auc, best = reading_merit(row), copy.deepcopy(ema.state_dict())
            history.append(row)
            if on_reading is not None:
                on_reading(step, ema)
            log.info("detector %s", ", ".join(f"{k}={v}" for k, v in row.items()))
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    det.load_state_dict(best if best is not None else ema.state_dict())
    det.to(memory_format=torch.contiguous_format).eval()  # saved and exported as plain tensors
    return history


def fit_detectors(det: nn.Module, cfg: Config, train_normals: np.ndarray, val: ImageSet | None = None,
                  progress: bool = True, lungs: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Train each S that `det` holds (config detectors), member k from stream k. Returns the history rows (with a
    `member` column when there are several) and what the run document records: seconds and the kept readings'
    validation AUC (with several S's, that of their average, and each member's). `lungs`: as fit_detector's."""
    members = detector_members(det)
    if lungs is None:  # once for every member
        lungs = lung_masks(train_normals, keep=cfg.lung_keep, floor=cfg.lung_floor)
    history: list[dict] = []
    kept, seconds = [], 0.0
    for k, member in enumerate(members):
        rows = fit_detector(member, cfg, train_normals, val, progress, stream=k, lungs=lungs)
        history += [{"member": k, **r} for r in rows] if len(members) > 1 else rows
        seconds += rows[-1]["seconds"]
        if "val_auc" in rows[0]:
            kept.append(max(rows, key=reading_merit))  # the reading fit_detector kept (the first best)
    summary: dict = {"detector_seconds": round(seconds, 1)}
    if len(kept) == 1:
        summary["detector_val_auc"] = kept[0]["val_auc"]
        if "val_auc_shifted" in kept[0]:
            summary["detector_val_auc_shifted"] = kept[0]["val_auc_shifted"]
    elif kept:
        summary["detector_val_auc_members"] = [r["val_auc"] for r in kept]
        summary["detector_val_auc"] = auc(val.labels, lesion_score(det.eval(), val.images, film_norm=cfg.film_norm))
    return history, summary
