"""Acceptance rate and speed-up of speculative decoding for a (target, draft) pair of .bin models.

    python benchmarks/speculative.py TARGET.bin DRAFT.bin -z tokenizer.bin [-k 4] [-n 256] [-t 0]

Decodes the same prompts with the target alone and with the draft proposing k tokens per target pass;
prints the drafted-token acceptance rate and both speeds (medians over the prompts). Greedy (-t 0) output
is checked to be identical. train_pair.sh makes a small trained pair with `babyllama train`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from babyllama import formats
from babyllama.engine import Engine
from babyllama.generate import generate
from babyllama.sampler import Sampler
from babyllama.speculative import SpecStats, speculative_generate
from babyllama.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "Lily and Ben went to the park", "The little dog", "One day, a girl named Sue",
           "Tom had a red ball"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("-z", dest="tokenizer", required=True)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-t", type=float, default=0.0)
    args = ap.parse_args()
    if args.n < 1 or args.k < 1:
        ap.error("-n and -k must be >= 1")
    target, draft = Engine(formats.load(args.target)), Engine(formats.load(args.draft))
    tok = Tokenizer.load(args.tokenizer, target.args.vocab_size)
    plain_speed, spec_speed, stats = [], [], SpecStats()
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt, bos=True)
        t = time.perf_counter()
        base = list(generate(target, ids, args.n, Sampler(args.t, 0.9, i + 1)))
        plain_speed.append(len(base) / (time.perf_counter() - t))
        t = time.perf_counter()
        spec = list(speculative_generate(target, draft, ids, args.n, Sampler(args.t, 0.9, i + 1), k=args.k,
                                         stats=stats))
        spec_speed.append(len(spec) / (time.perf_counter() - t))
        if args.t == 0:
            assert spec == base, f"greedy speculative output differs on prompt {i}"
    p, s = statistics.median(plain_speed), statistics.median(spec_speed)
    print(f"k={args.k}: acceptance {100 * stats.acceptance:.1f}% ({stats.accepted}/{stats.drafted}), "
          f"{(stats.accepted + stats.rounds) / stats.rounds:.2f} tokens per target pass; target alone "
          f"{p:.1f} tok/s, speculative {s:.1f} tok/s, speed-up {s / p:.2f}x")


if __name__ == "__main__":
    from babyllama.errors import BabyLlamaError

    try:
        main()
    except BabyLlamaError as e:
        sys.exit(f"speculative.py: error: {e}")
