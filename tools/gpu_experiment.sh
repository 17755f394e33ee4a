#!/usr/bin/env bash
# An experiment on one lent GPU machine, in one call (docs/RESULTS.md, "On a GPU"):
#   1. the environment, and a CUDA smoke test (a tiny experiment with every method on generated data);
#   2. the experiment: METHODS x REPEATS on DATA, each method's repeats sharded over SHARDS processes that
#      share the GPU (`--seed K --repeats N` into one folder), then `experiment --collect` and `report`;
#   3. with the time left (CALL_S), benchmarks/speed.py --device cuda (ceilings, training/scoring speed).
# Everything worth keeping goes to $OUT: env/smoke/bench logs, speed_cuda.json, and NAME.tgz (the experiment
# folder without model weights, with report.html). Shards still running at DEADLINE_S are stopped and left out.
#
#   OUT=/tmp/out DATA=../shared/data/kermany-pediatric-128 NAME=kermany-paper bash tools/gpu_experiment.sh
#   DEVICE=cpu EXP_FLAGS="--epochs 1 --width 8" BENCH_FLAGS=--quick REPEATS=2 ...   # a dry run on a CPU
set -u
OUT=${OUT:?set OUT to the folder for results}
DATA=${DATA:-../shared/data/kermany-pediatric-128}  # a folder with manifest.csv
NAME=${NAME:-$(basename "$DATA")-${PRESET:-paper}}
PRESET=${PRESET:-paper}
METHODS=${METHODS:-u u+e u+d full ae ganomaly}  # variants and baselines (ae, ganomaly)
REPEATS=${REPEATS:-5}
SHARDS=${SHARDS:-2}            # processes per method; seeds 0..REPEATS-1 are split among them
DEADLINE_S=${DEADLINE_S:-440}  # seconds from the start by which the experiment's shards must be done
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
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
"$PY" -c "from cxr_oneclass.data.specs import load_dataset; print(load_dataset('csv:$DATA/manifest.csv', 64))" 2>&1 | tail -n 3
E="$W/$NAME"
common=(-q experiment --data "csv:$DATA/manifest.csv" --out "$E" --preset "$PRESET" --threads 1 --device "$DEVICE" $EXP_FLAGS)
variants=() baselines=()
for m in $METHODS; do
    case $m in ae | ganomaly) baselines+=("$m") ;; *) variants+=("$m") ;; esac
    case $m in ae | ganomaly) which=(--variants "" --baselines "$m") ;; *) which=(--variants "$m") ;; esac
    seed=0
    for ((k = 0; k < SHARDS; k++)); do  # contiguous seed ranges, sizes differing by at most one
        n=$(((REPEATS - seed) / (SHARDS - k)))
        [ "$n" -gt 0 ] || continue
        cxr "${common[@]}" "${which[@]}" --seed "$seed" --repeats "$n" > "$W/shard-$m-$seed.log" 2>&1 &
        seed=$((seed + n))
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
join() { local IFS=,; echo "$*"; }
cxr "${common[@]}" --variants "$(join "${variants[@]}")" --baselines "$(join "${baselines[@]}")" --seed 0 --repeats "$REPEATS" --collect > "$OUT/collect.log" 2>&1
tail -n 16 "$OUT/collect.log"
say "report"
cxr report "$E" > "$OUT/report.log" 2>&1 || say "report failed"
tail -n 5 "$OUT/report.log"
cp "$W"/shard-*.log "$E/" 2> /dev/null
tar czf "$OUT/$NAME.tgz" --exclude=model.safetensors -C "$W" "$NAME"
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
