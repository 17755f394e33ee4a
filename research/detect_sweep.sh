#!/usr/bin/env bash
# Issue 14 seed sweep: the default preset plus the lesion detector, per data set and seed, one run at a time
# (two torch jobs on 2 cores each run 3-5x slower). Validation is read from each run's config.json
# (research/summarise_detect.py); the test split is read once, at the end, by evaluate.
#   bash research/detect_sweep.sh OUT "nih-pneumonia-128 kermany-pediatric-128" "0 1 2" [extra train flags]
set -euo pipefail
out=$1; sets=$2; seeds=$3; shift 3
mkdir -p "$out"
for set in $sets; do
  for s in $seeds; do
    run="$out/${set%%-*}-det16-s$s"
    [ -f "$run/config.json" ] && continue
    { time .venv/bin/cxr-oneclass -q train --data "csv:../shared/data/$set/manifest.csv" --out "$run" --seed "$s" \
        --detector-width 16 --detector-steps 1000 "$@" ; } > "$run.log" 2>&1
  done
done
