"""Summarise research/detector_readings.py outputs: per set (and ablation tag), mean ± std over seeds of the validation
AUC of seg alone and of the full `detect` score for each way of turning S's readings into one S.

    python research/summarise_readings.py runs/x14r/*.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

STRATEGIES = ("pick", "last", "avg2", "avg3", "avg4", "avg5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for f in a.files:
        name = Path(f).stem
        key = re.sub(r"-s\d+", "", name)  # nih-det16-s0-anywhere -> nih-det16-anywhere
        groups[key].append(json.loads(Path(f).read_text()))

    def ms(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    print("| set | seeds | readings (mean over seeds) | seg: pick (same split) | pick cross-fitted | last | avg3 | avg5 |"
          " detect: pick | last | avg3 | avg5 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, rows in sorted(groups.items()):
        readings = np.mean([r["readings"] for r in rows], axis=0)
        seg = {s: [r[s]["seg"] for r in rows] for s in STRATEGIES}
        det = {s: [r[s]["detect"] for r in rows] for s in STRATEGIES}
        print(f"| {key} | {len(rows)} | {' '.join(f'{v:.2f}' for v in readings)} | {ms(seg['pick'])} | "
              f"{ms([r['pick_crossfit'] for r in rows])} | {ms(seg['last'])} | {ms(seg['avg3'])} | {ms(seg['avg5'])} | "
              f"{ms(det['pick'])} | {ms(det['last'])} | {ms(det['avg3'])} | {ms(det['avg5'])} |")


if __name__ == "__main__":
    main()
