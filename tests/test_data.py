"""`babyllama data`: download (against a local HTTP server), input formats, pretokenized shards, and the
training commands' answers to user mistakes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

pytest.importorskip("tqdm")

from conftest import byte_tokenizer, run_cli  # noqa: E402

from babyllama.cli import main  # noqa: E402
from babyllama.errors import BabyLlamaError  # noqa: E402
from babyllama.tokenizer import BOS  # noqa: E402
from babyllama.train.data import Windows, pretokenize, read_documents, split_arrays  # noqa: E402

STORIES = [f"Story {i}: the cat sat on mat number {i}.\nThen it slept." for i in range(300)]


@pytest.fixture
def archive() -> bytes:
    """A TinyStories-shaped .tar.gz: TinyStories_all_data/data0N.json lists of {"story": ...}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n in range(2):
            body = json.dumps([{"story": s, "source": "test"} for s in STORIES[n::2]]).encode()
            info = tarfile.TarInfo(f"data0{n}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def url_of(server) -> str:
    return server.url("TinyStories_all_data.tar.gz")


def test_download_resumes_verifies_and_unpacks(tmp_path, archive, serve):
    sha = hashlib.sha256(archive).hexdigest()
    server = serve(archive, advertised=sha)
    data = tmp_path / "data"
    data.mkdir()
    (data / "TinyStories_all_data.tar.gz.part").write_bytes(archive[:1000])  # an interrupted download
    proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr.decode()
    assert server.ranges == ["bytes=1000-"]  # continued, not restarted
    assert (data / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert f"sha256 ok ({sha})".encode() in proc.stderr  # checked against the server's advertised digest
    unpacked = data / "TinyStories_all_data"
    assert sorted(p.name for p in unpacked.iterdir()) == ["data00.json", "data01.json"]

    # the unpacked TinyStories layout pretokenizes as is (here with a tokenizer.bin, not a .model)
    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    meta = pretokenize(unpacked, tmp_path / "tok.bin", tmp_path / "shards", workers=2, batch_docs=16)
    assert meta["shards"] == {"train": ["data00.bin", "data01.bin"], "val": []}
    shard = np.fromfile(tmp_path / "shards" / "data01.bin", dtype=np.uint16)
    assert shard.tolist() == [t for s in STORIES[1::2] for t in tok.encode(s, bos=True)]
    assert (tmp_path / "shards" / "tokenizer.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()


def test_download_rejects_a_wrong_checksum(tmp_path, archive, serve):
    server = serve(archive, advertised="0" * 64)
    for extra in ([], ["--sha256", "1" * 64]):  # the server's digest, or the user's
        proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", str(tmp_path), *extra)
        assert proc.returncode == 1
        err = proc.stderr.decode().strip().splitlines()[-1]
        assert err.startswith("babyllama: error: checksum mismatch for TinyStories_all_data.tar.gz")
        assert not (tmp_path / "TinyStories_all_data.tar.gz").exists()  # never mistaken for a good download
        assert not (tmp_path / "TinyStories_all_data").exists()


def test_download_reports_an_unreachable_server(tmp_path, serve):
    server = serve(b"")
    url = url_of(server).replace("/TinyStories", "/missing/TinyStories")
    server.shutdown()
    server.server_close()
    proc = run_cli("data", "download", "--url", url, "--data-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1].startswith("babyllama: error: download failed")


# ------------------------------------------------------------------------------------------------ inputs


def test_input_formats_and_splits(tmp_path):
    src = tmp_path / "mine"
    (src / "more").mkdir(parents=True)
    (src / "a.jsonl").write_text('{"text": "first doc"}\n\n"second doc"\n{"story": "  third doc  "}\n')
    (src / "more" / "b.json").write_text(json.dumps(["x y", {"text": "z"}]))
    (src / "book.txt").write_text("A whole book.\n\nWith paragraphs.\n")  # no separators: one document
    (src / "val.txt").write_text("v1\n<|endoftext|>\nv2\n<|endoftext|>\n")
    (src / "ignored.csv").write_text("not read")
    assert list(read_documents(src / "a.jsonl")) == ["first doc", "second doc", "third doc"]
    assert list(read_documents(src / "book.txt")) == ["A whole book.\n\nWith paragraphs."]
    assert list(read_documents(src / "val.txt")) == ["v1", "v2"]

    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1)
    assert meta["shards"] == {"train": ["a.bin", "book.bin", "more_b.bin"], "val": ["val.bin"]}
    assert meta["vocab_size"] == 300 and meta["tokens"] == sum(
        len(tok.encode(d)) for f in ("a.jsonl", "book.txt", "more/b.json", "val.txt") for d in read_documents(src / f))
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert val.tolist() == tok.encode("v1") + tok.encode("v2") and (val == BOS).sum() == 2


def test_windows_are_next_token_pairs(tmp_path):
    torch = pytest.importorskip("torch")
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    # a lone shard without a validation shard: its last 10% is held out
    train, val = split_arrays(tmp_path, "train"), split_arrays(tmp_path, "val")
    assert [len(a) for a in train] == [900] and val[0][0] == 900
    w = Windows(train, 16, "test")
    x, y, _ = w.batch(w.draw(32, torch.Generator().manual_seed(0)), torch.device("cpu"))
    assert x.shape == y.shape == (32, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(y.max()) < 900  # never reads the held-out tokens
    with pytest.raises(BabyLlamaError, match="not enough tokens"):
        Windows(val, 200, "val")


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(BabyLlamaError, match=r"bad.jsonl: 1 malformed line: line 2: expected"):
        list(read_documents(bad))
    (tmp_path / "broken.json").write_text("[1, 2")
    with pytest.raises(BabyLlamaError, match="invalid JSON"):
        list(read_documents(tmp_path / "broken.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BabyLlamaError, match="no .txt, .jsonl, .json files"):
        pretokenize(tmp_path / "empty", "x", tmp_path / "o")


@pytest.mark.parametrize("argv,message", [
    (["data", "pretokenize", "--input", "."], "give --vocab-size N"),
    (["data", "pretokenize", "--vocab-size", "999", "--data-dir", "nowhere"], "nowhere/tok999.model not found"),
    (["data", "train-vocab", "--vocab-size", "100"], "--vocab-size must be in 260..65536"),
    (["data", "train-vocab", "--vocab-size", "512", "--input", "missing"], "input not found: missing"),
    (["train"], "set --data_dir"),
    (["train", "--dim=abc"], "dim must be int, got 'abc'"),
    (["train", "--compile=maybe"], "compile must be true or false"),
    (["train", "--dtype=float8"], "dtype must be auto, float32, bfloat16 or float16"),
    (["train", "nope.toml"], "config file not found: nope.toml"),
    (["train", "--init_from=resume", "--out_dir=empty"], "checkpoint not found: empty/ckpt.pt"),
    (["train", "--data_dir=empty"], "empty: no token shards"),
    (["sample", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["export", "o.bin", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["export", "o.bin", "--checkpoint", "cfg.toml"], "cannot read checkpoint cfg.toml"),
    (["export-tokenizer", "missing.model"], "sentencepiece model not found: missing.model"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40])
def test_training_commands_answer_mistakes_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    if argv[0] in ("train", "sample", "export"):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfg.toml").write_text("dim = 64\n")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("babyllama: error: ") and message in err[-1], err


def test_config_file_rejects_unknown_keys_and_wrong_types(tmp_path):
    pytest.importorskip("torch")
    from babyllama.train.config import build_config

    (tmp_path / "a.toml").write_text("dim = 64\nbatch_sise = 3\n")
    with pytest.raises(BabyLlamaError, match="unknown config key 'batch_sise'"):
        build_config(tmp_path / "a.toml")
    (tmp_path / "b.json").write_text('{"dim": "big"}')
    with pytest.raises(BabyLlamaError, match="dim must be int"):
        build_config(tmp_path / "b.json")
    (tmp_path / "c.toml").write_text('dim = 64\nlearning_rate = 1\ncompile = true\n')
    cfg = build_config(tmp_path / "c.toml", {"dim": "96", "max_iters": "2e3"})
    assert (cfg.dim, cfg.learning_rate, cfg.compile, cfg.max_iters) == (96, 1.0, True, 2000)
