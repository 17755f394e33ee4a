"""Issue 14, ingredient 3: does averaging K seeds' scores help? Validation only.

Each run's score is already a sum of terms standardised on validation normals (`best`), so the K scores share a
scale; the ensemble score is their mean. Prints each run's validation AUC and the ensemble's.

    python research/ensemble_val.py runs/x14i/nih-det16-s0 runs/x14i/nih-det16-s1 runs/x14i/nih-det16-s2
"""

from __future__ import annotations

import argparse

import numpy as np

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import DataProvenance, load_run
from cxr_oneclass.scoring.inference import score_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    scores, labels, names = [], None, None
    for run in a.runs:
        model, _, doc = load_run(run)
        prov = DataProvenance.from_doc(doc, run)
        val = load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("val",))["val"]
        if names is not None and val.names != names:  # a manifest's split does not depend on the seed; others may
            raise SystemExit(f"{run}: another validation split than {a.runs[0]}'s")
        names = val.names
        s = score_images(model, val.images)["score"]
        labels = val.labels
        scores.append(s)
        print(f"{run}: validation AUC {auc(labels, s):.4f} ({model.cfg.score_terms})")
    mean = np.mean(scores, axis=0)
    print(f"ensemble of {len(scores)}: validation AUC {auc(labels, mean):.4f}")


if __name__ == "__main__":
    main()
