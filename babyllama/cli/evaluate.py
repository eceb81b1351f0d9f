"""`babyllama eval`: loss, perplexity and bits per byte on held-out text; instruction following (--instruct)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..config import QUANTIZE_KINDS
from ..errors import counted
from .common import QUANTIZE_HELP, add_model_flags, add_threads, non_empty_path, positive_int

if TYPE_CHECKING:
    from ..api import Model


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte of a model on a text file of stories",
        description="Score a model on held-out text. The file is split into stories on lines holding only "
        "<|endoftext|> (surrounding spaces ignored; TinyStories layout; a file without them is one document; a "
        ".jsonl/.json file holds "
        "stories as `data pretokenize` reads them); each story is stripped and "
        "encoded with BOS, as pretokenize does, and every token after BOS is predicted once. Stories longer "
        "than the context are cut into consecutive windows of at most seq_len tokens (a later window starts "
        "without the earlier context). Prints mean loss per predicted token (nats), perplexity = exp(loss), "
        "and bits per byte = total nats / ln 2 / UTF-8 bytes of the stories: tokenizer-independent, so models "
        "with different vocabularies compare.")
    add_model_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=non_empty_path,
                      help="file of stories to score: text (e.g. TinyStories valid.txt), .jsonl or .json")
    what.add_argument("--instruct", metavar="FILE", type=non_empty_path,
                      help="instruction-following instead: greedy replies to the requests of FILE (.jsonl from "
                           "`babyllama data instruct`); prints the share of requested words the replies use and "
                           "the share that mention the requested topic")
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None, help=QUANTIZE_HELP)
    p.add_argument("--max-stories", type=positive_int, default=None, help="score only the first N stories")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="stop after the story in which N predicted tokens are reached (stories stay whole)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's seq_len)")
    p.add_argument("--max-examples", type=positive_int, default=None,
                   help="--instruct: score only the first N requests")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=positive_int, default=None, metavar="N",
                   help="--instruct: cap each reply (default: until EOS or the end of the context)")
    p.add_argument("--samples", type=int, default=None, help="--instruct: also print the first N replies")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    add_threads(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ..evaluate import evaluate
    from ..printer import require_stdout
    from .run import load_model

    check_eval_flags(args)
    require_stdout("the scores")  # before the evaluation, which they are the product of
    model = load_model(args)
    if args.instruct:
        return eval_instruct(model, args)
    r = evaluate(model.engine, model.tokenizer, args.data, seq_len=args.seq_len, max_documents=args.max_stories,
                 max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({**run_settings(args, model), "data": args.data, **r.to_dict()}))
        return 0
    seq_len = window(args, model)
    print(f"model       {model_name(args)}")
    print(f"data        {args.data}: {counted(r.documents, 'story', 'stories')}, {counted(r.bytes, 'byte')}")
    print(f"tokens      {r.tokens:,} predicted in {counted(r.windows, 'window')} of <= {seq_len}")
    print(f"loss        {r.loss:.4f} nats/token")
    print(f"perplexity  {r.perplexity:.3f}")
    print(f"bits/byte   {r.bits_per_byte:.4f}")
    return 0


def model_name(args: argparse.Namespace) -> str:
    """The model the figures are of: the file, with the adapter, the quantization and the KV cache asked for."""
    from ..loading import BUILTIN_MODEL

    return (str(args.checkpoint or BUILTIN_MODEL) + (f" --lora {args.lora}" if args.lora else "")
            + (f" --quantize {args.quantize}" if args.quantize else "")
            + (f" --kv-cache {args.kv_cache}" if args.kv_cache != "auto" else ""))


def run_settings(args: argparse.Namespace, model: Model) -> dict:
    """What the figures are of, as JSON fields: the model file, the adapter, the --quantize asked for, the types of
    the weights as they ran (a quantized file's own, or --quantize's), the KV cache's type, and the window length
    (--data) or the replies' cap (--instruct; null: until EOS or the context's end), each of which changes the
    figures, so that a script comparing runs reads them without parsing."""
    from ..engine import kv_cache_name
    from ..loading import BUILTIN_MODEL

    limit = {"max_new_tokens": args.max_new_tokens} if args.instruct else {"seq_len": window(args, model)}
    return {"model": str(args.checkpoint or BUILTIN_MODEL), "lora": args.lora, "quantize": args.quantize,
            "weights": model.weights.kinds(), "kv_cache": kv_cache_name(model.engine.kv_dtype), **limit}


def window(args: argparse.Namespace, model: Model) -> int:
    """The --data windows' length: --seq-len, else the model's context."""
    return args.seq_len or model.args.max_seq_len


# flags that apply to one kind of evaluation only: refused with the other rather than ignored
TEXT_FLAGS = ("max_stories", "max_tokens", "seq_len")
INSTRUCT_FLAGS = ("max_examples", "max_new_tokens", "samples")


def check_eval_flags(args: argparse.Namespace) -> None:
    from ..errors import BabyLlamaError

    wrong, needs = (TEXT_FLAGS, "--data") if args.instruct else (INSTRUCT_FLAGS, "--instruct")
    for flag in wrong:
        if getattr(args, flag) is not None:
            raise BabyLlamaError(f"--{flag.replace('_', '-')} works with {needs} only")
    if args.samples is not None and args.samples < 0:
        raise BabyLlamaError(f"--samples must be >= 0, got {args.samples}")


def eval_instruct(model: Model, args: argparse.Namespace) -> int:
    import json

    from ..instruct import eval_requests, score_instructions

    s = score_instructions(model, eval_requests(args.instruct, args.max_examples), args.max_new_tokens)
    name = model_name(args)
    if args.json:
        print(json.dumps({**run_settings(args, model), "instruct": args.instruct, **s.to_dict(args.samples or 0)}))
        return 0
    print(f"model        {name}")
    print(f"requests     {s.requests} from {args.instruct} ({s.word_requests} ask for words, {s.topic_requests} for "
          "a topic), greedy replies")
    if s.word_requests:
        print(f"words used   {100 * s.word_share:.1f}% of {s.words_requested} requested words "
              f"(replies using all of theirs: {100 * s.all_words_share:.1f}%)")
    else:
        print("words used   - (no request asks for words)")
    if s.topic_requests:
        print(f"topic        {100 * s.topic_share:.1f}% of replies mention the requested topic")
    else:
        print("topic        - (no request asks for a topic)")
    print(f"replies      {100 * s.finished / s.requests:.1f}% end with EOS; {s.reply_tokens / s.requests:.0f} "
          "tokens on average")
    for sample in s.samples[:args.samples or 0]:
        print(f"\n> {sample['request']}\n{sample['reply']}\n[words used: {', '.join(sample['used']) or '-'} of "
              f"{', '.join(sample['words']) or '-'}; topic: {TOPIC_HIT[sample['topic_hit']]}]")
    return 0


TOPIC_HIT = {None: "none asked", True: "mentioned", False: "missed"}  # a sample's topic_hit, in words
