#!/usr/bin/env bash
# Issue 14, session 13: S's training films moved twice as far and stretched in aspect (config detector_jitter 2) on
# top of session 11's one-S default runs: S alone retrained (research/detector_readings.py; the GAN kept), the
# reading `train` would pick written as a run, its shifts, and the rule fixed before the runs
# (research/acquisition_rule.py --rule geometry) against the twins' shift JSONs.
#   bash research/detector_jitter.sh runs/x14j13 runs/x14c11 nih-pneumonia-128
#   bash research/detector_jitter.sh runs/x14j13 runs/x14c11 kermany-pediatric-128
set -euo pipefail
t=$1; twins=$2; set=$3; name=${set%%-*}
for s in 0 1 2; do
  .venv/bin/python research/detector_readings.py "$twins/$name-gan50-s$s-f25k100a50-pick" --out "$t" --tag j2 \
      --set detector_jitter=2.0 --strategies pick --write-runs pick
done
.venv/bin/python research/shift_robustness.py "$t/$name"-gan50-s{0,1,2}-f25k100a50-pick-j2-pick --json "$t/shift-$name-j2.json"
.venv/bin/python research/acquisition_rule.py --rule geometry --set "$name" "$twins/shift-$name-gan50.json" "$t/shift-$name-j2.json"
