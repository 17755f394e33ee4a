#!/usr/bin/env bash
# Issue 7's final table: the `paper` preset and the `best` preset on the same trained weights (the presets differ
# only in the score), per seed, on the test split. Usage: research/compare_presets.sh SET RUN_SEED0 RUN_SEED1 ...
# where SET is a folder of ../shared/data. `best` scores with terms "auto" (chosen on validation). Writes runs/final/<SET>-compare.csv. Looks at test once, at the end.
set -euo pipefail
set_name=$1; shift
data="csv:../shared/data/$set_name/manifest.csv"
cli=.venv/bin/cxr-oneclass
out=runs/final/$set_name-compare.csv
.venv/bin/python -c "from cxr_oneclass.scoring.terms import TERM_NAMES; print(','.join(['run', 'seed', 'preset', 'terms', 'val_auc', 'test_auc', *TERM_NAMES]))" > "$out.tmp"
for run in "$@"; do
  best="runs/final/best-$set_name-$(basename "$run")"
  $cli -q rescore "$run" --out "$best" --data "$data" --score-terms auto --score-norm standardised --fdist-features ez > /dev/null
  for r in "$run" "$best"; do
    $cli -q evaluate "$r" --data "$data" --split test > /dev/null
    .venv/bin/python - "$r" >> "$out.tmp" <<'PY'
import json, sys
from pathlib import Path
from cxr_oneclass.scoring.terms import TERM_NAMES
run = Path(sys.argv[1])
doc = json.loads((run / "config.json").read_text())
m = json.loads((run / "eval-test" / "metrics.json").read_text())
preset = "best" if doc["config"].get("score_norm") == "standardised" else "paper"
c = m["component_auc"]
print(",".join(str(v) for v in [run, doc["config"]["seed"], preset, doc["config"].get("score_terms", "rec+adv+enc"), round(doc["val_auc"], 4), round(m["auc"], 4)] + [round(c.get(k) or float("nan"), 4) for k in TERM_NAMES]))
PY
  done
done
mv "$out.tmp" "$out"
cat "$out"
