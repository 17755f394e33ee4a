"""Exploration of local (per-position) feature scores for a trained run, validation only.

    python research/explore_local.py --run runs/demo/run --data SPEC [--fit-max 1000]

For each encoder level of U (on x) and of E (on x'), fits on training normals: a per-position diagonal Gaussian
(score = max or top-k mean over positions of the summed squared z-scores), a per-position Gaussian with a shared
Ledoit-Wolf channel covariance, and a global Gaussian on the map average-pooled to 4x4. Prints validation AUC
overall and per `kind` when the set has one. Never loads the test split.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import load_run
from cxr_oneclass.runtime import to_model_range
from cxr_oneclass.scoring.terms import ssim_map


@torch.no_grad()
def maps(model, images: np.ndarray, bs: int = 64) -> dict[str, np.ndarray]:
    model.eval()
    out: dict[str, list] = {}
    for s in range(0, len(images), bs):
        x = to_model_range(torch.from_numpy(images[s : s + bs]))
        x_rec, z, fu = model.U(x)
        c = {f"u{i}": f for i, f in enumerate(fu)}
        c["pix"] = x
        c["res"] = (x - x_rec).abs()
        c["ssim"] = (1 - ssim_map(x, x_rec)).mean((1, 2, 3))
        if model.E is not None:
            _, fe = model.E(x_rec)
            for i, f in enumerate(fe):
                c[f"e{i}"] = f
                c[f"ue{i}"] = fu[i] - f  # what E sees differently in x' than U sees in x
            c["ez"] = model.E(x_rec)[0]
        for k, v in c.items():
            out.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def pool_to(a: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(a)
    if t.shape[-1] > side:
        t = F.adaptive_avg_pool2d(t, side)
    return t.numpy()


def diag_local(tr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> per-position summed squared z-scores (N, H, W)."""
    mu, sd = tr.mean(0), tr.std(0) + 1e-3 * tr.std() + 1e-8
    return (((q - mu) / sd) ** 2).mean(1)


def shared_cov_local(tr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-position mean, one channel covariance (Ledoit-Wolf) over all positions of the centred features."""
    n, c, h, w = tr.shape
    mu = tr.mean(0)
    xt = (tr - mu).transpose(0, 2, 3, 1).reshape(-1, c)
    if xt.shape[0] > 20000:
        xt = xt[np.random.default_rng(0).permutation(xt.shape[0])[:20000]]
    prec = LedoitWolf(assume_centered=True).fit(xt).precision_
    d = (q - mu).transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.einsum("nhwc,cd,nhwd->nhw", d, prec, d) / c


def knn_local(tr: np.ndarray, q: np.ndarray, bank: int = 16384, ctx: int = 3) -> np.ndarray:
    """PatchCore-like: distance of each query patch to its nearest training-normal patch from any position."""
    def prep(a):
        t = torch.from_numpy(a)
        if ctx > 1:
            t = F.avg_pool2d(t, ctx, 1, ctx // 2)  # local context, as PatchCore's neighbourhood aggregation
        return t
    t, u = prep(tr), prep(q)
    c = t.shape[1]
    mu = t.mean((0, 2, 3), keepdim=True)
    sd = t.std((0, 2, 3), keepdim=True) + 1e-6
    t, u = (t - mu) / sd, (u - mu) / sd
    pt = t.permute(0, 2, 3, 1).reshape(-1, c)
    pt = pt[torch.randperm(pt.shape[0], generator=torch.Generator().manual_seed(0))[:bank]]
    n, _, h, w = u.shape
    pu = u.permute(0, 2, 3, 1).reshape(-1, c)
    out = torch.cat([torch.cdist(b, pt).min(1).values for b in pu.split(8192)])
    return (out.reshape(n, h, w) ** 2 / c).numpy()


def global_gauss(tr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """One Ledoit-Wolf Gaussian on the whole flattened (pooled) map; returned as (N, 1, 1)."""
    a, b = tr.reshape(len(tr), -1), q.reshape(len(q), -1)
    return LedoitWolf().fit(a).mahalanobis(b).reshape(-1, 1, 1) / a.shape[1]


def pca_global(tr: np.ndarray, q: np.ndarray, k: int = 4) -> np.ndarray:
    """Channels projected on their top-k principal directions (fitted on training normals), then one global Gaussian."""
    c = tr.shape[1]
    xt = tr.transpose(0, 2, 3, 1).reshape(-1, c)
    mu = xt.mean(0)
    _, _, vt = np.linalg.svd(xt[:: max(1, len(xt) // 20000)] - mu, full_matrices=False)
    w = vt[:k].T  # (C, k)
    def proj(a):
        return np.einsum("nchw,ck->nkhw", a - mu[None, :, None, None], w)
    return global_gauss(proj(tr), proj(q))


def reducers(m: np.ndarray) -> dict[str, np.ndarray]:
    f = m.reshape(len(m), -1)
    k = max(1, f.shape[1] // 32)
    return {"max": f.max(1), "top": np.sort(f, 1)[:, -k:].mean(1), "mean": f.mean(1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--fit-max", type=int, default=1000)
    p.add_argument("--levels", default="u0,u1,u2,e0,e1,e2,ue0,ue1,ue2,pix,res")
    p.add_argument("--methods", default="diag,shared,knn")
    args = p.parse_args()
    model, _, _ = load_run(args.run)
    ds = load_dataset(args.data, model.cfg.image_size, model.cfg.seed, splits=("train", "val"))
    tr, val = ds["train"], ds["val"]
    idx = np.random.default_rng(0).permutation(len(tr))[: args.fit_max]
    mtr, mva = maps(model, tr.images[idx]), maps(model, val.images)
    y = val.labels
    kinds = np.array(val.meta["kind"]) if "kind" in val.meta else None
    res = {}

    def std(v):
        n = v[y == 0]
        med = np.median(n)
        iqr = np.subtract(*np.percentile(n, [75, 25])) / 1.349
        return (v - med) / (iqr + 1e-12)

    def report(key, s):
        row = {"all": auc(y, s)}
        if kinds is not None:
            for k in sorted(set(kinds) - {"normal"}):
                sel = (kinds == "normal") | (kinds == k)
                row[k[:5]] = auc(y[sel], s[sel])
        res[key] = row
        print(key, " ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)

    base = std(mva["ssim"])
    fd = None
    if "ez" in mtr:
        fd = std(LedoitWolf().fit(mtr["ez"]).mahalanobis(mva["ez"]))
        report("fdist_ez", fd)
        base = base + fd
    report("best(ssim+fdist_ez)", base)
    for lv in args.levels.split(","):
        if lv not in mtr:
            continue
        a, b = mtr[lv], mva[lv]
        for side in (32, 16, 8, 4):
            if a.shape[-1] < side:
                continue
            pa, pb = pool_to(a, side), pool_to(b, side)
            for name, fn in (("diag", diag_local), ("shared", shared_cov_local), ("knn", knn_local), ("global", global_gauss), ("pca4", pca_global)):
                if name not in args.methods.split(","):
                    continue
                if (name == "shared" and pa.shape[1] > 512) or (name != "knn" and side == 32) or (name == "knn" and side < 8) or (name == "global" and pa[0].size > 4096) or (name == "pca4" and (side < 8 or pa.shape[1] < 8)):
                    continue
                for red, s in reducers(fn(pa, pb)).items():
                    key = f"{lv}/{side}/{name}/{red}"
                    report(key, s)
                    report("best+" + key, base + std(s))
                    if fd is not None and red == "max":
                        report("fdist+" + key, fd + std(s))
    top = sorted(res.items(), key=lambda kv: -kv[1]["all"])[:15]
    print("top:", json.dumps({k: round(v["all"], 3) for k, v in top}))


if __name__ == "__main__":
    main()
