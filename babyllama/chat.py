"""Interactive chat with run.c's Llama 2 template: user turns from stdin, answers streamed to stdout.

One sequence holds the whole conversation (each turn is appended to the same KV cache), and `steps`
bounds the total positions, as in run.c.
"""

from __future__ import annotations

import sys

from .api import Model
from .generate import Batch, Sequence, chat_prompt
from .sampler import Sampler
from .tokenizer import EOS


def _read_line(prompt: str) -> str | None:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def chat(model: Model, sampler: Sampler, steps: int, user: str | None = None, system: str | None = None) -> int:
    tok = model.tokenizer
    out = sys.stdout.buffer
    if system is None:
        system = _read_line("Enter system prompt (optional): ")
        if system is None:
            return 0
    batch = Batch(model.engine, 1)
    seq: Sequence | None = None
    first = True
    while seq is None or seq.stop_reason != "length":
        if not (first and user):
            user = _read_line("User: ")
            if user is None:  # end of input
                break
        rendered = tok.encode(chat_prompt(user, system if first else None), bos=True)
        first = False
        if seq is None:
            seq = batch.add(Sequence(rendered, sampler, steps, frozenset({EOS})))
        else:
            seq.extend(rendered)
        sys.stdout.write("Assistant: ")
        sys.stdout.flush()
        prev = seq.tokens[-1]
        while not seq.done:
            for _, nxt in batch.step():
                out.write(tok.decode_piece(prev, nxt))
                out.flush()
                prev = nxt
        out.write(b"\n")
        out.flush()
    return 0
