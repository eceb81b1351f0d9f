"""ModelArgs: the one description of a Llama 2 model's shape, shared by the .bin formats, the NumPy engine,
the PyTorch model, the exporters and the CLI; and the few defaults every layer above shares (run.c's -n, the
sequences a batch generates at once, a training run's checkpoint name, the choices and sampling defaults the CLI
offers before NumPy loads); and ServeConfig, the server's settings, whose defaults `babyllama serve`'s flags take
(here, where the CLI reads them without the serve extra)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TypedDict

from .errors import BabyLlamaError

DEFAULT_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_STEPS = 256  # run.c's -n: positions a generation runs, the prompt included
DEFAULT_PARALLEL = 16  # sequences a batch of prompts generates at once (each holds a KV cache)
# seeds the Python API, the server and training take are below it: run.c's generator and torch's keep 64 bits,
# so a larger seed would sample another's text (2**64 - 1 seed 0's, 2**64 + 7 seed 7's), with room left for a
# choice index or a rank added to it
SEED_LIMIT = 2**63
# the vocabularies `data train-vocab` trains (3 control + 256 byte tokens + merges; uint16 token ids), the sizes
# pretokenize --vocab-size looks up
TRAINED_VOCAB_SIZES = (260, 65536)
LLAMA2_VOCAB_SIZE = 32000  # Meta's Llama 2 sentencepiece vocabulary (llama2.c's tokenizer.bin, vocab_source "llama2")
CKPT_NAME = "ckpt.pt"  # a training run's checkpoint in its out_dir
# a model's tokenizer beside it (run.c's -z default), which pretokenize puts beside its shards and training beside
# its checkpoint
TOKENIZER_BIN = "tokenizer.bin"
SENTENCEPIECE_MODEL = "tokenizer.model"  # a Hugging Face or Meta folder's tokenizer, in it (Meta: or beside it)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5's file for a Hugging Face tokenizer's chat template
# what the CLI offers, here for it to name before NumPy loads (it sets thread variables first)
KV_CACHE_TYPES = ("auto", "f32", "f16", "q8_0")  # the NumPy engine's KV cache row types (engine.kv_cache_dtype)
QUANTIZE_KINDS = ("q8_0", "q4_0", "f16", "bf16")  # `--quantize`: the weights' type on load (16-bit: rounded)
# --dtype's float types in either family of names, llama.cpp's and llama2.c export.py's (f32, fp16, bf16) or
# PyTorch's (float32, float16, bfloat16), each command naming them in its own (export: f32; train: float32)
FLOAT_TYPES = {"f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16", "fp16": "f16", "float16": "f16",
               "bf16": "bf16", "bfloat16": "bf16"}
TORCH_FLOAT_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class ControlDefaults(TypedDict):
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float


# llama.cpp's and OpenAI's sampling controls (sampler.Controls), all off: sampling is then run.c's
CONTROL_DEFAULTS: ControlDefaults = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "repeat_last_n": 64,
                                     "presence_penalty": 0.0, "frequency_penalty": 0.0}


def default_steps(steps: int | None, max_new_tokens: int | None) -> int:
    """`steps` as given; None: run.c's 256, or 0 (the whole context) when `max_new_tokens` bounds the output
    (the rule of `run -n`, and of the Python API's steps)."""
    if steps is not None:
        return steps
    return 0 if max_new_tokens is not None else DEFAULT_STEPS

# The largest value of each shape field babyllama accepts from any file: far beyond every released Llama
# (405B: dim 16384, 126 layers, hidden 53248, 128 heads; vocabularies up to 256k; contexts up to 1M), small
# enough that nothing sized by them before the weights are checked (lists per layer, header arithmetic,
# the int32 fields of the .bin header) can run away.
LIMITS = {"dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "vocab_size": 1 << 21,
          "hidden_dim": 1 << 20, "max_seq_len": 1 << 24}
# and of the two float fields (released models: eps 1e-6..1e-5, theta 1e4..1e6); beyond these a model computes
# nothing meaningful (an eps of 1e300 zeroes every activation)
FLOAT_LIMITS = {"norm_eps": 1.0, "rope_theta": 1e12}


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0 (or None) means n_heads: plain multi-head attention
    vocab_size: int = LLAMA2_VOCAB_SIZE
    hidden_dim: int = 0  # 0 (or None): derived from dim and multiple_of as in Meta's code
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = DEFAULT_NORM_EPS
    rope_theta: float = DEFAULT_ROPE_THETA
    max_seq_len: int = 256
    dropout: float = 0.0
    shared_classifier: bool = True

    def __post_init__(self) -> None:
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        if not self.hidden_dim:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """Each layer's matrices (rows = outputs, cols = inputs), in llama2.c's file order."""
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        return {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d), "w1": (h, d), "w2": (d, h), "w3": (h, d)}

    def validate(self) -> None:
        """Raise ValueError when the shape is not a valid Llama model."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value > limit:
                raise ValueError(f"{name} {value} is beyond what babyllama accepts ({limit})")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size {self.vocab_size} cannot hold the <unk>, <s> and </s> tokens")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary embeddings")
        if not isinstance(self.shared_classifier, bool):  # a string such as "no" would read as true
            raise ValueError(f"shared_classifier must be true or false, got {self.shared_classifier!r}")
        for name, float_limit in FLOAT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            if value > float_limit:
                raise ValueError(f"{name} {value:g} is beyond what babyllama accepts ({float_limit:g})")

    def param_count(self) -> int:
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        per_layer = 2 * d + d * d * 2 + 2 * d * kv + 3 * d * h
        classifier = 0 if self.shared_classifier else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + classifier

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def checked_args(source: str, **values) -> ModelArgs:
    """ModelArgs from untrusted values (a file's header or config), validated: a wrong type, a zero divisor or
    a value out of range is one BabyLlamaError naming `source`, never an exception from the arithmetic."""
    try:
        args = ModelArgs(**values)
        args.validate()
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise BabyLlamaError(f"{source}: invalid model shape: {e}") from None
    return args


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of multiple_of."""
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    if ffn_dim_multiplier is not None and (isinstance(ffn_dim_multiplier, bool) or
                                           not isinstance(ffn_dim_multiplier, (int, float)) or
                                           not 0 < ffn_dim_multiplier < math.inf):
        raise ValueError(f"ffn_dim_multiplier must be a positive number, got {ffn_dim_multiplier!r}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ServeConfig:
    """`babyllama serve`'s settings (serve.create_app takes them; the CLI's flags default to these values)."""

    model_name: str = "babyllama"
    slots: int = 8
    queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0  # per request, queueing included
    max_tokens_per_step: int = 128
    prefix_min: int = 16  # 0: no prefix reuse
    chat_template: str | None = None  # chat_template.TEMPLATES' name; None: the model's (Model.chat_template)
    cors_origins: tuple[str, ...] = ("*",)
    keepalive_s: float = 15.0  # a stream still waiting for its first token sends an SSE comment this often
    header_timeout_s: float = 30.0  # a connection whose request line and headers take longer is closed
    max_connections: int = 512  # open connections past this many have their request answered 503 and are closed
