"""The report's sections, each built from a `Source`: summary, ROC, histograms, training curves, operating points,
reconstructions and subgroups. Only the reconstruction grid loads a model and data again."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .._version import __version__
from ..metrics import auc as auc_of
from ..metrics import operating_point, threshold_at_sensitivity
from ..scoring.terms import HEATMAP_DISPLAY, RESIDUAL, TERM_NAMES, heatmap_kind
from ..viz import save_fig
from .document import Section, agg, colour, fmt, pyplot
from .source import RunRecord, Source, to_float

HEAT_LABEL, HEAT_MAX = HEATMAP_DISPLAY[RESIDUAL]

log = logging.getLogger(__name__)

SENSITIVITIES = ("0.90", "0.95", "0.99")
TEST_AUC_COLUMN = "test_auc_not_for_selection"
TEST_AUC_LABEL = "test AUC (analysis only, not used for selection)"
SCORE_COLUMNS = {"file", "label", "score", "raw_score", *TERM_NAMES}
NORMAL_VALUES = {"", "normal", "no finding", "none", "negative", "0"}
N_EXAMPLES = 4  # images per group in the reconstruction grid
LOSS_NAMES = {
    "loss_rec": "reconstruction |x - x'|",
    "loss_adv": "adversarial (U)",
    "loss_enc": "latent |z - z'|²",
    "loss_feat": "feature matching",
    "loss_g_total": "U total (weighted)",
    "loss_d": "discriminator",
}



def summary_section(src: Source) -> Section:
    s = Section("summary", "Summary")
    first = src.runs[0]
    s.p(f"Report on {'experiment' if src.kind == 'experiment' else 'run'} `{src.path}` "
        f"(cxr-oneclass {__version__}).")
    s.p(f"Data: `{src.data or 'unknown'}`" + (f" — {first.doc['data_summary']}" if first.doc.get("data_summary") else ""))
    if src.kind == "experiment":
        seeds = sorted({r.seed for r in src.runs if r.seed is not None})
        s.p(f"Methods: {', '.join(src.methods)}; repeats: {src.repeats} per method (seeds {', '.join(map(str, seeds))}); "
            f"split seed {src.data_seed}.")
        base = (src.experiment or {}).get("base_config") or first.doc.get("config") or {}
    else:
        base = first.doc.get("config") or {}
        s.p(f"Method (variant): {first.method}.")
    if base:
        s.p("Config: " + " · ".join(f"{k}={v}" for k, v in base.items()))
    if src.kind == "experiment":
        diffs = []
        for m in src.methods:
            cfg = src.by_method(m)[0].doc.get("config") or {}
            d = {k: v for k, v in cfg.items() if k != "seed" and base.get(k) != v}
            diffs.append(f"{m}: " + (", ".join(f"{k}={v}" for k, v in d.items()) or "base config"))
        s.p("Per method: " + "; ".join(diffs) + ".")
        if src.results_md:
            text_lines, table_lines = [], []
            for line in src.results_md.splitlines():
                (table_lines if line.startswith("|") else text_lines).append(line)
            text = " ".join(line for line in text_lines if line and not line.startswith("#"))
            if text:
                s.p("Results (results.md): " + text)
            if len(table_lines) >= 2:
                cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table_lines]
                s.table(cells[0], [c for c in cells[1:] if not all(set(x) <= set("-: ") for x in c)])
        else:
            s.note("results.md not found (the experiment may still be running).")
    else:
        cal = first.doc.get("calibration") or {}
        rows = [["validation AUC", fmt(first.doc.get("val_auc"))]]
        if first.metrics:
            rows.append([f"{first.metrics.get('split', 'test')} AUC", fmt(first.metrics.get("auc"))])
            for k, v in (first.metrics.get("component_auc") or {}).items():
                rows.append([f"{first.metrics.get('split', 'test')} AUC of {k}", fmt(v)])
            rows.append(["evaluated images", f"{first.metrics.get('n_normal')} normal + {first.metrics.get('n_abnormal')} abnormal"])
        sel = first.doc.get("score_selection")
        if sel and sel.get("val_auc_by_terms"):
            cands = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(sel["val_auc_by_terms"].items(), key=lambda kv: -(kv[1] or 0)))
            rows.append(["score terms", f"{sel['chosen']}, chosen on validation (auto; validation AUC of each candidate: {cands})"])
        elif base.get("score_terms"):
            rows.append(["score terms", f"{base['score_terms']} ({base.get('score_norm', 'weights')})"])
        if cal:
            rows.append(["stored threshold", f"{fmt(cal.get('threshold'))} ({cal.get('rule', '')})"])
        if first.doc.get("train_seconds") is not None:
            rows.append(["training time", f"{first.doc['train_seconds']} s"])
        s.table(["", "value"], rows)
    missing = [r.name for r in src.runs if r.scores is None]
    if missing:
        s.note(f"No evaluation (scores.csv) for: {', '.join(missing)}; run `cxr-oneclass evaluate RUN` to add ROC, "
               "histograms, operating points and subgroups.")
    return s


def roc_section(src: Source, figdir: Path) -> Section:
    from sklearn.metrics import roc_curve

    s = Section("roc", "ROC curves")
    grid = np.linspace(0.0, 1.0, 201)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5.2))
    drawn = 0
    for i, m in enumerate(src.methods):
        curves, aucs = [], []
        for r in src.by_method(m):
            y, sc = r.labels, r.score_values
            if r.scores is None or len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, sc)
            t = np.interp(grid, fpr, tpr)
            t[0] = 0.0
            curves.append(t)
            aucs.append(auc_of(y, sc))
        if not curves:
            continue
        tprs = np.array(curves)
        label = f"{m} (AUC {agg(aucs)}" + (f", {len(curves)} runs)" if len(curves) > 1 else ")")
        ax.plot(grid, tprs.mean(axis=0), color=colour(i), lw=1.8, label=label)
        if len(curves) > 1:
            ax.fill_between(grid, tprs.min(axis=0), tprs.max(axis=0), color=colour(i), alpha=0.18, lw=0)
        drawn += 1
    if not drawn:
        plt.close(fig)
        s.note("No evaluated runs with both normal and abnormal test images: no ROC curves.")
        return s
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity (normals flagged)", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title="ROC on the test split")
    ax.legend(loc="lower right", fontsize=8)
    save_fig(fig, figdir / "roc.png")
    many = src.repeats > 1
    s.fig("roc.png", "One curve per method" + (": mean TPR over repeats on a common grid of 201 FPR values, shaded band = "
                                                  "min–max over repeats; AUC mean ± std over repeats." if many else "."))
    return s


def _panel_grid(n: int, max_cols: int, panel_size: tuple[float, float]):
    """A figure with n panels in rows of at most max_cols; unused panels hidden."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def histogram_section(src: Source, figdir: Path) -> Section:
    s = Section("histograms", "Score histograms")
    firsts = [(m, next((r for r in src.by_method(m) if r.scores is not None), None)) for m in src.methods]
    firsts = [(m, r) for m, r in firsts if r is not None]
    if not firsts:
        s.note("No evaluated runs: no score histograms.")
        return s
    fig, axes = _panel_grid(len(firsts), 3, (3.8, 2.9))
    for ax, (m, r) in zip(axes.flat, firsts):
        y, sc = r.labels, r.score_values
        finite = sc[np.isfinite(sc)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        n_bins = int(np.clip(2 * np.sqrt(finite.size), 8, 40))
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
        for lab, name, c in ((0, "normal", "tab:blue"), (1, "abnormal", "tab:red")):
            v = sc[(y == lab) & np.isfinite(sc)]
            if v.size:
                ax.hist(v, bins=bins, alpha=0.55, color=c, label=f"{name} (n={v.size})")
        if r.threshold is not None:
            ax.axvline(r.threshold, color="k", ls="--", lw=1, label=f"threshold {r.threshold:.2f}")
        ax.set_title(r.name if src.kind == "experiment" else m, fontsize=9)
        ax.set_xlabel("score (0-1 = validation range)", fontsize=8)
        ax.set_ylabel("images", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, figdir / "histograms.png")
    which = "the first repeat of each method (not pooled: each repeat has its own normalisation)" if src.kind == "experiment" else "the run"
    s.fig("histograms.png", f"Normalised test scores of normal and abnormal images, {which}; dashed: the stored threshold "
                            "(from validation).")
    return s


def training_section(src: Source, figdir: Path) -> Section:
    s = Section("training", "Training curves")
    found = {k for r in src.runs for k in (r.history[0] if r.history else {}) if k.startswith("loss_")}
    cols = [k for k in LOSS_NAMES if k in found] + sorted(found - set(LOSS_NAMES))
    for k in ("val_auc", TEST_AUC_COLUMN):
        if any(r.history and k in r.history[0] for r in src.runs):
            cols.append(k)
    if not cols:
        s.note("No history.csv found: no training curves.")
        return s
    fig, axes = _panel_grid(len(cols), 4, (3.0, 2.4))
    styles = ("-", "--", ":", "-.")
    for ax, col in zip(axes.flat, cols):
        for i, m in enumerate(src.methods):
            for j, r in enumerate(src.by_method(m)):
                ep = np.array([h.get("epoch", k + 1) for k, h in enumerate(r.history)], dtype=float)
                v = np.array([h.get(col, math.nan) for h in r.history], dtype=float)
                ok = np.isfinite(v)
                if ok.any():
                    ax.plot(ep[ok], v[ok], color=colour(i), ls=styles[j % len(styles)], lw=1.2, marker="o", ms=2.5, alpha=0.85)
        if col == TEST_AUC_COLUMN:
            title = "test AUC\n(analysis only, not used for selection)"
        elif col == "val_auc":
            title = "validation AUC"
        else:
            title = f"{col}\n{LOSS_NAMES.get(col, '')}".strip()
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour(i), lw=1.5, label=m) for i, m in enumerate(src.methods)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.94 if axes.shape[0] == 1 else 0.97))
    save_fig(fig, figdir / "training.png")
    caption = "Per-epoch means of every loss term in history.csv, one panel per term"
    if src.repeats > 1:
        caption += "; repeats overlaid (same colour, line style per repeat)"
    caption += ". Validation AUC is what the run is judged by."
    if TEST_AUC_COLUMN in cols:
        caption += f" Panel “{TEST_AUC_LABEL}”: the test split scored per epoch, for analysis only — never used for selection or thresholds."
    s.fig("training.png", caption)
    return s


def _op_points(r: RunRecord) -> dict[str, dict | None]:
    """Operating points of a run: from metrics.json, computed from scores.csv where missing."""
    m = r.metrics or {}
    out: dict[str, dict | None] = {"stored": m.get("at_threshold")}
    out.update({k: (m.get("at_sensitivity") or {}).get(k) for k in SENSITIVITIES})
    if r.scores is not None and any(v is None for v in out.values()):
        y, sc = r.labels, r.score_values
        if out["stored"] is None and r.threshold is not None:
            out["stored"] = operating_point(y, sc, r.threshold)
        for k in SENSITIVITIES:
            if out[k] is None and (y == 1).any() and (y == 0).any():
                out[k] = operating_point(y, sc, threshold_at_sensitivity(y, sc, float(k)))
    return out


def operating_section(src: Source) -> Section:
    s = Section("operating-points", "Operating points")
    names = {"stored": "stored threshold (from validation)", **{k: f"sensitivity ≥ {float(k):.0%} (set on test)" for k in SENSITIVITIES}}
    rows = []
    for m in src.methods:
        ops = [_op_points(r) for r in src.by_method(m) if r.scores is not None or r.metrics]
        if not ops:
            continue
        for key, label in names.items():
            vals = [o[key] for o in ops if o.get(key)]
            if not vals:
                continue
            rows.append([m, label, agg([v.get("threshold") for v in vals])]
                        + [agg([v.get(f) for v in vals], pct=True) for f in ("sensitivity", "specificity", "ppv", "npv", "normals_cleared", "flagged_fraction")])
    if not rows:
        s.note("No evaluated runs: no operating points.")
        return s
    s.table(["method", "operating point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "normals auto-cleared", "flagged"], rows)
    ci_rows, shift_rows = [], []
    for r in src.runs:
        m = r.metrics or {}
        ci = m.get("ci95") or {}
        if ci.get("auc"):
            ci_rows.append([r.name, fmt(m.get("auc")), *(f"{ci[k][0]:.3f}-{ci[k][1]:.3f}" if ci.get(k) else "–"
                                                          for k in ("auc", "sensitivity", "specificity"))])
        pop = m.get("population")
        if pop:
            shift_rows.append([r.name, str(pop["n"]), f"{pop['shift']:.3f} (limit {pop['shift_limit']})", f"{pop['share_outside']:.1%}",
                               "**warning**" if pop.get("warning") else "no"])
    if ci_rows:
        s.table(["run", "test AUC", "95% CI", "sensitivity 95% CI (stored threshold)", "specificity 95% CI"], ci_rows)
        s.p("Percentile bootstrap, 1,000 resamples of the test split, normals and abnormals resampled separately.")
    if shift_rows:
        s.table(["run", "test films", "population shift", "outside one by one", "warned"], shift_rows)
        s.p("Whether the test films look like the training population (scoring/population.py): a shift above the limit "
            "warns that scores may not mean here what they mean on the training data.")
    s.p("An image is flagged when its normalised score is at or above the threshold; “normals auto-cleared” is the "
        "fraction of normal test images below it (they could skip the radiologist's queue). The stored threshold was "
        "fixed on validation data; the fixed-sensitivity thresholds are chosen on the test scores themselves (what "
        "is attainable, not a held-out estimate)."
        + (" Mean ± std over repeats." if src.repeats > 1 else ""))
    return s


def _tokens(column: str, value: str) -> list[str]:
    value = (value or "").strip()
    if not value:
        return []
    if "|" in value or column.endswith("labels"):
        return [t.strip() for t in value.split("|") if t.strip()]
    return [value]


def _is_number(v: str) -> bool:
    return not math.isnan(to_float(v))


def subgroup_section(src: Source) -> Section:
    s = Section("subgroups", "AUC per subgroup")
    evaluated = [r for r in src.runs if r.scores]
    if not evaluated:
        s.note("No evaluated runs: no subgroups.")
        return s
    ref = evaluated[0].scores
    columns = [c for c in ref[0] if c and c not in SCORE_COLUMNS]
    any_table = False
    for col in columns:
        labels = np.array([int(float(r["label"])) for r in ref])
        toks = [_tokens(col, r.get(col, "")) for r in ref]
        normal_vals = {t.lower() for ts, lab in zip(toks, labels) if lab == 0 for t in (ts or [""])}
        abnormal_only = normal_vals <= NORMAL_VALUES
        groups = sorted({t for ts in toks for t in ts if not (abnormal_only and t.lower() in NORMAL_VALUES)})
        if not 2 <= len(groups) <= 20 or all(_is_number(g) for g in groups):  # numbers (age, follow-up) are not groups
            continue
        rows = []
        for g in groups:
            member = np.array([g in ts for ts in toks])
            if abnormal_only:
                sel = (labels == 0) | (member & (labels == 1))
            else:
                sel = member
            n_norm, n_abn = int(((labels == 0) & sel).sum()), int(((labels == 1) & sel).sum())
            row = [g, str(n_norm), str(n_abn)]
            for m in src.methods:
                vals = []
                for r in src.by_method(m):
                    if not r.scores:
                        continue
                    # Runs of one experiment score the same test files in the same order; match by file to be safe.
                    y, sc = r.labels, r.score_values
                    if [x["file"] for x in r.scores] != [x["file"] for x in ref]:
                        continue
                    vals.append(auc_of(y[sel], sc[sel]))
                row.append(agg(vals))
            rows.append(row)
        any_table = True
        how = ("of each subgroup's abnormals vs all normals (the column describes abnormal images only)" if abnormal_only
               else "within the subgroup (normals and abnormals that share the value)")
        s.p(f"Column `{col}`: AUC {how}." + (" Values split on '|' (an image can be in several subgroups)." if any("|" in r.get(col, "") for r in ref) else ""))
        s.table([col, "n normal", "n abnormal"] + [f"AUC {m}" for m in src.methods], rows)
    if not any_table:
        s.note("scores.csv has no non-numeric metadata column with 2 to 20 distinct values: no subgroup table.")
    elif src.repeats > 1:
        s.p("AUC mean ± std over repeats.")
    return s


# ----------------------------------------------------------------------------------------------- reconstructions

def _pick(n: int, k: int = N_EXAMPLES) -> np.ndarray:
    """k indices spread evenly over 0..n-1 (deterministic)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def examples_section(src: Source, figdir: Path) -> Section:
    s = Section("reconstructions", "Reconstructions and heat maps")
    full = [r for r in src.runs if r.method == "full"]
    run = full[0] if full else src.by_method(src.methods[-1])[0]
    try:
        import torch

        from ..runs import load_run, run_dataset
        from ..scoring.inference import score_images

        model, cal, doc = load_run(run.model_dir)
        ds = run_dataset(run.model_dir, doc, model.cfg.image_size, ("train", "test"))
    except Exception as exc:  # moved data, missing weights, anything: the rest of the report still stands
        log.warning("reconstruction grid skipped: %s", exc)
        s.note(f"Skipped: could not load the model or the data of {run.name} ({type(exc).__name__}: {exc}).")
        return s
    groups = []
    if "train" in ds.splits:
        tr = ds["train"]
        groups.append(("training images", tr, np.flatnonzero(tr.labels == 0)))
    if "test" in ds.splits:
        te = ds["test"]
        groups.append(("test normals", te, np.flatnonzero(te.labels == 0)))
        groups.append(("test abnormals", te, np.flatnonzero(te.labels == 1)))
    groups = [(t, iset, idx[_pick(idx.size)]) for t, iset, idx in groups if idx.size]
    if not groups:
        s.note("Skipped: the data has neither train nor test images.")
        return s
    with torch.inference_mode():
        panels = []
        for title, iset, idx in groups:
            scored = score_images(model, iset.images[idx], batch_size=len(idx), keep_maps=True)
            norm = cal.normalise(scored["score"]) if cal else scored["score"]
            meta_col = next((c for c in ("kind", "subtype", "nih_finding_labels") if c in iset.meta), None)
            tags = [str(iset.meta[meta_col][i]) if meta_col else "" for i in idx]
            panels.append((title, iset.images[idx], scored["reconstruction"], scored["heatmap"], norm, tags))
    heat_label, heat_max = HEATMAP_DISPLAY[heatmap_kind(model.cfg)]
    _grid_figure(figdir / "reconstructions.png", panels, heat_label, heat_max)
    s.fig("reconstructions.png",
          f"Model {run.name}: {N_EXAMPLES} images per group picked evenly through the split (not by score). Rows: input, "
          f"reconstruction x', heat map {heat_label} (inferno, saturating at {heat_max}). Numbers: normalised score "
          "(0-1 = validation range); the stored threshold is " + (f"{cal.threshold:.2f}." if cal else "unknown."))
    return s


def _short_tag(tag: str) -> str:
    """'Atelectasis|Pneumonia' -> 'Atelectasis +1'; normal words -> ''."""
    parts = [t for t in _tokens("labels", tag) if t.lower() not in NORMAL_VALUES]
    if not parts:
        return ""
    return parts[0][:14] + (f" +{len(parts) - 1}" if len(parts) > 1 else "")


def _grid_figure(path: Path, panels: list[tuple], heat_label: str = HEAT_LABEL, heat_max: float = HEAT_MAX) -> None:
    plt = pyplot()
    n_cols = sum(len(p[1]) for p in panels)
    fig = plt.figure(figsize=(1.05 * n_cols + 0.4 * len(panels), 3.9))
    subfigs = np.atleast_1d(fig.subfigures(1, len(panels), wspace=0.04, width_ratios=[len(p[1]) for p in panels]))
    for sf, (title, images, recons, heats, scores, tags) in zip(subfigs, panels):
        axes = sf.subplots(3, len(images), squeeze=False)
        sf.subplots_adjust(left=0.07, right=0.99, bottom=0.01, top=0.84, wspace=0.05, hspace=0.06)
        sf.suptitle(title, fontsize=10)
        for c in range(len(images)):
            recon_u8 = np.clip((recons[c].astype(np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
            axes[0, c].imshow(images[c], cmap="gray", vmin=0, vmax=255)
            axes[1, c].imshow(recon_u8, cmap="gray", vmin=0, vmax=255)
            axes[2, c].imshow(heats[c].astype(np.float32), cmap="inferno", vmin=0, vmax=heat_max)
            axes[0, c].set_title((f"{_short_tag(tags[c])}\n" if _short_tag(tags[c]) else "") + f"{scores[c]:.2f}", fontsize=7)
            for r in range(3):
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
        for r, name in enumerate(("input", "reconstruction", heat_label)):
            axes[r, 0].set_ylabel(name, fontsize=7)
    save_fig(fig, path)
