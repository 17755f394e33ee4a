#!/usr/bin/env bash
# Issue 14, session 11: the GAN retrained with its films re-imaged (gan_acquisition_p 0.5), GAN only, joined with
# S's saved readings of the twins (research/detector_readings.py --out runs/x14c10 ... --tag f25k100a50), then the
# 11 + 7 held-out shifts on variant and twins, and the rule fixed before the runs (acquisition_rule.py --rule gan).
# One torch job at a time (2 cores).
#   bash research/gan_acquisition.sh runs/x14c11 runs/x14c10
set -euo pipefail
t=$1; twins=$2
mkdir -p "$t"
train() { # data-set seed p name
  [ -f "$t/$4/config.json" ] && return 0
  { time .venv/bin/cxr-oneclass -q train --data "csv:../shared/data/$1/manifest.csv" --out "$t/$4" --seed "$2" \
      --detector-width 0 --gan-acquisition-p "$3" ; } > "$t/$4.log" 2>&1
}
train nih-pneumonia-128 0 0 nih-gan0-s0  # twin check: its networks must equal the twins' GAN (runs/x14i)
for s in 0 1 2; do train nih-pneumonia-128 "$s" 0.5 "nih-gan50-s$s"; done
for s in 0 1 2; do train kermany-pediatric-128 "$s" 0.5 "kermany-gan50-s$s"; done
.venv/bin/python - "$t" <<'PY'
import sys
from cxr_oneclass.runs import load_run
a, _, _ = load_run(f"{sys.argv[1]}/nih-gan0-s0")
b, _, _ = load_run("runs/x14i/nih-det16-s0")
sa, sb = a.state_dict(), b.state_dict()
nets = [k for k in sa if k.split(".")[0] in ("U", "D", "E")]  # the score statistics differ: no seg term at width 0
print("twin check: GAN networks equal to runs/x14i's:", all(sa[k].equal(sb[k]) for k in nets), len(nets), "tensors")
PY
for set in nih kermany; do
  for s in 0 1 2; do ln -f "$twins/$set-det16-s$s-f25k100a50.safetensors" "$t/$set-gan50-s$s-f25k100a50.safetensors"; done
  .venv/bin/python research/detector_readings.py "$t/$set"-gan50-s{0,1,2} --out "$t" --tag f25k100a50 --lung-floor 0.25 \
      --lung-keep 1.0 --set acquisition_p=0.5 --set detector_width=16 --strategies pick --write-runs pick
  .venv/bin/python research/shift_robustness.py "$t/$set"-gan50-s{0,1,2}-f25k100a50-pick --json "$t/shift-$set-gan50.json"
  .venv/bin/python research/shift_robustness.py "$twins/$set"-det16-s{0,1,2}-f25k100a50-pick --json "$t/shift-$set-a50.json"
done
.venv/bin/python research/acquisition_rule.py --rule gan --set nih "$t/shift-nih-a50.json" "$t/shift-nih-gan50.json" \
    --set kermany "$t/shift-kermany-a50.json" "$t/shift-kermany-gan50.json"
