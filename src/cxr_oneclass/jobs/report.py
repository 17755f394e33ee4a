"""`cxr-oneclass report PATH`: one report for a run or a whole experiment: `report.html` (self-contained, images
embedded) and `report.md` (figures saved beside it as PNG files).

Sections: summary (data, methods, config, results table), ROC curves (mean and min–max band over repeats),
score histograms, training curves, operating points, reconstructions (a Figure-2-like grid) and AUC per
subgroup (`reporting/sections.py`). Everything is read from what training and evaluation wrote
(`reporting/source.py`); only the reconstruction grid loads the model and the data again (and is skipped with a
note when the data cannot be loaded). Nothing here prints.
"""

from __future__ import annotations

from pathlib import Path

from ..io_utils import write_text
from ..reporting import sections as sec
from ..reporting.document import FIG_DIR, render_html, render_md
from ..reporting.sections import TEST_AUC_LABEL
from ..reporting.source import read_source

REPORT_HTML, REPORT_MD = "report.html", "report.md"
__all__ = ["FIG_DIR", "REPORT_HTML", "REPORT_MD", "TEST_AUC_LABEL", "write_report"]


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html (self-contained) and report.md (+ report_figures/*.png) for a run or an experiment
    folder into `out` (default: the folder itself); returns the path of report.html."""
    src = read_source(path)
    out_dir = Path(out) if out is not None else Path(path)
    figdir = out_dir / FIG_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    sections = [
        sec.summary_section(src),
        sec.roc_section(src, figdir),
        sec.histogram_section(src, figdir),
        sec.training_section(src, figdir),
        sec.operating_section(src),
        sec.examples_section(src, figdir),
        sec.subgroup_section(src),
    ]
    # Figures an earlier report wrote but this one does not (e.g. fewer sections) would linger beside report.md.
    used = {part[1] for sec in sections for part in sec.parts if part[0] == "fig"}
    for stale in figdir.glob("*.png"):
        if stale.name not in used:
            stale.unlink()
    what = "experiment" if src.kind == "experiment" else "run"
    title = f"cxr-oneclass {what} report: {src.path.resolve().name}"
    write_text(out_dir / REPORT_MD, render_md(title, sections))
    html_path = out_dir / REPORT_HTML
    write_text(html_path, render_html(title, sections, figdir))
    return html_path
