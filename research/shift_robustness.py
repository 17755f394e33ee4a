"""Issue 14: which score terms keep their ranking when every film comes from a different acquisition? Validation only.

A trained run's terms are standardised on its validation normals as shipped. Then every validation film, normal or
abnormal, is re-acquired the same way (another exposure curve, contrast, blur, noise, JPEG, a lower resolution, a
tighter or wider field), as a new site's films would be, and each term's and each `auto` candidate's AUC is read on
the shifted split. A term whose AUC holds under every shift is one a selection rule could trust on a new site; the
test pools of the shared sets are such new sites, but they must not be used to find out.

    python research/shift_robustness.py runs/x14i/nih-det16-s{0,1,2} --json runs/x14s/nih.json
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.runs import DataProvenance, load_run
from cxr_oneclass.scoring.inference import model_components, score_images
from cxr_oneclass.scoring.selection import select_score_terms
from cxr_oneclass.scoring.terms import AUTO_TERMS, TERM_INDEX


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Field of view: >1 crops the centre and scales it back up (tighter collimation), <1 pads with edge values."""
    h, w = img.shape
    im = Image.fromarray(img)
    if factor >= 1:
        ch, cw = round(h / factor), round(w / factor)
        t, left = (h - ch) // 2, (w - cw) // 2
        return np.asarray(im.crop((left, t, left + cw, t + ch)).resize((w, h), Image.Resampling.LANCZOS))
    small = np.asarray(im.resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS))
    pt, pl = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    return np.pad(small, ((pt, h - small.shape[0] - pt), (pl, w - small.shape[1] - pl)), mode="edge")


def _f(fn):
    """Apply a float [0, 1] transform to uint8 films (N, H, W)."""
    return lambda x: np.clip(np.rint(fn(x.astype(np.float32) / 255) * 255), 0, 255).astype(np.uint8)


SHIFTS = {
    "none": lambda x: x,
    "gamma0.7": _f(lambda v: v**0.7),
    "gamma1.4": _f(lambda v: v**1.4),
    "contrast0.75": _f(lambda v: (v - v.mean((1, 2), keepdims=True)) * 0.75 + v.mean((1, 2), keepdims=True)),
    "contrast1.25": _f(lambda v: (v - v.mean((1, 2), keepdims=True)) * 1.25 + v.mean((1, 2), keepdims=True)),
    "blur0.8": _f(lambda v: ndimage.gaussian_filter(v, (0, 0.8, 0.8))),
    "sharpen": _f(lambda v: v + 0.8 * (v - ndimage.gaussian_filter(v, (0, 1.0, 1.0)))),
    "noise0.02": _f(lambda v: v + np.random.default_rng(0).normal(0, 0.02, v.shape)),
    "jpeg30": lambda x: np.stack([_jpeg(i, 30) for i in x]),
    "lowres": lambda x: np.stack([np.asarray(Image.fromarray(i).resize((x.shape[2] * 5 // 8,) * 2, Image.Resampling.BILINEAR)
                                             .resize(x.shape[1:][::-1], Image.Resampling.BICUBIC)) for i in x]),
    "zoom1.1": lambda x: np.stack([_zoom(i, 1.1) for i in x]),
    "zoom0.9": lambda x: np.stack([_zoom(i, 0.9) for i in x]),
}


def run_and_val(run: str):
    """A trained run (model, its run document) and its own validation split, as it was decoded for training."""
    model, _, doc = load_run(run)
    prov = DataProvenance.from_doc(doc, run)
    return model, doc, load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("val",))["val"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    results = {}
    for run in a.runs:
        model, doc, val = run_and_val(run)
        y = val.labels
        stats = model.stats
        terms = [k for k in AUTO_TERMS if k in model_components(model)]
        per_shift = {}
        for name, fn in SHIFTS.items():
            comps = score_images(model, fn(val.images), model.cfg.batch_size)
            _, table = select_score_terms(comps, y, stats)  # every auto candidate's AUC, as `auto` standardises them
            row = {c: round(v, 4) for c, v in table.items()}
            z = {k: (comps[k] - float(stats.center[TERM_INDEX[k]])) / float(stats.scale[TERM_INDEX[k]]) for k in terms}
            # how far the normals move in the standardised units the threshold lives in (0: not at all)
            row["normals_median_shift"] = {k: round(float(np.median(z[k][y == 0])), 3) for k in terms}
            per_shift[name] = row
        results[Path(run).name] = {"chosen": doc["config"]["score_terms"], "shifts": per_shift}
        cands = [c for c in per_shift["none"] if c != "normals_median_shift"]
        worst = {c: min(per_shift[s][c] for s in SHIFTS) for c in cands}
        mean = {c: float(np.mean([per_shift[s][c] for s in SHIFTS])) for c in cands}
        print(Path(run).name, "chosen", doc["config"]["score_terms"],
              "| by val:", max(cands, key=lambda c: per_shift["none"][c]),
              "| by mean over shifts:", max(cands, key=mean.get), round(max(mean.values()), 4),
              "| by worst shift:", max(cands, key=worst.get), round(max(worst.values()), 4), flush=True)
        for k in terms:
            print(f"  {k:6s}", " ".join(f"{s}={per_shift[s][k]:.3f}" for s in SHIFTS), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
