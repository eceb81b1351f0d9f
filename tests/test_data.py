"""`babyllama data`: download (against a local HTTP server), input formats, pretokenized shards, and the
training commands' answers to user mistakes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tqdm")

from conftest import byte_tokenizer, cli_error, run_cli  # noqa: E402

from babyllama.cli import main  # noqa: E402
from babyllama.errors import BabyLlamaError  # noqa: E402
from babyllama.tokenizer import BOS  # noqa: E402
from babyllama.train.data import Windows, pretokenize, read_documents, read_meta, split_arrays  # noqa: E402

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


def test_pretokenize_reads_what_download_unpacked_into_the_same_data_dir(tmp_path, archive, serve):
    """The default --input follows --data-dir (it stayed data/TinyStories_all_data, so `download --data-dir
    mine` then `pretokenize --data-dir mine` said to run download first); an archive's folder is its name less
    the whole archive suffix (.tar.xz gave NAME.tar), and a URL ending in / names no host:port file."""
    pytest.importorskip("tqdm")
    server = serve(archive)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", "mine", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    proc = run_cli("data", "pretokenize", "--tokenizer", "tok.bin", "--data-dir", "mine", "--workers", "1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_meta(tmp_path / "mine" / "tokenizer")["shards"]["train"] == ["data00.bin", "data01.bin"]
    # a name with no archive suffix was saved under the name its folder then needed ("is not a directory")
    for name, folder in (("ts.tar.xz", "ts"), ("ts.tgz", "ts"), ("", "download"), ("stories", "stories_unpacked")):
        proc = run_cli("data", "download", "--url", server.url(name), "--data-dir", "other", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == f"unpacked into {Path('other') / folder}"


def test_download_rejects_a_wrong_checksum(tmp_path, archive, serve):
    server = serve(archive, advertised="0" * 64)
    for extra in ([], ["--sha256", "1" * 64]):  # the server's digest, or the user's
        proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", str(tmp_path), *extra)
        assert proc.returncode == 1
        err = proc.stderr.decode().strip().splitlines()[-1]
        assert err.startswith("babyllama: error: checksum mismatch for TinyStories_all_data.tar.gz")
        assert not (tmp_path / "TinyStories_all_data.tar.gz").exists()  # never mistaken for a good download
        assert not (tmp_path / "TinyStories_all_data").exists()


def test_a_wrong_sha256_for_an_archive_downloaded_before_leaves_it(tmp_path, archive, serve):
    """A typo in --sha256 moved a good archive (gigabytes, for TinyStories) aside as .corrupt, to be downloaded
    again; a file that was there before is now left as it is, and the right pin takes it."""
    server = serve(archive)
    assert run_cli("data", "download", "--url", url_of(server), "--data-dir", str(tmp_path)).returncode == 0
    proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", str(tmp_path), "--sha256", "a" * 64)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()[-1]
    assert err.startswith("babyllama: error: checksum mismatch for TinyStories_all_data.tar.gz, downloaded before")
    assert (tmp_path / "TinyStories_all_data.tar.gz").read_bytes() == archive
    sha = hashlib.sha256(archive).hexdigest()
    proc = run_cli("data", "download", "--url", url_of(server), "--data-dir", str(tmp_path), "--sha256", sha)
    assert proc.returncode == 0 and f"sha256 ok ({sha})".encode() in proc.stderr


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
    for name in ("a.jsonl", "more/b.json", "book.txt"):  # the progress a reader reports adds up to the file
        reported: list[int] = []
        docs = list(read_documents(src / name, on_bytes=reported.append))
        assert sum(reported) == (src / name).stat().st_size, (name, reported)
        if name != "book.txt":  # a file read whole reports a share as each document is handed on
            assert len(reported) == len(docs), (name, reported)

    tok = byte_tokenizer(300)
    tok.save(tmp_path / "tok.bin")
    meta = pretokenize(src, tmp_path / "tok.bin", tmp_path / "out", workers=1)
    assert meta["shards"] == {"train": ["a.bin", "book.bin", "more_b.bin"], "val": ["val.bin"]}
    assert meta["vocab_size"] == 300 and meta["tokens"] == sum(
        len(tok.encode(d)) for f in ("a.jsonl", "book.txt", "more/b.json", "val.txt") for d in read_documents(src / f))
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert val.tolist() == tok.encode("v1") + tok.encode("v2") and (val == BOS).sum() == 2


@pytest.mark.parametrize("size, message", [(0, "train.bin: the token shard is empty"),
                                           (7, "train.bin: 7 bytes is not a whole number of uint16 tokens")])
def test_a_torn_token_shard_is_refused_saying_what_is_wrong(tmp_path, size, message):
    (tmp_path / "train.bin").write_bytes(b"\x01" * size)
    with pytest.raises(BabyLlamaError, match=message):
        split_arrays(tmp_path, "train")


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


def test_pretokenize_needs_a_vocabulary_and_its_usage_says_so(capsys):
    """--vocab-size or --tokenizer is required: the usage line marks the pair so, and leaving both out is a usage
    error (exit 2), as eval's --data | --instruct."""
    from babyllama.cli import main

    with pytest.raises(SystemExit):
        main(["data", "pretokenize", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "(--vocab-size VOCAB_SIZE | --tokenizer TOKENIZER)" in " ".join(usage.split())
    assert "one of the arguments --vocab-size/--vocab_size --tokenizer is required" in cli_error(
        capsys, "data", "pretokenize", "--input", ".", code=2)


@pytest.mark.parametrize("argv,message", [
    (["data", "pretokenize", "--vocab-size", "999", "--data-dir", "nowhere"], "nowhere/tok999.model not found"),
    (["data", "train-vocab", "--vocab-size", "100", "--input", "."], "--vocab-size must be in 260..65536"),
    (["data", "train-vocab", "--vocab-size", "512", "--input", "missing"], "input not found: missing"),
    (["train"], "set --data_dir"),
    (["train", "--out_dir="], "out_dir must name a folder, got ''"),
    (["train", "--lr_decay_iters=-1"], "lr_decay_iters must be >= 0, got -1"),
    (["train", "--warmup_iters=50", "--lr_decay_iters=20"], "warmup_iters 50 is beyond lr_decay_iters 20"),
    (["train", "--min_lr=1e-3"], "min_lr 0.001 is above learning_rate 0.0005"),
    (["finetune"], "finetune needs a base model: --base=MODEL (checkpoint, .bin, .gguf), --hf DIR or --meta-llama"),
    (["finetune", "--data_dir=d"], "finetune needs a base model: --base=MODEL"),
    (["finetune", "--base=m.bin", "--data=d.txt", "--learning_rate=5e-5", "--min_lr=1e-4"],
     "min_lr 0.0001 is above learning_rate 5e-05"),
    (["train", "--vocab_size=-1"], "vocab_size must be >= 0, got -1"),
    (["train", "--max_seq_len=0"], "max_seq_len must be positive, got 0"),  # (0 is the base's in finetune only)
    (["finetune", "--base=m.bin", "--data=d.txt", "--max_seq_len=-1"],
     "max_seq_len must be >= 0 (0: the base model's), got -1"),
    (["train", "--kd_temperature=nan"], "kd_temperature must be positive and finite, got nan"),
    (["train", "--peak_flops=-1"], "peak_flops must be a finite number >= 0 (0: known GPUs'), got -1.0"),
    (["train", "--seed=99999999999999999999"], "seed must be in [0, 2**63), got 99999999999999999999"),
    (["train", "--seed=-1"], "seed must be in [0, 2**63), got -1"),
    (["train", "--batch_size=99999999999999999999"], "batch_size must be below 2**31, got 99999999999999999999"),
    (["train", "--eval_iters=2147483648"], "eval_iters must be below 2**31, got 2147483648"),
    (["train", "--dtype=float8"], "dtype must be auto, float32, bfloat16 or float16"),
    (["train", "nope.toml"], "config file not found: nope.toml"),
    (["train", "--init_from=resume", "--out_dir=empty"], "checkpoint not found: empty/ckpt.pt"),
    (["train", "--data_dir=empty"], "empty: no token shards"),
    (["train", "--data_dir=cfg.toml"], "data_dir cfg.toml is a file: give the folder that holds the shards (.)"),
    (["train", "--device=cpu", "--out_dir=cfg.toml/run"],
     "cannot write run folder (out_dir) cfg.toml/run: cfg.toml is not a directory"),
    (["sample", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["sample"], "checkpoint not found: out/ckpt.pt"),  # sample.py's default, train's default out_dir
    (["export", "o.bin", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
    (["export", "o.bin", "--checkpoint", "cfg.toml"], "cannot read checkpoint cfg.toml"),
    (["export-tokenizer", "missing.model"], "sentencepiece model not found: missing.model"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40])
def test_training_commands_answer_mistakes_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    if argv[0] in ("train", "finetune", "sample", "export"):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfg.toml").write_text("dim = 64\n")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("babyllama: error: ") and message in err[-1], err


@pytest.mark.parametrize("argv", [["data", "train-vocab", "--vocab-size", "512"],
                                  ["data", "pretokenize", "--tokenizer", "tok.bin"], ["data", "instruct"]],
                         ids=lambda argv: argv[1])
def test_a_missing_default_input_says_to_download_it(argv, tmp_path, monkeypatch, capsys):
    """training.md's walk-through starts with `babyllama data download`; without it the default --input,
    DATA_DIR/TinyStories_all_data (data/ for instruct, which has no --data-dir), is absent, and the error says
    how to get it."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("tqdm")
    monkeypatch.chdir(tmp_path)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    for data_dir in ([], ["--data-dir", "mine"]) if argv[1] != "instruct" else ([],):
        assert main(argv + data_dir) == 1
        folder = Path(data_dir[1] if data_dir else "data") / "TinyStories_all_data"
        assert capsys.readouterr().err.strip() == (f"babyllama: error: input not found: {folder} (the default "
                                                   "--input): run `babyllama data download` first, or give "
                                                   "--input FILE_OR_FOLDER")


@pytest.mark.parametrize("argv,message", [
    (["train", "--dim=abc"], "argument --dim: dim must be int, got 'abc'"),
    (["train", "--max_iters=2.5e0"], "max_iters must be int, got '2.5e0'"),
    (["train", "--batch_size=1e400"], "batch_size must be int, got '1e400'"),
    (["train", "--compile=maybe"], "argument --compile: compile must be true or false, got 'maybe'"),
    # a bare boolean flag before the config file takes its name as the value: said how to write it
    (["train", "--eval_only", "run.toml"], "eval_only must be true or false, got 'run.toml' (a bare --eval_only takes "
                                           "the word after it as its value: write --eval_only=true, or put that word "
                                           "first)"),
    (["finetune", "--lora-rank", "x"], "lora_rank must be int, got 'x'"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_training_flag_whose_value_does_not_parse_is_a_usage_error(argv, message, capsys):
    """As for every other command's flags (README: exit 2 when the command line does not parse)."""
    assert message in cli_error(capsys, *argv, code=2)


@pytest.mark.parametrize("command, module", [("train", "matplotlib"), ("finetune", "torch")])
def test_training_without_a_package_of_the_train_extra_is_one_line(tmp_path, capsys, monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # not installed
    assert main([command, f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--base=x.bin"
                 if command == "finetune" else "--max_iters=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"babyllama: error: {command} needs babyllama's 'train' extra: pip install torch==2.13.0 && "
                   "pip install 'babyllama[train]' (in a source checkout: pip install torch==2.13.0 && pip install "
                   "-e '.[train]')"]
    assert not (tmp_path / "out").exists()


def test_config_file_rejects_unknown_keys_and_wrong_types(tmp_path):
    pytest.importorskip("torch")
    from babyllama.train.config import build_config

    (tmp_path / "a.toml").write_text("dim = 64\nbatch_sise = 3\n")
    with pytest.raises(BabyLlamaError, match="unknown config key 'batch_sise'"):
        build_config(tmp_path / "a.toml")
    (tmp_path / "b.json").write_text('{"dim": "big"}')
    with pytest.raises(BabyLlamaError, match="dim must be int"):
        build_config(tmp_path / "b.json")
    for name, body in (("bom.toml", "dim = 72\n"), ("bom.json", '{"dim": 72}')):  # as Windows editors save them
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert build_config(tmp_path / name).dim == 72
    (tmp_path / "c.toml").write_text('dim = 64\nlearning_rate = 1\ncompile = true\n')
    cfg = build_config(tmp_path / "c.toml", {"dim": "96", "max_iters": "2e3"})
    assert (cfg.dim, cfg.learning_rate, cfg.compile, cfg.max_iters) == (96, 1.0, True, 2000)


# ------------------------------------------------------------------------------------------------ outputs


@pytest.fixture
def tok300(tmp_path):
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    return tmp_path / "tok.bin"


@pytest.mark.parametrize("text", ["", "<|endoftext|>\n\n<|endoftext|>\n"], ids=["empty", "separators"])
def test_pretokenize_refuses_input_without_documents_before_writing(tmp_path, capsys, tok300, text):
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "shards"
    msg = cli_error(capsys, "data", "pretokenize", "--tokenizer", str(tok300), "--input", str(tmp_path / "in.txt"),
                    "--out-dir", str(out))
    assert "in.txt: no documents to pretokenize" in msg and not out.exists()


@pytest.mark.parametrize("flag", [["--word-weight", "3"], ["--max-seq-len", "64"]])
def test_pretokenize_refuses_chat_flags_on_plain_text(tmp_path, capsys, tok300, flag):
    (tmp_path / "in.txt").write_text("A story.")
    msg = cli_error(capsys, "data", "pretokenize", "--tokenizer", str(tok300), "--input", str(tmp_path / "in.txt"),
                    "--out-dir", str(tmp_path / "shards"), *flag)
    assert msg.endswith(f"--word-weight and --max-seq-len apply to chat records (.jsonl conversations); "
                        f"{tmp_path / 'in.txt'} holds plain text")
    assert not (tmp_path / "shards").exists()


def test_pretokenize_writes_no_shard_for_a_file_without_documents(tmp_path, tok300):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    (tmp_path / "in" / "b.txt").write_text("")
    meta = pretokenize(tmp_path / "in", tok300, tmp_path / "shards", workers=1)
    assert meta["shards"] == {"train": ["a.bin"], "val": []}


def test_shards_written_inside_the_input_folder_are_not_read_as_input(tmp_path, tok300):
    """`--input data` beside `--data-dir data`: the shard folder's meta.json is output, not a .json of stories."""
    pytest.importorskip("sentencepiece")
    from babyllama.train.vocab import train_vocab

    data = tmp_path / "data"
    data.mkdir()
    (data / "stories.txt").write_text("A story about a cat.\n<|endoftext|>\nA story about a dog.\n")
    for _ in range(2):
        meta = pretokenize(data, tok300, data / "tok", workers=1)
        assert meta["shards"] == {"train": ["stories.bin"], "val": []}
    train_vocab(data, 280, data)
    assert (data / "tok280.model").is_file()


@contextlib.contextmanager
def disk_full_at(monkeypatch, name: str):
    """Writing the file `name` fails as on a full disk (safeio.atomic_write, which every shard goes through)."""
    import errno

    from babyllama import safeio

    real = safeio.atomic_write

    def full(path, *args, **kwargs):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(safeio, "atomic_write", full)
        yield


def test_pretokenize_progress_adds_up_to_the_input_in_whole_bytes(tmp_path, tok300, monkeypatch):
    """The bar moved by a float share per document, whose sum overshot the total (tqdm warned, on the terminal,
    that it clamped the fraction)."""
    from conftest import recording_bar

    from babyllama.train import data as data_module

    events: list[int] = []
    monkeypatch.setattr(data_module, "progress_bar", recording_bar(events))
    (tmp_path / "in").mkdir()
    for i, n in enumerate((7, 3, 11)):
        stories = (f"story {k} " * (k % 5 + 1) for k in range(n))
        (tmp_path / "in" / f"{i}.txt").write_text("\n<|endoftext|>\n".join(stories))
    pretokenize(tmp_path / "in", tok300, tmp_path / "out", workers=1, batch_docs=2)
    total = sum(f.stat().st_size for f in (tmp_path / "in").iterdir())
    assert events[0] == -total and all(isinstance(n, int) for n in events) and sum(events[1:]) == total


def test_pretokenize_stopped_midway_leaves_no_earlier_meta_json(tmp_path, tok300, monkeypatch):
    """A new run replaces shards one by one: the earlier run's meta.json must not describe a mix of both (here
    the second shard's write fails, as on a full disk)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    (tmp_path / "in" / "b.txt").write_text("Another story.")
    meta = pretokenize(tmp_path / "in", tok300, tmp_path / "shards", workers=1)
    assert meta["shards"] == {"train": ["a.bin", "b.bin"], "val": []}
    with pytest.raises(OSError), disk_full_at(monkeypatch, "b.bin"):
        pretokenize(tmp_path / "in", tok300, tmp_path / "shards", workers=1, say_unfinished=False)
    assert not (tmp_path / "shards" / "meta.json").exists()
    assert (tmp_path / "shards" / "pretokenize.incomplete").exists()


def test_a_batch_sent_to_a_worker_fits_a_pipe_s_buffer():
    """Each batch of documents pickles to less than a Linux pipe's 64 KiB, at most max_count documents, in order;
    a document too long for any batch goes alone."""
    import pickle

    from babyllama.train.data import batched

    rng = np.random.default_rng(0)
    docs = ["é" * int(n) for n in rng.integers(1, 4000, 300)] + ["😀" * 20000, "short"]
    batches = batched(docs, 256)
    assert [d for b in batches for d in b] == docs
    for b in batches:
        assert len(b) <= 256 and (len(pickle.dumps(b)) < 64 << 10 or len(b) == 1)
    assert ["😀" * 20000] in batches
    assert [len(b) for b in batched(["a"] * 600, 256)] == [256, 256, 88]


WORKERS_KILLED_WHILE_IDLE = """
import os, signal, time
from babyllama.errors import BabyLlamaError
from babyllama.train.data import _worker_pool
try:
    with _worker_pool(2, time.sleep, 0) as pool:
        assert list(pool.imap(abs, [-1, -2, -3])) == [1, 2, 3]  # both workers started, now idle
        for p in pool.procs:  # what SIGTERM to the whole process group does to them
            os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        raise KeyboardInterrupt  # the parent's own interruption: the pool ends
except KeyboardInterrupt:
    print("ended")
with _worker_pool(2, time.sleep, 0) as pool:
    os.kill(pool.procs[1].pid, signal.SIGKILL)  # a worker that dies (the OOM killer) is an error, not a hang
    try:
        list(pool.imap(abs, range(10)))
    except BabyLlamaError as e:
        print(e)
"""


def test_the_worker_pool_ends_after_its_workers_got_sigterm():
    """multiprocessing.Pool's workers, killed while one waited for work holding the shared queue's lock, left
    Pool.terminate waiting for that lock forever (pretokenize under `timeout` or `kill -TERM -PGID` hung): the
    workers share nothing, and one that dies is an error."""
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-c", WORKERS_KILLED_WHILE_IDLE], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the pool did not end within 60 s after its workers were killed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ended", "a worker process ended unexpectedly (killed by SIGKILL, out of "
                                                 "memory?)"], done.stdout
    assert "Traceback" not in done.stderr, done.stderr


POOL_CHECKS = """
import multiprocessing, sys, time
from babyllama.errors import BabyLlamaError
from babyllama.train.data import _worker_pool, pretokenize


def grow(item):
    payload, size, delay = item
    time.sleep(delay)
    return payload[:1] * size


def deep_failure(n):
    if n == 3:
        raise IndexError(f"item {n} fails")
    return n


class TwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def odd_failure(n):
    raise TwoArguments(1, 2)


if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    sizes = [(8 << 20, 0.0), (10, 0.2), (3 << 20, 0.0), (5, 0.05), (1 << 20, 0.1), (7, 0.0)]
    big = b"y" * (4 << 20)
    with _worker_pool(2, int) as pool:  # in order whatever order the workers finish in
        assert [len(r) for r in pool.imap(grow, [(b"x", s, d) for s, d in sizes])] == [s for s, _ in sizes]
        assert list(pool.imap(grow, [(big, len(big), 0.0)] * 6)) == [big] * 6  # 4 MB each way
    try:
        with _worker_pool(2, int) as pool:
            list(pool.imap(deep_failure, range(6)))
    except IndexError as e:  # the worker's exception, its traceback text as the cause
        assert str(e) == "item 3 fails" and "deep_failure" in str(e.__cause__), e.__cause__
    try:
        with _worker_pool(2, int) as pool:
            list(pool.imap(odd_failure, range(2)))
    except RuntimeError as e:  # pickles, but cannot be rebuilt: named
        assert str(e) == "TwoArguments in a worker process" and "1 and 2" in str(e.__cause__), e
    with _worker_pool(2, int) as pool:  # a loop left early: the workers still busy are killed, not waited for
        for r in pool.imap(grow, [(b"z", 1 << 20, 0.0)] * 5):
            break
    assert all(p._closed for p in pool.procs)
    pretokenize(sys.argv[2], sys.argv[3], sys.argv[4], workers=2)
    print("ok")
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_the_worker_pool_in_every_start_method(tmp_path, tok300, method):
    """Results in order; items and results far larger than a pipe's buffer; a worker's exception raised in the
    parent with the worker's traceback, or, where it cannot be rebuilt, named; a loop left early ends at once;
    pretokenize as a whole. Under forkserver (Python 3.14's default on Linux) a worker's parent is the
    forkserver: every worker took that for its parent's end and quit."""
    import subprocess

    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    (tmp_path / "checks.py").write_text(POOL_CHECKS)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.\n\nAnother one, a little longer.\n" * 50)
    try:
        done = subprocess.run([sys.executable, str(tmp_path / "checks.py"), method, str(tmp_path / "in"),
                               str(tok300), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker pool ({method}) did not finish within 120 s")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["tokens"] > 0


def test_a_bad_input_file_stops_pretokenize_before_the_folder_changes(tmp_path, tok300):
    """Every text file is read before a shard is written: a later file that is not UTF-8 leaves an earlier run's
    complete folder as it was (its meta.json, its shards), not half replaced and marked unfinished."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    (tmp_path / "in" / "b.txt").write_text("Another story.")
    pretokenize(tmp_path / "in", tok300, tmp_path / "shards", workers=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    (tmp_path / "in" / "a.txt").write_text("A new story, which must not be written.")
    (tmp_path / "in" / "b.txt").write_bytes(b"not \xff UTF-8")
    with pytest.raises(BabyLlamaError, match="b.txt:1: not UTF-8 text"):
        pretokenize(tmp_path / "in", tok300, tmp_path / "shards", workers=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == before


def test_a_folder_name_that_is_not_utf8_is_reported_as_its_bytes(tmp_path, tok300):
    """A UTF-8 locale's stdout is strict: the report naming a Latin-1 output folder (bytes Python keeps as lone
    surrogates) was a UnicodeEncodeError after the shards were written; it prints the name's own bytes."""
    if sys.platform != "linux":
        pytest.skip("file names of any bytes are Linux's (macOS and Windows store Unicode names)")
    (tmp_path / "in.txt").write_text("A story about a cat.\n")
    out = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")
    r = run_cli("data", "pretokenize", "--tokenizer", str(tok300), "--input", str(tmp_path / "in.txt"),
                "--out-dir", out, "--workers", "1", env={"PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout.rstrip().endswith(b"/caf\xe9")


def test_pretokenize_stopped_by_an_error_ends_stderr_with_the_error_line(tmp_path, tok300):
    """The progress bar was closed only at exit, after the error line; it closes as the error leaves, and a bar is
    drawn only on a terminal (progress_bar, as eval and download draw theirs)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    (tmp_path / "in" / "b.txt").write_bytes(b"not \xff UTF-8")
    r = run_cli("data", "pretokenize", "--tokenizer", str(tok300), "--input", str(tmp_path / "in"), "--out-dir",
                str(tmp_path / "shards"), "--workers", "1")
    assert r.returncode == 1
    assert r.stderr.decode().splitlines() == [f"babyllama: error: {tmp_path / 'in' / 'b.txt'}:1: not UTF-8 text"]


def test_a_second_pretokenize_into_a_folder_in_use_is_refused(tmp_path, tok300):
    """Two pretokenize runs into one folder mixed their shards under the last one's meta.json (and the first to end
    removed the unfinished mark while the other still wrote): a folder another process writes is refused. One
    this process holds (a fine-tune pretokenizing into its own run folder) is not."""
    from conftest import folder_held_elsewhere

    from babyllama import safeio

    (tmp_path / "in.txt").write_text("A story.")
    shards = tmp_path / "shards"
    shards.mkdir()
    with folder_held_elsewhere(shards):
        with pytest.raises(BabyLlamaError, match=f"another pretokenize is writing {shards}"):
            pretokenize(tmp_path / "in.txt", tok300, shards, workers=1)
    with safeio.folder_lock(shards, "held by this process"):
        assert pretokenize(tmp_path / "in.txt", tok300, shards, workers=1)["shards"]["train"] == ["in.bin"]


def test_ctrl_c_during_pretokenize_says_the_folder_is_unfinished(tmp_path, tok300, monkeypatch, capsys):
    from babyllama.train import data

    (tmp_path / "a.txt").write_text("A story.")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_install_tokenizer", interrupt)  # after the shards, before meta.json
    assert main(["data", "pretokenize", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok300),
                 "--out-dir", str(tmp_path / "out"), "--workers", "1"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: {tmp_path / 'out'} is unfinished (pretokenize.incomplete marks it); run the same command again")


def test_a_failed_pretokenize_removes_the_folder_it_made_and_marks_one_it_found(tmp_path, tok300, monkeypatch):
    """A run that fails after its first write (a full disk) leaves no folder it made (a marked, empty one was left
    behind); a folder that was there stays, marked unfinished, as after an interruption."""
    from babyllama.train import data

    (tmp_path / "a.txt").write_text("A story.")

    def full_disk(*args):
        raise BabyLlamaError("cannot write tokenizer.bin: No space left on device")

    monkeypatch.setattr(data, "_install_tokenizer", full_disk)  # after the shards, before meta.json
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "shards", tmp_path / "kept" / "shards", tmp_path / "old"):
        if out.name == "old":
            out.mkdir()
        with pytest.raises(BabyLlamaError, match="No space left on device"):
            pretokenize(tmp_path / "a.txt", tok300, out, workers=1)
    assert not (tmp_path / "new").exists()  # nor the parent it made
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "shards").exists()  # one it found stays
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["a.bin", "pretokenize.incomplete"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_during_pretokenize_unwinds(tmp_path, tok300, how):
    """SIGTERM (kill, timeout, a batch scheduler) unwinds the run as Ctrl-C does (exit 143; a process ended where
    it stood would leave its worker asleep for good, holding the folder's lock, and its temporary shard). A
    terminal's Ctrl-C reaches the workers too (SIGINT to the whole process group): they leave it to the parent,
    so the run ends in its one line (exit 130), without a traceback from each worker."""
    import signal
    import subprocess
    import time

    from conftest import ROOT

    words = np.random.default_rng(0).choice(["the", "a", "little", "dog", "ran", "home", "sun"], 6_000_000)
    (tmp_path / "big.txt").write_text(" ".join(words))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "babyllama", "data", "pretokenize", "--input", str(tmp_path / "big.txt"),
           "--tokenizer", str(tok300), "--out-dir", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    while not (list(out.glob("big.bin.*")) and children.read_text().split()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the shard is being written, by a worker
    workers = [int(pid) for pid in children.read_text().split()]
    assert workers and proc.poll() is None, "the run ended before it could be stopped"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == (143 if how == "sigterm" else -signal.SIGINT)  # SIGINT: a shell reports 130
    assert proc.stderr.read().decode().splitlines() == [
        f"interrupted: {out} is unfinished (pretokenize.incomplete marks it); run the same command again"]
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # (a zombie would still show: none)
    assert sorted(p.name for p in out.iterdir()) == ["pretokenize.incomplete"]  # no temporary shard left
    (tmp_path / "big.txt").write_text("A story.")
    assert pretokenize(tmp_path / "big.txt", tok300, out, workers=1)["shards"]["train"] == ["big.bin"]  # not locked


def test_an_input_named_as_the_tokenizer_is_refused(tmp_path, tok300):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "tokenizer.txt").write_text("A story.")
    (tmp_path / "in" / "valid.txt").write_text("Another story.")
    with pytest.raises(BabyLlamaError, match="tokenizer.txt would be pretokenized into the shard tokenizer.bin, the "
                                             "name of the tokenizer written beside the shards: rename it"):
        pretokenize(tmp_path / "in", tok300, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_more_workers_than_the_limit_are_refused(tmp_path, tok300, capsys):
    (tmp_path / "a.txt").write_text("A story.")
    err = cli_error(capsys, "data", "pretokenize", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tok300),
                    "--out-dir", str(tmp_path / "out"), "--workers", "100000")
    assert "--workers 100000 is more than 256 encoding processes" in err and not (tmp_path / "out").exists()


def test_a_folder_pretokenize_left_unfinished_is_not_read_as_llama2c_shards(tmp_path, tok300, monkeypatch):
    """Without meta.json a folder reads as llama2.c's shards (every .bin): one an interrupted run left (new a.bin,
    the earlier b.bin) must be refused, not trained on, until a run completes it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    (tmp_path / "in" / "b.txt").write_text("Another story.")
    shards = tmp_path / "shards"
    pretokenize(tmp_path / "in", tok300, shards, workers=1)
    with pytest.raises(OSError), disk_full_at(monkeypatch, "b.bin"):
        pretokenize(tmp_path / "in", tok300, shards, workers=1, say_unfinished=False)
    with pytest.raises(BabyLlamaError, match="an unfinished `babyllama data pretokenize`.*run it again"):
        split_arrays(shards, "train")
    pretokenize(tmp_path / "in", tok300, shards, workers=1)
    assert read_meta(shards)["shards"]["train"] == ["a.bin", "b.bin"]


def test_train_vocabs_folder_is_no_shard_folder(tmp_path, tok300):
    """`data train-vocab --data-dir data` puts tok{N}.model and tok{N}.bin in data/, and pretokenize the shards in
    data/tok{N}/: `train --data_dir=data` read tok{N}.bin as a llama2.c shard (an id outside the vocabulary, a
    "torn" file, or, with a large enough --vocab_size, a run on the tokenizer's bytes); it now names the folder."""
    data = tmp_path / "data"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A story.")
    pretokenize(tmp_path / "in", tok300, data / "tok300", workers=1)
    shutil.copy(tok300, data / "tok300.bin")
    (data / "tok300.model").write_bytes(b"sentencepiece")
    with pytest.raises(BabyLlamaError) as e:
        read_meta(data)
    assert str(e.value) == f"{data}: no token shards (give the shard folder: --data_dir={data / 'tok300'})"
    (data / "tok300.model").unlink()  # a llama2.c shard that happens to be named so is one
    assert read_meta(data)["shards"]["train"] == ["tok300.bin"]


@pytest.mark.parametrize("argv", [
    ["data", "train-vocab", "--vocab-size", "300", "--input", "{text}", "--data-dir", "{file}"],
    ["data", "pretokenize", "--tokenizer", "{tok}", "--input", "{text}", "--out-dir", "{file}"],
    ["data", "pretokenize", "--tokenizer", "{tok}", "--input", "{text}", "--out-dir", "{file}/sub"],
    ["data", "instruct", "--input", "{text}", "--out-dir", "{file}"],
    ["data", "download", "--url", "file://{text}", "--data-dir", "{file}"],
    ["data", "pretokenize", "--tokenizer", "{tok}", "--input", "{text}", "--out-dir", "/proc/babyllama-test"],
], ids=lambda v: " ".join(v[:2] + v[-2:-1]))
def test_data_commands_with_an_unusable_output_folder_are_one_line(tmp_path, capsys, tok300, argv):
    if "train-vocab" in argv:
        pytest.importorskip("sentencepiece")
    if "/proc/babyllama-test" in argv and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, where no folder can be created")
    names = {"text": tmp_path / "in.txt", "file": tmp_path / "a_file", "tok": tok300}
    names["text"].write_text("Once upon a time there was a cat. The cat sat on the mat.\n")
    names["file"].write_text("not a folder")
    msg = cli_error(capsys, *(a.format(**names) for a in argv))
    assert msg.startswith("babyllama: error: cannot write ")
    assert "a_file is not a directory" in msg or "No such file or directory" in msg


@pytest.mark.parametrize("argv, message, code", [
    (["data", "train-vocab", "--vocab-size", "300", "--max-chars", "0"], "--max-chars must be >= 1, got 0", 1),
    (["data", "train-vocab", "--vocab-size", "300", "--max-chars", "-5"], "--max-chars must be >= 1, got -5", 1),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--workers", "0"], "--workers must be >= 1, got 0", 1),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--workers", "-1"], "--workers must be >= 1, got -1", 1),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--max-seq-len", "0"], "--max-seq-len must be >= 1, got 0", 1),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--vocab-size", "512"], "not allowed with argument", 2),
    (["data", "pretokenize", "--vocab_size=0"], "0 is tinystories.py's Llama 2 vocabulary: here give --tokenizer "
                                                "with Meta's tokenizer.model instead", 1),
    (["data", "pretokenize", "--vocab-size", "-3"], "--vocab-size must be in 260..65536", 1),
    (["data", "pretokenize", "--vocab-size", "many"], "--vocab_size: invalid integer: 'many'", 2),
    (["data", "instruct", "--max-word-df", "-1"], "--max-word-df must be in (0, 1], got -1", 1),
    (["data", "instruct", "--max-word-df", "1.5"], "--max-word-df must be in (0, 1], got 1.5", 1),
    (["data", "instruct", "--max-stories", "-2"], "--max-stories must be >= 1, got -2", 1),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[1:])[:48] if isinstance(v, list) else str(v))
def test_numeric_data_flags_are_checked(capsys, argv, message, code):
    """A value that is no number does not parse (2); one out of the flag's range is a bad value (1)."""
    assert message in cli_error(capsys, *argv, code=code)


def test_train_vocab_names_only_flags_it_has_and_skips_bad_lines(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    words = "the a cat dog sat on mat ran to park sun was happy little girl boy played with ball tree big red".split()
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words, 12)) + "."}) for _ in range(400)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:200] + ["not json"] + lines[200:]) + "\n")
    argv = ["data", "train-vocab", "--vocab-size", "300", "--input", str(bad), "--data-dir", str(tmp_path / "v")]
    assert "pass --skip-bad-lines" in cli_error(capsys, *argv)
    assert main(argv + ["--skip-bad-lines"]) == 0
    assert (tmp_path / "v" / "tok300.model").is_file()


def test_train_vocab_into_a_read_only_folder_names_the_folder(tmp_path, monkeypatch):
    """Its work folder is made inside the output folder: a folder it may not write in is refused naming that folder,
    not the random name the work folder would have had ("Permission denied: v/tmpk3x9"), a file that does not
    exist."""
    pytest.importorskip("sentencepiece")
    import tempfile

    from babyllama.train.vocab import train_vocab

    (tmp_path / "v").mkdir()
    (tmp_path / "in.txt").write_text("A cat sat on the mat.\n")

    def refused(suffix=None, prefix=None, dir=None):  # what mkdir answers in a read-only folder (as non-root)
        raise PermissionError(13, "Permission denied", os.path.join(dir, "tmpk3x9"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(BabyLlamaError, match=f"^cannot write output folder {tmp_path / 'v'}: Permission denied$"):
        train_vocab(tmp_path / "in.txt", 300, tmp_path / "v")


def test_train_vocab_on_a_full_disk_names_what_it_could_not_write(tmp_path, request):
    """The copy of the text sentencepiece trains on is as large as the text: a full disk there is one line naming
    the folder, not a bare "File too large", and leaves no folder behind."""
    pytest.importorskip("sentencepiece")
    from babyllama.train.vocab import train_vocab

    text = tmp_path / "in.txt"
    with open(text, "w") as f:
        f.write("A cat sat on the mat.\n<|endoftext|>\n" * 1000)  # 35 KB: over the limit, set once it is written
    request.getfixturevalue("small_file_limit")
    with pytest.raises(BabyLlamaError, match=r"cannot write the text sentencepiece trains on into .*v .*File too "):
        train_vocab(text, 300, tmp_path / "v")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("vocab_size, message", [
    (262, "the text needs at least 275 tokens (3 control + 256 byte tokens + one per distinct character): "
          "raise --vocab-size to 275 or more"),
    (2000, "the text has too few distinct pieces: --vocab-size must be at most "),
])
def test_train_vocab_says_which_vocab_sizes_the_text_allows_and_leaves_no_folder(tmp_path, capsys, vocab_size,
                                                                                 message):
    pytest.importorskip("sentencepiece")
    (tmp_path / "in.txt").write_text("Once upon a time there was a cat")  # 16 distinct characters, no newline
    out = tmp_path / "new" / "vocab"
    msg = cli_error(capsys, "data", "train-vocab", "--vocab-size", str(vocab_size), "--input",
                    str(tmp_path / "in.txt"), "--data-dir", str(out))
    assert msg.startswith(f"babyllama: error: sentencepiece could not train a {vocab_size}-token vocabulary: "
                          f"{message}") and "character_coverage" not in msg, msg
    assert not (tmp_path / "new").exists()


def test_train_vocab_learns_from_a_line_longer_than_sentencepiece_takes(tmp_path):
    pytest.importorskip("sentencepiece")
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.vocab import MAX_LINE_BYTES, train_vocab

    words = "the a cat dog sat on mat ran to park sun was happy little girl boy".split()
    text = " ".join(np.random.default_rng(0).choice(words, MAX_LINE_BYTES // 3))
    assert len(text) > MAX_LINE_BYTES and "\n" not in text
    (tmp_path / "in.txt").write_text(text)
    _, binary = train_vocab(tmp_path / "in.txt", 300, tmp_path / "v")
    sample = text[:1000]
    assert len(Tokenizer.load(binary).encode(sample, bos=False)) < 0.8 * len(sample)  # merges learnt from it


def test_a_linked_folder_inside_the_input_is_read_and_a_link_loop_ends(tmp_path):
    """Path.rglob passes over linked folders: a corpus gathered with `ln -s` was "no .txt, .jsonl, .json files in
    this folder"; a link back up the tree is read once, not forever."""
    from babyllama.train.data import input_files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("A story.")
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub").symlink_to(tmp_path / "corpus")
    (tmp_path / "corpus" / "up").symlink_to(data)  # data/sub/up -> data
    assert input_files(data) == [data / "sub" / "a.txt"]


def test_train_vocab_with_its_data_dir_inside_the_input_reads_the_input_once(tmp_path):
    """`--input data` with the default `--data-dir data` read its own copy of the text as it wrote it (files that
    sorted before its work folder counted twice), and one a killed run left was read later as data, by
    pretokenize too; an empty .jsonl beside the stories stopped train-vocab (and `data instruct`) as an empty
    dataset while pretokenize skipped it."""
    pytest.importorskip("sentencepiece")
    from babyllama.train.data import VOCAB_WORK_PREFIX, input_files
    from babyllama.train.vocab import train_vocab

    stories = "\n<|endoftext|>\n".join(f"Story {i}: the cat sat on the mat and then ran off." for i in range(300))
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "b.txt").write_text(stories)
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.txt").write_text(stories)  # sorts after the work folder's name, a file before it: "a"
    (data / "a.jsonl").write_text("")
    _, vocabulary = train_vocab(data, 300, data)  # pieces and scores (the .model also records its paths)
    _, reference = train_vocab(tmp_path / "alone", 300, tmp_path / "ref")
    assert vocabulary.read_bytes() == reference.read_bytes()
    left = data / f"{VOCAB_WORK_PREFIX}x1" / "vocab_input.txt"  # what a killed run leaves
    left.parent.mkdir()
    left.write_text("not a document")
    assert input_files(data) == [data / "b.txt"]
    (data / "b.txt").unlink()
    assert input_files(data) == [data / "a.jsonl"]  # all empty: the first stays, to say so when read


@pytest.mark.parametrize("max_chars, learnt", [(4, "abcd\n"), (8, "abcdef\ng\n"), (100, "abcdef\nghij\n")])
def test_train_vocab_learns_from_at_most_max_chars_characters(tmp_path, max_chars, learnt):
    """--max-chars counts characters (a document's newline too): the document that crosses it is cut short."""
    from babyllama.train.vocab import _write_training_text

    (tmp_path / "in.txt").write_text("abcdef\n<|endoftext|>\nghij\n")
    _write_training_text([tmp_path / "in.txt"], tmp_path / "in.txt", tmp_path / "out.txt", max_chars,
                         skip_bad_lines=False)
    assert (tmp_path / "out.txt").read_text() == learnt


def test_train_vocab_decodes_unk_as_sentencepiece_and_tokenizer_bin_agree(tmp_path):
    """<unk> reads " ⁇ " (sentencepiece's own default): the model stored it as 12 literal characters, so
    sentencepiece (and a Hugging Face export's tokenizer.model) decoded it as '\\342\\201\\207'."""
    spm = pytest.importorskip("sentencepiece")
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.vocab import train_vocab

    words = "the a cat dog sat on mat ran to park sun was happy little girl boy".split()
    (tmp_path / "in.txt").write_text("\n".join(" ".join(np.random.default_rng(i).choice(words, 9)) for i in range(300)))
    model, binary = train_vocab(tmp_path / "in.txt", 300, tmp_path / "v")
    ids = Tokenizer.load(binary).encode("the cat", bos=False)
    ids = ids[:1] + [0] + ids[1:]
    assert spm.SentencePieceProcessor(model_file=str(model)).decode(ids) == Tokenizer.load(binary).decode(ids)
    assert "\u2047" in Tokenizer.load(binary).decode(ids)


def _tar_with(path, name: str, body: bytes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))


@pytest.mark.parametrize("kind", ["not-an-archive", "path-traversal", "bad-crc", "cut", "clash", "zeros"])
def test_a_refused_archive_is_one_line_and_leaves_no_temporary_folder(tmp_path, capsys, kind, archive):
    """A corrupt gzip stream is found at its end (its CRC), which tar alone never reads: refused, not unpacked;
    so is a file of zeros, which tar reads as an archive of no files."""
    if kind == "zeros":
        src = tmp_path / "zeros.tar"
        src.write_bytes(bytes(10240))
        message = "the archive holds no files"
    elif kind == "not-an-archive":
        src = tmp_path / "small.txt"
        src.write_text("hello\n")
        message = "not a readable tar archive"
    elif kind in ("bad-crc", "cut"):
        src = tmp_path / "bad.tar.gz"
        body = bytearray(archive)
        if kind == "bad-crc":
            body[-8] ^= 0xFF  # the gzip trailer's CRC-32 of the data
        src.write_bytes(body if kind == "bad-crc" else body[:len(body) - 20])
        message = "CRC check failed" if kind == "bad-crc" else "ended before the end-of-stream marker"
    elif kind == "clash":  # a file, then a member under it as if it were a folder: the archive's fault
        src = tmp_path / "clash.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            for name in ("x", "x/y"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"z"))
        message = "(a corrupt or incomplete archive?"
    else:
        src = tmp_path / "evil.tar.gz"
        _tar_with(src, "../escaped.txt", b"x")
        message = "cannot extract"
    data = tmp_path / "dl"
    assert main(["data", "download", "--url", src.as_uri(), "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err.splitlines()  # the archive's sha256, then the error
    assert len(err) == 2 and err[0].startswith("sha256 ") and err[1].startswith("babyllama: error: "), err
    assert message in err[1]
    assert [p.name for p in data.iterdir()] == [src.name]  # the download itself, nothing unpacked
    assert not (tmp_path / "escaped.txt").exists()


def test_a_full_disk_while_unpacking_is_the_folder_s_fault_not_the_archive_s(tmp_path, capsys, archive, monkeypatch):
    """A write that fails while the archive unpacks (the system's error: no space) names the folder and keeps the
    download, instead of calling a good archive corrupt and asking for it to be removed."""
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = tmp_path / "TinyStories_all_data.tar.gz"
    src.write_bytes(archive)
    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    data = tmp_path / "dl"
    assert main(["data", "download", "--url", src.as_uri(), "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "No space left on device (the archive is kept" in err and "corrupt" not in err, err
    assert (data / src.name).read_bytes() == archive


def test_download_checks_the_sha256_format_before_downloading(tmp_path, capsys):
    src = tmp_path / "a.tar.gz"
    _tar_with(src, "a.txt", b"x")
    msg = cli_error(capsys, "data", "download", "--url", src.as_uri(), "--data-dir", str(tmp_path / "dl"),
                    "--sha256", "00")
    assert "--sha256 must be 64 hexadecimal digits" in msg and not (tmp_path / "dl").exists()


@pytest.mark.parametrize("name, is_val", [
    ("festival_stories", False), ("intervals", False), ("evaluation", False), ("train", False),
    ("TinyStories-valid", True), ("TinyStoriesV2-GPT4-valid", True), ("instruct_val", True), ("validation", True),
    ("val_part0", True), ("instruct_dev", True), ("devil_stories", False), ("instruct_train", False),
])
def test_a_validation_shard_has_val_valid_or_validation_as_a_word(name, is_val):
    from babyllama.train.data import is_val_shard

    assert is_val_shard(f"{name}.bin") == is_val


def test_a_lone_file_is_training_data_unless_named_validation(tmp_path, tok300):
    (tmp_path / "festival_stories.txt").write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(50)))
    meta = pretokenize(tmp_path / "festival_stories.txt", tok300, tmp_path / "a", workers=1)
    assert meta["shards"] == {"train": ["festival_stories.bin"], "val": []}
    assert len(split_arrays(tmp_path / "a", "train")[0]) > 0
    (tmp_path / "valid.txt").write_text("Story.\n")
    with pytest.raises(BabyLlamaError, match=r"valid.txt: only validation data \(valid.txt: a name with the word "):
        pretokenize(tmp_path / "valid.txt", tok300, tmp_path / "b", workers=1)
    assert not (tmp_path / "b").exists()  # refused before anything was written
    (tmp_path / "v" / "sub").mkdir(parents=True)  # a folder's files are named as given, not as their shards
    (tmp_path / "v" / "sub" / "chat_val.txt").write_text("Story.\n")
    with pytest.raises(BabyLlamaError, match=r"v: only validation data \(sub/chat_val.txt: a name with the word "):
        pretokenize(tmp_path / "v", tok300, tmp_path / "c", workers=1)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())  # a folder whose meta.json was edited since
    meta["shards"] = {"train": [], "val": ["festival_stories.bin"]}
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BabyLlamaError, match=r"a: no training shards, only validation data \(festival_stories.bin"):
        split_arrays(tmp_path / "a", "train")


def test_data_with_only_a_dev_shard_is_refused_naming_dev_among_the_validation_words(tmp_path, tok300):
    (tmp_path / "instruct_dev.txt").write_text("Story.\n")
    with pytest.raises(BabyLlamaError, match=r"\(instruct_dev.txt: a name with the word val, valid, validation or dev"):
        pretokenize(tmp_path / "instruct_dev.txt", tok300, tmp_path / "d", workers=1)


@pytest.mark.parametrize("names", [("a.txt", "a.jsonl"), ("sub/a.txt", "sub_a.txt")])
def test_two_files_that_would_share_a_shard_are_refused(tmp_path, tok300, names):
    for name in names:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "in" / names[0]).write_text("A story.\n")
    (tmp_path / "in" / names[1]).write_text('"Another story."\n' if names[1].endswith(".jsonl") else "Another.\n")
    first, second = sorted(tmp_path / "in" / n for n in names)
    with pytest.raises(BabyLlamaError, match=rf"{first} and {second} would both be pretokenized into the shard "):
        pretokenize(tmp_path / "in", tok300, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_llama2c_tinystories_spellings_train_and_pretokenize(tmp_path):
    """tinystories.py's `train_vocab --vocab_size=N` and `pretokenize --vocab_size=N` work as written."""
    pytest.importorskip("sentencepiece")
    words = "the a cat dog sat on mat ran to park sun was happy little girl boy played with ball tree big red".split()
    rng = np.random.default_rng(0)
    stories = "\n<|endoftext|>\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(200))
    (tmp_path / "stories.txt").write_text(stories)
    common = ["--input", str(tmp_path / "stories.txt"), "--data-dir", str(tmp_path / "data")]
    assert main(["data", "train_vocab", "--vocab_size=300", *common]) == 0
    assert main(["data", "pretokenize", "--vocab_size=300", *common, "--workers", "1"]) == 0
    assert read_meta(tmp_path / "data" / "tok300")["vocab_size"] == 300


@pytest.mark.parametrize("argv, message", [
    (["train", "--wandb_log=True"], "wandb_log is a setting of llama2.c's train.py, not babyllama's: babyllama "
                                    "does not log to Weights & Biases: every logged step and evaluation goes to "
                                    "out_dir/metrics.jsonl"),
    (["train", "--wandb_project=llamac"], "wandb_project is a setting of llama2.c's train.py"),
    (["train", "--vocab_source=llama2"], "vocab_source is a setting of llama2.c's train.py, not babyllama's: "
                                         "Llama 2's vocabulary is the data's here: pretokenize with `babyllama data "
                                         "pretokenize --tokenizer tokenizer.model` and give --data_dir"),
    # wandb_log=false is what babyllama does anyway: the run's own error follows
    (["train", "--wandb_log=False"], "set --data_dir to a folder made by `babyllama data pretokenize` (or "
                                     "--vocab_size=N for data/tokN, as llama2.c's train.py finds it)"),
    # train.py's README command: the data is looked for where train.py (and pretokenize --vocab-size) puts it
    (["train", "--vocab_source=custom", "--vocab_size=4096"], "data_dir not found: data/tok4096"),
    (["train", "llama2c.toml"], "llama2c.toml: vocab_source is a setting of llama2.c's train.py"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_llama2c_train_keys_without_a_babyllama_setting_say_what_to_do(argv, message, tmp_path, monkeypatch,
                                                                       capsys):
    """llama2.c's wandb_* and vocab_source keys: one line saying what babyllama does instead, not argparse's
    'unrecognized arguments' or 'unknown config key'."""
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama2c.toml").write_text('wandb_log = false\nvocab_source = "llama2"\n')
    assert message in cli_error(capsys, *argv)


def test_a_llama2c_python_config_file_is_read_without_running_it(tmp_path):
    """llama2.c's configurator takes `python train.py config/file.py`: its `key = value` lines are read (comments,
    a docstring, negative numbers, True/False), checked as any setting; anything else is refused by line."""
    pytest.importorskip("torch")
    from babyllama.train.config import build_config

    (tmp_path / "tiny.py").write_text('"""a tiny run"""\n# the model\ndim = 64  # small\nn_layers = 2\n'
                                      "compile = False\nout_dir = 'out-tiny'\nlearning_rate = 1e-3\n")
    cfg = build_config(tmp_path / "tiny.py", {"n_layers": "3"})
    assert (cfg.dim, cfg.n_layers, cfg.compile, cfg.out_dir, cfg.learning_rate) == (64, 3, False, "out-tiny", 1e-3)
    for body, message in (("import os\n", "tiny.py, line 1: a Python config file is read, not run"),
                          ("dim = 64\nbatch_size = 4 * 8\n", "tiny.py, line 2: a Python config file is read, not run"),
                          ("dim = 'big'\n", "dim must be int"),
                          ("dim = (\n", "invalid Python")):
        (tmp_path / "tiny.py").write_text(body)
        with pytest.raises(BabyLlamaError, match=re.escape(message)):
            build_config(tmp_path / "tiny.py")


@pytest.mark.parametrize("files, split", [
    (["data00.json", "data01.json", "data02.json"], "2 train shards and 1 val shard (the first, data00.bin, as in "
                                                    "llama2.c: none is named val)"),
    (["data00.json", "data01.json"], "1 train shard and 1 val shard (the first, data00.bin, as in llama2.c: none "
                                     "is named val)"),
    (["stories.txt"], "1 shard (its last 10% held out for validation: no shard is named val)"),
    (["train.txt", "valid.txt"], "1 train shard and 1 val shard"),
    (["train.txt", "train2.txt", "valid.txt"], "2 train shards and 1 val shard"),
    (["chat.jsonl"], "1 shard (the last 10% of the conversations held out for validation: no shard is named "
                     "val)"),
], ids=["llama2c-shards", "llama2c-two-shards", "one", "named", "named-two", "chat"])
def test_pretokenize_reports_the_split_training_will_use(tmp_path, capsys, tok300, files, split):
    """Several shards none named val: training holds out the first, as llama2.c does; the report said
    '3 train and 0 val shards'."""
    (tmp_path / "in").mkdir()
    for name in files:
        body = {".json": json.dumps([{"story": "A cat sat."}]), ".txt": "A cat sat.\n",
                ".jsonl": json.dumps({"prompt": "Hi.", "response": "A cat sat."}) + "\n"}[os.path.splitext(name)[1]]
        (tmp_path / "in" / name).write_text(body)
    assert main(["data", "pretokenize", "--tokenizer", str(tok300), "--input", str(tmp_path / "in"), "--out-dir",
                 str(tmp_path / "shards"), "--workers", "1"]) == 0
    assert f" in {split} to " in capsys.readouterr().out


def test_a_pipe_device_or_folder_given_as_input_or_tokenizer_is_named_as_what_it_is(tmp_path):
    """They exist: "not found" sent the user looking for a missing file."""
    import os

    from babyllama.errors import BabyLlamaError
    from babyllama.train.data import input_files, load_encoder

    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    with pytest.raises(BabyLlamaError, match=r"^input .*ff is a named pipe, not a regular file$"):
        input_files(fifo)
    with pytest.raises(BabyLlamaError, match=r"^tokenizer /dev/null is a device, not a regular file$"):
        load_encoder("/dev/null")
    with pytest.raises(BabyLlamaError, match=r"^tokenizer .* is a directory, not a regular file$"):
        load_encoder(tmp_path)
    with pytest.raises(BabyLlamaError, match=r"^tokenizer not found: "):
        load_encoder(tmp_path / "missing.bin")
