"""Issue 14's final table: read the test split once, after everything was chosen on validation.

For each run: test AUC; at thresholds set on *validation* abnormals at 95% and 99% sensitivity, the test
sensitivity, specificity and the share of normal films auto-cleared (= specificity); AUC within each view; and for
NIH sets, AUC of each finding label (normals vs abnormal films carrying that finding). Also the K-seed ensemble
(mean of the runs' standardised scores) when several runs of one data set are given.

    python research/final_test.py runs/x14i/nih-det16-s0 runs/x14i/nih-det16-s1 runs/x14i/nih-det16-s2 --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace

import numpy as np

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc, threshold_at_sensitivity
from cxr_oneclass.runs import DataProvenance, load_run
from cxr_oneclass.scoring.inference import score_images

SENSITIVITIES = (0.95, 0.99)


def at_thresholds(val_labels, val_scores, test_labels, test_scores) -> dict:
    out = {}
    for target in SENSITIVITIES:
        t = threshold_at_sensitivity(val_labels, val_scores, target)
        flagged = test_scores >= t
        sens = float(flagged[test_labels == 1].mean())
        spec = float((~flagged[test_labels == 0]).mean())
        out[f"sens@{target}"] = round(sens, 4)
        out[f"spec@{target}"] = round(spec, 4)
        out[f"cleared_share_of_all@{target}"] = round(float((~flagged).mean()), 4)
    return out


def finding_films(labels: np.ndarray, meta: dict[str, list[str]], least: int) -> dict[str, np.ndarray]:
    """Per NIH finding label carried by at least `least` abnormal films, those films' indices (a film carries several;
    none without the manifest's `nih_finding_labels`)."""
    findings = defaultdict(list)
    for i, text in enumerate(meta.get("nih_finding_labels", [])):
        if labels[i] == 1:
            for f in text.split("|"):
                findings[f].append(i)
    return {f: np.array(idx) for f, idx in findings.items() if len(idx) >= least}


def breakdown(test, scores) -> dict:
    out = {}
    if "view" in test.meta:
        for view in sorted(set(test.meta["view"])):
            m = np.array([v == view for v in test.meta["view"]])
            out[f"auc_view_{view}"] = auc(test.labels[m], scores[m])
    normals = np.flatnonzero(test.labels == 0)
    for f, idx in sorted(finding_films(test.labels, test.meta, 10).items(), key=lambda kv: -len(kv[1])):
        sel = np.r_[normals, idx]
        out[f"auc_finding_{f} (n={len(idx)})"] = auc(test.labels[sel], scores[sel])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    results, per_data = {}, defaultdict(list)
    for run in a.runs:
        model, _, doc = load_run(run)
        prov = DataProvenance.from_doc(doc, run)
        ds = load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("val", "test"))
        val, test = ds["val"], ds["test"]
        sv, st = score_images(model, val.images)["score"], score_images(model, test.images)["score"]
        r = {"terms": model.cfg.score_terms, "val_auc": auc(val.labels, sv), "test_auc": auc(test.labels, st)}
        table = (doc.get("score_selection") or {}).get("val_auc_by_terms") or {}
        without = {k: v for k, v in table.items() if "seg" not in k.split("+")}
        if without:  # what `best` would have chosen on validation on these GAN weights, read on test for comparison
            terms = max(without, key=lambda k: (round(without[k], 4), -k.count("+")))
            cfg = replace(model.cfg, score_terms=terms)
            r["best_terms"], r["best_test_auc"] = terms, auc(test.labels, score_images(model, test.images, cfg=cfg)["score"])
        r.update(at_thresholds(val.labels, sv, test.labels, st))
        r.update(breakdown(test, st))
        results[run] = r
        per_data[(prov.spec, tuple(test.names))].append((val, test, sv, st))
        print(run, json.dumps(r))
    for (spec, _), items in per_data.items():
        if len(items) < 2:
            continue
        val, test = items[0][0], items[0][1]
        sv, st = np.mean([i[2] for i in items], axis=0), np.mean([i[3] for i in items], axis=0)
        r = {"val_auc": auc(val.labels, sv), "test_auc": auc(test.labels, st)}
        r.update(at_thresholds(val.labels, sv, test.labels, st))
        r.update(breakdown(test, st))
        results[f"ensemble of {len(items)}: {spec}"] = r
        print(f"ensemble of {len(items)} ({spec})", json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
