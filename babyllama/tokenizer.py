"""The llama2.c tokenizer (`tokenizer.bin`): byte-level BPE driven by piece scores, as sentencepiece does it.

Encoding follows sentencepiece's BPE (the tool that trained these vocabularies, so it is the truth):
a dummy-prefix space, spaces kept as part of pieces (a typed "▁" is a space too), each character looked up as a
piece or else spelled as `<0xXX>` byte tokens (without byte tokens, a run of such characters is one `<unk>`),
then repeatedly the adjacent pair whose concatenation is the best-scoring piece
is merged (leftmost on ties). Unlike run.c's simplification, control tokens (`<s>`, `</s>`, `<unk>`) and
byte tokens never come out of a merge, so typing "<s>" or "<0x41>" gives ordinary text tokens. A vocabulary's
user-defined symbols (a sentencepiece model's, a GGUF's token type 4; tokenizer.bin cannot mark them) are kept
whole wherever they stand in the text, and the text between them is encoded on its own, as sentencepiece does. The merge
loop uses a heap over a linked list of symbols: O(n log n), not a rescan of the text per merge.

Decoding: `decode_piece` reproduces run.c's bytes for one step (`decode_piece` + `safe_printf`, which drops a
lone byte token that is not printable ASCII, and so every character sent as byte tokens); `TextStream` gives
the same text as correct UTF-8 as tokens arrive (a character split across byte tokens is held back until its
last byte comes, control tokens never appear); `decode` of a whole id list reproduces sentencepiece.
"""

from __future__ import annotations

import codecs
import functools
import heapq
import math
import os
import re
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator

import numpy as np

from . import safeio
from .config import LIMITS
from .errors import BabyLlamaError, missing_extra, warn
from .formats import MAGIC

UNK, BOS, EOS = 0, 1, 2
# how tokenizer.bin spells <s> and </s> (llama2.c's tokenizer.py), which no text can merge into
BIN_PIECES = {BOS: "\n<s>\n", EOS: "\n</s>\n"}
# sentencepiece's (and GGUF's) token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
META_SPACE = "\u2581"  # sentencepiece's stand-in for a space in its pieces ("▁"), a space in tokenizer.bin
MAX_TOKENIZER_BYTES = 256 << 20  # 2M tokens of up to 100 bytes each
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
TOKENIZER_HINT = "; pass the tokenizer the model was trained with (-z/--tokenizer)"  # ends a vocabulary mismatch
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b" \t\n\v\f\r")


def vocab_mismatch(what: object, n_tokens: int, vocab_size: int, advice: str = "") -> BabyLlamaError:
    """The error for a tokenizer (`what`: its file, or a source whose vocabulary it is) of another size than the
    model's vocabulary: ids would name the wrong tokens, or ones the model has no row for. `advice` ends it."""
    return BabyLlamaError(f"{what} has {n_tokens} tokens but the model's vocab_size is {vocab_size}{advice}")


class Tokenizer:
    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int | None = None,
                 symbols: Iterable[int] = (), unmergeable: Iterable[int] = ()):
        """`symbols`: the ids of user-defined symbols, kept whole in text; `unmergeable`: the ids of pieces that no
        merge produces besides <unk>, <s>, </s> and the byte tokens (a vocabulary's other control and unused
        pieces). A tokenizer.bin marks neither: its other pieces are all normal ones."""
        self.pieces = pieces
        self.scores = np.asarray(scores, dtype=np.float32)
        self.vocab_size = len(pieces)
        self.max_token_length = max_token_length or max((len(p) for p in pieces), default=0)
        self.byte_ids: dict[int, int] = {}  # byte value -> id of its <0xXX> token
        self.piece_ids: dict[bytes, int] = {}  # pieces a merge may produce (not control or byte tokens)
        skipped = set(unmergeable)
        for i, piece in enumerate(pieces):
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                self.byte_ids.setdefault(int(m.group(1), 16), i)
            elif i > EOS and i not in skipped:
                self.piece_ids.setdefault(piece, i)
        self._score = self.scores.tolist()
        # user-defined symbols: their text -> id (the first id of a text), and a pattern that splits text at
        # them, the longest first where one begins another (sentencepiece's longest match)
        self.symbols: dict[str, int] = {}
        for i in sorted(symbols):
            text = pieces[i].decode("utf-8", "replace")
            if text:
                self.symbols.setdefault(text, i)
        longest_first = sorted(self.symbols, key=len, reverse=True)
        self._at_symbols = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        order = {score: r for r, score in enumerate(sorted(set(self._score), reverse=True))}
        self._rank = [order[score] for score in self._score]  # dense rank of each piece's score, best first

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def load(cls, path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
        """Read a llama2.c tokenizer.bin. With `vocab_size`, the file must hold exactly that many tokens."""
        data = safeio.read_bytes(path, "tokenizer file", MAX_TOKENIZER_BYTES)
        if len(data) < 4:
            raise BabyLlamaError(f"{path}: not a tokenizer.bin (too short)")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 <= max_len <= len(data):  # llama2.c sizes its buffers by it: written back, it would overflow them
            raise _unreadable(path, data, f"max_token_length {max_len} is corrupt (a {len(data)}-byte file)")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data):
            if off + 8 > len(data):
                raise _unreadable(path, data, "tokenizer file is truncated or corrupt")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise _unreadable(path, data, f"tokenizer file is truncated or corrupt (token {len(pieces)})")
            if max_len > 0 and n > max_len:
                raise _unreadable(path, data, f"token {len(pieces)} is {n} bytes, longer than the header's "
                                              f"max_token_length {max_len}; the file is corrupt")
            if not math.isfinite(score):
                raise _unreadable(path, data, f"token {len(pieces)} has the score {score}; the file is corrupt")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
            if len(pieces) > LIMITS["vocab_size"]:
                raise _unreadable(path, data, f"more than {LIMITS['vocab_size']:,} tokens; not a tokenizer.bin")
        if len(pieces) < 3:  # <unk>, <s> and </s> at least: encoding falls back to <unk>
            raise BabyLlamaError(f"{path}: a tokenizer.bin of {len(pieces)} tokens (it needs <unk>, <s> and </s>)")
        if vocab_size is not None and len(pieces) != vocab_size:
            raise vocab_mismatch(f"tokenizer {path}", len(pieces), vocab_size, TOKENIZER_HINT)
        return cls(pieces, scores, max_len)

    def save(self, path: str | os.PathLike) -> None:
        with safeio.atomic_write(path) as f:
            f.write(struct.pack("<i", self.max_token_length))
            for piece, score in zip(self.pieces, self._score):
                f.write(struct.pack("<fi", score, len(piece)))
                f.write(piece)

    @classmethod
    def from_sentencepiece(cls, model_path: str | os.PathLike, note: bool = True, to_file: bool = True) -> Tokenizer:
        """Convert a sentencepiece model the way llama2.c's tokenizer.py does ("▁" stored as a space), its
        user-defined symbols kept; `note`: say in one line on stderr what of its text normalization the tokenizer
        leaves out, and with `to_file` what a tokenizer.bin written from it does (its user-defined symbols)."""
        sp = open_sentencepiece(model_path)
        if note:
            warn_normalization(sp, model_path, "a tokenizer.bin" if to_file else "babyllama's tokenizer",
                               keeps_symbols=not to_file)
        texts, scores = sentencepiece_pieces(sp, model_path)
        texts[BOS], texts[EOS] = BIN_PIECES[BOS], BIN_PIECES[EOS]  # the ids _check_special_ids found them at
        return cls([text.replace(META_SPACE, " ").encode("utf-8") for text in texts], scores,
                   symbols=user_defined_ids(sp),
                   unmergeable=[i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unused(i)])

    def same_as(self, other: Tokenizer) -> bool:
        """Whether `other` has this tokenizer's vocabulary: the same pieces with the same merge scores, so that
        ids mean the same pieces (a tokenizer.bin read back has no user-defined symbols to compare: text with
        them encodes otherwise, and the conversions that lose them say so)."""
        return self.pieces == other.pieces and np.array_equal(self.scores, other.scores)

    # ------------------------------------------------------------------ encoding

    def most_bytes_per_token(self) -> int:
        """The most bytes of text one token of `encode` stands for: its longest mergeable piece; without byte
        tokens no bound (sys.maxsize), since a run of characters missing from the vocabulary becomes one UNK."""
        return max((len(p) for p in self.piece_ids), default=1) if self.byte_ids else sys.maxsize

    def text_bytes(self, text: str) -> int:
        """The bytes of `text` as `encode` reads them (a "▁" is a space: one byte), which is what
        `most_bytes_per_token` bounds: more than seq_len times that can never fit a context of seq_len tokens."""
        return len(text.replace(META_SPACE, " ").encode("utf-8", "surrogatepass"))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [BOS] if bos else []
        if text:
            # sentencepiece escapes spaces as "▁" before encoding, so a "▁" in the text is a space to it too
            text = " " + text.replace(META_SPACE, " ")
            parts = self._at_symbols.split(text) if self._at_symbols else [text]
            for k, part in enumerate(parts):  # text, symbol, text, ...: no merge reaches across a symbol
                if k % 2:
                    ids.append(self.symbols[part])
                elif part:
                    ids.extend(self._bpe(part))
        if eos:
            ids.append(EOS)
        return ids

    def _initial_symbols(self, text: str) -> array:
        ids = array("i")
        for ch in text:
            b = ch.encode("utf-8", "surrogatepass")
            tid = self.piece_ids.get(b)
            if tid is not None:
                ids.append(tid)
            elif self.byte_ids:
                ids.extend(self.byte_ids.get(x, UNK) for x in b)
            elif not ids or ids[-1] != UNK:  # as sentencepiece does, a run of unknown characters is one UNK
                ids.append(UNK)
        return ids

    def _bpe(self, text: str) -> list[int]:
        """Symbols in a linked list (arrays: 13 bytes a symbol); the heap holds one int per candidate merge,
        rank * n + position, so the best-scoring pair is merged first, the leftmost on ties. An entry is stale
        when the pair now at its position is no longer a piece of that rank; a duplicate of a live pair's
        entry merges that same pair at the same priority, so stale entries never change the result."""
        ids = self._initial_symbols(text)
        n = len(ids)
        if n < 2:
            return ids.tolist()
        pieces, piece_ids, rank = self.pieces, self.piece_ids, self._rank
        syms = [pieces[i] for i in ids]
        nxt = array("i", range(1, n + 1))
        prv = array("i", range(-1, n - 1))
        alive = bytearray(b"\x01") * n

        def candidate(i: int) -> int | None:
            j = nxt[i]
            if j < n:
                tid = piece_ids.get(syms[i] + syms[j])
                if tid is not None:
                    return rank[tid] * n + i
            return None

        heap = [key for key in map(candidate, range(n - 1)) if key is not None]
        heapq.heapify(heap)
        while heap:
            r, i = divmod(heapq.heappop(heap), n)
            j = nxt[i] if alive[i] else n
            if j >= n:
                continue
            merged = syms[i] + syms[j]
            tid = piece_ids.get(merged)
            if tid is None or rank[tid] != r:
                continue  # stale entry: one side was merged away since it was pushed
            syms[i], ids[i] = merged, tid
            syms[j] = b""
            alive[j] = 0
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for k in ((prv[i], i) if prv[i] >= 0 else (i,)):
                key = candidate(k)
                if key is not None:
                    heapq.heappush(heap, key)
        return [ids[i] for i in range(n) if alive[i]]

    # ------------------------------------------------------------------ decoding

    def piece_bytes(self, token: int) -> bytes:
        piece = self.pieces[token]
        m = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode_piece(self, prev: int, token: int) -> bytes:
        """What run.c prints for `token` following `prev`: the leading space dropped after BOS, byte
        tokens as their byte, and a lone unprintable byte suppressed (run.c's safe_printf)."""
        piece = self.piece_after(prev, token)
        if len(piece) == 1 and piece[0] not in _PRINTABLE:
            return b""
        return piece

    def piece_after(self, prev: int, token: int) -> bytes:
        """`token`'s piece as run.c decodes it after `prev`: its leading space dropped after BOS, a byte
        token (<0xAB>) as that byte."""
        piece = self.pieces[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def shown_piece(self, prev: int, token: int) -> bytes:
        """`token`'s piece after `prev` as text shows it: run.c's piece rules (its leading space dropped after
        BOS, a byte token as its byte, a lone unprintable ASCII byte dropped), but every byte >= 0x80 kept (it
        is part of a UTF-8 character)."""
        piece = self.piece_after(prev, token)
        if len(piece) == 1 and piece[0] < 0x80 and piece[0] not in _PRINTABLE:
            return b""
        return piece

    def token_bytes(self, prev: int, token: int) -> bytes:
        """The bytes `token` adds to the text after `prev`: its shown_piece, and nothing for the control tokens
        BOS and EOS."""
        return b"" if token in (BOS, EOS) else self.shown_piece(prev, token)

    def stream(self, prev: int = BOS, held: bytes = b"") -> TextStream:
        """An incremental decoder for the tokens that follow `prev` (and the `held` first bytes of a character
        that earlier tokens began: see TextStream.held)."""
        return TextStream(self, prev, held)

    def check_ids(self, ids: list[int]) -> None:
        """Refuse ids outside the vocabulary (a negative one would index from the end of the pieces)."""
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BabyLlamaError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def decode_text(self, ids: list[int], prev: int = BOS) -> str:
        """The text of `ids` following `prev`, as `TextStream` streams it."""
        self.check_ids([prev, *ids])
        stream = self.stream(prev)
        return "".join(stream.push(t) for t in ids) + stream.flush()

    def decode(self, ids: list[int]) -> str:
        """The text for `ids` as sentencepiece decodes it: control tokens skipped, <unk> as " ⁇ ", the dummy prefix
        (the leading space of the first piece other than a control token) removed, and each run of byte tokens as
        UTF-8 where every byte that is not part of a whole character becomes U+FFFD."""
        self.check_ids(ids)
        parts: list[str] = []
        run = bytearray()  # consecutive byte tokens; any other token ends the run
        first = True
        for t in ids:
            piece = self.pieces[t]
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                run.append(int(m.group(1), 16))
                first = False
                continue
            parts.append(_utf8_per_byte(run))
            run.clear()
            if t in (BOS, EOS):
                continue
            if t == UNK:
                parts.append(" \u2047 ")
            else:
                parts.append(_utf8_per_byte(piece[1:] if first and piece.startswith(b" ") else piece))
            first = False
        return "".join(parts) + _utf8_per_byte(run)


_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape kept aside


def _utf8_per_byte(data: bytes | bytearray) -> str:
    """UTF-8 text with one U+FFFD for each byte that is not part of a whole character, as sentencepiece decodes
    (Python's "replace" gives one for a cut-off character's bytes together)."""
    return _UNDECODED.sub("\ufffd", data.decode("utf-8", errors="surrogateescape"))


# files given as a tokenizer.bin by mistake, told by their first bytes
_OTHER_FILES = ((b"GGUF", "a GGUF model file (which carries its own vocabulary)"),
                (struct.pack("<I", MAGIC), "a llama2.c model file"),
                (b"{", "a JSON file (Hugging Face's tokenizer.json? pass the sentencepiece tokenizer.model)"))


def _unreadable(path: str | os.PathLike, data: bytes, detail: str) -> BabyLlamaError:
    """A tokenizer.bin that does not parse: what the file is instead where its first bytes say, else `detail`."""
    kind = next((kind for head, kind in _OTHER_FILES if data.lstrip().startswith(head)), None)
    return BabyLlamaError(f"{path}: not a tokenizer.bin but {kind}" if kind else f"{path}: {detail}")


class TextStream:
    """Text of a token stream as it is generated: `push(token)` returns the characters completed by that
    token (possibly none: a multi-byte character split across byte tokens waits for its last byte), `flush()`
    what is left at the end (an incomplete character becomes U+FFFD). Invalid bytes become U+FFFD too."""

    def __init__(self, tokenizer: Tokenizer, prev: int = BOS, held: bytes = b""):
        self.tokenizer = tokenizer
        self.prev = prev
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._utf8.decode(held)  # the first bytes of a character that the tokens up to `prev` began

    @property
    def held(self) -> bytes:
        """The first bytes of a character not yet finished (what `held` resumes in another stream)."""
        return self._utf8.getstate()[0]

    def push(self, token: int) -> str:
        data = self.tokenizer.token_bytes(self.prev, token)
        self.prev = token
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    def ends_held(self, token: int) -> bool:
        """Whether `token`, pushed next, cuts short a character whose first bytes are held back: they then come
        out as one U+FFFD ahead of the token's own text (the decoder replaces a valid but unfinished sequence
        with one U+FFFD), where a token that continues the character adds to it."""
        held = self.held
        if not held:  # the common case: no second look at the token's bytes
            return False
        data = self.tokenizer.token_bytes(self.prev, token)
        if not data:
            return False
        probe = codecs.getincrementaldecoder("utf-8")(errors="replace")
        probe.decode(held)
        return probe.decode(data[:1]).startswith("\ufffd")


def open_sentencepiece(model_path: str | os.PathLike):
    """A sentencepiece processor for a .model file (sentencepiece is imported only here, when needed)."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise missing_extra("reading a sentencepiece .model file", "train") from None
    safeio.check_regular(model_path, "sentencepiece model")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
        raise BabyLlamaError(f"cannot load sentencepiece model {model_path}: {e}") from None
    except UnicodeDecodeError:  # the binding decodes the library's message, which quotes the file's bytes
        raise BabyLlamaError(f"cannot load sentencepiece model {model_path}: not a valid model (its parser's "
                             "message is not text)") from None
    _check_special_ids(sp, model_path)
    return sp


def sentencepiece_pieces(sp, model_path: str | os.PathLike) -> tuple[list[str], list[float]]:
    """The pieces and scores of the sentencepiece model `sp` (from `model_path`), checked: a piece that is not
    UTF-8 (sentencepiece's Python binding raises UnicodeDecodeError for it) or a NaN/infinite score is one
    BabyLlamaError, not a traceback or a tokenizer.bin that no reader takes."""
    pieces, scores = [], []
    for i in range(sp.vocab_size()):
        try:
            pieces.append(sp.id_to_piece(i))
        except UnicodeDecodeError:
            raise BabyLlamaError(f"sentencepiece model {model_path}: piece {i} is not UTF-8 text; the file is "
                                 "corrupt") from None
        score = float(sp.get_score(i))
        if not math.isfinite(score):
            raise BabyLlamaError(f"sentencepiece model {model_path}: piece {i} has the score {score}; the file is "
                                 "corrupt")
        scores.append(score)
    return pieces, scores


def warn_normalization(sp, model_path: str | os.PathLike, into: str, keeps_symbols: bool = False) -> None:
    """One line on stderr where the sentencepiece model `sp` (from `model_path`) encodes text in a way that `into`
    (a vocabulary encoded by BPE merges of the text as it is) leaves out: its normalization, a segmentation other
    than BPE, and (unless `into` `keeps_symbols`, as a GGUF vocabulary's token types do) user-defined symbols."""
    left_out = _normalization(sp, keeps_symbols)
    if left_out:
        warn(f"sentencepiece model {model_path} has {' and '.join(left_out)}, which {into} cannot "
             "carry: text may encode differently from sentencepiece")


_SEGMENTATIONS = {1: "unigram", 3: "word", 4: "char"}  # TrainerSpec.model_type (2: BPE)


def _normalization(sp, keeps_symbols: bool = False) -> list[str]:
    """What a sentencepiece model does to text before and while encoding that tokenizer.bin's encoder (BPE merges
    of the text as it is, after one dummy-prefix space) does not: its NormalizerSpec (ModelProto field 3: name 1,
    precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4, the last two true where absent), a
    model type other than BPE (TrainerSpec, field 2: model_type 3, unigram where absent) and user-defined symbols
    (pieces, field 1, of type 4: sentencepiece keeps them whole), read from the wire format, since the protobuf
    package is no part of the train extra. Nothing where it does not parse."""
    parsed = _model_proto(sp.serialized_model_proto())
    if parsed is None:
        return []
    spec, trainer, user_defined = parsed
    raw_name = spec.get(1, b"")
    name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else ""
    left_out = []
    if name not in ("", "identity") or spec.get(2):
        left_out.append(f"{name or 'a custom'} normalization")
    if spec.get(4, 1):
        left_out.append("remove_extra_whitespaces")
    if not spec.get(3, 1):
        left_out.append("no dummy prefix")
    model_type = trainer.get(3, 1)
    if model_type != 2:
        left_out.append(f"{_SEGMENTATIONS.get(model_type, 'a non-BPE')} segmentation")  # type: ignore[arg-type]
    if user_defined and not keeps_symbols:
        texts = [text.decode("utf-8", "replace") for _, text in user_defined]
        left_out.append(f"user-defined symbols ({shown_symbols(texts)})")
    return left_out


def shown_symbols(texts: list[str]) -> str:
    """User-defined symbols named in a one-line message: the first three, ", ..." where there are more."""
    return ", ".join(texts[:3]) + (", ..." if len(texts) > 3 else "")


def user_defined_ids(sp) -> list[int]:
    """The ids of the sentencepiece model `sp`'s user-defined symbols (its pieces, ModelProto field 1, of type
    USER_DEFINED), which sentencepiece keeps whole; none where the model does not parse."""
    parsed = _model_proto(sp.serialized_model_proto())
    return [] if parsed is None else [i for i, _ in parsed[2]]


@functools.lru_cache(maxsize=1)  # one model is read at a time: user_defined_ids and _normalization both ask
def _model_proto(data: bytes) -> tuple[dict, dict, list[tuple[int, bytes]]] | None:
    """A serialized ModelProto's NormalizerSpec (field 3) and TrainerSpec (field 2) as {field number: value},
    and the ids and texts of its user-defined pieces (pieces: field 1; piece 1, type 3); None where it does not
    parse."""
    try:
        fields = list(_proto_fields(data))
        spec = dict(_proto_fields(next((v for f, v in fields if f == 3 and isinstance(v, bytes)), b"")))
        trainer = dict(_proto_fields(next((v for f, v in fields if f == 2 and isinstance(v, bytes)), b"")))
        pieces = (dict(_proto_fields(v)) for f, v in fields if f == 1 and isinstance(v, bytes))
        user_defined = [(i, p.get(1, b"")) for i, p in enumerate(pieces) if p.get(3) == USER_DEFINED]
    except (ValueError, IndexError):
        return None
    return spec, trainer, [(i, text) for i, text in user_defined if isinstance(text, bytes)]


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as ints, length-delimited fields as bytes;
    fixed-width ones are skipped."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield field, value
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated field")
            yield field, data[i:i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i:] and the index after it (IndexError where the data ends inside it)."""
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _check_special_ids(sp, model_path: str | os.PathLike) -> None:
    """Everything here (tokenizer.bin, the engine, training data) takes ids 0, 1, 2 as <unk>, <s>, </s>, as
    llama2.c does: a model trained with other ids would be converted and run with the wrong tokens."""
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (UNK, BOS, EOS):
        raise BabyLlamaError(f"sentencepiece model {model_path} has <unk>, <s>, </s> at ids {ids[0]}, {ids[1]}, "
                             f"{ids[2]} (-1: none); babyllama needs them at {UNK}, {BOS}, {EOS} as llama2.c does "
                             "(sentencepiece's defaults)")
