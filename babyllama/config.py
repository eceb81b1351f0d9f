"""ModelArgs: the one description of a Llama 2 model's shape, shared by the .bin formats, the NumPy engine,
the PyTorch model, the exporters and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DEFAULT_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0 (or None) means n_heads: plain multi-head attention
    vocab_size: int = 32000
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

    def validate(self) -> None:
        """Raise ValueError when the shape is not a valid Llama model."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary embeddings")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ValueError("norm_eps and rope_theta must be positive")

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


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
