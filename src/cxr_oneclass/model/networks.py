"""The three networks of Tang et al. (ISBI 2019), §2.2 and §3.1: U (U-Net-like autoencoder), D (discriminator),
E (second encoder). Plain `nn.Module`s, no I/O.

Shapes at the paper's 64 px with width 64 and latent 100:
    encoder: (B,1,64,64) -> 64@32 -> 128@16 -> 256@8 -> 512@4 -> (B,100,1,1)   (5 layers, 4x4 kernels)
    decoder: (B,100,1,1) -> 512@4 -> 256@8 -> 128@16 -> 64@32 -> (B,1,64,64)   (5 layers, skips concatenated)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from ..config import Config
from .detector import Detector, DetectorEnsemble
from .geometry import encoder_channels

LEAK = 0.2  # DCGAN's leaky ReLU slope


class Encoder(nn.Module):
    """Paper §3.1: 5-layer CNN at 64 px, 4x4 kernels, stride 2, BN + leaky ReLU after every layer but the first.

    The first layer gets a leaky ReLU without BN (as in DCGAN: BN on raw pixels hurts); the last layer maps the 4x4
    map to `out_dim` values with a 4x4 kernel and no activation (the latent vector, or D's logit).
    """

    def __init__(self, image_size: int, width: int, out_dim: int) -> None:
        super().__init__()
        chans = encoder_channels(image_size, width)
        layers: list[nn.Module] = []
        c_in = 1
        for i, c_out in enumerate(chans):
            block: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=(i == 0))]
            if i > 0:
                block.append(nn.BatchNorm2d(c_out))
            block.append(nn.LeakyReLU(LEAK, inplace=True))
            layers.append(nn.Sequential(*block))
            c_in = c_out
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(c_in, out_dim, 4, 1, 0)  # (B, C, 4, 4) -> (B, out_dim, 1, 1)
        self.channels = chans

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B,1,H,W) -> (out (B,out_dim), feature maps of every stride-2 layer, shallow to deep)."""
        feats = []
        h = x
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        return self.head(h).flatten(1), feats


class Decoder(nn.Module):
    """Mirror of the encoder with transposed 4x4 convolutions; the `skips` deepest levels concatenate the encoder's
    feature map of the same resolution (U-Net). Output through tanh, in the input's [-1, 1] range."""

    def __init__(self, image_size: int, width: int, latent_dim: int, skips: int) -> None:
        super().__init__()
        chans = encoder_channels(image_size, width)
        n = len(chans)
        self.skip_levels = set(range(n - skips, n))  # encoder levels whose features are concatenated
        self.stem = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, chans[-1], 4, 1, 0, bias=False),  # (B,latent,1,1) -> (B,C,4,4)
            nn.BatchNorm2d(chans[-1]),
            nn.LeakyReLU(LEAK, inplace=True),
        )
        ups: list[nn.Module] = []
        for level in range(n - 1, -1, -1):
            c_in = chans[level] * (2 if level in self.skip_levels else 1)
            if level == 0:
                ups.append(nn.Sequential(nn.ConvTranspose2d(c_in, 1, 4, 2, 1), nn.Tanh()))
            else:
                ups.append(
                    nn.Sequential(
                        nn.ConvTranspose2d(c_in, chans[level - 1], 4, 2, 1, bias=False),
                        nn.BatchNorm2d(chans[level - 1]),
                        nn.LeakyReLU(LEAK, inplace=True),
                    )
                )
        self.ups = nn.ModuleList(ups)
        self.levels = list(range(n - 1, -1, -1))

    def forward(self, z: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        h = self.stem(z[:, :, None, None])
        for level, up in zip(self.levels, self.ups):
            if level in self.skip_levels:
                h = torch.cat([h, feats[level]], dim=1)
            h = up(h)
        return h


class UNetAutoencoder(nn.Module):
    """U: x -> (x', z, encoder features)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.image_size, cfg.width, cfg.latent_dim)
        self.decoder = Decoder(cfg.image_size, cfg.width, cfg.latent_dim, cfg.n_skips)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        z, feats = self.encoder(x)  # z: (B, latent)
        return self.decoder(z, feats), z, feats


class Discriminator(nn.Module):
    """D: same shape as U's encoder, one real/fake logit per image. Also returns its features."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = Encoder(cfg.image_size, cfg.width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logit, feats = self.net(x)
        return logit.squeeze(1), feats


class OneClassGAN(nn.Module):
    """The three networks of a variant: U always; E for u+e and full; D for u+d and full.

    `stats` holds the score's statistics fitted after training (`scoring.stats.ScoreStats`, saved with the
    weights); a freshly trained model has none until the score is fitted.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.U = UNetAutoencoder(cfg)
        self.E = Encoder(cfg.image_size, cfg.width, cfg.latent_dim) if cfg.uses_e else None
        self.D = Discriminator(cfg) if cfg.uses_d else None
        self.stats: nn.Module | None = None
        init_weights(self, cfg.init_std)
        # S after the others and after their initialisation: a model without S draws exactly what it always did.
        # S keeps PyTorch's default (Kaiming) initialisation: it is a plain segmentation network, not a GAN.
        # One S keeps its state-dict keys as they always were (det.*); several: det.members.<k>.*
        self.det = None if not cfg.uses_s else (
            Detector(cfg.detector_width) if cfg.detectors == 1 else DetectorEnsemble(cfg.detector_width, cfg.detectors))

    def generator_parameters(self) -> list[nn.Parameter]:
        """U and E: updated together in the G-step."""
        params = list(self.U.parameters())
        if self.E is not None:
            params += list(self.E.parameters())
        return params


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights and N(1, 0.02) BN scales, as DCGAN.

    The paper says "initialized with standard normal distribution"; a literal N(0, 1) makes 4x4x512 convolutions
    produce activations ~10^3 times too large and the GAN diverges in the first steps, so we read it as the
    DCGAN normal initialisation that GAN code of the time (and GANomaly) used.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def build_model(cfg: Config) -> OneClassGAN:
    return OneClassGAN(cfg)


# ----------------------------------------------------------------------------------------- inference copy

def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    """A copy of `seq` with each (conv or transposed conv, batch norm) pair fused into one convolution by torch's
    `fuse_conv_bn_eval` (eval-mode statistics)."""
    mods = list(seq)
    out: list[nn.Module] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(nxt, nn.BatchNorm2d):
            # ConvTranspose2d weights are (in, out, kh, kw): `transpose` scales their second axis.
            out.append(fuse_conv_bn_eval(m.eval(), nxt.eval(), transpose=isinstance(m, nn.ConvTranspose2d)))
            i += 2
        else:
            out.append(copy.deepcopy(m))
            i += 1
    return nn.Sequential(*out)


def fold_batchnorm(model: OneClassGAN) -> OneClassGAN:
    """An eval-only copy of `model` with every batch norm folded into the convolution before it.

    Same function as the model in eval mode (batch norm on running statistics) up to float rounding, one
    memory pass less per layer. For scoring and export only: the copy has no batch norm left to train.
    """
    folded = copy.deepcopy(model).eval()
    for mod in list(folded.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Sequential) and any(isinstance(c, nn.BatchNorm2d) for c in child):
                setattr(mod, name, _fold_sequential(child))
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()
