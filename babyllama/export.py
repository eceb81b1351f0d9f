"""`babyllama export`: read a model from any source into `Weights`, write it to any target; and
sentencepiece tokenizers into tokenizer.bin (`export-tokenizer`).

Sources are read by `loading.load_source` (a training checkpoint, a .bin or GGUF file, Meta's or a Hugging Face
checkpoint), with a LoRA adapter merged in when one is given (--lora; a Hugging Face export then also carries
the adapter in PEFT's layout, in OUT/adapter). Targets: a .bin of version 0/1/2 (--to bin), a Hugging Face
directory (--to hf), a GGUF file (--to gguf). The converters themselves live in `babyllama.interop`; this
module only picks them and the tokenizer that goes with the model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from . import formats, kernels
from .errors import BabyLlamaError
from .formats import Weights
from .loading import TOKENIZER_BIN, Source, find_tokenizer
from .tokenizer import Tokenizer

TARGETS = ("bin", "hf", "gguf")


def infer_target(out: str, to: str | None) -> str:
    """--to, else from OUT's name: .gguf -> gguf, .bin -> bin, anything else -> a Hugging Face directory."""
    if to:
        return to
    suffix = Path(out).suffix
    return {".gguf": "gguf", ".bin": "bin"}.get(suffix, "hf")


def export(src: Source, out: str | os.PathLike, to: str, *, version: int | None = None,
           group_size: int | None = None, dtype: str | None = None, tokenizer: str | None = None,
           lora: str | os.PathLike | None = None) -> list[Path]:
    """Write `src` as `to` at `out` (plus its tokenizer where the target carries one), with the LoRA adapter
    `lora` merged in; returns the paths written. Flags that do not apply to the target are refused rather than
    silently ignored."""
    if to not in TARGETS:
        raise BabyLlamaError(f"unknown export target '{to}' (choose {', '.join(TARGETS)})")
    if version is not None and to != "bin":
        raise BabyLlamaError(f"--version applies to .bin output, not --to {to}")
    if group_size is not None and (to != "bin" or version != 2):
        raise BabyLlamaError("--group-size applies to --version 2 (Q8_0) .bin output only")
    if dtype is not None and to == "bin":
        raise BabyLlamaError("--dtype applies to GGUF and Hugging Face output, not --to bin (use --version 2 for "
                             "Q8_0 .bin files)")
    if dtype is not None and to == "hf":
        from .interop.hf import HF_DTYPES

        if dtype not in HF_DTYPES:
            raise BabyLlamaError(f"--dtype {dtype} applies to GGUF output; Hugging Face output takes f32, f16 or bf16")
    tok = Path(tokenizer) if tokenizer else src.tokenizer
    if tok is not None and not tok.is_file():
        raise BabyLlamaError(f"tokenizer {tok}: no such file")
    out = Path(out)
    adapter = None
    if lora is not None:
        from .adapter import load_adapter, merge

        adapter, base = load_adapter(lora), src.weights
        src = replace(src, weights=merge(base, adapter, str(src.path)))
    if to != "hf":
        out.parent.mkdir(parents=True, exist_ok=True)
    if to == "bin":
        return _to_bin(src, out, 1 if version is None else version, group_size, tok, explicit=tokenizer is not None)
    if to == "hf":
        from .interop.hf import save_hf

        if tok is not None and tok.suffix != ".model" and tokenizer is None:
            tok = None  # only a sentencepiece model can go in a Hugging Face directory
        save_hf(src.weights, out, tok, dtype or "f32")
        if adapter is None:
            return [out]
        from .adapter import save_peft

        return [out, save_peft(adapter, base, out / "adapter")]
    from .interop.gguf import DTYPES, save_gguf

    if dtype is not None and dtype not in DTYPES:
        raise BabyLlamaError(f"unknown GGUF dtype '{dtype}' (choose {', '.join(DTYPES)})")
    save_gguf(src.weights, out, _gguf_vocab(src, tok), dtype or "f32")
    return [out]


def _to_bin(src: Source, out: Path, version: int, group_size: int | None, tok: Path | None,
            explicit: bool) -> list[Path]:
    if out.is_dir():
        raise BabyLlamaError(f"{out} is a directory; give the .bin file to write")
    formats.save(src.weights, out, version, group_size, quantize_q4=kernels.q4_0_blocks)
    written = [out]
    # a .bin model is run with tokenizer.bin beside it: write one when a tokenizer came with the model
    if tok is not None and tok.suffix == ".model":
        tokenizer = Tokenizer.from_sentencepiece(tok)
    elif tok is not None:
        tokenizer = Tokenizer.load(tok)
    elif src.vocab is not None:
        tokenizer = src.vocab.to_tokenizer()
    else:
        return written
    _check_vocab(tokenizer.vocab_size, src.weights.args.vocab_size, tok)
    tok_out = out.with_name(TOKENIZER_BIN)
    if tok_out.exists() and not explicit:
        if _same_tokenizer(tok_out, tokenizer):
            return written
        # one found beside the source does not replace the user's file; an explicit --tokenizer does
        print(f"note: kept the existing {tok_out}, which differs from the model's tokenizer "
              "(pass --tokenizer to replace it, or -z when running)", file=sys.stderr)
        return written
    if not (tok is not None and tok_out.exists() and tok_out.samefile(tok)):
        tokenizer.save(tok_out)
        written.append(tok_out)
    return written


def _same_tokenizer(path: Path, tokenizer: Tokenizer) -> bool:
    try:
        other = Tokenizer.load(path)
    except BabyLlamaError:
        return False
    return other.pieces == tokenizer.pieces and bool((other.scores == tokenizer.scores).all())


def _gguf_vocab(src: Source, tok: Path | None):
    """GGUF files carry their vocabulary: --tokenizer, else the source's, else tokenizer.bin beside the .bin."""
    from .interop.vocab import load_vocab

    if tok is not None:
        vocab = load_vocab(tok)
    elif src.vocab is not None:
        vocab = src.vocab
    elif src.kind == "bin":
        vocab = load_vocab(find_tokenizer(src.path, src.weights.args.vocab_size))
    else:
        raise BabyLlamaError("a GGUF file carries the model's tokenizer: pass --tokenizer TOK.model (or tokenizer.bin)")
    _check_vocab(len(vocab.tokens), src.weights.args.vocab_size, tok)
    return vocab


def _check_vocab(n_tokens: int, vocab_size: int, tok: Path | None) -> None:
    if n_tokens != vocab_size:
        raise BabyLlamaError(f"tokenizer {tok or ''} has {n_tokens} tokens but the model's vocab_size is "
                             f"{vocab_size}; pass the model's own tokenizer")


def describe(weights: Weights) -> str:
    a = weights.args
    return (f"dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), vocab {a.vocab_size}, "
            f"seq_len {a.max_seq_len}, rope_theta {a.rope_theta:g}, norm_eps {a.norm_eps:g}, "
            f"{'tied' if a.shared_classifier else 'untied'} classifier, {a.param_count() / 1e6:.2f}M params")


def report(paths: list[Path], weights: Weights) -> None:
    print(f"exported {describe(weights)}", file=sys.stderr)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)


def export_tokenizer(model: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A sentencepiece .model as a llama2.c tokenizer.bin (default: the same name with .bin)."""
    out = Path(out) if out else Path(model).with_suffix(".bin")
    Tokenizer.from_sentencepiece(model).save(out)
    return out
