#!/usr/bin/env bash
# Decode speed of llama2c_ref (our re-implementation of llama2.c's run.c / runq.c) on babyllama's cached
# bench models: 3 runs each of 256 greedy steps with OMP_NUM_THREADS=2, median "achieved tok/s" printed.
#   bash benchmarks/llama2c_ref/bench.sh [MODEL_NAME ...]     (default: all six; e.g. random-15M-fp32)
# Models come from `babyllama bench` ($BABYLLAMA_BENCH_DIR, else $BABYLLAMA_CACHE/bench or ~/.cache/babyllama/bench).
# Env: CC (default gcc), STEPS (256), RUNS (3), OMP_NUM_THREADS (2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${BABYLLAMA_BENCH_DIR:-${BABYLLAMA_CACHE:-$HOME/.cache/babyllama}/bench}
steps=${STEPS:-256}
runs=${RUNS:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

mkdir -p "$here/build"
exe=$here/build/llama2c_ref
# run.c's README build line for speed
${CC:-gcc} -Ofast -march=native -fopenmp "$here/llama2c_ref.c" -o "$exe" -lm
echo "built $exe ($(${CC:-gcc} --version | head -1)); OMP_NUM_THREADS=$OMP_NUM_THREADS, -n $steps, $runs runs each"

if [ $# -gt 0 ]; then
    names=("$@")
else
    names=()
    for size in 15M 42M 110M; do
        for fmt in fp32 q8_0; do names+=("random-$size-$fmt"); done
    done
fi

printf '%-20s %12s %8s   %s\n' model "median tok/s" tokens "runs (tok/s)"
for name in "${names[@]}"; do
    model=$dir/$name.bin
    if [ ! -f "$model" ]; then
        printf '%-20s absent: %s (build it with `babyllama bench`)\n' "$name" "$model"
        continue
    fi
    rates=()
    ntok=0
    for _ in $(seq "$runs"); do
        err=$("$exe" "$model" -n "$steps" 2>&1 >"$here/build/last_ids.txt")
        rate=$(printf '%s\n' "$err" | sed -n 's/^achieved tok\/s: //p')
        [ -n "$rate" ] || { echo "$name: no tok/s reported: $err" >&2; exit 1; }
        rates+=("$rate")
        ntok=$(wc -w <"$here/build/last_ids.txt")
    done
    median=$(printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
    printf '%-20s %12.1f %8s   %s\n' "$name" "$median" "$ntok" "$(printf '%.1f ' "${rates[@]}")"
done
