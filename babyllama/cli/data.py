"""`babyllama data`: download TinyStories, train a vocabulary, pretokenize, make instruction pairs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BabyLlamaError, note, require, say
from .common import (
    OutOfRange,
    Parser,
    add_time_limit,
    non_empty_path,
    non_empty_url,
    positive_int,
    share,
    training_seed,
    vocab_size,
)

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

SKIP_BAD_LINES_HELP = "skip malformed .jsonl lines, with a count"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data: download, train-vocab, pretokenize, instruct",
                       description="Prepare training data (llama2.c's tinystories.py).")
    steps = p.add_subparsers(dest="data_command", metavar="STEP", parser_class=Parser, required=True)

    d = steps.add_parser("download", help="download and unpack TinyStories (or another .tar.gz with --url)",
                         description="Download TinyStories_all_data.tar.gz (or the .tar.gz at --url) into DATA_DIR, "
                                     "resuming an interrupted transfer, check its sha256 and unpack it into "
                                     "DATA_DIR/NAME (the archive's name without .tar.gz: data/TinyStories_all_data, "
                                     "where train-vocab and pretokenize with the same --data-dir look by "
                                     "default).")
    d.add_argument("--url", default=None, type=non_empty_url,
                   help="archive URL (default: TinyStories_all_data.tar.gz on Hugging Face)")
    d.add_argument("--sha256", default=None, help="expected sha256 of the archive (default: what the server says)")
    d.add_argument("--data-dir", default="data", type=non_empty_path,
                   help="where the archive and its contents go (data)")
    add_time_limit(d)
    d.set_defaults(func=cmd_data_download)

    v = steps.add_parser("train-vocab", aliases=["train_vocab"],
                         help="train a sentencepiece BPE vocabulary (llama2.c's settings)",
                         description="Train a sentencepiece BPE vocabulary of --vocab-size tokens on the documents "
                                     "of --input (llama2.c's settings, runs of spaces kept) into "
                                     "DATA_DIR/tok{N}.model and its llama2.c tokenizer, DATA_DIR/tok{N}.bin.")
    v.add_argument("--vocab-size", "--vocab_size", type=vocab_size, required=True,
                   help="number of tokens, 260 to 65536, e.g. 4096")
    v.add_argument("--input", default=None, type=non_empty_path,
                   help=f"text/jsonl/json file or folder (DATA_DIR/{TINYSTORIES})")
    v.add_argument("--data-dir", default="data", type=non_empty_path,
                   help="where tok{N}.model and tok{N}.bin go (data)")
    v.add_argument("--max-chars", type=positive_int, default=200_000_000,
                   help="characters of input to learn from (200,000,000)")
    v.add_argument("--skip-bad-lines", action="store_true", help=SKIP_BAD_LINES_HELP)
    v.set_defaults(func=cmd_data_train_vocab)

    t = steps.add_parser("pretokenize", help="encode documents into uint16 token shards, BOS before each",
                         description="Encode every document of --input, BOS in front, into one uint16 token shard "
                                     "per input file, written with meta.json and tokenizer.bin into the shard "
                                     "folder that train --data_dir and finetune --data_dir read.")
    t.add_argument("--input", default=None, type=non_empty_path,
                   help=f"text/jsonl/json file or folder (DATA_DIR/{TINYSTORIES})")
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--vocab-size", "--vocab_size", type=pretokenize_vocab_size, default=None,
                       help="use DATA_DIR/tok{N}.model from train-vocab")
    which.add_argument("--tokenizer", default=None, type=non_empty_path,
                       help="a sentencepiece .model or tokenizer.bin instead")
    t.add_argument("--data-dir", "--data_dir", default="data", type=non_empty_path,
                   help="where tok{N}.model is looked up (data)")
    t.add_argument("--out-dir", "--out_dir", default=None, type=non_empty_path,
                   help="shard folder (default: DATA_DIR/tok{N}, or DATA_DIR/tokenizer with --tokenizer)")
    t.add_argument("--workers", type=positive_int, default=None, help="encoding processes (default: all cores)")
    t.add_argument("--skip-bad-lines", "--skip_bad_lines", action="store_true",
                   help="skip malformed .jsonl lines (and conversations longer than --max-seq-len), with a count")
    t.add_argument("--max-seq-len", "--max_seq_len", type=positive_int, default=None,
                   help="refuse chat conversations that do not fit this context (the model's max_seq_len)")
    t.add_argument("--word-weight", "--word_weight", type=int, default=1,
                   help="loss weight of reply tokens that spell a word the request asked for (instruction "
                        "records' \"words\"; default 1: every reply token alike)")
    t.set_defaults(func=cmd_data_pretokenize)

    i = steps.add_parser(
        "instruct", help="make instruction pairs (a request -> the story) from stories, with a held-out split",
        description="Turn stories into instruction pairs without any outside model: each request asks for a story "
                    "about the story's own character or topic that uses three words taken from the story, in one "
                    "of many phrasings; the story is the reply. Writes OUT_DIR/instruct_train.jsonl and "
                    "OUT_DIR/instruct_val.jsonl (held-out stories, for `babyllama eval --instruct`).")
    i.add_argument("--input", default=None, type=non_empty_path,
                   help=f"stories: text/jsonl/json file or folder (data/{TINYSTORIES})")
    i.add_argument("--out-dir", default="data/instruct", type=non_empty_path,
                   help="where the .jsonl files go (data/instruct)")
    i.add_argument("--val-count", type=int, default=200, help="stories held out for evaluation (200)")
    i.add_argument("--dev-count", type=int, default=0,
                   help="the next N stories are held out as a dev split (OUT_DIR/instruct_dev.jsonl) to choose "
                        "settings on, keeping instruct_val.jsonl for reporting (0)")
    i.add_argument("--per-story", type=int, default=1, help="requests per training story, each drawn anew (1)")
    i.add_argument("--max-stories", type=positive_int, default=None, help="use only the first N stories")
    i.add_argument("--seed", type=training_seed, default=0,
                   help="seed of the split, the words and the phrasing, in [0, 2**63) as train's (0)")
    i.add_argument("--max-word-df", type=share, default=None,
                   help="ask only for words that at most this share of the stories use (default 0.05), and at "
                        "least 3 stories (no typos): below 3 / the number of stories, no request asks for words")
    i.add_argument("--early-words", type=int, default=0,
                   help="draw the words from the story's first N candidates, so its opening uses them (0: from "
                        "anywhere in the story)")
    i.add_argument("--model", default=None, type=non_empty_path,
                   help="keep the pairs that fit this model's context, with its tokenizer (default: the built-in)")
    i.add_argument("-z", "--tokenizer", default=None, type=non_empty_path,
                   help="the model's tokenizer (default: the one beside it, or its own)")
    i.add_argument("--skip-bad-lines", action="store_true", help=SKIP_BAD_LINES_HELP)
    i.set_defaults(func=cmd_data_instruct)


TINYSTORIES = "TinyStories_all_data"  # the folder `data download` unpacks the default archive into


def pretokenize_vocab_size(text: str) -> int:
    """A size train-vocab makes; tinystories.py's 0 (Llama 2's vocabulary) is said in this command's terms."""
    if text.strip() == "0":
        raise OutOfRange("0 is tinystories.py's Llama 2 vocabulary: here give --tokenizer with Meta's tokenizer.model "
                         "instead")
    return vocab_size(text)


def input_path(args: argparse.Namespace) -> str:
    """--input, else what `data download` unpacks into the same --data-dir (`data instruct`, which has none:
    data/): when that is missing, say how to get it, not only that a path the user never typed is absent."""
    if args.input is not None:
        return args.input
    path = Path(getattr(args, "data_dir", "data")) / TINYSTORIES
    if not path.exists():
        raise BabyLlamaError(f"input not found: {path} (the default --input): run `babyllama data download` first, "
                             "or give --input FILE_OR_FOLDER")
    return str(path)


ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def cmd_data_download(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from ..train.download import TINYSTORIES_URL, download, extract

    url = args.url or TINYSTORIES_URL
    name = Path(urlsplit(url).path).name or "download.tar.gz"  # the archive's name, not a query's or a host's
    archive = download(url, Path(args.data_dir) / name, args.sha256, time_limit=args.time_limit)
    stem = next((name[: -len(s)] for s in ARCHIVE_SUFFIXES if name.endswith(s) and len(name) > len(s)),
                Path(name).stem)
    if stem == name:  # a name with no suffix ("stories"): the archive already has it
        stem = f"{name}_unpacked"
    out = extract(archive, Path(args.data_dir) / stem)
    print(f"unpacked into {out}")
    return 0


def cmd_data_train_vocab(args: argparse.Namespace) -> int:
    require("sentencepiece", "train", "data train-vocab")
    from ..train.vocab import train_vocab

    args.input = input_path(args)
    model, binary = train_vocab(args.input, args.vocab_size, args.data_dir, args.max_chars, args.skip_bad_lines)
    print(f"wrote {model} and {binary}")
    return 0


def cmd_data_pretokenize(args: argparse.Namespace) -> int:
    require("tqdm", "train", "data pretokenize")
    from ..train.data import pretokenize, split_text

    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    else:  # the parser requires one of the two
        tokenizer = Path(args.data_dir) / f"tok{args.vocab_size}.model"
        if not tokenizer.is_file():
            raise BabyLlamaError(f"{tokenizer} not found: run `babyllama data train-vocab "
                                 f"--vocab-size {args.vocab_size}` first")
    args.input = input_path(args)
    out = Path(args.out_dir) if args.out_dir else Path(args.data_dir) / f"tok{args.vocab_size or 'enizer'}"
    if args.word_weight != 1 or args.max_seq_len:
        check_chat_input(args.input, args.skip_bad_lines)
    max_tokens = args.max_seq_len + 1 if args.max_seq_len else None
    meta = pretokenize(args.input, tokenizer, out, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                       max_tokens=max_tokens, word_weight=args.word_weight)
    chat = meta.get("kind") == "chat"
    what = f" ({meta['conversations']:,} conversations)" if chat else ""
    print(f"wrote {meta['tokens']:,} tokens{what} in {split_text(meta['shards'], chat)} to {out}")
    return 0


def check_chat_input(input_path: str, skip_bad_lines: bool) -> None:
    """--word-weight and --max-seq-len act on chat records: given for plain text, they would do nothing."""
    from ..instruct import CHAT
    from ..train.data import file_kind, input_files

    if all(file_kind(f, skip_bad_lines) != CHAT for f in input_files(input_path)):
        raise BabyLlamaError(f"--word-weight and --max-seq-len apply to chat records (.jsonl conversations); "
                             f"{input_path} holds plain text")


INSTRUCT_FILES = ("instruct_train.jsonl", "instruct_val.jsonl", "instruct_dev.jsonl")


def _instruct_inputs(input_path: str, out_dir: str) -> list[Path]:
    """The input's files less an earlier run's output (its requests are no stories); an input that is one of
    the files this run writes is refused, as it would be written over."""
    from ..train.data import input_files, is_val_shard

    outputs = [p for p in (Path(out_dir) / name for name in INSTRUCT_FILES) if p.exists()]
    is_output = lambda f: any(f.samefile(o) for o in outputs)  # noqa: E731
    if Path(input_path).is_file() and is_output(Path(input_path)):
        raise BabyLlamaError(f"{input_path} is a file this command writes into --out-dir {out_dir}: it would be "
                             "written over; choose another --out-dir")
    files = [f for f in input_files(input_path, exclude=out_dir) if not is_output(f)]
    if not files:
        raise BabyLlamaError(f"{input_path}: no stories, only an earlier run's requests ({', '.join(INSTRUCT_FILES)})")
    held_out = [f for f in files if is_val_shard(f.name)]
    if held_out and len(held_out) < len(files):  # a corpus with its splits: requests are made from its training part
        note(f"left out {', '.join(str(f) for f in held_out)}: validation data by name, which pretokenize holds out "
             "too (the requests' own held-out split comes from the other files); give it as --input to use it")
        files = [f for f in files if f not in held_out]
    return files


def cmd_data_instruct(args: argparse.Namespace) -> int:
    from itertools import islice

    from .. import safeio
    from ..instruct import check_settings, read_documents
    from ..loading import builtin_model, open_model, tokenizer_for

    check_settings(args.val_count, args.dev_count, args.per_story, args.early_words)
    args.input = input_path(args)
    source = open_model(args.model or builtin_model())
    tok, seq_len = tokenizer_for(source, args.tokenizer), source.weights.args.max_seq_len
    documents = (doc for path in _instruct_inputs(args.input, args.out_dir)
                 for doc in read_documents(path, args.skip_bad_lines))
    stories = list(islice(documents, args.max_stories if (args.max_stories or 0) <= sys.maxsize else None))
    if not stories:
        raise BabyLlamaError(f"{args.input}: no stories")
    with safeio.new_folders_removed_on_error(args.out_dir):  # a run refused after checking it makes no folder
        return _write_instructions(args, stories, tok, seq_len)


def _write_instructions(args: argparse.Namespace, stories: list[str], tok: Tokenizer, seq_len: int) -> int:
    """`data instruct`'s requests made from `stories` and written to --out-dir (made first: a folder that cannot
    be written is refused before the work)."""
    from .. import safeio
    from ..chat_template import encode_chat
    from ..instruct import MAX_WORD_DF, MIN_WORD_DF, make_instructions, write_jsonl
    from ..progress import progress_bar

    out = safeio.output_dir(args.out_dir)
    fits = lambda record: len(encode_chat(tok, record["messages"], generation=False)[0]) <= seq_len + 1  # noqa: E731
    max_df = MAX_WORD_DF if args.max_word_df is None else args.max_word_df
    with progress_bar(total=len(stories), desc="instruct", unit="story") as bar:
        train, val, dev, counts = make_instructions(stories, args.val_count, args.seed, args.per_story, fits, max_df,
                                                    args.early_words, args.dev_count, on_story=bar.update)
    if max_df * len(stories) < MIN_WORD_DF:  # a word must be in at least MIN_WORD_DF stories and in at most this
        note(f"no request asks for words: a word asked for must be used by at least {MIN_WORD_DF} of the "
             f"{len(stories):,} stories and by at most --max-word-df {max_df:g} of them ({max_df * len(stories):g}); "
             f"raise --max-word-df to {MIN_WORD_DF / len(stories):.3g} or more, or give more stories")
    if not train:
        raise BabyLlamaError(f"no training requests from {counts['stories']} stories: {counts['too_long']} requests "
                             f"are longer than the context of {seq_len}, {counts['no_request']} had nothing to ask "
                             "for")
    train_name, val_name, dev_name = INSTRUCT_FILES
    write_jsonl(train, out / train_name)
    for records, name in ((val, val_name), (dev, dev_name)):
        if records:  # an empty file would be a data file without a record
            write_jsonl(records, out / name)
        elif (out / name).exists():  # an earlier split's held-out stories, which this run may train on
            (out / name).unlink()
            say(f"removed {out / name}: an earlier run's held-out split, which this run's does not keep")
    dev_text = f", {counts['dev']:,} dev" if args.dev_count else ""
    # requests, not stories, are counted: a training story is asked for --per-story times
    print(f"wrote {counts['train']:,} training{dev_text} and {counts['val']:,} held-out requests from "
          f"{counts['stories']:,} stories to {out} (left out: {counts['too_long']:,} requests longer than the context "
          f"of {seq_len}, {counts['no_request']:,} with nothing to ask for: no topic or words in their story)")
    return 0
