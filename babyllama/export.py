"""`babyllama export`: read a model from any source into `Weights`, write it to any target; and
sentencepiece tokenizers into tokenizer.bin (`export-tokenizer`).

Sources are read by `loading.load_source` (a training checkpoint, a .bin or GGUF file, Meta's or a Hugging Face
checkpoint), with a LoRA adapter merged in when one is given (--lora; a Hugging Face export then also carries
the adapter in PEFT's layout, in OUT/adapter). Targets: a .bin of version 0-3 (--to bin), a Hugging Face
directory (--to hf), a GGUF file (--to gguf). The converters themselves live in `babyllama.interop`; this
module only picks them and the tokenizer that goes with the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import formats, kernels, safeio
from .chat_template import DEFAULT_TEMPLATE, get_template
from .config import SENTENCEPIECE_MODEL, TOKENIZER_BIN
from .errors import BabyLlamaError, note, say, warn
from .formats import Weights
from .interop.vocab import Vocab
from .loading import Source, load_tokenizer, model_template
from .tokenizer import Tokenizer, open_sentencepiece, shown_symbols, vocab_mismatch, warn_normalization

if TYPE_CHECKING:
    from .adapter import Adapter

TARGETS = ("bin", "hf", "gguf")


def infer_target(out: str, to: str | None) -> str:
    """--to, else from OUT's name (any case): .gguf -> gguf, .bin -> bin, anything else -> a Hugging Face
    directory."""
    if to:
        return to
    suffix = Path(out).suffix.lower()
    return {".gguf": "gguf", ".bin": "bin"}.get(suffix, "hf")


def export(src: Source, out: str | os.PathLike, to: str, *, version: int | None = None,
           group_size: int | None = None, dtype: str | None = None, tokenizer: str | None = None,
           lora: str | os.PathLike | None = None, chat_template: str | None = None) -> list[Path]:
    """Write `src` as `to` at `out` (plus its tokenizer where the target carries one), with the LoRA adapter
    `lora` merged in; returns the paths written. The chat template the model takes travels with it (see
    `_chat_template`; `chat_template` names it). Flags that do not apply to the target are refused rather than
    silently ignored."""
    if to not in TARGETS:
        raise BabyLlamaError(f"unknown export target '{to}' (choose {', '.join(TARGETS)})")
    if version is not None and to != "bin":
        raise BabyLlamaError(f"--version applies to .bin output, not --to {to}")
    if group_size is not None and (to != "bin" or version != 2):
        raise BabyLlamaError("--group-size applies to --version 2 (Q8_0) .bin output only")
    # llama2.c's export.py takes --dtype (default fp32) and writes .bin files without reading it: fp32, what
    # versions 0 and 1 hold, is taken as said; another dtype would be a request no .bin can meet
    if dtype is not None and to == "bin" and not (dtype == "f32" and version in (None, 0, 1)):
        raise BabyLlamaError(f"--dtype {dtype} does not apply to .bin output: versions 0 and 1 hold fp32 (--dtype "
                             "fp32 is taken for them, as llama2.c's export.py takes it), version 2 Q8_0, version 3 "
                             "Q4_0; --dtype applies to GGUF and Hugging Face output")
    if dtype is not None and to == "hf":
        from .interop.hf import HF_DTYPES

        if dtype not in HF_DTYPES:
            raise BabyLlamaError(f"--dtype {dtype} applies to GGUF output; Hugging Face output takes f32, f16 or bf16")
    # not the built-in tokenizer that `run` falls back on for a .bin of its vocabulary size: a guess that shows at
    # once in what `run` prints would here be written into a file as the model's tokenizer
    tok = Path(tokenizer) if tokenizer else src.tokenizer
    if tok is not None:
        safeio.check_regular(tok, "tokenizer file")
    if to != "hf":  # a file
        safeio.refuse_folder_name(out, ".bin output" if to == "bin" else "GGUF output")
    out = Path(out)
    _check_not_source(out, src, to, lora is not None)
    _check_not_input(out, lora, tok)
    adapter, base = None, src.weights
    if lora is not None:
        from .adapter import load_adapter, merge

        adapter = load_adapter(lora)
        src = replace(src, weights=merge(base, adapter, str(src.path)))
    explicit = tokenizer is not None
    template, jinja = _chat_template(src, chat_template, lora is not None)
    # the folders made for OUT (and OUT/adapter) go again when the export fails, and its files are renamed into
    # place together once all are written: a failed export leaves nothing, and an earlier export in OUT whole
    made = (out / "adapter" if adapter is not None else out) if to == "hf" else out.parent
    with safeio.new_folders_removed_on_error(made), safeio.committed_together():
        if to == "bin":
            if template is None and jinja is not None:  # a card names a template babyllama knows, no other
                note(f"{src.path} carries a chat template babyllama does not know, which a .bin and its card "
                     "cannot hold: left out (GGUF and Hugging Face output keep it)")
            return _to_bin(src, out, 1 if version is None else version, group_size, tok, explicit, template)
        if to == "hf":
            return _to_hf(src, out, dtype, tok, explicit, adapter, base, jinja, chat_template is not None)
        from .interop.gguf import DTYPES, save_gguf

        if dtype is not None and dtype not in DTYPES:
            raise BabyLlamaError(f"unknown GGUF dtype '{dtype}' (choose {', '.join(DTYPES)})")
        vocab = replace(_gguf_vocab(src, tok), chat_template=jinja)
        save_gguf(src.weights, safeio.output_file(out), vocab, dtype or "f32")
        return [out]


def _chat_template(src: Source, name: str | None, merging: bool) -> tuple[str | None, str | None]:
    """The chat template the exported model takes, as (its name where it is a known one, its Jinja); (None,
    None): Llama 2's, the default. `name` (--chat-template) first; else the source's own, its card's or the
    template its file carries (loading.model_template; a template babyllama does not know is kept as it is);
    but a merged adapter was fine-tuned with Llama 2's, whatever its base took."""
    if name is None and not merging:
        name = model_template(src, str(src.path))  # a known template the file carries comes back by its name
        if name is None:
            return None, src.chat_template
        if name == DEFAULT_TEMPLATE:  # carried, not named: the default, which no output needs a card for
            return None, None
    return name, get_template(name).jinja if name is not None else None


def _to_hf(src: Source, out: Path, dtype: str | None, tok: Path | None, explicit: bool,
           adapter: Adapter | None, base: Weights, chat_template: str | None, template_given: bool) -> list[Path]:
    """The model as a Hugging Face folder and, with `adapter`, the adapter in PEFT's layout in OUT/adapter
    (written first: config.json, the model's, is the last file renamed into place). The chat template goes into
    tokenizer_config.json, which comes with a tokenizer: --chat-template (`template_given`) is refused where the
    folder gets none and keeps none."""
    from .interop.hf import save_hf

    if adapter is None and (out / "adapter").exists():  # a merged model beside an adapter would take it twice
        raise BabyLlamaError(f"{out} holds an adapter folder from another export ({out / 'adapter'}), which "
                             "does not belong to this model: remove it or choose an empty folder")
    sp_model = _hf_tokenizer(src, tok, explicit)
    if sp_model is None:
        _check_folder_tokenizer(out, src.weights.args.vocab_size)
        if template_given and not (out / SENTENCEPIECE_MODEL).is_file():
            raise BabyLlamaError(f"--chat-template: {out} gets no tokenizer (none came with the model), so no "
                                 "tokenizer_config.json to hold the template; pass --tokenizer TOK.model")
    written = []
    if adapter is not None:
        from .adapter import save_peft

        written.append(save_peft(adapter, base, out / "adapter"))
    save_hf(src.weights, out, sp_model, dtype or "f32", chat_template)
    if sp_model is None:
        _note_folder_tokenizer(out)
    return [out, *written]


def _check_not_source(out: Path, src: Source, to: str, merging: bool) -> None:
    """Refuse to write over the model being read: a file it was read from (a link to one), or, for Hugging Face
    output, the folder a Hugging Face checkpoint was read from. The export would replace the source it
    was asked to convert, and a file still mapped for reading would change under the reader."""
    if not out.exists():
        return
    read_from = [p for p in src.inputs if p.exists()]
    if to == "hf" and src.kind == "hf":
        read_from += [p.parent for p in src.inputs]
    model = "the base model" if merging else "the model being exported"
    if out.samefile(src.path):
        what = model
    elif any(out.samefile(p) for p in read_from):
        what = f"{'the folder' if out.is_dir() else 'a file'} of {model}"
    else:
        return
    if merging:
        raise BabyLlamaError(f"{out} is {what}: the merged model written over it would leave the adapter without "
                             "the base it was trained on; write it to another file")
    raise BabyLlamaError(f"{out} is {what} ({src.path}): writing over it would lose it; choose another output")


def _check_not_input(out: Path, lora: str | os.PathLike | None, tok: Path | None) -> None:
    """Refuse to write over the adapter being merged or the tokenizer being read: both would be lost."""
    from .adapter import adapter_paths

    inputs = [("the adapter", p) for p in adapter_paths(lora)] if lora is not None else []
    inputs += [("the tokenizer", tok)] if tok is not None else []
    for what, path in inputs:
        if out.exists() and path.exists() and out.samefile(path):
            raise BabyLlamaError(f"{out} is {what} this export reads ({path}): writing over it would lose it; "
                                 "choose another output")


def _to_bin(src: Source, out: Path, version: int, group_size: int | None, tok: Path | None,
            explicit: bool, template: str | None) -> list[Path]:
    """The model at `out` and, when a tokenizer came with it, tokenizer.bin beside it (a .bin model is run with
    the one beside it), and where a chat template is named (`template`), a model card naming it (NAME.json, which
    `chat` and the server read: a .bin has no room for one); everything is checked before anything is written, and
    the files are renamed into place together (`export`'s committed_together)."""
    if out.name == TOKENIZER_BIN:
        raise BabyLlamaError(f"{out}: a .bin model finds its tokenizer under the name {TOKENIZER_BIN} beside it; "
                             "choose another name for the model")
    card, card_fields = _bin_card(out, template)
    safeio.output_file(out)
    tokenizer = _bin_tokenizer(src, tok)
    tok_out = out.with_name(TOKENIZER_BIN)
    if tokenizer is None:  # the model runs with the tokenizer.bin beside it: one of another size never could
        _check_kept_tokenizer(tok_out, src.weights.args.vocab_size)
    elif not _replaces_tokenizer(tok_out, tokenizer, tok, explicit, src.path):
        tokenizer = None
    formats.save(src.weights, out, version, group_size, quantize_q4=kernels.q4_0_blocks)
    written = [out]
    if tokenizer is None and not tok_out.is_file():  # `run` would guess one (the built-in's of its vocabulary size)
        note(f"{out} gets no {TOKENIZER_BIN} beside it (none came with {src.path}): pass --tokenizer TOK to add "
             "one, or -z TOKENIZER when running it")
    if tokenizer is not None:
        tokenizer.save(tok_out)
        written.append(tok_out)
    if card is not None:
        safeio.write_text(card, json.dumps(card_fields, indent=2, ensure_ascii=False) + "\n")
        written.append(card)
    return written


def _bin_card(out: Path, template: str | None) -> tuple[Path | None, dict]:
    """The card (NAME.json) a .bin output gets and what it holds: the model's chat template, in the card already
    there (its other fields kept: a name, notes; its template is the new model's), or in a new one where a template
    is named; (None, {}) where neither (Llama 2's, the default, needs no card)."""
    card = out.with_suffix(".json")
    if card == out:
        raise BabyLlamaError(f"{out}: a .bin model's card takes the name {card.name}, which would be the model "
                             "itself; choose a name that does not end in .json")
    # os.path.exists: a NAME.json one byte too long for the system (a .bin named with 251 bytes) is no card
    fields = safeio.read_json(card, "model card") if os.path.exists(card) else None
    if fields is None and template is None:
        return None, {}
    return card, {**(fields or {}), "chat_template": template or DEFAULT_TEMPLATE}


def _bin_tokenizer(src: Source, tok: Path | None) -> Tokenizer | None:
    """The tokenizer that came with the model (--tokenizer, the source's file or vocabulary), checked against
    the model's vocabulary size; None when there is none."""
    if tok is not None:
        tokenizer = load_tokenizer(tok, to_file=True)
    elif src.vocab is not None:
        tokenizer = src.vocab.to_tokenizer()
        if tokenizer.symbols:
            warn(f"{src.path} has user-defined symbols ({shown_symbols(list(tokenizer.symbols))}), which a "
                 "tokenizer.bin cannot carry: text may encode differently from the source")
    else:
        return None
    _check_vocab(tokenizer.vocab_size, src.weights.args.vocab_size, tok)
    return tokenizer


def _check_kept_tokenizer(tok_out: Path, vocab_size: int) -> None:
    """A .bin export that carries no tokenizer leaves the tokenizer.bin beside OUT in place, which `run` then
    reads: refused when its vocabulary size shows it belongs to another model (as a Hugging Face folder's
    tokenizer.model is, `_check_folder_tokenizer`)."""
    existing = _readable_tokenizer(tok_out) if tok_out.is_file() else None
    if existing is not None and existing.vocab_size != vocab_size:
        raise vocab_mismatch(tok_out, existing.vocab_size, vocab_size, " (a tokenizer of another model): pass "
                             "--tokenizer TOK to replace it, or export into another folder")


def _replaces_tokenizer(tok_out: Path, tokenizer: Tokenizer, tok: Path | None, explicit: bool, source: Path) -> bool:
    """Whether `tokenizer` is written over tok_out. One found beside the source does not replace the user's
    file, which another model in the folder may use, unless --tokenizer says so; a file whose vocabulary
    size differs can never serve this model, so the export is refused rather than leaving a model that
    cannot run."""
    safeio.check_target(tok_out, "tokenizer")
    if not tok_out.exists():
        return True
    if tok is not None and tok_out.samefile(tok):
        return False
    existing = _readable_tokenizer(tok_out)
    if explicit:
        if existing is not None and existing.vocab_size != tokenizer.vocab_size:  # a model beside it may use it
            note(f"replacing {tok_out} ({existing.vocab_size} tokens) with this model's tokenizer "
                 f"({tokenizer.vocab_size}): a model in {tok_out.parent} that used it now needs -z")
        return True
    advice = _tokenizer_replacement(tok, source)
    if existing is not None and existing.vocab_size != tokenizer.vocab_size:
        raise vocab_mismatch(tok_out, existing.vocab_size, tokenizer.vocab_size,
                             f": {advice}, or export into another folder")
    if existing is None or not existing.same_as(tokenizer):
        running = f"-z {tok} when running" if tok is not None else "export into another folder"
        note(f"kept the existing {tok_out}, which differs from the model's tokenizer ({advice}, or "
             f"{running})")
    return False


def _tokenizer_replacement(tok: Path | None, source: Path) -> str:
    """How the model's tokenizer replaces the tokenizer.bin beside OUT: --tokenizer naming its file; a vocabulary
    inside the source (a GGUF's) is no file that --tokenizer could name, but an export writes it where it finds
    no tokenizer.bin."""
    if tok is not None:
        return f"pass --tokenizer {tok} to replace it"
    return f"remove it and export again to write the vocabulary inside {source} there"


def _readable_tokenizer(path: Path) -> Tokenizer | None:
    try:
        return Tokenizer.load(path)
    except BabyLlamaError:
        return None


def _hf_tokenizer(src: Source, tok: Path | None, explicit: bool) -> Path | bytes | None:
    """What a Hugging Face folder gets as its tokenizer.model: a sentencepiece .model as it is, else one written
    from the vocabulary that came with the model (a tokenizer.bin, a GGUF's own), else none. Without the
    protobuf package that writing needs, an explicit --tokenizer is an error and an implicit one a note."""
    from .interop.vocab import can_write_sentencepiece

    if tok is not None and tok.suffix == ".model":
        return tok
    vocab = _source_vocab(src, tok)
    if vocab is None:
        return None
    if not explicit and not can_write_sentencepiece():
        note("writing tokenizer.model from the model's vocabulary needs the protobuf package "
             "(pip install protobuf)")
        return None
    return vocab.to_sentencepiece()


def _check_folder_tokenizer(out: Path, vocab_size: int) -> None:
    """A Hugging Face export that carries no tokenizer leaves the folder's tokenizer.model (an earlier
    export's) in place: refused when its vocabulary size shows it belongs to another model. Refused, not
    removed: the folder is the user's."""
    held = out / SENTENCEPIECE_MODEL
    if not held.is_file():
        return
    from .interop.vocab import load_vocab

    n = len(load_vocab(held).tokens)
    if n != vocab_size:
        raise vocab_mismatch(held, n, vocab_size, " (a tokenizer of another model): pass --tokenizer TOK.model "
                             "to replace it, or choose an empty folder")


def _note_folder_tokenizer(out: Path) -> None:
    if (out / SENTENCEPIECE_MODEL).is_file():
        note(f"kept the existing {out / 'tokenizer.model'} (pass --tokenizer TOK.model to replace it)")
    else:
        note(f"{out} has no tokenizer.model (the source carries no sentencepiece model): pass --tokenizer "
             "TOK.model to add one, or -z TOKENIZER when running it")


def _gguf_vocab(src: Source, tok: Path | None) -> Vocab:
    """GGUF files carry their vocabulary: the source's (see `_source_vocab`), which must exist."""
    vocab = _source_vocab(src, tok)
    if tok is not None and tok.suffix == ".model":  # llama.cpp encodes a llama vocabulary's text as it is
        warn_normalization(open_sentencepiece(tok), tok, "a GGUF vocabulary", keeps_symbols=True)
    if vocab is None:
        # where the source's own tokenizer would have been found (loading.open_model)
        where = "tokenizer.model in its folder" if src.kind in ("hf", "meta") else f"{TOKENIZER_BIN} beside it"
        raise BabyLlamaError(f"no tokenizer found for {src.path}: a GGUF file carries the model's tokenizer: put "
                             f"{where} or pass --tokenizer TOK.model (or tokenizer.bin)")
    return vocab


def _source_vocab(src: Source, tok: Path | None) -> Vocab | None:
    """The vocabulary exported with a model: `tok` (--tokenizer, a file that came with the source, the tokenizer.bin
    beside a .bin), else the source's own (a GGUF's)."""
    from .interop.vocab import load_vocab

    if tok is not None:
        vocab = load_vocab(tok)
    elif src.vocab is not None:
        vocab = src.vocab
    else:
        return None
    _check_vocab(len(vocab.tokens), src.weights.args.vocab_size, tok)
    return vocab


def _check_vocab(n_tokens: int, vocab_size: int, tok: Path | None) -> None:
    if n_tokens != vocab_size:
        raise vocab_mismatch(f"tokenizer {tok or ''}", n_tokens, vocab_size, "; pass the model's own tokenizer")


def describe(weights: Weights) -> str:
    a = weights.args
    return (f"dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), vocab {a.vocab_size}, "
            f"seq_len {a.max_seq_len}, rope_theta {a.rope_theta:g}, norm_eps {a.norm_eps:g}, "
            f"{'tied' if a.shared_classifier else 'untied'} classifier, {a.param_count() / 1e6:.2f}M params")


def report(paths: list[Path], weights: Weights) -> None:
    """The model exported, a note on stderr; the files written on stdout, as every command that writes files
    prints them."""
    say(f"exported {describe(weights)}")
    for p in paths:
        print(f"wrote {p}")


def export_tokenizer(model: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A sentencepiece .model as a llama2.c tokenizer.bin (default: the same name with .bin), its folder
    created where missing."""
    safeio.check_regular(model, "sentencepiece model")
    if out:
        safeio.refuse_folder_name(out, "tokenizer output")
    out = Path(out) if out else Path(model).with_suffix(".bin")
    with safeio.new_folders_removed_on_error(out.parent):
        safeio.output_file(out, "tokenizer")
        if out.exists() and out.samefile(model):
            raise BabyLlamaError(f"{out} is the sentencepiece model itself: choose another output (-o)")
        Tokenizer.from_sentencepiece(model).save(out)
    return out
