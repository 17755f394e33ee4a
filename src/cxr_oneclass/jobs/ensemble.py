"""`cxr-oneclass ensemble RUN RUN... --out ENS` and `train --ensemble K`: K runs of one data split scored as one
(scoring/ensemble.py). The standardisation and the calibration are fitted on the members' shared validation split;
the test split is never read here."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from .._version import __version__
from ..config import Config
from ..data.specs import load_dataset
from ..data.types import Dataset
from ..errors import RunError
from ..io_utils import write_json, write_text
from ..metrics import auc, operating_point
from ..reporting.model_card import MODEL_CARD
from ..runs import (
    CONFIG_FILE,
    MODEL_FILE,
    DataProvenance,
    check_writable,
    is_run,
    load_checkpoint,
    partial_dir,
    read_run_config,
    run_dataset,
    staged,
)
from ..scoring.calibration import fit_calibration
from ..scoring.ensemble import ENSEMBLE_FILE, FORMAT, MEMBERS_DIR, Ensemble, load_ensemble, standardisation
from .train import resume_run, train_run

log = logging.getLogger(__name__)

MEMBER_FILES = (MODEL_FILE, CONFIG_FILE, MODEL_CARD, "history.csv", "detector_history.csv")


def _same_images(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.names == b.names and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)


def _shared_split(run_dirs: list[Path]) -> Dataset:
    """The train + validation split every member was trained beside; refuses members of different splits (an
    ensemble calibrated on one member's validation films would be calibrated on another's training films)."""
    seen: dict[tuple[str, int], Dataset] = {}
    first = None
    for r in run_dirs:
        doc = read_run_config(r)
        prov = DataProvenance.from_doc(doc, r)
        if prov is None:
            raise RunError(f"{r}: the run does not record its data; an ensemble is calibrated on its members' shared validation split")
        key = (prov.spec, prov.split_seed)
        if key not in seen:
            seen[key] = run_dataset(r, doc, int(doc["config"]["image_size"]), ("train", "val"))
        ds = seen[key]
        if first is None:
            first = (r, ds)
        elif any(not _same_images(ds.splits.get(s), first[1].splits.get(s)) for s in ("train", "val")):
            raise RunError(f"{r} and {first[0]} were trained on different splits of their data: ensemble runs of one split "
                           "(train them with `train --ensemble K`, or with a manifest's fixed split)")
    assert first is not None
    if "val" not in first[1].splits or not len(first[1]["val"]):
        raise RunError(f"{first[0]}: no validation split to standardise and calibrate the ensemble on")
    return first[1]


def ensemble_card(doc: dict, labels: np.ndarray, normalised: np.ndarray, threshold: float) -> str:
    """MODEL_CARD.md of an ensemble: what it is, its members, how it did on validation; each member's own card is in
    members/<i>/."""
    op = operating_point(labels, normalised, threshold)
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Model card: an ensemble of {len(doc['members'])} cxr-oneclass runs", "",
             "**For research use only. Not for diagnostic use.** Each member is a one-class anomaly detector trained on normal "
             "chest X-rays only; the ensemble scores the mean of the members' scores, each standardised on the validation "
             "normals. The members' own cards (data, training, subgroups) are in `members/<i>/MODEL_CARD.md`.", "",
             f"- data: `{doc['data']}` (split seed {doc['split_seed']}); version {doc['version']}",
             f"- validation AUC: {fmt(doc.get('val_auc'))} (members: {', '.join(fmt(m.get('val_auc')) for m in doc['members'])})",
             f"- operating point: threshold {threshold:.4f} ({doc['calibration']['rule']}); on validation sensitivity "
             f"{fmt(op['sensitivity'])}, specificity {fmt(op['specificity'])}",
             "- an image that any member cannot score is reported as not scored, never normal", ""]
    return "\n".join(lines)


def write_ensemble_card(ens: Ensemble) -> None:
    """(Re)write ENS/MODEL_CARD.md from its validation split, e.g. after `calibrate` moved the threshold."""
    val = run_dataset(ens.data_dir, ens.docs[0], ens.image_size, ("val",))["val"]
    score = ens.score(val.images, ens.cfg.batch_size)["score"]
    cal = ens.calibration
    write_text(ens.path / MODEL_CARD, ensemble_card(ens.doc, val.labels, cal.normalise(score), cal.threshold))


def build_ensemble(run_dirs: list[str | Path], out: str | Path, progress: bool = True) -> dict:
    """Copy the runs into OUT/members/, fit each member's standardisation on the validation normals and the
    ensemble's calibration on validation, write OUT/ensemble.json last. Returns the ensemble document."""
    run_dirs = [Path(r) for r in run_dirs]
    out = Path(out)
    if len(run_dirs) < 2:
        raise RunError("an ensemble needs at least 2 runs")
    if len({r.resolve() for r in run_dirs}) < len(run_dirs):
        raise RunError("the same run is listed twice")
    check_writable(out)
    ds = _shared_split(run_dirs)
    val = ds["val"]
    if not val.n_normal:
        raise RunError(f"{run_dirs[0]}: the validation split has no normal films to standardise the members on")
    with staged(out) as part:
        members = []
        for i, r in enumerate(run_dirs):
            dest = part / MEMBERS_DIR / str(i)
            dest.mkdir(parents=True)
            for name in MEMBER_FILES:
                if (r / name).is_file():
                    shutil.copy2(r / name, dest / name)
            members.append({"path": f"{MEMBERS_DIR}/{i}", "source": str(r.resolve()), "center": 0.0, "scale": 1.0})
        doc = {"format": FORMAT, "version": __version__, "members": members, "data": ds.spec, "split_seed": ds.split_seed}
        write_json(part / ENSEMBLE_FILE, doc)  # unstandardised, so that the members load as the ensemble will
        ens = load_ensemble(part)
        outs = ens.member_scores(val.images, progress=progress and len(val) > 500)
        center, scale = standardisation(outs, val.labels)
        if not np.all(np.isfinite(center)) or not np.all(scale > 0):
            raise RunError(f"a member's scores on the validation normals are constant or not finite (centre {center}, scale {scale})")
        for m, c, s, o in zip(members, center, scale, outs):
            m.update(center=float(c), scale=float(s))
            m["val_auc"] = auc(val.labels, o["score"]) if val.n_abnormal else None
        ens.center, ens.scale = center, scale
        score = ens.combine(outs)["score"]
        target = ens.cfg.target_sensitivity
        cal = fit_calibration(score, val.labels, target)
        doc.update(calibration=cal.to_dict(), val_auc=auc(val.labels, score) if val.n_abnormal else None)
        write_text(part / MODEL_CARD, ensemble_card(doc, val.labels, cal.normalise(score), cal.threshold))
        write_json(part / ENSEMBLE_FILE, doc)
    log.info("ensemble of %d -> %s: validation AUC %s (members %s)", len(run_dirs), out, doc["val_auc"],
             [m["val_auc"] for m in members])
    return doc


def train_ensemble(cfg: Config, data: str | Dataset, out: str | Path, k: int, progress: bool = True) -> dict:
    """Train K members (seeds cfg.seed .. cfg.seed+K-1) on one split of `data` (drawn with cfg.seed) and build the
    ensemble OUT. Members train into OUT.members/ (a run there that is complete is kept: running the same command
    again continues an interrupted ensemble, an interrupted member from its last checkpoint), which is removed once
    OUT is written."""
    if k < 2:
        raise RunError(f"--ensemble needs K >= 2 (got {k})")
    out = Path(out)
    check_writable(out)
    ds = data if isinstance(data, Dataset) else load_dataset(data, cfg.image_size, cfg.seed, splits=("train", "val"))
    root = out.with_name(out.name + ".members")
    dirs = []
    for i in range(k):
        d = root / f"seed{cfg.seed + i}"
        if is_run(d):
            log.info("member %d/%d: %s is trained; kept", i + 1, k, d)
        elif load_checkpoint(partial_dir(d)) is not None:  # interrupted: continue it from its last checkpoint
            log.info("member %d/%d: continuing the interrupted training of %s", i + 1, k, d)
            resume_run(d, progress=progress)
        else:
            log.info("member %d/%d: training seed %d -> %s", i + 1, k, cfg.seed + i, d)
            train_run(replace(cfg, seed=cfg.seed + i), ds, d, progress=progress)
        dirs.append(d)
    doc = build_ensemble(dirs, out, progress)
    shutil.rmtree(root, ignore_errors=True)
    return doc
