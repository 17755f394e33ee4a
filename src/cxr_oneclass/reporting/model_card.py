"""MODEL_CARD.md: what a run is for, what it was trained on, how well it did on validation (with intervals), its
operating point and its limits. Written by `train`, `rescore` and `calibrate` into the run folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .._version import __version__
from ..data.types import ImageSet
from ..io_utils import write_text
from ..metrics import auc, bootstrap_ci, operating_point
from ..runs import DataProvenance, load_run, run_dataset
from ..scoring.inference import score_images
from ..scoring.population import SHIFT_LIMIT

MODEL_CARD = "MODEL_CARD.md"
SUBGROUP_MAX = 20  # metadata columns with 2..SUBGROUP_MAX values are shown as subgroups


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(pair: list[float] | None) -> str:
    return "" if not pair else f" (95% CI {pair[0]:.3f}-{pair[1]:.3f})"


def _subgroups(val: ImageSet, scores: np.ndarray, threshold: float) -> list[str]:
    lines = []
    for column, values in sorted(val.meta.items()):
        counts = Counter(values)
        if not 2 <= len(counts) <= SUBGROUP_MAX:
            continue
        lines += [f"\n**{column}** (validation)\n", "| group | normal | abnormal | AUC | sensitivity | specificity |", "|---|---|---|---|---|---|"]
        for group in sorted(counts):
            sel = np.array([v == group for v in values])
            labels = val.labels[sel]
            op = operating_point(labels, scores[sel], threshold)
            lines.append(f"| {group or '(empty)'} | {int((labels == 0).sum())} | {int((labels == 1).sum())} | "
                         f"{_fmt(auc(labels, scores[sel]))} | {_fmt(op['sensitivity'])} | {_fmt(op['specificity'])} |")
    return lines


def model_card(run_dir: str | Path, val: ImageSet | None = None) -> str:
    """The card's Markdown. `val` is the run's validation split (loaded from its recorded data when None)."""
    run_dir = Path(run_dir)
    model, cal, doc = load_run(run_dir)
    cfg = model.cfg
    prov = DataProvenance.from_doc(doc, run_dir)
    if val is None and prov is not None:
        try:
            val = run_dataset(run_dir, doc, cfg.image_size, ("val",)).splits.get("val")
        except Exception:  # noqa: BLE001 - data moved away: the card says so instead of failing
            val = None
    lines = [
        f"# Model card: {run_dir.resolve().name}",
        "",
        "**For research use only. Not for diagnostic use.** A one-class anomaly detector (Tang et al., ISBI 2019, with "
        "this project's score): it learned what the training population's normal frontal chest X-rays look like and "
        "scores how far a film departs from that. It is meant to sort a worklist (clear confident normals, surface "
        "the rest for a radiologist), never to clear a film without a reader's oversight.",
        "",
        "## Model",
        f"- cxr-oneclass {doc.get('version', __version__)} (card written by {__version__}); variant `{cfg.variant}`, "
        f"{cfg.image_size} px, width {cfg.width}, {cfg.epochs} epochs, seed {cfg.seed}",
        f"- score: `{cfg.score_terms}` ({cfg.score_norm})" + (f", chosen on validation from `{doc['score_selection']['requested']}`"
                                                              if doc.get("score_selection") else ""),
        *([(f"- {cfg.detectors} lesion detectors S, their lesion probabilities averaged, each" if cfg.detectors > 1 else "- lesion detector S:")
           + f" width {cfg.detector_width}, {cfg.detector_steps} steps on synthetic lesions drawn "
           f"onto {int(cfg.lesion_p * 100)}% of the training normals, in the lung fields"
           + (f" and, fainter, outside them (lung floor {cfg.lung_floor:g})" if cfg.lung_floor > 0 else "")
           + " (never on real abnormal films)"
           + (f"; {int(cfg.acquisition_p * 100)}% of its training films imaged again after the lesions were drawn "
              "(blur, sharpening, a lower resolution, noise)" if cfg.acquisition_p > 0 else "")
           + (f"; {int(cfg.lut_p * 100)}% shown through a random display curve" if cfg.lut_p > 0 else "")
           + (f"; its films moved {cfg.detector_jitter:g}x as far as the default (shift, zoom, rotation"
              + (", aspect ratio)" if cfg.detector_jitter > 1 else ")") if cfg.detector_jitter != 1 else "")
           + ("; its reading kept by validation AUC on average over simulated acquisition shifts"
              if cfg.detector_pick == "shifted" else "")]
          if cfg.uses_s else []),
        *([f"- {int(cfg.gan_acquisition_p * 100)}% of the GAN's training films imaged again in each batch (blur, "
           "sharpening, a lower resolution, noise)"] if cfg.gan_acquisition_p > 0 else []),
        *(["- every film histogram-equalised within itself before any network sees it, in training and scoring "
           "(blind to another site's display curve; the reconstructions and heat maps are of the equalised film)"]
          if cfg.film_norm == "equalise" else []),
        f"- weights sha256 `{doc.get('weights_sha256', 'not recorded')}`",
        "",
        "## Training data",
        f"- data: `{prov.spec if prov else 'not recorded'}`, split seed {prov.split_seed if prov else '–'}",
        f"- {doc.get('data_summary', 'no summary recorded')}",
        f"- training uses normal images only; {len(doc.get('skipped_files') or [])} unreadable files were skipped",
    ]
    if val is not None and "view" in val.meta:
        lines.append(f"- views in validation: {dict(Counter(val.meta['view']))}")
    lines += ["", "## Operating point"]
    if cal is not None:
        lines.append(f"- threshold {cal.threshold:.4f} on the calibrated scale ({cal.rule}); an image at or above it is flagged "
                     "abnormal; a film that could not be scored is flagged `error`, never normal")
        lines.append("- scores: 0 and 1 are the lowest and highest validation scores; `normal_percentile` is the share of "
                     "validation normals scoring lower")
        lines += [f"- warning: {w}" for w in cal.warnings]
        if doc.get("calibrated"):
            c = doc["calibrated"]
            lines.append(f"- recalibrated on `{c.get('data')}` ({c.get('split')}, {c.get('n_normal')} normal + {c.get('n_abnormal')} abnormal)")
    lines += ["", "## Validation results"]
    if val is not None and cal is not None and len(val):
        scores = cal.normalise(score_images(model, val.images, cfg.batch_size)["score"])
        op = operating_point(val.labels, scores, cal.threshold)
        ci = bootstrap_ci(val.labels, scores, cal.threshold)
        lines += [
            f"{val.n_normal} normal + {val.n_abnormal} abnormal validation images (used to choose the score and set the "
            "threshold, so these figures are optimistic; the test split is reported by `evaluate`).",
            "",
            f"- AUC {_fmt(auc(val.labels, scores))}{_ci(ci['auc'])}",
            f"- at the threshold: sensitivity {_fmt(op['sensitivity'])}{_ci(ci['sensitivity'])}, specificity "
            f"{_fmt(op['specificity'])}{_ci(ci['specificity'])}, normals auto-cleared {_fmt(op['normals_cleared'])}",
        ]
        lines += _subgroups(val, scores, cal.threshold)
    else:
        lines.append("Not available (no validation split with both classes, or its data could not be loaded).")
    pop = doc.get("population")
    lines += [
        "",
        "## Limits",
        "- Trained on one source's normal films: other hospitals, scanners, age groups (children) or views may score "
        "high for that reason alone. `score` checks every batch against the training population"
        + (f" (warning above a shift of {SHIFT_LIMIT}; per image, beyond the 99th percentile of {pop['reference']})" if pop else
           " (not for this run: trained before the check existed)") + ".",
        "- Frontal (PA/AP) radiographs only; laterals and other views are skipped by `score`, other modalities refused.",
        "- A departure from normal is not a diagnosis: the score does not say which finding, and small or subtle findings "
        "score lower than large ones.",
        "- The threshold was set on validation data; on a new site, check it with `cxr-oneclass calibrate RUN --data "
        "SPEC` on that site's labelled films.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path, val: ImageSet | None = None) -> Path:
    path = Path(run_dir) / MODEL_CARD
    write_text(path, model_card(run_dir, val))
    return path
