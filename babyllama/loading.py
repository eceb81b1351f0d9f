"""Finding and opening a model of any format babyllama reads, with the tokenizer that goes with it.

`open_model(path)` tells the format by content, not by name, and converts in memory to `Weights`:

    llama2.c .bin (versions 0-3)       memory-mapped as is (formats.py)
    GGUF (llama.cpp)                   its vocabulary becomes the tokenizer (interop/gguf.py)
    Hugging Face folder                config.json + safetensors / pytorch_model.bin (interop/hf.py); also
                                       a .safetensors or *.index.json file of one, config.json beside it
    Meta folder                        params.json + consolidated.*.pth (interop/meta.py)
    training checkpoint                ckpt.pt or its run folder (train/checkpoint.py, needs torch)

`tokenizer_for(source, path)` picks the tokenizer: the one given, else the one the model carries (GGUF's
vocabulary, an HF/Meta folder's tokenizer.model); for a .bin or a checkpoint, else tokenizer.bin beside the
model, else (a .bin only) the built-in one when its vocabulary has the model's size. The API (`api.load`), `export`, the
catalog and the CLI all come here, so every command reads models the same way.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import formats, safeio
from .config import CHAT_TEMPLATE_FILE, CKPT_NAME, SENTENCEPIECE_MODEL, TOKENIZER_BIN
from .errors import BabyLlamaError, note, require
from .formats import Weights
from .tokenizer import TOKENIZER_HINT, Tokenizer, vocab_mismatch

if TYPE_CHECKING:
    from .interop.gguf import ConversionNote
    from .interop.vocab import Vocab

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODEL = ASSETS / "model.bin"
BUILTIN_TOKENIZER = ASSETS / "tokenizer.bin"
BUILTIN_CARD = ASSETS / "model.json"
BUILTIN_CHAT = ASSETS / "chat.bin"  # the story model fine-tuned to follow requests (scripts/train_chat.sh)
BUILTIN_CHAT_CARD = ASSETS / "chat.json"

KINDS = ("bin", "gguf", "hf", "meta", "checkpoint")
HF_FILE_SUFFIXES = (".safetensors", ".index.json")
_DESCRIPTIONS = {"bin": "llama2.c .bin", "gguf": "GGUF", "hf": "Hugging Face", "meta": "Meta checkpoint",
                 "checkpoint": "training checkpoint"}


@dataclass
class Source:
    """A model read into `Weights`, with what it brought along for its tokenizer."""

    weights: Weights
    kind: str  # one of KINDS
    path: Path  # the file or folder it was read from
    tokenizer: Path | None = None  # a tokenizer file that came with it (.model or tokenizer.bin)
    vocab: Vocab | None = None  # a vocabulary carried inside the file (GGUF)
    conversions: list = field(default_factory=list)  # describe()'s notes: GGUF conversions, a foreign chat template
    chat_template: str | None = None  # the Jinja chat template the file carries (a GGUF's, a Hugging Face folder's)
    quantized: bool = False  # the weights quantized on load (--quantize), not run as the file holds them
    merged: bool = False  # a LoRA adapter merged into the weights: they are in memory, not the file's
    inputs: list[Path] = field(default_factory=list)  # the files its weights and settings came from: not outputs

    def describe(self) -> str:
        """One line: what was loaded, and from what."""
        a = self.weights.args
        # a GGUF file's tensors are mapped as stored (its other types' conversions are among the notes)
        how = {"bin": "", "gguf": ", mapped"}.get(self.kind, ", converted in memory")
        if self.merged:
            how = ", in memory"
        if self.quantized and self.kind in ("bin", "gguf"):
            how = ", quantized on load"
        dtype = self.weights.kinds()
        notes = "".join(f"; {c}" for c in self.conversions)
        return (f"loaded {_DESCRIPTIONS[self.kind]} {self.path}: {a.param_count() / 1e6:.2f}M params, dim {a.dim}, "
                f"{a.n_layers} layers, vocab {a.vocab_size}, context {a.max_seq_len} ({dtype}{how}){notes}")


# ------------------------------------------------------------------------------------------- detection


# how torch.save's format before its zip (PyTorch 1.6) opens: pickle protocol 2, then torch's magic number
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def detect_format(path: str | os.PathLike) -> str:
    """Which of KINDS `path` holds, from its content (a folder: the files in it)."""
    path = Path(path)
    if path.is_dir():
        # by name: one that is no file (a link to nothing, as a Hugging Face cache's after its blob went) is
        # for its reader to name, not a reason to say the folder holds no model
        if os.path.lexists(path / CKPT_NAME):
            return "checkpoint"
        if os.path.lexists(path / "config.json"):
            return "hf"
        if os.path.lexists(path / "params.json"):
            return "meta"
        raise BabyLlamaError(f"{path}: a folder that holds no model babyllama reads (ckpt.pt, a Hugging Face "
                             "config.json or Meta's params.json)")
    if path.suffix == ".pt" and not path.exists():
        return "checkpoint"  # whose reader says that the checkpoint is missing
    if is_adapter_file(path):
        raise BabyLlamaError(f"{path}: a LoRA adapter, not a model: give it with --lora, beside the model it was "
                             f"trained on (babyllama run BASE --lora {path})")
    if path.name.endswith(HF_FILE_SUFFIXES):
        return "hf"  # a Hugging Face weight file or shard index, with config.json beside it (as export --hf takes)
    with safeio.open_regular(path, "model file") as f:
        try:
            head = f.read(len(_TORCH_LEGACY_HEAD))
        except OSError as e:
            raise BabyLlamaError(f"cannot read model file {path}: {e.strerror or e}") from None
    part = folder_part(path)
    if part is not None:
        raise BabyLlamaError(f"{path}: {part}, not a model file: pass the folder itself ({path.parent})")
    if head[:4] == b"GGUF":
        return "gguf"
    llama2c_magic = len(head) >= 4 and struct.unpack_from("<I", head)[0] == formats.MAGIC
    # named .gguf: a llama2.c file of version 1 or more, misnamed, still loads; version 0 has no magic to tell it
    # by, and its field checks would speak of a llama2.c header to someone holding, say, a saved error page
    if path.suffix.lower() == ".gguf" and not llama2c_magic:
        if len(head) < 4:
            raise BabyLlamaError(f"{path}: file is too small ({len(head)} bytes) to be a GGUF model")
        raise BabyLlamaError(f"{path}: not a GGUF file (it starts with {bytes(head[:4])!r}, not b'GGUF')")
    # torch.save's file (its zip, or the older pickle): a Hugging Face pytorch_model.bin beside its config, else a
    # training checkpoint
    if head.startswith((b"PK\x03\x04", _TORCH_LEGACY_HEAD)):
        return "hf" if (path.parent / "config.json").is_file() and path.name.startswith("pytorch_model") \
            else "checkpoint"
    if llama2c_magic:
        return "bin"
    if path.suffix == ".pt":
        return "checkpoint"
    return "bin"  # version 0 has no magic: its header is checked field by field


def is_adapter_file(path: Path) -> bool:
    """Whether `path` is one of a LoRA adapter's two files (its .json says babyllama's adapter format)."""
    if path.suffix not in (".json", ".safetensors"):
        return False
    from .adapter import FORMAT, adapter_paths

    _, config = adapter_paths(path)
    try:
        return config.is_file() and safeio.read_json(config, "adapter config").get("format") == FORMAT
    except BabyLlamaError:  # unreadable, too large, not JSON, or not an object: no adapter's
        return False


META_SHARD = re.compile(r"consolidated\.\d+\.pth")


def folder_part(path: Path) -> str | None:
    """What `path` is where it is a file of a Hugging Face or Meta model folder that holds no model on its own (the
    folder's config, a Meta shard, which only its folder's params.json describes); else None."""
    if path.name == "config.json":
        return "the config.json of a Hugging Face model folder"
    if path.suffix == ".json" and (path.parent / "config.json").is_file():  # its tokenizer's or generation's
        return f"the {path.name} of a Hugging Face model folder"
    if path.name == "params.json":
        return "the params.json of a Meta checkpoint folder"
    if META_SHARD.fullmatch(path.name):
        return "a shard of a Meta checkpoint"
    return None


# ------------------------------------------------------------------------------------------- opening


def hf_chat_template(folder: Path) -> tuple[str | None, list[str]]:
    """The chat template (Jinja) of a Hugging Face folder: its chat_template.jinja (where transformers 5 saves it,
    and reads it first), else its tokenizer_config.json's; None without one, and the note for one babyllama does
    not know (chat_template.foreign_template_note). Newer transformers may hold a list of named templates: the
    one named "default" is the template, as transformers takes it."""
    from .chat_template import foreign_template_note

    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            text = safeio.read_text(jinja, "chat template")
        except BabyLlamaError as e:
            return None, [f"{e}: it is not used (chat and serve use Llama 2's [INST] template unless "
                          "--chat-template or a model card names another)"]
        return text, foreign_template_note(text, f"its {CHAT_TEMPLATE_FILE}")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None, []
    try:
        template = safeio.read_json(config, "tokenizer_config.json").get("chat_template")
    except BabyLlamaError as e:  # the tokenizer's settings are transformers' to check; the weights load without
        # them, but a template it may carry would go unused without a word
        return None, [f"{e}: its chat_template, if it has one, is not used (chat and serve use Llama 2's [INST] "
                      "template unless --chat-template or a model card names another)"]
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        template)
    notes = foreign_template_note(template, "its tokenizer_config.json")
    return (template if isinstance(template, str) else None), notes


def _hf_source(paths: Sequence[str | os.PathLike], max_seq_len: int | None, quantize: str | None = None) -> Source:
    """A Hugging Face checkpoint, given as its folder or as its weight files, with what its folder holds beside
    them: tokenizer.model and tokenizer_config.json's chat template."""
    from .interop.hf import load_hf

    first = Path(paths[0])
    folder = first if first.is_dir() else first.parent
    template, notes = hf_chat_template(folder)
    read: list[Path] = []
    weights = load_hf(paths, max_seq_len, quantize, read)
    if (folder / CHAT_TEMPLATE_FILE).is_file():  # load_hf lists the folder's other files it read
        read.append(folder / CHAT_TEMPLATE_FILE)
    return Source(weights, "hf", first, _first_file(folder / SENTENCEPIECE_MODEL), conversions=notes,
                  chat_template=template, inputs=read)


def _meta_source(folder: Path, max_seq_len: int | None, quantize: str | None = None) -> Source:
    """A Meta checkpoint folder, with the tokenizer.model Meta ships beside the size folders
    (llama-2-7b/../tokenizer.model) or in it."""
    from .interop.meta import load_meta

    read: list[Path] = []
    return Source(load_meta(folder, max_seq_len, quantize, read), "meta", folder,
                  _first_file(folder / SENTENCEPIECE_MODEL, folder.parent / SENTENCEPIECE_MODEL), inputs=read)


def open_model(path: str | os.PathLike, kind: str | None = None, mmap: bool | None = None,
               max_seq_len: int | None = None, keep_quantized: bool = True, read_once: bool = False,
               quantize: str | None = None, convert_other_types: bool = True) -> Source:
    """Read the model at `path` (format detected unless `kind` says it) into `Weights`. `keep_quantized`: a
    GGUF file's Q8_0/Q4_0 tensors stay memory-mapped and, where `convert_other_types`, its other quantized types
    become the nearest of those, which the native kernels run (interop/gguf.py); without it they are read as
    fp32, the file's own weights (for the PyTorch engine, which computes in fp32 or bf16 whatever it is given,
    and for export); keep_quantized False reads every tensor as fp32. `read_once`: the weights are read once more
    (quantized, or written out) and then dropped: a llama2.c file is mapped, never resident as a whole
    (formats.load). `quantize` (config.QUANTIZE_KINDS, `--quantize`): the weights quantized on load
    (Weights.quantize_as), read once; a GGUF file's, a Hugging Face or Meta checkpoint's matrices each as it is
    read (from_state_dict), so that memory never holds the fp32 model."""
    if quantize is not None:
        formats.check_quantize_kind(quantize)  # before the model is read
    read_once = read_once or quantize is not None
    path = Path(path)
    kind = kind or detect_format(path)
    check_mmap_applies(mmap, kind, path)
    if kind == "bin":
        weights = formats.load(path, mmap=mmap, read_once=read_once)
        source = Source(weights, kind, path, _first_file(path.with_name(TOKENIZER_BIN)),  # run.c's -z default
                        inputs=[path])
    elif kind == "gguf":
        from .interop.gguf import load_gguf

        conversions: list[ConversionNote | str] = []
        weights, vocab = load_gguf(path, max_seq_len, keep_quantized=keep_quantized, notes=conversions,
                                   quantize=quantize, convert_other_types=convert_other_types)
        source = Source(weights, kind, path, vocab=vocab, conversions=conversions,
                        chat_template=vocab.chat_template if vocab is not None else None, inputs=[path])
    elif kind == "hf":
        source = _hf_source([path], max_seq_len, quantize)
    elif kind == "meta":
        source = _meta_source(path, max_seq_len, quantize)
    elif kind == "checkpoint":
        ckpt = path / CKPT_NAME if path.is_dir() else path
        source = Source(weights_from_checkpoint(ckpt), kind, ckpt, _first_file(ckpt.parent / TOKENIZER_BIN),
                        inputs=[ckpt])
    else:
        raise BabyLlamaError(f"unknown model format {kind!r} (choose {', '.join(KINDS)})")
    if max_seq_len and kind in ("bin", "checkpoint"):
        source.weights.args.max_seq_len = max_seq_len
        try:
            source.weights.args.validate()
        except ValueError as e:
            raise BabyLlamaError(f"--max-seq-len: {e}") from None
    if quantize is not None:
        from . import kernels

        source.weights = source.weights.quantize_as(quantize, kernels.q4_0_blocks)
        source.quantized = True
    return source


# how the formats other than llama2.c's are read, whatever --mmap / --no-mmap would ask
_READ_WITHOUT_CHOICE = {"gguf": "a GGUF file is always memory-mapped",
                        "hf": "a Hugging Face checkpoint is converted as it is read",
                        "meta": "a Meta checkpoint is converted as it is read",
                        "checkpoint": "a training checkpoint is converted as it is read"}


def check_mmap_applies(mmap: bool | None, kind: str, path: Path) -> None:
    """--mmap / --no-mmap (`mmap=` in the API) choose how a llama2.c .bin file is read (formats.load); for any
    other format the choice is refused rather than ignored."""
    if mmap is not None and kind in _READ_WITHOUT_CHOICE:
        flag = "--mmap (mmap=True)" if mmap else "--no-mmap (mmap=False)"
        raise BabyLlamaError(f"{path}: {flag} applies to llama2.c .bin files only; {_READ_WITHOUT_CHOICE[kind]}")


def load_source(*, checkpoint: str | None = None, model: str | None = None, meta_llama: str | None = None,
                hf: list[str] | None = None, max_seq_len: int | None = None, mmap: bool | None = None,
                quantize: str | None = None) -> Source:
    """`export`'s sources, one of which is given: the format named by the flag rather than detected (an HF
    checkpoint may also be given as its weight files with config.json beside them). `quantize`: the type the
    export writes (`--quantize`'s q8_0 or q4_0 of a version 2 or 3 .bin, or one of interop.state_dict.GGUF_BLOCKS),
    into which a Hugging Face or Meta checkpoint's matrices are quantized as each is read, so that the whole
    checkpoint is never resident (the blocks are those the writer would make of the full weights; a Hugging Face
    checkpoint whose rows are not all whole blocks of 32 is read as it is for version 3, whose writer refuses it)."""
    if hf is not None and quantize == "q4_0":
        from .interop.hf import hf_args

        try:
            formats.check_q4_shape(hf_args(hf, max_seq_len))
        except BabyLlamaError:
            quantize = None
    if hf is not None:  # its folder, or its weight files
        check_mmap_applies(mmap, "hf", Path(hf[0]))
        return _hf_source(hf, max_seq_len, quantize)
    if meta_llama is not None:
        check_mmap_applies(mmap, "meta", Path(meta_llama))
        return _meta_source(Path(meta_llama), max_seq_len, quantize)
    given = {"checkpoint": checkpoint, None: model}
    for kind, path in given.items():
        if path is not None:
            # export writes every tensor once, converted on its turn: a GGUF's tensors stay as the file holds
            # them (mapped; its types of no kernel's as the fp32 weights they stand for, never through a lossy
            # conversion), a .bin's are read once and then dropped
            return open_model(path, kind, mmap=mmap, max_seq_len=max_seq_len, read_once=True,
                              convert_other_types=False)
    raise BabyLlamaError("a model source is needed: --checkpoint, --model, --meta-llama or --hf")


def weights_from_checkpoint(path: str | os.PathLike) -> Weights:
    """A babyllama training checkpoint (ckpt.pt) as fp32 Weights."""
    require("torch", "train", "reading a training checkpoint")
    from .train.checkpoint import load_model

    return load_model(path).to_weights()


def _first_file(*candidates: Path) -> Path | None:
    """The first of `candidates` (where a model's tokenizer is looked for) whose name is there. One that is no file
    (a symbolic link to nothing, a folder) is returned too, for its reader to refuse should it be needed (no -z):
    passed over, the run would go on with another tokenizer (the built-in one, for a .bin of its vocabulary size)
    and print garbage without a word."""
    return next((p for p in candidates if os.path.lexists(p)), None)


# ------------------------------------------------------------------------------------------- tokenizers


def builtin_tokenizer_for(model_path: str | os.PathLike, vocab_size: int) -> Path:
    """run.c's -z default made helpful, for a .bin with no tokenizer.bin beside it: the built-in tokenizer when
    its vocabulary has the model's size."""
    if BUILTIN_TOKENIZER.is_file() and Tokenizer.load(BUILTIN_TOKENIZER).vocab_size == vocab_size:
        # said every time: a model trained with a vocabulary of its own of this size would print garbage
        here = (f"; the {TOKENIZER_BIN} in the current folder, run.c's default, is read only when given: -z "
                f"{TOKENIZER_BIN}" if another_tokenizer_here()
                else "; pass --tokenizer (-z) if it was trained with another")
        note(f"{model_path} has no {TOKENIZER_BIN} beside it and runs with the built-in tokenizer "
             f"(llama2.c's {vocab_size} tokens){here}")
        return BUILTIN_TOKENIZER
    raise BabyLlamaError(f"no tokenizer found for {model_path} (vocab {vocab_size}): put tokenizer.bin beside it or "
                         f"pass -z{run_c_default_here()}")


def run_c_default_here() -> str:
    """For an error that asks for a tokenizer: run.c's own default is tokenizer.bin in the current folder, which a
    llama2.c user has there; named where it is (not read: it may be another model's)."""
    return (f" (run.c's default, {TOKENIZER_BIN} in the current folder, is read only when given: -z {TOKENIZER_BIN})"
            if os.path.lexists(TOKENIZER_BIN) else "")


def llama2c_vocab_here(vocab_size: int) -> str:
    """For a checkpoint without a tokenizer beside it (llama2.c's train.py writes none): where llama2.c's
    tinystories.py put a custom vocabulary of this size, which its sample.py reads, if the current folder has it
    (named, not read: the run's data may have been encoded with another)."""
    found = [name for name in (f"data/tok{vocab_size}.model", f"data/tok{vocab_size}.bin") if os.path.isfile(name)]
    return f" (llama2.c's sample.py would read {found[0]} here: -z {found[0]})" if found else ""


def another_tokenizer_here() -> bool:
    """Whether the current folder holds a tokenizer.bin other than the built-in one: run.c would read it."""
    here = Path(TOKENIZER_BIN)
    try:
        return here.is_file() and (here.stat().st_size != BUILTIN_TOKENIZER.stat().st_size or
                                   here.read_bytes() != BUILTIN_TOKENIZER.read_bytes())
    except OSError:  # unreadable: a note cannot be sure of it, and the run does not read it
        return False


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None, note: bool = True,
                   to_file: bool = False) -> Tokenizer:
    """A tokenizer.bin, or a sentencepiece .model converted as llama2.c's tokenizer.py does (`note`, `to_file`:
    Tokenizer.from_sentencepiece's), checked against `vocab_size` where one is given."""
    path = Path(path)
    if path.suffix == ".model":
        tok = Tokenizer.from_sentencepiece(path, note=note, to_file=to_file)
        if vocab_size is not None and tok.vocab_size != vocab_size:
            raise vocab_mismatch(f"tokenizer {path}", tok.vocab_size, vocab_size, TOKENIZER_HINT)
        return tok
    return Tokenizer.load(path, vocab_size)


def tokenizer_for(source: Source, path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer to run `source` with: `path` (-z), else the one it carries, else one found beside it."""
    vocab_size = source.weights.args.vocab_size
    if path is not None:
        return load_tokenizer(path, vocab_size)
    carried = carried_tokenizer(source)
    if carried is not None:
        return carried
    if source.kind in ("hf", "meta"):
        raise BabyLlamaError(f"{source.path}: no tokenizer.model in the model folder; pass -z TOKENIZER")
    if source.kind == "checkpoint":  # its run's data had its own tokenizer: the built-in one would be a guess
        hint = llama2c_vocab_here(vocab_size) + run_c_default_here()
        raise BabyLlamaError(f"no {TOKENIZER_BIN} beside {source.path} (training puts its data's there): pass the "
                             f"tokenizer the run's data was encoded with (-z/--tokenizer){hint}")
    return Tokenizer.load(builtin_tokenizer_for(source.path, vocab_size), vocab_size)


def carried_tokenizer(source: Source, advice: str = TOKENIZER_HINT) -> Tokenizer | None:
    """The tokenizer `source` brought along (a GGUF's vocabulary, a folder's tokenizer.model, the tokenizer.bin
    beside a .bin or a checkpoint), or None: no fallback guessed. `advice` ends the error for a tokenizer file of
    another size than the model's vocabulary: -z replaces the model's, not a draft's or a teacher's."""
    vocab_size = source.weights.args.vocab_size
    if source.vocab is not None:
        tok = source.vocab.to_tokenizer()
        if tok.vocab_size != vocab_size:
            raise vocab_mismatch(f"{source.path}: its vocabulary", tok.vocab_size, vocab_size)
        return tok
    if source.tokenizer is not None:
        tok = load_tokenizer(source.tokenizer)
        if tok.vocab_size != vocab_size:
            raise vocab_mismatch(f"tokenizer {source.tokenizer}", tok.vocab_size, vocab_size, advice)
        return tok
    return None


def builtin_model() -> Path:
    if not BUILTIN_MODEL.is_file():
        raise BabyLlamaError("the built-in model is missing from this installation; pass a model file")
    return BUILTIN_MODEL


def model_card(checkpoint: str | None, strict: Collection[str] = ()) -> dict:
    """The model's card, if any: its name and chat template. The built-in model's; for a model file NAME.EXT the
    NAME.json beside it (the built-in assets' layout: model.bin and model.json, chat.bin and chat.json); for a
    model folder its model.json; for a training checkpoint (its folder or the checkpoint file however named) its
    run folder's model.json. A card that is there but does not read as an object, or whose name or chat_template
    is not a non-empty string (a template is text to render, and the name is the id /v1/models gives clients), is
    skipped, unless a field the caller takes from it is named in `strict` (chat's chat_template, serve's and its
    name where no flag gives them, which would otherwise be replaced without a word): then it is an error."""
    if checkpoint is None:
        path = BUILTIN_CARD
    elif Path(checkpoint).is_dir():
        path = Path(checkpoint) / "model.json"
    elif _is_checkpoint_file(Path(checkpoint)):
        path = Path(checkpoint).parent / "model.json"
    else:
        path = Path(checkpoint).with_suffix(".json")
    if not os.path.lexists(path):
        return {}
    try:
        card = safeio.read_json(path, "model card")  # a regular file holding an object (a named pipe would block)
    except BabyLlamaError as e:
        if strict:
            raise BabyLlamaError(f"{e} (the model card: fix it or remove it)") from None
        return {}
    fields = {key: card[key] for key in ("name", "chat_template") if key in card}
    bad = [key for key, value in fields.items() if not (isinstance(value, str) and value)]
    refused = [key for key in bad if key in strict]
    if refused:
        raise BabyLlamaError(f"{path}: the model card's {refused[0]} must be a non-empty string, not "
                             f"{json.dumps(fields[refused[0]])[:40]}")
    return {key: value for key, value in fields.items() if key not in bad}


def _is_checkpoint_file(path: Path) -> bool:
    try:
        return detect_format(path) == "checkpoint"
    except BabyLlamaError:  # missing or unreadable: its loader says so; a card lookup does not
        return False


def model_template(source: Source, checkpoint: str | None) -> str | None:
    """The name of the chat template the model read from `checkpoint` (None: the built-in model) takes: its card's
    (model_card), else the one its file carries where that is a known template (chat_template.named_template);
    None: neither says (Llama 2's is the default)."""
    from .chat_template import named_template

    return model_card(checkpoint).get("chat_template") or named_template(source.chat_template)


def builtin_chat_model() -> Path:
    """The built-in chat model: what `babyllama chat` runs when given no model."""
    if not BUILTIN_CHAT.is_file():
        raise BabyLlamaError("the built-in chat model is missing from this installation; pass a model file")
    return BUILTIN_CHAT
