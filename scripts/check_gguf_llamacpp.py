"""Check a GGUF export in llama.cpp itself: greedy tokens from llama.cpp vs babyllama's engine.

llama.cpp is not a dependency of babyllama; this script uses the prebuilt llama.cpp library shipped
in the `llama-cpp-cffi` wheel (CPU backend), which needs no compiler:

    pip install --no-deps --target /tmp/lcpp llama-cpp-cffi==0.3.1  # later wheels need a newer libstdc++
    PYTHONPATH=/tmp/lcpp python scripts/check_gguf_llamacpp.py \
        model.gguf model.bin tokenizer.bin --prompt "Once upon a time" -n 100

It feeds the same prompt ids to both, decodes greedily and reports the first position where they differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from babyllama import formats
from babyllama.engine import Engine
from babyllama.generate import generate
from babyllama.sampler import Sampler
from babyllama.tokenizer import Tokenizer


def load_llamacpp_cpu():
    """The CPU build of llama.cpp inside llama-cpp-cffi, loaded without its package's heavy imports."""
    import importlib.util

    spec = importlib.util.find_spec("llama")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llama-cpp-cffi is not importable: see this script's docstring")
    folder = Path(spec.submodule_search_locations[0])
    so = next(folder.glob("_llama_cpp_cpu*.so"))
    ext = importlib.util.spec_from_file_location("_llama_cpp_cpu", so)
    mod = importlib.util.module_from_spec(ext)
    ext.loader.exec_module(mod)
    return mod.ffi, mod.lib


def llamacpp_greedy(gguf_path: str, prompt: list[int], n_new: int) -> list[int]:
    ffi, lib = load_llamacpp_cpu()

    lib.llama_backend_init()
    model = lib.llama_load_model_from_file(gguf_path.encode(), lib.llama_model_default_params())
    if model == ffi.NULL:
        raise SystemExit(f"llama.cpp could not load {gguf_path}")
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = len(prompt) + n_new + 8
    cparams.n_batch = cparams.n_ctx
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = lib.llama_new_context_with_model(model, cparams)
    n_vocab = lib.llama_n_vocab(model)
    out, feed = [], list(prompt)
    for _ in range(n_new):
        buf = ffi.new("llama_token[]", feed)
        if lib.llama_decode(ctx, lib.llama_batch_get_one(buf, len(feed))) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * n_vocab), dtype=np.float32)
        nxt = int(np.argmax(logits))
        out.append(nxt)
        feed = [nxt]
    lib.llama_free(ctx)
    lib.llama_free_model(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("model", help="the .bin the GGUF was exported from")
    ap.add_argument("tokenizer")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("-n", type=int, default=100)
    a = ap.parse_args()
    w = formats.load(a.model)
    tok = Tokenizer.load(a.tokenizer, w.args.vocab_size)
    prompt = tok.encode(a.prompt, bos=True)
    ours = list(generate(Engine(w), prompt, len(prompt) + a.n - 1, Sampler(0.0)))
    theirs = llamacpp_greedy(a.gguf, prompt, len(ours))
    same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), len(ours))
    print(f"llama.cpp: {tok.decode(prompt + theirs)!r}")
    print(f"babyllama: {tok.decode(prompt + ours)!r}")
    print(f"identical greedy tokens: {same} of {len(ours)}")


if __name__ == "__main__":
    main()
