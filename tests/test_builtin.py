"""The built-in story model: `babyllama run` with no model argument, and its card's figures reproduced
by `babyllama eval` (babyllama/assets/: model.bin, tokenizer.bin, model.json)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from conftest import ROOT, run_cli, shared_file

from babyllama import formats
from babyllama.catalog import BUILTIN_CARD, builtin_card
from babyllama.loading import BUILTIN_MODEL, BUILTIN_TOKENIZER
from babyllama.tokenizer import Tokenizer

SIZE_BUDGET = 8_000_000  # model + tokenizer + card, bytes


def test_shipped_files_fit_the_budget_and_match_the_card():
    card = builtin_card()
    files = (BUILTIN_MODEL, BUILTIN_TOKENIZER, BUILTIN_CARD)
    assert sum(f.stat().st_size for f in files) <= SIZE_BUDGET
    for f in (BUILTIN_MODEL, BUILTIN_TOKENIZER):
        entry = card["files"][f.name]
        assert entry["bytes"] == f.stat().st_size
        assert entry["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    args = formats.load(BUILTIN_MODEL).args
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        assert card["config"][key] == getattr(args, key), key
    assert Tokenizer.load(BUILTIN_TOKENIZER).vocab_size == args.vocab_size
    assert card["data"]["license"] == "CDLA-Sharing-1.0"
    assert card["training"]["iters"] > 0 and card["reproduce"].startswith("scripts/")


def test_console_script_run_without_model_streams_a_story():
    exe = shutil.which("babyllama")
    if exe is None:
        pytest.skip("the babyllama console script is not installed (pip install -e .; .ci/run does)")
    proc = subprocess.run([exe, "run", "-t", "0", "-n", "60"], capture_output=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    assert text.startswith("Once upon a time") or text.startswith("One day"), text
    assert len(text.split()) >= 25  # 60 positions of a 1K-token vocabulary: a sentence or three
    assert b"achieved tok/s:" in proc.stderr


def test_run_without_model_samples_varied_stories():
    outs = {run_cli("run", "-n", "40", "-s", str(seed)).stdout for seed in (1, 2)}
    assert len(outs) == 2 and all(len(o.split()) >= 15 for o in outs)


@pytest.mark.parametrize("slice_name,flags", [("valid_first20", ["--max-stories", "20"])])
def test_eval_of_builtin_reproduces_its_card(slice_name, flags):
    """The card's figures on a 20-story slice of valid.txt (the full-file figures take ~1 min: see the
    card's eval.valid and its command)."""
    data = shared_file("data/tinystories/valid.txt")
    want = builtin_card()["eval"][slice_name]
    proc = run_cli("eval", "--data", str(data), *flags, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    assert (got["documents"], got["tokens"], got["bytes"]) == (want["documents"], want["tokens"], want["bytes"])
    assert got["loss"] == pytest.approx(want["loss"], abs=2e-3)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], abs=2e-3)


def test_models_lists_the_builtin_with_its_card_loss():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr.decode()
    row = next(line for line in proc.stdout.decode().splitlines() if line.startswith("builtin "))
    assert f"{builtin_card()['val_loss']:.3f}" in row and "4096" in row
