"""Held-out evaluation: how well a model predicts a text file of stories (`babyllama eval`).

What is counted, exactly (the contract behind every number this module prints):

- Documents. The file is split on lines holding only `<|endoftext|>`, surrounding whitespace ignored (the
  layout of the TinyStories .txt files); a file without such lines is a single document. A .jsonl or .json
  file holds documents as `babyllama data pretokenize` reads them (instruct.read_documents). Each document is
  stripped of surrounding whitespace, as `babyllama data pretokenize` and llama2.c's tinystories.py do; empty
  ones are skipped.
- Tokens. A document is encoded as training sees it: BOS, then the tokens of its text (no EOS). Every
  token after BOS is predicted exactly once, from the tokens before it in the same document.
- Windows. The model sees at most `seq_len` tokens at a time, so a longer document is cut into
  consecutive windows: window k feeds tokens [k*seq_len, (k+1)*seq_len) and predicts the next token after
  each of them. A window after the first starts without the earlier context (as training chunks do), so
  long documents score a little worse than with a sliding window; on TinyStories most fit in one window.
- Numbers. loss = total negative log-likelihood (nats) / predicted tokens; perplexity = exp(loss);
  bits per byte = total nats / ln 2 / UTF-8 bytes of the evaluated documents (the stripped text, without
  separators). Bytes do not depend on the tokenizer, so models with different vocabularies compare on
  bits per byte, not on loss per token.

The forward pass is the NumPy Engine's batched prefill (`logits="all"`): several windows share one call,
each in its own cache slot, so the numbers are those of the model `babyllama run` samples from.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .engine import Engine
from .errors import BabyLlamaError
from .instruct import read_documents
from .progress import progress_bar
from .tokenizer import Tokenizer

MAX_EXP_ARG = math.log(sys.float_info.max)  # exp of more overflows a float
BATCH_TOKENS = 1024  # tokens per forward call: bounds the logits (tokens x vocab) and the KV cache


@dataclass
class EvalResult:
    documents: int = 0
    windows: int = 0
    tokens: int = 0  # predicted tokens (every token after BOS)
    bytes: int = 0  # UTF-8 bytes of the evaluated text
    nats: float = 0.0  # summed negative log-likelihood

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < MAX_EXP_ARG else math.inf  # a diverged model's: no OverflowError

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict:
        """The counts and figures, a figure that is not finite (no tokens, a diverged model) as None: JSON has
        no Infinity or NaN (json.dumps would write them, and strict readers refuse them)."""
        figures = {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}
        return {**asdict(self), **{k: v if math.isfinite(v) else None for k, v in figures.items()}}


def windows(ids: list[int], seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs covering every token after the first once, at most seq_len per window."""
    last = len(ids) - 1  # number of predicted tokens
    for start in range(0, last, seq_len):
        end = min(start + seq_len, last)
        yield ids[start:end], ids[start + 1:end + 1]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64: log-sum-exp of the shifted row minus its target."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(targets)), targets]


class Scorer:
    """Feeds windows through the engine, several per forward call (one cache slot each)."""

    def __init__(self, engine: Engine, seq_len: int, batch_tokens: int = BATCH_TOKENS):
        self.engine = engine
        self.seq_len = seq_len
        self.n_slots = max(1, batch_tokens // seq_len)
        self.cache = engine.new_cache(self.n_slots, seq_len)  # of the engine's KV cache type
        self.pending: list[tuple[list[int], list[int]]] = []

    def add(self, inputs: list[int], targets: list[int]) -> float:
        """Queue a window; returns the nats of any batch this completed (0 while it waits)."""
        self.pending.append((inputs, targets))
        return self.flush() if len(self.pending) == self.n_slots else 0.0

    def flush(self) -> float:
        if not self.pending:
            return 0.0
        tokens = np.concatenate([np.asarray(x) for x, _ in self.pending])
        targets = np.concatenate([np.asarray(y) for _, y in self.pending])
        positions = np.concatenate([np.arange(len(x)) for x, _ in self.pending])
        slots = np.concatenate([np.full(len(x), i) for i, (x, _) in enumerate(self.pending)])
        self.pending = []
        logits = self.engine.forward(tokens, positions, self.cache, slots, logits="all")
        return float(token_nll(logits, targets).sum())


def evaluate(engine: Engine, tokenizer: Tokenizer, data: str | os.PathLike, seq_len: int | None = None,
             max_documents: int | None = None, max_tokens: int | None = None,
             show_progress: bool = True) -> EvalResult:
    """Score `data` with the model (see the module docstring for what is counted). Documents are whole:
    `max_documents` stops after that many, `max_tokens` after the document in which the count of
    predicted tokens reaches it."""
    model_len = engine.args.max_seq_len
    seq_len = model_len if seq_len is None else seq_len
    if not 0 < seq_len <= model_len:
        raise BabyLlamaError(f"--seq-len must be in [1, {model_len}] (the model's context), got {seq_len}")
    if max_documents is not None and max_documents <= 0:
        raise BabyLlamaError(f"--max-stories must be >= 1, got {max_documents}")
    if max_tokens is not None and max_tokens <= 0:
        raise BabyLlamaError(f"--max-tokens must be >= 1, got {max_tokens}")
    scorer = Scorer(engine, seq_len)
    result = EvalResult()
    size = Path(data).stat().st_size if Path(data).is_file() else None
    with progress_bar(total=size, unit="B", unit_scale=True, desc="eval", disable=not show_progress) as bar:
        for text in read_documents(Path(data), on_bytes=bar.update, skippable=False):  # eval has no skipping
            ids = tokenizer.encode(text, bos=True)
            result.documents += 1
            result.bytes += len(text.encode("utf-8"))
            result.tokens += len(ids) - 1
            for inputs, targets in windows(ids, seq_len):
                result.windows += 1
                result.nats += scorer.add(inputs, targets)
            if (max_documents and result.documents >= max_documents) or (max_tokens and result.tokens >= max_tokens):
                bar.stop_here()
                break
        result.nats += scorer.flush()
    if not result.tokens:
        raise BabyLlamaError(f"{data}: no text to evaluate (empty file, or only separators)")
    if not math.isfinite(result.nats):
        raise BabyLlamaError("the model's logits overflow fp32 on this text (its loss is not a number)")
    return result
