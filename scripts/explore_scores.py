"""Exploration (validation only): train one config, print validation AUC of candidate score components.

    python scripts/explore_scores.py --data SPEC --out runs/explore/NAME [--skips 0] [--epochs 10] ...

Candidate components beyond the paper's rec/adv/enc: residuals after average pooling (less detector noise, more
structure), U-encoder-vs-E feature distance, D feature distance. Never looks at the test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr_oneclass.config import resolve
from cxr_oneclass.data.sources import load_dataset
from cxr_oneclass.evaluate import auc
from cxr_oneclass.runtime import to_model_range
from cxr_oneclass.workflow import train_run


@torch.no_grad()
def components(model, images: np.ndarray, bs: int = 64) -> dict[str, np.ndarray]:
    model.eval()
    out: dict[str, list] = {}
    for s in range(0, len(images), bs):
        x = to_model_range(torch.from_numpy(images[s : s + bs]))
        x_rec, z, fu = model.U(x)
        r = (x - x_rec).abs()
        c = {"rec": r.mean((1, 2, 3)), "rec_l2": r.pow(2).mean((1, 2, 3))}
        for k in (2, 4, 8):
            c[f"pool{k}"] = (F.avg_pool2d(x, k) - F.avg_pool2d(x_rec, k)).abs().mean((1, 2, 3))
        c["rec_max8"] = F.avg_pool2d(r, 8).flatten(1).max(1).values
        c["rec_top10"] = r.flatten(1).topk(r[0].numel() // 10, dim=1).values.mean(1)
        if model.E is not None:
            z2, fe = model.E(x_rec)
            c["enc"] = (z - z2).pow(2).mean(1)
            c["feat"] = sum((a - b).pow(2).mean((1, 2, 3)) for a, b in zip(fu, fe))
        if model.D is not None:
            lf, dfe = model.D(x_rec)
            _, dfr = model.D(x)
            c["adv"] = 1 - torch.sigmoid(lf)
            c["dfeat"] = (dfr[-1] - dfe[-1]).pow(2).mean((1, 2, 3))
            c["dfeat_all"] = sum((a - b).pow(2).mean((1, 2, 3)) for a, b in zip(dfr, dfe))
        for k, v in c.items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = p.parse_args()
    over = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        over[k] = type(getattr(resolve(args.preset), k))(v)
    cfg = resolve(args.preset, **over)
    ds = load_dataset(args.data, cfg.image_size, cfg.seed, splits=("train", "val"))
    outcome = train_run(cfg, ds, args.out, progress=False)
    val = ds["val"]
    comps = components(outcome.model, val.images)
    res = {k: round(auc(val.labels, v), 4) for k, v in comps.items()}
    if "kind" in val.meta:
        kinds = np.array(val.meta["kind"])
        for kind in sorted(set(kinds) - {"normal"}):
            sel = (kinds == "normal") | (kinds == kind)
            res[f"pool4@{kind}"] = round(auc(val.labels[sel], comps["pool4"][sel]), 3)
    line = {"out": args.out, "set": args.set, "seconds": round(outcome.seconds), "val_auc_paper_score": outcome.val_auc, **res}
    print(json.dumps(line))
    with open(Path(args.out).parent / "explore.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
