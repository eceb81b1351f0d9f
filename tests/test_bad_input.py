"""Every user mistake gives one clear error line on stderr and a non-zero exit: no traceback, no hang,
no giant allocation."""

from __future__ import annotations

import os
import re
import struct
import warnings

import pytest
from conftest import byte_tokenizer, cli_error, random_weights, run_cli, tiny_args
from conftest import one_line_error as assert_one_line_error

from babyllama import formats


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    path = d / "m.bin"
    formats.save(random_weights(tiny_args(vocab_size=300)), path, version=1)
    from conftest import byte_tokenizer
    byte_tokenizer(300).save(d / "tok.bin")
    return path, d / "tok.bin"


def v0_header(dim=64, hidden=172, layers=5, heads=8, kv=4, vocab=512, seq=512) -> bytes:
    return struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


@pytest.mark.parametrize("content,pattern", [
    (b"", "too small"),
    (b"\x01\x02\x03", "too small"),
    (v0_header() + b"\0" * 1000, "file truncated"),
    (v0_header(dim=-5), "dim=-5 is out of range"),
    (v0_header(dim=1 << 30, hidden=1 << 30), "out of range"),
    (v0_header(dim=2**20, hidden=2**20, layers=2**20, vocab=2**20, seq=2**20, heads=8, kv=8), "dim=1048576 is out of"),
    (v0_header(dim=2**16, hidden=2**20, layers=2**10, vocab=2**20, seq=2**20, heads=8, kv=8), "file truncated"),
    (v0_header(heads=7), "not divisible by n_heads"),
    (v0_header(kv=3), "not a multiple of n_kv_heads"),
    (struct.pack("<Ii", formats.MAGIC, 9) + bytes(248), "unsupported model version 9"),
    (struct.pack("<Ii", formats.MAGIC, 1) + bytes(40), "truncated header"),
])
def test_corrupt_model_files(tmp_path, content, pattern):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    assert_one_line_error(run_cli("run", str(path), "-n", "4"), pattern)


@pytest.mark.parametrize("content", [b"", b"GG"])
def test_a_gguf_named_file_too_small_for_its_magic_is_called_a_gguf(tmp_path, content):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    assert_one_line_error(run_cli("run", str(path), "-n", "4"),
                          f"file is too small ({len(content)} bytes) to be a GGUF model")


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>Not Found</html>\n", b"GGUX" + bytes(300),
                                     b"Entry not found"])
def test_a_gguf_named_file_without_the_magic_is_not_read_as_llama2c(tmp_path, content):
    # a saved error page or a damaged download: the user asked for GGUF, so the error speaks of GGUF, not of a
    # llama2.c version 0 header's fields
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    for command in (("run", str(path), "-n", "4"), ("export", "--model", str(path), str(tmp_path / "x.bin"))):
        assert_one_line_error(run_cli(*command), f"not a GGUF file (it starts with {content[:4]!r}, not b'GGUF')")


def test_a_llama2c_file_named_gguf_still_loads(tmp_path, good_model):
    model, tok = good_model
    misnamed = tmp_path / "m.gguf"
    formats.save(formats.load(model), misnamed, version=1)
    proc = run_cli("run", str(misnamed), "-z", str(tok), "-n", "8", "-t", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == run_cli("run", str(model), "-z", str(tok), "-n", "8", "-t", "0").stdout


def test_trailing_garbage_is_rejected(tmp_path, good_model):
    model, tok = good_model
    bad = tmp_path / "bad.bin"
    bad.write_bytes(model.read_bytes() + b"junk")
    assert_one_line_error(run_cli("run", str(bad), "-z", str(tok)), "trailing bytes")


def test_v2_with_bad_group_size(tmp_path, good_model):
    model, tok = good_model
    formats.save(formats.load(model), tmp_path / "q.bin", version=2, group_size=32)
    raw = bytearray((tmp_path / "q.bin").read_bytes())
    struct.pack_into("<i", raw, 37, 7)
    (tmp_path / "q.bin").write_bytes(raw)
    assert_one_line_error(run_cli("run", str(tmp_path / "q.bin"), "-z", str(tok)), "group size 7 must divide")


@pytest.mark.parametrize("version,pattern", [
    (0, 'its header (magic "ak42") says version 0, but version 0 (legacy) files have no header; the header is corrupt'),
    (2, "invalid version 2 header: Q8_0 group size 0 must divide dim 32 and hidden_dim 64"),
    (3, "invalid version 3 header: version 3 (Q4_0) has blocks of 32, not 0"),
])
def test_a_changed_version_field_names_the_file_and_its_header(tmp_path, good_model, version, pattern):
    """A version 1 file whose version field says 2 or 3 has no group size (zeros), and one whose field says 0 has a
    header that version 0 files do not have: the error names the file and says that its header is invalid."""
    model, tok = good_model
    raw = bytearray(model.read_bytes())
    struct.pack_into("<i", raw, 4, version)
    bad = tmp_path / "changed.bin"
    bad.write_bytes(raw)
    assert_one_line_error(run_cli("run", str(bad), "-z", str(tok)), f"{bad}: {pattern}")


def test_a_file_name_with_a_newline_keeps_the_error_on_one_line(tmp_path, capsys):
    """Linux file names may hold any byte but / and NUL: a newline in one split the error line in two (a control
    character would reach the terminal as it is). They are shown escaped."""
    from babyllama.cli import main

    assert main(["run", str(tmp_path / "no\nsuch\x1b[2J.bin"), "-n", "5"]) == 1
    err = capsys.readouterr().err
    assert err == f"babyllama: error: model file not found: {tmp_path}/no\\nsuch\\x1b[2J.bin\n"


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "nope.bin")), "model file not found")


def test_directory_as_model(tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path)), "a folder that holds no model")


def test_missing_tokenizer(tmp_path, good_model):
    model, _ = good_model
    assert_one_line_error(run_cli("run", str(model), "-z", str(tmp_path / "none.bin")), "tokenizer file not found")


def test_no_tokenizer_beside_model(tmp_path, good_model):
    model, _ = good_model
    lone = tmp_path / "lone.bin"
    lone.write_bytes(model.read_bytes())
    assert_one_line_error(run_cli("run", str(lone)), "no tokenizer found")


def test_no_tokenizer_beside_model_names_the_one_run_c_would_read(tmp_path, good_model):
    """run.c's -z default is ./tokenizer.bin; babyllama looks beside the model: with one in the current folder,
    the error says it is not read unless given."""
    model, tok = good_model
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lone.bin").write_bytes(model.read_bytes())
    (tmp_path / "tokenizer.bin").write_bytes(tok.read_bytes())
    assert_one_line_error(run_cli("run", "models/lone.bin", cwd=tmp_path),
                          "is read only when given: -z tokenizer.bin")


def test_mismatched_tokenizer(good_model, tok512):
    model, _ = good_model
    assert_one_line_error(run_cli("run", str(model), "-z", str(tok512)),
                          "has 512 tokens but the model's vocab_size is 300")


def test_corrupt_tokenizer(tmp_path, good_model):
    model, tok = good_model
    bad = tmp_path / "tok.bin"
    bad.write_bytes(tok.read_bytes()[:-3])
    assert_one_line_error(run_cli("run", str(model), "-z", str(bad)), "truncated or corrupt")


@pytest.mark.parametrize("flags,pattern,code", [
    (["-n", "-1"], "steps (-n) must be >= 0", 1),
    (["-n", "many"], "invalid int value", 2),
    (["-t", "-0.5"], "temperature (-t) must be a finite number >= 0, got -0.5", 1),
    (["-t", "nan"], "temperature (-t) must be a finite number >= 0, got nan", 1),
    (["-t", "inf"], "temperature (-t) must be a finite number >= 0, got inf", 1),
    (["-p", "1.5"], "top-p (-p) must be in [0, 1]", 1),
    # run.c reads -s through atoi: an int (a negative one as 2**64 + s)
    (["-s", str(-2**31 - 1)], "seed (-s) must be in [-2**31, 2**63), got -2147483649", 1),
    # the generator keeps 64 bits: this one would sample seed 7's text, as the Python API refuses it too
    (["-s", str(2**64 + 7)], "seed (-s) must be in [-2**31, 2**63), got 18446744073709551623", 1),
    (["-m", "talk"], "invalid choice", 2),
    (["--bogus"], "babyllama run: error: unrecognized arguments: --bogus (see --help)", 2),
])
def test_bad_flags(good_model, flags, pattern, code):
    model, tok = good_model
    assert_one_line_error(run_cli("run", str(model), "-z", str(tok), *flags), pattern, code)


@pytest.mark.parametrize("argv, prefix", [
    (["data", "pretokenize", "--tokenizer", "t.model", "--bogus"], "babyllama data pretokenize: error: "),
    (["models", "--bogus=1"], "babyllama models: error: "),
    (["--bogus"], "babyllama: error: "),
])
def test_an_unknown_flag_is_said_by_the_command_it_was_given_to(capsys, argv, prefix):
    """As the command's other usage mistakes are (`babyllama run: error: argument -t...`)."""
    from conftest import cli_error

    assert cli_error(capsys, *argv, code=2).startswith(f"{prefix}unrecognized arguments: {argv[-1]} (see --help)")


def test_unreadable_prompt_bytes(good_model):
    import subprocess
    import sys

    from conftest import ROOT
    model, tok = good_model
    proc = subprocess.run([sys.executable.encode(), b"-m", b"babyllama", b"run", bytes(model), b"-z", bytes(tok),
                           b"-i", b"caf\xe9 \xff"], capture_output=True, timeout=60, cwd=ROOT)
    assert_one_line_error(proc, "prompt (-i) is not valid UTF-8")


def test_steps_beyond_seq_len_are_clamped(good_model):
    model, tok = good_model
    from babyllama.api import clamp_steps
    assert clamp_steps(100000, 64) == 64 and clamp_steps(0, 64) == 64 and clamp_steps(10, 64) == 10
    proc = run_cli("run", str(model), "-z", str(tok), "-n", "100000", "-t", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.endswith(b"\n")
    # not without a word: the run stops at the context, well before the positions asked for
    assert b"warning: -n 100000 is more than the model's context (64 positions); it runs 64: --context-shift" \
        in proc.stderr, proc.stderr.decode()
    assert proc.stdout == run_cli("run", str(model), "-z", str(tok), "-n", "64", "-t", "0").stdout
    drafted = run_cli("run", str(model), "-z", str(tok), "-n", "65", "--draft", str(model), "-t", "0").stderr
    assert b"it runs 64\n" in drafted and b"--context-shift" not in drafted  # which --draft refuses
    bounded = run_cli("run", str(model), "-z", str(tok), "-n", "100000", "--max-new-tokens", "3", "-t", "0")
    assert bounded.returncode == 0 and b"warning" not in bounded.stderr  # 3 tokens: the context is no limit here


def test_max_new_tokens_beyond_the_context_is_said(good_model):
    """--max-new-tokens past what the context holds after the prompt stops at the context: said in one line, with
    how many it generates (all of them, as the text shows) and what goes on past it."""
    model, tok = good_model
    flags = ("run", str(model), "-z", str(tok), "-t", "0")
    proc = run_cli(*flags, "--max-new-tokens", "65")  # no prompt: BOS alone, 64 positions make 64 tokens
    assert proc.returncode == 0, proc.stderr.decode()
    assert (b"warning: --max-new-tokens 65 after the prompt's 1 tokens (with BOS) is more than the model's context "
            b"(64 positions) holds: it generates at most 64 (--context-shift goes on past it)") in proc.stderr
    assert proc.stdout == run_cli(*flags, "--max-new-tokens", "64").stdout  # what it says it generates
    for enough in (["--max-new-tokens", "64"], ["--max-new-tokens", "65", "-n", "10"],
                   ["--max-new-tokens", "65", "--context-shift"]):
        assert b"warning" not in run_cli(*flags, *enough).stderr, enough
    drafted = run_cli(*flags, "--max-new-tokens", "65", "--draft", str(model)).stderr
    assert b"it generates at most 64\n" in drafted
    assert b"--context-shift" not in drafted  # which --draft refuses


def test_max_new_tokens_beyond_the_context_is_said_for_a_batch_file(good_model, tmp_path):
    """Once, for the longest prompt (the least room), with no --context-shift remedy (--batch-file refuses it)."""
    model, tok = good_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nab\na\n")
    flags = ("run", str(model), "-z", str(tok), "-t", "0", "--batch-file", str(prompts))
    proc = run_cli(*flags, "--max-new-tokens", "62")
    assert proc.returncode == 0, proc.stderr.decode()
    assert re.search(rb"warning: --max-new-tokens 62 after the longest prompt's \(line 2\) (\d+) tokens \(with BOS\) "
                     rb"is more than the model's context \(64 positions\) holds: it generates at most (\d+)\n",
                     proc.stderr)
    assert proc.stderr.count(b"warning") == 1
    assert b"warning" not in run_cli(*flags, "--max-new-tokens", "62", "-n", "20").stderr


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate("x", topp=2), "topp must be in [0, 1], got 2"),
    (lambda m: m.generate("x", topp=-0.5), "topp must be in [0, 1]"),
    (lambda m: m.generate("x", temperature=-1), "temperature must be a finite number >= 0"),
    (lambda m: m.generate("x", temperature=float("nan")), "temperature must be a finite number >= 0"),
    (lambda m: m.generate("x", temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (lambda m: m.generate("x", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda m: m.generate("x", steps="10"), "steps must be an integer >= 0, got '10'"),
    (lambda m: m.generate(None), "a prompt must be a string"),
    # a lone surrogate is no character (the server refuses it in JSON; the CLI's -i, bytes that are not UTF-8)
    (lambda m: m.generate("caf\ud800"), "a prompt holds half a UTF-16 surrogate pair"),
    (lambda m: m.stream("\udcff"), "a prompt holds half a UTF-16 surrogate pair"),
    (lambda m: m.generate_batch(["ok", "\udfff!"]), "a prompt holds half a UTF-16 surrogate pair"),
    (lambda m: list(m.stream("x", steps=-1)), "steps must be an integer >= 0"),
    (lambda m: m.generate_batch("ab"), "a list of prompts, not one string"),
    (lambda m: m.generate_batch(None), "generate_batch takes a list of prompts, got NoneType"),
    (lambda m: m.generate_batch(["a", 5]), "a prompt must be a string"),
    (lambda m: m.generate_batch(["a", "b"], steps=[5]), "steps holds 1 values for 2 prompts"),
    (lambda m: m.generate_batch(["a"], steps="10"), "steps must be an integer >= 0 or a list of them"),
    (lambda m: m.generate_batch(["a"], steps=2.5), "steps must be an integer >= 0 or a list of them"),
    (lambda m: m.generate("x", seed="42"), "seed must be an integer in .0, 2..63. .or None., got '42'"),
    (lambda m: m.generate("x", seed=-1), "seed must be an integer in .0, 2..63. .or None., got -1"),
    # the generator keeps 64 bits: this one would sample seed 0's text
    (lambda m: m.generate("x", seed=2**64 - 1), "seed must be an integer in .0, 2..63. .or None., got 1844674"),
    (lambda m: m.generate_batch(["a"], seed=1.5), "seed must be an integer"),
    (lambda m: m.generate_batch(["a"], parallel=0), "parallel must be an integer >= 1, got 0"),
    (lambda m: m.generate_batch(["a"], parallel=2.0), "parallel must be an integer >= 1, got 2.0"),
])
def test_the_python_api_checks_what_the_cli_checks(good_model, call, message):
    from babyllama.api import load
    from babyllama.errors import BabyLlamaError

    model = load(good_model[0], good_model[1])
    with pytest.raises(BabyLlamaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(model)
    import numpy as np
    # NumPy numbers are fine
    assert model.generate("x", steps=np.int64(4), temperature=np.float32(0), seed=np.int32(3)).startswith("x")
    assert model.generate_batch(["x"], steps=np.int64(4), temperature=0)[0] == model.generate("x", 4, 0)
    assert model.generate_batch(["x"], steps=np.array([4]), temperature=0)[0] == model.generate("x", 4, 0)
    assert model.generate_batch((p for p in ["x"]), steps=4, temperature=0) == [model.generate("x", 4, 0)]


def test_the_python_api_takes_seed_0_as_a_seed_not_the_time(good_model, monkeypatch):
    """run.c's -s 0 means the time; the API's default (None) does, and seed=0 is reproducible as the server's."""
    import time

    from babyllama.api import load

    model = load(good_model[0], good_model[1])
    kw = dict(steps=30, temperature=1.0, topp=1.0)
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    first = model.generate("x", seed=0, **kw)
    batch = model.generate_batch(["x", "x"], seed=0, **kw)
    monkeypatch.setattr(time, "time", lambda: 2000.0)
    assert model.generate("x", seed=0, **kw) == first == batch[0]
    assert batch[1] == model.generate("x", seed=1, **kw)
    assert "".join(model.stream("x", seed=0, **kw)) == first[1:]


def test_max_new_tokens_alone_lets_the_python_api_run_to_the_context_as_the_cli_does(tmp_path):
    """-n unset with --max-new-tokens runs up to the context (cli.common.steps_flag); steps unset does too."""
    from conftest import byte_tokenizer

    from babyllama.api import load

    formats.save(random_weights(tiny_args(vocab_size=300, max_seq_len=400)), tmp_path / "m.bin", version=1)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    model = load(tmp_path / "m.bin", tmp_path / "tok.bin")
    kw = dict(temperature=0, max_new_tokens=300)
    whole = model.generate("x", steps=0, **kw)
    assert len(whole) > len(model.generate("x", steps=256, **kw))  # no stop token before 256 positions
    assert model.generate("x", **kw) == whole == model.generate_batch(["x"], **kw)[0]
    assert "".join(model.stream("x", **kw)) == whole[1:]
    assert model.generate("x", temperature=0) == model.generate("x", steps=256, temperature=0)


def test_the_python_api_warns_when_a_prompt_leaves_no_room(good_model):
    from babyllama.api import load

    model = load(good_model[0], good_model[1])
    with pytest.warns(UserWarning, match=r"the prompt is \d+ tokens .* nothing is generated"):
        assert model.generate("Once upon a time " * 40, max_new_tokens=10) == "Once upon a time " * 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.generate("Once", steps=8, temperature=0) != "Once"


def test_the_no_room_warning_points_at_the_callers_line(good_model):
    from babyllama.api import load

    model = load(good_model[0], good_model[1])
    n = len(model.tokenizer.encode("Once upon a time", bos=True))
    for call in (lambda: model.generate("Once upon a time", steps=n - 1),
                 lambda: list(model.stream("Once upon a time", steps=n - 1))):
        with pytest.warns(UserWarning, match="nothing is generated") as caught:
            call()
        assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():  # a prompt that fills the positions exactly still gets one token
        warnings.simplefilter("error")
        assert model.generate("Once upon a time", steps=n, temperature=0) != "Once upon a time"


def test_generate_batch_warns_about_each_prompt_that_leaves_no_room(good_model):
    from babyllama.api import load

    model = load(good_model[0], good_model[1])
    n = len(model.tokenizer.encode("Once upon a time", bos=True))
    with pytest.warns(UserWarning, match="nothing is generated") as caught:
        out = model.generate_batch(["Once", "Once upon a time", "Once upon a time"], steps=[n, n - 1, n], temperature=0)
    assert [str(w.message).split(" is ")[0] for w in caught] == ["prompt 1"]
    assert [w.filename for w in caught] == [__file__]
    assert out[1] == "Once upon a time" and out[2] != "Once upon a time"


def test_load_wants_paths():
    from babyllama.api import load
    from babyllama.errors import BabyLlamaError

    with pytest.raises(BabyLlamaError, match="model must be a path"):
        load(123)
    for kw in ({"model": ""}, {"tokenizer": ""}, {"lora": ""}):  # "" would name the current folder
        with pytest.raises(BabyLlamaError, match=f"{next(iter(kw))} is an empty path"):
            load(**kw)


def test_load_refuses_a_path_object_naming_bytes(tmp_path):
    """A PathLike whose fspath is bytes (os.scandir(b"...") gives such) is one error, not pathlib's TypeError."""
    from babyllama.api import load
    from babyllama.errors import BabyLlamaError

    (tmp_path / "m.bin").write_bytes(b"")
    entry = next(os.scandir(os.fsencode(tmp_path)))
    for kw in ({"model": entry}, {"tokenizer": entry}, {"lora": entry}):
        with pytest.raises(BabyLlamaError, match=f"{next(iter(kw))} must be a path whose name is a str"):
            load(**kw)


def test_load_refuses_what_the_cli_refuses_before_reading_the_model(tmp_path):
    """`plain` on a PyTorch device (the CLI's --plain --device cpu), flags that are no bools and names that are
    no strings: one error each, before the (here missing) model is read."""
    from babyllama.api import load
    from babyllama.errors import BabyLlamaError

    missing = tmp_path / "missing.bin"
    with pytest.raises(BabyLlamaError, match="--plain is the NumPy reference engine: it cannot be combined with "
                                             "--device cpu"):
        load(missing, plain=True, device="cpu")
    with pytest.raises(BabyLlamaError, match="mmap must be True, False or None, got 'yes'"):
        load(missing, mmap="yes")
    # flags taken by their truth ("no" ran the plain engine) and names that are no strings (a TypeError)
    for kw, message in (({"plain": "yes"}, "plain must be True or False, got 'yes'"),
                        ({"compile": "no"}, "compile must be True or False, got 'no'"),
                        ({"device": None}, "device must be a string, got None"),
                        ({"kv_cache": None}, "kv_cache must be a string, got None")):
        with pytest.raises(BabyLlamaError, match=message):
            load(missing, **kw)


def test_numpy_seeds_and_huge_temperatures_sample_without_numpy_warnings(good_model):
    """A NumPy integer seed near 2**63 is the same seed as the Python int (no wrap-around in seed + i), and so
    is a NumPy max_new_tokens near its type's bound (the positions it reaches once wrapped to nothing generated);
    a temperature or repeat penalty beyond fp32's range is a very flat distribution or the logits' limit: none
    leaks a NumPy RuntimeWarning."""
    import numpy as np

    from babyllama.api import load

    model = load(good_model[0], good_model[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_numpy = model.generate_batch(["Once", "Lily"], steps=12, temperature=1.0, seed=np.int64(2**63 - 1))
        assert as_numpy == model.generate_batch(["Once", "Lily"], steps=12, temperature=1.0, seed=2**63 - 1)
        assert model.generate("Once", steps=12, temperature=1e308, seed=3).startswith("Once")
        greedy = model.generate("Once", steps=12, temperature=0.0)
        assert len(greedy) > len("Once")
        for count in (np.int64(2**63 - 1), np.uint64(2**64 - 1), np.int32(2**31 - 1)):
            assert model.generate("Once", steps=12, temperature=0.0, max_new_tokens=count) == greedy
            assert model.generate_batch(["Once"], steps=12, temperature=0.0, max_new_tokens=count) == [greedy]
        penalized = model.generate("Once", steps=12, temperature=0.0, repeat_penalty=1e39)
        assert penalized.startswith("Once") and len(penalized) > len("Once")


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("command", [("run", "M", "--quantize", "q4_0", "-n", "4"),
                                     ("export", "OUT.gguf", "--model", "M", "--dtype", "q8_0"),
                                     ("export", "OUT.bin", "--model", "M", "--version", "3")])
def test_weights_beyond_the_fp16_block_scales_are_refused_not_run_as_nan(tmp_path, backend, command):
    """Q4_0/Q8_0 blocks keep an fp16 scale (largest |w| / 8 or / 127): a weight of 1e10 would make it infinite
    and its block NaN, which would run as garbage text with exit 0: one line says what fits instead."""
    from conftest import byte_tokenizer

    from babyllama import kernels_native

    if backend == "native" and kernels_native.compiler() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    if command[1].endswith(".gguf"):
        pytest.importorskip("gguf", reason="GGUF output needs the interop extra")
    weights = random_weights(tiny_args(vocab_size=300))
    weights.wq[0][3, 7] = 1e10
    formats.save(weights, tmp_path / "m.bin", version=1)
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    args = [str(tmp_path / "m.bin") if a == "M" else a.replace("OUT", str(tmp_path / "out")) for a in command]
    proc = run_cli(*args, env={"BABYLLAMA_KERNELS": backend})
    assert proc.returncode == 1, proc.stderr
    kind = "Q8_0" if "q8_0" in command else "Q4_0"
    assert proc.stderr.decode().endswith(f"does not fit {kind}'s fp16 block scales: keep this model in fp32, or in "
                                         "runq.c's Q8_0, whose scales are fp32 (a .bin of version 2: export --version "
                                         "2; run, chat, eval, serve --quantize q8_0)\n")
    assert not list(tmp_path.glob("out*"))


def test_the_builtin_tokenizer_fallback_names_the_one_run_c_would_read(tmp_path):
    """A .bin of the built-in tokenizer's size with no tokenizer.bin beside it runs with the built-in one, and
    says so (a model trained with a vocabulary of its own would print garbage); a different tokenizer.bin in the
    current folder (run.c's default) is named."""
    from babyllama.loading import BUILTIN_TOKENIZER

    (tmp_path / "models").mkdir()
    formats.save(random_weights(tiny_args(vocab_size=512)), tmp_path / "models" / "m.bin")
    argv = ("run", "models/m.bin", "-t", "0", "-n", "3")
    byte_tokenizer(512).save(tmp_path / "tokenizer.bin")
    note = ("babyllama: note: models/m.bin has no tokenizer.bin beside it and runs with the built-in tokenizer "
            "(llama2.c's 512 tokens)")
    proc = run_cli(*argv, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 0 and note + "; the tokenizer.bin in the current folder, run.c's default, is read" in err
    (tmp_path / "tokenizer.bin").write_bytes(BUILTIN_TOKENIZER.read_bytes())
    proc = run_cli(*argv, cwd=tmp_path)
    hint = "; pass --tokenizer (-z) if it was trained with another\n"
    assert proc.returncode == 0 and note + hint in proc.stderr.decode()


def test_a_program_quiets_or_takes_in_the_librarys_notes_with_logging(tmp_path):
    """The notes babyllama prints on stderr go through the "babyllama" logger: by default the lines the CLI
    prints, none at all once the logger is set above INFO, and in the program's own log format once it
    propagates to the program's handlers instead."""
    import subprocess
    import sys

    formats.save(random_weights(tiny_args(vocab_size=512)), tmp_path / "m.bin")
    load = "babyllama.load('m.bin').generate('x', steps=3, temperature=0.0)"
    quiet = "import logging, babyllama; logging.getLogger('babyllama').setLevel(logging.ERROR); "
    quiet_first = "import logging; logging.getLogger('babyllama').setLevel(logging.ERROR); import babyllama; "
    own = ("import logging, babyllama; log = logging.getLogger('babyllama'); log.handlers.clear(); "
           "log.propagate = True; logging.basicConfig(format='APP %(levelname)s %(name)s: %(message)s'); ")

    def stderr_of(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    note = "babyllama: note: m.bin has no tokenizer.bin beside it and runs with the built-in tokenizer"
    assert stderr_of("import babyllama; " + load).startswith(note)
    assert stderr_of(quiet + load) == "" and stderr_of(quiet_first + load) == ""
    assert stderr_of(own + load).startswith(f"APP INFO babyllama: {note}")
    # a file name's bytes that are not UTF-8 reach the program's handlers as U+FFFD (a UTF-8 log file takes it)
    os.rename(tmp_path / "m.bin", os.fsencode(tmp_path) + b"/caf\xe9.bin")
    latin = load.replace("'m.bin'", "__import__('os').fsdecode(b'caf\\xe9.bin')")
    assert stderr_of(own + latin).startswith("APP INFO babyllama: babyllama: note: caf\ufffd.bin has no ")


@pytest.mark.parametrize("argv", [
    ["export-tokenizer", ""], ["export-tokenizer", "-t", ""], ["export-tokenizer", "m.model", "-o", ""],
    ["export", "", "--model", "m.bin"], ["export", "o.bin", "--model", ""], ["export", "o.bin", "--checkpoint", ""],
    ["export", "o", "--hf", ""], ["export", "o", "--meta-llama", ""], ["export", "o.bin", "--model", "m", "-z", ""],
    ["export", "o.bin", "--model", "m", "--lora", ""],
    ["data", "download", "--url", ""], ["data", "download", "--data-dir", ""],
    ["data", "train-vocab", "--vocab-size", "300", "--input", ""],
    ["data", "train-vocab", "--vocab-size", "300", "--data-dir", ""],
    ["data", "pretokenize", "--input", ""], ["data", "pretokenize", "--tokenizer", ""],
    ["data", "pretokenize", "--out-dir", ""], ["data", "pretokenize", "--data-dir", ""],
    ["data", "instruct", "--input", ""], ["data", "instruct", "--out-dir", ""], ["data", "instruct", "--model", ""],
    ["data", "instruct", "-z", ""],
    ["eval", "--data", ""], ["eval", "--instruct", ""],
    ["bench", "--output", ""], ["bench", "--cache-dir", ""], ["bench", "--reference", ""],
    ["bench", "--reference-q", ""],
    ["train", ""], ["finetune", ""], ["finetune", "--hf", ""], ["finetune", "--meta-llama", ""],
    ["finetune", "--tokenizer", ""], ["finetune", "-z", ""], ["sample", "-z", ""],
    ["download", "stories260K", "--dir", ""], ["download", "stories260K", "--url-base", ""],
])
def test_an_empty_path_or_url_is_a_usage_error(argv, capsys):
    """An unset variable ("$OUT") read as the option left out (a default used instead, silently), or as the
    current folder (read recursively, or written into): a usage error before anything runs."""
    err = cli_error(capsys, *argv, code=2)
    assert re.search(r"the (path|URL) is empty", err), err


@pytest.fixture
def link_loop(tmp_path):
    """loopA -> loopB -> loopA: every path through them fails with ELOOP (Path.exists() says False)."""
    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    return tmp_path / "loopA"


@pytest.mark.parametrize("argv, what", [
    (["data", "train-vocab", "--vocab-size", "300", "--input", "{loop}"], "input"),
    (["data", "pretokenize", "--tokenizer", "{loop}", "--input", "{text}"], "tokenizer"),
    (["run", "{model}", "-z", "{tok}", "--lora", "{loop}/adapter.safetensors"], "adapter file"),
    (["export", "--hf", "{loop}", "{out}"], "Hugging Face model"),
    (["train", "--data_dir={loop}", "--max_iters=1", "--warmup_iters=0"], "data_dir"),
])
def test_a_loop_of_symbolic_links_is_called_one(tmp_path, link_loop, good_model, argv, what):
    """Given a loop of links, these said "not found" (or "no such file or directory"): it is there, and cannot be
    followed. The error says so, as `run` does for a model file."""
    model, tok = good_model
    (tmp_path / "t.txt").write_text("Once upon a time.\n")
    argv = [a.format(loop=link_loop, model=model, tok=tok, out=tmp_path / "o.bin", text=tmp_path / "t.txt")
            for a in argv]
    if argv[0] == "train":
        pytest.importorskip("torch")
    assert_one_line_error(run_cli(*argv), f"cannot read {what} {link_loop}")
    assert "Too many levels of symbolic links" in run_cli(*argv).stderr.decode()


def test_a_loop_of_symbolic_links_as_an_output_folder_is_called_one(tmp_path, link_loop, good_model):
    """As an output folder a loop was "a symbolic link to loopB, which does not exist" (loopB exists)."""
    model, _ = good_model
    err = assert_one_line_error(run_cli("export", "--model", str(model), "--to", "hf", str(link_loop)),
                                f"{link_loop} cannot be followed: Too many levels of symbolic links")
    assert "which does not exist" not in err


def test_finetune_on_a_loop_of_symbolic_links_is_one_line(tmp_path, link_loop):
    """finetune's check that the base lies outside out_dir resolved the base's path: a loop raised RuntimeError
    (a traceback) before the base was opened and found unreadable."""
    pytest.importorskip("torch")
    (tmp_path / "ft.jsonl").write_text('{"prompt": "Hi", "response": "Hello"}\n')
    proc = run_cli("finetune", f"--base={link_loop}", f"--data={tmp_path / 'ft.jsonl'}",
                   f"--out_dir={tmp_path / 'run'}", "--lora_rank=2", "--max_iters=1", "--device=cpu")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert f"cannot read model file {link_loop}: Too many levels of symbolic links" in proc.stderr.decode()


@pytest.mark.parametrize("argv", [
    ["export", "--model", "{model}", "--to", "gguf", "{dir}/"],
    ["export", "--model", "{model}", "--version", "1", "{dir}/"],
    ["bench", "--shapes", "builtin", "--output", "{dir}/"],
])
def test_an_output_file_given_with_a_trailing_slash_is_refused(tmp_path, good_model, argv):
    """Path() drops a trailing slash: export wrote a file named like the folder meant (exit 0)."""
    model, _ = good_model
    argv = [a.format(model=model, dir=tmp_path / "newdir") for a in argv]
    assert_one_line_error(run_cli(*argv), "ends with a slash, which names a folder: give a file name")
    assert not (tmp_path / "newdir").exists()


def test_bench_output_in_its_model_cache_is_refused(tmp_path):
    """A table written over a cached bench model left every later bench failing on it ("dim=1751343437")."""
    cache = tmp_path / "cache"
    out = cache / "builtin-fp32.bin"
    assert_one_line_error(run_cli("bench", "--cache-dir", str(cache), "--shapes", "builtin", "--output", str(out)),
                          f"--output {out} would be a model file in the bench's model cache")
    assert not out.exists()


def test_data_instruct_takes_a_max_stories_beyond_a_machine_integer(tmp_path):
    """--max-stories 2**63 reached islice, which takes at most sys.maxsize: a traceback. It means every story."""
    from conftest import make_story_corpus

    corpus = make_story_corpus(tmp_path / "stories.txt", 30)
    proc = run_cli("data", "instruct", "--input", str(corpus), "--out-dir", str(tmp_path / "out"),
                   "--val-count", "2", "--max-stories", str(2**63))
    assert proc.returncode == 0, proc.stderr.decode()[-1500:]
