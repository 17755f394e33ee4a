"""Issue 14: where on the film does S's signal sit? Validation AUC of S's lesion map pooled in different ways: the
mean over the film (the seg term), inside / outside each film's coarse lung mask, inside the population's lung
mask, the top 1% / 10% of pixels and the maximum. Validation only.

    python research/pool_seg.py runs/x14i/nih-det16-s0 runs/x14i/kermany-det16-s0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.synthetic import lung_masks, population_lung_mask
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import DataProvenance, load_run
from cxr_oneclass.runtime import to_model_range


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    for run in a.runs:
        model, _, doc = load_run(run)
        prov = DataProvenance.from_doc(doc, run)
        ds = load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("train", "val"))
        val = ds["val"]
        pop = population_lung_mask(ds["train"].images)
        own = torch.from_numpy(lung_masks(val.images, pop))  # (N, H, W)
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(val.images)))
        p = torch.sigmoid(model.det.eval()(x))[:, 0]  # (N, H, W) lesion probability
        flat = p.flatten(1)
        n = flat.shape[1]
        pooled = {
            "mean": flat.mean(1),
            "in lungs": (p * own).sum((1, 2)) / own.sum((1, 2)),
            "outside lungs": (p * (1 - own)).sum((1, 2)) / (1 - own).sum((1, 2)),
            "population lungs": (p * torch.from_numpy(pop)).sum((1, 2)) / float(pop.sum()),
            "top 1%": flat.topk(max(1, n // 100), 1).values.mean(1),
            "top 10%": flat.topk(n // 10, 1).values.mean(1),
            "max": flat.max(1).values,
        }
        print(run, " | ".join(f"{k} {auc(val.labels, v.double().numpy()):.3f}" for k, v in pooled.items()))


if __name__ == "__main__":
    main()
