"""Issue 14, session 12: would a second lesion detector S, averaged with the first, earn a place in `detect`?
Validation only; the test split is never loaded.

S alone swings from seed to seed on NIH (validation 0.71-0.80 among the default's three runs) while the GAN-side
terms hold steadier, and a 3-seed ensemble of whole runs gained on test in every session that read one. Two S's
cost one more S in training (NIH about +4.6 min, pediatric +7 min: both still under the 30-minute bar) and about
+0.35x `best`'s scoring cost (1.7x in all, under the 2x cap), against 3x for a whole-run ensemble.

S does not depend on the GAN's weights, and the seg term is S's mean lesion probability, so the averaged pair's seg
term is exactly the mean of the two S's seg terms. Each default run i (session 11's runs) is paired with the S of run
i+1 (mod 3): another seed's S, as a second member trained from its own stream would be. The pair's seg is standardised
on validation normals as `train` standardises a term (median, IQR/1.349) and `auto` chooses the sum again on
validation. Under each simulated shift the terms keep that standardisation and the chosen sum (as shift_robustness.py).

The rule, written before the numbers existed: adopt two S's iff, on the means over the 3 seeds of each set,
  (a) the mean gain of the shipped score on validation as it is, over the two sets, is at least 0.005, and neither set
      falls by more than 0.005 (a change that costs time must earn its place), and
  (b) neither set's mean over the 11 shifts nor over the 7 held-out shifts falls by more than 0.005.

    python research/detector_pair.py --set nih runs/x14c11/nih-gan50-s{0,1,2}-f25k100a50-pick \
        --set kermany runs/x14c11/kermany-gan50-s{0,1,2}-f25k100a50-pick --json runs/x14p12/pair.json
    # after the decision, the pairs as runs (runs/x14p12/<run>-pair) for research/final_test.py:
    python research/detector_pair.py --set nih ... --set kermany ... --json runs/x14p12/pair.json --write runs/x14p12
    # the picks' optimism, cross-fitted, from robust_pick.py's cached seg scores of session 10's S readings:
    python research/detector_pair.py --crossfit runs/x14c11/nih-det16-s{0,1,2}-f25k100a50-pick-seg.npz
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import numpy as np
from selection_crossfit import random_half  # research/: run as `python research/detector_pair.py`
from shift_robustness import run_and_val

from cxr_oneclass.config import replace
from cxr_oneclass.data.acquisition import HELDOUT_SHIFTS, SHIFTS
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc
from cxr_oneclass.model.detector import DetectorEnsemble
from cxr_oneclass.runs import DataProvenance, load_run, save_run
from cxr_oneclass.scoring.inference import model_components, score_images
from cxr_oneclass.scoring.selection import best_candidate, candidate_sums, fit_score_and_calibration
from cxr_oneclass.scoring.stats import robust_center_scale
from cxr_oneclass.scoring.terms import AUTO_TERMS, TERM_INDEX
from cxr_oneclass.training.detector import lesion_score

MAX_LOSS = 0.005
FAMILIES = {"none": {"none": SHIFTS["none"]}, "shifts": {k: v for k, v in SHIFTS.items() if k != "none"}, "heldout": HELDOUT_SHIFTS}


def standardised(comps: dict[str, np.ndarray], center: dict[str, float], scale: dict[str, float]) -> dict[str, np.ndarray]:
    return {k: (comps[k] - center[k]) / scale[k] for k in center}


def shifted_components(model, images: np.ndarray) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The run's standardisation of its `auto` terms (center, scale), every version of the validation films in
    FAMILIES (name -> films) and each version's components as the run scores them (name -> term -> (N,))."""
    terms = [k for k in AUTO_TERMS if k in model_components(model)]
    center = {k: float(model.stats.center[TERM_INDEX[k]]) for k in terms}
    scale = {k: float(model.stats.scale[TERM_INDEX[k]]) for k in terms}
    films = {name: fn(images) for fam in FAMILIES.values() for name, fn in fam.items()}
    comps = {name: score_images(model, f, model.cfg.batch_size) for name, f in films.items()}
    return center, scale, films, comps


def read_arm(y: np.ndarray, comps: dict[str, dict[str, np.ndarray]], center: dict[str, float],
             scale: dict[str, float]) -> tuple[str, dict[str, float], np.ndarray]:
    """An arm's shipped score: the sum `auto` chooses on the validation films as they are (comps["none"]), kept with
    its standardisation under every shift; returns the choice, its mean AUC per family of FAMILIES and its scores on
    the films as they are. comps: per film version (FAMILIES' names), the arm's terms (keys outside `center` are
    ignored)."""
    sums = candidate_sums(standardised(comps["none"], center, scale))
    chosen = best_candidate({k: auc(y, v) for k, v in sums.items()})
    return chosen, {fam: float(np.mean([auc(y, candidate_sums(standardised(comps[n], center, scale))[chosen]) for n in names]))
                    for fam, names in FAMILIES.items()}, sums[chosen]


def compare_arms(sets: list[list[str]], evaluate, base: str = "one", new: str = "two") -> tuple[dict, bool]:
    """Each set's (name, runs...) `evaluate`d, arm `new` against arm `base` printed per family and seed, and the
    rule of this script and detector_count.py: the mean gain on validation as it is over the sets at least MAX_LOSS,
    no set below -MAX_LOSS, and neither set's mean over the shifts or the held-out shifts below -MAX_LOSS.
    Returns the results and whether `new` passes."""
    results, gains, ok = {}, [], True
    for name, *runs in sets:
        r = results[name] = evaluate(runs)
        for fam in ("none", "shifts", "heldout", "seg"):
            d = np.array(r[new][fam]) - np.array(r[base][fam])
            print(f"{name} {fam:8s} {base} {np.mean(r[base][fam]):.4f}  {new} {np.mean(r[new][fam]):.4f}  Δ {d.mean():+.4f} "
                  f"(by seed {' '.join(f'{x:+.3f}' for x in d)})")
            if fam == "none":
                gains.append(d.mean())
            elif fam != "seg":
                ok &= d.mean() >= -MAX_LOSS
    held = min(gains) >= -MAX_LOSS
    print(f"(a) mean gain over the sets {np.mean(gains):+.4f} (needs >= {MAX_LOSS}), no set below -{MAX_LOSS}: {held}; "
          f"(b) shifted and held-out means within {MAX_LOSS}: {ok}")
    return results, bool(np.mean(gains) >= MAX_LOSS and held and ok)


def evaluate(runs: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per arm (one S, two S's): per family, per seed, the mean AUC of the arm's shipped sum."""
    loaded = [run_and_val(r) for r in runs]
    out: dict[str, dict[str, list[float]]] = {"one": {}, "two": {}}
    for i, (model, _, val) in enumerate(loaded):
        partner = loaded[(i + 1) % len(loaded)][0].det
        y = val.labels
        center, scale, films, comps = shifted_components(model, val.images)
        for name, f in films.items():
            comps[name]["seg2"] = (comps[name]["seg"] + lesion_score(partner, f)) / 2
        # the pair's seg standardised on validation normals, as train would; auto chooses again
        c2, s2 = robust_center_scale(comps["none"]["seg2"][y == 0])
        arms = {"one": (center, scale, lambda c: c), "two": ({**center, "seg": c2}, {**scale, "seg": s2}, lambda c: {**c, "seg": c["seg2"]})}
        for arm, (cen, sca, view) in arms.items():
            chosen, by_family, _ = read_arm(y, {n: view(c) for n, c in comps.items()}, cen, sca)
            for fam, v in by_family.items():
                out[arm].setdefault(fam, []).append(v)
            out[arm].setdefault("chosen", []).append(chosen)
            out[arm].setdefault("seg", []).append(auc(y, view(comps["none"])["seg"]))
        print(Path(runs[i]).name, {a: {k: v[-1] for k, v in d.items()} for a, d in out.items()}, flush=True)
    return out


def write_pairs(runs: list[str], out: Path) -> None:
    """Each run i with S's of runs i and i+1 as one model of config detectors 2, its score fitted as `train` fits
    it (auto on validation), written as a run `<name>-pair` (for final_test.py, once the rule has decided)."""
    loaded = [load_run(r) for r in runs]
    for i, (run, (model, _, doc)) in enumerate(zip(runs, loaded)):
        cfg = replace(model.cfg, score_terms="auto", detectors=2)
        pair = copy.deepcopy(model)
        pair.cfg, pair.det = cfg, DetectorEnsemble(cfg.detector_width, 2)
        pair.det.members[0].load_state_dict(model.det.state_dict())
        pair.det.members[1].load_state_dict(loaded[(i + 1) % len(loaded)][0].det.state_dict())
        pair.det.eval()
        prov = DataProvenance.from_doc(doc, run)
        ds = load_dataset(prov.spec, cfg.image_size, prov.split_seed, splits=("train", "val"))
        fitted = fit_score_and_calibration(pair, ds["train"], ds["val"])
        pair.cfg = fitted.cfg
        extra = {k: doc[k] for k in ("population", "data_summary", "train_seconds", "skipped_files") if k in doc}
        extra.update(val_auc=fitted.val_auc, score_selection=fitted.selection, detector_pair=[run, runs[(i + 1) % len(runs)]])
        target = out / f"{Path(run).name}-pair"
        shutil.rmtree(target, ignore_errors=True)
        save_run(target, pair, fitted.calibration, extra, prov)
        print(target, "val AUC", round(fitted.val_auc, 4), fitted.cfg.score_terms, flush=True)


def crossfit(tables: list[str], repeats: int = 100) -> None:
    """How much of the pair's seg gain is its two validation picks' optimism: from robust_pick.py's cached seg scores
    of every reading of each seed's S (`<run>-seg.npz`), each member's reading picked on one stratified half of
    validation and seg read on the other (both ways, `repeats` random halvings), one S against the pair (S of seed i
    with S of seed i+1), on the films as they are and averaged over the held-out shifts."""
    loaded = [np.load(t) for t in tables]
    y = loaded[0]["labels"]
    rng = np.random.default_rng(0)
    got: dict[str, list[list[float]]] = {k: [[] for _ in loaded] for k in ("one", "two", "one_heldout", "two_heldout")}
    for _ in range(repeats):
        fit = random_half(y, rng)
        for f, r in ((fit, ~fit), (~fit, fit)):
            picks = [int(np.argmax([auc(y[f], s[f]) for s in z["none"]])) for z in loaded]
            for i, z in enumerate(loaded):
                j = (i + 1) % len(loaded)
                partner = loaded[j]
                for suffix, names in (("", ["none"]), ("_heldout", list(HELDOUT_SHIFTS))):
                    one = [auc(y[r], z[n][picks[i]][r]) for n in names]
                    two = [auc(y[r], (z[n][picks[i]][r] + partner[n][picks[j]][r]) / 2) for n in names]
                    got["one" + suffix][i].append(float(np.mean(one)))
                    got["two" + suffix][i].append(float(np.mean(two)))
    for suffix in ("", "_heldout"):
        one, two = (np.array([np.mean(v) for v in got[k + suffix]]) for k in ("one", "two"))
        print(f"seg alone, cross-fitted{suffix or ' (as it is)'}: one S {one.mean():.4f}  two {two.mean():.4f}  "
              f"Δ {np.mean(two - one):+.4f} (by seed {' '.join(f'{x:+.3f}' for x in two - one)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", nargs="+", action="append", metavar="NAME RUN", help="a set's name and its runs")
    ap.add_argument("--crossfit", nargs="+", metavar="NPZ", help="robust_pick.py's seg caches of the seeds' S: the cross-fitted check only")
    ap.add_argument("--json")
    ap.add_argument("--write", help="after the rule: write each set's pairs as runs here (write_pairs); no evaluation")
    a = ap.parse_args()
    if a.crossfit:
        crossfit(a.crossfit)
        return
    if not a.set or not a.json:
        ap.error("--set and --json are needed (or --crossfit)")
    if a.write:
        for _, *runs in a.set:
            write_pairs(runs, Path(a.write))
        return
    results, adopt = compare_arms(a.set, evaluate)
    print("decision:", "adopt" if adopt else "keep today's default")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
