"""Fine-tuning (`babyllama finetune`): the training loop started from a base model instead of random weights.

The base is any model babyllama reads (loading.open_model: a training checkpoint, a .bin of any version,
dequantized, a GGUF file, a Hugging Face or Meta folder), fp32. Its shape replaces the config's model keys (so
the checkpoint records them) and its context stays the model's (max_seq_len sizes the training windows), and
its tokenizer encodes `data` (raw
text or chat .jsonl, pretokenized into out_dir/data). With lora_rank > 0 the base is frozen and LoRA factors
are trained (lora.py); the adapter's config names the base by its identity (adapter.base_identity), which a
resumed run checks too.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from .. import safeio
from ..adapter import base_identity, parse_targets
from ..config import CKPT_NAME, TOKENIZER_BIN, ModelArgs, llama_hidden_dim
from ..errors import BabyLlamaError, Terminated, say, warn
from ..instruct import CHAT
from ..loading import Source, open_model, tokenizer_for
from ..model import Transformer
from ..tokenizer import Tokenizer, shown_symbols
from .config import FIELDS, SHAPE_KEYS, TrainConfig, check_resumed_mode
from .data import check_validation_split, pretokenize
from .lora import apply_lora, check_rank


def open_base(cfg: TrainConfig, given: Collection[str] | None = None) -> Source:
    """The base model, fp32, and cfg's shape keys set to it. Training windows are max_seq_len tokens (0: the
    base's context; never longer: the base was not trained beyond it), but the model keeps the base's context,
    as a merged LoRA adapter does: shorter windows make training cheaper, not the model's context shorter."""
    check_base_outside_run(cfg)
    if cfg.init_from == "resume" and not Path(cfg.base).exists():  # relative to where the run started
        raise BabyLlamaError(f"base model not found: {cfg.base} (the run's, as given when it started; from another "
                             "folder, or with the base moved, pass --base)")
    # the file's own weights (a GGUF's K-quants dequantized, not converted for the native kernels), which every
    # engine and export merge an adapter into
    source = open_model(cfg.base, cfg.base_format or None, convert_other_types=False)
    source.weights = source.weights.to_fp32()
    args = source.weights.args
    if cfg.max_seq_len > args.max_seq_len:
        raise BabyLlamaError(f"max_seq_len {cfg.max_seq_len} is more than the base model's context "
                             f"({args.max_seq_len}): fine-tune within it (0: the base's)")
    if cfg.lora_rank:
        check_rank(cfg.lora_rank, cfg.lora_targets, args)  # before the data is prepared
    check_shape_keys(cfg, args, given)
    for key in SHAPE_KEYS:
        setattr(cfg, key, getattr(args, key))
    cfg.max_seq_len = cfg.max_seq_len or args.max_seq_len
    return source


def check_base_outside_run(cfg: TrainConfig) -> None:
    """A base that is out_dir itself (its checkpoint, or a model folder) would be replaced, or turned into a
    checkpoint folder, by the run's own ckpt.pt."""
    try:
        base, out = Path(cfg.base).resolve(), Path(cfg.out_dir).resolve()
    except (OSError, RuntimeError):  # a loop of symbolic links (RuntimeError before Python 3.13): said on opening
        return
    if base in (out, out / CKPT_NAME):
        raise BabyLlamaError(f"the base model {cfg.base} would be replaced: this run writes its {CKPT_NAME} into "
                             f"out_dir {cfg.out_dir}; fine-tune into another out_dir")


def check_shape_keys(cfg: TrainConfig, args: ModelArgs, given: Collection[str] | None = None) -> None:
    """The base's shape replaces the config's: a shape key given (`given`: the keys of the run's config file and
    command line; None: those whose value is not the default) with another value than the base's would be
    silently dropped."""
    def set_here(key: str) -> bool:
        return key in given if given is not None else getattr(cfg, key) != FIELDS[key].default

    other = [f"{key} {getattr(cfg, key)} ({_base_value(key, args)})" for key in SHAPE_KEYS
             if set_here(key) and not _same_shape(key, getattr(cfg, key), args)]
    if other:
        raise BabyLlamaError(f"a fine-tune keeps its base model's shape: {', '.join(other)}; leave "
                             f"{' and '.join(o.split()[0] for o in other)} out")


def _same_shape(key: str, value: object, args: ModelArgs) -> bool:
    """Whether shape key `key` set to `value` makes the base's model: n_kv_heads 0 means as many as the heads,
    and multiple_of counts through the hidden width it rounds to (a .bin does not record it)."""
    if key == "n_kv_heads" and value == 0:
        return args.n_kv_heads == args.n_heads
    if key == "multiple_of":
        try:
            return isinstance(value, int) and llama_hidden_dim(args.dim, value) == args.hidden_dim
        except ValueError:
            return False
    return value == getattr(args, key)


def _base_value(key: str, args: ModelArgs) -> str:
    if key == "multiple_of":
        return f"the base's hidden width {args.hidden_dim} is not dim {args.dim}'s rounded to it"
    return f"the base's: {getattr(args, key)}"


def prepare_data(cfg: TrainConfig, base: Source | None, data_dir: Path) -> None:
    """Pretokenize `cfg.data` into `data_dir` with the base's tokenizer."""
    if base is None:
        raise BabyLlamaError(f"{data_dir}: the pretokenized data of this run is missing")
    tokenizer = data_dir / TOKENIZER_BIN
    made = not data_dir.exists()
    with safeio.new_folders_removed_on_error(data_dir):
        safeio.output_dir(data_dir, "data folder")
        _save_base_tokenizer(tokenizer_for(base, cfg.tokenizer or None), tokenizer)
        try:
            meta = pretokenize(cfg.data, tokenizer, data_dir, skip_bad_lines=cfg.skip_bad_lines,
                               max_tokens=cfg.max_seq_len + 1, word_weight=cfg.word_weight,
                               exclude=cfg.out_dir,  # the run's own files, when it runs inside its data
                               say_unfinished=not made)  # a folder it made goes again (below)
            if meta.get("kind") == CHAT:  # refused now, not once the shards it wrote are read
                check_validation_split(data_dir, meta["conversations"])
        except BaseException as e:  # refused data: no shards or tokenizer.bin left to pass for this run's
            if made:
                shutil.rmtree(data_dir, ignore_errors=True)
                if isinstance(e, (KeyboardInterrupt, Terminated)):  # (pretokenize says so of a folder it keeps)
                    say(f"interrupted while pretokenizing {cfg.data}: nothing of it is kept")
            else:
                tokenizer.unlink(missing_ok=True)
            raise
    kind = f"{meta['conversations']:,} conversations" if meta.get("kind") == "chat" else "text"
    print(f"data: {cfg.data} -> {data_dir} ({kind}, {meta['tokens']:,} tokens)", flush=True)


def _save_base_tokenizer(tok: Tokenizer, path: Path) -> None:
    """The base's tokenizer as the shards' tokenizer.bin, which the data is encoded with and the fine-tuned model
    runs with; user-defined symbols, which the base's keeps whole and a tokenizer.bin cannot mark, are spelled
    out there: said in one line."""
    if tok.symbols:
        warn(f"the base's tokenizer keeps user-defined symbols ({shown_symbols(list(tok.symbols))}) whole, which "
             "a tokenizer.bin cannot: --data is encoded with them spelled out, as the fine-tuned model's "
             "tokenizer.bin encodes them (to keep them, pretokenize with the base's tokenizer.model, pass "
             "--data_dir, and run the result with -z TOKENIZER.model)")
    tok.save(path)


def check_data_word_weight(cfg: TrainConfig, meta: dict, data_dir: Path) -> None:
    """The mask shards carry the requested words' loss weight: a run must ask for the weight they were made
    with, or it would train with another than it records."""
    made = int(meta.get("word_weight", 1))
    if meta.get("kind") != CHAT and cfg.word_weight != 1:  # nothing would read it
        raise BabyLlamaError(f"word_weight weighs the requested words in chat replies: {data_dir} holds plain text")
    if meta.get("kind") == CHAT and made != cfg.word_weight:
        if cfg.init_from == "resume":  # a resumed run keeps its data, whatever --data says
            raise BabyLlamaError(f"a resumed run keeps its data, pretokenized with word_weight {made}: leave "
                                 f"--word_weight out (this run asks for {cfg.word_weight})")
        raise BabyLlamaError(f"{data_dir} was pretokenized with word_weight {made}, this run asks for "
                             f"{cfg.word_weight}: pass --word_weight={made} to train on it as it is, or pretokenize "
                             f"it again with --word-weight {cfg.word_weight} (or pass --data)")


def check_vocab(cfg: TrainConfig, meta: dict, data_dir: Path, base: Source | None = None) -> None:
    """Shards must be encoded with the base's tokenizer: the same size, and with `base`, the same pieces and
    scores as its tokenizer (when the shards' folder holds theirs)."""
    vocab = int(meta.get("vocab_size") or 0)
    if vocab and vocab != cfg.vocab_size:
        raise BabyLlamaError(f"{data_dir} was tokenized with a {vocab}-token vocabulary, the base model has "
                             f"{cfg.vocab_size}: pretokenize with the base's tokenizer (or pass --data)")
    shards_tokenizer = data_dir / TOKENIZER_BIN
    if base is None or not shards_tokenizer.is_file():
        return
    known = _known_tokenizer(cfg, base)
    if known is not None and not Tokenizer.load(shards_tokenizer).same_as(known):
        raise BabyLlamaError(f"{data_dir} was tokenized with another tokenizer than the base model's "
                             f"({shards_tokenizer} differs): pretokenize with the base's tokenizer (or pass --data)")


def _known_tokenizer(cfg: TrainConfig, base: Source) -> Tokenizer | None:
    """The base's tokenizer (--tokenizer, else its own or one beside it), or None for a base without one:
    then the shards' tokenizer is the only one there is."""
    if cfg.tokenizer:
        return tokenizer_for(base, cfg.tokenizer)
    try:
        return tokenizer_for(base)
    except BabyLlamaError:
        return None


def make_model(cfg: TrainConfig, base: Source | None, ckpt: dict | None) -> tuple[Transformer, dict | None]:
    """The model to train and, for LoRA, the adapter's config (rank, alpha, dropout, targets, base identity).
    `base` is None when a full fine-tune resumes: its checkpoint holds every weight."""
    if ckpt is not None:
        check_resumed_mode(cfg, ckpt)
    if base is None:
        assert ckpt is not None  # no base only when resuming a full fine-tune
        args = ModelArgs.from_dict(ckpt["model_args"])
        args.dropout = cfg.dropout
        return Transformer(args), None
    model = Transformer.from_weights(base.weights, dropout=cfg.dropout)
    if not cfg.lora_rank:
        return model, None
    identity = base_identity(base.weights)
    if ckpt is not None and ckpt["lora"].get("base") != identity:
        raise BabyLlamaError(f"cannot resume: {cfg.base} is not the base model this LoRA run started from")
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return model, {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                   "targets": parse_targets(cfg.lora_targets), "base": identity}
