"""Issue 14, session 17: left-right asymmetry of the lungs as a score term, with no network. Validation only; the test
split is never loaded.

Session 15 found that what an in-painter (and the lungs' fine texture, or their mean grey) reads runs one way on NIH's
adults and the other way on the pediatric set: a property of the populations' films, not of disease. A healthy chest
is close to mirror-symmetric in the lung fields, and most of what the sets' abnormal films carry (pneumonia,
consolidation, effusion, pneumothorax, a mass) sits on one side; a film of either population, sharp or soft, bright or
dark, should be more asymmetric when one lung is opaque. Asymmetry is measured against the normals' own (the heart,
the aortic knob and the diaphragm's sides are asymmetric in every film):

1. each film is standardised (its own mean and std), then mirrored about the vertical axis that fits it best
   (a shift of up to +-MAX_SHIFT px at 64 px, chosen on the blurred film: patients stand off-centre);
2. d = film - mirrored film (signed); the training normals give each pixel's mean and std of d (std floored at its
   10th percentile); z = (d - mean) / std, blurred (sigma SIGMA px);
3. candidates, inside the film's lung mask made symmetric (the mask or its mirror; the `detect` preset's masks):
   - `asym_lung`: mean |z|;
   - `asym_top`:  mean of the largest TOP_SHARE of |z| inside the lungs;
   - controls: `asym_raw`, mean |blurred d| in the lungs with no normal model; `atlas_lung`, mean |z| of the
     standardised film itself against the normals' per-pixel mean and std (where a film differs from normal films,
     with no mirror); `asym_pop`, `asym_lung` inside the population lung mask (the training normals' average
     lungs, made symmetric) for every film: the form a term takes inside the exported graph, which computes no
     per-film mask. If `asym_lung` passes, the term is built as `asym_pop` when its cross-fitted gains are within
     0.005 of `asym_lung`'s on both sets, otherwise with per-film masks.

With `--run RUN` (a trained `detect` run on the same set) every candidate joins the run's `auto` terms as
explore_classifier.py joins one (standardised on validation normals; `with_`, and the cross-fitted gain `xfit_`), plus
the paired bootstrap interval of the shipped score with it against without (`ci_`, each arm's choice fixed), the
AUC within each view, and with `--shifts` the shipped score with and without each candidate under the simulated and
held-out acquisition shifts (`shifts`, mean AUC per family).

The rule, written before any number of it existed (session 17). Pursue a candidate (build it as a term, `auto`
choosing it on validation, 3 seeds on both sets) iff all of:
  (a) its cross-fitted gain, mean over NIH seeds 0-2, is at least +0.02;
  (b) its cross-fitted gain on pediatric seed 0 is not below -0.005;
  (c) alone it ranks abnormal films above normal ones on both sets (AUC > 0.5 on NIH's seed-0 and the pediatric
      validation split): the same direction, unlike session 15's texture;
  (d) on NIH (mean of seeds 0-2) the shipped score with it loses no more than 0.005 under the held-out shifts against
      the shipped score without it.
`asym_lung` is the candidate; `asym_top` the one alternative; the two controls are read to say what the mirror and the
normal model add, and are not candidates.

Follow-up rule, written after NIH seed 0's reading and before any other (session 17). On NIH seed 0 `asym_lung` failed
(alone 0.576, cross-fitted -0.005) while the control `atlas_lung` gained +0.017 (alone 0.643). That reading is
exploration and does not count. `atlas_lung` becomes a candidate by the same (a)-(d), with (a) read on NIH seeds 1-2
only (their run terms not yet joined with it; its own film scores are the same for every seed of a set, so this is
weaker than a fresh sample) and (c) on pediatric seed 0; nothing about it (blur, mask, normal model) is changed.
`atlas_pop`, the same inside the population lung mask, is read beside it and decides the term's form as `asym_pop`
would have.

    python research/explore_asym.py --data csv:../shared/data/nih-pneumonia-128/manifest.csv \
        --run runs/x14a17/nih-det16-s0 --shifts --out runs/x14a17/asym-nih-s0.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from detector_count import paired_bootstrap  # research/: run as `python research/explore_asym.py`
from explore_classifier import crossfit_gain, run_terms, standardise, write
from explore_inpaint import by_view
from final_test import finding_films

from cxr_oneclass.config import resolve
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.synthetic import _blur, lung_masks, population_lung_mask
from cxr_oneclass.metrics import auc
from cxr_oneclass.scoring.selection import best_candidate, candidate_sums
from cxr_oneclass.scoring.stats import robust_center_scale

MAX_SHIFT = 6  # px at 64 px
SIGMA = 2.0  # px at 64 px
TOP_SHARE = 0.05
CANDIDATES = ("asym_lung", "asym_top")
CONTROLS = ("asym_raw", "atlas_lung", "asym_pop", "atlas_pop")


def films(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> (N, 1, H, W) float, each film standardised by its own mean and std."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    mu, sd = x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mu) / sd


def mirrored(x: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Each film mirrored about its best vertical axis: the mirror x[:, W-1-c+s] for the shift s in +-max_shift that
    is closest to the (blurred) film over the columns it covers; uncovered columns keep the film (d = 0 there)."""
    n, _, _, w = x.shape
    xf, xb = x.flip(-1), _blur(x, SIGMA)
    xbf = xb.flip(-1)
    cols = torch.arange(w)
    costs, cands = [], []
    for s in range(-max_shift, max_shift + 1):
        valid = ((cols - s >= 0) & (cols - s < w)).float().view(1, 1, 1, w)  # (1, 1, 1, W)
        costs.append(((xb - torch.roll(xbf, s, -1)).abs() * valid).sum((1, 2, 3)) / (valid.sum() * x.shape[2]))
        cands.append(torch.roll(xf, s, -1) * valid + x * (1 - valid))
    best = torch.stack(costs, 1).argmin(1)  # (N,)
    return torch.stack(cands, 1)[torch.arange(n), best]


def symmetric(masks: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(masks).float().unsqueeze(1)
    return torch.maximum(m, m.flip(-1))


def masked_mean(maps: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    return ((maps * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-6)).numpy()


def masked_top(maps: torch.Tensor, m: torch.Tensor, share: float = TOP_SHARE) -> np.ndarray:
    """Mean of the largest `share` of each map's pixels inside its (binarised at 0.5) mask."""
    out = []
    for v, mm in zip(maps.flatten(1), m.flatten(1)):
        inside = v[mm > 0.5] if (mm > 0.5).sum() > 10 else v
        out.append(inside.topk(max(1, int(inside.numel() * share))).values.mean())
    return torch.stack(out).numpy()


class Model:
    """The training normals' per-pixel mean and std of the mirror difference and of the standardised film."""

    def __init__(self, train_images: np.ndarray) -> None:
        self.pop = symmetric(population_lung_mask(train_images)[None].astype(np.float32))  # (1, 1, H, W)
        x = films(train_images)
        d = x - mirrored(x)
        self.d_mu, self.d_sd = d.mean(0), self._floor(d.std(0))
        self.x_mu, self.x_sd = x.mean(0), self._floor(x.std(0))

    @staticmethod
    def _floor(sd: torch.Tensor) -> torch.Tensor:
        return sd.clamp_min(float(torch.quantile(sd.flatten(), 0.1)))

    def read(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        x, m = films(images), symmetric(masks)
        d = x - mirrored(x)
        z = _blur((d - self.d_mu) / self.d_sd, SIGMA).abs()
        za = _blur((x - self.x_mu) / self.x_sd, SIGMA).abs()
        pop = self.pop.expand_as(z)
        return {"asym_lung": masked_mean(z, m), "asym_top": masked_top(z, m),
                "asym_raw": masked_mean(_blur(d, SIGMA).abs(), m), "atlas_lung": masked_mean(za, m),
                "asym_pop": masked_mean(z, pop), "atlas_pop": masked_mean(za, pop)}


def shipped_with(y: np.ndarray, z: dict[str, np.ndarray], name: str, s: np.ndarray) -> tuple[str, float, np.ndarray]:
    """`auto` choosing again with candidate `s` as one more term (explore_classifier.with_candidate), and the chosen
    sum's scores too."""
    sums = candidate_sums({**z, name: standardise(y, s)})
    table = {k: auc(y, v) for k, v in sums.items()}
    best = best_candidate(table)
    return best, table[best], sums[best]


def shift_read(model: Model, run: str, lung_val: np.ndarray, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The run's shipped score with and without each candidate, `auto` choosing on the validation films as they are,
    read under every simulated and held-out acquisition shift (mean AUC per family), as explore_inpaint.py does."""
    from detector_pair import read_arm, shifted_components
    from shift_robustness import run_and_val

    net, _, val = run_and_val(run)
    y = val.labels
    center, scale, shifted, comps = shifted_components(net, val.images)
    for version, f in shifted.items():
        comps[version].update(model.read(f, lung_val))
    out = {"base": read_arm(y, comps, center, scale)[1]}  # read_arm ignores terms outside center
    for k in names:
        c, sc = robust_center_scale(comps["none"][k][y == 0])
        out[k] = read_arm(y, comps, {**center, k: c}, {**scale, k: sc})[1]
    return {arm: {fam: round(v, 4) for fam, v in fams.items()} for arm, fams in out.items()}


def by_finding(y: np.ndarray, scores: dict[str, np.ndarray], meta: dict[str, list[str]], least: int = 8) -> dict[str, dict]:
    """Each score's AUC of the normals against the abnormal films carrying each finding (NIH's manifest labels), for
    findings on at least `least` validation films."""
    normals = np.flatnonzero(y == 0)
    out = {}
    for f, idx in sorted(finding_films(y, meta, least).items()):
        sel = np.r_[normals, idx]
        out[f] = {"n": len(idx), **{k: round(auc(y[sel], v[sel]), 4) for k, v in scores.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--run", default="", help="a trained detect run on the same set: candidates joined with its terms")
    ap.add_argument("--shifts", action="store_true", help="with --run: the shipped score under acquisition shifts")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="")
    ap.add_argument("--findings", action="store_true", help="with --run: only the AUC per NIH finding, no cross-fitting")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    ds = load_dataset(a.data, a.size, splits=("train", "val"))
    train, val = ds["train"], ds["val"]
    y = val.labels
    cfg = resolve("detect")
    lung_val = lung_masks(val.images, population_lung_mask(train.images), keep=cfg.lung_keep)
    model = Model(train.images)
    scores = model.read(val.images, lung_val)
    row: dict = {"step": 0, **{k: round(auc(y, v), 4) for k, v in scores.items()}}
    if a.run:
        yr, z, chosen = run_terms(a.run)
        assert np.array_equal(yr, y), "the run's validation split is not this one"
        shipped = sum(z[k] for k in chosen.split("+"))
        if a.findings:  # exploration after the rules' readings: which findings each term reads
            extra = {f"shipped+{k}": shipped_with(y, z, k, scores[k])[2] for k in ("atlas_lung", "asym_lung")}
            row["by_finding"] = by_finding(y, {**scores, "shipped": shipped, **extra}, val.meta)
            print(json.dumps(row["by_finding"]), flush=True)
            return write(a, [row])
        row.update(shipped=[chosen, round(auc(y, shipped), 4)], **{k: round(auc(y, v), 4) for k, v in z.items()})
        for k, v in scores.items():
            c, value, with_scores = shipped_with(y, z, k, v)
            row[f"with_{k}"] = [c, round(value, 4)]
            row[f"xfit_{k}"] = round(crossfit_gain(y, z, k, v), 4)
            lo, hi = paired_bootstrap(y, shipped, with_scores, a.bootstrap)
            row[f"ci_{k}"] = [round(lo, 4), round(hi, 4)]
        row["by_view"] = by_view(y, {**scores, "shipped": shipped}, val.meta)
        if a.shifts:
            row["shifts"] = shift_read(model, a.run, lung_val, CANDIDATES + CONTROLS)
    row["sec"] = round(time.time() - t0, 1)
    row["scores"] = {k: [round(float(x), 6) for x in v] for k, v in scores.items()}
    print(json.dumps({k: v for k, v in row.items() if k != "scores"}), flush=True)
    write(a, [row])


if __name__ == "__main__":
    main()
