"""TrainConfig: every knob of a training run (llama2.c train.py's names), from defaults, a config file
(TOML, JSON or llama2.c's Python `key = value` lines; flat keys) and `--key=value` overrides, in that order.
When resuming, the checkpoint's config replaces the defaults, so `--init_from=resume --max_iters=N` continues
the same run."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType

from .. import safeio
from ..config import FLOAT_TYPES, SEED_LIMIT, TORCH_FLOAT_NAMES, ModelArgs, checked_args
from ..errors import BabyLlamaError, warn


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data_dir: str = ""  # pretokenized shards (`babyllama data pretokenize`); "": data/tok{vocab_size}, as llama2.c
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
    eval_interval: int = 2000
    eval_iters: int = 100
    eval_only: bool = False
    always_save_checkpoint: bool = True  # false: an evaluation writes ckpt.pt only when the val loss is the best yet
    log_interval: int = 1
    seed: int = 1337
    # model: ModelArgs' defaults (dim 288, 6 layers, 6 heads, context 256: llama2.c's stories15M)
    vocab_size: int = 0  # 0: the pretokenized data's vocabulary
    dim: int = ModelArgs.dim
    n_layers: int = ModelArgs.n_layers
    n_heads: int = ModelArgs.n_heads
    n_kv_heads: int = 0  # 0: n_heads
    multiple_of: int = ModelArgs.multiple_of
    max_seq_len: int = ModelArgs.max_seq_len
    dropout: float = ModelArgs.dropout
    norm_eps: float = ModelArgs.norm_eps
    rope_theta: float = ModelArgs.rope_theta
    shared_classifier: bool = ModelArgs.shared_classifier
    # optimisation
    batch_size: int = 128  # micro-batch per device
    gradient_accumulation_steps: int = 4  # over all devices: DDP divides it by the world size
    learning_rate: float = 5e-4
    max_iters: int = 100000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    decay_lr: bool = True
    warmup_iters: int = 1000
    lr_decay_iters: int = 0  # 0: max_iters
    min_lr: float = 0.0
    # distillation (train/distill.py): a frozen teacher .bin with the data's vocabulary; "" trains on labels only
    teacher: str = ""
    kd_alpha: float = 0.5  # weight of the KL term; 1 - kd_alpha weighs the cross-entropy on the real tokens
    kd_temperature: float = 1.0
    # fine-tuning (`babyllama finetune`, train/finetune.py): start from a base model; LoRA when lora_rank > 0
    base: str = ""  # the base model: checkpoint, .bin (any version), GGUF, Hugging Face or Meta folder
    base_format: str = ""  # "" detects it from the content (loading.KINDS)
    tokenizer: str = ""  # the base's tokenizer, when it carries none and none lies beside it
    data: str = ""  # raw .txt/.jsonl/.json data, pretokenized into out_dir/data with the base's tokenizer
    skip_bad_lines: bool = False  # skip malformed lines (and over-long conversations) of `data`, with a count
    word_weight: int = 1  # loss weight of a requested word's first use in a reply (instruction data's words, topic)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16 (or bf16...)
    compile: bool = False  # torch.compile the model (recommended on GPU)
    fsdp: bool = False  # shard parameters/optimizer with FSDP under torchrun instead of replicating (DDP)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: known GPUs' bf16 peak, else MFU not shown

    def model_args(self) -> ModelArgs:
        return checked_args("training config", dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                            n_kv_heads=self.n_kv_heads or self.n_heads, vocab_size=self.vocab_size,
                            multiple_of=self.multiple_of, max_seq_len=self.max_seq_len, dropout=self.dropout,
                            norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                            shared_classifier=self.shared_classifier)

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}
# what `babyllama finetune` changes from the defaults above (a config file and --key=value go on top)
FINETUNE_DEFAULTS = {"max_seq_len": 0, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "max_iters": 500, "warmup_iters": 20, "min_lr": 1e-4, "weight_decay": 0.0, "eval_interval": 100,
                     "eval_iters": 20, "log_interval": 10}
# finetune's min_lr where only learning_rate is given: this share of it (llama2.c's train.py: min_lr "should be
# ~= learning_rate/10 per Chinchilla"; FINETUNE_DEFAULTS' 1e-4 is that share of its 1e-3), so that a smaller rate,
# full fine-tuning's usual 2e-5 say, decays to a tenth of itself instead of being refused for a min_lr above it
FINETUNE_MIN_LR_SHARE = 0.1
# the model's shape: a fine-tune takes its base's
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "vocab_size", "norm_eps", "rope_theta",
              "shared_classifier")
MODEL_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "vocab_size", "norm_eps",
              "rope_theta", "shared_classifier")


def parse_value(key: str, text: str) -> bool | int | float | str:
    """A command-line string as the type of config field `key`."""
    kind = type(getattr(TrainConfig, key))
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise BabyLlamaError(f"{key} must be true or false, got {text!r}")
    try:
        if kind is int and "e" in text.lower():  # 2e3, as nanoGPT's configurator reads it: whole numbers only
            value = float(text)
            if not value.is_integer():  # a fraction, or inf/nan (1e400)
                raise ValueError(text)
            return int(value)
        return kind(text)
    except ValueError:
        raise BabyLlamaError(f"{key} must be {kind.__name__}, got {text!r}") from None


def _toml_reader() -> ModuleType:
    """Python's tomllib, or on Python 3.10 tomli, its original (the train extra installs it there)."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise BabyLlamaError("TOML config files need Python 3.11+ or tomli (pip install tomli); "
                                 "or use a .json config") from None
    return tomllib


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = safeio.read_text(path, "config file", safeio.MAX_JSON_BYTES)
    if path.suffix.lower() == ".json":
        data = safeio.parse_json(text, str(path))
    elif path.suffix.lower() == ".py":
        data = read_python_config(text, path)
    else:
        tomllib = _toml_reader()
        try:
            data = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as e:
            raise BabyLlamaError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(data, dict):
        raise BabyLlamaError(f"{path}: a config file holds key = value pairs")
    return data


def read_python_config(text: str, path: Path) -> dict:
    """A llama2.c/nanoGPT config file (`key = value` Python lines), read without running it: only assignments
    of literals (numbers, strings, booleans), each checked like any other setting."""
    import ast

    try:
        tree = ast.parse(text, str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise BabyLlamaError(f"{path}: invalid Python: {e}") from None
    data = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # a docstring
            continue
        try:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                raise ValueError
            data[node.targets[0].id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise BabyLlamaError(f"{path}, line {node.lineno}: a Python config file is read, not run: it may only "
                                 "assign a literal to a key (key = 123, key = 'text', key = True)") from None
    return data


WANDB_NOTE = ("babyllama does not log to Weights & Biases: every logged step and evaluation goes to "
              "out_dir/metrics.jsonl, plotted in out_dir/loss.png")
# llama2.c train.py's keys that babyllama has no setting for, and what to do instead
LLAMA2C_ONLY = {
    "wandb_log": WANDB_NOTE,
    "wandb_project": WANDB_NOTE,
    "wandb_run_name": WANDB_NOTE,
    "vocab_source": "Llama 2's vocabulary is the data's here: pretokenize with `babyllama data pretokenize "
                    "--tokenizer tokenizer.model` and give --data_dir, the shard folder",
}


def check_llama2c_only(key: str, value: object, source: str) -> None:
    """A llama2.c key babyllama has no setting for: one line saying what to do instead. Values that ask for what
    babyllama does anyway pass: wandb_log=false, and vocab_source=custom (data_dir defaults to data/tokN from
    vocab_size, as train.py finds it)."""
    if key == "wandb_log" and (value is False or str(value).strip().lower() in ("0", "false", "no", "off")):
        return
    if key == "vocab_source" and value == "custom":
        return
    raise BabyLlamaError(f"{source}: {key} is a setting of llama2.c's train.py, not babyllama's: "
                         f"{LLAMA2C_ONLY[key]}")


def apply(cfg: dict, updates: dict, source: str) -> None:
    for key, value in updates.items():
        if key in LLAMA2C_ONLY:
            check_llama2c_only(key, value, source)
            continue
        if key not in FIELDS:
            raise BabyLlamaError(f"{source}: unknown config key {key!r}")
        kind = type(getattr(TrainConfig, key))
        if isinstance(value, str) and kind is not str:
            try:
                value = parse_value(key, value)
            except BabyLlamaError as e:  # a config file's `dim = "x"` names the file, as its other errors do
                raise BabyLlamaError(f"{source}: {e}") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BabyLlamaError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
        cfg[key] = value


def build_config(config_file: str | None = None, overrides: dict | None = None,
                 resume_config: dict | None = None, defaults: dict | None = None, checked: bool = True) -> TrainConfig:
    """Defaults (or a resumed run's config), then the file, then the overrides. With FINETUNE_DEFAULTS, a
    learning_rate given without a min_lr brings min_lr down (or up) to FINETUNE_MIN_LR_SHARE of it."""
    cfg = TrainConfig().to_dict()
    cfg.update(defaults or {})
    if resume_config:
        apply(cfg, {k: v for k, v in resume_config.items() if k in FIELDS}, "the checkpoint's config")
    given = dict(read_config_file(config_file)) if config_file else {}
    if config_file:
        apply(cfg, given, str(config_file))
    apply(cfg, overrides or {}, "command line")
    given.update(overrides or {})
    if resume_config and resume_config.get("teacher") and not cfg["teacher"]:
        # a run resumed without its teacher (--teacher=) goes on with plain cross-entropy: the checkpoint's
        # distillation settings go with the teacher, unless given again (then refused as without a teacher)
        cfg.update({key: FIELDS[key].default for key in ("kd_alpha", "kd_temperature") if key not in given})
    if defaults is FINETUNE_DEFAULTS and not resume_config and "learning_rate" in given and "min_lr" not in given:
        cfg["min_lr"] = cfg["learning_rate"] * FINETUNE_MIN_LR_SHARE
    if isinstance(cfg["dtype"], str):  # f32, bf16...: export's names for the same types
        cfg["dtype"] = TORCH_FLOAT_NAMES.get(FLOAT_TYPES.get(cfg["dtype"], ""), cfg["dtype"])
    out = TrainConfig(**cfg)
    if checked:
        check(out)
    return out


def resolve_config(config_file: str | None = None, overrides: dict | None = None,
                   defaults: dict | None = None) -> TrainConfig:
    """build_config, and for init_from=resume the checkpoint's config under the file and overrides."""
    cfg = build_config(config_file, overrides, defaults=defaults, checked=False)
    if cfg.init_from == "resume":
        from . import checkpoint

        path = Path(cfg.out_dir) / checkpoint.CKPT_NAME
        saved = checkpoint.load(path)
        checkpoint.check_resumable(saved, str(path))
        check_resumed_command(cfg.out_dir, saved["config"], defaults is FINETUNE_DEFAULTS)
        resumed = build_config(config_file, overrides, resume_config=saved["config"], checked=False)
        if defaults is FINETUNE_DEFAULTS and not resumed.base:  # --base= given empty over the checkpoint's
            raise BabyLlamaError("finetune needs a base model: leave --base out to resume with the run's own")
        if resumed.base:  # a LoRA run resumed as full fine-tuning keeps the run's lora_* keys: say that first
            check_resumed_mode(resumed, saved)
        check(resumed)
        return resumed
    if not (cfg.data_dir or cfg.base) and cfg.vocab_size:
        # llama2.c's train.py finds its data from vocab_size: data/tokN, which `data pretokenize --vocab-size N`
        # writes too; the folder is recorded in the checkpoint's config, for a resume to read
        cfg.data_dir = f"data/tok{cfg.vocab_size}"
    check(cfg)
    return cfg


def check_resumed_command(out_dir: str, saved: dict, finetune: bool) -> None:
    """A run is resumed by the command that started it: `train` for a run from scratch, `finetune` for one from a
    base model (which the checkpoint's config names), each told in the words of what the folder holds (the other
    command's settings would otherwise be refused as if given on this command line)."""
    if isinstance(saved, dict) and bool(saved.get("base")) != finetune:
        what, command = ((f"a fine-tuning run (base {saved['base']})", "finetune") if saved.get("base") else
                         ("a run trained from random weights", "train"))
        raise BabyLlamaError(f"{out_dir} holds {what}: resume it with babyllama {command} --init_from=resume "
                             f"--out_dir={out_dir}")


def check_resumed_mode(cfg: TrainConfig, ckpt: dict) -> None:
    """A resumed run trains what its checkpoint holds: every weight, or LoRA factors of the same rank, targets
    and alpha (alpha/r scales what the trained factors add: another alpha is another model, not the run's)."""
    saved = ckpt.get("lora")
    if not saved and cfg.lora_rank:
        raise BabyLlamaError(f"cannot resume: {cfg.out_dir} holds a full fine-tune, and this run asks for LoRA "
                             f"rank {cfg.lora_rank} (resume without --lora_rank, or start a new run)")
    if saved and not cfg.lora_rank:
        raise BabyLlamaError(f"cannot resume: {cfg.out_dir} holds a LoRA run of rank {saved.get('rank')}, and this "
                             "run asks for full fine-tuning (lora_rank 0): resume without --lora_rank, or start a "
                             "new run from a model merged with the adapter")
    if not saved:
        return
    from ..adapter import parse_targets

    ours = (cfg.lora_rank, parse_targets(cfg.lora_targets), cfg.lora_alpha)
    theirs = (saved.get("rank"), saved.get("targets"), saved.get("alpha"))
    if ours != theirs:
        raise BabyLlamaError(f"cannot resume: the checkpoint's LoRA rank {theirs[0]}, targets "
                             f"{','.join(theirs[1] or [])} and alpha {theirs[2]} differ from this run's "
                             f"({cfg.lora_rank}, {cfg.lora_targets}, {cfg.lora_alpha})")


def check(cfg: TrainConfig) -> None:
    if cfg.init_from not in ("scratch", "resume"):
        raise BabyLlamaError(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise BabyLlamaError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, key) <= 0:
            raise BabyLlamaError(f"{key} must be positive, got {getattr(cfg, key)}")
        # counts of things held or drawn at once: beyond int32 no machine has the memory (and past int64
        # PyTorch cannot draw them)
        if key in ("batch_size", "gradient_accumulation_steps", "eval_iters") and getattr(cfg, key) >= 2**31:
            raise BabyLlamaError(f"{key} must be below 2**31, got {getattr(cfg, key)}")
    check_finetune(cfg)
    if cfg.base and cfg.max_seq_len < 0:  # fine-tuning: 0 is the base model's context
        raise BabyLlamaError(f"max_seq_len must be >= 0 (0: the base model's), got {cfg.max_seq_len}")
    if not cfg.base and cfg.max_seq_len <= 0:
        raise BabyLlamaError(f"max_seq_len must be positive, got {cfg.max_seq_len}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise BabyLlamaError(f"seed must be in [0, 2**63), got {cfg.seed}")
    if not cfg.out_dir.strip():  # it would write the run's files into the current folder
        raise BabyLlamaError("out_dir must name a folder, got ''")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0:
        raise BabyLlamaError("max_iters and warmup_iters must be >= 0")
    for key in ("lr_decay_iters", "vocab_size"):  # 0: max_iters, the data's vocabulary
        if getattr(cfg, key) < 0:
            raise BabyLlamaError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.kd_alpha <= 1.0:
        raise BabyLlamaError(f"kd_alpha must be in [0, 1], got {cfg.kd_alpha}")
    if not 0.0 < cfg.kd_temperature < math.inf:  # also refuses NaN
        raise BabyLlamaError(f"kd_temperature must be positive and finite, got {cfg.kd_temperature}")
    if not cfg.teacher:  # without a teacher nothing reads them: a setting given would be silently ignored
        for key in ("kd_alpha", "kd_temperature"):
            if getattr(cfg, key) != FIELDS[key].default:
                raise BabyLlamaError(f"{key} needs a teacher to distill from (--teacher=MODEL.bin)")
    elif cfg.word_weight != FIELDS["word_weight"].default:  # nothing would weigh the words: say so, as above
        raise BabyLlamaError(f"word_weight {cfg.word_weight} weighs the requested words' cross-entropy, and "
                             "distillation (--teacher) averages over the targets unweighted: give one of them")
    if not 0.0 <= cfg.peak_flops < math.inf:
        raise BabyLlamaError(f"peak_flops must be a finite number >= 0 (0: known GPUs'), got {cfg.peak_flops}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise BabyLlamaError(f"dropout must be in [0, 1), got {cfg.dropout}")
    check_optimizer(cfg)
    check_training_device(cfg.device)


def check_optimizer(cfg: TrainConfig) -> None:
    """AdamW's settings and the schedule's, before torch refuses them with a traceback mid-setup."""
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(cfg, key)
        if not 0.0 <= value < math.inf:  # also refuses NaN
            raise BabyLlamaError(f"{key} must be a finite number >= 0, got {value}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise BabyLlamaError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    check_schedule(cfg)


def check_schedule(cfg: TrainConfig) -> None:
    """A schedule that cannot do what it says (train/loop.py's lr_at): a warm-up that lr_decay_iters cuts off
    (the rate would fall from partway up straight to min_lr, never decaying), or a decay that climbs. A warm-up
    longer than a run that decays at its end (lr_decay_iters 0) is a short run, and allowed, with a warning: its
    learning rate never reaches learning_rate."""
    if not cfg.decay_lr:
        return
    if not cfg.lr_decay_iters and 0 < cfg.max_iters < cfg.warmup_iters:
        warn(f"warmup_iters {cfg.warmup_iters} is longer than max_iters {cfg.max_iters}: the "
             f"learning rate rises to {cfg.learning_rate * (cfg.max_iters - 1) / cfg.warmup_iters:.3g} at most, not "
             f"learning_rate {cfg.learning_rate:g} (warm up for fewer iterations to reach it)")
    if cfg.lr_decay_iters and cfg.warmup_iters > cfg.lr_decay_iters:
        raise BabyLlamaError(f"warmup_iters {cfg.warmup_iters} is beyond lr_decay_iters {cfg.lr_decay_iters}: the "
                             "learning rate would drop to min_lr before warming up (warm up for fewer iterations)")
    if cfg.min_lr > cfg.learning_rate:
        raise BabyLlamaError(f"min_lr {cfg.min_lr:g} is above learning_rate {cfg.learning_rate:g}: the decay would "
                             "raise the learning rate (give a min_lr at most learning_rate, or decay_lr=false)")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_training_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise BabyLlamaError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N or mps)")


FINETUNE_KEYS = ("base_format", "tokenizer", "data", "skip_bad_lines", "word_weight", "lora_rank", "lora_alpha",
                 "lora_dropout", "lora_targets")


MAX_WORD_WEIGHT = 255  # a loss-mask byte holds a token's weight


def check_word_weight(value: int, name: str) -> None:
    """Refuse a word weight (`name`: the setting or flag that gave it) a loss-mask byte cannot hold."""
    if not 1 <= value <= MAX_WORD_WEIGHT:
        raise BabyLlamaError(f"{name} must be in [1, {MAX_WORD_WEIGHT}], got {value}")


def check_finetune(cfg: TrainConfig) -> None:
    if not cfg.base:  # without a base nothing would read them: a setting given would be silently ignored
        for key in FINETUNE_KEYS:
            if getattr(cfg, key) != FIELDS[key].default:
                raise BabyLlamaError(f"{key} needs a base model to fine-tune (babyllama finetune --base=MODEL)")
        return
    if cfg.lora_rank < 0:
        raise BabyLlamaError(f"lora_rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    check_word_weight(cfg.word_weight, "word_weight")
    if cfg.lora_rank:
        if not 0 < cfg.lora_alpha < math.inf:  # an infinite scale makes every loss NaN, and no reader takes it
            raise BabyLlamaError(f"lora_alpha must be positive and finite, got {cfg.lora_alpha}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise BabyLlamaError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
        from ..adapter import parse_targets

        parse_targets(cfg.lora_targets)
        if cfg.fsdp:
            raise BabyLlamaError("LoRA runs replicate the model (DDP): fsdp=true is for full training")
    else:  # full fine-tuning reads none of them: a forgotten lora_rank would train every weight unnoticed
        for key in ("lora_alpha", "lora_dropout", "lora_targets"):
            if getattr(cfg, key) != FIELDS[key].default:
                raise BabyLlamaError(f"{key} is a LoRA setting: give lora_rank too (lora_rank 0 is full fine-tuning)")
    if cfg.data and cfg.data_dir:
        raise BabyLlamaError(f"--data={cfg.data} and --data_dir={cfg.data_dir} both name the data: give one (--data "
                             "raw, pretokenized into out_dir; --data_dir pretokenized already)")
    if not (cfg.data or cfg.data_dir):
        raise BabyLlamaError("fine-tuning needs its data: --data=FILE (raw .txt/.jsonl/.json) or --data_dir=DIR "
                             "(pretokenized with the base's tokenizer), one of them")
