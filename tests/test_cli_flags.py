"""One flag, one behaviour: the same spellings, checks, exit status and words in every command that takes it."""

from __future__ import annotations

import argparse
import importlib.util
import io

import pytest
from conftest import cli_error, one_line_error, run_cli

from babyllama.cli import build_parser, main


def parsers(parser: argparse.ArgumentParser):
    """`parser` and every (sub)command parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                yield from parsers(sub)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_no_command_reads_a_flag_by_a_prefix_of_its_name():
    assert all(not p.allow_abbrev for p in parsers(build_parser()))


@pytest.mark.parametrize("argv, typed, near", [
    (["export", "m.bin", "--mod", "x.bin"], "--mod", "--model"),  # one of a required group: argparse names the group
    (["eval", "--dat", "x.txt"], "--dat", "--data"),
    (["data", "pretokenize", "--vocab", "400", "--input", "x"], "--vocab", "--vocab-size, --vocab_size"),
    (["run", "--temp=0"], "--temp=0", "--temperature"),
    (["serve", "--nonsense", "1"], "--nonsense", None),
])
def test_a_shortened_or_unknown_flag_is_named_as_typed(capsys, argv, typed, near):
    message = cli_error(capsys, *argv, code=2)
    assert f"unrecognized arguments: {typed}" in message and "is required" not in message
    assert (f"this command's that start so: {near})" in message) if near else "start so" not in message


def test_a_value_that_looks_like_a_flag_after_an_equals_sign_is_a_value():
    assert parse("run", "--prompt=--x").prompt == "--x"


@pytest.mark.parametrize("argv", [
    ["serve", "--model", "X.gguf"],  # export's and data instruct's --model FILE: not serve's --model-name
    ["serve", "--mode", "x"],
    ["run", "--max", "5"],  # --max-new-tokens and --max_new_tokens: one flag, not an ambiguous prefix
])
def test_a_prefix_of_a_flag_is_an_unknown_flag(monkeypatch, capsys, argv):
    from babyllama.cli import run, serve

    for module, name in ((serve, "cmd_serve"), (run, "cmd_run")):  # read as another flag, the command would run
        monkeypatch.setattr(module, name, lambda args: pytest.fail(f"ran with {args}"))
    assert f"unrecognized arguments: {argv[1]}" in cli_error(capsys, *argv, code=2)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--data", "x.txt", "--max-stories", "0"], "--max-stories must be >= 1, got 0"),
    (["data", "instruct", "--max-stories", "0"], "--max-stories must be >= 1, got 0"),
    (["export", "o.bin", "--model", "m.bin", "--max-seq-len", "0"], "--max-seq-len must be >= 1, got 0"),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--max-seq-len", "0"], "--max-seq-len must be >= 1, got 0"),
    (["data", "train-vocab", "--vocab-size", "0"], "--vocab-size must be in 260..65536"),
    # the size train-vocab would refuse is not suggested to it
    (["data", "pretokenize", "--vocab-size", "100", "--data-dir", "nowhere"], "--vocab-size must be in 260..65536"),
    (["data", "pretokenize", "--vocab_size=0"], "--vocab-size 0 is tinystories.py's Llama 2 vocabulary"),
    (["data", "pretokenize", "--tokenizer", "t.bin", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["data", "train-vocab", "--vocab-size", "300", "--max-chars", "-5"], "--max-chars must be >= 1, got -5"),
    (["data", "instruct", "--max-word-df", "1.5"], "--max-word-df must be in (0, 1], got 1.5"),
    (["data", "download", "--time-limit", "0"], "--time-limit must be a positive number of seconds, got 0"),
    (["eval", "--instruct", "x.jsonl", "--max_new_tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["bench", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["bench", "--plain-tokens", "-1"], "--plain-tokens must be >= 1, got -1"),
    (["sample", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    # train's range for seeds: Random(-7) is Random(7), and a seed past 64 bits another one's
    (["data", "instruct", "--seed", "-7"], "--seed must be in [0, 2**63), got -7"),
    (["data", "instruct", "--seed", str(2**70)], f"--seed must be in [0, 2**63), got {2**70}"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v)[:48])
def test_a_value_out_of_a_flags_range_is_a_bad_value_in_every_command(capsys, argv, message):
    assert cli_error(capsys, *argv, code=1).startswith(f"babyllama: error: {message}")


@pytest.mark.parametrize("argv", [
    ["eval", "--data", "x.txt", "--max-stories", "many"],
    ["data", "instruct", "--max-stories", "many"],
    ["data", "instruct", "--seed", "x"],
    ["bench", "--rounds", "1.5"],
])
def test_a_value_not_of_the_flags_kind_does_not_parse(capsys, argv):
    assert f"argument {argv[-2]}: invalid" in cli_error(capsys, *argv, code=2)


@pytest.mark.parametrize("argv, dest", [
    (["sample"], "compile"), (["train"], "cfg_compile"), (["finetune"], "cfg_compile"),
])
def test_compile_takes_a_value_where_llama2c_s_scripts_do(argv, dest):
    assert getattr(parse(*argv, "--compile"), dest) is True
    assert getattr(parse(*argv, "--compile=true"), dest) is True
    assert getattr(parse(*argv, "--compile=False"), dest) is False


@pytest.mark.parametrize("command", ["run", "chat", "bench"])
def test_compile_is_a_switch_before_a_model(command):
    args = parse(command, "--compile", "m.bin") if command != "bench" else parse(command, "--compile")
    assert args.compile is True and (command == "bench" or args.checkpoint == "m.bin")


@pytest.mark.parametrize("given, export_name, train_name", [
    ("f32", "f32", "float32"), ("fp32", "f32", "float32"), ("float32", "f32", "float32"),
    ("f16", "f16", "float16"), ("fp16", "f16", "float16"), ("float16", "f16", "float16"),
    ("bf16", "bf16", "bfloat16"), ("bfloat16", "bf16", "bfloat16"),
])
def test_dtype_takes_both_families_of_names(given, export_name, train_name):
    from babyllama.train.config import build_config

    assert parse("export", "o", "--model", "m.bin", "--dtype", given).dtype == export_name
    for command in ("train", "finetune"):
        overrides = {"dtype": parse(command, f"--dtype={given}").cfg_dtype, "data_dir": "d"}
        assert build_config(None, overrides, checked=False).dtype == train_name


def test_dtype_names_the_commands_own_spellings_when_refused(capsys):
    assert "choose from 'f32', 'f16', 'bf16'" in cli_error(capsys, "export", "o", "--model", "m", "--dtype", "half",
                                                           code=2)
    assert "dtype must be auto, float32, bfloat16 or float16, got 'half'" in cli_error(capsys, "train",
                                                                                        "--dtype=half")


def test_the_spellings_other_commands_accept():
    assert parse("eval", "--instruct", "x", "--max_new_tokens", "3").max_new_tokens == 3
    assert parse("finetune", "-z", "tok.model").cfg_tokenizer == "tok.model"
    args = parse("data", "pretokenize", "--tokenizer", "t", "--max_seq_len", "9", "--word_weight", "2",
                 "--skip_bad_lines", "--data_dir", "d", "--out_dir", "o")
    assert (args.max_seq_len, args.word_weight, args.skip_bad_lines, args.data_dir, args.out_dir) == (9, 2, True, "d",
                                                                                                      "o")


@pytest.mark.parametrize("argv", [
    ["run"], ["chat"], ["eval", "--data", "x.txt"], ["sample"], ["export", "o.bin", "--model", "m.bin"],
    ["train"], ["finetune"], ["data", "pretokenize", "--tokenizer", "t.bin"], ["serve"],
])
@pytest.mark.parametrize("value", ["abc", "0", "-3", "", "8,"])
def test_a_bad_omp_num_threads_is_one_error_line_in_every_command(monkeypatch, capsys, argv, value):
    from babyllama.cli import serve

    monkeypatch.setattr(serve, "cmd_serve", lambda args: pytest.fail("served"))  # said before any command runs
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert f"OMP_NUM_THREADS={value!r} is not a thread count" in cli_error(capsys, *argv)


def test_a_bad_omp_num_threads_is_said_before_pytorch_loads():
    """libgomp (PyTorch's) would print a blank line and its own "Invalid value" line."""
    one_line_error(run_cli("sample", "--checkpoint", "nothere", env={"OMP_NUM_THREADS": "abc"}),
                   "OMP_NUM_THREADS='abc' is not a thread count")


def test_a_thread_count_per_nesting_level_is_fine(monkeypatch):
    from babyllama.threads import check_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "8,4")
    check_environment()


@pytest.mark.parametrize("installed, said", [
    (True, "numba is installed but cannot run here (the line above says why); running on NumPy"),
    (False, "numba is not installed (pip install 'babyllama[fast]'); running on NumPy"),
])
def test_numba_asked_for_is_called_not_installed_only_when_it_is_not(monkeypatch, capsys, installed, said):
    from babyllama import kernels

    find_spec, load = importlib.util.find_spec, kernels._load
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "numba" else find_spec(name, *a))
    monkeypatch.setattr(kernels, "_load", lambda name, named: None if name == "numba" else load(name, named))
    monkeypatch.setattr(kernels, "_backend", None)
    assert kernels.use_backend("numba") == "numpy"
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "-i", "Once upon", "-n", "8"], ["chat", "-n", "8"]])
def test_an_unknown_kernel_backend_is_said_before_anything_is_printed(monkeypatch, capsys, argv):
    from babyllama import kernels

    monkeypatch.setenv("BABYLLAMA_KERNELS", "bogus")
    monkeypatch.setattr(kernels, "_backend", None)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and "BABYLLAMA_KERNELS='bogus' is not a kernel backend" in err
