"""The loss terms of Tang et al. (ISBI 2019), eqs. 1-5. Each takes tensors and returns a scalar."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Eq. 1, L_R = ||x - x'||_1 (mean absolute error)."""
    return F.l1_loss(x_rec, x)


def adversarial_generator_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 2, U's side of the min-max: BCE pushing D(x') towards "real"."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def feature_matching_loss(feat_real: torch.Tensor, feat_fake: torch.Tensor) -> torch.Tensor:
    """GANomaly's adversarial loss for the generator: L2 between D's features of x and of x' (not in the paper)."""
    return F.mse_loss(feat_fake, feat_real)


def adversarial_discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 2, D's side: BCE of real CXRs as 1 and reconstructions as 0 (averaged over the two halves)."""
    real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
    fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
    return 0.5 * (real + fake)


def encoding_loss(z: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
    """Eq. 3, L_E = ||U_E(x) - E(x')||_2 (mean squared error)."""
    return F.mse_loss(z_rec, z)


def feature_loss(feats_u: list[torch.Tensor], feats_e: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 4, L_F = sum over encoder layers of the MSE between U's encoder features on x and E's on x'."""
    if len(feats_u) != len(feats_e):
        raise ValueError(f"feature lists differ in length: {len(feats_u)} vs {len(feats_e)}")
    return torch.stack([F.mse_loss(fe, fu) for fu, fe in zip(feats_u, feats_e)]).sum()


def total_generator_loss(terms: dict[str, torch.Tensor], w_rec: float, w_adv: float, w_enc: float, w_feat: float) -> torch.Tensor:
    """Eq. 5, L = λ1 L_R + λ2 L_A + λ3 L_E + L_F over the terms a variant has."""
    weights = {"rec": w_rec, "adv": w_adv, "enc": w_enc, "feat": w_feat}
    return sum(weights[k] * v for k, v in terms.items())  # type: ignore[return-value]
