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


class DetectorEnsemble(nn.Module):
    """K detectors S, each trained from its own random stream (config detectors); x (B, 1, H, W) -> the logits of
    their averaged lesion probabilities (B, 1, H, W), so the seg term and its map are the members' means. One S
    swings from seed to seed on NIH (validation 0.71-0.80); the mean of two holds steadier (docs/RESULTS.md)."""

    EPS = 1e-6  # keeps the logit finite where every member is certain

    def __init__(self, width: int = 16, k: int = 2) -> None:
        super().__init__()
        self.members = nn.ModuleList([Detector(width) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0).clamp(self.EPS, 1 - self.EPS)
        return (torch.log(p) - torch.log(1 - p)).to(x.dtype)  # log1p has no ONNX op; at p >= 1e-6 this is as exact


def detector_members(det: nn.Module) -> list[nn.Module]:
    """The detectors S that `det` averages (itself when it is one)."""
    return list(det.members) if isinstance(det, DetectorEnsemble) else [det]
