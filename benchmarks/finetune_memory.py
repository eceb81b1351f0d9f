"""Peak memory of fine-tuning the 110M bench shape on the CPU: LoRA vs full fine-tuning (docs/finetune.md).

    python benchmarks/finetune_memory.py [--steps 3] [--batch-size 4] [--seq-len 256] [--lora-rank 8]

Each mode runs `babyllama finetune` in a fresh process on a random 110M model (bench.py's shape, fp32, cached
like `babyllama bench` caches its models; each run's checkpoint is removed after it) with Llama 2's 32000-token
tokenizer (../shared/fixtures) and a small chat set made here. The child samples its resident set size (VmRSS)
every 20 ms and reports the peak while the training steps run (after the model is built, before the final
checkpoint), and the peak of the whole process (ru_maxrss: loading the base, evaluating and checkpointing
included). Figures in MiB; "weights" is the model's fp32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("BABYLLAMA_SHARED", ROOT.parent / "shared"))
MiB = 1 << 20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(argv: list[str]) -> None:
    """Run the fine-tune in this process; print {"train_peak", "process_peak"} in bytes."""
    from babyllama.cli import main
    from babyllama.train import loop

    state = {"training": False, "peak": 0, "done": False, "before": 0}
    step = loop.Trainer.step

    def counted_step(self):
        if not state["before"]:
            state["before"] = rss()  # the model built, the optimizer made, nothing run yet
        state["training"] = True
        return step(self)

    def sample():
        while not state["done"]:
            if state["training"]:
                state["peak"] = max(state["peak"], rss())
            time.sleep(0.02)

    save = loop.Trainer.save_checkpoint

    def saving(self):  # the last checkpoint is not training
        state["training"] = False
        return save(self)

    loop.Trainer.step, loop.Trainer.save_checkpoint = counted_step, saving
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert main(argv) == 0
    state["done"] = True
    thread.join()
    print(json.dumps({"train_peak": state["peak"], "before_steps": state["before"],
                      "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    for flag in ("steps", "batch_size", "seq_len", "lora_rank"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if a.child is not None:
        child(a.child)
        return

    from babyllama.bench import cache_dir, model_file, shape_args

    tokenizer = SHARED / "fixtures" / "llama2-tokenizer.bin"
    if not tokenizer.is_file():
        sys.exit(f"{tokenizer} is absent (../shared/fixtures holds Llama 2's tokenizer)")
    model = model_file("110M", "fp32", cache_dir())
    work = cache_dir() / "finetune-memory"
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    story = "Once upon a time, there was a little dog named Max. Max liked to run in the park with his ball. " * 6
    (data / "chat.jsonl").write_text("".join(
        json.dumps({"prompt": f"Tell me story number {i}.", "response": story}) + "\n" for i in range(64)))
    weights = shape_args("110M").param_count() * 4
    print(f"110M shape, {weights / MiB:.0f} MiB of fp32 weights; batch {a.batch_size} x {a.seq_len} tokens, "
          f"{a.steps} steps, {os.environ.get('OMP_NUM_THREADS', 'all')} threads; load {os.getloadavg()[0]:.2f}")
    for mode, extra in (("lora", [f"--lora_rank={a.lora_rank}"]), ("full", ["--lora_rank=0"])):
        argv = ["finetune", f"--base={model}", f"--tokenizer={tokenizer}", f"--data={data}",
                f"--out_dir={work / mode}", f"--max_iters={a.steps}", f"--batch_size={a.batch_size}",
                f"--max_seq_len={a.seq_len}", "--eval_iters=1", "--eval_interval=1000", "--log_interval=1",
                "--device=cpu", *extra]
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
        finally:  # the run's checkpoint (1.3 GB for full fine-tuning) is not worth keeping
            shutil.rmtree(work / mode, ignore_errors=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        train_peak, process_peak, before = (r[k] / MiB for k in ("train_peak", "process_peak", "before_steps"))
        print(f"{mode:5s} peak RSS while training {train_peak:6.0f} MiB ({train_peak - weights / MiB:+.0f} over the "
              f"weights); before the first step {before:6.0f} MiB; whole process {process_peak:6.0f} MiB; "
              f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
