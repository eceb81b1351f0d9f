"""`babyllama export` and `babyllama export-tokenizer`: convert models and tokenizers."""

from __future__ import annotations

import argparse

from ..config import FLOAT_TYPES
from ..errors import BabyLlamaError, UsageError
from .common import chat_template, non_empty_path, positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="convert models: .bin, GGUF, Meta, Hugging Face, checkpoint -> .bin (v0-v3), Hugging Face, "
                       "GGUF",
        description="Convert a model from one format to another. OUT is a .bin file (--to bin, versions 0-2 as "
                    "llama2.c's export.py, 3 Q4_0), a Hugging Face directory (--to hf) or a .gguf file (--to gguf); "
                    "without --to it is a .bin where --version is given, else guessed from OUT's name in any case "
                    "(.bin, .gguf, else a directory).")
    # optional for argparse only: `--hf DIR OUT` puts OUT among --hf's values (see output_path)
    p.add_argument("output", metavar="OUT", nargs="?", type=non_empty_path,
                   help="file or directory to write (required: before the source, or after --hf's folder or files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", type=non_empty_path,
                     help="a training checkpoint, babyllama's or llama2.c train.py's (ckpt.pt or its folder)")
    src.add_argument("--model", metavar="FILE", type=non_empty_path,
                     help="a llama2.c/babyllama .bin (any version) or a .gguf file")
    src.add_argument("--meta-llama", metavar="DIR", type=non_empty_path,
                     help="Meta's checkpoint folder (params.json, consolidated.*.pth)")
    src.add_argument("--hf", nargs="+", metavar="DIR_OR_FILES", type=non_empty_path,
                     help="a Hugging Face Llama folder, or its weight files with config.json beside them")
    p.add_argument("--lora", metavar="ADAPTER", default=None, type=non_empty_path,
                   help="merge this LoRA adapter (from `babyllama finetune` on the source model) into the weights; "
                        "a Hugging Face export also gets the adapter in PEFT's layout in OUT/adapter")
    p.add_argument("--to", choices=("bin", "hf", "gguf"),
                   help="output format (default: .bin with --version, else from OUT's name)")
    p.add_argument("--version", type=int, choices=(-1, 0, 1, 2, 3), default=None,
                   help=".bin version: 0 legacy fp32 (llama2.c's default, what run.c reads), 1 fp32, 2 Q8_0, 3 Q4_0 "
                        "(babyllama only) (default 1); -1: a Hugging Face directory, as llama2.c's export.py")
    p.add_argument("--group-size", type=int, default=None, help="Q8_0 group size for version 2 (64, or less)")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0", "q4_0"), default=None, type=dtype_name,
                   help="tensor type of GGUF output, or of Hugging Face output (f32, f16, bf16; llama2.c's fp32 and "
                        "fp16 and PyTorch's float32, float16, bfloat16 too) (default f32)")
    p.add_argument("-z", "--tokenizer", metavar="TOK", type=non_empty_path,
                   help="sentencepiece .model or tokenizer.bin to go with the model (as run's -z) (default: the "
                        "source's own tokenizer.model / tokenizer.bin when there is one)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="context length to record (default: the source's; Meta checkpoints: 4096)")
    p.add_argument("--chat-template", default=None,
                   help="the chat template the model takes (llama2 or babyllama), written into a GGUF file or a "
                        "Hugging Face folder's tokenizer_config.json, or a .bin's card NAME.json (default: the "
                        "source's, from its card or its file; llama2 for a merged --lora)")
    p.set_defaults(func=cmd_export)

    t = sub.add_parser("export-tokenizer", help="convert a sentencepiece .model into llama2.c's tokenizer.bin",
                       description="Convert a sentencepiece .model into llama2.c's tokenizer.bin (the bytes "
                                   "llama2.c's tokenizer.py writes); its <unk>, <s>, </s> must be ids 0, 1, 2.")
    t.add_argument("model", nargs="?", type=non_empty_path, help="the sentencepiece .model")
    t.add_argument("-t", "--tokenizer-model", default=None, metavar="MODEL", type=non_empty_path,
                   help="the same, by llama2.c tokenizer.py's flag")
    t.add_argument("-o", "--output", default=None, type=non_empty_path,
                   help="the .bin to write, its folders created (default: MODEL with .bin)")
    t.set_defaults(func=cmd_export_tokenizer)


def dtype_name(text: str) -> str:
    """--dtype in export's names (f32, f16, bf16), whichever family of names it is given in."""
    return FLOAT_TYPES.get(text, text)


def target(args: argparse.Namespace) -> str:
    """--to, or OUT's name; llama2.c's `--version -1` is its Hugging Face export, and another --version its .bin
    whatever OUT is named (as export.py writes it), but for a name that says GGUF."""
    from ..export import infer_target

    if args.version == -1:
        if args.to not in (None, "hf"):
            raise BabyLlamaError(f"--version -1 is Hugging Face output, not --to {args.to}")
        args.version = None
        return "hf"
    if args.version is not None and args.to is None:
        if infer_target(args.output, None) == "gguf":
            raise BabyLlamaError(f"--version {args.version} is llama2.c .bin output, and {args.output} is named as a "
                                 "GGUF file: name it .bin, or pass --to bin")
        return "bin"
    return infer_target(args.output, args.to)


def output_path(args: argparse.Namespace) -> str:
    """OUT: given before the source flag, or after `--hf`'s folder or files, whose values it then ends (and is
    taken from)."""
    from ..loading import HF_FILE_SUFFIXES

    if args.output is not None:
        return args.output
    if args.hf is not None and len(args.hf) > 1 and not args.hf[-1].endswith(HF_FILE_SUFFIXES):
        return args.hf.pop()
    raise UsageError("export needs OUT: the file or directory to write")


def quantized_target(args: argparse.Namespace, to: str) -> str | None:
    """What the output's matrices are written in where each can be quantized alone (llama.cpp's Q4_0 or Q8_0 blocks
    of a GGUF file, its Q4_0 blocks of a version 3 .bin, runq.c's Q8_0 groups of a version 2 .bin at their default
    size), so that a checkpoint read in another type can be quantized as it is read (loading.load_source) into the
    very bytes the writer would make; None where the writer needs the weights as they are: a LoRA adapter merges
    into fp32 weights."""
    if args.lora is not None:
        return None
    if to == "gguf" and args.dtype in ("q4_0", "q8_0"):
        return f"gguf {args.dtype}"  # interop.state_dict.GGUF_BLOCKS
    if to == "bin" and args.version == 3:
        return "q4_0"
    if to == "bin" and args.version == 2 and args.group_size is None:
        return "q8_0"
    return None


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export, report
    from ..loading import load_source

    args.output = output_path(args)
    if args.group_size is not None and args.group_size <= 0:
        raise BabyLlamaError(f"--group-size must be positive, got {args.group_size}")
    to = target(args)
    src = load_source(checkpoint=args.checkpoint, model=args.model, meta_llama=args.meta_llama, hf=args.hf,
                      max_seq_len=args.max_seq_len, quantize=quantized_target(args, to))
    written = export(src, args.output, to, version=args.version, group_size=args.group_size, dtype=args.dtype,
                     tokenizer=args.tokenizer, lora=args.lora, chat_template=chat_template(args, {}))
    report(written, src.weights)
    return 0


def cmd_export_tokenizer(args: argparse.Namespace) -> int:
    from ..export import export_tokenizer

    if args.model is None and args.tokenizer_model is None:
        raise UsageError("export-tokenizer needs the sentencepiece .model: as MODEL or as -t/--tokenizer-model")
    if args.model is not None and args.tokenizer_model is not None:
        raise UsageError("give the sentencepiece .model once: as MODEL or as -t/--tokenizer-model")
    print(f"wrote {export_tokenizer(args.model or args.tokenizer_model, args.output)}")
    return 0
