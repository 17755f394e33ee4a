"""Issue 14, session 14: train K lesion detectors S and keep the one validation likes best, instead of averaging them?
An exploration, validation only; the test split is never loaded.

Averaging two S's gained +0.002 on NIH's shipped score (detector_count.py), but single S's of one recipe differ by
0.03-0.05 in validation AUC from stream to stream (NIH seed 2: 0.706 against 0.737). Keeping the best of K would cost
training time only (scoring stays one S). Picking on validation and reading on the same validation flatters the pick,
so this script cross-fits: over random stratified halvings of the validation films, the member with the best seg AUC
on one half is read on the other half, against member 0 (what a one-S run ships) and the K-average, read on the same
half. Each member's own reading was already chosen on all of validation (detector_pick val), a bias shared by every
arm here.

Declared before the numbers: if the cross-fitted gain of the pick over member 0, mean over the seeds, is at least
+0.02 (about what one seed's validation can resolve: docs/RESULTS.md, session 14), it is a candidate for a proper
3-seed, two-set rule next session; below that, it is not pursued.

    bash research/detect_sweep.sh runs/x14k14 nih-pneumonia-128 "3 4" --detectors 4
    python research/detector_pick_member.py runs/x14k14/nih-det16-s{3,4} --json runs/x14k14/pick.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from selection_crossfit import random_half  # research/: run as `python research/detector_pick_member.py`
from shift_robustness import run_and_val

from cxr_oneclass.metrics import auc
from cxr_oneclass.model.detector import detector_members
from cxr_oneclass.training.detector import lesion_score

BAR = 0.02


def crossfit_pick(y: np.ndarray, seg: np.ndarray, repeats: int, seed: int = 0) -> dict[str, float]:
    """seg: (K, N) each member's lesion score. Mean AUC on the read half of: member 0, the member best on the fit
    half, and the members' mean; and how often the pick is member 0."""
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {"member0": [], "pick": [], "mean": [], "picked0": []}
    avg = seg.mean(0)
    for _ in range(repeats):
        fit = random_half(y, rng)
        for f, r in ((fit, ~fit), (~fit, fit)):
            k = int(np.argmax([auc(y[f], s[f]) for s in seg]))
            got["pick"].append(auc(y[r], seg[k][r]))
            got["member0"].append(auc(y[r], seg[0][r]))
            got["mean"].append(auc(y[r], avg[r]))
            got["picked0"].append(float(k == 0))
    return {k: float(np.mean(v)) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="runs trained with --detectors K (K >= 2)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    out = {}
    for run in a.runs:
        model, _, val = run_and_val(run)
        members = detector_members(model.det)
        if len(members) < 2:
            raise SystemExit(f"{run}: one S; train with --detectors K to compare members")
        seg = np.stack([lesion_score(m, val.images, film_norm=model.cfg.film_norm) for m in members])
        y = val.labels
        whole = [auc(y, s) for s in seg]
        r = out[Path(run).name] = {"members_on_all_val": whole, **crossfit_pick(y, seg, a.repeats)}
        print(Path(run).name, {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in r.items()}, flush=True)
    gain = float(np.mean([r["pick"] - r["member0"] for r in out.values()]))
    print(f"cross-fitted gain of the pick over member 0, mean over seeds: {gain:+.4f} (bar {BAR:+.2f}):",
          "a candidate" if gain >= BAR else "not pursued")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"runs": out, "gain": gain, "bar": BAR}, indent=1))


if __name__ == "__main__":
    main()
