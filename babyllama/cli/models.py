"""`babyllama models` and `babyllama download`: the models babyllama knows by name."""

from __future__ import annotations

import argparse
import shlex

from .common import add_time_limit, non_empty_path, non_empty_url


def add(sub: argparse._SubParsersAction) -> None:
    add_models(sub)
    add_download(sub)


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in story and chat models and the public llama2.c checkpoints",
                       description="The models babyllama knows by name, with their shape, reported val loss, "
                       "size and where to get them.")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from ..catalog import table
    from ..printer import require_stdout

    require_stdout("the table")
    print(table())
    return 0


def add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a public checkpoint and its tokenizer (see babyllama models)",
                       description="Fetch a known model into DIR/NAME/ (model .bin + tokenizer.bin), resuming an "
                       "interrupted download. Needs internet; files already there are kept.")
    p.add_argument("name", help="model name, e.g. stories15M (babyllama models lists them)")
    p.add_argument("--dir", default="models", type=non_empty_path, help="download folder (default: ./models)")
    p.add_argument("--url-base", default=None, type=non_empty_url,
                   help="fetch from this mirror instead, laid out as the Hugging Face repo (MIRROR/stories15M.bin, "
                        "MIRROR/stories260K/tok512.bin), with llama2.c's tokenizer.bin at MIRROR/tokenizer.bin")
    add_time_limit(p)
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from ..catalog import find
    from ..download import download_model

    path = download_model(find(args.name), args.dir, args.url_base, time_limit=args.time_limit)
    print(f"{path}\nrun it: {shlex.join(['babyllama', 'run', str(path)])}")
    return 0
