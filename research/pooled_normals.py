"""Issue 14, session 16: is the lesion detector S short of normal films? Validation only; the test split is never
loaded.

NIH's training split holds 286 normal films (the paper trained on 4,479); the pediatric one 1,241. On NIH, S is the
weak, unsteady part of `detect` (its validation readings swing 0.3-0.7 within one training; seg alone 0.63-0.80 over
seeds), on the pediatric set it is the strongest term and rises steadily. If S on NIH is short of normals, S trained
on the run's own normals *plus another set's* (the same lesions, stream, initial weights and reading pick on the
run's own validation split; only the films differ) should separate NIH's validation films better. Each source keeps
its own lung masks (`lung_masks` on its films alone), as its own run would draw them.

Arms, per trained default run (`research/detect_sweep.sh`):
  own      the run's S as trained (its own normals);
  pooled   S trained on the run's normals + the `--extra` set's training normals;
  extra    (with --extra-only) S trained on the extra set's normals alone: transfer, not more data.
Each arm's seg is standardised on validation normals and `auto` chooses again over the run's GAN terms with it
(`detector_pair.read_arm`, also under the 11 simulated and 7 held-out acquisition shifts). What counts is the
cross-fitted gain of the shipped score over `own` (`auto` chooses on one stratified half, read on the other, 100
halvings, both ways), so that a choice made on the same films does not count as a gain.

The rule, written before any number: the direction (train S on more normals: an option to add other sites' normal
films, and a bundled S prior for small sites) is pursued iff
  (a) the pooled arm's cross-fitted gain, mean over NIH seeds 0-2, is at least +0.02, and
  (b) on the pediatric set (seed 0, NIH's normals added) it is at least -0.005, and
  (c) the NIH seeds' mean over the 7 held-out shifts does not fall by more than 0.005.
Otherwise it is recorded as not pursued.

    bash research/detect_sweep.sh runs/x14p16 nih-pneumonia-128 "0 1 2"
    bash research/detect_sweep.sh runs/x14p16 kermany-pediatric-128 0
    python research/pooled_normals.py runs/x14p16/nih-det16-s{0,1,2} \\
        --extra csv:../shared/data/kermany-pediatric-128/manifest.csv --json runs/x14p16/pooled-nih.json
    python research/pooled_normals.py runs/x14p16/kermany-det16-s0 \\
        --extra csv:../shared/data/nih-pneumonia-128/manifest.csv --json runs/x14p16/pooled-kermany.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from detector_count import paired_bootstrap  # research/: run as `python research/pooled_normals.py`
from detector_pair import read_arm, shifted_components
from explore_classifier import crossfit_delta
from shift_robustness import run_and_val

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.synthetic import lung_masks
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import DataProvenance
from cxr_oneclass.runtime import seed_everything
from cxr_oneclass.scoring.selection import candidate_sums
from cxr_oneclass.scoring.stats import build_scoring_model, robust_center_scale
from cxr_oneclass.training.detector import fit_detectors, lesion_score


def train_normals(spec: str, size: int, split_seed: int) -> np.ndarray:
    """A set's training normals, uint8 (N, H, W), decoded as `train` decodes them."""
    train = load_dataset(spec, size, split_seed, splits=("train",))["train"]
    return train.images[train.labels == 0]


def fit_s(model, films: list[np.ndarray], val):
    """S with the run's initial weights and stream, trained on the concatenated `films` (each source its own lung
    masks), its reading picked on the run's validation split. Returns (S, history, seconds)."""
    cfg = model.cfg
    seed_everything(cfg.seed)  # as the trainer does before building the model: S starts from the run's weights
    det = build_scoring_model(cfg).det
    t0 = time.perf_counter()
    lungs = np.concatenate([lung_masks(f, keep=cfg.lung_keep, floor=cfg.lung_floor) for f in films])  # each source its own
    history, _ = fit_detectors(det, cfg, np.concatenate(films), val, progress=False, lungs=lungs)
    return det.eval(), history, time.perf_counter() - t0


def evaluate(run: str, extra_spec: str, extra_only: bool) -> dict:
    model, doc, val = run_and_val(run)
    prov = DataProvenance.from_doc(doc, run)
    size, y = model.cfg.image_size, val.labels
    own = train_normals(prov.spec, size, prov.split_seed)
    extra = train_normals(extra_spec, size, prov.split_seed)
    center, scale, films, comps = shifted_components(model, val.images)
    arms = {"pooled": [own, extra]} | ({"extra": [extra]} if extra_only else {})
    out: dict = {"run": Path(run).name, "n_own": len(own), "n_extra": len(extra), "arms": {}}
    for arm, sources in arms.items():
        det, history, seconds = fit_s(model, sources, val)
        for name, f in films.items():
            comps[name][arm] = lesion_score(det, f, film_norm=model.cfg.film_norm)
        out["arms"][arm] = {"readings": [r.get("val_auc") for r in history], "seconds": round(seconds, 1)}
    shipped, sums = {}, {}
    for arm in ["own", *arms]:
        key = "seg" if arm == "own" else arm
        c, s = robust_center_scale(comps["none"][key][y == 0])
        cen, sca = {**center, "seg": c}, {**scale, "seg": s}
        view = {n: {**comp, "seg": comp[key]} for n, comp in comps.items()}
        chosen, by_family, shipped[arm] = read_arm(y, view, cen, sca)
        sums[arm] = candidate_sums({k: (view["none"][k] - cen[k]) / sca[k] for k in cen})
        row = out["arms"].setdefault(arm, {})
        row.update({"chosen": chosen, "seg": auc(y, comps["none"][key]), **by_family})
        if arm != "own":
            row["xfit_gain"] = crossfit_delta(y, sums["own"], sums[arm])
            row["ci_gain"] = paired_bootstrap(y, shipped["own"], shipped[arm], 2000)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--extra", required=True, help="data spec whose training normals are added to S's")
    ap.add_argument("--extra-only", action="store_true", help="also an S trained on the extra normals alone")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    results = [evaluate(r, a.extra, a.extra_only) for r in a.runs]
    arms = [k for k in results[0]["arms"] if k != "own"]
    for arm in arms:
        for key in ("xfit_gain", "seg", "none", "heldout", "shifts"):
            d = [r["arms"][arm][key] - (0 if key == "xfit_gain" else r["arms"]["own"][key]) for r in results]
            print(f"{arm:7s} {key:9s} Δ mean {np.mean(d):+.4f}  by run {' '.join(f'{x:+.3f}' for x in d)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
