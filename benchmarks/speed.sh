#!/usr/bin/env bash
# Every measurement behind docs/speed.md and the README's speed table, in one command, for a quiet window:
#
#   RUN=/path/to/llama2.c/run RUNQ=/path/to/llama2.c/runq bash benchmarks/speed.sh [OUT_DIR]
#
# RUN / RUNQ: llama2.c's run.c and runq.c built from its source (gcc -Ofast -march=native -fopenmp run.c -o run
# -lm, the same for runq.c); without them the llama2.c rows are left out. llama.cpp rows need llama-cpp-python
# (pip install 'babyllama[bench]'). PAUSE_PID: a process to stop (SIGSTOP) while measuring and resume
# (SIGCONT) afterwards, even on failure, e.g. a background training run. Writes OUT_DIR (default out/speed):
#   idle.md     every model (built-in, 15M, 42M, 110M) x format (fp32, Q8_0, Q4_0): babyllama, the plain
#               NumPy baseline, run.c/runq.c, llama.cpp (and babyllama on llama.cpp's GGUF files), with the
#               memory bandwidth of the same run
#   busy.md     one spinning co-runner: default threads beside --threads 1 and 2 (built-in, 15M, 110M)
#   quality.md  bits per byte in fp32, Q8_0, Q4_0 and of llama.cpp-quantized GGUF files (benchmarks/quality.py)
#   gguf.md     llama.cpp-quantized 110M GGUF files run by babyllama: load, RSS, decode (benchmarks/gguf_files.py)
# Takes about an hour on 2 cores (the plain baseline and 110M dominate).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-out/speed}
mkdir -p "$out"
py=${PYTHON:-python}

if [ -n "${PAUSE_PID:-}" ]; then
    kill -STOP "$PAUSE_PID"
    trap 'kill -CONT "$PAUSE_PID"' EXIT
fi

refs=()
[ -n "${RUN:-}" ] && refs+=(--reference "$RUN")
[ -n "${RUNQ:-}" ] && refs+=(--reference-q "$RUNQ")
llamacpp=()
"$py" -c "import llama_cpp" 2>/dev/null && llamacpp=(--llamacpp --gguf)

echo "load before: $(cat /proc/loadavg)" | tee "$out/load.txt"
"$py" -m babyllama bench --shapes builtin,15M,42M,110M "${refs[@]}" "${llamacpp[@]}" --output "$out/idle.md"
"$py" -m babyllama bench --shapes builtin,15M,110M --formats fp32,q8_0,q4_0 --no-plain --busy 1 \
    --thread-settings default,1,2 --output "$out/busy.md"
"$py" "$here/quality.py" > "$out/quality.md"
if [ ${#llamacpp[@]} -gt 0 ]; then
    "$py" "$here/gguf_files.py" --shape 110M > "$out/gguf.md"
fi
echo "load after: $(cat /proc/loadavg)" | tee -a "$out/load.txt"
echo "wrote $out/{idle,busy,quality,gguf}.md"
