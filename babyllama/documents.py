"""Text files of documents, the TinyStories way: documents separated by lines holding exactly
`<|endoftext|>` (surrounding whitespace ignored); a file without such lines is one document. Lines may end
in "\n" or "\r\n" (read as "\n"); a leading UTF-8 byte-order mark is dropped. Documents are stripped of
surrounding whitespace and empty ones skipped. Shared by `babyllama data` (vocabulary, pretokenize) and
`babyllama eval` (through instruct.read_documents, which reads .jsonl and .json files of documents too), so
both see the same documents."""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from . import safeio
from .errors import BabyLlamaError

SEPARATOR = "<|endoftext|>"


def iter_documents(path: str | os.PathLike, on_bytes: Callable[[int], object] | None = None) -> Iterator[str]:
    """Stream the documents of a text file, reading it line by line.
    `on_bytes(n)` is told how many bytes of the file each document consumed (for a progress bar)."""
    path = Path(path)
    f = safeio.open_regular(path, "data file")
    with f:
        lines: list[str] = []
        consumed = 0
        for lineno, raw in enumerate(f, 1):
            consumed += len(raw)
            if lineno == 1:  # a byte-order mark (Windows editors write one) is no part of the first document
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:  # Windows line endings read as newlines, as Python's text files do: "\r" is no part of the text
                line = raw.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError:
                raise BabyLlamaError(f"{path}:{lineno}: not UTF-8 text") from None
            if line.strip() != SEPARATOR:
                lines.append(line)
                continue
            text = "".join(lines).strip()
            lines = []
            if on_bytes:
                on_bytes(consumed)
            consumed = 0
            if text:
                yield text
        text = "".join(lines).strip()
        if on_bytes:
            on_bytes(consumed)
        if text:
            yield text

