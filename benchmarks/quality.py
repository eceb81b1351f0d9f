"""What quantization costs, measured: bits per byte (`babyllama eval`'s figure) of trained models on held-out
text in fp32, Q8_0 (runq.c's) and Q4_0 (llama.cpp's) side by side, and for GGUF files that llama.cpp's own
quantizer wrote (Q4_K_M, Q6_K, Q5_0, ...) as babyllama runs them (Q8_0/Q4_0 kept, other types converted to the
nearest of the two, with the conversion's error), plus each model's weight bytes read per decode token.

    python benchmarks/quality.py [--data ../shared/data/tinystories/valid.txt] [--max-stories N]
                                 [--model PATH[:TOKENIZER] ...] [--gguf-types Q4_K_M,Q6_K]

Models: the built-in one and ../shared/fixtures/stories260K.bin by default, plus any --model given. GGUF rows
need llama-cpp-python (its llama_model_quantize writes the K-quant files from our f32 GGUF export); K-quants need
rows of 256 weights, so llama.cpp falls back to other types on small models (its log says which). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def bits_per_byte(weights, tokenizer, data: str, max_stories: int | None) -> float:
    from babyllama.engine import Engine
    from babyllama.evaluate import evaluate

    return evaluate(Engine(weights), tokenizer, data, max_documents=max_stories, show_progress=False).bits_per_byte


def llamacpp_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    """llama.cpp's quantizer (llama-cpp-python's binding of llama_model_quantize) from an f32 GGUF, written under
    a temporary name and renamed: a quantize killed halfway leaves no file under `dst` for a later run to take as
    its cached model."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_PREFIX + ftype_name)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize {ftype_name} failed")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def model_and_tokenizer(spec: str) -> tuple[Path, Path]:
    """--model PATH[:TOKENIZER]: the model and its tokenizer (tokenizer.bin beside it where none is named)."""
    path, _, tok = spec.partition(":")
    return Path(path), Path(tok) if tok else Path(path).with_name("tokenizer.bin")


def check_args(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """The flags' mistakes, in one line each, before any model is loaded; the --model files and tokenizers."""
    from babyllama.errors import BabyLlamaError

    if args.max_stories is not None and args.max_stories < 1:
        raise BabyLlamaError(f"--max-stories must be >= 1, got {args.max_stories}")
    if not Path(args.data).is_file():
        raise BabyLlamaError(f"--data {args.data}: no such file")
    check_gguf_types(args.gguf_types)
    from babyllama import formats
    from babyllama.tokenizer import Tokenizer

    extra = [model_and_tokenizer(spec) for spec in args.model]
    for path, tok in extra:
        if not path.is_file():
            raise BabyLlamaError(f"--model {path}: no such file")
        if not tok.is_file():
            raise BabyLlamaError(f"--model {path}: no tokenizer {tok} (give one: --model {path}:TOKENIZER)")
        Tokenizer.load(tok, formats.read_header(path)[0].vocab_size)  # a damaged file said before any evaluation
    return extra


FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def check_gguf_types(spec: str, flag: str = "--gguf-types") -> None:
    """--gguf-types names llama.cpp file types its quantizer knows (where llama-cpp-python is there to ask; without
    it the GGUF rows say it is absent)."""
    from babyllama.errors import BabyLlamaError

    try:
        import llama_cpp
    except ImportError:
        return
    known = sorted(name.removeprefix(FTYPE_PREFIX) for name in dir(llama_cpp) if name.startswith(FTYPE_PREFIX))
    unknown = [t for t in spec.split(",") if t and t not in known]
    if unknown:
        raise BabyLlamaError(f"{flag}: unknown llama.cpp file type {', '.join(unknown)}; choose from "
                             f"{', '.join(known)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "tinystories" / "valid.txt"))
    ap.add_argument("--max-stories", type=int, default=None)
    ap.add_argument("--model", action="append", default=[], help="PATH[:TOKENIZER] of another trained model")
    ap.add_argument("--gguf-types", default="Q4_K_M,Q6_K,Q5_0",
                    help="llama.cpp file types to quantize the models into ('' for none)")
    args = ap.parse_args()
    extra = check_args(args)

    from babyllama import formats
    from babyllama.bench import decode_bytes
    from babyllama.interop.gguf import load_gguf, save_gguf
    from babyllama.interop.vocab import load_vocab
    from babyllama.loading import BUILTIN_MODEL, BUILTIN_TOKENIZER
    from babyllama.tokenizer import Tokenizer

    builtin_params = formats.load(BUILTIN_MODEL).args.param_count()
    models = [(f"built-in ({builtin_params / 1e6:.2f}M)", BUILTIN_MODEL, BUILTIN_TOKENIZER)]
    s260k = SHARED / "fixtures" / "stories260K.bin"
    if s260k.is_file():
        models.append(("stories260K", s260k, SHARED / "fixtures" / "tok512.bin"))
    models += [(path.name, path, tok) for path, tok in extra]

    print(f"data: {args.data}" + (f", first {args.max_stories} stories" if args.max_stories else ""), file=sys.stderr)
    print("| model | weights | bits per byte | vs fp32 | weight MB read per token | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    gguf_types = [t for t in args.gguf_types.split(",") if t]
    for name, path, tok_path in models:
        fp32 = formats.load(path).to_fp32()
        tok = Tokenizer.load(tok_path, fp32.args.vocab_size)
        base = None
        for kind in ("fp32", "q8_0", "q4_0"):
            w = fp32 if kind == "fp32" else fp32.quantize_as(kind)
            bpb = bits_per_byte(w, tok, args.data, args.max_stories)
            base = bpb if base is None else base
            print(f"| {name} | {w.kinds()} | {bpb:.4f} | {bpb - base:+.4f} | {decode_bytes(w) / 1e6:.2f} | |",
                  flush=True)
        if not gguf_types:
            continue
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(f"| {name} | GGUF | – | – | – | llama-cpp-python absent: no llama.cpp-quantized files |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / "f32.gguf"
            save_gguf(fp32, f32, load_vocab(tok_path))
            for ftype in gguf_types:
                out = Path(tmp) / f"{ftype}.gguf"
                try:
                    llamacpp_quantize(f32, out, ftype)
                except RuntimeError as e:
                    print(f"| {name} | GGUF {ftype} | – | – | – | {e} |")
                    continue
                notes = []
                w, vocab = load_gguf(out, keep_quantized=True, notes=notes)
                bpb = bits_per_byte(w, vocab.to_tokenizer(), args.data, args.max_stories)
                note = "; ".join(str(n) for n in notes) or "run as it is"
                print(f"| {name} | GGUF {ftype} as {w.kinds()} | {bpb:.4f} | {bpb - base:+.4f} | "
                      f"{decode_bytes(w) / 1e6:.2f} | {note} |", flush=True)


if __name__ == "__main__":
    from babyllama.errors import BabyLlamaError

    try:
        main()
    except BabyLlamaError as e:
        sys.exit(f"quality.py: error: {e}")
