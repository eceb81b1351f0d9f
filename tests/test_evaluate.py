"""`babyllama eval`: what is counted, numerical agreement with token-by-token decoding, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import byte_tokenizer, random_weights, run_cli, shared_file, tiny_args

from babyllama import formats
from babyllama.documents import iter_documents
from babyllama.engine import Engine
from babyllama.evaluate import evaluate, token_nll, windows
from babyllama.tokenizer import BOS

STORIES = ["Once upon a time there was a cat.", "The end of the tale is near, then the end.\nA new line.",
           "héllo wörld: bytes are not characters"]


def write_stories(path, stories, trailing=True):
    body = "".join(f"{s}\n<|endoftext|>\n" for s in stories)
    path.write_text(body if trailing else body.removesuffix("<|endoftext|>\n"), encoding="utf-8")
    return path


def test_documents_split_on_separator_lines_and_stripped(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("  first story \n<|endoftext|>\n\n<|endoftext|>\nsecond\nline two\n<|endoftext|>\ntail", "utf-8")
    assert list(iter_documents(f)) == ["first story", "second\nline two", "tail"]
    plain = tmp_path / "p.txt"
    plain.write_text("no separators\nat all\n", encoding="utf-8")
    assert list(iter_documents(plain)) == ["no separators\nat all"]
    windows_file = tmp_path / "w.txt"  # Windows line endings: the same documents
    windows_file.write_bytes(b"first story\r\n<|endoftext|>\r\nsecond\r\nline two\r\n")
    assert list(iter_documents(windows_file)) == ["first story", "second\nline two"]
    windows_file.write_bytes(b"\xef\xbb\xbf<|endoftext|>\nfirst story\n")  # a byte-order mark: not text
    assert list(iter_documents(windows_file)) == ["first story"]


def test_windows_predict_every_token_after_bos_once():
    ids = list(range(10))
    ws = list(windows(ids, 4))
    assert ws == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]), ([8], [9])]
    assert list(windows([BOS], 4)) == []


def test_token_nll_is_minus_log_softmax():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0]], dtype=np.float32)
    nll = token_nll(logits, np.array([2, 0]))
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert nll[0] == pytest.approx(-math.log(p[2]))
    assert nll[1] == pytest.approx(1000.0)  # stable for huge logits


def reference_nats(engine, tok, stories, seq_len):
    """Token-by-token decoding (the generation path), a fresh cache per window: the slow truth."""
    total = 0.0
    for s in stories:
        ids = tok.encode(s, bos=True)
        for inputs, targets in windows(ids, seq_len):
            cache = engine.new_cache()
            for pos, (x, y) in enumerate(zip(inputs, targets)):
                row = engine.forward([x], [pos], cache, logits="last")[0].astype(np.float64)
                total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[y]
    return total


def test_a_diverged_models_perplexity_is_infinite_and_json_gets_null():
    """exp of a loss above ~709 nats overflows a float: the perplexity is inf (an OverflowError traceback before),
    and the JSON figures that are not finite are null (json.dumps wrote Infinity/NaN, which JSON lacks)."""
    from babyllama.evaluate import EvalResult

    diverged = EvalResult(documents=1, windows=1, tokens=2, bytes=8, nats=2000.0)
    assert diverged.perplexity == math.inf and diverged.loss == 1000.0
    figures = json.loads(json.dumps(diverged.to_dict(), allow_nan=False))
    assert figures["perplexity"] is None and figures["loss"] == 1000.0
    assert EvalResult(tokens=2, bytes=8, nats=1.0).perplexity == pytest.approx(math.exp(0.5))
    empty = json.loads(json.dumps(EvalResult().to_dict(), allow_nan=False))
    assert empty["loss"] is empty["perplexity"] is empty["bits_per_byte"] is None and empty["tokens"] == 0


def test_batched_eval_matches_token_by_token_decoding(tmp_path):
    args = tiny_args(max_seq_len=16)
    engine, tok = Engine(random_weights(args, seed=3, scale=0.2)), byte_tokenizer(args.vocab_size)
    data = write_stories(tmp_path / "d.txt", STORIES)
    r = evaluate(engine, tok, data, show_progress=False)
    assert r.documents == 3
    assert r.tokens == sum(len(tok.encode(s)) - 1 for s in STORIES)
    assert r.windows > 3  # the stories are longer than 16 tokens: cut into windows
    assert r.bytes == sum(len(s.encode()) for s in STORIES)
    assert r.nats == pytest.approx(reference_nats(engine, tok, STORIES, 16), rel=1e-5)
    assert r.loss == pytest.approx(r.nats / r.tokens)
    assert r.bits_per_byte == pytest.approx(r.nats / math.log(2) / r.bytes)
    assert r.perplexity == pytest.approx(math.exp(r.loss))
    short = evaluate(engine, tok, data, seq_len=8, show_progress=False)
    assert short.nats == pytest.approx(reference_nats(engine, tok, STORIES, 8), rel=1e-5)


def test_slices_keep_stories_whole(tmp_path):
    args = tiny_args()
    engine, tok = Engine(random_weights(args)), byte_tokenizer(args.vocab_size)
    data = write_stories(tmp_path / "d.txt", STORIES)
    first = len(tok.encode(STORIES[0])) - 1
    assert evaluate(engine, tok, data, max_documents=1, show_progress=False).tokens == first
    two = evaluate(engine, tok, data, max_tokens=first + 1, show_progress=False)
    assert (two.documents, two.tokens) == (2, first + len(tok.encode(STORIES[1])) - 1)


def test_json_and_jsonl_stories_score_like_the_same_text(tmp_path):
    """The stories, not the JSON around them: as `data pretokenize` reads those files."""
    args = tiny_args()
    engine, tok = Engine(random_weights(args)), byte_tokenizer(args.vocab_size)
    want = evaluate(engine, tok, write_stories(tmp_path / "d.txt", STORIES), show_progress=False)
    (tmp_path / "d.json").write_text(json.dumps([{"story": s} for s in STORIES]))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES))
    for name in ("d.json", "d.jsonl"):
        got = evaluate(engine, tok, tmp_path / name, show_progress=False)
        assert (got.documents, got.tokens, got.bytes) == (want.documents, want.tokens, want.bytes)
        assert got.nats == pytest.approx(want.nats)


@pytest.fixture
def tiny_model(tmp_path):
    args = tiny_args()
    path = tmp_path / "m.bin"
    formats.save(random_weights(args), path)
    byte_tokenizer(args.vocab_size).save(tmp_path / "tokenizer.bin")
    return path


def test_cli_eval_json_and_table(tiny_model, tmp_path):
    data = write_stories(tmp_path / "d.txt", STORIES)
    proc = run_cli("eval", str(tiny_model), "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    engine = Engine(formats.load(tiny_model))
    want = evaluate(engine, byte_tokenizer(), data, show_progress=False)
    assert got["tokens"] == want.tokens and got["loss"] == pytest.approx(want.loss, rel=1e-6)
    quantized = run_cli("eval", str(tiny_model), "--data", str(data), "--json", "--quantize", "q8_0")
    assert {k: got[k] for k in ("model", "lora", "quantize", "weights", "kv_cache", "seq_len")} == \
        {"model": str(tiny_model), "lora": None, "quantize": None, "weights": "fp32", "kv_cache": "f32",
         "seq_len": tiny_args().max_seq_len}
    short = json.loads(run_cli("eval", str(tiny_model), "--data", str(data), "--json", "--seq-len", "8").stdout)
    assert short["seq_len"] == 8 and short["windows"] > got["windows"]  # other figures, of another window
    settings = json.loads(quantized.stdout)  # other figures, said so in fields of their own
    assert {k: settings[k] for k in ("model", "quantize", "kv_cache")} == \
        {"model": str(tiny_model), "quantize": "q8_0", "kv_cache": "f16"}
    assert settings["weights"].startswith("q8_0")
    # a quantized file's own weights, no --quantize: the weights field says what ran
    q8_file = tmp_path / "q8.bin"
    formats.save(formats.load(tiny_model), q8_file, version=2)
    byte_tokenizer(tiny_args().vocab_size).save(tmp_path / "tokenizer.bin")
    from_file = json.loads(run_cli("eval", str(q8_file), "--data", str(data), "--json").stdout)
    assert from_file["quantize"] is None and from_file["weights"] == formats.load(q8_file).kinds() \
        and from_file["weights"].startswith("q8_0")
    table = run_cli("eval", str(tiny_model), "--data", str(data), "--max-stories", "2")
    assert table.returncode == 0, table.stderr.decode()
    assert b"2 stories" in table.stdout and b"bits/byte" in table.stdout
    f16 = run_cli("eval", str(tiny_model), "--data", str(data), "--max-stories", "2", "--kv-cache", "f16")
    assert f16.stdout.splitlines()[0].decode() == f"model       {tiny_model} --kv-cache f16"
    one = run_cli("eval", str(tiny_model), "--data", str(data), "--max-stories", "1")
    assert b": 1 story, " in one.stdout and b" 1 stories" not in one.stdout


def test_cli_eval_takes_threads_as_run_does(tiny_model, tmp_path):
    """--threads sets the kernels' pool as in run (the same figures: a row's sums do not depend on the thread
    that computes it), and is checked as there."""
    data = write_stories(tmp_path / "d.txt", STORIES)
    default, one = (run_cli("eval", str(tiny_model), "--data", str(data), "--json", *flags) for flags in
                    ([], ["--threads", "1"]))
    assert default.returncode == one.returncode == 0, one.stderr.decode()
    assert json.loads(one.stdout) == json.loads(default.stdout)
    proc = run_cli("eval", str(tiny_model), "--data", str(data), "--threads", "0")
    assert proc.returncode == 1 and proc.stderr == b"babyllama: error: --threads must be >= 1, got 0\n", proc.stderr


@pytest.mark.parametrize("content,flags,message", [
    (None, [], b"data file not found"),
    ("", [], b"no text to evaluate"),
    ("<|endoftext|>\n<|endoftext|>\n", [], b"no text to evaluate"),
    (b"ok\n\xff\xfe\n", [], b":2: not UTF-8 text"),
    ("a story\n", ["--max-stories", "0"], b"--max-stories must be >= 1"),
    ("a story\n", ["--max-tokens", "-3"], b"--max-tokens must be >= 1"),
    ("a story\n", ["--seq-len", "65"], b"--seq-len must be in [1, 64]"),
    ("a story\n", ["--max-examples", "3"], b"--max-examples works with --instruct only"),
    ("a story\n", ["--max-new-tokens", "3"], b"--max-new-tokens works with --instruct only"),
    ("a story\n", ["--samples", "0"], b"--samples works with --instruct only"),
])
def test_cli_eval_bad_inputs(tiny_model, tmp_path, content, flags, message):
    data = tmp_path / "data.txt"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content, encoding="utf-8")
    proc = run_cli("eval", str(tiny_model), "--data", str(data), *flags)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"babyllama: error: ") and message in proc.stderr
    assert b"Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--max-stories", "--max-tokens"])
def test_cli_eval_refuses_a_count_below_one_before_it_loads_the_model(tmp_path, flag):
    proc = run_cli("eval", str(tmp_path / "no-such-model.bin"), "--data", str(tmp_path / "none.txt"), flag, "0")
    assert proc.returncode == 1 and proc.stderr == f"babyllama: error: {flag} must be >= 1, got 0\n".encode()


def test_cli_eval_names_bad_jsonl_lines_without_a_flag_it_lacks(tiny_model, tmp_path):
    data = tmp_path / "stories.jsonl"
    data.write_text('{"story": "a"}\n{bad\n', encoding="utf-8")
    proc = run_cli("eval", str(tiny_model), "--data", str(data))
    assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1, proc.stderr
    assert b"line 2" in proc.stderr and proc.stderr.rstrip().endswith(b"(fix them)"), proc.stderr


@pytest.mark.parametrize("flags", [["--max-stories", "2"], ["--max-tokens", "9"], ["--seq-len", "32"]])
def test_cli_eval_instruct_refuses_the_text_flags(tiny_model, tmp_path, flags):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"request": "Write a story.", "words": ["cat"], "topic": null}\n')
    proc = run_cli("eval", str(tiny_model), "--instruct", str(requests), *flags)
    assert proc.returncode == 1 and proc.stderr.startswith(b"babyllama: error: ")
    assert f"{flags[0]} works with --data only".encode() in proc.stderr


def test_cli_eval_instruct_names_a_request_too_long_for_the_context_before_answering_any(tiny_model, tmp_path,
                                                                                         capsys, monkeypatch):
    """It was found batch by batch (16 requests), after the earlier batches' replies, and named no file or line."""
    from babyllama import generate
    from babyllama.cli import main

    def no_replies(*args, **kwargs):
        raise AssertionError("a request was answered before the too long one was refused")

    monkeypatch.setattr(generate, "generate_batch", no_replies)
    requests = tmp_path / "requests.jsonl"
    record = lambda text: json.dumps({"messages": [{"role": "user", "content": text},  # noqa: E731
                                                   {"role": "assistant", "content": "x"}], "words": ["cat"]})
    requests.write_text("\n".join([record("A cat.")] * 20 + ["", record("A cat. " * 100)]) + "\n")
    assert main(["eval", str(tiny_model), "--instruct", str(requests)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"babyllama: error: {requests}:22: a request of ") and err.count("\n") == 1, err


def test_cli_eval_needs_data(tiny_model):
    proc = run_cli("eval", str(tiny_model))
    assert proc.returncode == 2 and b"--data" in proc.stderr


def test_stories260k_on_valid_slice():
    """llama2.c's 260K model on the first 20 held-out stories: a loss near its reported 1.297 val loss."""
    model, tok = shared_file("fixtures/stories260K.bin"), shared_file("fixtures/tok512.bin")
    data = shared_file("data/tinystories/valid.txt")
    proc = run_cli("eval", str(model), "-z", str(tok), "--data", str(data), "--max-stories", "20", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    r = json.loads(proc.stdout)
    assert r["documents"] == 20
    assert 1.0 < r["loss"] < 1.5
    assert r["bits_per_byte"] == pytest.approx(r["nats"] / math.log(2) / r["bytes"])


def test_checkpoint_evaluates_like_its_export(tmp_path):
    """A training checkpoint (ckpt.pt, or its run folder) scores exactly as its exported .bin."""
    pytest.importorskip("torch")
    from babyllama.export import export
    from babyllama.loading import load_source
    from babyllama.model import Transformer
    from babyllama.train import checkpoint

    args = tiny_args()
    run = tmp_path / "run"
    run.mkdir()
    model = Transformer.from_weights(random_weights(args, seed=5, scale=0.2))
    checkpoint.save({"model": model.state_dict(), "model_args": args.to_dict()}, run / "ckpt.pt")
    byte_tokenizer(args.vocab_size).save(run / "tokenizer.bin")
    export(load_source(checkpoint=str(run / "ckpt.pt")), tmp_path / "out" / "m.bin", "bin")
    data = write_stories(tmp_path / "d.txt", STORIES)
    want = evaluate(Engine(formats.load(tmp_path / "out" / "m.bin")), byte_tokenizer(), data, show_progress=False)
    from babyllama.api import load

    ckpt = load(run / "ckpt.pt")
    got = evaluate(ckpt.engine, ckpt.tokenizer, data, show_progress=False)  # tokenizer.bin found beside it
    assert got.tokens == want.tokens and got.loss == pytest.approx(want.loss, rel=1e-6)
    proc = run_cli("eval", str(run), "--data", str(data), "--json")  # the run folder, as a user passes it
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["loss"] == pytest.approx(want.loss, rel=1e-6)


def test_bad_checkpoint_is_one_line_error(tmp_path):
    pytest.importorskip("torch")
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    data = write_stories(tmp_path / "d.txt", STORIES)
    proc = run_cli("eval", str(bad), "--data", str(data), "-z", str(tmp_path / "tok.bin"))
    assert proc.returncode == 1 and proc.stderr.startswith(b"babyllama: error: cannot read checkpoint")
