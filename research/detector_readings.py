"""Issue 14, steadying S: which of S's readings should score? Validation only; the test split is never loaded.

Retrains S of a trained `detect` run exactly as `train` would (same seed, same initial weights, the run's GAN kept),
keeps the averaged weights of every reading, and compares ways to turn them into one S:

- `pick`:  `train`'s rule, the reading with the best validation AUC of seg (optimistic when read on the same split),
           on the films as they are or, with --set detector_pick=shifted, on average over simulated shifts of them;
- `last`:  the last reading;
- `avgK`:  the mean of the weights of the last K readings (stochastic weight averaging over the readings);

each by the validation AUC of seg alone, by the cross-fitted AUC (choose on one half of validation, read on the
other, both ways: what a pick is worth on films it did not see), and by the full `detect` score (auto over
ssim, fdist, seg, sdist). The readings are saved (`--out DIR/<run>.safetensors`) so that runs can be built from them
without retraining (`--write-runs`).

    python research/detector_readings.py runs/x14i/nih-det16-s0 --out runs/x14r

Ablations of the synthetic lesions (`--mix opacity=3,diffuse=2,...`: the kinds drawn and their weights, see
data/synthetic.DEFAULT_MIX; `--anywhere`: lesions placed anywhere on the film instead of in the lung fields, config
lung_floor 1; `--lung-floor`, `--lung-keep`: config lung_floor / lung_keep) retrain S the same way with that change;
`--tag` names their outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxr_oneclass.config import Config
from cxr_oneclass.data import synthetic
from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.metrics import auc
from cxr_oneclass.runs import DataProvenance, load_run, save_run
from cxr_oneclass.runtime import pick_device, seed_everything
from cxr_oneclass.scoring.selection import fit_score_and_calibration
from cxr_oneclass.scoring.stats import build_scoring_model
from cxr_oneclass.training import detector
from cxr_oneclass.training.detector import fit_detector, lesion_score, pick_films, reading_aucs

STRATEGIES = ("pick", "last", "avg2", "avg3", "avg4", "avg5")


def halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two stratified halves of validation (alternate films of each class, in manifest order)."""
    a = np.zeros(len(labels), bool)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        a[idx[::2]] = True
    return a, ~a


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k in states[0]:
        if states[0][k].is_floating_point():
            out[k] = torch.stack([s[k] for s in states]).mean(0)
        else:  # batch norm's step counter
            out[k] = states[-1][k].clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--write-runs", default="", help="comma-separated strategies to write as runs: OUT/<run>-<strategy>")
    ap.add_argument("--mix", default="", help="kind=weight,... : the lesion kinds drawn (default data/synthetic.DEFAULT_MIX)")
    ap.add_argument("--anywhere", action="store_true", help="lesions anywhere on the film, not only in the lung fields")
    ap.add_argument("--lung-floor", type=float, help="config lung_floor (default: the run's): lung masks raised to at least this "
                    "everywhere, a share of the lesions lands outside the lungs (0.25: about half of them on both shared sets at 64 px)")
    ap.add_argument("--lung-keep", type=float, help="config lung_keep (default: the run's): the darker share of each film's lung "
                    "region that counts as lung (1: all of it, opaque lung too)")
    ap.add_argument("--detector-steps", type=int, default=0, help="S's training steps (default: the run's)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: another config value of S (e.g. "
                    "detector_width=32, lesion_p=0.7, detector_ema=0.995); repeatable")
    ap.add_argument("--tag", default="", help="suffix of this ablation's output names")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="which to evaluate (and may write)")
    a = ap.parse_args()
    kinds = "all"
    if a.mix:
        mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
        if all(synthetic.DEFAULT_MIX.get(k) == w for k, w in mix.items()):  # a subset of the kinds: config lesion_kinds
            kinds = "+".join(k for k in synthetic.KINDS if k in mix)
        else:
            detector.lesion_mix = lambda kinds: mix
    placement = {k: v for k, v in (("lung_floor", 1.0 if a.anywhere else a.lung_floor), ("lung_keep", a.lung_keep),
                                   ("detector_steps", a.detector_steps or None)) if v is not None}
    for kv in a.set:  # any other config value of S's training, e.g. detector_width=32
        key, value = kv.split("=", 1)
        placement[key] = type(getattr(Config(), key))(value)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in a.runs:
        name = Path(run).name + (f"-{a.tag}" if a.tag else "")
        model, _, doc = load_run(run)
        device = pick_device(model.cfg.device)
        model.to(device)
        cfg = replace(model.cfg, score_terms="auto", lesion_kinds=kinds, **placement)
        prov = DataProvenance.from_doc(doc, run)
        ds = load_dataset(prov.spec, cfg.image_size, prov.split_seed, splits=("train", "val"))
        train, val = ds["train"], ds["val"]
        normals = train.images[train.labels == 0]
        saved = out / f"{name}.safetensors"
        if saved.exists():
            flat = load_file(saved)
            steps = sorted({int(k.split("/")[0]) for k in flat})
            readings = [(s, {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"{s}/")}) for s in steps]
        else:
            seed_everything(cfg.seed)
            det = build_scoring_model(cfg).det.to(device)  # the initial weights `train` draws for S
            readings = []
            keep = readings.append
            fit_detector(det, cfg, normals, val, progress=False,
                         on_reading=lambda step, ema, keep=keep: keep((step, copy.deepcopy(ema.state_dict()))))
            save_file({f"{s}/{k}": v.contiguous().cpu() for s, st in readings for k, v in st.items()}, str(saved))
        y = val.labels
        ha, hb = halves(y)
        det = build_scoring_model(cfg).det.to(device)  # S's shape under cfg (detector_width may differ from the run's)
        seg = []
        for _, st in readings:
            det.load_state_dict(st)
            seg.append(lesion_score(det, val.images, film_norm=cfg.film_norm))
        by_reading = [auc(y, s) for s in seg]
        merit = by_reading  # what `train` picks by under cfg.detector_pick: as below for "val", with shifts otherwise
        if cfg.detector_pick != "val":
            films = pick_films(val.images, cfg.detector_pick)
            merit = []
            for _, st in readings:
                det.load_state_dict(st)
                merit.append(float(np.mean(list(reading_aucs(det, y, films, cfg.film_norm).values()))))
        strategies = {"pick": readings[int(np.argmax(merit))][1], "last": readings[-1][1]}
        for k in (2, 3, 4, 5):
            strategies[f"avg{k}"] = average([st for _, st in readings[-k:]])
        strategies = {k: v for k, v in strategies.items() if k in a.strategies.split(",")}
        # cross-fitted pick: choose on one half, read on the other
        xfit = []
        for fit_h, read_h in ((ha, hb), (hb, ha)):
            i = int(np.argmax([auc(y[fit_h], s[fit_h]) for s in seg]))
            xfit.append(auc(y[read_h], seg[i][read_h]))
        rows = {"readings": [round(v, 4) for v in by_reading], "pick_crossfit": round(float(np.mean(xfit)), 4)}
        for sname, st in strategies.items():
            m = copy.deepcopy(model)
            m.cfg = cfg
            m.det = copy.deepcopy(det)
            m.det.load_state_dict(st)
            s = lesion_score(m.det, val.images, film_norm=cfg.film_norm)
            fitted = fit_score_and_calibration(m, train, val)
            rows[sname] = {"seg": round(auc(y, s), 4), "seg_halves": round(float(np.mean([auc(y[h], s[h]) for h in (ha, hb)])), 4),
                           "detect": round(fitted.val_auc, 4), "chosen": fitted.cfg.score_terms}
            if sname in a.write_runs.split(","):
                m.cfg = fitted.cfg
                target = out / f"{name}-{sname}"
                shutil.rmtree(target, ignore_errors=True)
                extra = {k: doc[k] for k in ("population", "data_summary", "train_seconds", "skipped_files") if k in doc}
                extra.update(val_auc=fitted.val_auc, score_selection=fitted.selection, detector_strategy=sname)
                save_run(target, m, fitted.calibration, extra, prov)
        print(name, json.dumps(rows))
        if all(k in rows for k in STRATEGIES):  # a partial evaluation (--strategies) leaves the summary as it was
            (out / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
