"""`cxr-oneclass experiment`: every method (ablation variants, baselines) x repeats with different seeds on one fixed split.

Writes DIR/results.{md,csv,json}: AUC mean ± std per method in the layout of the paper's Table 1, the AUC of
each score component, training time and images/s. Each run lives in DIR/runs/<method>/seed<k>/; a finished run
(metrics.json present) is skipped when the command is run again, and an interrupted one is started over.
Repeats can be sharded over processes or machines (`--seed 2 --repeats 3` runs seeds 2..4 into the same
layout); `collect_only` then gathers the finished runs of the whole plan into one set of results files.
The test split is scored per epoch for analysis only (`test_auc_not_for_selection` in history.csv); selection,
normalisation and thresholds use validation data.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, method_config
from ..data.specs import load_dataset, resolve_spec
from ..data.types import Dataset
from ..errors import ConfigError
from ..io_utils import write_csv, write_json, write_text
from ..runs import EXPERIMENT_FILE, RESULTS_FILES, ExperimentRun, Lock, experiment_run
from ..scoring.terms import TERM_NAMES as COMPONENTS
from .evaluate import evaluate_run
from .train import train_run

log = logging.getLogger(__name__)

PAPER_TABLE1 = {  # Tang et al. 2019, Table 1: NIH normal vs abnormal; RSNA normal vs lung opacity
    "u": (0.627, 0.592),
    "u+e": (0.687, 0.659),
    "u+d": (0.737, 0.720),
    "full": (0.841, 0.802),
}
MONITOR_NAME = "test_auc_not_for_selection"


@dataclass
class ExperimentPlan:
    data: str
    out: Path
    methods: list[str]
    repeats: int
    base: Config
    split_seed: int = 0

    def __post_init__(self) -> None:
        self.data = resolve_spec(self.data)  # recorded with absolute paths, like each run's own data
        self.out = Path(self.out)

    def run(self, method: str, repeat: int) -> ExperimentRun:
        return experiment_run(self.out, method, self.base.seed + repeat)


def run_experiment(plan: ExperimentPlan, progress: bool = True, on_run: Callable[[str, int, dict | None], None] | None = None,
                   collect_only: bool = False) -> list[dict]:
    """Train and evaluate every (method, repeat); returns one row per run and writes the results files.
    With `collect_only`, trains nothing: the results files hold the runs that are finished, the rest are logged."""
    plan.out.mkdir(parents=True, exist_ok=True)
    record_plan(plan)
    dataset: Dataset | None = None
    rows = []
    for method in plan.methods:
        cfg0 = method_config(method, plan.base)  # validates the name before any work
        for r in range(plan.repeats):
            run = plan.run(method, r)
            run_dir, done = run.root, run.done_file
            if run.finished:
                row = json.loads(done.read_text())["row"]
                log.info("skip %s seed %d: finished earlier", method, row["seed"])
                if on_run:
                    on_run(method, r, None)
                rows.append(row)
                continue
            if collect_only:
                log.warning("%s seed %d: not finished (%s has no metrics.json); left out", method, plan.base.seed + r, run_dir)
                continue
            lock = Lock(run.lock_file)
            if not lock.acquire():  # another shard trains this run: leave it (and its folder) alone
                log.warning("%s seed %d: being trained by another process (%s); skipped here", method, run.seed, lock.owner())
                continue
            try:
                if dataset is None:
                    # One split for every run: the data seed is fixed, only the model seed changes per repeat.
                    dataset = load_dataset(plan.data, plan.base.image_size, plan.split_seed)
                row = _train_and_evaluate(plan, method, r, run, cfg0, dataset, progress)
            finally:
                lock.release()
            rows.append(row)
            write_results(plan, rows)  # results so far, so that a long experiment can be read while it runs
            if on_run:
                on_run(method, r, row)
    write_results(plan, rows)
    return rows


# What must agree between an experiment folder and a command that adds runs to it (shards may differ in methods,
# seeds and repeats; not in what a run is).
PLAN_KEYS = ("data", "split_seed", "base_config")


def record_plan(plan: ExperimentPlan) -> None:
    """Write experiment.json, or check that the one there describes the same experiment: runs made with other
    data or settings must not be reported under this header. Methods and repeats accumulate over shards."""
    path = plan.out / EXPERIMENT_FILE
    doc = {"data": plan.data, "methods": plan.methods, "repeats": plan.repeats, "base_config": plan.base.to_dict(), "split_seed": plan.split_seed}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); move the folder aside or use another --out") from exc
        mine = {**doc, "base_config": {k: v for k, v in doc["base_config"].items() if k != "seed"}}
        theirs = {**old, "base_config": {k: v for k, v in (old.get("base_config") or {}).items() if k != "seed"}}
        diff = [k for k in PLAN_KEYS if mine.get(k) != theirs.get(k)]
        if diff:
            detail = ""
            if "base_config" in diff:
                keys = sorted(k for k in set(mine["base_config"]) | set(theirs["base_config"]) if mine["base_config"].get(k) != theirs["base_config"].get(k))
                detail = f" (config: {', '.join(keys)})"
            raise ConfigError(f"{plan.out} holds an experiment with other settings: {', '.join(diff)} differ{detail}. Its runs "
                              "would be reported under this command's header: use another --out")
        doc["methods"] = list(dict.fromkeys([*old.get("methods", []), *plan.methods]))
        doc["repeats"] = max(int(old.get("repeats", 0)), plan.base.seed + plan.repeats)
    write_json(path, doc)


def _train_and_evaluate(plan: ExperimentPlan, method: str, r: int, run: ExperimentRun, cfg0: Config, dataset: Dataset,
                        progress: bool) -> dict:
    if run.root.exists():
        shutil.rmtree(run.root)  # a run interrupted before its metrics: start it over (we hold its lock)
    cfg = method_config(method, Config.from_dict({**cfg0.to_dict(), "seed": plan.base.seed + r}))
    monitor = {MONITOR_NAME: dataset["test"]} if "test" in dataset.splits else None
    outcome = train_run(cfg, dataset, run.model_dir, progress=progress, monitor=monitor)
    metrics = evaluate_run(run.model_dir, dataset, "test", run.eval_dir, progress=progress)
    last = outcome.history[-1]
    row = {
        "method": method,
        "seed": cfg.seed,
        "auc": metrics["auc"],
        **{f"auc_{k}": v for k, v in metrics["component_auc"].items()},
        "val_auc": outcome.val_auc,
        "train_seconds": round(outcome.seconds, 1),
        "images_per_s": last["images_per_s"],
        "epochs": cfg.epochs,
    }
    write_json(run.done_file, {"row": row, "metrics": metrics})  # last: its presence marks the run finished
    return row




def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        s = {"method": m, "runs": len(rs)}
        for key in ("auc", *(f"auc_{k}" for k in COMPONENTS), "val_auc", "train_seconds", "images_per_s"):
            s[f"{key}_mean"], s[f"{key}_std"] = _mean_std([r.get(key) for r in rs])
        out.append(s)
    return out


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_results(plan: ExperimentPlan, rows: list[dict]) -> None:
    summary = summarise(rows, plan.methods)
    md, csv_name, json_name = RESULTS_FILES
    write_csv(plan.out / csv_name, rows)
    write_json(plan.out / json_name, {"data": plan.data, "repeats": plan.repeats, "summary": summary, "runs": rows})
    lines = [
        f"# Experiment on `{plan.data}`",
        "",
        f"{plan.repeats} repeat(s) per method (seeds {plan.base.seed}..{plan.base.seed + plan.repeats - 1}), one split "
        f"(split seed {plan.split_seed}), {plan.base.epochs} epochs, {plan.base.image_size} px. Test AUC, mean ± std over repeats; "
        "thresholds and normalisation from validation only.",
        "",
        "| method | test AUC | " + " | ".join(f"AUC {k}" for k in COMPONENTS) + " | val AUC | train s | images/s | paper (NIH / RSNA) |",
        "|---|---|" + "---|" * len(COMPONENTS) + "---|---|---|---|",
    ]
    for s in summary:
        paper = PAPER_TABLE1.get(s["method"])
        comps = " | ".join(_fmt(s[f"auc_{k}_mean"], s[f"auc_{k}_std"]) for k in COMPONENTS)
        lines.append(
            f"| {s['method']} | {_fmt(s['auc_mean'], s['auc_std'])} | {comps} | "
            f"{_fmt(s['val_auc_mean'], s['val_auc_std'])} | {_fmt(s['train_seconds_mean'], s['train_seconds_std'], 0)} | "
            f"{_fmt(s['images_per_s_mean'], s['images_per_s_std'], 1)} | {f'{paper[0]:.3f} / {paper[1]:.3f}' if paper else '–'} |"
        )
    lines += ["", "AUC columns per term: the test AUC that term gives on its own (analysis; the score uses the config's terms)."]
    write_text(plan.out / md, "\n".join(lines) + "\n")
