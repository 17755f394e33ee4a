"""Issue 14, session 15: in-painting as the score (RIAD's recipe; the direction SQUID and SimSID take with a memory):
a U-Net learns to fill masked squares of normal films from their context; a film whose squares it fills badly is
abnormal. Validation only; the test split is never loaded.

The GAN's U sees the whole film, and its skips copy an abnormality through. An in-painter never sees the square it
fills, so an opacity there cannot be copied; it has to be predicted from normal anatomy around it. Training films are
drawn as `train` draws S's (the `detect` preset's jitter, imaging chain again, display curve), without lesions; each
gets a random share of its `--patch`-px squares masked (25-75%), and the loss is the L1 error on the masked pixels.
Scoring fills the film in two passes with complementary checkerboards of squares (each pixel masked once), so it
costs two U-Net passes per film. Every `--eval-every` steps the averaged weights (EMA) are read on validation:

- `inp_mean`: mean absolute in-painting error over the film;
- `inp_lung`: the same inside each film's lung mask (the `detect` preset's masks, from the training normals);
- `inp_top`:  mean of the largest 2% of the error map, blurred (sigma 1.5 px) first;
- `inp_bright`, `inp_bright_top`: the same two on the signed error's bright part only (the film brighter than its
  in-painting: an opacity where context predicts aerated lung), added in session 15 after the first reading showed
  `inp_lung` running in opposite directions on the two sets (higher on NIH's abnormal films, lower on the pediatric
  set's) and before any number of these two existed;
- with `--shifts`: the shipped score with and without inp_lung, inp_bright and lung_hf under the 11 simulated and
  7 held-out acquisition shifts (`data/acquisition.py`), each `auto` choosing on the films as they are;
- `<c>_2s` (for inp_lung and inp_bright): two-sided, |c - median| / (IQR/1.349) of the validation normals: a film whose
  lungs in-paint either much worse or much better than normal ones is abnormal. Added after seed 0 of both sets
  showed both candidates running in opposite directions on the two sets (NIH's abnormal films in-paint worse, the
  pediatric set's better: lung texture, not a lesion), before seeds 1-2; `--rescore JSON` reads them from a finished
  run's saved scores (seed 0).

With `--run RUN` (a trained `detect` run on the same set), each candidate is joined with the run's `auto` terms as
explore_classifier.py does: `with_<c>` and the cross-fitted gain `xfit_<c>` at the last reading. `--controls` first
reads, the same way, what needs no learning: `lung_grey` (the mean grey inside each film's lung mask: an opaque lung is
brighter) and the untrained in-painter's candidates (step 0), to tell what in-painting adds beyond brightness; and
(added after seeds 0-1 of NIH, before its numbers) `lung_hf`, the mean |film - film blurred (sigma 1.5 px)| inside
the lung mask: the lungs' fine texture, which is what the in-painter cannot predict, with no network at all.

The rule, written before any number of it existed (session 15), as for explore_classifier.py: the last reading
counts. Pursue a candidate (a term, 3 seeds on both sets) iff on NIH seed 0 its cross-fitted gain is at least +0.02
and on pediatric seed 0 not below -0.005. Two U-Net passes at width 16 cost about 0.7x `best`'s scoring (S's one
pass is 0.34x), which with S's 1.34x leaves `detect` at about 2x, the cap: a pass would also need a cheaper in-painter.

    python research/explore_inpaint.py --data csv:../shared/data/nih-pneumonia-128/manifest.csv \
        --run runs/x14c15/nih-det16-s0 --out runs/x14c15/inp-nih-s0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from explore_classifier import common_args, crossfit_gain, join, optimise, run_terms, standardise, start, with_candidate, write  # research/
from explore_detect import UNet

from cxr_oneclass.data.synthetic import _blur, jitter, lung_masks, population_lung_mask, reacquire, relut
from cxr_oneclass.metrics import auc
from cxr_oneclass.scoring.stats import robust_center_scale


def squares(b: int, size: int, patch: int, share: torch.Tensor) -> torch.Tensor:
    """(B, 1, size, size) masks: each patch-px square masked with probability share[i] (1 = masked)."""
    cells = size // patch
    keep = (torch.rand(b, 1, cells, cells) < share.view(b, 1, 1, 1)).float()
    return F.interpolate(keep, scale_factor=patch, mode="nearest")


def checkerboards(size: int, patch: int) -> list[torch.Tensor]:
    cells = size // patch
    ij = torch.arange(cells).view(-1, 1) + torch.arange(cells).view(1, -1)
    first = F.interpolate((ij % 2 == 0).float()[None, None], scale_factor=patch, mode="nearest")
    return [first, 1 - first]


def fill(net: UNet, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The in-painter's film: masked pixels predicted from the rest. x, mask (B, 1, H, W) in [0, 1]."""
    inp = torch.cat([(x * 2 - 1) * (1 - mask), mask], 1)
    return torch.sigmoid(net(inp)[0])


@torch.no_grad()
def error_maps(net: UNet, images: np.ndarray, patch: int, bs: int = 128) -> torch.Tensor:
    """film - in-painted film (signed), every pixel filled once by the two checkerboards; (N, 1, H, W)."""
    net.eval()
    out = []
    for s in range(0, len(images), bs):
        x = torch.from_numpy(images[s : s + bs]).float().div(255).unsqueeze(1)
        filled = torch.zeros_like(x)
        for m in checkerboards(x.shape[-1], patch):
            m = m.expand_as(x)
            filled += fill(net, x, m) * m
        out.append(x - filled)
    return torch.cat(out)


def lung_mean(maps: torch.Tensor, lungs: np.ndarray) -> np.ndarray:
    """Each (N, 1, H, W) map's mean weighted by its film's lung mask (N, H, W)."""
    lw = torch.from_numpy(lungs).flatten(1)
    return ((maps.flatten(1) * lw).sum(1) / lw.sum(1)).numpy()


def top2(maps: torch.Tensor) -> np.ndarray:
    """Mean of the largest 2% of each map, blurred (sigma 1.5 px) first."""
    flat = _blur(maps, 1.5).flatten(1)
    return flat.topk(max(1, int(flat.shape[1] * 0.02)), 1).values.mean(1).numpy()


def read(net: UNet, images: np.ndarray, lungs: np.ndarray, patch: int) -> dict[str, np.ndarray]:
    signed = error_maps(net, images, patch)
    err, bright = signed.abs(), signed.clamp_min(0)
    return {"inp_mean": err.flatten(1).mean(1).numpy(), "inp_lung": lung_mean(err, lungs), "inp_top": top2(err),
            "inp_bright": lung_mean(bright, lungs), "inp_bright_top": top2(bright)}


TWO_SIDED = ("inp_lung", "inp_bright")


def two_sided(y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """scores plus the two-sided versions of TWO_SIDED, standardised on the validation normals."""
    return {**scores, **{f"{k}_2s": np.abs(standardise(y, scores[k])) for k in TWO_SIDED}}


def by_view(y: np.ndarray, scores: dict[str, np.ndarray], meta: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Each score's AUC within each view (NIH: view is confounded with label, AP normals against PA pneumonia)."""
    if "view" not in meta:
        return {}
    views = np.array(meta["view"])
    return {v: {k: round(auc(y[views == v], s[views == v]), 4) for k, s in scores.items()} for v in sorted(set(views))}


def rescore(path: str, run: str) -> None:
    """The last reading of a finished run (its saved scores) with the two-sided candidates, rewritten in place."""
    doc = json.load(open(path))
    row = doc["history"][-1]
    y, z, chosen = run_terms(run)
    scores = two_sided(y, {k: np.array(v) for k, v in row["scores"].items()})
    for k in scores:
        if k not in row:
            row[k] = round(auc(y, scores[k]), 4)
            best, value = with_candidate(y, z, k, scores[k])
            row[f"with_{k}"] = [best, round(value, 4)]
            row[f"xfit_{k}"] = round(crossfit_gain(y, z, k, scores[k]), 4)
            row["scores"][k] = [round(float(x), 6) for x in scores[k]]
    print(json.dumps({k: v for k, v in row.items() if k != "scores"}))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def lung_hf(images: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Mean |film - film blurred (sigma 1.5 px)| inside the lung masks: the lungs' fine texture."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    return lung_mean((x - _blur(x, 1.5)).abs(), lungs)


def shift_read(net: UNet, run: str, lungs: np.ndarray, patch: int) -> dict[str, dict[str, float]]:
    """The run's shipped score with and without each of inp_lung, inp_bright and lung_hf, `auto` choosing on the
    validation films as they are, read under every simulated and held-out acquisition shift (mean AUC per family),
    as detector_pair.py reads an arm: a term that reads scanner texture instead of disease falls under them."""
    from detector_pair import read_arm, shifted_components
    from shift_robustness import run_and_val

    model, _, val = run_and_val(run)
    y = val.labels
    center, scale, films, comps = shifted_components(model, val.images)
    for name, f in films.items():
        got = read(net, f, lungs, patch)
        comps[name].update(inp_lung=got["inp_lung"], inp_bright=got["inp_bright"], lung_hf=lung_hf(f, lungs))
    out = {"base": read_arm(y, comps, center, scale)[1]}  # read_arm ignores terms outside center
    for k in ("inp_lung", "inp_bright", "lung_hf"):
        c, sc = robust_center_scale(comps["none"][k][y == 0])  # read_arm standardises with the run's center, scale
        out[k] = read_arm(y, comps, {**center, k: c}, {**scale, k: sc})[1]
    return {arm: {fam: round(v, 4) for fam, v in fams.items()} for arm, fams in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap, batch=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--controls", action="store_true")
    ap.add_argument("--shifts", action="store_true", help="with --run: the last reading under acquisition shifts")
    ap.add_argument("--rescore", default="", help="a finished run's JSON: its saved last scores read again with --run")
    a = ap.parse_args()
    if a.rescore:
        rescore(a.rescore, a.run)
        return
    cfg, train, val, y, joined = start(a)
    gen = torch.Generator().manual_seed(a.seed)
    lungs = torch.from_numpy(lung_masks(train.images, keep=cfg.lung_keep, floor=cfg.lung_floor)).unsqueeze(1)
    lungs_val = lung_masks(val.images, population_lung_mask(train.images), keep=cfg.lung_keep)
    films = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    net = UNet(2, 1, a.width)
    ema = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=max(1, a.steps), pct_start=0.1)
    t0, hist = time.time(), []
    if a.controls and joined is not None:
        grey = torch.from_numpy(val.images).float().div(255).unsqueeze(1)
        controls = {"lung_grey": lung_mean(grey, lungs_val), "lung_hf": lung_hf(val.images, lungs_val),
                    **{f"untrained_{k}": v for k, v in read(ema, val.images, lungs_val, a.patch).items()}}
        row = {"step": 0, **{k: round(auc(y, v), 4) for k, v in controls.items()},
               **{f"xfit_{k}": round(crossfit_gain(y, joined[1], k, v), 4) for k, v in controls.items()},
               "by_view": by_view(y, controls, val.meta)}
        hist.append(row)
        print(json.dumps(row), flush=True)
        if a.steps == 0:
            return write(a, hist)
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(films), (a.bs,), generator=gen)
        x, _ = jitter(films[idx], lungs[idx], gen, cfg.detector_jitter)
        x = relut(reacquire(x, gen, cfg.acquisition_p), gen, cfg.lut_p)
        m = squares(a.bs, a.size, a.patch, 0.25 + 0.5 * torch.rand(a.bs, generator=gen))
        loss = ((fill(net, x, m) - x).abs() * m).sum() / m.sum().clamp_min(1)
        optimise(loss, opt, sched, ema, net, a.ema if step > a.eval_every else 0.0)
        if step % a.eval_every == 0 or step == a.steps:
            scores = two_sided(y, read(ema, val.images, lungs_val, a.patch))
            row = {"step": step, "loss": round(float(loss.detach()), 4), "sec": round(time.time() - t0, 1),
                   **{k: round(auc(y, v), 4) for k, v in scores.items()}}
            join(row, scores, y, joined, step == a.steps)
            if step == a.steps:
                extra = {"shipped": sum(joined[1][k] for k in joined[2].split("+"))} if joined is not None else {}
                row["by_view"] = by_view(y, {**scores, **extra}, val.meta)
                row["scores"] = {k: [round(float(x), 6) for x in v] for k, v in scores.items()}
                if a.shifts and joined is not None:
                    row["shifts"] = shift_read(ema, a.run, lungs_val, a.patch)
            hist.append(row)
            print(json.dumps(row), flush=True)
    write(a, hist)


if __name__ == "__main__":
    main()
