"""`babyllama bench`: decode, prefill and batched throughput of random-weight models of the tinyllamas
shapes, fast path side by side with the plain NumPy baseline, in one run on one machine.

Models are built once (random weights, vocab 32000) and cached as .bin files (fp32 version 1 and Q8_0
version 2) under ~/.cache/babyllama/bench or --cache-dir / $BABYLLAMA_BENCH_DIR. Each (shape, format,
path) is measured in a fresh subprocess so that its peak RSS is its own; every figure is the median of
--repeats runs. Speeds are tokens per second of wall time; the machine is described above the table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .config import ModelArgs

SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
    "42M": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=1024),
    "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024),
    # TinyLlama-1.1B's shape (grouped-query attention): a 1B-class model for GPU runs (4.4 GB fp32 file)
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
}
FORMATS = {"fp32": 1, "q8_0": 2}
PATHS = ("plain", "fast")


def shape_args(name: str) -> ModelArgs:
    return ModelArgs(vocab_size=32000, **SHAPES[name])


def cache_dir(override: str | None = None) -> Path:
    base = override or os.environ.get("BABYLLAMA_BENCH_DIR") or Path.home() / ".cache" / "babyllama" / "bench"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def random_model(args: ModelArgs, seed: int = 0):
    """Random weights of `args`' shape (std 0.02 like a fresh init, norm gains 1): a `Weights`."""
    import numpy as np

    from .formats import Weights

    rng = np.random.default_rng(seed)
    L, d, h, kv, V = args.n_layers, args.dim, args.hidden_dim, args.kv_dim, args.vocab_size

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    emb = r(V, d)
    ones = np.ones((L, d), dtype=np.float32)
    return Weights(args, emb, rms_att=ones, rms_ffn=ones.copy(), rms_final=np.ones(d, dtype=np.float32),
                   wq=r(L, d, d), wk=r(L, kv, d), wv=r(L, kv, d), wo=r(L, d, d),
                   w1=r(L, h, d), w2=r(L, d, h), w3=r(L, h, d), wcls=emb)


def model_file(shape: str, fmt: str, directory: Path) -> Path:
    """The cached model file for (shape, fmt), built on first use."""
    from . import formats

    path = directory / f"random-{shape}-{fmt}.bin"
    if not path.exists():
        print(f"building {path.name} ...", file=sys.stderr, flush=True)
        formats.save(random_model(shape_args(shape)), path, version=FORMATS[fmt])
    return path


# ------------------------------------------------------------------------------ one measurement (child)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def measure(path: Path, plain: bool, repeats: int, tokens: int, batch: int, prompt_len: int,
            mmap: bool = True, device: str = "numpy", compile: bool = False) -> dict:
    """Time one model file on one path (the NumPy engine, or the PyTorch one on `device`); returns medians
    (tok/s, ms) and peak RSS (MiB)."""
    import resource

    import numpy as np

    from . import formats
    from .api import make_engine
    from .generate import Batch, Sequence
    from .sampler import Sampler

    if device != "numpy":  # torch and the CUDA context load once per process: in no shape's TTFT
        import torch

        if device.startswith("cuda"):
            torch.cuda.init()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    weights = formats.load(path, mmap=mmap)
    engine = make_engine(weights, device, plain, compile)
    seq_len = weights.args.max_seq_len
    prompt = [1] + rng.integers(3, weights.args.vocab_size, prompt_len - 1).tolist()

    def first_token() -> float:
        b = Batch(engine, 1)
        b.add(Sequence(prompt[:16], Sampler(0.0), seq_len))
        b.step()
        return time.perf_counter()

    ttft = first_token() - t0  # load (memory map) + engine + 16-token prompt + first sample

    def decode(n_seq: int, n_tok: int) -> float:
        b = Batch(engine, n_seq)
        seqs = [b.add(Sequence([1, 3 + i], Sampler(0.0), min(seq_len, n_tok + 2), frozenset()))
                for i in range(n_seq)]
        b.step()  # the two-token prompts and first tokens: not counted (run.c times from the 2nd step)
        start, n = time.perf_counter(), 0
        while not all(s.done for s in seqs):
            n += len(b.step())
        return n / (time.perf_counter() - start)

    def prefill() -> float:
        b = Batch(engine, 1, max_tokens_per_step=prompt_len)
        b.add(Sequence(list(prompt), Sampler(0.0), seq_len))
        start = time.perf_counter()
        b.step()
        return prompt_len / (time.perf_counter() - start)

    if compile:  # compilation happens on the first decode step of each batch size: not part of the timings
        decode(1, 4)
        decode(batch, 4)
    n_tok = min(tokens, seq_len - 2)
    res = {"ttft_ms": 1000 * ttft}
    res["decode"] = _median([decode(1, n_tok) for _ in range(repeats)])
    res["prefill"] = _median([prefill() for _ in range(repeats)])
    res["batch"] = _median([decode(batch, max(8, n_tok // 4)) for _ in range(repeats)])
    res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["decode_tokens"] = n_tok
    res["repeats"] = repeats
    return res


# ---------------------------------------------------------------------------------- the table (parent)


def kernels_description() -> str:
    """Which kernel backend the fast rows use, and with what."""
    from . import kernels

    name, k = kernels.backend()
    if name == "native":
        version = subprocess.run([k.compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        return f"native C ({version}, {k.threads()} OpenMP threads)"
    if name == "numba":
        import numba
        return f"numba {numba.__version__} (no C compiler)"
    return "NumPy only (no C compiler, no numba)"


def describe_machine() -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nb = kernels_description()
    blas = ""
    try:
        cfg = np.show_config(mode="dicts")
        blas = " " + cfg["Build Dependencies"]["blas"]["name"] + " " + cfg["Build Dependencies"]["blas"]["version"]
    except Exception:  # noqa: BLE001 - older numpy: no dict mode; the description is informative only
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
               if k in os.environ}
    return (f"{cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, NumPy {np.__version__}"
            f"{blas}; kernels: {nb}; thread settings {threads or 'default'}; load average at start "
            f"{' '.join(f'{x:.2f}' for x in load)}")


def reference_decode(exe: str, model: Path, tokens: int, repeats: int) -> float:
    """Median "achieved tok/s" of a llama2.c-style executable (benchmarks/llama2c_ref, or run.c/runq.c
    themselves) decoding `tokens` positions greedily from BOS and token 3 on `model` (the prompt our decode
    figure uses too; from BOS alone a random model with a shared classifier tends to answer BOS and stop)."""
    speeds = []
    for _ in range(repeats):
        cmd = [exe, str(model), "-n", str(tokens), "-i", "3"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = [line for line in out.stderr.splitlines() if line.startswith("achieved tok/s:")]
        if out.returncode != 0 or not found:
            raise RuntimeError(f"reference {exe} failed on {model.name}: {out.stderr.strip()[-500:]}")
        speeds.append(float(found[-1].split(":", 1)[1]))
    return _median(speeds)


def run(shapes: list[str], repeats: int, tokens: int, batch: int, prompt_len: int, directory: Path,
        paths: tuple[str, ...] = PATHS, plain_tokens: int = 32, plain_repeats: int = 1,
        reference: str | None = None, mmap: bool = True, device: str = "numpy", compile: bool = False
        ) -> list[dict]:
    """The table's rows. On a PyTorch device (cpu, cuda) only the fp32 files are measured (the PyTorch engine
    runs Q8_0 files dequantized) and there is no plain row."""
    rows = []
    formats_measured = tuple(FORMATS) if device == "numpy" else ("fp32",)
    if device != "numpy":
        paths = ("fast",)
    for shape in shapes:
        if reference:
            row = {"shape": shape, "path": "reference"}
            for fmt in FORMATS:
                print(f"measuring {shape} {fmt} with {reference} ...", file=sys.stderr, flush=True)
                row[fmt] = {"decode": reference_decode(reference, model_file(shape, fmt, directory), tokens, repeats)}
            rows.append(row)
        for path_name in paths:
            mapped = mmap or path_name == "plain"  # the plain baseline always maps the file
            row = {"shape": shape, "path": path_name, "mmap": mapped, "device": device, "compile": compile}
            for fmt in formats_measured:
                model = model_file(shape, fmt, directory)
                n = tokens if path_name == "fast" else min(tokens, plain_tokens)
                reps = repeats if path_name == "fast" else min(repeats, plain_repeats)
                cmd = [sys.executable, "-m", "babyllama.bench", "--child", str(model), path_name, str(reps),
                       str(n), str(batch), str(prompt_len), "mmap" if mapped else "no-mmap", device,
                       "compile" if compile else "eager"]
                print(f"measuring {shape} {fmt} {path_name} ...", file=sys.stderr, flush=True)
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"bench child failed: {out.stderr.strip()[-2000:]}")
                row[fmt] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
    return rows


def table(rows: list[dict], batch: int, prompt_len: int) -> str:
    head = ("| shape | path | decode fp32 tok/s | decode Q8_0 tok/s | prefill fp32 tok/s | prefill Q8_0 tok/s "
            f"| B={batch} decode fp32 tok/s | B={batch} decode Q8_0 tok/s | TTFT fp32 / Q8_0 ms "
            "| peak RSS fp32 / Q8_0 MiB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        f, q = r["fp32"], r.get("q8_0")  # q8_0 is not measured on a PyTorch device

        def cell(key: str, spec: str, d: dict | None = q) -> str:
            return "–" if d is None else format(d[key], spec)

        if r["path"] == "reference":
            lines.append(f"| {r['shape']} | C reference | {f['decode']:.1f} | {q['decode']:.1f} |" + " – |" * 6)
            continue
        label = "plain NumPy" if r["path"] == "plain" else "babyllama" + ("" if r.get("mmap", True) else " --no-mmap")
        if r.get("device", "numpy") != "numpy":
            label += f" --device {r['device']}" + (" --compile" if r.get("compile") else "")
        lines.append(
            f"| {r['shape']} | {label} | {f['decode']:.1f} | {cell('decode', '.1f')} | {f['prefill']:.0f} | "
            f"{cell('prefill', '.0f')} | {f['batch']:.1f} | {cell('batch', '.1f')} | {f['ttft_ms']:.0f} / "
            f"{cell('ttft_ms', '.0f')} | {f['rss_mib']:.0f} / {cell('rss_mib', '.0f')} |")
    plain = [r for r in rows if r["path"] == "plain"]
    plain_note = (f" (plain rows: {plain[0]['fp32']['decode_tokens']} tokens, {plain[0]['fp32']['repeats']} "
                  "run(s), the reference path being slow)" if plain else "")
    notes = (f"decode: greedy, one sequence, tokens after the first{plain_note}; prefill: one {prompt_len}-token "
             f"prompt in one forward pass; B={batch}: aggregate tok/s of {batch} sequences decoded together; "
             "TTFT: memory-map load + engine set-up (--device: the model built on the device) + 16-token "
             "prompt + first token, in process.")
    ratios = _ratios(rows)
    return "\n".join(lines) + "\n\n" + notes + "\n" + (f"\n{ratios}\n" if ratios else "")


def _ratios(rows: list[dict]) -> str:
    """babyllama's decode speed over the C reference's, per shape and format, when both were measured."""
    ref = {r["shape"]: r for r in rows if r["path"] == "reference"}
    ours = {r["shape"]: r for r in rows if r["path"] == "fast" and r.get("device", "numpy") == "numpy"}
    parts = [f"{shape} fp32 {ours[shape]['fp32']['decode'] / r['fp32']['decode']:.2f}x, "
             f"Q8_0 {ours[shape]['q8_0']['decode'] / r['q8_0']['decode']:.2f}x"
             for shape, r in ref.items() if shape in ours]
    return ("decode speed of babyllama / C reference: " + "; ".join(parts)) if parts else ""


def _child(argv: list[str]) -> None:
    model, path_name, repeats, tokens, batch, prompt_len, mapping, device, compiled = argv
    res = measure(Path(model), path_name == "plain", int(repeats), int(tokens), int(batch), int(prompt_len),
                  mmap=mapping == "mmap", device=device, compile=compiled == "compile")
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
