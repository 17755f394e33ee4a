"""The layout change kept behaviour: a run saved by the code before it (tests/fixtures/pre_move, commit ad48068)
loads and scores as it did then."""

import json
from pathlib import Path

import numpy as np
import pytest

import cxr_oneclass
from cxr_oneclass.jobs.score import score_paths

FIXTURE = Path(__file__).parent / "fixtures" / "pre_move"
# Batch norm is folded with torch's fuse_conv_bn_eval since the move; the hand-written folding it replaced rounded
# differently (about 1 float32 ulp per fused weight). The move itself reproduced the scores bit for bit.
RTOL = 0.0  # bit for bit until the switch to fuse_conv_bn_eval


@pytest.mark.parametrize("preset", ["best", "paper"])
def test_a_run_saved_before_the_move_scores_as_it_did(preset):
    ref = {r["file"]: r for r in json.loads((FIXTURE / preset / "reference_scores.json").read_text())}
    results, errors = score_paths(FIXTURE / preset, [FIXTURE / "images"])
    assert not errors and len(results) == len(ref) == 8
    for r in results:
        want = ref[Path(r.source).name]
        for key, got in [("score", r.score), *r.terms.items()]:
            assert got == pytest.approx(float(want[key]), rel=RTOL, abs=RTOL), (r.source, key)


def test_the_api_gives_the_cli_scores(tmp_path):
    run = cxr_oneclass.load_run(FIXTURE / "best")
    files = sorted((FIXTURE / "images").glob("*.png"))
    by_file = run.score(files)
    from PIL import Image

    by_array = run.score([np.asarray(Image.open(f)) for f in files])
    assert [r.score for r in by_file] == [r.score for r in by_array]
    assert {r.flag for r in by_file} <= {"normal", "abnormal"}
    assert run.score_terms == ["ssim", "sdist"] and set(by_file[0].terms) == {"rec", "adv", "enc", "ssim", "fdist", "sdist"}
