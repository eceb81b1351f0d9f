"""A sentencepiece-style vocabulary (piece text, score, type per id) as GGUF and Hugging Face carry it,
read from a sentencepiece `.model` or a llama2.c `tokenizer.bin`, and turned back into a `Tokenizer`.

tokenizer.bin keeps only bytes and scores, so types are rebuilt the way llama2.c lays vocabularies out:
id 0 is <unk>, ids 1 and 2 are the <s> and </s> control tokens, `<0xXX>` pieces are byte fallbacks, the
rest are normal pieces; tokenizer.bin's spaces go back to sentencepiece's "▁".
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import BabyLlamaError, missing_extra
from ..tokenizer import (
    BIN_PIECES,
    BOS,
    BYTE,
    CONTROL,
    EOS,
    META_SPACE,
    NORMAL,
    UNK,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    open_sentencepiece,
    sentencepiece_pieces,
    user_defined_ids,
)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# what a GGUF file or a Hugging Face folder whose special-token settings differ is told (the engine's convention)
LLAMA2C_CONVENTION = (f"not supported, babyllama runs llama2.c's convention (BOS id {BOS} prepended to every prompt, "
                      f"EOS id {EOS} the one end of a reply, none added after a prompt, <unk> id {UNK}, a space put "
                      "before the text)")
_BIN_SPECIAL = {UNK: "<unk>", BOS: "<s>", EOS: "</s>"}  # what tokenizer.bin stores as "\n<s>\n" etc.


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int = UNK
    bos_id: int = BOS
    eos_id: int = EOS
    # the Jinja chat template that goes with the tokenizer (GGUF's tokenizer.chat_template): a GGUF file's as read,
    # the one save_gguf writes (None there: Llama 2's)
    chat_template: str | None = None

    def to_tokenizer(self) -> Tokenizer:
        """The llama2.c tokenizer of this vocabulary (as `Tokenizer.from_sentencepiece` builds it), its
        user-defined symbols kept whole."""
        pieces = []
        for i, text in enumerate(self.tokens):
            if i == self.bos_id:
                text = BIN_PIECES[BOS]
            elif i == self.eos_id:
                text = BIN_PIECES[EOS]
            pieces.append(text.replace(META_SPACE, " ").encode("utf-8"))
        return Tokenizer(pieces, self.scores, symbols=[i for i, kind in enumerate(self.types) if kind == USER_DEFINED],
                         unmergeable=[i for i, kind in enumerate(self.types) if kind in (CONTROL, UNUSED)])


    def to_sentencepiece(self) -> bytes:
        """The bytes of a sentencepiece `.model` holding this vocabulary, set up as Llama's is (BPE, the
        identity normalization, a dummy prefix space, spaces kept, byte fallback): what transformers'
        LlamaTokenizer reads. sentencepiece encodes with it as with the model the vocabulary came from,
        since BPE encoding depends only on the pieces, their scores and types, and that set-up."""
        pb = _sentencepiece_proto()
        model = pb.ModelProto()
        for text, score, kind in zip(self.tokens, self.scores, self.types, strict=True):
            model.pieces.add(piece=text, score=score, type=kind)
        t = model.trainer_spec
        t.model_type = pb.TrainerSpec.BPE
        t.vocab_size = len(self.tokens)
        t.byte_fallback = BYTE in self.types
        t.split_digits = t.allow_whitespace_only_pieces = True
        t.unk_id, t.bos_id, t.eos_id, t.pad_id = self.unk_id, self.bos_id, self.eos_id, -1
        t.unk_piece, t.bos_piece, t.eos_piece = (self.tokens[i] for i in (self.unk_id, self.bos_id, self.eos_id))
        n = model.normalizer_spec
        n.name = "identity"
        n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = True, False, True
        return model.SerializeToString()


def can_write_sentencepiece() -> bool:
    """Whether `Vocab.to_sentencepiece` can run here (sentencepiece's protobuf module imports)."""
    try:
        _sentencepiece_proto()
    except BabyLlamaError:
        return False
    return True


def _sentencepiece_proto():
    """sentencepiece's protobuf module for .model files (it needs the protobuf package). protobuf registers a
    .proto file once per process: where another copy of sentencepiece_model.proto came first (transformers'
    own, imported when it converts a Llama tokenizer), sentencepiece's module cannot load, and that copy's
    module, which describes the same ModelProto, is used."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise missing_extra("writing a sentencepiece tokenizer.model", "interop") from None
    except TypeError as e:  # "Couldn't build proto file into descriptor pool: duplicate file name", or an old pb2
        registered = _registered_sentencepiece_proto()
        if registered is None:  # sentencepiece < 0.2's module, generated for protobuf 3, under protobuf >= 4
            first = str(e).split(".")[0]
            raise BabyLlamaError(f"writing a sentencepiece tokenizer.model: sentencepiece's protobuf module does not "
                                 f"load ({first}); install sentencepiece>=0.2 (the interop extra)") from None
        return registered
    return sentencepiece_model_pb2


def _registered_sentencepiece_proto():
    """An imported module generated from sentencepiece_model.proto, or None."""
    for module in list(sys.modules.values()):
        descriptor = getattr(module, "DESCRIPTOR", None)
        if getattr(descriptor, "name", None) == "sentencepiece_model.proto" and hasattr(module, "ModelProto"):
            return module
    return None


def load_vocab(path: str | os.PathLike) -> Vocab:
    """Read a sentencepiece .model, or anything else as a llama2.c tokenizer.bin."""
    path = Path(path)
    if not path.is_file():
        raise BabyLlamaError(f"tokenizer {path}: no such file")
    if path.suffix == ".model":
        return _from_sentencepiece(path)
    return from_tokenizer(Tokenizer.load(path))


def _from_sentencepiece(path: Path) -> Vocab:
    sp = open_sentencepiece(path)
    tokens, scores = sentencepiece_pieces(sp, path)
    symbols = set(user_defined_ids(sp))  # sentencepiece's Python API does not tell them from normal pieces
    types = []
    for i in range(sp.vocab_size()):
        if i in symbols:
            types.append(USER_DEFINED)
        elif sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_byte(i):
            types.append(BYTE)
        elif sp.is_unused(i):
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    return Vocab(tokens, scores, types, unk_id=sp.unk_id(), bos_id=sp.bos_id(), eos_id=sp.eos_id())


def from_tokenizer(tok: Tokenizer) -> Vocab:
    tokens, types = [], []
    for i, piece in enumerate(tok.pieces):
        if i in _BIN_SPECIAL:
            tokens.append(_BIN_SPECIAL[i])
            types.append(UNKNOWN if i == UNK else CONTROL)
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            raise BabyLlamaError(f"tokenizer token {i} ({piece!r}) is not valid UTF-8; "
                                 "GGUF and Hugging Face vocabularies hold text pieces") from None
        tokens.append(text.replace(" ", META_SPACE))
        types.append(USER_DEFINED if tok.symbols.get(text) == i else BYTE if _BYTE_PIECE.fullmatch(text) else NORMAL)
    return Vocab(tokens, [float(s) for s in tok.scores], types)
