"""Synthetic lesions on normal films (data/synthetic.py): lung masks, placement, masks that mean what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_oneclass.data import phantom
from cxr_oneclass.data.synthetic import KINDS, MASK_TAU, Lesions, jitter, lung_masks, population_lung_mask, reacquire


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    imgs, _ = phantom.render(24, size=64, seed=3, kind="normal")
    return (imgs * 255).round().astype(np.uint8)


def _batch(films: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(films).float().div(255).unsqueeze(1)
    return x, torch.from_numpy(lung_masks(films)).unsqueeze(1)


def test_lung_masks_find_two_lungs_inside_the_chest(films):
    pop = population_lung_mask(films)
    h, w = pop.shape
    share = pop.mean()
    assert 0.1 < share < 0.5, share
    assert pop[:, : w // 2].sum() > 0.3 * pop.sum() and pop[:, w // 2 :].sum() > 0.3 * pop.sum()  # both sides
    assert pop[:2].sum() == 0 and pop[-2:].sum() == 0 and pop[:, :2].sum() == 0  # not the air around the body
    masks = lung_masks(films)
    assert masks.shape == films.shape and masks.min() >= 0 and masks.max() <= 1
    # Lungs are the dark part of the chest: inside the mask, films are darker than in the rest of the central box.
    inside = films[masks > 0.5].mean()
    box = films[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    assert inside < box.mean()


@pytest.mark.parametrize("kind", KINDS)
def test_each_lesion_changes_the_film_only_where_its_mask_says(films, kind):
    x, lungs = _batch(films)
    gen = torch.Generator().manual_seed(1)
    out, mask, hit = Lesions(mix={kind: 1.0}, gen=gen, p_abnormal=1.0)(x, lungs)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert hit.mean() > 0.8, f"{kind}: most films should get a visible lesion"
    change = (out - x).abs()
    assert change[mask == 0].max() <= MASK_TAU + 1e-6
    assert bool(((change > MASK_TAU) == (mask > 0)).all())
    # Lesions sit in the lung fields (grown by the blur of their edges), not in the neck or below the diaphragm.
    near_lungs = torch.nn.functional.max_pool2d(lungs, 9, 1, 4) > 0.05
    assert (mask * near_lungs).sum() / mask.sum().clamp_min(1) > 0.9, kind


def test_opacities_brighten_and_pneumothorax_darkens(films):
    x, lungs = _batch(films)
    out, mask, _ = Lesions(mix={"opacity": 1.0}, gen=torch.Generator().manual_seed(2), p_abnormal=1.0)(x, lungs)
    assert ((out - x) * mask).sum() > 0
    out, mask, _ = Lesions(mix={"pneumothorax": 1.0}, gen=torch.Generator().manual_seed(2), p_abnormal=1.0)(x, lungs)
    assert ((out - x) * mask).sum() < 0


def test_lesions_repeat_with_the_seed_and_respect_p_abnormal(films):
    x, lungs = _batch(films)
    a = Lesions(gen=torch.Generator().manual_seed(5))(x, lungs)
    b = Lesions(gen=torch.Generator().manual_seed(5))(x, lungs)
    c = Lesions(gen=torch.Generator().manual_seed(6))(x, lungs)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    out, mask, hit = Lesions(gen=torch.Generator().manual_seed(5), p_abnormal=1e-9)(x, lungs)
    assert torch.equal(out, x) and mask.sum() == 0 and hit.sum() == 0


def test_jitter_moves_film_and_lungs_together(films):
    x, lungs = _batch(films)
    gen = torch.Generator().manual_seed(0)
    xj, lj = jitter(x, lungs, gen)
    assert xj.shape == x.shape and lj.shape == lungs.shape and not torch.equal(xj, x)
    # After the move the lungs are still the darker part of each film.
    assert (xj * (lj > 0.5)).sum() / (lj > 0.5).sum() < xj.mean()


def test_jitter_strength_scales_the_moves_and_stretches_the_aspect_above_one(films):
    """Config detector_jitter: 0 leaves the geometry, 1 is the default's draws, 2 moves further and stretches."""
    x, lungs = _batch(films)
    a = jitter(x, lungs, torch.Generator().manual_seed(3))
    b = jitter(x, lungs, torch.Generator().manual_seed(3), 1.0)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    _, still = jitter(x, lungs, torch.Generator().manual_seed(3), 0.0)
    assert (still - lungs).abs().max() < 1e-4  # photometric changes only

    # A round disc keeps its aspect ratio under shift, zoom and rotation; only the stretch changes it.
    n, side = 64, 64
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 14**2).float().expand(n, 1, side, side).contiguous()

    def aspect_spread(strength: float) -> float:
        _, moved = jitter(disc, disc, torch.Generator().manual_seed(1), strength)
        m = moved[:, 0] > 0.5
        width, height = m.any(1).sum(1).float(), m.any(2).sum(1).float()
        return float((width / height).log().abs().max())

    assert aspect_spread(1.0) < 0.05 < aspect_spread(2.0)


def test_lung_keep_and_floor_choose_where_lesions_land(films):
    """Config lung_keep (the share of each lung region that counts as lung) and lung_floor (the mask's minimum)."""
    dark, whole = lung_masks(films), lung_masks(films, keep=1.0)
    assert whole.mean() > dark.mean()
    # keep=1 also takes the brighter (opaque) part of the lung region that the default leaves out.
    assert films[whole > 0.5].mean() > films[dark > 0.5].mean()
    floored = lung_masks(films, keep=1.0, floor=0.25)
    assert floored.min() == pytest.approx(0.25) and dark.min() < 0.01
    assert np.array_equal(np.maximum(whole, np.float32(0.25)), floored)

    def outside_share(masks: np.ndarray) -> float:  # share of nodule pixels away from the default lungs
        x, lungs = torch.from_numpy(films).float().div(255).unsqueeze(1), torch.from_numpy(masks).unsqueeze(1)
        _, mask, _ = Lesions(mix={"nodule": 1.0}, gen=torch.Generator().manual_seed(4), p_abnormal=1.0)(x, lungs)
        near = torch.nn.functional.max_pool2d(torch.from_numpy(dark).unsqueeze(1), 9, 1, 4) > 0.05
        return float((mask * ~near).sum() / mask.sum())

    assert outside_share(dark) < 0.1 < outside_share(lung_masks(films, floor=0.25))


def _sharpness(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per film: falls with blur, rises with noise or sharpening."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)


def test_reacquire_images_films_again_and_only_when_asked(films):
    """Config acquisition_p: a share of S's training films imaged again (blur, sharpening, resolution, noise)."""
    x, _ = _batch(films)
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    assert reacquire(x, gen, 0.0) is x and torch.equal(gen.get_state(), before)  # p 0: a seeded run draws as before
    y = reacquire(x, gen, 1.0)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    changed = (y - x).abs().flatten(1).amax(1) > 1e-3
    assert bool(changed.all())  # p 1: every film
    # Each film's grey levels stay where they were on average (a new chain, not a new exposure)...
    assert float((y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs().max()) < 0.02
    # ...but its texture changes both ways across the batch: some films smoother, others sharper or noisier.
    ratio = _sharpness(y) / _sharpness(x)
    assert float(ratio.min()) < 0.9 and float(ratio.max()) > 1.1
    assert torch.equal(reacquire(x, torch.Generator().manual_seed(5), 1.0), y)  # seeded: repeatable
    share = (reacquire(x, torch.Generator().manual_seed(6), 0.5) != x).flatten(1).any(1).float().mean()
    assert 0.2 < float(share) < 0.8


def test_acquisition_shifts_are_deterministic_films_of_the_same_shape():
    """data/acquisition: every simulated shift maps uint8 films to uint8 films of the same shape, the same way each
    time, and changes them (but "none"); the held-out family shares no name with the family that may steer S."""
    from cxr_oneclass.data.acquisition import HELDOUT_SHIFTS, SHIFTS

    films = (phantom.render(3, size=48, seed=2)[0] * 255).astype(np.uint8)
    assert not set(SHIFTS) & set(HELDOUT_SHIFTS) and len(HELDOUT_SHIFTS) == 7
    for name, fn in [*SHIFTS.items(), *HELDOUT_SHIFTS.items()]:
        out = fn(films)
        assert out.shape == films.shape and out.dtype == np.uint8, name
        assert np.array_equal(out, fn(films)), name
        assert np.array_equal(out, films) == (name == "none"), name
    marked = HELDOUT_SHIFTS["marker"](films)  # a small bright mark near the top-left corner, nothing else
    changed = np.argwhere((marked != films).any(0))
    assert len(changed) and changed.max(0).tolist() < [24, 24] and marked.max() >= 240
    cut = HELDOUT_SHIFTS["collimate"](films)  # white blades at both sides, the centre untouched
    assert cut[:, :, :2].min() > 200 and cut[:, :, -2:].min() > 200
    assert np.abs(cut[:, :, 20:28].astype(int) - films[:, :, 20:28]).max() <= 1


def test_relut_is_a_monotone_display_curve_and_only_when_asked():
    """Config lut_p: a share of S's films through a random monotone display curve (data/synthetic.relut): grey order
    kept (a lesion stays where it was), the range kept, another curve per film, nothing drawn at p 0."""
    from cxr_oneclass.data.synthetic import relut

    ramp = torch.linspace(0, 1, 64 * 64).view(1, 1, 64, 64).repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(relut(ramp, gen, 0.0), ramp) and torch.equal(gen.get_state(), state)
    out = relut(ramp, gen, 1.0)
    flat = out.flatten(1)
    assert (flat[:, 1:] >= flat[:, :-1] - 1e-6).all() and out.min() >= 0 and out.max() <= 1 + 1e-6
    assert ((out - ramp).abs().flatten(1).amax(1) > 0.01).all() and not torch.equal(out[0], out[1])
    again = relut(ramp, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(out, again)
