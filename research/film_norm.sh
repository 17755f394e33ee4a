#!/usr/bin/env bash
# Issue 14, session 12: every film histogram-equalised before every network (config film_norm equalise) on top of
# the default, GAN and S retrained by a plain `train` per set and seed; twins are session 11's default runs
# (runs/x14c11/*-gan50-s*-f25k100a50-pick and their shift JSONs). The rule, fixed before the runs:
# research/acquisition_rule.py --rule norm. NIH first; its check says whether the pediatric runs can change the outcome.
#   bash research/film_norm.sh runs/x14n12 runs/x14c11 nih-pneumonia-128
#   bash research/film_norm.sh runs/x14n12 runs/x14c11 kermany-pediatric-128
set -euo pipefail
t=$1; twins=$2; set=$3; name=${set%%-*}
bash research/detect_sweep.sh "$t" "$set" "0 1 2" --film-norm equalise
.venv/bin/python research/shift_robustness.py "$t/$name"-det16-s{0,1,2} --json "$t/shift-$name-eq.json"
.venv/bin/python research/acquisition_rule.py --rule norm --set "$name" "$twins/shift-$name-gan50.json" "$t/shift-$name-eq.json"
