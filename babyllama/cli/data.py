"""`babyllama data`: download TinyStories, train a vocabulary, pretokenize."""

from __future__ import annotations

from ..errors import BabyLlamaError
from .common import Parser


def add(sub) -> None:
    p = sub.add_parser("data", help="prepare training data: download, train-vocab, pretokenize",
                       description="Prepare training data (llama2.c's tinystories.py).")
    steps = p.add_subparsers(dest="data_command", metavar="STEP", parser_class=Parser, required=True)

    d = steps.add_parser("download", help="download and unpack TinyStories (or another .tar.gz with --url)")
    d.add_argument("--url", default=None, help="archive URL (default: TinyStories_all_data.tar.gz on Hugging Face)")
    d.add_argument("--sha256", default=None, help="expected sha256 of the archive (default: what the server says)")
    d.add_argument("--data-dir", default="data", help="where the archive and its contents go (data)")
    d.set_defaults(func=cmd_data_download)

    v = steps.add_parser("train-vocab", help="train a sentencepiece BPE vocabulary (llama2.c's settings)")
    v.add_argument("--vocab-size", type=int, required=True, help="number of tokens, e.g. 4096")
    v.add_argument("--input", default=DEFAULT_INPUT, help=f"text/jsonl/json file or folder ({DEFAULT_INPUT})")
    v.add_argument("--data-dir", default="data", help="where tok{N}.model and tok{N}.bin go (data)")
    v.add_argument("--max-chars", type=int, default=200_000_000, help="characters of input to learn from")
    v.set_defaults(func=cmd_data_train_vocab)

    t = steps.add_parser("pretokenize", help="encode documents into uint16 token shards, BOS before each")
    t.add_argument("--input", default=DEFAULT_INPUT, help=f"text/jsonl/json file or folder ({DEFAULT_INPUT})")
    t.add_argument("--vocab-size", type=int, default=0, help="use data/tok{N}.model from train-vocab")
    t.add_argument("--tokenizer", default=None, help="a sentencepiece .model or tokenizer.bin instead")
    t.add_argument("--data-dir", default="data", help="where tok{N}.model is looked up (data)")
    t.add_argument("--out-dir", default=None, help="shard folder (default: DATA_DIR/tok{N})")
    t.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    t.set_defaults(func=cmd_data_pretokenize)


DEFAULT_INPUT = "data/TinyStories_all_data"


def cmd_data_download(args) -> int:
    from pathlib import Path

    from ..train.download import TINYSTORIES_URL, download, extract

    url = args.url or TINYSTORIES_URL
    name = Path(url.split("?")[0]).name or "download.tar.gz"
    archive = download(url, Path(args.data_dir) / name, args.sha256)
    stem = name[: -len(".tar.gz")] if name.endswith(".tar.gz") else Path(name).stem
    out = extract(archive, Path(args.data_dir) / stem)
    print(f"unpacked into {out}")
    return 0


def cmd_data_train_vocab(args) -> int:
    from ..train.vocab import train_vocab

    model, binary = train_vocab(args.input, args.vocab_size, args.data_dir, args.max_chars)
    print(f"wrote {model} and {binary}")
    return 0


def cmd_data_pretokenize(args) -> int:
    from pathlib import Path

    from ..train.data import pretokenize

    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    elif args.vocab_size:
        tokenizer = Path(args.data_dir) / f"tok{args.vocab_size}.model"
        if not tokenizer.is_file():
            raise BabyLlamaError(f"{tokenizer} not found: run `babyllama data train-vocab "
                                 f"--vocab-size {args.vocab_size}` first")
    else:
        raise BabyLlamaError("give --vocab-size N (a vocabulary from train-vocab) or --tokenizer PATH")
    out = Path(args.out_dir) if args.out_dir else Path(args.data_dir) / f"tok{args.vocab_size or 'enizer'}"
    meta = pretokenize(args.input, tokenizer, out, workers=args.workers or None)
    print(f"wrote {meta['tokens']:,} tokens in {len(meta['shards']['train'])} train and "
          f"{len(meta['shards']['val'])} val shards to {out}")
    return 0
