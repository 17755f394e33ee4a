"""The table of explore_inpaint.py (and explore_classifier.py) outputs: per candidate, the last reading's validation AUC
alone, the run's shipped score with the candidate available (`with_`), and the cross-fitted gain (`xfit_`), each as
mean ± std over the JSONs given, with the per-seed values.

    python research/summarise_inpaint.py runs/x14c15/inp-nih-s{0,1,2}.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    last = [json.load(open(f))["history"][-1] for f in a.files]
    names = [k[len("xfit_"):] for k in last[0] if k.startswith("xfit_")]

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"

    print("| candidate | alone | shipped with it | cross-fitted gain |")
    print("|---|---|---|---|")
    for n in names:
        shipped = cell([r["with_" + n][1] for r in last]) if "with_" + n in last[0] else "–"  # controls: none
        print(f"| {n} | {cell([r[n] for r in last])} | {shipped} | {cell([r['xfit_' + n] for r in last])} |")
    if all("by_view" in r and r["by_view"] for r in last):
        for view in last[0]["by_view"]:
            print(f"view {view}: " + ", ".join(f"{k} {np.mean([r['by_view'][view][k] for r in last]):.3f}"
                                             for k in last[0]["by_view"][view]))


if __name__ == "__main__":
    main()
