"""Data-parallel training with torch.distributed, launched by torchrun (gloo on CPU, NCCL on CUDA).

Every process holds the whole model and the whole training set; `train.fit` gives each rank a disjoint slice of
the same global batch (`Config.batch_size` stays the global batch: same steps per epoch as one process) and
averages the gradients before every optimiser step, so all ranks keep identical weights. Batch-norm statistics
are computed per rank on its slice (the batch-size effect); running statistics are averaged at the end of every
epoch, so the ranks also end with identical buffers. Only rank 0 writes files.

    torchrun --nproc-per-node 2 -m cxr_oneclass.cli train --data ... --out runs/x          # one machine
    torchrun --nnodes 2 --node-rank R --nproc-per-node G --master-addr HOST --master-port 29500 \\
        -m cxr_oneclass.cli train ...                                                       # several machines
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def is_main() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes (env://); gloo on CPU, NCCL on CUDA. False when not launched
    by torchrun with more than one process (nothing to do)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return is_active()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """cuda -> this process's GPU (LOCAL_RANK) when distributed; anything else unchanged."""
    if device.type == "cuda" and device.index is None and is_active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def local_slice(global_batch: int) -> slice:
    """This rank's rows of a global batch (sizes differ by at most one)."""
    w, r = world_size(), rank()
    base, extra = divmod(global_batch, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Parameters and buffers of rank `src` on every rank (a start from identical weights)."""
    if not is_active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def reduce_gradients(params: list[nn.Parameter], weight: float) -> None:
    """grad <- sum over ranks of weight_r * grad_r, in one flat all-reduce (weight_r = local/global batch makes
    it the gradient of the global batch's mean loss)."""
    if not is_active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.mul_(weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_buffers(module: nn.Module) -> None:
    """Floating-point buffers (batch-norm running statistics) averaged over ranks."""
    if not is_active():
        return
    w = world_size()
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
            b.data.div_(w)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
