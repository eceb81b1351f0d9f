"""Generated text to a byte stream (stdout) as tokens arrive: the one output loop of `run`, `chat` and
`sample`.

By default every character is printed whole and as correct UTF-8: a character that the model spells as
several byte tokens is held back until its last byte arrives, and control tokens (BOS, EOS) never print.
With `raw=True` (`--raw-bytes`) the bytes are exactly run.c's: each piece decoded after its predecessor and
passed through run.c's `safe_printf`, which drops every byte token that is not printable ASCII, so such
characters disappear. For ASCII text the two are the same bytes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import BinaryIO

from .errors import BabyLlamaError
from .tokenizer import BOS, Tokenizer


def require_stdout(what: str = "the text") -> None:
    """One error line when stdout is closed (`>&-`: Python then prints nothing, silently) for a command whose
    output is what it prints."""
    if sys.stdout is None:
        raise BabyLlamaError(f"standard output is closed: nowhere to print {what}")


def stdout_bytes() -> BinaryIO:
    """The byte stream under stdout; one error line when stdout is closed (`>&-`)."""
    require_stdout()
    return sys.stdout.buffer


def write_out(out: BinaryIO, data: bytes) -> None:
    """Write and flush `data`. A stream that fails (a full disk) is one error line; a reader that went away
    (BrokenPipeError) is left to the CLI, which ends quietly on it."""
    try:
        if data:
            out.write(data)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        if sys.stdout is not None and out is sys.stdout.buffer:
            # the bytes still buffered would fail again, noisily, when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise BabyLlamaError(f"cannot write the output: {e.strerror or e}") from None


class Printer:
    def __init__(self, tokenizer: Tokenizer, raw: bool = False, out: BinaryIO | None = None, prev: int = BOS):
        self.tokenizer = tokenizer
        self.raw = raw
        self.out = out if out is not None else stdout_bytes()
        self.prev = prev
        self.text = tokenizer.stream(prev)

    def restart(self, prev: int) -> None:
        """Continue after `prev` (a new chat turn): what follows is decoded after that token."""
        self.write(b"" if self.raw else self.text.flush().encode())
        self.prev = prev
        self.text = self.tokenizer.stream(prev)

    def token(self, token: int) -> None:
        if self.raw:
            data = self.tokenizer.decode_piece(self.prev, token)
        else:
            data = self.text.push(token).encode()
        self.prev = token
        self.write(data)

    def tokens(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.token(t)

    def write(self, data: bytes | str) -> None:
        write_out(self.out, data.encode() if isinstance(data, str) else data)

    def end(self, newline: bool = True) -> None:
        """Print what is held back (an unfinished character) and, like run.c, a final newline."""
        if not self.raw:
            self.write(self.text.flush())
        self.write(b"\n" if newline else b"")
