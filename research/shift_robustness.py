"""Issue 14: which score terms keep their ranking when every film comes from a different acquisition? Validation only.

A trained run's terms are standardised on its validation normals as shipped. Then every validation film, normal or
abnormal, is re-acquired the same way (another exposure curve, contrast, blur, noise, JPEG, a lower resolution, a
tighter or wider field), as a new site's films would be, and each term's and each `auto` candidate's AUC is read on
the shifted split, for each shift of data/acquisition.SHIFTS and, apart ("heldout" in the JSON), of the family no
training step simulates (HELDOUT_SHIFTS: heel, scatter, grid lines, collimator edges, a marker, another LUT,
equalisation). A term whose AUC holds under every shift is one a selection rule could trust on a new site; the
test pools of the shared sets are such new sites, but they must not be used to find out.

    python research/shift_robustness.py runs/x14i/nih-det16-s{0,1,2} --json runs/x14s/nih.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr_oneclass.data.acquisition import HELDOUT_SHIFTS, SHIFTS
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.runs import DataProvenance, load_run
from cxr_oneclass.scoring.inference import model_components, score_images
from cxr_oneclass.scoring.selection import select_score_terms
from cxr_oneclass.scoring.terms import AUTO_TERMS, TERM_INDEX


def run_and_val(run: str):
    """A trained run (model, its run document) and its own validation split, as it was decoded for training."""
    model, _, doc = load_run(run)
    prov = DataProvenance.from_doc(doc, run)
    return model, doc, load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("val",))["val"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    results = {}
    for run in a.runs:
        model, doc, val = run_and_val(run)
        y = val.labels
        stats = model.stats
        terms = [k for k in AUTO_TERMS if k in model_components(model)]
        per_shift, heldout = {}, {}
        for name, fn in [*SHIFTS.items(), *HELDOUT_SHIFTS.items()]:
            comps = score_images(model, fn(val.images), model.cfg.batch_size)
            _, table = select_score_terms(comps, y, stats)  # every auto candidate's AUC, as `auto` standardises them
            row = {c: round(v, 4) for c, v in table.items()}
            z = {k: (comps[k] - float(stats.center[TERM_INDEX[k]])) / float(stats.scale[TERM_INDEX[k]]) for k in terms}
            # how far the normals move in the standardised units the threshold lives in (0: not at all)
            row["normals_median_shift"] = {k: round(float(np.median(z[k][y == 0])), 3) for k in terms}
            (per_shift if name in SHIFTS else heldout)[name] = row
        # "heldout": shifts no training step simulates (data/acquisition.py), kept apart so that means over
        # "shifts" read as they did before they existed
        results[Path(run).name] = {"chosen": doc["config"]["score_terms"], "shifts": per_shift, "heldout": heldout}
        cands = [c for c in per_shift["none"] if c != "normals_median_shift"]
        worst = {c: min(per_shift[s][c] for s in SHIFTS) for c in cands}
        mean = {c: float(np.mean([per_shift[s][c] for s in SHIFTS])) for c in cands}
        print(Path(run).name, "chosen", doc["config"]["score_terms"],
              "| by val:", max(cands, key=lambda c: per_shift["none"][c]),
              "| by mean over shifts:", max(cands, key=mean.get), round(max(mean.values()), 4),
              "| by worst shift:", max(cands, key=worst.get), round(max(worst.values()), 4), flush=True)
        for k in terms:
            print(f"  {k:6s}", " ".join(f"{s}={per_shift[s][k]:.3f}" for s in SHIFTS), flush=True)
            print(f"  {'':6s}", " ".join(f"{s}={heldout[s][k]:.3f}" for s in HELDOUT_SHIFTS), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
