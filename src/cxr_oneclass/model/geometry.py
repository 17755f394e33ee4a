"""Layer arithmetic shared by the config (validation), the networks and the score terms (their statistics' shapes).

A leaf module: it imports nothing from the package, so each of those can use it without an import cycle.
"""

from __future__ import annotations


def n_down_layers(image_size: int) -> int:
    """Stride-2 layers that take `image_size` down to 4x4 (4 at 64 px; the 5th layer maps 4x4 to the latent)."""
    return max(0, image_size.bit_length() - 3)


def encoder_channels(image_size: int, width: int) -> list[int]:
    """Channels of the stride-2 layers, doubling from `width` and capped at 8x width (so 128 px stays affordable)."""
    return [width * min(2**i, 8) for i in range(n_down_layers(image_size))]
