"""Training a sentencepiece BPE vocabulary with llama2.c's settings (tinystories.py train_vocab).

Settings that keep the tokenizer run.c-compatible: BPE with byte fallback (any byte is encodable), split
digits, identity normalization, control tokens <unk>=0, <s>=1, </s>=2, and the dummy-prefix space that
run.c/babyllama's encoder add. Two deliberate changes from llama2.c: remove_extra_whitespaces is off (as in
Meta's Llama 2 tokenizer), so sentencepiece's encoding of pretokenized text equals the tokenizer.bin
encoder's (babyllama.tokenizer), which never collapses whitespace; and lines up to MAX_LINE_BYTES are learned
from (sentencepiece's default, which tinystories.py keeps, skips lines over 4192 bytes: a corpus of one long
line per document then trains on its short ones only).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .. import safeio
from ..config import TRAINED_VOCAB_SIZES
from ..errors import BabyLlamaError, require
from ..instruct import read_documents
from ..threads import usable_cpus
from .data import VOCAB_WORK_PREFIX, input_files

MAX_LINE_BYTES = 1 << 20  # sentencepiece's max_sentence_length: it skips longer lines


def train_vocab(input_path: str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
                max_chars: int = 200_000_000, skip_bad_lines: bool = False) -> tuple[Path, Path]:
    """Train tok{vocab_size}.model on the documents of `input_path` (at most `max_chars` characters,
    like llama2.c's first 10 shards; malformed .jsonl lines skipped with `skip_bad_lines`) and write its
    llama2.c export tok{vocab_size}.bin beside it."""
    spm = require("sentencepiece", "train", "training a vocabulary")
    from ..tokenizer import Tokenizer

    low, high = TRAINED_VOCAB_SIZES
    if not low <= vocab_size <= high:
        raise BabyLlamaError(f"--vocab-size must be in {low}..{high} (3 control + 256 byte tokens + merges), "
                             f"got {vocab_size}")
    files = input_files(input_path)  # listed before the work folder exists: --data-dir may lie in --input
    with safeio.new_folders_removed_on_error(out_dir):  # a refused vocabulary leaves no empty folder
        out = safeio.output_dir(out_dir)
        prefix = out / f"tok{vocab_size}"
        with _work_folder(out) as tmp:  # in `out`, so that the model moves in with a rename
            text_file = Path(tmp) / "vocab_input.txt"
            try:
                _write_training_text(files, input_path, text_file, max_chars, skip_bad_lines)
            except OSError as e:  # a full disk: the copy is as large as the text (up to --max-chars)
                if e.filename is not None:  # an input file's error names it already
                    raise
                raise BabyLlamaError(f"cannot write the text sentencepiece trains on into {out} (a temporary "
                                     f"copy of the input): {e.strerror or e}") from None
            try:
                spm.SentencePieceTrainer.train(
                    input=str(text_file), model_prefix=str(Path(tmp) / prefix.name), model_type="bpe",
                    vocab_size=vocab_size,
                    input_format="text", character_coverage=1.0,
                    num_threads=usable_cpus(), split_digits=True, allow_whitespace_only_pieces=True,
                    byte_fallback=True, unk_surface=" \u2047 ", normalization_rule_name="identity",
                    remove_extra_whitespaces=False, max_sentence_length=MAX_LINE_BYTES, minloglevel=2)
            except RuntimeError as e:
                raise BabyLlamaError(f"sentencepiece could not train a {vocab_size}-token vocabulary: "
                                     f"{_sentencepiece_reason(str(e))}") from None
            model = prefix.with_suffix(".model")
            safeio.commit(Path(tmp) / model.name, model)
    binary = prefix.with_suffix(".bin")
    Tokenizer.from_sentencepiece(model).save(binary)
    return model, binary


def _work_folder(out: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder in `out`; one that cannot be made there (a read-only folder) is one line naming `out`,
    not the random name it would have had."""
    try:
        return tempfile.TemporaryDirectory(dir=out, prefix=VOCAB_WORK_PREFIX)
    except OSError as e:
        raise BabyLlamaError(f"cannot write output folder {out}: {e.strerror or e}") from None


def _sentencepiece_reason(message: str) -> str:
    """sentencepiece's own words for why it could not train, in this command's terms: its messages name its
    C++ source line and options (character_coverage) this command does not have."""
    few_chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if few_chars:
        return (f"the text needs at least {few_chars[2]} tokens (3 control + 256 byte tokens + one per distinct "
                f"character): raise --vocab-size to {few_chars[2]} or more")
    too_many = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_many:
        return f"the text has too few distinct pieces: --vocab-size must be at most {too_many[1]} for it"
    return message.rsplit("] ", 1)[-1].strip() or message


def _write_training_text(files: list[Path], input_path, dest: Path, max_chars: int, skip_bad_lines: bool) -> None:
    """One document per line, as llama2.c does (documents' own newlines stay: sentencepiece sees each line
    as a sentence); lines longer than sentencepiece takes are cut into pieces it takes (at spaces where they
    have them), else it would skip them. At most `max_chars` characters: the last document is cut short to fit."""
    written = 0
    with open(dest, "w", encoding="utf-8") as f:
        for path in files:
            for doc in read_documents(path, skip_bad_lines):
                doc = doc[:max_chars - written]
                f.writelines(piece + "\n" for line in doc.split("\n") for piece in _short_lines(line))
                written += len(doc) + 1
                if written >= max_chars:
                    return
    if written == 0:
        raise BabyLlamaError(f"{input_path}: no text to train a vocabulary on")


def _short_lines(line: str, limit: int = MAX_LINE_BYTES // 4) -> Iterator[str]:
    """`line` in pieces of at most `limit` characters (4 UTF-8 bytes at most each), cut after a space where
    the piece has one."""
    while len(line) > limit:
        cut = line.rfind(" ", 0, limit) + 1 or limit
        yield line[:cut]
        line = line[cut:]
    yield line
