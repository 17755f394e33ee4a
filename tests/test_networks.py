import pytest
import torch

from cxr_oneclass.config import ConfigError, resolve
from cxr_oneclass.model.networks import Discriminator, Encoder, build_model


def test_paper_encoder_has_five_layers_and_latent_100():
    cfg = resolve("paper")
    enc = Encoder(cfg.image_size, cfg.width, cfg.latent_dim)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.stride for c in convs[:4]] == [(2, 2)] * 4
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3  # BN after every stride-2 layer but the first; the latent layer is linear
    z, feats = enc(torch.randn(2, 1, 64, 64))
    assert z.shape == (2, 100)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]


def test_autoencoder_output_shape_range_and_skips():
    cfg = resolve("paper")
    model = build_model(cfg).eval()
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    x_rec, z, _ = model.U(x)
    assert x_rec.shape == x.shape and z.shape == (3, 100)
    assert x_rec.min() >= -1 and x_rec.max() <= 1  # tanh: the input's range
    deconvs = [m for m in model.U.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(deconvs) == 5
    # with 4 skips the decoder's inputs are concatenations: twice the encoder's channels
    assert [d.in_channels for d in deconvs] == [100, 1024, 512, 256, 128]


def test_fewer_skips_shrink_decoder_inputs():
    model = build_model(resolve("paper", skips=2))
    deconvs = [m for m in model.U.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.in_channels for d in deconvs] == [100, 1024, 512, 128, 64]


def test_discriminator_gives_one_logit():
    cfg = resolve("paper")
    logit, feats = Discriminator(cfg)(torch.randn(4, 1, 64, 64))
    assert logit.shape == (4,)
    assert len(feats) == 4


@pytest.mark.parametrize("variant,has_e,has_d", [("u", False, False), ("u+e", True, False), ("u+d", False, True), ("full", True, True)])
def test_variants_lack_their_missing_modules(variant, has_e, has_d):
    model = build_model(resolve("paper", variant=variant, width=8))
    assert (model.E is not None) == has_e
    assert (model.D is not None) == has_d
    names = {k.split(".")[0] for k in model.state_dict()}
    assert ("E" in names) == has_e and ("D" in names) == has_d


def test_other_image_sizes_map_to_same_latent():
    for size in (32, 128):
        model = build_model(resolve("paper", image_size=size, width=8)).eval()
        x_rec, z, _ = model.U(torch.randn(2, 1, size, size))
        assert x_rec.shape == (2, 1, size, size) and z.shape == (2, 100)


def test_bad_config_values_are_refused():
    with pytest.raises(ConfigError, match="power of two"):
        resolve("paper", image_size=60)
    with pytest.raises(ConfigError, match="variant"):
        resolve("paper", variant="u+x")
    with pytest.raises(ConfigError, match="preset"):
        resolve("nope")


def test_init_is_dcgan_normal():
    model = build_model(resolve("paper"))
    w = model.U.encoder.layers[1][0].weight
    assert abs(w.std().item() - 0.02) < 0.002
