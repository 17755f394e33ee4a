"""Training loop (paper §2.2): alternate a G-step (U and E on eq. 5) and a D-step (eq. 2) on every batch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data.normalise import normalise_films
from ..data.synthetic import reacquire
from ..errors import CxrError, DataError
from ..model import losses
from ..model.networks import OneClassGAN
from ..runtime import autocast, pick_device, seed_everything, to_model_range
from ..scoring.stats import build_scoring_model
from . import distributed

log = logging.getLogger(__name__)

EpochCallback = Callable[[OneClassGAN, dict], None]
ACQ_SEED_OFFSET = 6151  # the GAN's re-imaging stream (config gan_acquisition_p), apart from its other draws
LOSS_KEYS = ("rec", "adv", "enc", "feat", "g_total", "d")


@dataclass
class TrainResult:
    model: OneClassGAN
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """Everything that continues a training exactly where it stopped: after `epoch` epochs, the model's weights
    and buffers, both optimisers' states and the training generator(s), as tensors; the rest as JSON (`info`)."""

    epoch: int
    history: list[dict]
    tensors: dict[str, torch.Tensor]
    info: dict


class TrainingDiverged(CxrError):
    """The losses became non-finite or exploded; the last good checkpoint is kept."""


# An epoch has diverged when a mean loss term exceeds CEILING (with images in [-1, 1] and the paper's weights a
# sane run's terms stay below 100; with --lr 1e6 they reach 1e29 in the first epoch), or when the generator's
# total exceeds the first epoch's by EXPLOSION (a healthy run's loss falls).
CEILING = 1e6
EXPLOSION = 1e4


def generator_step_terms(model: OneClassGAN, x: torch.Tensor, x_in: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The loss terms a variant has, on a batch: x clean (B,1,H,W), x_in what U sees (noisy in training)."""
    x_rec, z, feats_u = model.U(x_in)
    terms = {"rec": losses.reconstruction_loss(x, x_rec)}
    if model.E is not None:
        z_rec, feats_e = model.E(x_rec)
        terms["enc"] = losses.encoding_loss(z, z_rec)
        terms["feat"] = losses.feature_loss(feats_u, feats_e)
    if model.D is not None:
        logit_fake, feats_fake = model.D(x_rec)
        if model.cfg.adv_loss == "feature":  # GANomaly: match D's deepest features of x' to those of x
            _, feats_real = model.D(x)
            terms["adv"] = losses.feature_matching_loss(feats_real[-1], feats_fake[-1])
        else:
            terms["adv"] = losses.adversarial_generator_loss(logit_fake)
    return terms, x_rec


@dataclass
class Tuning:
    """Speed switches of the training step, all on by default; `benchmarks/speed.py --ablate` times each off.

    channels_last: NHWC activations and weights (oneDNN's native conv layout on CPU, tensor-core layout on CUDA).
    fused_adam: one fused kernel per optimiser step instead of ~10 passes over 14 M parameters.
    freeze_d_in_g: D's weights need no gradient in the G-step (opt_g does not update them and the D-step
        zeroes them first), so the G-step skips D's weight gradients; results are unchanged.
    """

    channels_last: bool = True
    fused_adam: bool = True
    freeze_d_in_g: bool = True


def _adam(params: list[torch.nn.Parameter], cfg: Config, fused: bool) -> torch.optim.Adam:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if fused:
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.Adam(params, **kw)


def _requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Trainer:
    """The model, its optimisers and one training step (G-step then D-step) on a global batch.

    Under torch.distributed (see `distributed`) each rank runs its slice of the global batch and the gradients
    are averaged before each optimiser step, so every rank holds the same weights.
    """

    def __init__(self, cfg: Config, device: torch.device | None = None, tuning: Tuning | None = None) -> None:
        self.cfg = cfg
        self.tuning = tuning or Tuning()
        self.device = distributed.local_device(device if device is not None else pick_device(cfg.device))
        self.gen = seed_everything(cfg.seed)
        # The input noise is drawn where the model runs: drawn on the host and copied, it was 12% of a GPU step.
        # On CPU this is the same generator (and so the same draws) as before.
        self.noise_gen = self.gen if self.device.type == "cpu" else torch.Generator(device=self.device).manual_seed(cfg.seed)
        # Re-imaging of the GAN's films (config gan_acquisition_p) draws from its own stream: p = 0 draws nothing and
        # leaves every other draw as it was.
        self.acq_gen = torch.Generator().manual_seed(cfg.seed + ACQ_SEED_OFFSET)
        self.memory_format = torch.channels_last if self.tuning.channels_last else torch.contiguous_format
        # With unfitted score statistics, so that it can be scored while it trains (fitted after training).
        self.model = build_scoring_model(cfg).to(self.device, memory_format=self.memory_format)
        distributed.broadcast_module(self.model)
        fused = self.tuning.fused_adam
        self.opt_g = _adam(self.model.generator_parameters(), cfg, fused)
        self.opt_d = _adam(list(self.model.D.parameters()), cfg, fused) if self.model.D is not None else None
        self.data_seconds = 0.0  # time spent making batches (uint8 -> float, noise, transfer)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def checkpoint(self, epoch: int, history: list[dict]) -> Checkpoint:
        """The training state after `epoch` epochs (tensors copied to the CPU)."""
        # Copies (clone): on a CPU .cpu() returns the live tensor itself, which training would go on changing.
        tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        info: dict = {"optimisers": {}}
        for name, opt in self._optimisers().items():
            sd = opt.state_dict()
            info["optimisers"][name] = {"param_groups": sd["param_groups"],
                                        "state": {str(i): sorted(st) for i, st in sd["state"].items()}}
            for i, st in sd["state"].items():
                for key, value in st.items():
                    tensors[f"{name}/{i}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
        tensors["rng/gen"] = self.gen.get_state()
        if self.noise_gen is not self.gen:
            tensors["rng/noise_gen"] = self.noise_gen.get_state().cpu()
        if self.cfg.gan_acquisition_p > 0:
            tensors["rng/acq_gen"] = self.acq_gen.get_state()
        return Checkpoint(epoch, [dict(r) for r in history], tensors, info)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt`: weights, buffers, optimiser states and generators as they were."""
        model_state = {k[len("model/"):]: v for k, v in ckpt.tensors.items() if k.startswith("model/")}
        self.model.load_state_dict(model_state)
        for name, opt in self._optimisers().items():
            saved = ckpt.info["optimisers"][name]
            state = {int(i): {key: ckpt.tensors[f"{name}/{i}/{key}"] for key in keys} for i, keys in saved["state"].items()}
            opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
            # Moment buffers in their parameter's memory layout (channels-last), as the optimiser made them: the
            # fused step over another layout rounds differently, and the resumed run would drift.
            for group in opt.param_groups:
                for param in group["params"]:
                    for key, value in opt.state.get(param, {}).items():
                        if torch.is_tensor(value) and value.shape == param.shape:
                            opt.state[param][key] = torch.empty_like(param).copy_(value)
        self.gen.set_state(ckpt.tensors["rng/gen"])
        if self.noise_gen is not self.gen:
            self.noise_gen.set_state(ckpt.tensors["rng/noise_gen"].to(self.noise_gen.device))
        if "rng/acq_gen" in ckpt.tensors:
            self.acq_gen.set_state(ckpt.tensors["rng/acq_gen"])

    def _optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_g": self.opt_g, **({"opt_d": self.opt_d} if self.opt_d is not None else {})}

    def batch(self, images_u8: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's clean and noisy model inputs for the global batch `index` into uint8 (N,H,W) images, and
        its share of the batch. The noise is drawn for the whole global batch, so one process and several draw
        the same noise for the same image."""
        t0 = time.perf_counter()
        cfg = self.cfg
        part = distributed.local_slice(len(index))
        if cfg.gan_acquisition_p > 0:
            # The whole global batch is re-imaged (on every rank, the same draws) and this rank keeps its slice.
            films = images_u8[index].to(self.device).unsqueeze(1).float().div_(255)  # (B, 1, H, W) in [0, 1]
            x = reacquire(films, self.acq_gen, cfg.gan_acquisition_p)[part].mul_(2).sub_(1)
        else:
            x = to_model_range(images_u8[index[part]].to(self.device, non_blocking=True))
        x = normalise_films(x, cfg.film_norm).contiguous(memory_format=self.memory_format)
        if cfg.noise_std > 0:
            noise = torch.randn((len(index), 1, *images_u8.shape[1:]), generator=self.noise_gen, device=self.noise_gen.device)[part]
            x_in = x + cfg.noise_std * noise
        else:
            x_in = x
        self.data_seconds += time.perf_counter() - t0
        return x, x_in, (part.stop - part.start) / len(index)

    def step(self, x: torch.Tensor, x_in: torch.Tensor, share: float = 1.0) -> dict[str, torch.Tensor]:
        """One G-step and one D-step; returns the detached loss terms (tensors, no host sync)."""
        cfg, model, device = self.cfg, self.model, self.device
        freeze = self.tuning.freeze_d_in_g and model.D is not None
        # ---- G-step: U (and E) on eq. 5
        if freeze:
            _requires_grad(model.D, False)
        with autocast(device, cfg.precision):
            terms, x_rec = generator_step_terms(model, x, x_in)
            g_loss = losses.total_generator_loss(terms, cfg.w_rec, cfg.w_adv, cfg.w_enc, cfg.w_feat)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        if freeze:
            _requires_grad(model.D, True)
        distributed.reduce_gradients(model.generator_parameters(), share)
        self.opt_g.step()
        out = {k: v.detach() for k, v in terms.items()}
        out["g_total"] = g_loss.detach()
        # ---- D-step: real CXRs vs. the reconstructions just made (detached: D's step leaves U alone)
        if self.opt_d is not None:
            with autocast(device, cfg.precision):
                logit_real, _ = model.D(x)
                logit_fake, _ = model.D(x_rec.detach())
                d_loss = losses.adversarial_discriminator_loss(logit_real, logit_fake)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            distributed.reduce_gradients(list(model.D.parameters()), share)
            self.opt_d.step()
            out["d"] = d_loss.detach()
        return out


def fit(
    cfg: Config,
    train_images: np.ndarray,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    tuning: Tuning | None = None,
    start: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
) -> TrainResult:
    """Train a model of `cfg` on uint8 normal images (N, H, W); returns the model (in eval mode) and its history.

    `on_epoch_end(model, row)` may add columns to the epoch's history row (e.g. a validation AUC); the model is in
    eval mode during the call and back in train mode after it. `on_checkpoint` gets the training state after every
    epoch; `start` continues from one, and the result is bit-identical on a CPU to a run never interrupted. An epoch
    whose losses are not finite, or exploded, raises TrainingDiverged before anything is done with the model.
    Under torch.distributed every rank calls `fit` with the same images and config, and all of them return the
    same model.
    """
    n = len(train_images)
    if n == 0:
        raise DataError("no normal training images: the train split is empty")
    if train_images.shape[1:] != (cfg.image_size, cfg.image_size):
        raise DataError(f"training images are {train_images.shape[1:]}, config expects {cfg.image_size} px")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    trainer = Trainer(cfg, tuning=tuning)
    model, device, gen = trainer.model, trainer.device, trainer.gen
    data = torch.from_numpy(np.ascontiguousarray(train_images))
    if device.type == "cuda" and data.numel() < 2**31:
        data = data.to(device)  # uint8 on the GPU: batches are made there, no per-step host transfer
    bs = min(cfg.batch_size, n)
    if bs < distributed.world_size():
        raise DataError(f"batch size {bs} is smaller than the {distributed.world_size()} processes")
    # Drop the ragged last batch: a batch of 1 breaks batch norm, and small ones make its statistics noisy.
    per_epoch = max(1, n // bs)
    total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch
    n_epochs = -(-total_steps // per_epoch)  # a step budget ends with a partial pass when it does not divide
    result = TrainResult(model)
    first = 1
    if start is not None:
        trainer.restore(start)
        result.history = [dict(r) for r in start.history]
        first = start.epoch + 1
    t_start = time.perf_counter()
    model.train()
    keys: list[str] = []
    for epoch in range(first, n_epochs + 1):
        n_batches = min(per_epoch, total_steps - (epoch - 1) * per_epoch)
        t0 = time.perf_counter()
        trainer.data_seconds = 0.0
        order = torch.randperm(n, generator=gen)
        if data.device != order.device:
            order = order.to(data.device)
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{n_epochs}", unit="batch", leave=False, disable=not progress)
        for b in bar:
            x, x_in, share = trainer.batch(data, order[b * bs : (b + 1) * bs])
            terms = trainer.step(x, x_in, share)
            for k, v in terms.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
            if progress and b % 5 == 0:
                bar.set_postfix(rec=f"{terms['rec'].item():.3f}")
        keys = [k for k in LOSS_KEYS if k in sums]
        totals = (distributed.all_reduce_sum(torch.stack([sums[k] for k in keys])) / distributed.world_size()).cpu()
        distributed.average_buffers(model)  # per-rank batch-norm running statistics -> one set
        seconds = time.perf_counter() - t0
        row: dict = {"epoch": epoch}
        row.update({f"loss_{k}": float(v) / n_batches for k, v in zip(keys, totals)})
        row["seconds"] = round(seconds, 3)
        row["images_per_s"] = round(n_batches * bs / seconds, 2)
        row["data_share"] = round(trainer.data_seconds / seconds, 4)  # batch making, as a fraction of the epoch
        _check_divergence(row, result.history, epoch)
        if on_epoch_end is not None:
            model.eval()
            on_epoch_end(model, row)
            model.train()
        result.history.append(row)
        if on_checkpoint is not None:
            on_checkpoint(trainer.checkpoint(epoch, result.history))
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"))
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    result.seconds = time.perf_counter() - t_start
    return result


def _check_divergence(row: dict, history: list[dict], epoch: int) -> None:
    losses = {k: v for k, v in row.items() if k.startswith("loss_")}
    bad = [k for k, v in losses.items() if not math.isfinite(v) or abs(v) > CEILING]
    g, g0 = row.get("loss_g_total"), history[0].get("loss_g_total") if history else None
    exploded = g is not None and g0 is not None and math.isfinite(g) and abs(g) > EXPLOSION * max(abs(g0), 1e-8)
    if bad or exploded:
        what = f"{bad[0]} = {losses[bad[0]]:.3g}" if bad else f"loss_g_total = {g:.3g}, {EXPLOSION:.0e} x epoch 1's {g0:.3g}"
        kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no epoch finished"
        raise TrainingDiverged(f"training diverged in epoch {epoch} ({what}); {kept}. Lower --lr (now the preset's or "
                               "yours) or check the data; nothing was saved as a run")
