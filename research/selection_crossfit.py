"""Issue 14: is `auto`'s choice of score terms worth what it looks like on validation? Validation only.

`auto` sums the standardised terms whose sum has the best validation AUC among the 15 candidates. Read on the same
films it chose on, that AUC flatters the choice (the winner's curse; NIH's validation split has 79 normal films).
Here each rule chooses on one stratified half of validation (standardising on that half's normals, as `auto` does on
all of them) and is read on the other half, both ways, over many random halvings:

- `auto`:     today's rule, the best candidate on the choosing half;
- `auto+`:    among candidates within 0.01 of that best, the one with the most terms (more terms average out one
              term's failure on a new site);
- fixed sums: the same terms every time (no choice to overfit).

    python research/selection_crossfit.py runs/x14c9/nih-det16-s{0,1,2}-f25k100-pick --json runs/x14c10/xfit-nih.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from shift_robustness import run_and_val  # research/: run as `python research/selection_crossfit.py`

from cxr_oneclass.metrics import auc
from cxr_oneclass.scoring.inference import model_components, score_images
from cxr_oneclass.scoring.selection import best_candidate, candidate_sums
from cxr_oneclass.scoring.stats import robust_center_scale
from cxr_oneclass.scoring.terms import AUTO_TERMS

FIXED = ("seg", "fdist+seg", "ssim+fdist+seg", "ssim+fdist+seg+sdist")
SLACK = 0.01


def standardise(comps: dict[str, np.ndarray], normals: np.ndarray) -> dict[str, np.ndarray]:
    """Each term centred and scaled on the films `normals` selects, as scoring/stats does on validation normals."""
    out = {}
    for k, v in comps.items():
        center, scale = robust_center_scale(v[normals])
        out[k] = (v - center) / scale
    return out


def choose(table: dict[str, float], rule: str) -> str:
    best = best_candidate(table)
    if rule == "auto":
        return best
    near = [k for k in table if table[k] >= table[best] - SLACK]
    return max(near, key=lambda k: (k.count("+"), table[k]))


def random_half(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half of the films, stratified by label (mask)."""
    half = np.zeros(len(y), bool)
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        half[idx[: len(idx) // 2]] = True
    return half


def crossfit(comps: dict[str, np.ndarray], y: np.ndarray, repeats: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {r: [] for r in ("auto", "auto+", *FIXED)}
    for _ in range(repeats):
        fit = random_half(y, rng)
        for f, r in ((fit, ~fit), (~fit, fit)):
            z = standardise(comps, f & (y == 0))
            cands = candidate_sums(z)
            table = {k: auc(y[f], v[f]) for k, v in cands.items()}
            for rule in ("auto", "auto+"):
                got[rule].append(auc(y[r], cands[choose(table, rule)][r]))
            for k in FIXED:
                if k in cands:
                    got[k].append(auc(y[r], cands[k][r]))
    return {k: round(float(np.mean(v)), 4) for k, v in got.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", required=True)
    ap.add_argument("--repeats", type=int, default=100)
    a = ap.parse_args()
    out = {}
    for run in a.runs:
        model, _, val = run_and_val(run)
        terms = [k for k in AUTO_TERMS if k in model_components(model)]
        scored = score_images(model, val.images, model.cfg.batch_size)
        comps = {k: np.asarray(scored[k], dtype=np.float64) for k in terms}
        out[Path(run).name] = row = crossfit(comps, val.labels, a.repeats)
        print(Path(run).name, json.dumps(row), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    rules = list(next(iter(out.values())))
    print("mean over runs:", {r: round(float(np.mean([v[r] for v in out.values() if r in v])), 4) for r in rules})


if __name__ == "__main__":
    main()
