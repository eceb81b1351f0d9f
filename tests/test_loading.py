"""Any model babyllama reads runs directly (format told by content, converted in memory), with the tokenizer
that comes with it; and the text the CLI and the API produce: whole UTF-8 characters, long flag names,
generated-token budgets."""

from __future__ import annotations

import io

import pytest
from conftest import random_weights, run_cli, tiny_args, torch_checkpoint

from babyllama import formats
from babyllama.loading import detect_format, open_model
from babyllama.printer import Printer
from babyllama.tokenizer import BOS, Tokenizer

PROMPT = "the cat sat on"


def _greedy(model, *extra):
    proc = run_cli("run", str(model), "-t", "0", "-n", "48", "-i", PROMPT, *extra)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


@pytest.fixture
def tiny_bin(tmp_path, sp_model):
    """A random tiny model (vocab 320) as a .bin with its tokenizer.bin beside it, and the sentencepiece model."""
    args = tiny_args(vocab_size=320, rope_theta=250000.0, norm_eps=1e-6, shared_classifier=False)
    formats.save(random_weights(args, seed=3, scale=0.3), tmp_path / "m.bin")
    Tokenizer.from_sentencepiece(sp_model).save(tmp_path / "tokenizer.bin")
    return tmp_path / "m.bin"


def test_gguf_runs_directly_with_its_own_vocabulary(tmp_path, tiny_bin, sp_model):
    pytest.importorskip("gguf")
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    out = gguf_dir / "model-without-a-suffix"  # told by content, not by name
    assert run_cli("export", str(out), "--to", "gguf", "--model", str(tiny_bin), "--tokenizer", str(sp_model)
                   ).returncode == 0
    assert detect_format(out) == "gguf"
    direct, ref = _greedy(out), _greedy(tiny_bin)
    assert direct.stdout == ref.stdout and len(ref.stdout) > len(PROMPT) + 20
    assert b"loaded GGUF" in direct.stderr and b"converted in memory" in direct.stderr


def test_hf_folder_runs_directly_with_its_tokenizer_model(tmp_path, tiny_bin, sp_model):
    pytest.importorskip("safetensors")
    folder = tmp_path / "hf"
    assert run_cli("export", str(folder), "--to", "hf", "--model", str(tiny_bin), "--tokenizer", str(sp_model)
                   ).returncode == 0
    assert detect_format(folder) == "hf"
    assert _greedy(folder).stdout == _greedy(tiny_bin).stdout
    (folder / "tokenizer.model").unlink()
    proc = run_cli("run", str(folder), "-t", "0", "-n", "8")
    assert proc.returncode == 1 and b"no tokenizer.model in the model folder; pass -z" in proc.stderr
    assert _greedy(folder, "-z", str(tmp_path / "tokenizer.bin")).stdout == _greedy(tiny_bin).stdout


def test_checkpoint_and_meta_folder_run_directly(tmp_path, sp_model):
    torch = pytest.importorskip("torch")  # noqa: F841
    from babyllama.interop.meta import save_meta

    args = tiny_args(vocab_size=320)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch_checkpoint(run_dir / "ckpt.pt", args, seed=4, scale=0.3)
    Tokenizer.from_sentencepiece(sp_model).save(run_dir / "tokenizer.bin")
    assert run_cli("export", str(run_dir / "m.bin"), "--checkpoint", str(run_dir)).returncode == 0
    ref = _greedy(run_dir / "m.bin").stdout
    for path in (run_dir, run_dir / "ckpt.pt"):
        assert detect_format(path) == "checkpoint"
        assert _greedy(path).stdout == ref
    meta = save_meta(formats.load(run_dir / "m.bin"), tmp_path / "llama-tiny", 2)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())  # Meta's place: beside the size folder
    assert detect_format(meta) == "meta"
    assert _greedy(meta).stdout == ref


def test_eval_reads_any_format_too(tmp_path, tiny_bin, sp_model):
    pytest.importorskip("gguf")
    (tmp_path / "data.txt").write_text("the cat sat on the mat.\n<|endoftext|>\nthe dog ran to the park.\n")
    out = tmp_path / "m.gguf"
    assert run_cli("export", str(out), "--model", str(tiny_bin), "--tokenizer", str(sp_model)).returncode == 0
    figures = [run_cli("eval", str(m), "--data", str(tmp_path / "data.txt"), "--json").stdout for m in (tiny_bin, out)]
    assert figures[0].split(b'"data"')[1] == figures[1].split(b'"data"')[1]


def test_open_model_describes_what_it_loaded(tiny_bin):
    source = open_model(tiny_bin)
    assert source.kind == "bin" and "dim 32, 2 layers, vocab 320" in source.describe()


# ------------------------------------------------------------------------------------------- text output


def test_multibyte_prompt_prints_intact_and_raw_bytes_drops_it_like_run_c(tiny_bin):
    prompt = "Zoë saw 日本語 and a 🐉"
    proc = run_cli("run", str(tiny_bin), "-t", "0", "-n", "100", "-i", prompt)
    assert proc.returncode == 0 and proc.stdout.decode().startswith(prompt)
    raw = run_cli("run", str(tiny_bin), "-t", "0", "-n", "100", "-i", prompt, "--raw-bytes")
    # run.c's safe_printf drops every byte token that is not printable ASCII: only the ASCII survives
    assert raw.stdout.startswith(b"Zo saw  and a ")


def test_characters_split_across_byte_tokens_print_whole(sp_model):
    tok = Tokenizer.from_sentencepiece(sp_model)
    ids = tok.encode("a 🐉 and ë", bos=True)
    assert sum(1 for t in ids if tok.pieces[t].startswith(b"<0x")) >= 6  # spelled in byte tokens
    out = io.BytesIO()
    printer = Printer(tok, out=out)
    for t in ids[1:]:
        printer.token(t)
        assert out.getvalue().decode("utf-8")  # never a partial character on the way
    printer.end()
    assert out.getvalue().decode() == "a 🐉 and ë\n"
    stream = tok.stream(BOS)
    pieces = [stream.push(t) for t in ids[1:]]
    assert "".join(pieces) + stream.flush() == "a 🐉 and ë" == tok.decode(ids)
    assert "🐉" in pieces  # released in one piece when its fourth byte arrived
    cut = tok.stream(BOS)
    assert "".join(cut.push(t) for t in ids[1:4]) + cut.flush() == "a \ufffd"  # an unfinished character


def test_model_stream_yields_generate_text(stories260k, tok512):
    from babyllama import load

    model = load(stories260k, tok512)
    for prompt in ("", "Once upon a time"):
        pieces = list(model.stream(prompt, steps=60, temperature=0.0))
        text = model.generate(prompt, steps=60, temperature=0.0)
        assert len(pieces) > 20 and text == prompt + "".join(pieces)
        cli = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "60", "-i", prompt)
        assert cli.stdout.decode() == text + "\n"  # the CLI prints the same text
    sampled = ["".join(model.stream("A dog", steps=50, temperature=1.0, seed=s)) for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_long_flag_names_are_aliases(stories260k, tok512):
    short = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0.8", "-p", "0.9", "-s", "3", "-n", "40",
                    "-i", "A cat")
    long = run_cli("run", str(stories260k), "--tokenizer", str(tok512), "--temperature", "0.8", "--top-p", "0.9",
                   "--seed", "3", "--steps", "40", "--prompt", "A cat")
    assert short.returncode == long.returncode == 0 and short.stdout == long.stdout


def test_max_new_tokens_counts_generated_tokens_only(stories260k, tok512):
    tok = Tokenizer.load(tok512)
    n_prompt = len(tok.encode("Once upon a time", bos=True))
    new = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-i", "Once upon a time",
                  "--max-new-tokens", "25")
    steps = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-i", "Once upon a time",
                    "-n", str(n_prompt + 25 - 1))
    assert new.returncode == 0 and new.stdout == steps.stdout
    from babyllama import load

    model = load(stories260k, tok512)
    ids = tok.encode(model.generate("Once upon a time", temperature=0.0, max_new_tokens=25), bos=True)
    assert len(ids) - n_prompt == 25


def test_prompt_longer_than_steps_warns(stories260k, tok512):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "-t", "0", "-n", "3", "-i", "Once upon a time")
    assert proc.returncode == 0
    assert b"warning: the prompt is" in proc.stderr and b"nothing will be generated" in proc.stderr
