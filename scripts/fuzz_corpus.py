"""A corpus of corrupted inputs run through the `babyllama` command, one child process each, under an
address-space limit; every run is classified by how it ended.

    python scripts/fuzz_corpus.py [--out DIR] [--scale 1.0] [--jobs 2] [--address-space-gb 3] [--timeout 60]

Readers covered: llama2.c .bin v0/v1/v2, tokenizer.bin, GGUF (f32 and q8_0), Hugging Face folders (config.json,
model.safetensors, the shard index), Meta folders (params.json, consolidated.00.pth), training checkpoints,
eval's data file, --batch-file, named pipes/devices/folders where files go, and extreme flags. Each case is
made from a valid seed by one labelled mutation; `expect` says whether a check can tell the input is
corrupt ("error") or the input may be valid ("any").

Outcomes: ok (exit 0), refused (exit 1 or 2, exactly one line on stderr, ours), noisy (refused, but with
more on stderr), traceback, signal, hang (killed after --timeout), memory (peak RSS above the reader's
baseline, the seed's own run, + 4 x the input's size + 32 MiB), garbage (exit 0 where expect is "error").
Writes DIR/results.jsonl (a line per run) and DIR/summary.md; the inputs of every bad outcome stay in
DIR/cases/. Exit status 1 when any run is bad.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import struct
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import (  # noqa: E402  (the test suite's tiny-model factories and limited runner)
    byte_tokenizer,
    make_story_corpus,
    random_weights,
    run_limited,
    tiny_args,
)

from babyllama import formats  # noqa: E402

INTERESTING = [0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 1 << 16, 1 << 20, 1 << 24, (1 << 31) - 1, 1 << 31,
               (1 << 32) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]
BAD_OUTCOMES = ("noisy", "traceback", "signal", "hang", "memory", "garbage")


@dataclass
class Case:
    reader: str
    kind: str  # the mutation
    expect: str  # "error" (a check can tell) or "any"
    argv: list[str]
    inputs: list[str]  # files or folders made for this case (measured, and kept when the outcome is bad)
    outcome: str = ""
    returncode: int = 0
    max_rss: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- seeds


class Seeds:
    """Valid files of every format, from one tiny random model and a byte tokenizer."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.weights = random_weights(tiny_args(vocab_size=300, max_seq_len=64))
        self.tok = root / "tokenizer.bin"
        byte_tokenizer(300).save(self.tok)
        self.bins = {}
        for v in (0, 1, 2):
            self.bins[v] = root / f"v{v}.bin"
            formats.save(self.weights, self.bins[v], version=v, group_size=32 if v == 2 else None)
        from babyllama.interop.gguf import save_gguf
        from babyllama.interop.hf import save_hf
        from babyllama.interop.meta import save_meta
        from babyllama.interop.vocab import from_tokenizer

        vocab = from_tokenizer(byte_tokenizer(300))
        self.gguf = {dt: save_gguf(self.weights, root / f"m_{dt}.gguf", vocab, dt) for dt in ("f32", "q8_0")}
        self.hf = save_hf(self.weights, root / "hf")
        self.hf_torch = root / "hf_torch"  # the same model as pytorch_model.bin (read with torch)
        shutil.copytree(self.hf, self.hf_torch)
        import torch
        from safetensors.numpy import load_file

        torch.save({k: torch.from_numpy(v) for k, v in load_file(self.hf / "model.safetensors").items()},
                   self.hf_torch / "pytorch_model.bin")
        (self.hf_torch / "model.safetensors").unlink()
        self.meta = save_meta(self.weights, root / "meta")
        from conftest import torch_checkpoint

        self.ckpt = root / "ckpt.pt"
        torch_checkpoint(self.ckpt, tiny_args(vocab_size=300, max_seq_len=64))
        self.data = make_story_corpus(root / "data.txt", 6)
        self.prompts = root / "prompts.txt"
        self.prompts.write_text("Once upon a time\nThe dog\n\nA cat sat\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- mutations


def put(data: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def word(value: int, size: int) -> int:
    return value % (1 << (8 * size))


class Maker:
    """Writes each case's input under DIR/work/<n>/ and builds its command line."""

    def __init__(self, seeds: Seeds, work: Path, rng: random.Random):
        self.s, self.work, self.rng = seeds, work, rng
        self.cases: list[Case] = []

    def _dir(self) -> Path:
        d = self.work / str(len(self.cases))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def file(self, reader: str, kind: str, expect: str, data: bytes, name: str, argv) -> None:
        path = self._dir() / name
        path.write_bytes(data)
        self.cases.append(Case(reader, kind, expect, [a.replace("{in}", str(path)) for a in argv], [str(path)]))

    def folder(self, reader: str, kind: str, expect: str, seed: Path, changes: dict[str, bytes | None], argv) -> None:
        d = self._dir() / seed.name
        shutil.copytree(seed, d)
        for name, data in changes.items():
            if data is None:
                (d / name).unlink()
            else:
                (d / name).write_bytes(data)
        self.cases.append(Case(reader, kind, expect, [a.replace("{in}", str(d)) for a in argv], [str(d)]))

    def binary(self, reader: str, seed: Path, header: int, argv, n: int, name: str, fp32: tuple[int, int] | None = None,
               trailing_error: bool = True) -> None:
        for kind, expect, data in variants(seed.read_bytes(), header, n, self.rng, fp32, trailing_error):
            self.file(reader, kind, expect, data, name, argv)


def variants(data: bytes, header: int, n: int, rng: random.Random, fp32: tuple[int, int] | None = None,
             trailing_error: bool = True) -> list[tuple[str, str, bytes]]:
    """n byte-level mutations of a binary file as (kind, expect, bytes): cuts, a header word set to an
    interesting value, random byte flips, appended or inserted bytes, a NaN/Inf written into the weights.
    `fp32` is the (start, end) of checked fp32 weights, where a NaN must be refused; `trailing_error` says
    whether the format's size check refuses extra bytes."""
    out = []
    for i in range(n):
        k = i % 6
        if k == 0:
            out.append(("truncated", "error", data[:rng.randrange(0, len(data))]))
        elif k == 1:
            size = rng.choice((4, 8))
            at = rng.randrange(0, max(1, min(header, len(data)) - size))
            out.append((f"header-word@{at}", "any",
                        put(data, at, "<I" if size == 4 else "<Q", word(rng.choice(INTERESTING), size))))
        elif k == 2:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            bad = fp32 is not None and _non_finite(bytes(flipped), *fp32)
            out.append(("byte-flips", "error" if bad else "any", bytes(flipped)))
        elif k == 3:
            extra = bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64, 4096))))
            out.append(("appended", "error" if trailing_error else "any", data + extra))
        elif k == 4 and fp32 is not None:
            at = fp32[0] + 4 * rng.randrange((fp32[1] - fp32[0]) // 4)
            out.append(("nan-weight", "error", put(data, at, "<f", rng.choice((math.nan, math.inf, -math.inf)))))
        else:
            at = rng.randrange(0, len(data))
            extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
            out.append(("inserted", "error" if trailing_error else "any", data[:at] + extra + data[at:]))
    return out


def _non_finite(data: bytes, start: int, end: int) -> bool:
    """Whether the fp32 values in data[start:end] hold a NaN or Inf."""
    import numpy as np

    return not bool(np.isfinite(np.frombuffer(data[start:end], dtype=np.float32)).all())


def bin_cases(m: Maker, n: int) -> None:
    s = m.s
    run = ["run", "{in}", "-z", str(s.tok), "-n", "6", "-t", "0"]
    a = s.weights.args
    rope = 4 * a.max_seq_len * a.head_size  # v0's legacy RoPE tables: unused by every reader, so not checked
    for v, header in ((0, 28), (1, 256), (2, 256)):
        data = s.bins[v].read_bytes()
        cls = 0 if a.shared_classifier else 4 * a.vocab_size * a.dim
        fp32 = {0: (header, len(data) - cls - rope), 1: (header, len(data)), 2: None}[v]
        m.binary(f"bin v{v}", s.bins[v], header, run, n, "m.bin", fp32=fp32)
        base = 0 if v == 0 else 8
        # every header field set to a value that breaks it (seq_len is only checked where the file has rope tables)
        for f, field_name in enumerate(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                        "seq_len")):
            for value in (0, -1, 3, 1 << 20, (1 << 31) - 1):
                expect = "any" if field_name == "seq_len" and v and value > 0 else "error"
                m.file(f"bin v{v}", f"header-{field_name}={value}", expect, put(data, base + 4 * f, "<i", value),
                       "m.bin", run)
        if v:
            for value in (math.nan, math.inf, -1.0, 1e300):
                for at, what in ((48, "rope_theta"), (56, "norm_eps")):
                    m.file(f"bin v{v}", f"header-{what}={value}", "error", put(data, at, "<d", value), "m.bin", run)
            m.file(f"bin v{v}", "header-version=3", "error", put(data, 4, "<i", 3), "m.bin", run)
        if v == 2:
            for gs in (0, 7, 1 << 20, -32):
                m.file("bin v2", f"header-group={gs}", "error", put(data, 37, "<i", gs), "m.bin", run)


def tokenizer_cases(m: Maker, n: int) -> None:
    s = m.s
    run = ["run", str(s.bins[1]), "-z", "{in}", "-n", "6", "-t", "0"]
    m.binary("tokenizer.bin", s.tok, 64, run, n, "tokenizer.bin")
    for case in m.cases:  # bytes inserted inside a piece re-align the records: a valid file may come out
        if case.reader == "tokenizer.bin" and case.kind == "inserted":
            case.expect = "any"
    data = s.tok.read_bytes()
    for value in (-1, (1 << 31) - 1, 1 << 20):
        m.file("tokenizer.bin", f"first-length={value}", "error", put(data, 8, "<i", value), "tokenizer.bin", run)
    m.file("tokenizer.bin", "nan-score", "error", put(data, 4, "<f", math.nan), "tokenizer.bin", run)
    m.file("tokenizer.bin", "empty", "error", b"", "tokenizer.bin", run)


def gguf_cases(m: Maker, n: int) -> None:
    import gguf

    for dt, path in m.s.gguf.items():
        run = ["run", "{in}", "-n", "6", "-t", "0"]
        data = path.read_bytes()
        reader = gguf.GGUFReader(path)
        m.binary(f"gguf {dt}", path, reader.data_offset, run, n, "m.gguf", trailing_error=False)
        # structure-aware: counts and lengths (the u64 parts of the header), set to breaking values
        u64 = []
        for f in list(reader.fields.values()) + [t.field for t in reader.tensors]:
            offset = f.offset
            for part in f.parts[:6]:
                if part.dtype == "uint64" and part.size == 1:
                    u64.append(offset)
                offset += part.nbytes
        for offset in m.rng.sample(u64, min(len(u64), n // 2)):
            value = m.rng.choice((0, 1 << 40, (1 << 64) - 1, 2_000_000))
            m.file(f"gguf {dt}", f"u64@{offset}={value}", "any", put(data, offset, "<Q", value), "m.gguf", run)
        for t in reader.tensors[:: max(1, len(reader.tensors) // 6)]:
            at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
            kind = m.rng.choice((1, 26, 12, 99))
            m.file(f"gguf {dt}", f"{t.name}-type={kind}", "error", put(data, at, "<I", kind), "m.gguf", run)
            m.file(f"gguf {dt}", f"{t.name}-offset+32", "error", put(data, at + 4, "<Q", t.data_offset -
                                                                      reader.data_offset + 32), "m.gguf", run)
            m.file(f"gguf {dt}", f"{t.name}-offset=0", "error" if t.data_offset != reader.data_offset else "any",
                   put(data, at + 4, "<Q", 0), "m.gguf", run)


BAD_VALUES = [None, "12", "false", [], {}, -1, 0, 1 << 40, 1.5, math.inf, True, 7]


def _json_variants(valid: dict, expect_for, rng: random.Random, n: int):
    """(label, config, expect): each field set to a wrong type or a breaking value, or dropped;
    `expect_for(key, value)` says whether the changed config can still be valid."""
    out = [(f"{key}={value!r}"[:40], {**valid, key: value}, expect_for(key, value))
           for key in sorted(valid) for value in BAD_VALUES
           if value != valid[key] or type(value) is not type(valid[key])]
    out += [(f"no {key}", {k: v for k, v in valid.items() if k != key}, expect_for(key, None)) for key in sorted(valid)]
    rng.shuffle(out)
    return out[:n] + [("top-level list", [valid], "error"), ("top-level null", None, "error"),
                      ("deep nesting", "DEEP", "error"), ("torn", "TORN", "error")]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _positive_number(v, limit: float = math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= limit and v < math.inf


FLOAT_LIMITS = {"rms_norm_eps": 1.0, "norm_eps": 1.0, "rope_theta": 1e12}


def hf_expect(original: dict):
    shape_keys = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                  "num_key_value_heads", "head_dim"}

    def expect(key, value):
        if key in shape_keys:  # the tensors fix them: only the same value (or an equal float) passes
            same = _is_int(value) and int(value) == original[key]
            default_ok = key == "head_dim" or original["num_key_value_heads"] == original["num_attention_heads"]
            return "any" if same or (value is None and key in ("num_key_value_heads", "head_dim") and default_ok) \
                else "error"
        if key == "max_position_embeddings":
            return "any" if value is None or (_is_int(value) and 1 <= value <= 1 << 24) else "error"
        if key == "rope_theta" and "rope_theta" in (original.get("rope_parameters") or {}):
            return "any"  # rope_parameters' theta is the one read, as transformers 5 reads it: this one is not
        if key in ("rms_norm_eps", "rope_theta"):
            return "any" if value is None or _positive_number(value, FLOAT_LIMITS[key]) else "error"
        if key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            ok = value is None or value is False or (key == "tie_word_embeddings" and value is True)
            return "any" if ok else "error"
        if key == "model_type":
            return "error"
        if key == "architectures":
            return "any" if value is None or value == [] else "error"
        if key == "hidden_act":
            return "any" if value is None else "error"
        if key in ("rope_parameters", "rope_scaling"):
            return "any" if value is None or value == {} else "error"
        return "any"  # bos/eos ids, dtype names: not read

    return expect


def meta_expect(original: dict, hidden: int):
    from babyllama.config import llama_hidden_dim

    def expect(key, value):
        if key in ("dim", "n_layers", "n_heads"):
            return "any" if _is_int(value) and int(value) == original[key] else "error"
        if key == "n_kv_heads":
            same = _is_int(value) and int(value) == original[key]
            return "any" if same or (value is None and original[key] == original["n_heads"]) else "error"
        if key in ("multiple_of", "ffn_dim_multiplier"):
            new = {**original, key: value}
            try:
                ok = llama_hidden_dim(original["dim"], new.get("multiple_of", 256) if new.get("multiple_of") is not None
                                      else 256, new.get("ffn_dim_multiplier")) == hidden
            except (TypeError, ValueError, OverflowError, ZeroDivisionError):
                ok = False
            return "any" if ok and (value is None or _is_int(value) or key == "ffn_dim_multiplier") else "error"
        if key in ("norm_eps", "rope_theta"):
            return "any" if value is None or _positive_number(value, FLOAT_LIMITS[key]) else "error"
        if key == "vocab_size":
            return "any" if value is None or (_is_int(value) and (value <= 0 or value == 300) and value >= -1) \
                else "error"
        return "any"

    return expect


def _json_bytes(config) -> bytes:
    if config == "DEEP":
        return b"[" * 200_000 + b"]" * 200_000
    if config == "TORN":
        return b'{"hidden_size": 3'
    return json.dumps(config).encode()


def hf_cases(m: Maker, n: int) -> None:
    s = m.s
    run = ["run", "{in}", "-z", str(s.tok), "-n", "6", "-t", "0"]
    config = json.loads((s.hf / "config.json").read_text())
    for label, variant, expect in _json_variants(config, hf_expect(config), m.rng, n):
        m.folder("hf config.json", label, expect, s.hf, {"config.json": _json_bytes(variant)}, run)
    weights = (s.hf / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", weights[:8])[0]
    for kind, expect, data in variants(weights, header, n // 2, m.rng, (header, len(weights)), trailing_error=False):
        m.folder("hf safetensors", kind, expect, s.hf, {"model.safetensors": data}, run)
    names = [k for k in json.loads(weights[8:header]) if k != "__metadata__"]
    # a sharded folder: the weights under a shard's name, so that the index is what is read (beside a
    # model.safetensors the loader reads that and passes over the index, as transformers does)
    shard = "model-00001-of-00001.safetensors"
    sharded = {"model.safetensors": None, shard: weights}
    for label, entry, expect in [("escape ..", "../x.safetensors", "error"), ("absolute", "/etc/passwd", "error"),
                                 ("missing", "nope.safetensors", "error"), ("number", 5, "error"),
                                 ("self", "model.safetensors.index.json", "error"), ("ok", shard, "any"),
                                 ("dir", ".", "error"), ("nested ..", "a/../../x", "error")]:
        index = {"weight_map": dict.fromkeys(names, entry)}
        m.folder("hf index", label, expect, s.hf,
                 {**sharded, "model.safetensors.index.json": json.dumps(index).encode()}, run)
    for label, index in [("list", []), ("no map", {"x": 1}), ("map list", {"weight_map": []}),
                         ("empty map", {"weight_map": {}})]:
        m.folder("hf index", label, "error", s.hf,
                 {**sharded, "model.safetensors.index.json": json.dumps(index).encode()}, run)


def meta_cases(m: Maker, n: int) -> None:
    s = m.s
    export = ["export", str(m.work / "meta_out.bin"), "--meta-llama", "{in}"]
    params = json.loads((s.meta / "params.json").read_text())
    for label, variant, expect in _json_variants(params, meta_expect(params, s.weights.args.hidden_dim), m.rng, n):
        m.folder("meta params.json", label, expect, s.meta, {"params.json": _json_bytes(variant)}, export)
    shard = (s.meta / "consolidated.00.pth").read_bytes()
    for kind, _, data in variants(shard, 2048, n // 2, m.rng, trailing_error=False):
        # a zip member's bytes may change without its CRC being read: only a cut must fail
        m.folder("meta .pth", kind, "error" if kind == "truncated" else "any", s.meta, {"consolidated.00.pth": data},
                 export)


def ckpt_cases(m: Maker, n: int) -> None:
    run = ["run", "{in}", "-z", str(m.s.tok), "-n", "6", "-t", "0"]
    for kind, _, data in variants(m.s.ckpt.read_bytes(), 4096, n, m.rng, trailing_error=False):
        m.file("checkpoint", kind, "error" if kind == "truncated" else "any", data, "ckpt.pt", run)
    m.file("checkpoint", "empty", "error", b"", "ckpt.pt", run)


def text_cases(m: Maker, n: int) -> None:
    s = m.s
    ev = ["eval", str(s.bins[1]), "-z", str(s.tok), "--data", "{in}"]
    batch = ["run", str(s.bins[1]), "-z", str(s.tok), "--batch-file", "{in}", "-n", "6", "-t", "0"]
    for reader, seed, argv in (("eval data", s.data, ev), ("batch file", s.prompts, batch)):
        data = seed.read_bytes()
        for i in range(n):
            out = bytearray(data)
            k = i % 5
            if k == 0:
                out = out[: m.rng.randrange(len(out))]
                expect = "any"
            elif k == 1:
                out[m.rng.randrange(len(out))] = m.rng.choice((0xFF, 0xC3, 0x80, 0xED))
                expect = "error"  # not UTF-8 (a lone continuation or lead byte)
            elif k == 2:
                out = bytearray(b"<|endoftext|>\n" * m.rng.randint(1, 50))
                expect = "error" if reader == "eval data" else "any"  # (as prompts they are text)
            elif k == 3:
                out = bytearray(m.rng.randbytes(m.rng.randint(1, 3000)))
                expect = "any"
            else:
                out = bytearray(b"x" * m.rng.choice((100_000, 1_000_000)))  # one long line
                expect = "any"
            try:
                out.decode("utf-8")
            except UnicodeDecodeError:
                expect = "error"
            if reader == "batch file" and not out.strip(b"\n"):
                expect = "error"
            m.file(reader, f"text-{k}", expect, bytes(out), seed.name, argv)


def special_cases(m: Maker) -> None:
    s = m.s
    for what in ("fifo", "device", "directory"):
        d = m._dir()
        if what == "fifo":
            target = d / "pipe"
            os.mkfifo(target)
        elif what == "device":
            target = Path("/dev/zero")
        else:
            target = d / "folder.bin"
            target.mkdir()
        model = str(s.bins[1])
        for reader, argv in (("bin v1", ["run", "{t}", "-n", "4"]), ("tokenizer.bin", ["run", model, "-z", "{t}"]),
                             ("batch file", ["run", model, "--batch-file", "{t}"]),
                             ("eval data", ["eval", model, "--data", "{t}"]),
                             ("gguf f32", ["export", str(d / "o.bin"), "--model", "{t}"]),
                             ("checkpoint", ["export", str(d / "o.bin"), "--checkpoint", "{t}"]),
                             ("train config", ["train", "{t}"])):
            m.cases.append(Case("special paths", f"{reader} as {what}", "error",
                                [a.replace("{t}", str(target)) for a in argv], []))


def flag_cases(m: Maker) -> None:
    model, tok = str(m.s.bins[1]), str(m.s.tok)
    base = ["run", model, "-z", tok, "-n", "6"]
    for flags, expect in [
        (["-t", "nan"], "error"), (["-t", "inf"], "any"), (["--temperature=-1"], "error"), (["-p", "nan"], "error"),
        (["-p", "2"], "error"), (["-n", "-1"], "error"), (["-n", "99999999999"], "any"), (["-n", "0"], "any"),
        (["--max-new-tokens", "0"], "error"), (["--max-new-tokens", "1000000000"], "any"), (["-s", "-5"], "any"),
        (["-s", str(1 << 70)], "any"), (["--threads", "0"], "error"), (["--threads", "90000"], "error"),
        (["--threads", "40000"], "error"), (["--parallel", "0"], "error"), (["--draft-k", "0"], "error"),
        (["--n-keep", "-3"], "error"), (["--context-shift", "--n-keep", "1000000"], "any"),
        (["-i", "x " * 50_000], "any"), (["-m", "chat", "--batch-file", model], "error"),
        (["--device", "tpu"], "error"), (["--quantize", "q4"], "error"), (["-t", "1e309"], "any"),
    ]:
        m.cases.append(Case("flags", " ".join(flags)[:40], expect, base + flags, []))
    for env_threads in ("100000", "0", "abc", "8,100000"):
        case = Case("flags", f"OMP_NUM_THREADS={env_threads}", "any", base + ["-t", "0"], [])
        case.extra["env"] = {"OMP_NUM_THREADS": env_threads}
        m.cases.append(case)
    ev = ["eval", model, "-z", tok, "--data", str(m.s.data)]
    for flags, expect in [(["--seq-len", "0"], "error"), (["--seq-len", "-5"], "error"),
                          (["--seq-len", "1000000"], "error"), (["--max-stories", "0"], "error"),
                          (["--max-tokens", "-1"], "error"), (["--seq-len", "1"], "any")]:
        m.cases.append(Case("flags", "eval " + " ".join(flags), expect, ev + flags, []))
    out = str(m.work / "flag_out.bin")
    for flags, expect in [(["--max-seq-len", str(1 << 31)], "error"), (["--max-seq-len", str((1 << 31) - 1)], "error"),
                          (["--max-seq-len", "0"], "error"), (["--version", "2", "--group-size", "7"], "error"),
                          (["--version", "2", "--group-size", "0"], "error"), (["--max-seq-len", "5"], "any")]:
        m.cases.append(Case("flags", "export " + " ".join(flags), expect, ["export", out, "--model", model, *flags],
                            []))


# ------------------------------------------------------------------------------------------- running


def classify(case: Case, result, baselines: dict[str, int]) -> str:
    err = result.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    if result.timed_out:
        return "hang"
    if result.returncode < 0:
        return "signal"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    bound = baselines.get(case.reader, 0) + 4 * case.input_bytes + (32 << 20)
    if baselines.get(case.reader) and result.max_rss > bound:
        return "memory"
    if result.returncode == 0:
        return "garbage" if case.expect == "error" else "ok"
    ours = [line for line in lines if ": error: " in line and line.startswith("babyllama")]
    return "refused" if len(lines) == 1 and len(ours) == 1 else "noisy"


def size_of(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.is_file() else 0


def run_case(case: Case, args) -> Case:
    case.input_bytes = sum(size_of(p) for p in case.inputs)
    start = time.monotonic()
    result = run_limited(case.argv, int(args.address_space_gb * (1 << 30)), timeout=args.timeout,
                         env=case.extra.get("env"), cwd=Path(args.out))
    case.seconds = round(time.monotonic() - start, 2)
    case.returncode, case.max_rss = result.returncode, result.max_rss
    case.stderr_tail = result.stderr.decode(errors="replace")[-600:]
    case.extra["result"] = result
    return case


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fuzz-corpus", help="work and result folder (fuzz-corpus)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="cases per reader, relative to the default (1.0: ~1,100 runs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (2)")
    p.add_argument("--address-space-gb", type=float, default=3.0, help="RLIMIT_AS of each run (3 GiB)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as a hang (60)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "cases").mkdir(parents=True)
    args.out = str(out)
    rng = random.Random(args.seed)
    seeds = Seeds(out / "seeds")
    maker = Maker(seeds, out / "work", rng)
    scale = lambda n: max(6, round(n * args.scale))  # noqa: E731
    bin_cases(maker, scale(84))
    tokenizer_cases(maker, scale(96))
    gguf_cases(maker, scale(60))
    hf_cases(maker, scale(84))
    meta_cases(maker, scale(40))
    ckpt_cases(maker, scale(60))
    text_cases(maker, scale(36))
    special_cases(maker)
    flag_cases(maker)
    cases = maker.cases

    # baselines: each reader's command on its valid seed (the peak memory a correct run takes)
    seed_runs = {"bin v0": ["run", str(seeds.bins[0]), "-z", str(seeds.tok), "-n", "6", "-t", "0"],
                 "gguf f32": ["run", str(seeds.gguf["f32"]), "-n", "6", "-t", "0"],
                 "hf config.json": ["run", str(seeds.hf), "-z", str(seeds.tok), "-n", "6", "-t", "0"],
                 "hf torch": ["run", str(seeds.hf_torch), "-z", str(seeds.tok), "-n", "6", "-t", "0"],
                 "meta params.json": ["export", str(out / "b.bin"), "--meta-llama", str(seeds.meta)],
                 "checkpoint": ["run", str(seeds.ckpt), "-z", str(seeds.tok), "-n", "6", "-t", "0"],
                 "eval data": ["eval", str(seeds.bins[1]), "-z", str(seeds.tok), "--data", str(seeds.data)],
                 "batch file": ["run", str(seeds.bins[1]), "-z", str(seeds.tok), "--batch-file", str(seeds.prompts),
                                "-n", "6", "-t", "0"]}
    baselines = {}
    for reader, argv in seed_runs.items():
        r = run_limited(argv, int(args.address_space_gb * (1 << 30)), timeout=args.timeout, cwd=out)
        if r.returncode:
            raise SystemExit(f"the seed of {reader} does not run: {r.stderr.decode()[-500:]}")
        baselines[reader] = r.max_rss
    # readers whose cases may take another path: the largest of the seed runs they can reach (an HF folder
    # may hold torch shards; the special paths include the checkpoint and train commands)
    hf = max(baselines.pop("hf config.json"), baselines.pop("hf torch"))
    for reader in ("bin v1", "bin v2", "tokenizer.bin", "flags"):
        baselines[reader] = baselines["bin v0"]
    baselines.update({"gguf q8_0": baselines["gguf f32"], "hf config.json": hf, "hf safetensors": hf, "hf index": hf,
                      "meta .pth": baselines["meta params.json"], "special paths": max(baselines.values())})

    print(f"{len(cases)} cases, {args.jobs} at a time, RLIMIT_AS {args.address_space_gb:g} GiB, "
          f"timeout {args.timeout:g} s", flush=True)
    started = time.monotonic()
    done = 0
    with ThreadPoolExecutor(args.jobs) as pool, open(out / "results.jsonl", "w") as log:
        for case in pool.map(lambda c: run_case(c, args), cases):
            result = case.extra.pop("result")
            case.outcome = classify(case, result, baselines)
            if case.outcome in BAD_OUTCOMES:
                keep = out / "cases" / f"{cases.index(case):04d}"
                keep.mkdir()
                for path in case.inputs:
                    (shutil.copytree if Path(path).is_dir() else shutil.copy)(path, keep / Path(path).name)
                (keep / "case.json").write_text(json.dumps(asdict(case), indent=1))
            log.write(json.dumps({k: v for k, v in asdict(case).items() if k != "extra"}) + "\n")
            done += 1
            if done % 100 == 0:
                print(f"{done}/{len(cases)} ({time.monotonic() - started:.0f} s)", flush=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    summary = summarize(cases, baselines, args, time.monotonic() - started)
    (out / "summary.md").write_text(summary)
    print(summary)
    return 1 if any(c.outcome in BAD_OUTCOMES for c in cases) else 0


def summarize(cases: list[Case], baselines: dict[str, int], args, seconds: float) -> str:
    by_reader: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        by_reader[c.reader][c.outcome] += 1
    cols = ("ok", "refused", *BAD_OUTCOMES)
    rows = ["| reader | inputs | " + " | ".join(cols) + " | peak RSS max (MiB) |",
            "|---|---:|" + "---:|" * len(cols) + "---:|"]
    for reader, counts in by_reader.items():
        peak = max(c.max_rss for c in cases if c.reader == reader) / 2**20
        rows.append(f"| {reader} | {sum(counts.values())} | " + " | ".join(str(counts[k]) for k in cols) +
                    f" | {peak:.0f} |")
    total = Counter(c.outcome for c in cases)
    rows.append(f"| **all** | **{len(cases)}** | " + " | ".join(f"**{total[k]}**" for k in cols) + " | |")
    bad = [c for c in cases if c.outcome in BAD_OUTCOMES]
    lines = [f"# Fuzz corpus: {len(cases)} corrupted inputs through the CLI", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; {args.jobs} runs at a time, each under RLIMIT_AS "
             f"{args.address_space_gb:g} GiB, timeout {args.timeout:g} s; {seconds:.0f} s in all; seed {args.seed}. "
             "Memory bound per run: the reader's baseline peak RSS (its seed's run) + 4 x input size + 32 MiB.", "",
             *rows, ""]
    for c in bad[:40]:
        lines.append(f"- {c.outcome}: {c.reader} / {c.kind}: `{' '.join(c.argv)[:160]}`\n  "
                     f"{c.stderr_tail.strip().splitlines()[-1] if c.stderr_tail.strip() else '(no stderr)'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
