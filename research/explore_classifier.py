"""Issue 14, session 15: a film-level classifier trained from scratch to tell normal training films from the same films
with synthetic lesions (CutPaste / AnatPaste's self-supervised recipe, with this project's lesion models), scored by
its logit and by a Gaussian of its pooled features fitted on the training normals (GDE). Validation only; the test
split is never loaded.

S (the lesion detector) is a segmentation U-Net: its seg term is the mean of a pixel map. AnatPaste reaches 0.921 on
the pediatric test set with an image-level network of this kind, so this asks whether an image-level view of the same
synthetic lesions knows something S's map does not. The films are drawn as `train` draws S's (the `detect` preset's
lung masks, jitter, lesions, imaging chain again, display curve); a film's label is whether its lesions changed it
visibly. Every `--eval-every` steps the averaged weights (EMA) are read on validation:

- `logit`: the classifier's output;
- `gde`:   Ledoit-Wolf Mahalanobis distance of the pooled last-stage features from the training normals';
- `gde2`:  the same on the last two stages' pooled features, concatenated;
- `knn`:   mean distance to the 5 nearest training normals of the unit-length last-stage features.

With `--run RUN` (a trained `detect` run on the same set), each candidate is also added to the run's `auto` terms as
a fifth one, standardised on validation normals as `train` standardises a term, and `auto` chooses again:
`shipped` is the run's own choice, `with_<c>` the choice with candidate c available, and `xfit_<c>` the honest gain
of making c available: `auto` chooses with and without c on one stratified half of validation and both choices are
read on the other half (100 halvings, both ways; more candidates flatter the half they are chosen on).

The rule, written before any number of it existed (session 15). The last reading of each candidate counts (no pick
of a reading). Pursue a candidate c (build it as a term and run 3 seeds on both sets) iff on NIH seed 0 its
cross-fitted gain is at least +0.02 (session 14: smaller gains are inside one seed's film noise) and on pediatric
seed 0 its cross-fitted gain is not below -0.005. Otherwise the direction is recorded as not pursued.

    python research/explore_classifier.py --data csv:../shared/data/nih-pneumonia-128/manifest.csv \
        --run runs/x14c15/nih-det16-s0 --out runs/x14c15/cls-nih-s0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from cxr_oneclass.config import resolve
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.synthetic import Lesions, jitter, lesion_mix, lung_masks, reacquire, relut
from cxr_oneclass.metrics import auc
from cxr_oneclass.scoring.selection import best_candidate, candidate_sums
from cxr_oneclass.scoring.stats import robust_center_scale

XFIT_REPEATS = 100


def block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Stem at full size, then four stride-2 stages (64 -> 4 px at 64 px input); pooled features -> one logit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 16 * width]
        self.stages = nn.ModuleList([block(1, w[0], 1)] + [block(w[i], w[i + 1], 2) for i in range(4)])
        self.head = nn.Sequential(nn.Linear(w[4], w[4]), nn.ReLU(inplace=True), nn.Linear(w[4], 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = []
        for s in self.stages:
            x = s(x)
            pooled.append(x.mean((2, 3)))  # (B, C)
        return self.head(pooled[-1])[:, 0], pooled


@torch.no_grad()
def features(net: Classifier, images: np.ndarray, bs: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, last-stage and last-two-stages pooled features of uint8 (N, H, W) films, batch norm in eval mode."""
    net.eval()
    out = [], [], []
    for s in range(0, len(images), bs):
        x = torch.from_numpy(images[s : s + bs]).float().div(255).unsqueeze(1) * 2 - 1
        logit, pooled = net(x)
        out[0].append(logit)
        out[1].append(pooled[-1])
        out[2].append(torch.cat(pooled[-2:], 1))
    return tuple(torch.cat(o).numpy() for o in out)


def read(net: Classifier, train_images: np.ndarray, val_images: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate's validation scores (higher = more abnormal)."""
    _, f1_tr, f2_tr = features(net, train_images)
    logit, f1, f2 = features(net, val_images)
    unit = lambda f: torch.nn.functional.normalize(torch.from_numpy(f), dim=1)  # noqa: E731
    knn = torch.cdist(unit(f1), unit(f1_tr)).topk(5, 1, largest=False).values.mean(1).numpy()
    return {"logit": logit, "gde": LedoitWolf().fit(f1_tr).mahalanobis(f1), "gde2": LedoitWolf().fit(f2_tr).mahalanobis(f2),
            "knn": knn}


def run_terms(run: str) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """A trained run's validation labels, its standardised auto terms and its own chosen sum."""
    from shift_robustness import run_and_val  # research/: run as `python research/explore_classifier.py`

    from cxr_oneclass.scoring.inference import model_components, score_images
    from cxr_oneclass.scoring.terms import AUTO_TERMS, TERM_INDEX

    model, _, val = run_and_val(run)
    comps = score_images(model, val.images, model.cfg.batch_size)
    terms = [k for k in AUTO_TERMS if k in model_components(model)]
    z = {k: (comps[k] - float(model.stats.center[TERM_INDEX[k]])) / float(model.stats.scale[TERM_INDEX[k]]) for k in terms}
    chosen = best_candidate({k: auc(val.labels, v) for k, v in candidate_sums(z).items()})
    return val.labels, z, chosen


def standardise(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A candidate in the units `train` gives a term: (s - median) / (IQR/1.349) of the validation normals."""
    c, sc = robust_center_scale(s[y == 0])
    return (s - c) / sc


def with_candidate(y: np.ndarray, z: dict[str, np.ndarray], name: str, s: np.ndarray) -> tuple[str, float]:
    """`auto` choosing again with candidate `s` as one more term, standardised on the validation normals."""
    sums = candidate_sums({**z, name: standardise(y, s)})
    table = {k: auc(y, v) for k, v in sums.items()}
    best = best_candidate(table)
    return best, table[best]


def crossfit_delta(y: np.ndarray, sums_a: dict[str, np.ndarray], sums_b: dict[str, np.ndarray], seed: int = 0) -> float:
    """Mean over halvings of arm b's read AUC minus arm a's, each arm's sum chosen by `auto` on one half and read
    on the other (both ways). sums_*: candidate sum name -> (N,) scores on the same films."""
    from selection_crossfit import random_half

    rng, gains = np.random.default_rng(seed), []
    for _ in range(XFIT_REPEATS):
        half = random_half(y, rng)
        for fit, held in ((half, ~half), (~half, half)):
            pick = [best_candidate({k: auc(y[fit], v[fit]) for k, v in sums.items()}) for sums in (sums_a, sums_b)]
            gains.append(auc(y[held], sums_b[pick[1]][held]) - auc(y[held], sums_a[pick[0]][held]))
    return float(np.mean(gains))


def crossfit_gain(y: np.ndarray, z: dict[str, np.ndarray], name: str, s: np.ndarray, seed: int = 0) -> float:
    """Mean over halvings of (auto with c) - (auto without c), each chosen on one half and read on the other."""
    return crossfit_delta(y, candidate_sums(z), candidate_sums({**z, name: standardise(y, s)}), seed)


def common_args(ap: argparse.ArgumentParser, batch: int) -> None:
    """The flags explore_classifier.py and explore_inpaint.py share."""
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=batch)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--run", default="", help="a trained detect run on the same set: candidates joined with its terms")
    ap.add_argument("--out", default="")


def start(a: argparse.Namespace):
    """Seeded; the `detect` config, the train and validation splits, their labels and the run's terms (or None)."""
    torch.manual_seed(a.seed)
    ds = load_dataset(a.data, a.size, splits=("train", "val"))
    train, val = ds["train"], ds["val"]
    y = val.labels
    joined = run_terms(a.run) if a.run else None
    if joined is not None:
        assert np.array_equal(joined[0], y), "the run's validation split is not this one"
        base = auc(y, sum(joined[1][k] for k in joined[2].split("+")))
        print(json.dumps({"run": a.run, "shipped": joined[2], "shipped_auc": round(base, 4),
                          **{k: round(auc(y, v), 4) for k, v in joined[1].items()}}), flush=True)
    return resolve("detect"), train, val, y, joined


def optimise(loss: torch.Tensor, opt, sched, ema: nn.Module, net: nn.Module, decay: float) -> None:
    """One step of `net` on `loss`, then its weights' moving average `ema` (decay 0: a copy)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        for pe, pl in zip(ema.state_dict().values(), net.state_dict().values()):
            pe.copy_(pe * decay + pl * (1 - decay) if pe.is_floating_point() else pl)


def join(row: dict, scores: dict[str, np.ndarray], y: np.ndarray, joined, last: bool) -> None:
    """Each candidate's `with_` (auto choosing with it) into `row`, and at the last reading its `xfit_`."""
    if joined is None:
        return
    for k, v in scores.items():
        chosen, value = with_candidate(y, joined[1], k, v)
        row[f"with_{k}"] = [chosen, round(value, 4)]
        if last:
            row[f"xfit_{k}"] = round(crossfit_gain(y, joined[1], k, v), 4)


def write(a: argparse.Namespace, hist: list[dict]) -> None:
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "history": hist}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap, batch=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg, train, val, y, joined = start(a)
    gen = torch.Generator().manual_seed(a.seed)
    lungs = torch.from_numpy(lung_masks(train.images, keep=cfg.lung_keep, floor=cfg.lung_floor)).unsqueeze(1)
    films = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    lesions = Lesions(gen=gen, p_abnormal=0.5, mix=lesion_mix(cfg.lesion_kinds))
    net = Classifier(a.width)
    ema = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    t0, hist = time.time(), []
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(films), (a.bs,), generator=gen)
        x, lung = jitter(films[idx], lungs[idx], gen, cfg.detector_jitter)
        x_bad, _, label = lesions(x, lung)
        x_bad = relut(reacquire(x_bad, gen, cfg.acquisition_p), gen, cfg.lut_p)
        logit, _ = net(x_bad * 2 - 1)
        loss = F.binary_cross_entropy_with_logits(logit, label)
        optimise(loss, opt, sched, ema, net, a.ema if step > a.eval_every else 0.0)
        if step % a.eval_every == 0 or step == a.steps:
            scores = read(ema, train.images, val.images)
            row = {"step": step, "loss": round(float(loss.detach()), 4), "sec": round(time.time() - t0, 1),
                   **{k: round(auc(y, v), 4) for k, v in scores.items()}}
            join(row, scores, y, joined, step == a.steps)
            hist.append(row)
            print(json.dumps(row), flush=True)
    write(a, hist)


if __name__ == "__main__":
    main()
