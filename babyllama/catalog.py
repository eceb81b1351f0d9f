"""The models babyllama knows by name: the built-in story and chat models and llama2.c's public TinyStories
checkpoints (karpathy/tinyllamas on the Hugging Face hub), with where to download them.

Figures for the public models are quoted from llama2.c's README ("models" table, karpathy/llama2.c at
commit d9862069): shape and val loss as reported there. Their val losses are per token of each model's own
vocabulary (512 tokens for stories260K, Llama 2's 32000 for the others), so they compare only within
one vocabulary; `babyllama eval` prints bits per byte, which compares across vocabularies. File sizes
are those of the llama2.c version-0 layout for the reported shape (`formats.body_size`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .config import LLAMA2_VOCAB_SIZE, TOKENIZER_BIN
from .errors import BabyLlamaError
from .loading import BUILTIN_CARD, BUILTIN_CHAT, BUILTIN_CHAT_CARD, BUILTIN_MODEL, BUILTIN_TOKENIZER

TINYLLAMAS = "https://huggingface.co/karpathy/tinyllamas/resolve/main"
LLAMA2C_RAW = "https://raw.githubusercontent.com/karpathy/llama2.c/master"
LLAMA2C_README = "https://github.com/karpathy/llama2.c#models"


@dataclass(frozen=True)
class RemoteFile:
    base: str  # the URL folder it lives in (a --url-base mirror replaces it)
    path: str  # path under that folder
    save_as: str  # file name in the download folder (TOKENIZER_BIN is found beside the model)

    def url(self, base: str | None = None) -> str:
        return f"{(base or self.base).rstrip('/')}/{self.path}"


@dataclass(frozen=True)
class KnownModel:
    name: str
    params: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    vocab_size: int
    val_loss: float | None  # as reported by its authors
    size: int  # bytes of the model file
    files: tuple[RemoteFile, ...] = ()  # model first, then its tokenizer

    @property
    def model_file(self) -> str:
        return self.files[0].save_as if self.files else BUILTIN_MODEL.name


def _tinyllama(name: str, params: str, dim: int, layers: int, heads: int, kv: int, seq: int, loss: float,
               size: int) -> KnownModel:
    if name == "stories260K":  # a folder of its own, with its 512-token tokenizer
        files = (RemoteFile(TINYLLAMAS, f"{name}/{name}.bin", f"{name}.bin"),
                 RemoteFile(TINYLLAMAS, f"{name}/tok512.bin", TOKENIZER_BIN))
        vocab = 512
    else:  # Llama 2's 32000-token sentencepiece vocabulary, as llama2.c's tokenizer.bin
        files = (RemoteFile(TINYLLAMAS, f"{name}.bin", f"{name}.bin"),
                 RemoteFile(LLAMA2C_RAW, "tokenizer.bin", TOKENIZER_BIN))
        vocab = LLAMA2_VOCAB_SIZE
    return KnownModel(name, params, dim, layers, heads, kv, seq, vocab, loss, size, files)


PUBLIC = (
    _tinyllama("stories260K", "260K", 64, 5, 8, 4, 512, 1.297, 1_056_540),
    _tinyllama("stories15M", "15M", 288, 6, 6, 6, 256, 1.072, 60_816_028),
    _tinyllama("stories42M", "42M", 512, 8, 8, 8, 1024, 0.847, 167_020_572),
    _tinyllama("stories110M", "110M", 768, 12, 12, 12, 1024, 0.760, 438_381_596),
)


def builtin_card() -> dict:
    """The built-in model's card (assets/model.json): config, data, training, eval figures."""
    try:
        return json.loads(BUILTIN_CARD.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BabyLlamaError("the built-in model card is missing from this installation") from None


def builtin() -> KnownModel | None:
    if not (BUILTIN_MODEL.is_file() and BUILTIN_TOKENIZER.is_file() and BUILTIN_CARD.is_file()):
        return None
    card = builtin_card()
    c = card["config"]
    return KnownModel("builtin", card["params"], c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                      c["max_seq_len"], c["vocab_size"], card["eval"]["valid"]["loss"], BUILTIN_MODEL.stat().st_size)


def builtin_chat() -> KnownModel | None:
    """The built-in chat model (the story model fine-tuned to follow requests); no val loss: its figures are
    how well it follows requests (its card's eval)."""
    if not (BUILTIN_CHAT.is_file() and BUILTIN_TOKENIZER.is_file() and BUILTIN_CHAT_CARD.is_file()):
        return None
    card = json.loads(BUILTIN_CHAT_CARD.read_text(encoding="utf-8"))
    c = card["config"]
    return KnownModel("builtin-chat", card["params"], c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                      c["max_seq_len"], c["vocab_size"], None, BUILTIN_CHAT.stat().st_size)


SHIPPED_USE = {"builtin": (BUILTIN_MODEL, "babyllama run"), "builtin-chat": (BUILTIN_CHAT, "babyllama chat")}


def known_models() -> list[KnownModel]:
    return [m for m in (builtin(), builtin_chat()) if m] + list(PUBLIC)


def find(name: str) -> KnownModel:
    for m in PUBLIC:
        if m.name.lower() == name.lower():
            return m
    if name in SHIPPED_USE:
        raise BabyLlamaError(f"{name} ships with babyllama: nothing to download ({SHIPPED_USE[name][1]})")
    names = ", ".join(m.name for m in PUBLIC)
    raise BabyLlamaError(f"unknown model {name!r}; known: {names} (see babyllama models)")


def table() -> str:
    """`babyllama models`: one row per model, then where each comes from."""
    header = ("name", "params", "dim", "layers", "heads", "kv", "ctx", "vocab", "val loss*", "size")
    rows = [header]
    for m in known_models():
        rows.append((m.name, m.params, str(m.dim), str(m.n_layers), str(m.n_heads), str(m.n_kv_heads),
                     str(m.seq_len), str(m.vocab_size), f"{m.val_loss:.3f}" if m.val_loss else "-",
                     f"{m.size / 1e6:.2f} MB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.append("")
    for m in known_models():
        if m.files:
            lines.append(f"{m.name}: babyllama download {m.name}  ({m.files[0].url()})")
        else:
            path, use = SHIPPED_USE[m.name]
            lines.append(f"{m.name}: ships with babyllama ({path}); {use}")
    lines += ["",
              "* val loss: mean loss per token of the model's own vocabulary on TinyStories validation text.",
              f"  Public models: as reported in llama2.c's README ({LLAMA2C_README}).",
              "  builtin: babyllama eval on the 188-story valid.txt (its card: babyllama/assets/model.json).",
              "  builtin-chat: how well it follows requests instead (eval --instruct; its card: chat.json).",
              "  Losses of different vocabularies don't compare; bits per byte (babyllama eval) does."]
    return "\n".join(lines)
