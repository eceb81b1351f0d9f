"""Property-based fuzzing of every reader (hypothesis): corrupted bytes of a valid file, or random JSON where a
config goes, must give either a valid result or babyllama's one error type — never another exception.

The default run is a few seconds per reader (FUZZ_EXAMPLES, 40 inputs each). The long run, for a hunt:

    BABYLLAMA_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py -p no:randomly

(docs/reliability.md has the figures of the last one). Every failure hypothesis finds is minimized and
printed; it then becomes a regression test in test_reliability.py. The whole-CLI counterpart, with memory and
time limits per run, is scripts/fuzz_corpus.py."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import byte_tokenizer, random_weights, tiny_args

from babyllama import formats
from babyllama.errors import BabyLlamaError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("BABYLLAMA_FUZZ_EXAMPLES", "40"))
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)

# values that break size arithmetic: zero, one, powers of two and their neighbours, int32/int64 edges
INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 33, 64, 255, 256, 1 << 15, 1 << 16, 1 << 20, 1 << 24, (1 << 31) - 1,
               1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutations(data: bytes, header: int) -> st.SearchStrategy[bytes]:
    """1-4 edits of `data`: a byte set anywhere, a 4- or 8-byte word in the first `header` bytes set to an
    interesting value, a cut, or an insertion."""
    n = len(data)
    edit = st.one_of(
        st.tuples(st.just("byte"), st.integers(0, n - 1), st.integers(0, 255)),
        st.tuples(st.just("word"), st.integers(0, max(0, min(n, header) - 8)), st.sampled_from(INTERESTING),
                  st.sampled_from([4, 8])),
        st.tuples(st.just("cut"), st.integers(0, n)),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=16)),
    )
    return st.lists(edit, min_size=1, max_size=4).map(lambda edits: _apply(data, edits))


def _apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, *rest in edits:
        if op == "byte" and rest[0] < len(out):
            out[rest[0]] = rest[1]
        elif op == "word" and rest[0] + rest[2] <= len(out):
            out[rest[0]:rest[0] + rest[2]] = (rest[1] % (1 << (8 * rest[2]))).to_bytes(rest[2], "little")
        elif op == "cut":
            del out[rest[0]:]
        elif op == "insert":
            out[rest[0]:rest[0]] = rest[1]
    return bytes(out)


def refuses_or_returns(read, data: bytes, name: str):
    """`read(path)` on `data` written to a file called `name`: its result, or None for a BabyLlamaError.
    Any other exception fails the property."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            return read(path)
        except BabyLlamaError:
            return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """The valid files that the properties corrupt."""
    d = tmp_path_factory.mktemp("seeds")
    w = random_weights(tiny_args(vocab_size=300, max_seq_len=32, n_layers=1))
    out = {}
    for v in (0, 1, 2):
        formats.save(w, d / f"v{v}.bin", version=v, group_size=32 if v == 2 else None)
        out[f"v{v}"] = (d / f"v{v}.bin").read_bytes()
    byte_tokenizer(300).save(d / "tok.bin")
    out["tok"] = (d / "tok.bin").read_bytes()
    return out


def _run_a_step(w: formats.Weights) -> None:
    """A loaded model must also run: one forward step and a sample, or a clean error (keys beyond the fp16
    cache's range, NaN logits)."""
    from babyllama.engine import Engine
    from babyllama.sampler import Sampler

    e = Engine(w)
    try:
        Sampler(0.0).sample(e.forward([1], [0], e.new_cache(1, 4), logits="last")[0])
    except BabyLlamaError:
        pass


@pytest.mark.parametrize("version", [0, 1, 2])
def test_fuzz_bin_reader(seeds, version):
    @fuzz
    @given(mutations(seeds[f"v{version}"], 300))
    def prop(data):
        w = refuses_or_returns(formats.load, data, "m.bin")
        if w is not None:
            _run_a_step(w)

    prop()


def test_fuzz_tokenizer_reader(seeds):
    from babyllama.tokenizer import Tokenizer

    @fuzz
    @given(mutations(seeds["tok"], 600), st.text(max_size=20))
    def prop(data, text):
        tok = refuses_or_returns(Tokenizer.load, data, "tokenizer.bin")
        if tok is not None:  # a tokenizer that loads encodes and decodes anything
            ids = tok.encode(text)
            tok.decode_text([i for i in ids if 0 <= i < tok.vocab_size])

    prop()


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> tuple[bytes, int]:
    gguf = pytest.importorskip("gguf")
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    save_gguf(random_weights(tiny_args(vocab_size=300, n_layers=1)), path, from_tokenizer(byte_tokenizer(300)), "q8_0")
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


def test_fuzz_gguf_reader(gguf_seed):
    from babyllama.interop.gguf import load_gguf

    data, header = gguf_seed

    @fuzz
    @given(mutations(data, header))
    def prop(mutated):
        loaded = refuses_or_returns(load_gguf, mutated, "m.gguf")
        if loaded is not None:
            weights, vocab = loaded
            _run_a_step(weights)
            if vocab is not None:
                vocab.to_tokenizer()

    prop()


# JSON of any shape, biased to the numbers and types that break configs
json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(INTERESTING + [-1, -(1 << 31)]) | st.integers() |
    st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def config_like(valid: dict) -> st.SearchStrategy[dict]:
    """`valid` with some of its values replaced by arbitrary JSON, some keys dropped, or unknown ones added."""
    keys = sorted(valid)
    return st.tuples(st.dictionaries(st.sampled_from(keys), json_values, max_size=4),
                     st.sets(st.sampled_from(keys), max_size=2),
                     st.dictionaries(st.text(max_size=8), json_values, max_size=2)).map(
        lambda t: {**{k: v for k, v in valid.items() if k not in t[1]}, **t[2], **t[0]})


def _hf_config_reader():
    from babyllama.interop.hf import args_from_config, config_from_args

    return config_from_args(tiny_args(vocab_size=300)), args_from_config


def _meta_params_reader():
    from babyllama.fields import Fields
    from babyllama.interop.meta import _args_from_params, _params_from_args

    read = lambda params: _args_from_params(Fields(params, "params.json"), 300, 32, None,  # noqa: E731
                                            Path("params.json"))
    return _params_from_args(tiny_args(vocab_size=300)), read


@pytest.mark.parametrize("reader", [_hf_config_reader, _meta_params_reader], ids=["hf-config", "meta-params"])
def test_fuzz_model_configs(reader):
    valid, read = reader()

    @fuzz
    @given(config_like(valid) | json_values)
    def prop(config):
        try:
            read(config).validate()
        except BabyLlamaError:
            pass

    prop()


@pytest.fixture(scope="module")
def hf_seed(tmp_path_factory) -> Path:
    pytest.importorskip("safetensors")
    from babyllama.interop.hf import save_hf

    return save_hf(random_weights(tiny_args(vocab_size=300, n_layers=1)), tmp_path_factory.mktemp("hf") / "hf")


def test_fuzz_safetensors_and_index(hf_seed):
    from babyllama.interop.hf import load_hf

    weights = (hf_seed / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", weights[:8])[0]
    config = (hf_seed / "config.json").read_text()

    @fuzz
    @given(mutations(weights, header), st.none() | json_values)
    def prop(data, index):
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            (folder / "config.json").write_text(config)
            (folder / "model.safetensors").write_bytes(data)
            if index is not None:
                (folder / "model.safetensors.index.json").write_text(json.dumps(index))
            try:
                load_hf(folder)
            except BabyLlamaError:
                pass

    prop()


@pytest.fixture(scope="module")
def ckpt_seed(tmp_path_factory) -> bytes:
    pytest.importorskip("torch")
    from conftest import torch_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch_checkpoint(path, tiny_args(vocab_size=300, n_layers=1))
    return path.read_bytes()


def test_fuzz_checkpoint_reader(ckpt_seed):
    from babyllama.train.checkpoint import load_model

    @fuzz
    @given(mutations(ckpt_seed, 4096))
    def prop(data):
        model = refuses_or_returns(load_model, data, "ckpt.pt")
        if model is not None:
            model.to_weights()

    prop()


def test_fuzz_metrics_reader():
    from babyllama.train.metrics import read_metrics

    line = st.one_of(json_values.map(json.dumps), st.text(max_size=30),
                     st.builds(lambda i, x: json.dumps({"iter": i, "loss": x}), st.integers(), st.floats()))

    @fuzz
    @given(st.lists(line, max_size=6), st.booleans())
    def prop(lines, newline_at_end):
        text = "\n".join(lines) + ("\n" if newline_at_end else "")
        refuses_or_returns(read_metrics, text.encode("utf-8", "surrogatepass"), "metrics.jsonl")

    prop()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_fuzz_data_files(suffix):
    from babyllama.train.data import read_documents

    text = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     st.lists(json_values.map(json.dumps), max_size=4).map(lambda ls: "\n".join(ls).encode()))

    @fuzz
    @given(text)
    def prop(data):
        docs = refuses_or_returns(lambda p: list(read_documents(p)), data, "data" + suffix)
        assert docs is None or all(isinstance(d, str) and d for d in docs)

    prop()


def test_fuzz_batch_and_train_config_files():
    from babyllama.cli.run import read_prompts
    from babyllama.train.config import apply, read_config_file

    @fuzz
    @given(st.binary(max_size=100), json_values)
    def prop(batch, config):
        prompts = refuses_or_returns(read_prompts, batch, "prompts.txt")
        assert prompts is None or all(isinstance(p, str) for p in prompts)
        parsed = refuses_or_returns(read_config_file, json.dumps(config).encode(), "cfg.json")
        if parsed is not None:
            try:
                apply({}, parsed, "cfg.json")
            except BabyLlamaError:
                pass

    prop()


def test_fuzz_pretokenized_meta(tmp_path):
    from babyllama.train.data import read_meta, split_arrays

    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")

    @fuzz
    @given(config_like({"vocab_size": 300, "tokens": 100, "shards": {"train": ["train.bin"], "val": []}})
           | json_values)
    def prop(meta):
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        try:
            read_meta(tmp_path)
            split_arrays(tmp_path, "train", 300)
        except BabyLlamaError:
            pass

    prop()


def test_mutations_change_the_seed():
    """The strategy itself: edits land (so the properties above test corrupted files, not the seed)."""
    data = bytes(range(64))
    assert _apply(data, [("word", 8, 1 << 31, 4)])[8:12] == struct.pack("<I", 1 << 31)
    assert _apply(data, [("cut", 10)]) == data[:10]
    assert _apply(data, [("insert", 2, b"xy")])[:4] == b"\0\1xy"
    assert io.BytesIO(_apply(data, [("byte", 0, 9)])).read(1) == b"\t"
