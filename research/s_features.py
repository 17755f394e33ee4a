"""Issue 14, session 13: does the lesion detector S know more than its mean lesion probability says? Validation
only; the test split is never loaded.

S is trained to find synthetic lesions, so its encoder has learnt what departs from normal anatomy. The seg term
reads only its output map. Here S's encoder maps (after each of its 5 down blocks: 16-256 channels at 64-4 px) on the
training normals are modelled by Gaussians (Ledoit-Wolf, as fdist and sdist are), and a film's distance from them
becomes a candidate term. Each member of a run's S is modelled apart and the distances are averaged. The variants,
fixed before any number existed:

- `pool_all`:    every level averaged over space and concatenated (496 values), one Gaussian (session 6 measured a
                 one-S version of this on an early S: NIH 0.663, pediatric 0.944);
- `pool_deep`:   the two deepest levels only (8x8 and 4x4 px maps, 384 values);
- `padim3_mean`: PaDiM: one Gaussian per cell of the 8x8 level (128 channels); the mean of the 64 cells' distances;
- `padim3_max`:  the same, the largest cell's distance (a focal departure);
- `padim2_mean`: the 16x16 level (64 channels) average-pooled to 8x8, one Gaussian per cell, the mean.

Each variant is added as a fifth candidate of `auto` (31 sums instead of 15), standardised on validation normals as
`train` standardises a term (median, IQR/1.349), and `auto` chooses again on validation. The shipped score of each
arm is read on validation as it is, under the 11 simulated shifts and under the 7 held-out shifts (the chosen sum and
standardisation kept, as shift_robustness.py does), and cross-fitted: `auto` choosing on one stratified half of
validation, read on the other, 100 halvings both ways.

The rule, written before the numbers existed. Let v be the variant with the largest mean (over the two sets' 3-seed
means) gain of the shipped score on validation as it is. Adopt v as a new term iff
  (a) that mean gain is at least 0.005 and neither set falls by more than 0.005;
  (b) the cross-fitted `auto` with v gains on the mean over both sets and falls on neither by more than 0.005
      (the gain is not the wider choice's optimism: 31 candidates flatter more than 15);
  (c) neither set's mean over the 11 shifts nor over the 7 held-out shifts falls by more than 0.005.
Otherwise the default stays as it is.

    python research/s_features.py --set nih runs/x14d12/nih-det16-s{0,1,2} \
        --set kermany runs/x14p12/kermany-gan50-s{0,1,2}-f25k100a50-pick-pair --json runs/x14f13/sfeat.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detector_pair import FAMILIES, MAX_LOSS, read_arm, shifted_components  # research/: run as `python research/s_features.py`
from selection_crossfit import random_half, standardise
from shift_robustness import run_and_val

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc
from cxr_oneclass.model.detector import detector_members
from cxr_oneclass.runs import DataProvenance
from cxr_oneclass.runtime import to_model_range
from cxr_oneclass.scoring.gaussian import fit_gaussian
from cxr_oneclass.scoring.selection import best_candidate, candidate_sums
from cxr_oneclass.scoring.stats import robust_center_scale

VARIANTS = ("pool_all", "pool_deep", "padim3_mean", "padim3_max", "padim2_mean")
REPEATS = 100


@torch.no_grad()
def encoder_maps(det: torch.nn.Module, images: np.ndarray, batch: int = 128) -> list[np.ndarray]:
    """S's maps after each down block, as S computes them in eval mode: 5 arrays (N, C_i, H/2^i, W/2^i)."""
    det.eval()
    out: list[list[np.ndarray]] = []
    for s in range(0, len(images), batch):
        h = to_model_range(torch.from_numpy(np.ascontiguousarray(images[s : s + batch])))
        maps = []
        for i, down in enumerate(det.down):
            h = down(h if i == 0 else F.max_pool2d(h, 2))
            maps.append(h.double().numpy())
        out.append(maps)
    return [np.concatenate([b[i] for b in out]) for i in range(len(out[0]))]


def variant_features(maps: list[np.ndarray], variant: str) -> np.ndarray:
    """(N, F) for a pooled variant; (N, cells, C) for a per-cell one."""
    if variant == "pool_all":
        return np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1)
    if variant == "pool_deep":
        return np.concatenate([m.mean(axis=(2, 3)) for m in maps[3:]], axis=1)
    level = maps[3] if variant.startswith("padim3") else maps[2]
    if level.shape[-1] > 8:  # the 16x16 level pooled to 8x8 cells
        n, c, h, w = level.shape
        level = level.reshape(n, c, 8, h // 8, 8, w // 8).mean(axis=(3, 5))
    return level.reshape(level.shape[0], level.shape[1], -1).transpose(0, 2, 1)  # (N, cells, C)


def fit_variant(train: np.ndarray, variant: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The training normals' Gaussian(s) of a variant: one (mean, whitening) pair, or one per cell."""
    if train.ndim == 2:
        return [tuple(np.asarray(t) for t in fit_gaussian(train, variant))]
    return [tuple(np.asarray(t) for t in fit_gaussian(train[:, c], variant)) for c in range(train.shape[1])]


def distance(fitted: list[tuple[np.ndarray, np.ndarray]], films: np.ndarray, variant: str) -> np.ndarray:
    """Squared Mahalanobis distance / dimension of each film from the fitted Gaussian(s); per-cell variants pool the
    cells' distances by their mean (or max)."""
    if films.ndim == 2:
        loc, whiten = fitted[0]
        return (((films - loc) @ whiten) ** 2).mean(axis=1)
    cells = np.stack([(((films[:, c] - loc) @ whiten) ** 2).mean(axis=1) for c, (loc, whiten) in enumerate(fitted)], axis=1)
    return cells.max(axis=1) if variant.endswith("max") else cells.mean(axis=1)


def new_terms(model, train_images: np.ndarray, films: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per film version, per variant: the candidate term (members' distances averaged)."""
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in films}
    members = detector_members(model.det)
    for member in members:
        tr_maps = encoder_maps(member, train_images)
        fitted = {v: fit_variant(variant_features(tr_maps, v), v) for v in VARIANTS}
        for name, f in films.items():
            maps = encoder_maps(member, f)
            for v in VARIANTS:
                out[name][v] = out[name].get(v, 0) + distance(fitted[v], variant_features(maps, v), v) / len(members)
    return out


def crossfit_auto(comps: dict[str, np.ndarray], y: np.ndarray, seed: int = 0) -> float:
    """`auto` chosen on one stratified half of validation and read on the other, both ways, REPEATS halvings."""
    rng = np.random.default_rng(seed)
    got = []
    for _ in range(REPEATS):
        fit = random_half(y, rng)
        for f, r in ((fit, ~fit), (~fit, fit)):
            cands = candidate_sums(standardise(comps, f & (y == 0)))
            pick = best_candidate({k: auc(y[f], v[f]) for k, v in cands.items()})
            got.append(auc(y[r], cands[pick][r]))
    return float(np.mean(got))


def evaluate(runs: list[str]) -> dict:
    """Per arm ("base" and each variant): per family, per seed, the shipped sum's mean AUC; alone; cross-fitted."""
    out: dict = {}
    for run in runs:
        model, doc, val = run_and_val(run)
        prov = DataProvenance.from_doc(doc, run)
        train = load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("train",))["train"]
        y = val.labels
        center, scale, films, comps = shifted_components(model, val.images)
        comps = {n: {k: c[k] for k in center} for n, c in comps.items()}  # the auto terms only: crossfit sums them all
        extra = new_terms(model, train.images, films)
        for arm in ("base", *VARIANTS):
            cen, sca = dict(center), dict(scale)
            view = {n: dict(comps[n]) for n in films}
            if arm != "base":
                cen[arm], sca[arm] = robust_center_scale(extra["none"][arm][y == 0])
                for n in films:
                    view[n][arm] = extra[n][arm]
            chosen, by_family, _ = read_arm(y, view, cen, sca)
            rec = out.setdefault(arm, {})
            for fam, v in by_family.items():
                rec.setdefault(fam, []).append(v)
            rec.setdefault("chosen", []).append(chosen)
            rec.setdefault("alone", []).append(auc(y, view["none"][arm]) if arm != "base" else auc(y, view["none"]["seg"]))
            rec.setdefault("crossfit", []).append(crossfit_auto(view["none"], y))
        print(Path(run).name, {a: {k: (v[-1] if isinstance(v[-1], str) else round(v[-1], 4)) for k, v in d.items()} for a, d in out.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", nargs="+", action="append", metavar="NAME RUN", required=True, help="a set's name and its runs")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    results = {name: evaluate(runs) for name, *runs in a.set}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    gains = {}
    for v in VARIANTS:
        rows = {}
        for name, r in results.items():
            rows[name] = {fam: float(np.mean(np.array(r[v][fam]) - np.array(r["base"][fam]))) for fam in (*FAMILIES, "crossfit")}
            print(f"{name} {v:12s} alone {np.mean(r[v]['alone']):.4f}  shipped {np.mean(r['base']['none']):.4f} -> "
                  f"{np.mean(r[v]['none']):.4f}  " + "  ".join(f"Δ{k} {x:+.4f}" for k, x in rows[name].items()))
        gains[v] = rows
    best = max(VARIANTS, key=lambda v: np.mean([g["none"] for g in gains[v].values()]))
    g = gains[best]
    a_ok = np.mean([x["none"] for x in g.values()]) >= MAX_LOSS and min(x["none"] for x in g.values()) >= -MAX_LOSS
    b_ok = np.mean([x["crossfit"] for x in g.values()]) > 0 and min(x["crossfit"] for x in g.values()) >= -MAX_LOSS
    c_ok = all(x[f] >= -MAX_LOSS for x in g.values() for f in ("shifts", "heldout"))
    print(f"best variant {best}: (a) {a_ok} (b) {b_ok} (c) {c_ok}; decision:", f"adopt {best}" if a_ok and b_ok and c_ok else "keep today's default")


if __name__ == "__main__":
    main()
