#!/usr/bin/env bash
# The quantized products of one decode step against the memory speed of the moment, on a VM whose memory bandwidth
# switches between phases within seconds (a run of `bench` then meets several): the bandwidth probe bench uses
# (two threads reading 512 MiB) and benchmarks/decode_rates.c's 110M shape on two threads, alternately, for SECONDS.
# Each line: the time, the probe's GB/s, then each weight type's GB/s in the decode_rates run that followed it.
# A decode run that met a fast window shows in its own figures (they pass the slow phase's probe).
# TYPES picks decode_rates' weight types (its digits; all six of the 1B shape take ~5 GB of memory).
#   bash benchmarks/memory_windows.sh [SECONDS=600] [SHAPE=110M] [TYPES=123456] > windows.log
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}; shape=${2:-110M}; types=${3:-123456}; py=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exe=$work/decode_rates
cc -O3 -march=native -fopenmp-simd -pthread benchmarks/decode_rates.c babyllama/csrc/kernels.c -o "$exe" -lm
end=$(( $(date +%s) + seconds ))
while [ "$(date +%s)" -lt "$end" ]; do
    probe=$("$py" -c "from babyllama.bench import measure_bandwidth; print(round(measure_bandwidth()['gbps'], 1))")
    rates=$("$exe" "$shape" 2 1 16 "$types" | awk '/thread/ {name = $1; for (i = 2; $i != "2"; i++) name = name "_" $i;
                                                printf "%s %s  ", name, $(NF - 6)}')
    echo "$(date -u +%H:%M:%S) probe $probe | $rates"
done
