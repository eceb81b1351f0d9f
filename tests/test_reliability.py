"""Hostile inputs, one test per case found by trying babyllama as a hostile user would (docs/reliability.md):
every file and flag ends in babyllama's one-line error or a correct run, never a traceback, a signal, a hang,
unbounded memory or silently wrong output. The cases that could eat memory run under an address-space limit
(`run_limited`), so that they fail rather than swap the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    byte_tokenizer,
    one_line_error,
    random_weights,
    run_cli,
    run_limited,
    tiny_args,
)

from babyllama import formats
from babyllama.errors import BabyLlamaError
from babyllama.loading import BUILTIN_MODEL, BUILTIN_TOKENIZER

GIB = 1 << 30
TORCH_AS = 3 * GIB  # importing torch alone maps ~0.65 GB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A v1 model and its tokenizer.bin (beside it, as run finds it)."""
    d = tmp_path_factory.mktemp("tiny")
    formats.save(random_weights(tiny_args(vocab_size=300)), d / "m.bin")
    byte_tokenizer(300).save(d / "tokenizer.bin")
    return d / "m.bin", d / "tokenizer.bin"


def patched(src: Path, dst: Path, offset: int, fmt: str, *values) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    dst.write_bytes(bytes(data))
    return dst


def ok(result) -> None:
    err = result.stderr.decode(errors="replace")
    assert not getattr(result, "timed_out", False), f"hung: {err}"
    assert result.returncode == 0 and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------- threads


def test_threads_flag_beyond_the_cap_is_one_line(tiny):
    model, tok = tiny
    r = run_limited(["run", str(model), "-n", "4", "--threads", "90000"], 2 * GIB)
    one_line_error(r, "--threads 90000 is more than babyllama uses")


def test_thread_count_in_the_environment_is_lowered_to_the_cap(tiny):
    model, _ = tiny
    r = run_limited(["run", str(model), "-n", "4", "-t", "0"], 2 * GIB, env={"OMP_NUM_THREADS": "100000"})
    ok(r)
    assert b"OMP_NUM_THREADS=100000 lowered to" in r.stderr


@pytest.mark.parametrize("command", ["run", "run GGUF", "chat", "export"])
def test_a_stderr_that_cannot_be_written_does_not_end_the_work(command, tmp_path):
    """Notes, warnings, the line naming a model that is not a .bin, export's report and the closing tok/s line go
    to stderr; where it cannot be written (a full disk: /dev/full) they are dropped and the work still gets done,
    exit 0 (the first such line ended the run, exit 1, or a chat after a skipped line)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    import subprocess

    gguf = tmp_path / "m.gguf"
    if command in ("run GGUF", "export"):
        pytest.importorskip("gguf", reason="GGUF output needs the interop extra")
    if command == "run GGUF":
        ok(run_limited(["export", str(gguf), "--model", str(BUILTIN_MODEL), "-z", str(BUILTIN_TOKENIZER)], 2 * GIB))
    argv, stdin = {"run": (["run", "-n", "12", "-t", "0"], None),
                   "run GGUF": (["run", str(gguf), "-n", "12", "-t", "0"], None),
                   "chat": (["chat", "-n", "12", "-t", "0"], b"caf\xe9\nHello\n"),  # a note: not UTF-8, skipped
                   "export": (["export", str(gguf), "--model", str(BUILTIN_MODEL), "-z", str(BUILTIN_TOKENIZER)],
                              None)}[command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "100000"}  # a note: the count is lowered
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "babyllama", *argv], input=stdin, stdout=subprocess.PIPE,
                           stderr=full, env=env, timeout=120)
    assert r.returncode == 0, r
    if command == "export":
        assert gguf.stat().st_size > 0
    elif command == "chat":
        assert r.stdout.startswith(b"User: User: ") and len(r.stdout) > len(b"User: User: Assistant: ")
    else:
        assert r.stdout.startswith(b"Once upon a time"), r


# ------------------------------------------------------------------------------------------- memory


def test_builtin_with_a_huge_header_seq_len_runs_in_little_memory(tmp_path):
    """A v1 header's seq_len is not covered by the size check: the cache and RoPE tables follow -n instead."""
    big = patched(BUILTIN_MODEL, tmp_path / "m.bin", 32, "<i", 1 << 20)
    (tmp_path / "tokenizer.bin").write_bytes(BUILTIN_TOKENIZER.read_bytes())
    r = run_limited(["run", str(big), "-n", "16", "-t", "0"], GIB)
    ok(r)
    assert r.max_rss < 400 << 20
    # the whole context (-n 0) would need 5 GiB of cache: refused in one line, before allocating it
    one_line_error(run_limited(["run", str(big), "-n", "0", "-t", "0"], GIB), "KV cache of 1,048,576 positions")
    # eval's way to a smaller cache is its --seq-len, which the message names beside run's -n
    (tmp_path / "story.txt").write_text("Once upon a time there was a cat.\n")
    msg = one_line_error(run_limited(["eval", str(big), "--data", str(tmp_path / "story.txt")], GIB), "KV cache of")
    assert "eval --seq-len" in msg
    ok(run_limited(["eval", str(big), "--data", str(tmp_path / "story.txt"), "--seq-len", "64"], GIB))


def test_rope_tables_follow_the_context_used(tmp_path):
    """head size 256 and seq_len 2**24: eager RoPE tables would take 16 GiB."""
    args = tiny_args(dim=256, n_heads=1, n_kv_heads=1, n_layers=1, hidden_dim=64, max_seq_len=1 << 24)
    formats.save(random_weights(args), tmp_path / "m.bin")
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    ok(run_limited(["run", str(tmp_path / "m.bin"), "-n", "8", "-t", "0"], GIB))


def _hf_folder(tmp_path, **config_changes) -> Path:
    pytest.importorskip("safetensors")
    from babyllama.interop.hf import save_hf

    folder = save_hf(random_weights(tiny_args(vocab_size=300)), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_unreadable_safetensors_file_is_called_unreadable(tmp_path, monkeypatch):
    """A weight file or LoRA adapter that cannot be opened (no read permission: what open() answers here) says
    why; the safetensors library called it "No such file or directory"."""
    from babyllama.adapter import Adapter, base_identity, load_adapter, save_adapter
    from babyllama.loading import open_model

    folder = _hf_folder(tmp_path)
    weights = random_weights(tiny_args())
    save_adapter(Adapter(2, 4.0, ["wq"], base_identity(weights), {}), tmp_path / "adapter.safetensors")
    real_open = os.open
    locked = {str(folder / "model.safetensors"), str(tmp_path / "adapter.safetensors")}

    def refuse(path, *args, **kw):
        if str(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(BabyLlamaError, match=f"^cannot read weight file {folder / 'model.safetensors'}: "
                                             "Permission denied$"):
        open_model(folder)
    with pytest.raises(BabyLlamaError, match="^cannot read adapter file .*adapter.safetensors: Permission denied$"):
        load_adapter(tmp_path / "adapter.safetensors")


def test_hf_layer_count_is_bounded_before_anything_is_sized_by_it(tmp_path, tiny):
    folder = _hf_folder(tmp_path, num_hidden_layers=10**7)
    r = run_limited(["run", str(folder), "-z", str(tiny[1]), "-n", "4"], 2 * GIB)
    one_line_error(r, "num_hidden_layers must be an integer in [1, 1024]")


def test_meta_layer_count_is_bounded(tmp_path):
    pytest.importorskip("torch")
    from babyllama.interop.meta import save_meta

    folder = save_meta(random_weights(tiny_args(vocab_size=300)), tmp_path / "meta")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(dict(params, n_layers=10**8)))
    r = run_limited(["export", str(tmp_path / "o.bin"), "--meta-llama", str(folder)], TORCH_AS)
    one_line_error(r, "n_layers must be an integer in [1, 1024]")


def gguf_file(path: Path, vocab=None, dtype: str = "f32") -> Path:
    pytest.importorskip("gguf")
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    save_gguf(random_weights(tiny_args(vocab_size=300)), path, vocab or from_tokenizer(byte_tokenizer(300)), dtype)
    return path


def value_offset(data: bytes, key: str) -> int:
    """Where the value of GGUF metadata `key` starts (after the key string and its u32 type)."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at + 8 + len(raw) + 4


def test_gguf_block_count_is_bounded(tmp_path):
    good = gguf_file(tmp_path / "m.gguf")
    bad = patched(good, tmp_path / "bad.gguf", value_offset(good.read_bytes(), "llama.block_count"), "<I",
                  4_000_000_000)
    r = run_limited(["export", str(tmp_path / "o.bin"), "--model", str(bad)], 2 * GIB)
    one_line_error(r, "llama.block_count must be an integer in [1, 1024]")


def test_a_device_as_tokenizer_is_refused(tiny):
    model, _ = tiny
    one_line_error(run_limited(["run", str(model), "-z", "/dev/zero", "-n", "4"], GIB), "/dev/zero is a device")


def test_batch_file_memory_does_not_grow_with_the_file(tmp_path):
    """3,000 prompts on the built-in model: every KV cache allocated up front needed ~4 GB; through the pool
    of --parallel slots the run stays small, and prints every sequence in order."""
    n = 3000
    (tmp_path / "prompts.txt").write_text("".join(f"Tom{i % 7}\n" for i in range(n)))
    r = run_limited(["run", "--batch-file", str(tmp_path / "prompts.txt"), "-n", "4", "-t", "0"], GIB, timeout=300)
    ok(r)
    heads = [line for line in r.stdout.split(b"\n") if line.startswith(b"=== sequence ")]
    assert len(heads) == n and heads[0].startswith(b"=== sequence 1/3000 ")
    assert heads[-1].startswith(b"=== sequence 3000/3000 ")
    assert r.max_rss < 400 << 20


def test_a_one_line_megabyte_document_is_tokenized_in_bounded_memory(tmp_path, tiny):
    """BPE over one 1 MB word: the symbol lists and the merge heap as Python objects took ~100 MB."""
    (tmp_path / "small.txt").write_text("x\n")
    (tmp_path / "big.txt").write_text("x" * 1_000_000)
    runs = [run_limited(["eval", str(tiny[0]), "--data", str(tmp_path / name)], GIB, timeout=300)
            for name in ("small.txt", "big.txt")]
    for r in runs:
        ok(r)
    assert runs[1].max_rss - runs[0].max_rss < 40 << 20


# ------------------------------------------------------------------------------------------- hangs


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("argv", [
    ["run", "{fifo}"], ["run", "{model}", "-z", "{fifo}"], ["run", "{model}", "--batch-file", "{fifo}"],
    ["eval", "{model}", "--data", "{fifo}"], ["export", "{out}", "--model", "{fifo}"],
], ids=["model", "tokenizer", "batch-file", "eval-data", "export"])
def test_a_named_pipe_is_refused_not_waited_on(argv, fifo, tiny, tmp_path):
    names = {"fifo": str(fifo), "model": str(tiny[0]), "out": str(tmp_path / "o.bin")}
    r = run_limited([a.format(**names) for a in argv], GIB, timeout=20)
    one_line_error(r, "is a named pipe, not a regular file")


def test_a_named_pipe_as_the_model_card_is_not_waited_on(tmp_path):
    """`serve` reads model.json beside the model: a pipe there is skipped like an unreadable card (or refused, where
    the card is read strictly), never waited on."""
    from babyllama.errors import BabyLlamaError
    from babyllama.loading import model_card

    os.mkfifo(tmp_path / "model.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text("[1, 2]")
    cards, errors = [], []

    def read():  # a model folder's card is its model.json
        cards.extend(model_card(str(tmp_path / d)) for d in ("", "bad"))
        for d in ("", "bad"):
            try:
                model_card(str(tmp_path / d), strict=("chat_template",))
            except BabyLlamaError as e:
                errors.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "blocked on the pipe"
    assert cards == [{}, {}]
    assert "is a named pipe" in errors[0] and "model card must hold an object, not list" in errors[1]
    assert all(e.endswith("(the model card: fix it or remove it)") for e in errors)


@pytest.mark.parametrize("card", ['{"chat_template": ["llama2"]}', '{"chat_template": {"a": 1}}', '{"name": {"a": 1}}',
                                  '{"name": 5, "chat_template": ""}', '{"chat_template": "babyllama",}'])
def test_model_card_fields_of_the_wrong_type_are_skipped_or_refused(tmp_path, card, tiny):
    """A card beside the model whose name or chat_template is not a non-empty string, or that is not JSON, is
    skipped where only generation reads it (`run`, the API), and refused in one line by chat and serve, which
    would otherwise run another template than the card meant (a list as chat_template was a TypeError out of
    serve, a number or an object as name the model id clients were given)."""
    from babyllama.errors import BabyLlamaError
    from babyllama.loading import model_card

    (tmp_path / "m.json").write_text(card)
    (tmp_path / "good.json").write_text('{"name": "story", "chat_template": "llama2", "params": 3}')
    assert model_card(str(tmp_path / "m.bin")) == {}
    assert model_card(str(tmp_path / "good.bin")) == {"name": "story", "chat_template": "llama2"}
    both = ("name", "chat_template")
    assert model_card(str(tmp_path / "good.bin"), strict=both) == {"name": "story", "chat_template": "llama2"}
    assert model_card(str(tmp_path / "none.bin"), strict=both) == {}
    with pytest.raises(BabyLlamaError, match="m.json: "):
        model_card(str(tmp_path / "m.bin"), strict=both)
    model, tok = tiny
    shutil.copy(model, tmp_path / "m.bin")
    shutil.copy(tok, tmp_path / "tokenizer.bin")
    assert run_limited(["run", str(tmp_path / "m.bin"), "-n", "4"], GIB, timeout=60).returncode == 0
    chat = run_limited(["chat", str(tmp_path / "m.bin"), "-n", "4"], TORCH_AS, timeout=60, stdin=b"hi\n")
    if "chat_template" in card or card.endswith(",}"):  # what chat reads from it
        one_line_error(chat, "m.json: ")
    else:
        assert chat.returncode == 0, chat.stderr.decode()
    one_line_error(run_limited(["serve", str(tmp_path / "m.bin"), "--port", "0"], TORCH_AS, timeout=60), "m.json: ")


def test_a_card_field_a_flag_replaces_is_not_refused(tmp_path, tiny):
    """A broken card field that a flag gives instead (--chat-template for chat), or that the command does not read
    (chat reads no name), is no reason to refuse: only what would be replaced without a word is."""
    from babyllama.errors import BabyLlamaError
    from babyllama.loading import model_card

    model, tok = tiny
    shutil.copy(model, tmp_path / "m.bin")
    shutil.copy(tok, tmp_path / "tokenizer.bin")
    (tmp_path / "m.json").write_text('{"name": 5, "chat_template": ["llama2"]}')
    with pytest.raises(BabyLlamaError, match="card's name must be a non-empty string"):
        model_card(str(tmp_path / "m.bin"), strict=("name",))
    assert model_card(str(tmp_path / "m.bin"), strict=()) == {}
    proc = run_limited(["chat", str(tmp_path / "m.bin"), "-n", "4", "--chat-template", "llama2"], TORCH_AS,
                       timeout=60, stdin=b"hi\n")
    assert proc.returncode == 0, proc.stderr.decode()
    (tmp_path / "m.json").write_text('{"name": 5, "chat_template": "llama2"}')  # chat reads no name
    proc = run_limited(["chat", str(tmp_path / "m.bin"), "-n", "4"], TORCH_AS, timeout=60, stdin=b"hi\n")
    assert proc.returncode == 0, proc.stderr.decode()


class _Drip(BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends one every 0.3 s; `drip` "headers": drips its status line instead,
    "unsized": sends no Content-Length (the body ends where the connection does, as an HTTP/1.0 server's)."""

    def do_GET(self):  # noqa: N802
        try:
            if self.server.drip == "headers":
                for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            self.send_response(200)
            if self.server.drip == "body":
                self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("drip", ["body", "headers", "unsized"])
def test_download_from_a_dripping_server_hits_the_time_limit(tmp_path, drip):
    """The time limit ends the transfer with one line, and what arrived stays a .part to resume from: never the
    file itself (a body of unknown length cut short would otherwise look complete)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads, server.drip = True, drip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        start = time.monotonic()
        r = run_limited(["download", "stories260K", "--dir", str(tmp_path), "--url-base", url, "--time-limit", "2"],
                        GIB, timeout=60)
        one_line_error(r, "took longer than the time limit of 2 s")
        assert time.monotonic() - start < 30
        r = run_limited(["data", "download", "--url", f"{url}/x.tar.gz", "--data-dir", str(tmp_path),
                         "--time-limit", "2"], GIB, timeout=60)
        one_line_error(r, "took longer than the time limit of 2 s")
        kept = sorted(p.name for p in tmp_path.iterdir())
        assert "x.tar.gz" not in kept and (drip == "headers" or "x.tar.gz.part" in kept), kept
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------- silent garbage


def _tensor_info(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (file offset of its type field, of its data-offset field), found with the gguf package."""
    import gguf

    info = {}
    for t in gguf.GGUFReader(path).tensors:
        at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
        info[t.name] = (at, at + 4)
    return info


def _tensor_offsets(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    return {name: struct.unpack_from("<Q", data, at)[0] for name, (_, at) in _tensor_info(path).items()}


@pytest.mark.parametrize("change,message", [
    ("shift", "leaves a gap before it"),
    ("overlap", "overlaps the tensor before it"),
    ("zero", "overlaps the tensor before it"),
    ("f16", "leaves a gap before it"),
    ("i32", "holds integers (I32)"),
    ("block_count", "unexpected tensor blk.1"),
])
def test_gguf_layout_is_checked(tmp_path, change, message):
    good = gguf_file(tmp_path / "m.gguf")
    info, offsets = _tensor_info(good), _tensor_offsets(good)
    data = bytearray(good.read_bytes())
    names = sorted(offsets, key=offsets.get)
    middle, before = names[len(names) // 2], names[len(names) // 2 - 1]
    if change == "shift":
        struct.pack_into("<Q", data, info[middle][1], offsets[middle] + 32)
    elif change == "overlap":
        struct.pack_into("<Q", data, info[middle][1], offsets[before])
    elif change == "zero":
        for _, at in info.values():
            struct.pack_into("<Q", data, at, 0)
    elif change in ("f16", "i32"):
        struct.pack_into("<I", data, info["blk.0.attn_q.weight"][0], {"f16": 1, "i32": 26}[change])
    else:
        struct.pack_into("<I", data, value_offset(bytes(data), "llama.block_count"), 1)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--model", str(tmp_path / "bad.gguf")), message)


def test_gguf_scores_shorter_than_the_tokens_are_refused(tmp_path):
    from babyllama.interop.vocab import from_tokenizer

    vocab = from_tokenizer(byte_tokenizer(300))
    vocab.scores = vocab.scores[:100]
    bad = gguf_file(tmp_path / "m.gguf", vocab)
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--model", str(bad)),
                   "tokenizer.ggml.scores has 100 entries for 300 tokens")


def test_hf_tie_word_embeddings_must_be_a_bool(tmp_path, tiny):
    folder = _hf_folder(tmp_path, tie_word_embeddings="false")
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"),
                   "field tie_word_embeddings must be true or false, got 'false'")


def test_hf_integer_tensors_are_refused(tmp_path, tiny):
    folder = _hf_folder(tmp_path)  # skips without safetensors
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = (tensors[name] * 100).astype(np.int32)
    save_file(tensors, folder / "model.safetensors")
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"), f"{name} holds I32 values")

    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"), f"{name} holds torch.int32 values")


def _adapter_cases() -> dict:
    """name -> (edit of an adapter's wq factors of layer 0, what the error line says)."""
    key = "layers.0.attention.wq.lora_A"

    def nan(t):
        t[key] = t[key].copy()
        t[key][0, 0] = np.nan

    return {"nan": (nan, f"tensor {key} holds NaN or infinite values"),
            "int32": (lambda t: t.update({key: (t[key] * 100).astype(np.int32)}), f"tensor {key} holds int32 values"),
            "overflow": (lambda t: t.update({key: t[key] * np.float32(1e20), key[:-1] + "B": t[key[:-1] + "B"] * 1e20}),
                         "merging it overflows fp32 in wq of layer 0"),
            "other-layer": (lambda t: t.update({"layers.7.attention.wq.lora_A": t[key]}),
                            "tensor layers.7.attention.wq.lora_A is none of the adapter's"),
            "other-target": (lambda t: t.update({"layers.0.attention.wk.lora_A": t[key]}),
                             "tensor layers.0.attention.wk.lora_A is none of the adapter's")}


@pytest.mark.parametrize("case", list(_adapter_cases()))
def test_a_corrupt_lora_adapter_is_refused_naming_it(tmp_path, tiny, capsys, case):
    """An adapter's factors are checked as a model's weights are: NaN or an integer type in adapter.safetensors,
    a merge that overflows, or a tensor no adapted matrix reads is one line naming the adapter; export writes
    nothing (it wrote a model every reader then refused) and run does not get as far as NaN logits."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    from babyllama.adapter import Adapter, base_identity, save_adapter
    from babyllama.cli import main

    weights = formats.load(tiny[0])
    rng = np.random.default_rng(0)
    tensors = {f"layers.{n}.attention.wq.lora_{x}": rng.standard_normal(shape).astype(np.float32)
               for n in range(weights.args.n_layers) for x, shape in (("A", (2, 32)), ("B", (32, 2)))}
    save_adapter(Adapter(2, 4.0, ["wq"], base_identity(weights), tensors), tmp_path / "adapter.safetensors")
    edit, message = _adapter_cases()[case]
    edit(tensors)
    save_file(tensors, tmp_path / "adapter.safetensors")  # as it is: save_adapter would write fp32
    for argv in (["export", str(tmp_path / "merged.bin"), "--model", str(tiny[0])], ["run", str(tiny[0]), "-n", "4"]):
        assert main([*argv, "--lora", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"babyllama: error: {tmp_path / 'adapter.safetensors'}: ") and message in err[-1], err
    assert not (tmp_path / "merged.bin").exists()


@pytest.mark.parametrize("case", ["sparse", "int-key", "meta"])
def test_torch_weight_files_with_a_sparse_tensor_or_a_number_as_name_are_one_line(tmp_path, tiny, case):
    """pytorch_model.bin (and Meta's .pth, through the same check) holding a sparse tensor, a tensor keyed by a
    number or one on the meta device (a shape, no values): TypeError tracebacks where the tensors were read."""
    torch = pytest.importorskip("torch")
    folder = _hf_folder(tmp_path)  # skips without safetensors
    from safetensors.torch import load_file

    from babyllama.interop.state_dict import check_torch_state

    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    if case == "sparse":
        state[name] = state[name].to_sparse()
    elif case == "meta":
        state[name] = state[name].to("meta")
    else:
        state[7] = state.pop(name)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    message = {"sparse": f"tensor {name} is stored as torch.sparse_coo, not as dense weights",
               "meta": f"tensor {name} has no data (a tensor on PyTorch's meta device)",
               "int-key": "a tensor is named 7, not by a string: not a state dict"}[case]
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"), f"pytorch_model.bin: {message}")
    with pytest.raises(BabyLlamaError, match=f"^consolidated.00.pth: {re.escape(message)}$"):
        check_torch_state(state, "consolidated.00.pth")


@pytest.mark.parametrize("entry", ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors"])
def test_hf_weight_map_stays_inside_the_model_folder(tmp_path, tiny, entry):
    folder = _hf_folder(tmp_path)
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "sub").mkdir()
    names = json.loads(outside.read_bytes()[8:8 + struct.unpack("<Q", outside.read_bytes()[:8])[0]])
    index = {"weight_map": {n: entry.format(abs=outside) for n in names if n != "__metadata__"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"), "outside.safetensors")


def test_hf_shards_may_be_symlinks_into_a_cache(tmp_path, tiny):
    """Hugging Face's cache: snapshots/REV/ holds links into blobs/."""
    folder = _hf_folder(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (folder / "model.safetensors").rename(blobs / "abc123")
    (folder / "model.safetensors").symlink_to(Path("..") / "blobs" / "abc123")
    names = [n for n in json.loads((blobs / "abc123").read_bytes()[8:8 + struct.unpack(
        "<Q", (blobs / "abc123").read_bytes()[:8])[0]]) if n != "__metadata__"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names,
                                                                                                 "model.safetensors")}))
    ok(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_refused_at_load_naming_the_tensor(tmp_path, tiny, value):
    w = random_weights(tiny_args(vocab_size=300))
    w.wq[1][3, 5] = value
    formats.save(w, tmp_path / "m.bin")
    one_line_error(run_cli("run", str(tmp_path / "m.bin"), "-z", str(tiny[1]), "-n", "4"),
                   "tensor wq of layer 1 holds NaN or infinite values")
    (tmp_path / "d.txt").write_text("Once upon a time.\n")
    one_line_error(run_cli("eval", str(tmp_path / "m.bin"), "-z", str(tiny[1]), "--data", str(tmp_path / "d.txt")),
                   "tensor wq of layer 1 holds NaN")


def test_nan_in_a_q8_0_scale_is_refused(tmp_path, tiny):
    formats.save(formats.load(tiny[0]), tmp_path / "q.bin", version=2, group_size=32)
    q = formats.load(tmp_path / "q.bin")
    raw = bytearray((tmp_path / "q.bin").read_bytes())
    scale_at = q.w1[0].s.__array_interface__["data"][0] - q.rms_att.__array_interface__["data"][0] + 256
    struct.pack_into("<f", raw, scale_at, np.nan)
    (tmp_path / "q.bin").write_bytes(bytes(raw))
    one_line_error(run_cli("run", str(tmp_path / "q.bin"), "-z", str(tiny[1]), "-n", "4"), "w1 of layer 0")


def test_nan_in_hf_weights_names_the_hf_tensor(tmp_path, tiny):
    folder = _hf_folder(tmp_path)  # skips without safetensors
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, folder / "model.safetensors")
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"),
                   "tensor model.norm.weight holds NaN or infinite values")


@pytest.mark.parametrize("seq_len", ["2147483647", "2147483648"])
def test_export_refuses_a_context_no_reader_takes_back(tmp_path, tiny, seq_len):
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--model", str(tiny[0]), "--max-seq-len", seq_len),
                   f"max_seq_len {seq_len} is beyond what babyllama accepts")
    assert not (tmp_path / "o.bin").exists()


def test_hf_rope_scaling_must_be_an_object_even_beside_rope_parameters(tmp_path, tiny):
    folder = _hf_folder(tmp_path, rope_scaling="12")
    one_line_error(run_cli("run", str(folder), "-z", str(tiny[1]), "-n", "4"), "field rope_scaling must be an object")


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_theta"])
def test_hf_infinite_eps_or_theta_is_refused_on_read(tmp_path, tiny, field):
    folder = _hf_folder(tmp_path)
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    config[field] = 1e400  # json.dumps writes Infinity, which json.loads reads back
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--hf", str(folder)),
                   f"field {field} must be a positive finite number")


# ------------------------------------------------------------------------------------------- tracebacks


def test_sampler_refuses_nan_logits_and_nan_settings():
    from babyllama.sampler import Sampler

    for sampler in (Sampler(1.0, 0.9, 1), Sampler(1.0, 1.0, 1), Sampler(0.0)):
        with pytest.raises(BabyLlamaError, match="NaN logits"):
            sampler.sample(np.array([0.5, np.nan, 1.0], dtype=np.float32))
        with pytest.raises(BabyLlamaError, match="infinite logits"):
            sampler.sample(np.array([0.5, np.inf, 1.0], dtype=np.float32))
    assert Sampler(1.0, 0.9, 1).sample(np.array([0.5, -np.inf, 1.0], dtype=np.float32)) in (0, 2)
    for bad in ({"temperature": float("nan")}, {"topp": float("nan")}):
        with pytest.raises(ValueError):
            Sampler(**bad)


@pytest.mark.parametrize("flag", [["-t", "nan"], ["-p", "nan"], ["--temperature=-inf"]])
def test_nan_sampling_flags_are_one_line(tiny, flag):
    one_line_error(run_cli("run", str(tiny[0]), "-n", "4", *flag), "must be")


def _gguf_cases(good: bytes) -> dict[str, bytes]:
    """Truncations and inflated counts/lengths, each of which made the gguf reader raise or loop."""
    tokens_len = value_offset(good, "tokenizer.ggml.tokens") + 4  # after the array's item type
    first_token = tokens_len + 8
    name_len = good.index(b"token_embd.weight") - 8
    cases = {f"truncated-{n}": good[:n] for n in (5, 12, 20, 30, 100, len(good) // 3, len(good) - 100, len(good) - 1)}
    for what, at, fmt, value in [
        ("tensor-count", 8, "<Q", 1 << 40), ("kv-count", 16, "<Q", 1 << 40), ("kv-count-small", 16, "<Q", 3),
        ("token-array", tokens_len, "<Q", 1 << 60), ("token-array-2", tokens_len, "<Q", 2_000_000),
        ("string-length", first_token, "<Q", 1 << 62), ("name-length", name_len, "<Q", 1 << 40),
        ("n-dims", name_len + 8 + len("token_embd.weight"), "<I", 1 << 31),
        ("version", 4, "<I", 7), ("key-type", value_offset(good, "llama.block_count") - 4, "<I", 99),
    ]:
        data = bytearray(good)
        struct.pack_into(fmt, data, at, value)
        cases[what] = bytes(data)
    key = good.index(b"llama.block_count")
    cases["key-not-utf8"] = good[:key] + b"\xff" + good[key + 1:]
    eos = good.index(b"tokenizer.ggml.eos_token_id")
    cases["duplicate-key"] = good[:eos] + b"tokenizer.ggml.bos_token_id" + good[eos + 27:]
    return cases


def test_gguf_truncated_or_inflated_headers_are_one_line(tmp_path):
    good = gguf_file(tmp_path / "m.gguf").read_bytes()
    code = ("import sys\nfrom babyllama.cli import main\n"
            "for p in sys.argv[1:]:\n"
            "    print(p, main(['export', p + '.bin', '--model', p]), file=sys.stderr, flush=True)\n")
    paths = []
    for name, data in _gguf_cases(good).items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        paths.append(str(tmp_path / f"{name}.gguf"))
    r = run_limited([], 2 * GIB, timeout=120, program=[sys.executable, "-c", code, *paths])
    err = r.stderr.decode()
    assert not r.timed_out and r.returncode == 0 and "Traceback" not in err, err
    results = [line for line in err.splitlines() if line.startswith(str(tmp_path))]
    assert len(results) == len(paths) and all(line.endswith(" 1") for line in results), err
    assert err.count("babyllama: error: ") == len(paths), err


@pytest.mark.parametrize("where,changes,message", [
    ("gguf", {"llama.attention.head_count": 0}, "head_count must be an integer in [1, 4096]"),
    ("hf", {"num_attention_heads": 0}, "num_attention_heads must be an integer in [1, 4096]"),
    ("meta", {"multiple_of": 0}, "multiple_of must be an integer in [1, "),
    ("meta", {"n_heads": 0}, "n_heads must be an integer in [1, 4096]"),
])
def test_zero_divisors_are_one_line(tmp_path, where, changes, message):
    if where == "gguf":
        good = gguf_file(tmp_path / "m.gguf")
        (key, value), = changes.items()
        src = patched(good, tmp_path / "bad.gguf", value_offset(good.read_bytes(), key), "<I", value)
        argv = ["--model", str(src)]
    elif where == "hf":
        argv = ["--hf", str(_hf_folder(tmp_path, **changes))]
    else:
        pytest.importorskip("torch")
        from babyllama.interop.meta import save_meta

        folder = save_meta(random_weights(tiny_args(vocab_size=300)), tmp_path / "meta")
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps(dict(params, **changes)))
        argv = ["--meta-llama", str(folder)]
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), *argv), message)


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "null", "[" * 100_000 + "]" * 100_000, "{"],
                         ids=["list", "string", "null", "deep", "torn"])
@pytest.mark.parametrize("where", ["hf", "meta"])
def test_json_configs_of_the_wrong_shape_are_one_line(tmp_path, text, where):
    if where == "hf":
        folder = _hf_folder(tmp_path)
        (folder / "config.json").write_text(text)
        argv = ["--hf", str(folder)]
    else:
        pytest.importorskip("torch")
        from babyllama.interop.meta import save_meta

        folder = save_meta(random_weights(tiny_args(vocab_size=300)), tmp_path / "meta")
        (folder / "params.json").write_text(text)
        argv = ["--meta-llama", str(folder)]
    name = "config.json" if where == "hf" else "params.json"
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), *argv), name)


@pytest.mark.parametrize("vocab", [1, 2])
def test_a_vocabulary_without_room_for_bos_is_refused(tmp_path, tiny, vocab):
    bad = patched(tiny[0], tmp_path / "m.bin", 8 + 5 * 4, "<i", vocab)
    one_line_error(run_cli("run", str(bad), "-n", "4"), f"vocab_size {vocab} cannot hold")


@pytest.mark.parametrize("data", [b"\0\0\0\0", b"\0\0\0\0" + struct.pack("<fi", 0.0, 1) + b"a"],
                         ids=["no-tokens", "one-token"])
def test_a_tokenizer_without_its_control_tokens_is_refused(tmp_path, data):
    """Found by test_fuzz.py: a tokenizer.bin of no tokens loaded, then encoding indexed <unk> (IndexError),
    e.g. in `data pretokenize`, which takes the tokenizer's own vocabulary size."""
    from babyllama.tokenizer import Tokenizer

    (tmp_path / "tok.bin").write_bytes(data)
    with pytest.raises(BabyLlamaError, match="it needs <unk>, <s> and </s>"):
        Tokenizer.load(tmp_path / "tok.bin").encode("0")
    pytest.importorskip("tqdm")
    (tmp_path / "d.txt").write_text("Once upon a time.\n")
    one_line_error(run_cli("data", "pretokenize", "--input", str(tmp_path / "d.txt"), "--tokenizer",
                           str(tmp_path / "tok.bin"), "--out-dir", str(tmp_path / "out")), "it needs <unk>")


def test_eval_seq_len_zero_is_refused_like_negative(tiny, tmp_path):
    (tmp_path / "d.txt").write_text("Once upon a time.\n")
    for n in ("0", "-5"):
        one_line_error(run_cli("eval", str(tiny[0]), "--data", str(tmp_path / "d.txt"), "--seq-len", n),
                       "--seq-len must be in [1, 64]")


def test_metrics_with_a_torn_last_line_resume(tmp_path):
    from babyllama.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "loss": 2.5}\n{"iter": 2, "loss": 2.4}\n{"iter": 3, "lo')
    assert [r["iter"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(tmp_path, resume_from_iter=2)
    assert path.read_text().endswith('{"iter": 3, "lo')  # nothing changes until the run logs
    log.write(iter=3, loss=2.3)
    assert path.read_text() == '{"iter": 1, "loss": 2.5}\n{"iter": 2, "loss": 2.4}\n{"iter": 3, "loss": 2.3}\n'
    path.write_text('{"iter": 1}\nnot json\n{"iter": 3}\n')
    with pytest.raises(BabyLlamaError, match="metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_a_safetensors_mapping_refused_for_memory_does_not_blame_the_file(tmp_path):
    """safetensors maps the file and reports a refused mapping (ulimit -v) as its own error, "Cannot allocate
    memory (os error 12)": that was "not a readable safetensors file", of a file that is fine."""
    pytest.importorskip("safetensors")
    from safetensors import SafetensorError

    from babyllama import safeio

    refused = safeio.unreadable_safetensors(tmp_path / "m.safetensors",
                                            SafetensorError("Cannot allocate memory (os error 12)"))
    assert str(refused) == f"{tmp_path}/m.safetensors: out of memory mapping it (Cannot allocate memory (os error 12))"
    corrupt = safeio.unreadable_safetensors(tmp_path / "m.safetensors", SafetensorError("header too large"))
    assert str(corrupt) == f"{tmp_path}/m.safetensors: not a readable safetensors file (header too large)"


def test_a_model_map_refused_for_memory_names_the_file(tmp_path, monkeypatch, tiny):
    """A map that memory limits refuse (ulimit -v: ENOMEM) was the bare "Cannot allocate memory", naming no file."""
    import errno
    import mmap

    pytest.importorskip("gguf")
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    save_gguf(random_weights(tiny_args(vocab_size=300)), tmp_path / "m.gguf", from_tokenizer(byte_tokenizer(300)))

    def refused(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refused)
    with pytest.raises(BabyLlamaError, match=f"^{re.escape(str(tiny[0]))}: out of memory mapping it "):
        formats.load(tiny[0], mmap=True)
    from babyllama.interop.gguf import load_gguf

    with pytest.raises(BabyLlamaError, match=f"^{re.escape(str(tmp_path / 'm.gguf'))}: out of memory mapping it "):
        load_gguf(tmp_path / "m.gguf")


def test_the_loss_plot_with_no_writable_home_prints_nothing(tmp_path):
    """With HOME unusable (read-only, or not a folder) matplotlib works from a temporary folder and printed a
    paragraph about it under the training's output; the plot is drawn and nothing is printed."""
    pytest.importorskip("matplotlib")
    import subprocess

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iter": 1, "loss": 2.5}\n{"iter": 2, "loss": 2.4}\n')
    (tmp_path / "file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    env.update(HOME=str(tmp_path / "file" / "home"), PYTHONPATH=str(ROOT))
    code = "import sys; from babyllama.train.metrics import plot_losses; print(plot_losses(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_a_full_disk_under_the_metrics_log_and_loss_plot_names_the_file(tmp_path, request):
    """Appending to metrics.jsonl and drawing loss.png on a full disk: both errors name their file (not a bare
    "File too large"), and the plot keeps the old loss.png whole and leaves no loss.tmp.png behind."""
    pytest.importorskip("matplotlib")
    from babyllama.train.metrics import MetricsLog, plot_losses

    log = MetricsLog(tmp_path)
    for i in range(1, 1000):  # 30 KB
        log.write(iter=i, loss=3.0 / i)
    (tmp_path / "loss.png").write_bytes(b"old plot")
    request.getfixturevalue("small_file_limit")  # metrics.jsonl is over it already, and a plot is more
    with pytest.raises(BabyLlamaError, match="cannot write metrics log .*metrics.jsonl: File too large"):
        log.write(iter=1000, loss=0.01)
    with pytest.raises(BabyLlamaError, match="cannot write loss plot .*loss.png: File too large"):
        plot_losses(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == b"old plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_training_resumes_over_a_torn_metrics_line_and_refuses_a_foreign_optimizer(tmp_path):
    """A kill during a metrics write leaves half a line: resuming skips it (it raised JSONDecodeError)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    from conftest import make_story_corpus

    from babyllama.train.config import resolve_config
    from babyllama.train.data import pretokenize
    from babyllama.train.loop import train

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    pretokenize(make_story_corpus(tmp_path / "stories.txt", 60), tmp_path / "tok.bin", tmp_path / "data", workers=1)
    run = {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"), "dim": "32", "n_layers": "1",
           "n_heads": "4", "max_seq_len": "32", "batch_size": "4", "gradient_accumulation_steps": "1",
           "eval_interval": "2", "eval_iters": "1", "max_iters": "4", "device": "cpu", "warmup_iters": "0"}
    train(resolve_config(None, run))
    metrics = tmp_path / "out" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iter": 5, "loss": 1.2, "l')
    resumed = train(resolve_config(None, {"out_dir": str(tmp_path / "out"), "init_from": "resume",
                                          "max_iters": "6"}))
    assert resumed["iter"] == 6
    assert [json.loads(line)["iter"] for line in metrics.read_text().splitlines()][-1] == 6  # every line whole

    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["optimizer"] = {"state": {}, "param_groups": "nonsense"}
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(BabyLlamaError, match="cannot resume from"):
        train(resolve_config(None, {"out_dir": str(tmp_path / "out"), "init_from": "resume", "max_iters": "8"}))


def test_resuming_checks_the_checkpoints_model_and_optimizer_tensors(tmp_path):
    """Resuming loaded a state dict with a tensor missing (the fresh initialization kept, unnoticed), an integer
    or NaN tensor (copied in, trained on), and an optimizer moment of another shape (RuntimeError at the first
    step): each is now refused before training, naming the tensor."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    from conftest import make_story_corpus

    from babyllama.train.config import resolve_config
    from babyllama.train.data import pretokenize
    from babyllama.train.loop import train

    byte_tokenizer(300).save(tmp_path / "tok.bin")
    pretokenize(make_story_corpus(tmp_path / "stories.txt", 30), tmp_path / "tok.bin", tmp_path / "data", workers=1)
    train(resolve_config(None, {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"), "dim": "32",
                                "n_layers": "1", "n_heads": "4", "max_seq_len": "32", "batch_size": "4",
                                "gradient_accumulation_steps": "1", "eval_interval": "2", "eval_iters": "1",
                                "max_iters": "2", "device": "cpu", "warmup_iters": "0"}))
    good = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    wq, emb = "layers.0.attention.wq.weight", "tok_embeddings.weight"

    def edited(model=None, moment=None):
        ckpt = {**good, "model": {**good["model"], **(model or {})}, "optimizer": {**good["optimizer"]}}
        if moment is not None:
            ckpt["optimizer"]["state"] = {**good["optimizer"]["state"],
                                          emb: {**good["optimizer"]["state"][emb], "exp_avg": moment}}
        return ckpt

    missing = edited()
    del missing["model"][wq]
    for ckpt, message in ((missing, f"tensor {wq} is missing"),
                          (edited({wq: good["model"][wq].to(torch.int32)}), f"{wq} is a torch.int32 tensor"),
                          (edited({wq: good["model"][wq] * float("nan")}), f"tensor {wq} holds NaN"),
                          (edited(moment=good["model"][emb][:3]),
                           f"optimizer state of {emb}: tensor exp_avg has shape (3, 32), expected (300, 32)")):
        torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
        with pytest.raises(BabyLlamaError) as e:
            train(resolve_config(None, {"out_dir": str(tmp_path / "out"), "init_from": "resume", "max_iters": "4"}))
        assert str(e.value).startswith(f"cannot resume from {tmp_path / 'out' / 'ckpt.pt'}: "), e.value
        assert message in str(e.value)


def test_empty_or_torn_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--checkpoint", str(tmp_path / "ckpt.pt")),
                   "empty checkpoint")
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--checkpoint", str(tmp_path / "ckpt.pt")),
                   "cannot read checkpoint")


def test_a_checkpoint_cut_short_says_so(tmp_path):
    """A ckpt.pt or a Meta .pth cut short (a copy or download interrupted) read as "[Errno 22] Invalid argument" or
    as miniz's "failed finding central directory": the zip directory torch.save writes last is missing, and the
    line says so."""
    pytest.importorskip("torch")
    from conftest import torch_checkpoint

    from babyllama.interop.meta import load_meta, save_meta
    from babyllama.train import checkpoint

    torch_checkpoint(tmp_path / "good.pt", tiny_args(vocab_size=300))
    data = (tmp_path / "good.pt").read_bytes()
    for cut in (5000, len(data) // 2, len(data) - 10):
        (tmp_path / "ckpt.pt").write_bytes(data[:cut])
        with pytest.raises(BabyLlamaError, match=r"ckpt.pt: not a whole PyTorch file: no zip directory at its end"):
            checkpoint.load(tmp_path / "ckpt.pt")
    from babyllama.interop.state_dict import torch_load_failure

    os.mkfifo(tmp_path / "swapped")  # a file replaced by a pipe after torch failed on it: read without blocking
    assert torch_load_failure(tmp_path / "swapped", OSError("torch's words")) == "torch's words"
    shard = save_meta(random_weights(tiny_args(vocab_size=300)), tmp_path / "meta") / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:5000])  # Meta's shards are torch.save's zips too
    with pytest.raises(BabyLlamaError, match=r"00.pth: not a readable PyTorch checkpoint \(not a whole PyTorch file"):
        load_meta(tmp_path / "meta")


def test_a_checkpoint_that_is_no_pytorch_file_or_holds_objects_says_so_without_torchs_advice(tmp_path):
    """torch's weights-only error advises loading with weights_only=False, which would run whatever a pickle
    holds: the line says what the file is instead."""
    torch = pytest.importorskip("torch")
    from babyllama.train import checkpoint

    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": {}, "model_args": {}, "code": print}, tmp_path / "objects.pt")
    for name, message in (("random.pt", "not a PyTorch file (neither torch.save's zip nor a pickle)"),
                          ("objects.pt", "it holds Python objects besides tensors and plain values")):
        with pytest.raises(BabyLlamaError) as e:
            checkpoint.load(tmp_path / name)
        assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / name}: {message}"), e.value
        assert "weights_only" not in str(e.value)


def test_checkpoint_whose_model_args_disagree_with_its_tensors(tmp_path):
    pytest.importorskip("torch")
    from conftest import torch_checkpoint

    from babyllama.train import checkpoint

    model = torch_checkpoint(tmp_path / "good.pt", tiny_args(vocab_size=300))
    for change, message in (({"n_layers": 1000}, "is missing"), ({"n_layers": 10**7}, "n_layers 10000000 is beyond"),
                            ({"dim": "32"}, "dim must be a positive integer"), ({"multiple_of": 0}, "multiple_of")):
        args = dict(tiny_args(vocab_size=300).to_dict(), hidden_dim=None if "multiple_of" in change else 64, **change)
        checkpoint.save({"model": model.state_dict(), "model_args": args}, tmp_path / "bad.pt")
        r = run_limited(["export", str(tmp_path / "o.bin"), "--checkpoint", str(tmp_path / "bad.pt")], TORCH_AS)
        one_line_error(r, message)


def _checkpoint_edits(torch) -> dict:
    """name -> (edit of a checkpoint's state dict or model_args, what the error line says)."""
    emb = "tok_embeddings.weight"
    return {
        "int-key": (lambda sd, _: sd.update({5: sd[emb]}), "unexpected tensor 5 for a model of 2 layers"),
        "float8": (lambda sd, _: sd.update({emb: sd[emb].to(torch.float8_e4m3fn)}),
                   f"{emb} is a torch.float8_e4m3fn tensor, not dense"),
        "sparse": (lambda sd, _: sd.update({emb: sd[emb].to_sparse()}), f"{emb} is a torch.sparse_coo torch.float32"),
        "shared-text": (lambda _, args: args.update(shared_classifier="no"),
                        "shared_classifier must be true or false, got 'no'"),
    }


@pytest.mark.parametrize("case", ["int-key", "float8", "sparse", "shared-text"])
def test_checkpoint_tensors_and_args_of_the_wrong_kind_are_one_line(case):
    """A checkpoint's state dict is a user's file: a key that is not a name, a float8 or sparse tensor (which
    the NaN check and loading cannot take) raised AttributeError/NotImplementedError; a model_args
    shared_classifier of "no" read as true."""
    torch = pytest.importorskip("torch")
    from babyllama.model import Transformer
    from babyllama.train import checkpoint

    args = tiny_args(vocab_size=300)
    sd, values = dict(Transformer(args).state_dict()), args.to_dict()
    edit, message = _checkpoint_edits(torch)[case]
    edit(sd, values)
    with pytest.raises(BabyLlamaError) as e:
        checkpoint.model_from({"model": sd, "model_args": values}, "ckpt.pt")
    assert str(e.value).startswith("ckpt.pt: ") and message in str(e.value)


@pytest.mark.parametrize("argv,module,extra", [
    (["train", "--data_dir=x"], "torch", "train"),
    (["data", "train-vocab", "--vocab-size", "300"], "sentencepiece", "train"),
    (["data", "pretokenize", "--tokenizer", "x.bin"], "tqdm", "train"),
])
def test_commands_without_their_extras_name_both_install_commands(argv, module, extra, tmp_path):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from babyllama.cli import main; sys.exit(main(sys.argv[1:]))")
    r = run_limited(argv, TORCH_AS, program=[sys.executable, "-c", code, *argv], cwd=tmp_path)
    line = one_line_error(r, f"pip install 'babyllama[{extra}]'")
    assert f"pip install -e '.[{extra}]'" in line


# ------------------------------------------------------------------------------------------- bounded batches


def test_stream_batch_keeps_at_most_max_slots_live_and_yields_in_order():
    from conftest import assert_greedy_agree

    from babyllama.engine import Engine
    from babyllama.generate import generate, stream_batch
    from babyllama.sampler import Sampler

    e = Engine(random_weights(tiny_args(), scale=0.2))
    prompts = [[1, 5 + i, 9 + 2 * i][: 2 + i % 2] for i in range(11)]
    steps = [6 + (3 * i) % 11 for i in range(11)]
    made = []
    real = e.new_cache

    def spy(n_slots=1, seq_len=None):
        made.append((n_slots, seq_len))
        return real(n_slots, seq_len)

    e.new_cache = spy
    got = list(stream_batch(e, prompts, steps, [Sampler(0.0) for _ in prompts], max_slots=3))
    assert made == [(3, max(steps))]
    assert [i for i, _ in got] == list(range(11))
    for (_, seq), p, n in zip(got, prompts, steps):
        alone = list(generate(e, p, n, Sampler(0.0)))
        assert_greedy_agree(alone, seq.generated, lambda k, p=p, seq=seq: e.forward(
            p + seq.generated[:k], range(len(p) + k), e.new_cache(), logits="last")[0], 1e-2)


def test_caches_and_rope_tables_follow_the_positions_used():
    from babyllama.engine import Engine
    from babyllama.generate import generate
    from babyllama.sampler import Sampler

    e = Engine(random_weights(tiny_args(max_seq_len=4096), scale=0.2))
    assert len(e.cos) == 0
    made = []
    real = e.new_cache
    e.new_cache = lambda n_slots=1, seq_len=None: made.append(seq_len) or real(n_slots, seq_len)
    assert len(list(generate(e, [1, 5], 10, Sampler(0.0)))) <= 9
    assert made == [10] and len(e.cos) < 4096


def test_caches_follow_max_new_tokens_and_a_context_shift_that_never_comes():
    """`run --max-new-tokens N` (-n then the whole context) and `--context-shift -n N` within the context reach
    at most prompt + N positions: the cache and RoPE tables stop there too, as they do for -n, instead of
    spanning the header's context (2**20 positions claimed: 440 MB, where -n 16 takes 43 MB)."""
    from babyllama.engine import Engine
    from babyllama.generate import generate, stream_batch
    from babyllama.sampler import Sampler

    e = Engine(random_weights(tiny_args(max_seq_len=4096), scale=0.2))
    made = []
    real = e.new_cache
    e.new_cache = lambda n_slots=1, seq_len=None: made.append(seq_len) or real(n_slots, seq_len)
    greedy = list(generate(e, [1, 5, 6], 4096, Sampler(0.0), stop_ids=(), max_new=8))
    assert len(greedy) == 8 and made == [10]
    shifted = list(generate(e, [1, 5, 6], 4096, Sampler(0.0), stop_ids=(), max_new=8, context_shift=True))
    assert shifted == greedy and made[1] == 10
    assert len(list(generate(e, [1, 5], 12, Sampler(0.0), stop_ids=(), context_shift=True))) == 11
    assert made[2] == 12
    seqs = [seq for _, seq in stream_batch(e, [[1, 5], [1, 5, 6, 7]], 4096, [Sampler(0.0)] * 2, stop_ids=(),
                                           max_new=8)]
    assert [len(s.generated) for s in seqs] == [8, 8] and made[3] == 11
    assert seqs[1].generated == list(generate(e, [1, 5, 6, 7], 4096, Sampler(0.0), stop_ids=(), max_new=8))
    assert len(e.cos) < 4096


def test_a_cache_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    from babyllama import memory
    from babyllama.engine import KVCache

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(BabyLlamaError, match="KV cache of 4,096 positions x 2 sequence"):
        KVCache(tiny_args(), n_slots=2, seq_len=4096)


def test_a_containers_memory_limit_bounds_allocations_and_reads(tmp_path, monkeypatch):
    """In a container limited to 1 GiB (cgroup v2's memory.max, here on the cgroup above this process's one; v1's
    memory.limit_in_bytes alike)
    physical memory and MemAvailable are the host's: a cache that fits the host but not the container got the
    OOM killer instead of the one-line refusal, and a model file up to a quarter of the host's free memory was
    read into the container's memory instead of mapped."""
    from babyllama import memory
    from babyllama.engine import KVCache

    own = tmp_path / "kubepods" / "pod1"
    own.mkdir(parents=True)
    (own / "memory.max").write_text("max\n")
    (own / "memory.current").write_text(f"{300 << 20}\n")
    (own.parent / "memory.max").write_text(f"{1 << 30}\n")
    (own.parent / "memory.current").write_text(f"{400 << 20}\n")
    (tmp_path / "self").write_text("0::/kubepods/pod1\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(memory, "CGROUP_SELF", tmp_path / "self")
    monkeypatch.setattr(memory, "_physical_bytes", lambda: 64 << 30)
    monkeypatch.setattr(memory, "_address_space_left", lambda: None)
    assert memory.available_bytes() == 1 << 30
    assert memory.memory_free() <= (1 << 30) - (400 << 20)
    assert not memory.read_by_default(300 << 20)  # more than a quarter of what the container has left
    with pytest.raises(BabyLlamaError, match="more than this machine can give"):
        KVCache(tiny_args(max_seq_len=1 << 20, dim=512, n_heads=8, n_kv_heads=8), seq_len=1 << 20)
    (tmp_path / "self").write_text("0::/\n")  # a process whose cgroups set no limit
    assert memory.available_bytes() == 64 << 30
    v1 = tmp_path / "memory"  # cgroup v1 (older hosts): a container sees its cgroup as the hierarchy's root
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{512 << 20}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{100 << 20}\n")
    (tmp_path / "self").write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert memory.available_bytes() == 512 << 20 and memory.memory_free() <= 412 << 20


# ------------------------------------------------------------------------------------------- atomic writes


def test_a_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch, tiny):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")

    def boom(f, a):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "_f32", boom)
    with pytest.raises(BabyLlamaError, match="cannot write output .*m.bin: disk full"):  # one line, not a traceback
        formats.save(formats.load(tiny[0]), target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_two_writers_of_one_target_never_publish_a_mix(tmp_path):
    """Two processes writing one target (a run started twice on one out_dir) shared NAME.tmp: the second's open
    emptied the first's file, the first rename published it, and the first writer went on writing into the
    published file. Each write has its own temporary file: the target is one writer's whole bytes."""
    from babyllama import safeio

    target = tmp_path / "ckpt.pt"
    with safeio.atomic_write(target) as first:
        first.write(b"A" * 1000)
        first.flush()
        with safeio.atomic_write(target) as second:
            second.write(b"B" * 10)
        assert target.read_bytes() == b"B" * 10
        first.write(b"A" * 1000)
    assert target.read_bytes() == b"A" * 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    for longest in ("m" * 251 + ".bin", "é" * 125 + ".bin"):  # 255 bytes: the temporary file's name must fit too
        safeio.write_bytes(tmp_path / longest, b"x")
        assert (tmp_path / longest).read_bytes() == b"x"


def test_a_write_killed_midway_leaves_no_torn_target(tmp_path):
    """SIGKILL while a large model is written: the target is absent (or the old one), never torn."""
    code = ("import sys, numpy as np\nsys.path.insert(0, 'tests')\n"
            "from conftest import random_weights, tiny_args\nfrom babyllama import formats\n"
            "w = random_weights(tiny_args(dim=512, hidden_dim=2048, n_layers=8, vocab_size=4000))\n"
            "print('ready', flush=True)\nwhile True:\n    formats.save(w, sys.argv[1])\n")
    target = tmp_path / "big.bin"
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    if target.exists():  # a complete earlier write: it must load
        formats.load(target)


def test_chat_with_a_huge_header_seq_len_starts_with_a_small_cache(tmp_path):
    """chat sizes nothing by -n: its cache (a Batch's sized by the model's context) starts small and grows with
    the conversation, so a model whose header declares 2**24 positions (an 8 GiB cache whole) chats in 1 GiB of
    address space."""
    args = tiny_args(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, hidden_dim=64, max_seq_len=1 << 24)
    formats.save(random_weights(args), tmp_path / "m.bin")
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    r = run_limited(["chat", str(tmp_path / "m.bin"), "-n", "8", "-t", "0", "-y", ""], GIB, stdin=b"hi\nmore\n")
    ok(r)
    assert r.stdout.count(b"Assistant: ") == 2
    from babyllama.engine import Engine
    from babyllama.generate import Batch

    assert Batch(Engine(random_weights(args)), 4).cache.seq_len < 1 << 24


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    """Ctrl-C (KeyboardInterrupt) or an error inside a write removes its temporary file; the old target stays."""
    from babyllama import safeio

    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    for stop in (KeyboardInterrupt, ValueError):
        with pytest.raises(stop), safeio.atomic_write(target) as f:
            f.write(b"new")
            raise stop()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_temporary_file_a_kill_left_is_swept_by_the_next_write_once_its_writer_is_gone(tmp_path):
    """SIGKILL mid-write leaves NAME.PID.XXXXXXXX.tmp; the next write of NAME removes it once no process of that
    pid lives and the file is a minute old, and leaves alone a live writer's file, a recent one (a writer on
    another machine looks dead from here), other targets' files, and names not of the pattern."""
    import subprocess

    from babyllama import safeio

    code = ("import sys, time\nfrom babyllama import safeio\n"
            "with safeio.atomic_write(sys.argv[1]) as f:\n"
            "    f.write(b'x' * 1000)\n    f.flush()\n    print('ready', flush=True)\n    time.sleep(60)\n")
    target = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    proc.kill()
    proc.wait()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(f"ckpt.pt.{proc.pid}.") and left.name.endswith(".tmp")
    old = time.time() - 2 * safeio.STALE_TEMP_AGE
    dead = proc.pid
    keep = [f"ckpt.pt.{os.getpid()}.abcdefgh.tmp", f"ckpt.pt.{os.getppid()}.abcdefgh.tmp",  # live writers
            f"other.pt.{dead}.abcdefgh.tmp", f"ckpt.pt.5.{dead}.abcdefgh.tmp",  # other targets' (ckpt.pt.5)
            "ckpt.pt.abcdefgh.tmp", f"ckpt.pt.{dead}.abc.tmp", "ckpt.pt.tmp"]  # not this pattern
    for name in keep:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / f"ckpt.pt.{dead}.zzzzzzzz.tmp").write_bytes(b"recent")  # changed just now: left for now
    (tmp_path / f"ckpt.pt.{dead}.folder00.tmp").mkdir()
    os.utime(left, (old, old))
    safeio.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        keep + ["ckpt.pt", f"ckpt.pt.{dead}.zzzzzzzz.tmp", f"ckpt.pt.{dead}.folder00.tmp"])


def test_a_library_build_killed_outright_leaves_no_temporary_file_for_good(tmp_path):
    """A first run killed mid-compile (SIGKILL) leaves its temporary library; a later run that finds the cached
    library intact sweeps it (only builds swept, and a library once built is never built again)."""
    from babyllama import kernels_native, safeio

    cached = kernels_native.build()  # the library this process uses (built once, cached), copied into tmp_path
    if cached is None:
        pytest.skip("the C kernels do not build here")
    lib = tmp_path / cached.name
    shutil.copy(cached, lib)
    shutil.copy(kernels_native.fingerprint_path(cached), kernels_native.fingerprint_path(lib))
    stale = tmp_path / f"{lib.name}.4000000.abcdefgh.tmp"  # a pid no process has here
    stale.write_bytes(b"\x7fELF half a library")
    old = time.time() - 2 * safeio.STALE_TEMP_AGE
    os.utime(stale, (old, old))
    assert kernels_native.build(tmp_path) == lib
    assert not stale.exists()


def test_where_pids_cannot_be_probed_no_temporary_file_is_swept(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) terminates the process instead of asking about it: there no pid is probed and
    nothing is swept."""
    from babyllama import safeio

    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig})")

    monkeypatch.setattr(safeio, "_CAN_PROBE_PIDS", False)
    monkeypatch.setattr(os, "kill", kill)
    stale = tmp_path / "ckpt.pt.4000000.abcdefgh.tmp"
    stale.write_bytes(b"")
    old = time.time() - 2 * safeio.STALE_TEMP_AGE
    os.utime(stale, (old, old))
    safeio.write_bytes(tmp_path / "ckpt.pt", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", stale.name]


def test_sigterm_unwinds_a_command_as_ctrl_c_does(tmp_path, monkeypatch):
    """SIGTERM ended a command where it stood: an export's temporary file of up to the whole model stayed, a first
    run's compiler went on in the background and left its library behind. It now unwinds the command (whatever
    `finally` and `except BaseException` clean up runs) and the process exits with 143; train and finetune, whose
    torchrun agent stops workers with it, keep the default."""
    import signal

    from babyllama import safeio
    from babyllama.cli import main

    model = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args()), model)
    synced = safeio._synced

    def terminated_while_writing(*args, **kw):  # the model's bytes go to disk before it is renamed into place
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode: never reached in full
        return synced(*args, **kw)

    monkeypatch.setattr(safeio, "_synced", terminated_while_writing)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "out.bin"), "--model", str(model)])
    assert exit_info.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]  # no temporary file left
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was for the command only
