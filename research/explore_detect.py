"""Exploration for issue 14 (validation only): learn "not normal" from synthetic lesions on real normal films.

    python research/explore_detect.py --data csv:../shared/data/nih-pneumonia-128/manifest.csv --size 64 --steps 1500

A segmentation U-Net (optionally fed a restoring U-Net's output as well, DRAEM's recipe) is trained to find the
synthetic lesions of `data/synthetic.py` on training normals; every `--eval-every` steps it prints validation AUC of
candidate scores pooled from the predicted mask and of a Mahalanobis distance of its pooled bottleneck features.
Never loads the test split.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.data.synthetic import Lesions, jitter, lung_masks
from cxr_oneclass.metrics import auc
from cxr_oneclass.training.detector import focal_loss


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, cin, cout, width=16, depth=4):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([block(cin, chans[0])] + [block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([block(2 * chans[i], chans[i]) for i in range(depth)])
        self.head = nn.Conv2d(chans[0], cout, 1)

    def forward(self, x):
        skips = []
        for i, d in enumerate(self.down):
            x = d(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        bottleneck = x
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.head(x), bottleneck, skips


@torch.no_grad()
def evaluate(seg, rest, train, val, lungs_val, bs=128):
    seg.eval()
    if rest is not None:
        rest.eval()

    def run(images):
        maps, feats, recs = [], [], []
        for s in range(0, len(images), bs):
            x = torch.from_numpy(images[s : s + bs]).float().div(255).unsqueeze(1)
            inp = x
            if rest is not None:
                xr = torch.sigmoid(rest(x * 2 - 1)[0])
                recs.append((x - xr).abs().mean((1, 2, 3)))
                inp = torch.cat([x, xr], 1)
            logit, bott, skips = seg(inp * 2 - 1)
            maps.append(torch.sigmoid(logit[:, 0]))
            feats.append(torch.cat([f.mean((2, 3)) for f in skips[2:]], 1))
        return torch.cat(maps), torch.cat(feats).numpy(), (torch.cat(recs).numpy() if recs else None)

    m_val, f_val, r_val = run(val.images)
    _, f_tr, _ = run(train.images[:512])
    y = val.labels
    n = m_val[0].numel()
    flat = m_val.flatten(1)
    out = {}
    for pct in (0.5, 2, 10):
        k = max(1, int(n * pct / 100))
        out[f"top{pct}"] = flat.topk(k, 1).values.mean(1).numpy()
    out["mean"] = flat.mean(1).numpy()
    lw = torch.from_numpy(lungs_val).flatten(1)
    out["lung_mean"] = ((flat * lw).sum(1) / lw.sum(1)).numpy()
    lw_ = LedoitWolf().fit(f_tr)
    out["maha"] = lw_.mahalanobis(f_val)
    if r_val is not None:
        out["rest_l1"] = r_val
    seg.train()
    if rest is not None:
        rest.train()
    return {k: round(float(auc(y, v)), 4) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--restore", action="store_true")
    ap.add_argument("--no-aug", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--mix", default="")
    ap.add_argument("--p-abnormal", type=float, default=0.5)
    ap.add_argument("--out", default="")
    ap.add_argument("--ema", type=float, default=0.0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    ds = load_dataset(a.data, a.size, splits=("train", "val"))
    train, val = ds["train"], ds["val"]
    lungs = torch.from_numpy(lung_masks(train.images)).unsqueeze(1)
    from cxr_oneclass.data.synthetic import population_lung_mask
    pop = population_lung_mask(train.images)
    lungs_val = lung_masks(val.images, pop)
    mix = json.loads(a.mix) if a.mix else None
    les = Lesions(mix=mix, gen=gen)
    les.spec.p_abnormal = a.p_abnormal
    seg = UNet(2 if a.restore else 1, 1, a.width)
    rest = UNet(1, 1, a.width) if a.restore else None
    params = list(seg.parameters()) + (list(rest.parameters()) if rest else [])
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema_seg = AveragedModel(seg, multi_avg_fn=get_ema_multi_avg_fn(a.ema), use_buffers=True) if a.ema else None
    ema_rest = (AveragedModel(rest, multi_avg_fn=get_ema_multi_avg_fn(a.ema), use_buffers=True)
                if a.ema and rest is not None else None)
    imgs = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    t0, hist = time.time(), []
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(imgs), (a.bs,), generator=gen)
        x, lg = imgs[idx], lungs[idx]
        if not a.no_aug:
            x, lg = jitter(x, lg, gen)
        xa, mask, _ = les(x, lg)
        loss = 0.0
        inp = xa
        if rest is not None:
            xr = torch.sigmoid(rest(xa * 2 - 1)[0])
            loss = loss + (xr - x).abs().mean() * 5
            inp = torch.cat([xa, xr], 1)
        logit = seg(inp * 2 - 1)[0]
        loss = loss + focal_loss(logit, mask) * 10
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema_seg is not None:
            ema_seg.update_parameters(seg)
            if ema_rest is not None:
                ema_rest.update_parameters(rest)
        if step % a.eval_every == 0 or step == a.steps:
            r = evaluate(seg, rest, train, val, lungs_val)
            if ema_seg is not None:
                r.update({"ema_" + k: v for k, v in evaluate(ema_seg.module, ema_rest.module if ema_rest else None,
                                                             train, val, lungs_val).items()})
            r.update(step=step, loss=round(float(loss.detach()), 4), sec=round(time.time() - t0, 1))
            hist.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        json.dump({"args": vars(a), "history": hist}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
