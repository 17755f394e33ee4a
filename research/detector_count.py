"""Issue 14, session 13: one lesion detector S or two? The re-decision session 12 asked for, on real runs only.
Validation only; the test split is never loaded.

Session 12 adopted two S's (config detectors 2) on pairs emulated from other seeds' S's (validation NIH +0.016,
pediatric +0.002). Real runs of it were flat on NIH (+0.000 over 3 seeds). Member 0 of a real two-S run is bit for
bit the one S that a `detectors 1` run of the same seed trains (same GAN too), so each real two-S run holds both arms:
"one" scores with member 0 alone, "two" with the pair. In each arm seg is standardised on validation normals as
`train` does (median, IQR/1.349) and `auto` chooses the sum again on validation; under each simulated shift the arm
keeps its standardisation and its sum (as shift_robustness.py does).

The rule, written before the new seeds' numbers existed (NIH seeds 3 and 4 and pediatric seeds 1 and 2 are new
runs; NIH 0-2 and pediatric 0 are session 12's): two S's stay in `detect` iff, on the means over each set's seeds,
  (a) the mean gain of the shipped score on validation as it is over the two sets is at least 0.005 and neither set
      falls by more than 0.005 (session 12's bar for a change that costs time), and
  (b) neither set's mean over the 11 shifts nor over the 7 held-out shifts falls by more than 0.005.
Otherwise `detect` goes back to one S (0.35x `best`'s scoring time and 5-7 minutes of training saved).

    python research/detector_count.py --set nih runs/x14d12/nih-det16-s{0,1,2} runs/x14d13/nih-det16-s{3,4} \
        --set kermany runs/x14d12/kermany-det16-s0 runs/x14d13/kermany-det16-s{1,2} --json runs/x14d13/count.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
from detector_pair import compare_arms, read_arm, shifted_components  # research/: run as `python research/detector_count.py`
from shift_robustness import run_and_val

from cxr_oneclass.metrics import auc
from cxr_oneclass.model.detector import detector_members
from cxr_oneclass.scoring.stats import robust_center_scale
from cxr_oneclass.training.detector import lesion_score


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of AUC(b) - AUC(a) over the same films resampled with replacement, normals and abnormals apart
    (so every resample keeps the split's class counts). Each arm's choice of sum stays fixed: a little narrow."""
    rng = np.random.default_rng(seed)
    idx0, idx1 = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    d = []
    for _ in range(reps):
        i = np.concatenate([rng.choice(idx0, idx0.size), rng.choice(idx1, idx1.size)])
        d.append(auc(y[i], b[i]) - auc(y[i], a[i]))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def evaluate(runs: list[str], bootstrap: int = 0) -> dict[str, dict[str, list]]:
    """Per arm: per family, per seed, the mean AUC of the arm's shipped sum; its choice; seg alone. With bootstrap
    > 0, also per seed the paired bootstrap interval of the shipped score's gain on validation (two minus one)."""
    out: dict[str, dict[str, list]] = {"one": {}, "two": {}, "ci": {}}
    for run in runs:
        model, _, val = run_and_val(run)
        members = detector_members(model.det)
        if len(members) != 2:
            raise SystemExit(f"{run}: {len(members)} S's; this compares member 0 with the pair of a two-S run")
        y = val.labels
        center, scale, films, comps = shifted_components(model, val.images)
        for name, f in films.items():
            comps[name]["seg1"] = lesion_score(members[0], f, film_norm=model.cfg.film_norm)
        shipped = {}
        for arm, key in (("one", "seg1"), ("two", "seg")):
            c, s = robust_center_scale(comps["none"][key][y == 0])
            cen, sca = {**center, "seg": c}, {**scale, "seg": s}
            chosen, by_family, shipped[arm] = read_arm(y, {n: {**comp, "seg": comp[key]} for n, comp in comps.items()}, cen, sca)
            for fam, v in by_family.items():
                out[arm].setdefault(fam, []).append(v)
            out[arm].setdefault("chosen", []).append(chosen)
            out[arm].setdefault("seg", []).append(auc(y, comps["none"][key]))
        if bootstrap:
            out["ci"].setdefault("none", []).append(paired_bootstrap(y, shipped["one"], shipped["two"], bootstrap))
        print(Path(run).name, {a: {k: v[-1] for k, v in d.items()} for a, d in out.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", nargs="+", action="append", required=True, metavar="NAME RUN", help="a set's name and its two-S runs")
    ap.add_argument("--json", required=True)
    ap.add_argument("--bootstrap", type=int, default=0, help="paired bootstrap resamples of validation per seed (0: none)")
    a = ap.parse_args()
    results, stay = compare_arms(a.set, functools.partial(evaluate, bootstrap=a.bootstrap))
    print("decision:", "two S's stay" if stay else "back to one S")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
