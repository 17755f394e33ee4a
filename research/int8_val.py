"""int8 against fp32 on a run's validation split only: AUC and the correlation of the scores (issue 14, session 11).

    python research/int8_val.py runs/x14c11/nih-gan50-s0-f25k100a50-pick
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from shift_robustness import run_and_val  # research/: run as `python research/int8_val.py`

from cxr_oneclass.jobs.export import export_run
from cxr_oneclass.jobs.score import Scorer
from cxr_oneclass.metrics import auc
from cxr_oneclass.scoring.onnx import OnnxScorer

for run in sys.argv[1:]:
    _, _, val = run_and_val(run)
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "run"
        shutil.copytree(run, copy)
        info = export_run(copy, Path(d) / "m8.onnx", int8=True)
        a = Scorer(copy).score(val.images)["score"]
        b = OnnxScorer(Path(d) / "m8.onnx").score(val.images)["score"]
    print(run, "val AUC fp32", round(auc(val.labels, a), 4), "int8", round(auc(val.labels, b), 4),
          "corr", round(float(np.corrcoef(a, b)[0, 1]), 4), "score diff", info["diff_by_output"]["score"], flush=True)
