"""Issue 14 ablation from trained runs' own validation tables (no test split): per run, the validation AUC of the
score `auto` would choose without the detector (today's `best`), of the detector alone (seg), and of `auto` with
it; then mean ± std over seeds per data set.

    python research/summarise_detect.py runs/x14i/*-s[0-9]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def row(run: Path) -> dict:
    doc = json.loads((run / "config.json").read_text())
    table = doc["score_selection"]["val_auc_by_terms"]
    without = {k: v for k, v in table.items() if "seg" not in k.split("+")}
    best_without = max(without, key=lambda k: (round(without[k], 4), -k.count("+")))
    return {
        "run": run.name,
        "data": Path(doc["data"].split(":", 1)[1]).parent.name,
        "best (no seg)": without[best_without],
        "best terms": best_without,
        "seg alone": table.get("seg"),
        "auto with seg": table[doc["score_selection"]["chosen"]],
        "chosen": doc["score_selection"]["chosen"],
        "seconds": doc.get("train_seconds", 0) + doc.get("detector_seconds", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args()
    rows = [row(r) for r in a.runs if (r / "config.json").exists()]
    print("| run | data | best without seg (terms) | seg alone | auto with seg (chosen) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['data']} | {r['best (no seg)']:.3f} ({r['best terms']}) | {r['seg alone']:.3f} | "
              f"{r['auto with seg']:.3f} ({r['chosen']}) |")
    by = defaultdict(list)
    for r in rows:
        by[r["data"]].append(r)
    print("\n| data | seeds | best without seg | seg alone | auto with seg |")
    print("|---|---|---|---|---|")
    for data, rs in by.items():
        cells = []
        for key in ("best (no seg)", "seg alone", "auto with seg"):
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}")
        print(f"| {data} | {len(rs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
