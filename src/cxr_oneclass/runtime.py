"""Device, precision, seeding and batch conversion shared by training and scoring."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 at full precision on CUDA while inside: no TF32 in cuDNN convolutions or in matmuls (a no-op on CPU).
    Scoring needs it: fdist and sdist are Mahalanobis distances, which magnify small feature errors, and with
    cuDNN's default TF32 a model scored on a GPU disagreed with the same checkpoint scored on a CPU by 0.1% on
    every score (up to 100% on toy images), so statistics and thresholds fitted on one would not carry to the
    other. Training keeps TF32: it is faster there and its rounding is noise next to SGD's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def environment() -> dict[str, str | int]:
    """What a run's numbers depend on beyond its seed and config: on the CPU a seed repeats bit for bit only under
    the same library versions and kernels (one NIH seed gave validation AUC 0.80 on one machine and install, 0.76 on
    another; docs/RESULTS.md, issue 14, session 16)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, str | int] = {"python": platform.python_version(), "platform": platform.platform(),
                                 "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
                                 "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for pkg in ("torch", "numpy", "pillow", "scipy", "scikit-learn"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            env[pkg] = "absent"
    return env


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for the training loop's own randomness."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked (CPU or CUDA); fp32 otherwise."""
    if precision == "bf16":
        warn_if_bf16_is_emulated(device)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 convolutions and matmuls run on hardware support: AVX512-BF16 or AMX on CPU (through
    oneDNN), bf16 tensor cores on CUDA. Elsewhere PyTorch emulates bf16 and it is far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_warned_bf16: set[str] = set()


def warn_if_bf16_is_emulated(device: torch.device) -> None:
    if device.type not in _warned_bf16 and not bf16_native(device):
        _warned_bf16.add(device.type)
        log.warning("bf16 asked for, but this %s has no native bf16 (AVX512-BF16/AMX): it runs emulated, many times "
                    "slower than fp32; use --precision fp32 here", "CPU" if device.type == "cpu" else "GPU")


def to_model_range(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float32 (B, 1, H, W) in [-1, 1], the range of the decoder's tanh."""
    return batch_u8.unsqueeze(1).float().div_(127.5).sub_(1.0)
