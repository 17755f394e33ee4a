"""Exploration for the `best` preset (validation only): train a config, print validation AUC of candidate scores.

    python research/explore_best.py --data SPEC --out runs/explore2/NAME --set width=32 epochs=20 ...
    python research/explore_best.py --data SPEC --out runs/explore2/NAME --rescore   # reuse a trained model

Candidates: the paper's rec/adv/enc, pooled/gradient/SSIM residuals, the paper's L_F feature distance between U's
encoder on x and E on x', Mahalanobis distances of pooled encoder / discriminator features and of the latent
fitted on training normals, and two-sided (|z|) versions standardised on validation normals. Never loads the
test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from cxr_oneclass.config import resolve
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.jobs.train import train_run
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import load_run
from cxr_oneclass.runtime import to_model_range
from cxr_oneclass.scoring.terms import ssim_map


def _grad(x: torch.Tensor) -> torch.Tensor:
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return torch.cat([gx[..., :-1, :].flatten(1), gy[..., :, :-1].flatten(1)], 1)


@torch.no_grad()
def features(model, images: np.ndarray, bs: int = 64) -> dict[str, np.ndarray]:
    """Per-image scalar components and per-image feature vectors (keys starting 'vec_')."""
    model.eval()
    out: dict[str, list] = {}
    for s in range(0, len(images), bs):
        x = to_model_range(torch.from_numpy(images[s : s + bs]))
        x_rec, z, fu = model.U(x)
        r = (x - x_rec).abs()
        c = {"rec": r.mean((1, 2, 3)), "rec_l2": r.pow(2).mean((1, 2, 3))}
        for k in (4, 8):
            c[f"pool{k}"] = (F.avg_pool2d(x, k) - F.avg_pool2d(x_rec, k)).abs().mean((1, 2, 3))
        smap = 1 - ssim_map(x, x_rec)
        c["ssim"] = smap.mean((1, 2, 3))
        c["ssim_top"] = smap.flatten(1).topk(smap[0].numel() // 50, dim=1).values.mean(1)
        r4 = F.avg_pool2d(r, 4).flatten(1)
        c["rec4_top"] = r4.topk(max(1, r4.shape[1] // 50), dim=1).values.mean(1)
        c["grad"] = (_grad(x) - _grad(x_rec)).abs().mean(1)
        c["sharp_in"] = _grad(x).abs().mean(1)  # reference only: how crisp the input is
        c["sharp_ratio"] = _grad(x_rec).abs().mean(1) / _grad(x).abs().mean(1).clamp_min(1e-6)
        c["vec_z"] = z
        c["vec_u"] = torch.cat([f.mean((2, 3)) for f in fu[1:]], 1)
        c["vec_ustd"] = torch.cat([f.std((2, 3)) for f in fu[1:]], 1)
        c["vec_pix8"] = F.avg_pool2d(x, 8).flatten(1)  # reference only: raw-pixel Gaussian
        if model.E is not None:
            z2, fe = model.E(x_rec)
            c["enc"] = (z - z2).pow(2).mean(1)
            c["feat"] = sum((a - b).pow(2).mean((1, 2, 3)) for a, b in zip(fu, fe))
            c["vec_z2"] = z2
            c["vec_zz2"] = torch.cat([z, z2], 1)
            c["vec_uz2"] = torch.cat([z2] + [f.mean((2, 3)) for f in fu[1:]], 1)
        if model.D is not None:
            lf, dfe = model.D(x_rec)
            lr, dfr = model.D(x)
            c["adv"] = 1 - torch.sigmoid(lf)
            c["d_real"] = -lr  # D's "not a real normal CXR" on the input itself
            c["dfeat"] = sum((a - b).pow(2).mean((1, 2, 3)) for a, b in zip(dfr, dfe))
            c["vec_d"] = torch.cat([f.mean((2, 3)) for f in dfr[1:]], 1)
        for k, v in c.items():
            out.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def mahalanobis(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    lw = LedoitWolf().fit(train)
    return lw.mahalanobis(query)


def knn(train: np.ndarray, query: np.ndarray, k: int = 5) -> np.ndarray:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = (train - mu) / sd, (query - mu) / sd
    d = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return np.sort(d, 1)[:, :k].mean(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--rescore", action="store_true", help="load the trained run in --out instead of training")
    p.add_argument("--fit-max", type=int, default=600, help="training normals used to fit feature Gaussians")
    args = p.parse_args()
    if args.rescore:
        model, _, doc = load_run(args.out)
        cfg = model.cfg
        seconds = doc.get("train_seconds")
        ds = load_dataset(args.data, cfg.image_size, cfg.seed, splits=("train", "val"))
        val_auc_paper = doc.get("val_auc")
    else:
        over = {}
        for kv in args.set:
            k, v = kv.split("=", 1)
            over[k] = type(getattr(resolve(args.preset), k))(v)
        cfg = resolve(args.preset, **over)
        ds = load_dataset(args.data, cfg.image_size, cfg.seed, splits=("train", "val"))
        outcome = train_run(cfg, ds, args.out, progress=False)
        model, seconds, val_auc_paper = outcome.model, round(outcome.seconds), outcome.val_auc
    torch.set_num_threads(max(1, cfg.num_threads or torch.get_num_threads()))
    tr, val = ds["train"], ds["val"]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(tr))[: args.fit_max]
    ftr = features(model, tr.images[idx])
    fva = features(model, val.images)
    y = val.labels
    res: dict[str, float] = {}
    scal: dict[str, np.ndarray] = {}
    for k, v in fva.items():
        if k.startswith("vec_"):
            scal[f"maha_{k[4:]}"] = mahalanobis(ftr[k], v)
            if v.shape[1] <= 512:
                scal[f"knn_{k[4:]}"] = knn(ftr[k], v)
        else:
            scal[k] = v
    normal = y == 0
    for k, v in scal.items():
        res[k] = round(auc(y, v), 4)
        z = (v - v[normal].mean()) / (v[normal].std() + 1e-12)
        res[f"|{k}|"] = round(auc(y, np.abs(z)), 4)
    # a few standardised sums (weights 1 on validation-normal z-scores)
    def zs(k: str) -> np.ndarray:
        v = scal[k]
        return (v - v[normal].mean()) / (v[normal].std() + 1e-12)
    combos = [("rec", "enc", "adv"), ("rec", "enc"), ("maha_u", "maha_z"), ("maha_u", "enc"), ("maha_u", "ssim"),
              ("maha_u", "maha_d"), ("maha_u", "maha_ustd"), ("maha_u", "maha_ustd", "maha_d"),
              ("maha_z2", "ssim"), ("maha_z", "maha_z2"), ("maha_z2", "maha_u"), ("maha_z2", "rec"), ("maha_z2", "enc"),
              ("maha_z2", "adv"), ("maha_z2", "ssim", "maha_u"), ("maha_z", "ssim")]
    for combo in combos:
        if all(c in scal for c in combo):
            res["+".join(combo)] = round(auc(y, sum(zs(c) for c in combo)), 4)
    line = {"out": args.out, "set": args.set, "seconds": seconds, "val_auc_paper_score": val_auc_paper, **res}
    print(json.dumps(line))
    top = sorted(((v, k) for k, v in res.items()), reverse=True)[:15]
    print("top:", ", ".join(f"{k} {v:.3f}" for v, k in top))
    with open(Path(args.out).parent / "explore.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
