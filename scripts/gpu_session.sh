#!/usr/bin/env bash
# What one call to a lent GPU machine ran (docs/RESULTS.md, "On a GPU"), kept to rerun it:
#   1. the environment, and a CUDA smoke test (a tiny experiment with every method on generated data);
#   2. the Kermany Table-1 experiment, 6 methods x 5 repeats, with repeats sharded over 12 processes that
#      share the one GPU (`--seed K --repeats N` into one folder), then `experiment --collect` and `report`;
#   3. with the time left (CALL_S), benchmarks/speed.py --device cuda (ceilings, training/scoring speed).
# Everything worth keeping goes to $OUT: env/smoke/bench logs, speed_cuda.json, and kermany-paper.tgz (the
# experiment folder without model weights, with report.html). Shards still running at the deadline are
# stopped and left out of the results.
#
#   OUT=/tmp/out DATA=../shared/data/kermany-pediatric-128 bash scripts/gpu_session.sh
set -u
OUT=${OUT:?set OUT to the folder for results}
DATA=${DATA:-../shared/data/kermany-pediatric-128}
DEADLINE_S=${DEADLINE_S:-440}  # seconds from the start by which the experiment's shards must be done
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu EXP_FLAGS="--epochs 1 --width 8" BENCH_FLAGS=--quick: a dry run of the script
EXP_FLAGS=${EXP_FLAGS:-}
BENCH_FLAGS=${BENCH_FLAGS:-}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CXR_ONECLASS_CACHE=/tmp/cxr-cache
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0)) s] $*"; }
cxr() { "$PY" -m cxr_oneclass "$@"; }
W=/tmp/gpu-session
mkdir -p "$W" "$OUT"

say "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "cpus: $(nproc)"
    "$PY" -c "import torch, sklearn, safetensors, matplotlib, onnxruntime, pydicom, tqdm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

say "smoke test on CUDA"
timeout 150 "$PY" -m cxr_oneclass -q experiment --device "$DEVICE" --out "$W/smoke" --repeats 1 --variants u,full --baselines ae,ganomaly \
    --data "phantom:n_train=64,n_val_normal=16,n_val_abnormal=16,n_test_normal=16,n_test_abnormal=16" \
    --image-size 32 --width 8 --batch-size 16 --epochs 1 > "$OUT/smoke.log" 2>&1
rc=$?
tail -n 12 "$OUT/smoke.log"
if [ $rc -ne 0 ]; then say "smoke test failed (rc $rc): stopping"; exit 1; fi

say "experiment: decode the data once into the cache"
"$PY" -c "from cxr_oneclass.data.sources import load_dataset; print(load_dataset('csv:$DATA/manifest.csv', 64))" 2>&1 | tail -n 3
E="$W/kermany-paper"
common=(-q experiment --data "csv:$DATA/manifest.csv" --out "$E" --preset paper --threads 1 --device "$DEVICE" $EXP_FLAGS)
for m in u u+e u+d full ae ganomaly; do
    case $m in ae | ganomaly) which=(--variants "" --baselines "$m") ;; *) which=(--variants "$m") ;; esac
    for shard in "0 2" "2 3"; do
        read -r seed n <<< "$shard"
        cxr "${common[@]}" "${which[@]}" --seed "$seed" --repeats "$n" > "$W/shard-$m-$seed.log" 2>&1 &
    done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ] && [ $(($(date +%s) - T0)) -lt "$DEADLINE_S" ]; do sleep 5; done
if [ "$(jobs -rp | wc -l)" -gt 0 ]; then
    say "deadline: stopping $(jobs -rp | wc -l) shard(s)"
    kill $(jobs -rp) 2> /dev/null
    sleep 2
fi
say "shards done"
grep -aoh "[a-z+]* repeat [0-9]/[0-9]: [^()]*([0-9]* s)" "$W"/shard-*.log
cxr "${common[@]}" --baselines ae,ganomaly --seed 0 --repeats 5 --collect > "$OUT/collect.log" 2>&1
tail -n 16 "$OUT/collect.log"
say "report"
cxr report "$E" > "$OUT/report.log" 2>&1 || say "report failed"
tail -n 5 "$OUT/report.log"
cp "$W"/shard-*.log "$E/" 2> /dev/null
tar czf "$OUT/kermany-paper.tgz" --exclude=model.safetensors -C "$W" kermany-paper
left=$((${CALL_S:-570} - ($(date +%s) - T0)))  # what is left of the call's time limit goes to the benchmark
if [ "$left" -gt 60 ]; then
    say "speed benchmark (at most $((left < 240 ? left : 240)) s)"
    timeout $((left < 240 ? left : 240)) "$PY" benchmarks/speed.py --device "$DEVICE" --score-batches 1024 $BENCH_FLAGS --out "$OUT/speed_cuda.json" > "$OUT/bench.log" 2>&1 \
        || say "benchmark failed or stopped (rc $?)"
    tail -n 30 "$OUT/bench.log"
else
    say "no time left for the speed benchmark"
fi
ls -la "$OUT"
say "done"
