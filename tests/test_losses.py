import torch

from cxr_oneclass.model import losses


def test_reconstruction_is_mean_absolute_error():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.5)
    assert losses.reconstruction_loss(x, y).item() == 0.5


def test_adversarial_losses_follow_bce():
    big = torch.full((8,), 20.0)
    assert losses.adversarial_generator_loss(big).item() < 1e-6  # D fooled: no loss for U
    assert losses.adversarial_generator_loss(-big).item() > 10
    assert losses.adversarial_discriminator_loss(big, -big).item() < 1e-6  # D right on both
    assert losses.adversarial_discriminator_loss(-big, big).item() > 10


def test_encoding_loss_is_mse():
    z = torch.zeros(3, 100)
    assert losses.encoding_loss(z, z + 2).item() == 4.0


def test_feature_loss_sums_layers():
    a = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    b = [torch.ones(2, 3, 4, 4), torch.full((2, 5, 2, 2), 2.0)]
    assert losses.feature_loss(a, b).item() == 1.0 + 4.0


def test_total_uses_the_paper_weights():
    terms = {"rec": torch.tensor(1.0), "adv": torch.tensor(1.0), "enc": torch.tensor(1.0), "feat": torch.tensor(1.0)}
    assert losses.total_generator_loss(terms, 20, 4, 8, 1).item() == 33.0
    assert losses.total_generator_loss({"rec": torch.tensor(1.0)}, 20, 4, 8, 1).item() == 20.0


def test_feature_matching_is_mse_of_features():
    a = torch.zeros(2, 8, 4, 4)
    assert losses.feature_matching_loss(a, a + 3).item() == 9.0
