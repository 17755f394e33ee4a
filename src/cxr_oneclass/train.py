"""Training loop (paper §2.2): alternate a G-step (U and E on eq. 5) and a D-step (eq. 2) on every batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import losses
from .config import Config
from .errors import DataError
from .nets import OneClassGAN, build_model
from .runtime import autocast, pick_device, seed_everything, to_model_range

log = logging.getLogger(__name__)

EpochCallback = Callable[[OneClassGAN, dict], None]
LOSS_KEYS = ("rec", "adv", "enc", "feat", "g_total", "d")


@dataclass
class TrainResult:
    model: OneClassGAN
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def generator_step_terms(model: OneClassGAN, x: torch.Tensor, x_in: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The loss terms a variant has, on a batch: x clean (B,1,H,W), x_in what U sees (noisy in training)."""
    x_rec, z, feats_u = model.U(x_in)
    terms = {"rec": losses.reconstruction_loss(x, x_rec)}
    if model.E is not None:
        z_rec, feats_e = model.E(x_rec)
        terms["enc"] = losses.encoding_loss(z, z_rec)
        terms["feat"] = losses.feature_loss(feats_u, feats_e)
    if model.D is not None:
        logit_fake, _ = model.D(x_rec)
        terms["adv"] = losses.adversarial_generator_loss(logit_fake)
    return terms, x_rec


def fit(
    cfg: Config,
    train_images: np.ndarray,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model of `cfg` on uint8 normal images (N, H, W); returns the model (in eval mode) and its history.

    `on_epoch_end(model, row)` may add columns to the epoch's history row (e.g. a validation AUC); the model is in
    eval mode during the call and back in train mode after it.
    """
    n = len(train_images)
    if n == 0:
        raise DataError("no normal training images: the train split is empty")
    if train_images.shape[1:] != (cfg.image_size, cfg.image_size):
        raise DataError(f"training images are {train_images.shape[1:]}, config expects {cfg.image_size} px")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    gen = seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = (
        torch.optim.Adam(model.D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)) if model.D is not None else None
    )
    data = torch.from_numpy(np.ascontiguousarray(train_images))
    bs = min(cfg.batch_size, n)
    # Drop the ragged last batch: a batch of 1 breaks batch norm, and small ones make its statistics noisy.
    n_batches = max(1, n // bs)
    result = TrainResult(model)
    t_start = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        sums = {k: 0.0 for k in LOSS_KEYS}
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not progress)
        for b in bar:
            x = to_model_range(data[order[b * bs : (b + 1) * bs]]).to(device, non_blocking=True)
            noise = torch.randn(x.shape, generator=gen).to(device) if cfg.noise_std > 0 else None
            x_in = x + cfg.noise_std * noise if noise is not None else x
            # ---- G-step: U (and E) on eq. 5
            with autocast(device, cfg.precision):
                terms, x_rec = generator_step_terms(model, x, x_in)
                g_loss = losses.total_generator_loss(terms, cfg.w_rec, cfg.w_adv, cfg.w_enc, cfg.w_feat)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            # ---- D-step: real CXRs vs. the reconstructions just made (detached: D's step leaves U alone)
            if opt_d is not None:
                with autocast(device, cfg.precision):
                    logit_real, _ = model.D(x)
                    logit_fake, _ = model.D(x_rec.detach())
                    d_loss = losses.adversarial_discriminator_loss(logit_real, logit_fake)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                sums["d"] += d_loss.item()
            for k, v in terms.items():
                sums[k] += v.item()
            sums["g_total"] += g_loss.item()
            if progress and b % 5 == 0:
                bar.set_postfix(rec=f"{terms['rec'].item():.3f}")
        seconds = time.perf_counter() - t0
        row: dict = {"epoch": epoch}
        present = [k for k in LOSS_KEYS if k in terms or k == "g_total" or (k == "d" and opt_d is not None)]
        row.update({f"loss_{k}": sums[k] / n_batches for k in present})
        row["seconds"] = round(seconds, 3)
        row["images_per_s"] = round(n_batches * bs / seconds, 2)
        if on_epoch_end is not None:
            model.eval()
            on_epoch_end(model, row)
            model.train()
        result.history.append(row)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
    model.eval()
    result.seconds = time.perf_counter() - t_start
    return result
