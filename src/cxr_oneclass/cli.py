"""Command line: `cxr-oneclass VERB ...`, one verb per module of `jobs/`. The only module that prints or exits.

Each `cmd_*` parses nothing and decides nothing: it calls its job and prints what came back.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import DEFAULT_PRESET, DETECTOR_PICKS, FILM_NORMS, PRESETS, VARIANTS, resolve
from .errors import CxrError
from .scoring.terms import TERM_NAMES


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show (flags, None, suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override single values of the preset (default None = keep the preset's)."""
    g = p.add_argument_group("model and training (override the preset)")
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="recipe to start from: paper (Tang et al., faithful), best (the paper's networks, this project's "
                   "score) or detect (best plus the lesion detector S)")
    g.add_argument("--variant", choices=VARIANTS, help="ablation: which of U, E, D to use")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps", type=int, help="optimiser steps; > 0 replaces --epochs")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--image-size", type=int, help="square input size in pixels, a power of two (paper: 64)")
    g.add_argument("--lr", type=float)
    g.add_argument("--noise-std", type=float, help="std of Gaussian noise on U's input while training")
    g.add_argument("--width", type=int, help="channels of the first conv layer (paper-like: 64)")
    g.add_argument("--skips", type=int, help="U-Net skip connections kept, deepest first; -1 = all (default)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--precision", choices=("fp32", "bf16"))
    g.add_argument("--threads", dest="num_threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--score-terms", help=f"'+'-joined terms of the anomaly score ({', '.join(TERM_NAMES)}), or auto: the sum of the auto candidates that does best on validation (needs --score-norm standardised)")
    g.add_argument("--score-norm", choices=("weights", "standardised"), help="paper lambdas, or terms standardised on validation normals")
    g.add_argument("--fdist-features", choices=("u", "z", "ez"), help="features whose distance from the training normals fdist measures")
    g.add_argument("--target-sensitivity", type=float, help="the operating point: sensitivity on validation abnormals that sets the threshold")
    g.add_argument("--detector-width", type=int, help="lesion detector S trained on synthetic lesions (score term seg); 0 = none")
    g.add_argument("--detector-steps", type=int, help="training steps of the lesion detector")
    g.add_argument("--detectors", type=int, help="lesion detectors S trained, each from its own random stream; their "
                   "lesion probabilities are averaged (the seg term and its map)")
    g.add_argument("--lesion-p", type=float, help="share of the detector's training films that get synthetic lesions")
    g.add_argument("--lesion-kinds", help="'+'-joined synthetic lesions S is taught (opacity, diffuse, nodule, effusion, "
                   "pneumothorax, patch, blur), or all")
    g.add_argument("--lung-floor", type=float, help="each film's lung mask raised to at least this: a share of the synthetic "
                   "lesions lands outside the lungs (0: lungs only, 1: anywhere on the film)")
    g.add_argument("--lung-keep", type=float, help="share of each film's lung region (the darker part) that counts as lung "
                   "for the synthetic lesions (1: all of it, opaque parts too)")
    g.add_argument("--acquisition-p", type=float, help="share of the detector's training films imaged again after their "
                   "lesions are drawn (blur, sharpening, lower resolution, noise), as another site would")
    g.add_argument("--lut-p", type=float, help="share of the detector's training films shown through a random monotone "
                   "display curve (another site's LUT or processing) after their lesions")
    g.add_argument("--detector-jitter", type=float, help="how far the detector's training films are moved: 1 is shift ±6%%, "
                   "zoom ±8%%, rotation ±4.6°; k scales these and, above 1, stretches one axis by up to ±10%%·(k-1)")
    g.add_argument("--gan-acquisition-p", type=float, help="share of the GAN's training films imaged again the same way "
                   "(blur, sharpening, lower resolution, noise)")
    g.add_argument("--detector-pick", choices=DETECTOR_PICKS, help="which of S's readings is kept: best validation AUC "
                   "as the films are (val) or mean over them and simulated acquisition shifts of them (shifted)")
    g.add_argument("--film-norm", choices=FILM_NORMS, help="each film as every network sees it, in training and scoring: "
                   "as it comes (none) or histogram-equalised within itself (equalise: blind to display curves)")
    preset = resolve(DEFAULT_PRESET)
    for action in g._group_actions:
        if action.dest in CONFIG_FLAGS:
            action.help = f"{action.help or ''} (default: {getattr(preset, action.dest)} in {DEFAULT_PRESET}; the preset's otherwise)".lstrip()


CONFIG_FLAGS = ("target_sensitivity", "variant", "epochs", "steps", "score_terms", "score_norm", "fdist_features", "batch_size", "image_size", "lr", "noise_std", "width", "skips", "seed", "device", "precision", "num_threads",
                "detector_width", "detectors", "detector_steps", "lesion_p", "lesion_kinds", "lung_floor", "lung_keep", "acquisition_p",
                "gan_acquisition_p", "lut_p", "detector_jitter", "detector_pick", "film_norm")


def config_from_args(args: argparse.Namespace):
    return resolve(args.preset, **{k: getattr(args, k) for k in CONFIG_FLAGS})


def _views(text: str) -> set[str]:
    from .data.studies import parse_views

    try:
        return parse_views(text)
    except ValueError as exc:
        raise CxrError(str(exc)) from exc


def cmd_train(args: argparse.Namespace) -> int:
    from .jobs.train import resume_run, train_run
    from .runtime import pick_device
    from .training import distributed

    if args.resume:
        if args.data or args.out:
            raise CxrError("--resume RUN continues with the data, config and folder the training started with: "
                           "give neither --data nor --out")
        out = resume_run(args.resume, progress=not args.quiet)
        print(f"resumed and finished {out.run_dir}: {len(out.history)} epochs, validation AUC "
              + (f"{out.val_auc:.4f}" if out.val_auc is not None else "undefined"))
        return 0
    if not args.data or not args.out:
        raise CxrError("train needs --data and --out (or --resume RUN)")
    cfg = config_from_args(args)
    if args.ensemble is not None:
        from .jobs.ensemble import train_ensemble

        if distributed.launched_by_torchrun():
            raise CxrError("--ensemble trains its members one after the other in one process: run it without torchrun")

        doc = train_ensemble(cfg, args.data, args.out, args.ensemble, progress=not args.quiet)
        _print_ensemble(doc, args.out)
        return 0
    # Under torchrun (WORLD_SIZE > 1): data-parallel training; every rank trains, rank 0 writes and prints.
    if distributed.init_from_env(pick_device(cfg.device).type):
        try:
            out = train_run(cfg, args.data, args.out, progress=not args.quiet and distributed.is_main())
            if not distributed.is_main():
                return 0
            print(f"data-parallel over {distributed.world_size()} processes (global batch {cfg.batch_size})")
        finally:
            distributed.shutdown()
    else:
        out = train_run(cfg, args.data, args.out, progress=not args.quiet)
    last = out.history[-1]
    print(f"data: {out.extra['data_summary']}")
    print(f"trained {cfg.variant} ({args.preset}) for {len(out.history)} epochs in {out.seconds:.1f} s, {last['images_per_s']:.1f} images/s")
    if "detector_seconds" in out.extra:
        best = out.extra.get("detector_val_auc")
        picked = f", kept the reading with validation AUC {best:.4f} (seg alone)" if best is not None else ""
        if "detector_val_auc_shifted" in out.extra:
            picked += f", {out.extra['detector_val_auc_shifted']:.4f} on average over simulated acquisition shifts"
        print(f"lesion detector: {cfg.detector_steps} steps in {out.extra['detector_seconds']:.0f} s{picked}")
    if out.val_auc is not None:
        print(f"validation AUC {out.val_auc:.4f}")
    print(f"threshold {out.calibration.threshold:.4f} ({out.calibration.rule})")
    print(f"model written to {out.run_dir}")
    return 0


def _print_ensemble(doc: dict, out: str) -> None:
    members = ", ".join(f"{m['val_auc']:.4f}" if m.get("val_auc") is not None else "undefined" for m in doc["members"])
    print(f"ensemble of {len(doc['members'])} runs; members' validation AUC {members}")
    if doc.get("val_auc") is not None:
        print(f"validation AUC {doc['val_auc']:.4f} (the members' standardised scores averaged)")
    print(f"threshold {doc['calibration']['threshold']:.4f} ({doc['calibration']['rule']})")
    print(f"ensemble written to {out}")


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .jobs.ensemble import build_ensemble

    _print_ensemble(build_ensemble(args.runs, args.out, progress=not args.quiet), args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs.evaluate import evaluate_run
    from .runs import METRICS_FILE, SCORES_FILE, eval_dir

    out = Path(args.out) if args.out else eval_dir(args.run, args.split)
    m = evaluate_run(args.run, args.data, args.split, out, progress=not args.quiet, prevalence=args.prevalence)
    auc, ci = m["auc"], (m.get("ci95") or {})
    print(f"{args.split}: {m['n_normal']} normal + {m['n_abnormal']} abnormal")
    if auc is None:
        print("AUC undefined (only one class present)")
    else:
        print(f"AUC {auc:.4f}" + (f" (95% CI {ci['auc'][0]:.3f}-{ci['auc'][1]:.3f})" if ci.get("auc") else ""))
    comps = ", ".join(f"{k} {v:.4f}" for k, v in m["component_auc"].items() if v is not None)
    if comps:
        print(f"component AUC: {comps}")
    op = m.get("at_threshold")
    if op and op["sensitivity"] is not None and op["specificity"] is not None:
        interval = lambda k: f" ({ci[k][0]:.3f}-{ci[k][1]:.3f})" if ci.get(k) else ""  # noqa: E731
        print(f"at stored threshold: sensitivity {op['sensitivity']:.3f}{interval('sensitivity')}, "
              f"specificity {op['specificity']:.3f}{interval('specificity')}")
        if op.get("ppv_at_prevalence") is not None:
            print(f"at prevalence {op['prevalence']:g}: PPV {op['ppv_at_prevalence']:.3f}, NPV {op['npv_at_prevalence']:.3f}")
    pop = m.get("population")
    if pop and pop.get("warning"):
        print(f"warning: {pop['warning']}", file=sys.stderr)
    print(f"wrote {out / METRICS_FILE} and {out / SCORES_FILE}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from .jobs.rescore import rescore_run

    out = rescore_run(args.run, args.out, args.data, score_terms=args.score_terms, score_norm=args.score_norm, fdist_features=args.fdist_features)
    cfg = out.model.cfg
    print(f"score {cfg.score_terms} ({cfg.score_norm}, fdist on {cfg.fdist_features}) refitted in {out.seconds:.1f} s")
    if out.val_auc is not None:
        print(f"validation AUC {out.val_auc:.4f}")
    print(f"model written to {out.run_dir}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .jobs.calibrate import calibrate_run

    out = calibrate_run(args.run, args.data, args.split, args.target_sensitivity, args.threshold)

    def show(op: dict | None) -> str:
        if not op:
            return "none"
        sens, spec = op["sensitivity"], op["specificity"]
        return (f"threshold {op['threshold']:.4f}: sensitivity " + (f"{sens:.3f}" if sens is not None else "–")
                + ", specificity " + (f"{spec:.3f}" if spec is not None else "–"))

    print(f"on {out['split']} of {out['data']}")
    print(f"before  {show(out['before'])}")
    print(f"after   {show(out['after'])} ({out['calibration']['rule']})")
    for w in out["calibration"]["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {out['wrote']} and MODEL_CARD.md; evaluations at the old threshold were removed")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .io_utils import write_csv, write_json
    from .jobs.score import NOT_SCORED, STUDY_COLUMNS, CsvSink, DicomResults, Scorer, iter_scores, study_rows
    from .scoring.population import BatchCheck

    if args.onnx:  # an exported graph: every positional argument is an image or folder
        source, paths = args.onnx, [args.run, *args.paths]
    elif not args.paths:
        raise CxrError("no images to score: give RUN then one or more files or folders (or --onnx FILE PATH...)")
    else:
        source, paths = args.run, args.paths
    views = _views(args.views)
    salt = args.pseudonymise or os.environ.get("CXR_ONECLASS_SALT") or None
    scorer = Scorer(source, int8=args.int8)
    columns = ["file", "patient_id", "accession", "study_uid", "series_uid", "sop_uid", "view", "score", "normal_percentile",
               "flag", "raw_score", *scorer.terms, "population_distance", "outside_population",
               *(["heatmap_file"] if args.heatmaps else []), "error"]
    for target in (args.studies_csv, args.json):  # checked before any work
        if target:
            try:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CxrError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if args.heatmaps:
        try:
            Path(args.heatmaps).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CxrError(f"cannot write heat maps to {args.heatmaps}: {exc.strerror or exc}") from exc
    dicom = DicomResults(scorer, args.dicom_out) if args.dicom_out else None
    population = BatchCheck(scorer.population) if scorer.population is not None else None
    sink = CsvSink(columns, path=args.csv)  # prints to stdout without --csv
    # Per-image records are kept only for what needs all of them at the end (studies, JSON, DICOM SRs): a plain
    # CSV of a whole archive streams in constant memory.
    keep = bool(args.studies_csv or args.json or dicom is not None)
    records, rows, failed = [], [], []
    skipped = 0
    complete = False
    try:
        for rec in iter_scores(scorer, paths, heatmap_dir=args.heatmaps, keep_maps=dicom is not None, keep_images=dicom is not None,
                               accept_any_modality=args.any_modality, views=views, population=population):
            row = rec.row(scorer.terms, salt)
            sink.write(row)
            skipped += rec.flag == "skipped"
            if dicom is not None:
                dicom.add(rec)
            rec.heatmap = rec.image = None  # pixels are not needed past this point
            if keep:
                rows.append(row)
                records.append(rec)
            if rec.flag == NOT_SCORED:
                failed.append(rec)
        complete = True
    finally:
        sink.close(complete)
        if not complete and args.csv:
            print(f"interrupted: the {sink.rows} rows scored so far are in {sink.partial}", file=sys.stderr)
    studies = study_rows(records, salt) if keep else []
    verdict = population.verdict() if population is not None else None
    if args.studies_csv:
        write_csv(args.studies_csv, studies, list(STUDY_COLUMNS))
    if args.json:
        cal = scorer.calibration
        write_json(args.json, {"model": {"source": str(source), "threshold": cal.threshold if cal else None, "rule": cal.rule if cal else None,
                                         "score_terms": scorer.score_terms}, "population": verdict, "images": rows, "studies": studies})
    if dicom is not None:
        written = dicom.finish(studies)
        print(f"wrote {len(written)} DICOM object(s) under {args.dicom_out}", file=sys.stderr if not args.csv else sys.stdout)
    if args.csv:
        print(f"wrote {sink.rows - len(failed) - skipped} scores to {args.csv}" + (f" ({skipped} skipped)" if skipped else ""))
    if verdict and verdict["warning"]:
        print(f"warning: {verdict['warning']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {sink.rows} inputs could not be scored (flag {NOT_SCORED}):", file=sys.stderr)
        for rec in failed:
            print(f"  {rec.source}: {rec.error}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .jobs.serve import serve

    views = _views(args.views)
    print(f"serving {args.run} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    serve(args.run, args.host, args.port, args.db, args.token, views, args.pseudonymise or os.environ.get("CXR_ONECLASS_SALT"),
          args.max_batch, args.max_wait_ms, "info" if args.verbose else "warning", int8=args.int8)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from .jobs.listen import listen

    views = _views(args.views)
    allowed = set(args.allow) if args.allow else None
    dest = None
    if args.send_sr:
        host, _, rest = args.send_sr.partition(":")
        port, _, aet = rest.partition(":")
        if not (host and port.isdigit() and aet):
            raise CxrError(f"--send-sr wants HOST:PORT:AE_TITLE, not {args.send_sr!r}")
        dest = (host, int(port), aet)

    def ready(receiver: Any) -> None:
        print(f"listening as {args.ae_title} on {args.host}:{receiver.port} (Ctrl-C to stop)", flush=True)

    listen(args.run, ae_title=args.ae_title, host=args.host, port=args.port, db=args.db, allowed_aes=allowed, sr_destination=dest,
           views=views, salt=args.pseudonymise or os.environ.get("CXR_ONECLASS_SALT"), ready=ready, int8=args.int8)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .jobs.export import export_run

    info = export_run(args.run, args.out, opset=args.opset, verify=not args.no_verify, int8=args.int8, calibration_data=args.calibration_data)
    print(f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, {info['precision']}): input uint8 (B,1,H,W); outputs score, components, heatmap")
    if "int8" in info:
        q = info["int8"]
        print(f"int8: networks quantised, activation ranges from {q['calibration_images']} training normals ({q['calibration_source']})")
    if info["max_rel_diff"] is not None:
        if info["precision"] == "int8":
            d = info["diff_by_output"]
            print(f"onnxruntime int8 vs PyTorch fp32: score differs by at most {d['score']:.1e} of the validation range; "
                  + ", ".join(f"{k} {v:.1e}" for k, v in d.items() if k != "score") + " of each term's size")
        else:
            print(f"onnxruntime vs PyTorch: largest difference {info['max_rel_diff']:.1e} of an output's scale")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .jobs.demo import run_demo

    summary = run_demo(args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet, preset=args.preset)
    print(summary)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .jobs.experiment import ExperimentPlan, run_experiment
    from .runs import RESULTS_FILES

    methods = [m.strip() for m in (args.variants.split(",") + (args.baselines.split(",") if args.baselines else [])) if m.strip()]
    plan = ExperimentPlan(args.data, Path(args.out), methods, args.repeats, config_from_args(args), args.split_seed)

    def on_run(method: str, repeat: int, row: dict | None) -> None:
        if row is None:
            print(f"{method} repeat {repeat + 1}/{args.repeats}: finished earlier, kept")
        else:
            print(f"{method} repeat {repeat + 1}/{args.repeats}: test AUC {row['auc']:.4f} ({row['train_seconds']:.0f} s)")

    rows = run_experiment(plan, progress=not args.quiet, on_run=on_run, collect_only=args.collect)
    if args.collect:
        print(f"collected {len(rows)} finished run(s) of {len(methods) * args.repeats}")
    print((plan.out / RESULTS_FILES[0]).read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(plan.out / f) for f in RESULTS_FILES)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .jobs.report import write_report

    html_path = write_report(args.path, args.out)
    print(f"wrote {html_path} (self-contained) and {html_path.with_name('report.md')} (+ report_figures/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-oneclass", description="One-class abnormal chest X-ray detection (Tang et al., ISBI 2019).",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"cxr-oneclass {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # The same two flags after the verb (`cxr-oneclass train -q ...`); SUPPRESS keeps an absent one from
    # overwriting the value given before the verb.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=HelpFormatter)

    t = verb("train", "train on normal images; calibrate on validation")
    t.add_argument("--data", help="csv:MANIFEST, folder:PATH, nih:PATH, rsna:PATH or phantom[:OPTIONS] (see README)")
    t.add_argument("--out", help="run folder to write (written as RUN.partial until complete)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted training of RUN from its last checkpoint")
    t.add_argument("--ensemble", type=int, metavar="K", help="train K models (seeds SEED..SEED+K-1) on one split and score "
                   "them as one: their standardised scores averaged (K times the training and scoring time; steadier)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    en = verb("ensemble", "score K runs of one data split as one: standardised scores averaged, calibrated on validation")
    en.add_argument("runs", nargs="+", metavar="RUN", help="trained runs of the same data and split (e.g. other seeds)")
    en.add_argument("--out", required=True, help="ensemble folder to write (the runs are copied into OUT/members/)")
    en.set_defaults(func=cmd_ensemble)

    e = verb("evaluate", "AUC and operating points of a run on a labelled split")
    e.add_argument("run")
    e.add_argument("--data", help="data spec (default: the one the run was trained on)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--out", help="folder for metrics.json and scores.csv (default RUN/eval-SPLIT)")
    e.add_argument("--prevalence", type=float, help="also give PPV and NPV at this prevalence of abnormal films (e.g. 0.1)")
    e.set_defaults(func=cmd_evaluate)

    rs = verb("rescore", "copy a trained run with another anomaly score (no retraining)")
    rs.add_argument("run")
    rs.add_argument("--out", required=True, help="run folder to write")
    rs.add_argument("--data", help="data spec (default: the one the run was trained on)")
    rs.add_argument("--score-terms", help="'+'-joined terms (rec, adv, enc, ssim, fdist, sdist) or auto")
    rs.add_argument("--score-norm", choices=("weights", "standardised"))
    rs.add_argument("--fdist-features", choices=("u", "z", "ez"))
    rs.set_defaults(func=cmd_rescore)

    s = verb("score", "score image files or folders")
    s.add_argument("run", metavar="RUN", help="run folder (with --onnx: the first PATH)")
    s.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders")
    s.add_argument("--onnx", metavar="FILE", help="score with an exported .onnx graph instead of a run folder")
    s.add_argument("--int8", action="store_true", help="score with the run's int8 graph (RUN/model.int8.onnx, quantised and "
                   "checked on first use from the run's training normals): about 2x faster on CPU, scores within 0.05 of the "
                   "validation range of fp32's")
    s.add_argument("--csv", metavar="FILE", help="write the scores here (CSV) instead of printing them")
    s.add_argument("--studies-csv", metavar="FILE", help="one row per study (StudyInstanceUID): its highest image score and flag")
    s.add_argument("--json", metavar="FILE", help="images, studies, the population check and the operating point, as JSON")
    s.add_argument("--dicom-out", metavar="DIR", help="DICOM results per study: a Structured Report and heat-map Secondary Captures")
    s.add_argument("--views", default="PA,AP", help="views to score (PA, AP, LATERAL, OTHER, or all); others are skipped with the reason")
    s.add_argument("--pseudonymise", metavar="SALT", help="replace patient IDs by a keyed hash (or set CXR_ONECLASS_SALT)")
    s.add_argument("--any-modality", action="store_true", help="also score DICOM files that are not projection radiographs (CT, MR, ...)")
    s.add_argument("--heatmaps", metavar="DIR", help="folder for heat-map overlays (one PNG per image; the CSV names each)")
    s.set_defaults(func=cmd_score)

    c = verb("calibrate", "set the operating point again (no training): a target sensitivity or a threshold")
    c.add_argument("run")
    c.add_argument("--data", help="a labelled data spec, e.g. a new site's films (default: the run's own data)")
    c.add_argument("--split", default="val", choices=("train", "val", "test"), help="split of the data to calibrate on")
    group = c.add_mutually_exclusive_group()
    group.add_argument("--target-sensitivity", type=float, help="sensitivity on the split's abnormals (default: the run's, 0.95)")
    group.add_argument("--threshold", type=float, help="a fixed threshold on the calibrated score scale")
    c.set_defaults(func=cmd_calibrate)

    x = verb("experiment", "every variant and baseline x repeats on one split; Table-1-style results")
    x.add_argument("--data", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--variants", default="u,u+e,u+d,full", help="comma-separated ablation variants")
    x.add_argument("--baselines", default="", help="comma-separated baselines: ae, ganomaly")
    x.add_argument("--repeats", type=int, default=5)
    x.add_argument("--split-seed", type=int, default=0, help="seed of the data split (fixed across repeats)")
    x.add_argument("--collect", action="store_true", help="train nothing: write the results files from the runs already finished "
                   "(e.g. after sharding repeats over processes with --seed K --repeats N into the same --out)")
    _add_config_flags(x)
    x.set_defaults(func=cmd_experiment)

    r = verb("report", "HTML + Markdown report of a run or an experiment folder")
    r.add_argument("path", metavar="PATH", help="a run folder or an experiment folder")
    r.add_argument("--out", help="folder for report.html, report.md and report_figures/ (default: PATH)")
    r.set_defaults(func=cmd_report)

    o = verb("export", "export a run's scoring graph to ONNX")
    o.add_argument("run")
    o.add_argument("--out", "--onnx", dest="out", required=True, metavar="FILE", help=".onnx file to write (--onnx: its old name)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    o.add_argument("--int8", action="store_true", help="quantise the networks to int8 (onnxruntime static quantisation, "
                   "calibrated on the run's training normals): about 2x the fp32 graph's throughput on CPU")
    o.add_argument("--calibration-data", metavar="SPEC", help="where the training normals for --int8 are, when not where "
                   "the run was trained (a data spec, split with the run's split seed)")
    o.set_defaults(func=cmd_export)

    sv = verb("serve", "the triage service: HTTP API, worklist page, results database")
    sv.add_argument("run")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --token)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--db", help="results database (SQLite; default RUN/triage.sqlite)")
    sv.add_argument("--token", help="bearer token the API requires (or CXR_ONECLASS_TOKEN)")
    sv.add_argument("--views", default="PA,AP", help="views to score; others are stored as skipped")
    sv.add_argument("--pseudonymise", metavar="SALT", help="store patient IDs as a keyed hash (or CXR_ONECLASS_SALT)")
    sv.add_argument("--max-batch", type=int, default=32, help="most images scored together (micro-batching)")
    sv.add_argument("--int8", action="store_true", help="score with the run's int8 graph (built on first use, see score --int8): about half the CPU time per film")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="longest an image waits for others to join its batch")
    sv.set_defaults(func=cmd_serve)

    ls = verb("listen", "a DICOM receiver (C-ECHO, C-STORE) that scores what it is sent into the results database")
    ls.add_argument("run")
    ls.add_argument("--ae-title", default="CXR1C")
    ls.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --allow)")
    ls.add_argument("--port", type=int, default=11112)
    ls.add_argument("--db", help="results database (SQLite; default RUN/triage.sqlite, shared with `serve`)")
    ls.add_argument("--allow", nargs="+", metavar="AE", help="calling AE titles allowed to send (default: any, on loopback)")
    ls.add_argument("--send-sr", metavar="HOST:PORT:AE", help="send each scored study's DICOM SR there (C-STORE)")
    ls.add_argument("--views", default="PA,AP", help="views to score; others are stored as skipped")
    ls.add_argument("--int8", action="store_true", help="score with the run's int8 graph (built on first use, see score --int8): about half the CPU time per film")
    ls.add_argument("--pseudonymise", metavar="SALT", help="store patient IDs as a keyed hash (or CXR_ONECLASS_SALT)")
    ls.set_defaults(func=cmd_listen)

    d = verb("demo", "the whole job on generated phantom radiographs")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="recipe")
    d.set_defaults(func=cmd_demo)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that what was done is kept (as on Ctrl-C)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # File names that are not valid UTF-8 are printed with backslash escapes instead of ending the run.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return args.func(args)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `score ... | head`: the reader has gone; stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
