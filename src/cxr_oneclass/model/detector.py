"""S: a small segmentation U-Net that predicts where a film departs from normal anatomy (issue 14).

It is trained on normal films with synthetic lesions drawn into their lung fields (`data/synthetic.py`,
`training/detector.py`) to output the lesion mask, so what it learns is "this region does not look like normal
lung", not a reconstruction that copies a lesion through its skips (DRAEM's discriminative half; NSA, AnatPaste).
Score term `seg` pools its predicted mask; the mask is the heat map, so map and score agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions, each with batch norm and ReLU (folded for scoring by networks.fold_batchnorm)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Detector(nn.Module):
    """x (B, 1, H, W) in [-1, 1] -> lesion logits (B, 1, H, W). Widths width·2^i at depth i (i = 0..depth),
    max-pool down, transposed-conv up, skips concatenated; 4 levels reach 4x4 at 64 px."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(1, chans[0])] + [_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in range(depth)])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, down in enumerate(self.down):
            h = down(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(len(self.up))):
            h = self.dec[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return self.head(h)  # (B, 1, H, W)
