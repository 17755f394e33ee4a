"""Score ablation on validation splits: one trained run per seed, every candidate score refitted on it.

    python research/ablate_scores.py --runs runs/a-s0 runs/a-s1 runs/a-s2 [--data SPEC] [--out table.md]

Each candidate is `jobs.rescore.rescore_run` on the same weights (each run's own recorded split unless --data) (statistics fitted on train normals and validation
normals), so the table isolates what the score measures. Prints validation AUC mean ± std over the runs, as
Markdown. Never loads the test split.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cxr_oneclass.jobs.rescore import rescore_run

# (label, score_terms, score_norm, fdist_features), one change at a time from the paper's score
CANDIDATES = [
    ("paper: 20·rec + 4·adv + 8·enc", "rec+adv+enc", "weights", "ez"),
    ("rec + adv + enc, standardised", "rec+adv+enc", "standardised", "ez"),
    ("rec (L1) only", "rec", "standardised", "ez"),
    ("ssim only", "ssim", "standardised", "ez"),
    ("fdist on U's pooled features only", "fdist", "standardised", "u"),
    ("fdist on U's latent z only", "fdist", "standardised", "z"),
    ("fdist on E's latent of x' only", "fdist", "standardised", "ez"),
    ("ssim + fdist(z)", "ssim+fdist", "standardised", "z"),
    ("**ssim + fdist(E(x')) = best**", "ssim+fdist", "standardised", "ez"),
    ("ssim + fdist(E(x')) + rec", "ssim+fdist+rec", "standardised", "ez"),
    ("ssim + fdist(E(x')) + enc", "ssim+fdist+enc", "standardised", "ez"),
    ("ssim + fdist(E(x')) + adv", "ssim+fdist+adv", "standardised", "ez"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", help="data spec (default: the data and split each run recorded)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args()
    table: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            for label, terms, norm, feats in CANDIDATES:
                out = rescore_run(run, Path(tmp) / "r", args.data, score_terms=terms, score_norm=norm, fdist_features=feats)
                table.setdefault(label, []).append(float(out.val_auc))
                print(f"{run} {label}: {out.val_auc:.4f}", flush=True)
    lines = [f"| score (validation AUC, {len(args.runs)} runs) | mean ± std | per run |", "|---|---|---|"]
    for label, vals in table.items():
        lines.append(f"| {label} | {np.mean(vals):.3f} ± {np.std(vals):.3f} | {' / '.join(f'{v:.3f}' for v in vals)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
