"""Exact, inference-only rewrites of trained networks into graphs that run or quantise better.

`subpixel_upsampling` replaces every stride-2 transposed convolution by an ordinary convolution that computes the
four output phases as channels, followed by a pixel shuffle (depth-to-space). The function is the same up to float
rounding; the weights are only rearranged. Why: onnxruntime quantises `Conv` to int8 but runs `ConvTranspose` in
float, and on CPU the decoder's transposed convolutions were 58% of the int8 graph's time.

For a transposed conv with kernel 4, stride 2, padding 1, output row 2m+a reads input rows {m-1, m} (a = 0, kernel
rows 3 and 1) or {m, m+1} (a = 1, kernel rows 2 and 0): a 3x3 convolution over rows m-1..m+1 with one zero row per
phase covers both. Kernel 2, stride 2, padding 0 is a 1x1 convolution per phase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# For kernel 4 / stride 2 / padding 1: which transposed-conv kernel row feeds 3x3 kernel row k (input row m+k-1)
# of output phase a; None: that input row does not reach this phase.
_TAP_K4 = ((3, 1, None), (None, 2, 0))


class SubpixelUp(nn.Module):
    """conv (B, Cin, H, W) -> (B, 4·Cout, H, W), then pixel shuffle -> (B, Cout, 2H, 2W)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


def subpixel_of(ct: nn.ConvTranspose2d) -> nn.Module:
    """The sub-pixel equivalent of `ct`, or `ct` itself when its geometry is not one handled here."""
    plain = ct.groups == 1 and ct.dilation == (1, 1) and ct.output_padding == (0, 0) and ct.stride == (2, 2)
    k, pad = ct.kernel_size, ct.padding
    if not plain or k[0] != k[1] or (k, pad) not in (((4, 4), (1, 1)), ((2, 2), (0, 0))):
        return ct
    w = ct.weight.detach()  # (Cin, Cout, k, k)
    cin, cout = w.shape[:2]
    size = 3 if k[0] == 4 else 1
    new = torch.zeros(cout * 4, cin, size, size, dtype=w.dtype, device=w.device)
    for a in range(2):
        for b in range(2):
            phase = new[a * 2 + b :: 4]  # pixel_shuffle puts channel c·4 + a·2 + b at (c, 2m+a, 2n+b)
            if size == 1:
                phase[:, :, 0, 0] = w[:, :, a, b].t()
                continue
            for ky, sy in enumerate(_TAP_K4[a]):
                for kx, sx in enumerate(_TAP_K4[b]):
                    if sy is not None and sx is not None:
                        phase[:, :, ky, kx] = w[:, :, sy, sx].t()
    conv = nn.Conv2d(cin, cout * 4, size, padding=size // 2, bias=ct.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        conv.weight.copy_(new)
        if ct.bias is not None:
            conv.bias.copy_(ct.bias.detach().repeat_interleave(4))
    return SubpixelUp(conv).train(ct.training)


def subpixel_upsampling(module: nn.Module) -> nn.Module:
    """Replace, in place, every stride-2 transposed convolution under `module` that `subpixel_of` handles.
    Returns `module`. Apply to an inference copy (e.g. `fold_batchnorm`'s): the trained model keeps its layers."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ConvTranspose2d):
                setattr(parent, name, subpixel_of(child))
    return module
