"""Typed, bounded access to untrusted key-value data (a config.json, params.json, meta.json, GGUF metadata).

`json.loads` hands back whatever the file holds: `"tie_word_embeddings": "false"` is a string (and
`bool("false")` is True), a layer count may be 10**7, a list or null. `Fields` checks the type of every
value read and its range before anyone sizes anything by it; every failure is one `BabyLlamaError`
naming the file and the key.
"""

from __future__ import annotations

import builtins
import math
from numbers import Integral, Real
from typing import Any

from .errors import BabyLlamaError

REQUIRED = object()


def is_int(value: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool; a float with an integral value counts (JSON writers
    sometimes print 4096 as 4096.0)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if isinstance(value, Integral):
        return True
    return isinstance(value, float) and value.is_integer()


def is_integer(value: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool and not an integral float: a count an argument gives."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


class Fields:
    """`Fields(data, "config.json").int("num_hidden_layers", hi=1024)` and so on. A key whose value is
    null counts as absent."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise BabyLlamaError(f"{source}: expected an object of key-value pairs, got {type(data).__name__}")
        self.data, self.source, self.prefix = data, source, prefix

    def has(self, key: str) -> bool:
        return self.data.get(self.prefix + key) is not None

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value): the value to check, or (False, default) for an absent optional key."""
        value = self.data.get(self.prefix + key)
        if value is None:
            if default is REQUIRED:
                raise BabyLlamaError(f"{self.source}: field {self.prefix + key} is missing")
            return False, default
        return True, value

    def _bad(self, key: str, want: str, value: Any) -> BabyLlamaError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return BabyLlamaError(f"{self.source}: field {self.prefix + key} must be {want}, got {shown}")

    def int(self, key: str, default: Any = REQUIRED, lo: int = 1, hi: int | None = None) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not is_int(value):
            raise self._bad(key, "an integer", value)
        value = int(value)
        if value < lo or (hi is not None and value > hi):
            raise self._bad(key, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", value)
        return value

    def float(self, key: str, default: Any = REQUIRED, positive: bool = True) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not is_number(value) or not math.isfinite(value) or (positive and value <= 0):
            raise self._bad(key, "a positive finite number" if positive else "a finite number", value)
        return float(value)

    def bool(self, key: str, default: Any = REQUIRED) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not isinstance(value, bool) and type(value).__name__ != "bool_":
            raise self._bad(key, "true or false", value)
        return bool(value)

    def str(self, key: str, default: Any = REQUIRED) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def list(self, key: builtins.str, default: Any = REQUIRED, max_len: builtins.int | None = None) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not isinstance(value, (list, tuple)):
            raise self._bad(key, "a list", value)
        if max_len is not None and len(value) > max_len:
            raise BabyLlamaError(f"{self.source}: {self.prefix + key} has {len(value):,} entries, more than "
                                 f"{max_len:,}")
        return list(value)

    def dict(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        present, value = self._value(key, default)
        if not present:
            return value
        if not isinstance(value, dict):
            raise self._bad(key, "an object", value)
        return value

    def sub(self, key: builtins.str) -> Fields:
        """The object under `key` (absent or null: an empty one) as Fields."""
        return Fields(self.dict(key, {}), f"{self.source} ({self.prefix + key})")
