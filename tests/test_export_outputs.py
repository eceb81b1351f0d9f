"""Where `export` and `export-tokenizer` write: targets that are not regular files, unusable folders,
tokenizers checked before anything is written, tokenizers left from earlier exports, file modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_FILE_LIMIT, byte_tokenizer, cli_error, random_weights, tiny_args

from babyllama import formats, safeio
from babyllama.cli import build_parser, main
from babyllama.errors import BabyLlamaError
from babyllama.export import infer_target
from babyllama.tokenizer import Tokenizer


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A random 300-token model with its tokenizer.bin beside it, in a folder of its own."""
    folder = tmp_path / "src"
    folder.mkdir()
    formats.save(random_weights(tiny_args()), folder / "m.bin")
    byte_tokenizer(300).save(folder / "tokenizer.bin")
    return folder / "m.bin"


@pytest.fixture
def tiny_gguf(tmp_path, tiny, capsys) -> Path:
    """The tiny model as GGUF: a source that carries its vocabulary."""
    pytest.importorskip("gguf")
    out = tmp_path / "src" / "m.gguf"
    assert main(["export", str(out), "--model", str(tiny), "-z", str(tiny.with_name("tokenizer.bin"))]) == 0  # as run's
    capsys.readouterr()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ------------------------------------------------------------------------------------- targets and folders


@pytest.mark.parametrize("name, extra", [("p.bin", []), ("p.gguf", ["--tokenizer", "{tok}"])])
def test_export_refuses_a_named_pipe_as_output_and_leaves_it(tmp_path, capsys, tiny, name, extra):
    if name.endswith(".gguf"):
        pytest.importorskip("gguf")
    pipe = tmp_path / name
    os.mkfifo(pipe)
    argv = [a.format(tok=tiny.with_name("tokenizer.bin")) for a in extra]
    msg = cli_error(capsys, "export", str(pipe), "--model", str(tiny), *argv)
    assert f"output {pipe} is a named pipe, not a regular file" in msg
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and leftovers(tmp_path) == []


def test_export_tokenizer_refuses_a_named_pipe_as_output(tmp_path, capsys, sp_model):
    pipe = tmp_path / "p.bin"
    os.mkfifo(pipe)
    assert "is a named pipe, not a regular file" in cli_error(capsys, "export-tokenizer", str(sp_model), "-o",
                                                             str(pipe))
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_every_atomic_write_refuses_a_target_that_is_not_a_regular_file(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for write in (lambda: safeio.write_text(pipe, "x"), lambda: safeio.commit(tmp_path / "new", pipe)):
        (tmp_path / "new").write_text("x")
        with pytest.raises(BabyLlamaError, match="is a named pipe"):
            write()
        assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


@pytest.mark.parametrize("argv, message", [
    (["export", "{file}/x.bin", "--model", "{model}"], "cannot write output {file}/x.bin: {file} is not a directory"),
    (["export", "{file}/x", "--to", "hf", "--model", "{model}"], "{file} is not a directory"),
    (["export", "{file}/x.gguf", "--model", "{model}", "--tokenizer", "{tok}"], "{file} is not a directory"),
    (["export", "{dir}", "--to", "gguf", "--model", "{model}", "--tokenizer", "{tok}"],
     "output {dir} is a directory, not a regular file"),
    (["export", "{dir}", "--to", "bin", "--model", "{model}"], "output {dir} is a directory, not a regular file"),
    (["export", "/proc/babyllama-test/x.bin", "--model", "{model}"], "cannot write output /proc/babyllama-test"),
    (["export", "/proc/babyllama-test", "--to", "hf", "--model", "{model}"],
     "cannot write output folder /proc/babyllama-test"),
    (["export-tokenizer", "{sp}", "-o", "{dir}"], "tokenizer {dir} is a directory, not a regular file"),
    (["export-tokenizer", "{sp}", "-o", "{file}/t.bin"], "{file} is not a directory"),
    (["export", "{link}/x.bin", "--model", "{model}"],
     "cannot write output {link}/x.bin: {link} is a symbolic link to {dir}/gone, which does not exist"),
    (["export", "{link}", "--to", "hf", "--model", "{model}"], "{link} is a symbolic link to {dir}/gone, which"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40])
def test_an_unusable_output_location_is_one_line_and_leaves_nothing(tmp_path, capsys, tiny, sp_model, argv, message):
    if any(a.endswith(".gguf") or a == "gguf" for a in argv):
        pytest.importorskip("gguf")
    if any(a.startswith("/proc") for a in argv) and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no file can be created")
    names = {"file": tmp_path / "a_file", "dir": tmp_path / "a_dir", "model": tiny, "sp": sp_model,
             "tok": tiny.with_name("tokenizer.bin"), "link": tmp_path / "a_link"}
    names["file"].write_text("not a folder")
    names["dir"].mkdir()
    names["link"].symlink_to(names["dir"] / "gone")  # mkdir says only "File exists" for a link to nothing
    assert message.format(**names) in cli_error(capsys, *(a.format(**names) for a in argv))
    assert leftovers(tmp_path) == [] and list(names["dir"].iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["export", "{new}/m.bin", "--model", "{model}", "--tokenizer", "{big}"],
    ["export", "{new}/m.bin", "--model", "{model}", "--version", "3"],
    ["export", "{new}/m.gguf", "--model", "{model}", "--tokenizer", "{big}"],
    ["export", "{new}/hf", "--model", "{model}", "--tokenizer", "{big}"],
    ["export-tokenizer", "{model}", "-o", "{new}/tok.bin"],
], ids=lambda v: " ".join(v)[:40])
def test_a_refused_export_leaves_no_folder_behind(tmp_path, capsys, tiny, argv):
    """OUT's missing folders are made before the model and tokenizer checks that may refuse the export: a refused
    one removes them again."""
    pytest.importorskip("gguf")
    byte_tokenizer(400).save(tmp_path / "big.bin")
    names = {"new": tmp_path / "new" / "deeper", "model": tiny, "big": tmp_path / "big.bin"}
    formats.save(random_weights(tiny_args(hidden_dim=48)), tiny)  # rows of 48: no Q4_0 blocks (version 3)
    cli_error(capsys, *(a.format(**names) for a in argv))
    assert not (tmp_path / "new").exists()


def test_export_tokenizer_creates_the_output_folders(tmp_path, capsys, sp_model):
    out = tmp_path / "no" / "such" / "tok.bin"
    assert main(["export-tokenizer", str(sp_model), "-o", str(out)]) == 0
    assert Tokenizer.load(out).vocab_size == 320


def test_export_tokenizer_takes_llama2c_tokenizer_py_flag(tmp_path, capsys, sp_model):
    """tokenizer.py's `-t/--tokenizer-model PATH`: the .bin is written beside the .model, as tokenizer.py does."""
    import shutil

    model = tmp_path / "tok.model"
    shutil.copy(sp_model, model)
    assert main(["export-tokenizer", f"--tokenizer-model={model}"]) == 0
    assert Tokenizer.load(tmp_path / "tok.bin").vocab_size == 320
    # a command line that says too little or too much: a usage error (status 2), as the parser's own
    twice = cli_error(capsys, "export-tokenizer", str(model), "-t", str(model), code=2)
    assert "give the sentencepiece .model once" in twice
    assert "export-tokenizer needs the sentencepiece .model" in cli_error(capsys, "export-tokenizer", code=2)


def test_an_os_error_escaping_a_command_is_cli_error(monkeypatch, capsys, sp_model):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/tok.bin")

    monkeypatch.setattr("babyllama.export.export_tokenizer", refuse)
    assert cli_error(capsys, "export-tokenizer", str(sp_model)) == \
        "babyllama: error: Permission denied: /somewhere/tok.bin"


def test_running_out_of_memory_is_one_line(monkeypatch, capsys, sp_model):
    """An allocation that fails where no check foresaw it (a ulimit -v, a container's limit) was a traceback."""
    import numpy as np

    monkeypatch.setattr("babyllama.export.export_tokenizer", lambda *args, **kwargs: np.empty(1 << 60, np.uint8))
    assert cli_error(capsys, "export-tokenizer", str(sp_model)).startswith(
        "babyllama: error: out of memory: Unable to allocate ")

    def bare(*args, **kwargs):
        raise MemoryError  # as CPython's own allocations fail: no message

    monkeypatch.setattr("babyllama.export.export_tokenizer", bare)
    assert cli_error(capsys, "export-tokenizer", str(sp_model)) == \
        "babyllama: error: out of memory: an allocation failed"


def test_export_tokenizer_refuses_to_overwrite_its_own_input(tmp_path, capsys, sp_model):
    model = tmp_path / "same.model"
    model.write_bytes(sp_model.read_bytes())
    assert "is the sentencepiece model itself" in cli_error(capsys, "export-tokenizer", str(model), "-o", str(model))
    assert model.read_bytes() == sp_model.read_bytes()


def test_the_output_format_is_guessed_in_any_case():
    assert [infer_target(n, None) for n in ("UP.BIN", "m.Gguf", "m.bin", "folder")] == ["bin", "gguf", "bin", "hf"]


def test_help_names_every_bin_version_and_where_the_tokenizer_falls_back():
    parser = build_parser()
    assert "v0-v3" in parser.format_help()
    sub = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "3 Q4_0" in sub["export"].format_help()
    assert "babyllama's or llama2.c train.py's" in " ".join(sub["export"].format_help().split())  # both are read
    assert "OUT file or directory to write (required:" in " ".join(sub["export"].format_help().split())
    eval_help = " ".join(sub["eval"].format_help().split())
    assert "(v0-v3)" in eval_help
    assert "for a .bin or a checkpoint, tokenizer.bin beside it, else for a .bin the built-in one" in eval_help


# ------------------------------------------------------------------------------------------- tokenizers


def test_a_bin_export_checks_the_tokenizer_before_writing_the_model(tmp_path, capsys, tiny):
    out = tmp_path / "out" / "wt.bin"
    out.parent.mkdir()
    out.write_bytes(b"the user's file")
    byte_tokenizer(400).save(tmp_path / "big.bin")
    msg = cli_error(capsys, "export", str(out), "--model", str(tiny), "--tokenizer", str(tmp_path / "big.bin"))
    assert "has 400 tokens but the model's vocab_size is 300" in msg
    assert out.read_bytes() == b"the user's file" and not out.with_name("tokenizer.bin").exists()


@pytest.mark.parametrize("version", ["0", "2"])
def test_a_bin_export_of_a_bin_carries_the_tokenizer_beside_it(tmp_path, capsys, tiny, version):
    """The tokenizer.bin beside a .bin source is the model's (what `run` runs it with): a .bin export into another
    folder writes it beside OUT, as GGUF and Hugging Face exports carry it."""
    out = tmp_path / "out" / "m.bin"
    assert main(["export", str(out), "--model", str(tiny), "--version", version]) == 0
    assert out.with_name("tokenizer.bin").read_bytes() == tiny.with_name("tokenizer.bin").read_bytes()
    assert f"wrote {out.with_name('tokenizer.bin')}" in capsys.readouterr().out


def test_a_bin_whose_card_name_would_be_too_long_is_written_without_one(tmp_path, capsys, tiny):
    """A .bin named with 251 bytes is a legal name, its card's (NAME.json) one byte too long: asking whether that
    card exists raised "File name too long", though a .bin needs no card without a chat template."""
    out = tmp_path / ("a" * 251 + ".bin")
    assert main(["export", str(out), "--model", str(tiny), "--version", "1"]) == 0
    assert out.stat().st_size > 0 and f"wrote {out}\n" in capsys.readouterr().out


def test_a_tokenizer_bin_beside_out_of_another_vocabulary_size_is_refused(tmp_path, capsys, tiny_gguf):
    folder = tmp_path / "d"
    folder.mkdir()
    byte_tokenizer(400).save(folder / "tokenizer.bin")
    msg = cli_error(capsys, "export", str(folder / "m.bin"), "--model", str(tiny_gguf))
    assert msg.endswith(f"tokenizer.bin has 400 tokens but the model's vocab_size is 300: remove it and export "
                        f"again to write the vocabulary inside {tiny_gguf} there, or export into another folder")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.bin"]
    assert Tokenizer.load(folder / "tokenizer.bin").vocab_size == 400
    # --tokenizer says replace it: done, and said, as a model beside it may have used it
    byte_tokenizer(300).save(tmp_path / "tok300.bin")
    assert main(["export", str(folder / "m.bin"), "--model", str(tiny_gguf), "-z", str(tmp_path / "tok300.bin")]) == 0
    assert (f"note: replacing {folder / 'tokenizer.bin'} (400 tokens) with this model's tokenizer (300): a model in "
            f"{folder} that used it now needs -z") in capsys.readouterr().err
    assert Tokenizer.load(folder / "tokenizer.bin").vocab_size == 300


def test_a_tokenizer_bin_beside_out_of_another_size_is_refused_when_the_source_has_none(tmp_path, capsys):
    """A source without a tokenizer (a lone .bin, a run folder without one) leaves the tokenizer.bin beside OUT
    in place, which `run` reads: one of another vocabulary size is refused at export, not at the first run."""
    src = tmp_path / "src" / "m.bin"
    src.parent.mkdir()
    formats.save(random_weights(tiny_args(vocab_size=300)), src)
    folder = tmp_path / "d"
    folder.mkdir()
    byte_tokenizer(400).save(folder / "tokenizer.bin")
    msg = cli_error(capsys, "export", str(folder / "m.bin"), "--model", str(src))
    assert msg.endswith(f"{folder / 'tokenizer.bin'} has 400 tokens but the model's vocab_size is 300 (a tokenizer "
                        "of another model): pass --tokenizer TOK to replace it, or export into another folder")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.bin"]
    byte_tokenizer(300).save(folder / "tokenizer.bin")  # the model's size: kept, and the export goes on
    assert main(["export", str(folder / "m.bin"), "--model", str(src)]) == 0


def test_a_same_size_tokenizer_bin_beside_out_is_kept_with_a_note(tmp_path, capsys, tiny_gguf):
    """The note says how to put the model's tokenizer there, and following it does: a GGUF's vocabulary is no
    file --tokenizer could name, but an export writes it where no tokenizer.bin is."""
    folder = tmp_path / "d"
    folder.mkdir()
    mine = Tokenizer([b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"x%d" % i for i in range(297)], [0.0] * 300)
    mine.save(folder / "tokenizer.bin")
    assert main(["export", str(folder / "m.bin"), "--model", str(tiny_gguf)]) == 0
    assert (f"note: kept the existing {folder / 'tokenizer.bin'}, which differs from the model's tokenizer (remove "
            f"it and export again to write the vocabulary inside {tiny_gguf} there, or export into another folder)"
            ) in capsys.readouterr().err
    assert Tokenizer.load(folder / "tokenizer.bin").pieces == mine.pieces
    (folder / "tokenizer.bin").unlink()
    assert main(["export", str(folder / "m.bin"), "--model", str(tiny_gguf)]) == 0
    assert Tokenizer.load(folder / "tokenizer.bin").same_as(byte_tokenizer(300))
    # a tokenizer file that came with the model is named, for --tokenizer or -z
    mine.save(folder / "tokenizer.bin")
    tok = tiny_gguf.with_name("tokenizer.bin")
    assert main(["export", str(folder / "m.bin"), "--model", str(tiny_gguf.with_suffix(".bin"))]) == 0
    assert (f"differs from the model's tokenizer (pass --tokenizer {tok} to replace it, or -z {tok} when running)"
            ) in capsys.readouterr().err
    assert main(["export", str(folder / "m.bin"), "--model", str(tiny_gguf.with_suffix(".bin")), "--tokenizer",
                 str(tok)]) == 0
    assert Tokenizer.load(folder / "tokenizer.bin").same_as(byte_tokenizer(300))


def test_a_model_export_is_never_named_tokenizer_bin(tmp_path, capsys, tiny_gguf):
    out = tmp_path / "tk" / "tokenizer.bin"
    assert "choose another name for the model" in cli_error(capsys, "export", str(out), "--model", str(tiny_gguf))
    assert not out.exists()


def test_an_hf_export_without_a_tokenizer_refuses_another_models_tokenizer(tmp_path, capsys, sp_model):
    pytest.importorskip("safetensors")
    folder = tmp_path / "hf"
    other = tmp_path / "other.bin"
    formats.save(random_weights(tiny_args(vocab_size=320)), other)
    assert main(["export", str(folder), "--model", str(other), "--tokenizer", str(sp_model)]) == 0
    before = (folder / "model.safetensors").read_bytes()
    capsys.readouterr()
    (tmp_path / "lone").mkdir()
    formats.save(random_weights(tiny_args()), tmp_path / "lone" / "m.bin")  # no vocabulary anywhere
    msg = cli_error(capsys, "export", str(folder), "--model", str(tmp_path / "lone" / "m.bin"))
    assert "tokenizer.model has 320 tokens but the model's vocab_size is 300" in msg
    assert (folder / "model.safetensors").read_bytes() == before
    assert main(["export", str(folder), "--model", str(other), "--dtype", "f16"]) == 0  # the same model again
    assert "note: kept the existing" in capsys.readouterr().err and (folder / "tokenizer.model").is_file()


# byte_tokenizer merges " th" and "he" but lacks the piece "h" (a trained vocabulary holds the characters of its
# merges), so run.c's encoder and sentencepiece part ways on "the": these texts keep to what both reach alike
TEXTS = ["eat a toe", " tea  at  ", "héllo\n\nworld 42", ""]


def encodes_as(sp_model: Path, tokenizer: Tokenizer) -> bool:
    """sentencepiece with `sp_model` encodes TEXTS as `tokenizer` does."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    return all(sp.encode(text) == tokenizer.encode(text, bos=False) for text in TEXTS)


def test_gguf_to_hf_writes_its_vocabulary_as_tokenizer_model(tmp_path, capsys, tiny_gguf, tiny):
    pytest.importorskip("safetensors")
    pytest.importorskip("google.protobuf")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tiny_gguf)]) == 0
    assert "tokenizer.model" not in capsys.readouterr().err
    assert encodes_as(tmp_path / "hf" / "tokenizer.model", Tokenizer.load(tiny.with_name("tokenizer.bin")))
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


def test_an_explicit_tokenizer_bin_goes_to_hf_as_tokenizer_model(tmp_path, tiny):
    pytest.importorskip("safetensors")
    pytest.importorskip("google.protobuf")
    other = byte_tokenizer(300)
    other.pieces[-1] = b"zz"  # not the one beside the model: the one given wins
    other.save(tmp_path / "other.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tiny), "--tokenizer", str(tmp_path / "other.bin")]) == 0
    assert encodes_as(tmp_path / "hf" / "tokenizer.model", other)
    spm = pytest.importorskip("sentencepiece")
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model")).id_to_piece(299) == "zz"


def test_hf_export_of_a_model_without_a_vocabulary_says_so(tmp_path, capsys):
    pytest.importorskip("safetensors")
    formats.save(random_weights(tiny_args()), tmp_path / "lone.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "lone.bin")]) == 0
    assert "has no tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "tokenizer.model").exists()


def test_without_protobuf_the_vocabulary_is_a_note_or_a_one_line_error(tmp_path, capsys, tiny, monkeypatch):
    pytest.importorskip("safetensors")
    import sys

    sentencepiece = pytest.importorskip("sentencepiece")
    # the import fails as it does without protobuf: the module is neither loaded nor loadable
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    assert main(["export", str(tmp_path / "hf"), "--model", str(tiny)]) == 0
    assert "needs the protobuf package" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    msg = cli_error(capsys, "export", str(tmp_path / "hf2"), "--model", str(tiny), "--tokenizer",
                   str(tiny.with_name("tokenizer.bin")))
    assert "writing a sentencepiece tokenizer.model needs babyllama's 'interop' extra" in msg


def test_written_safetensors_get_the_umask_mode(tmp_path, tiny):
    pytest.importorskip("safetensors")
    old = os.umask(0o022)
    try:
        assert main(["export", str(tmp_path / "hf"), "--model", str(tiny)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_hf_takes_one_folder(tmp_path, capsys, tiny):
    pytest.importorskip("safetensors")
    for name in ("a", "b"):
        assert main(["export", str(tmp_path / name), "--model", str(tiny)]) == 0
    capsys.readouterr()
    msg = cli_error(capsys, "export", str(tmp_path / "y.bin"), "--hf", str(tmp_path / "a"), str(tmp_path / "b"))
    assert "--hf takes one model folder, or weight files" in msg



@pytest.mark.parametrize("name, refused", [
    ("tokenizer.json", True),  # transformers loads it before tokenizer.model
    ("model-00001-of-00002.safetensors", True),  # taken with model.safetensors by tools that glob the shards
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", True),  # read in place of model.safetensors with use_safetensors=False
    ("pytorch_model-00001-of-00002.bin", True),
    ("pytorch_model.bin.index.json", True),
    ("training_args.bin", False),  # not weights
    ("tokenizer.bin", False),
])
def test_an_hf_export_refuses_only_another_checkpoints_files(tmp_path, capsys, tiny, name, refused):
    pytest.importorskip("safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    (out / name).write_bytes(b"another")
    if refused:
        msg = cli_error(capsys, "export", str(out), "--to", "hf", "--model", str(tiny))
        assert msg.endswith(f"{out} already holds another checkpoint ({name}); choose an empty folder")
        assert sorted(p.name for p in out.iterdir()) == [name]
    else:
        assert main(["export", str(out), "--to", "hf", "--model", str(tiny)]) == 0
        assert (out / "model.safetensors").is_file() and (out / name).read_bytes() == b"another"

@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from Linux's /proc")
def test_new_file_mode_reads_the_umask_without_setting_it(monkeypatch):
    """Setting the umask to read it would change it for every thread of the process (the server's too)."""
    old = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", refuse)
        assert safeio.new_file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_a_tokenizer_that_is_a_folder_is_named_so(tmp_path, capsys, tiny):
    """--tokenizer naming a folder (or nothing) says which, not 'no such file' for a folder that exists."""
    (tmp_path / "folder").mkdir()
    assert "tokenizer file " + str(tmp_path / "folder") + " is a directory, not a regular file" in cli_error(
        capsys, "export", str(tmp_path / "o.bin"), "--model", str(tiny), "--tokenizer", str(tmp_path / "folder"))
    assert "tokenizer file not found: " + str(tmp_path / "nope") in cli_error(
        capsys, "export", str(tmp_path / "o.bin"), "--model", str(tiny), "--tokenizer", str(tmp_path / "nope"))
    assert not (tmp_path / "o.bin").exists()


# ------------------------------------------------------------------------------------------- a full disk


def _save_hf(out: Path, dtype: str) -> None:
    pytest.importorskip("safetensors")
    if dtype == "bf16":
        pytest.importorskip("torch")
    from babyllama.interop.hf import save_hf

    save_hf(random_weights(tiny_args()), out, dtype=dtype)


def _save_checkpoint(out: Path) -> None:
    torch = pytest.importorskip("torch")
    from babyllama.train import checkpoint

    checkpoint.save({"model": {"w": torch.zeros(20_000)}}, out)


def _save_gguf(out: Path) -> None:
    pytest.importorskip("gguf")
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    save_gguf(random_weights(tiny_args()), out, from_tokenizer(byte_tokenizer(300)))


@pytest.mark.parametrize("to, dtype, source", [("gguf", "f32", "q8_0"), ("gguf", "q4_0", "q8_0"), ("hf", "f32", "q8_0"),
                                               ("hf", "bf16", "q8_0"), ("bin", 0, "q8_0"), ("bin", 1, "q8_0"),
                                               ("bin", 1, "bf16"), ("bin", 2, "q4_0"), ("bin", 3, "q8_0")])
def test_a_writer_holds_one_converted_tensor_at_a_time(tmp_path, to, dtype, source):
    """The GGUF, Hugging Face and .bin writers convert and write one tensor at a time: writing a Q8_0 model (or a
    Q4_0 or bf16 one), whose every tensor is dequantized on its turn, peaks far below the fp32 model's size (the
    packages' own writers take every tensor at once, and the .bin writer converted the whole model first: a second
    copy of the whole model, in fp32)."""
    import tracemalloc

    pytest.importorskip({"gguf": "gguf", "hf": "safetensors", "bin": "numpy"}[to])
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.hf import save_hf
    from babyllama.interop.state_dict import to_state_dict
    from babyllama.interop.vocab import from_tokenizer

    w = random_weights(tiny_args(dim=64, hidden_dim=128, n_layers=24, vocab_size=320), scale=0.2).quantize_as(source)
    fp32_bytes = sum(t.nbytes for t in to_state_dict(w).values())
    vocab = from_tokenizer(byte_tokenizer(320))

    def write(out: Path) -> None:
        if to == "gguf":
            save_gguf(w, out / "m.gguf", vocab, dtype)
        elif to == "hf":
            save_hf(w, out, dtype=dtype)
        else:
            formats.save(w, out / "m.bin", version=dtype)

    for folder in ("warm", "out"):
        (tmp_path / folder).mkdir()
    write(tmp_path / "warm")  # imports and first-use caches outside the measurement
    tracemalloc.start()
    try:
        write(tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fp32_bytes > 3_000_000 and peak < fp32_bytes / 4, (peak, fp32_bytes)


def checkpoint_beside_its_bin(tmp_path, w, source: str) -> list[str]:
    """`w` as a Hugging Face ("hf", fp32) or Meta checkpoint in tmp_path/in, as a .bin (tmp_path/m.bin) and a
    tokenizer; returns export's flags that read the checkpoint as the .bin is read (Meta's params.json has no
    context length: --max-seq-len gives the .bin's)."""
    pytest.importorskip("safetensors" if source == "hf" else "torch")
    from babyllama.interop.hf import save_hf
    from babyllama.interop.meta import save_meta

    if source == "hf":
        save_hf(w, tmp_path / "in", dtype="f32")
    else:
        save_meta(w, tmp_path / "in")
    formats.save(w, tmp_path / "m.bin", version=1)
    byte_tokenizer(w.args.vocab_size).save(tmp_path / "tokenizer.bin")
    return ["--hf" if source == "hf" else "--meta-llama", str(tmp_path / "in"), "-z", str(tmp_path / "tokenizer.bin"),
            "--max-seq-len", str(w.args.max_seq_len)]


QUANTIZED_OUTPUTS = [("m.bin", ["--version", "2"]), ("m.bin", ["--version", "3"]), ("m.gguf", ["--dtype", "q4_0"]),
                     ("m.gguf", ["--dtype", "q8_0"])]


@pytest.mark.parametrize("source", ["hf", "meta"])
@pytest.mark.parametrize("name, flags", QUANTIZED_OUTPUTS)
def test_a_checkpoint_is_quantized_as_it_is_read_for_a_quantized_output(tmp_path, name, flags, source):
    """A version 2 or 3 .bin or a Q4_0 or Q8_0 GGUF export of a Hugging Face or Meta checkpoint quantizes each
    matrix as it is read (as `run --quantize` does), writing the bytes the whole fp32 model would give, in far
    less memory than the checkpoint's size (a 7B fp32 checkpoint held whole would not fit a 24 GiB machine)."""
    import tracemalloc

    if name.endswith(".gguf"):
        pytest.importorskip("gguf")
    from babyllama.cli import main

    w = random_weights(tiny_args(dim=64, hidden_dim=128, n_layers=24, vocab_size=320), scale=0.2)
    read = [*checkpoint_beside_its_bin(tmp_path, w, source), *flags]
    fp32_bytes = sum(f.stat().st_size for f in (tmp_path / "in").iterdir())
    assert main(["export", str(tmp_path / "warm" / name), *read]) == 0  # imports and first-use caches outside
    tracemalloc.start()
    try:
        assert main(["export", str(tmp_path / "out" / name), *read]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fp32_bytes > 3_000_000 and peak < fp32_bytes / 2, (peak, fp32_bytes)
    assert main(["export", str(tmp_path / "bin" / name), "--model", str(tmp_path / "m.bin"), *flags]) == 0
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "bin" / name).read_bytes()


@pytest.mark.parametrize("source", ["hf", "meta"])
@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_a_gguf_export_of_rows_not_made_of_blocks_writes_them_in_f16_as_from_the_weights(tmp_path, dtype, source):
    """Rows of hidden_dim 80 do not split into blocks of 32: quantized as they are read, the other matrices are
    blocks and w2 (rows of 80) is read as it is, so the file holds what an export of the fp32 model holds (w2 in
    F16), not f16 of a quantized copy."""
    pytest.importorskip("gguf")
    from babyllama.cli import main

    w = random_weights(tiny_args(dim=64, hidden_dim=80, n_layers=2, vocab_size=320), scale=0.2)
    read = checkpoint_beside_its_bin(tmp_path, w, source)
    assert main(["export", str(tmp_path / "out" / "m.gguf"), *read, "--dtype", dtype]) == 0
    assert main(["export", str(tmp_path / "bin" / "m.gguf"), "--model", str(tmp_path / "m.bin"), "--dtype", dtype]) == 0
    assert (tmp_path / "out" / "m.gguf").read_bytes() == (tmp_path / "bin" / "m.gguf").read_bytes()


def test_reading_and_writing_a_model_draw_progress_bars_on_a_terminal(tmp_path, monkeypatch):
    """A large checkpoint took minutes to read and write with nothing on the screen: on a terminal, a bar for
    each (drawn once the work has taken a second; here at once)."""
    import io
    import sys

    pytest.importorskip("tqdm")
    pytest.importorskip("safetensors")
    from babyllama import progress
    from babyllama.cli import main
    from babyllama.interop import state_dict
    from babyllama.interop.hf import save_hf

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def at_once(*args, **kwargs):
        return progress_bar(*args, **{**kwargs, "delay": 0.0})

    progress_bar = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", at_once)
    monkeypatch.setattr(state_dict, "progress_bar", at_once)
    save_hf(random_weights(tiny_args(vocab_size=320, n_layers=3)), tmp_path / "hf", dtype="f32")
    byte_tokenizer(320).save(tmp_path / "tokenizer.bin")
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["export", str(tmp_path / "m.bin"), "--hf", str(tmp_path / "hf"), "--version", "3"]) == 0
    shown = sys.stderr.getvalue()
    n = 1 + 3 * 9 + 1  # embedding, 9 tensors a layer, final norm (the classifier is the embedding)
    assert "reading hf: 100%" in shown and f"| {n}/{n} [" in shown and "writing m.bin: 100%" in shown, shown

    def full_disk(path, header, tensors):  # the Hugging Face writer fails after two tensors
        for _ in zip(range(2), tensors):
            pass
        raise OSError(28, "No space left on device")

    from babyllama.interop import hf

    monkeypatch.setattr(hf, "write_safetensors", full_disk)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["export", str(tmp_path / "out"), "--model", str(tmp_path / "m.bin"), "--to", "hf"]) == 1
    shown = sys.stderr.getvalue()  # the bar ended before the error line, which is the last
    last = shown.split("\n")[-2]
    assert last.startswith("babyllama: error: cannot write output ") and last.endswith(": No space left on device")


# a Q8_0 model written as version 2 keeps its own values and scales
@pytest.mark.parametrize("source, version", [(source, version) for source in ("q8_0", "q4_0", "f16", "bf16")
                                             for version in (0, 1, 2, 3) if (source, version) != ("q8_0", 2)])
def test_a_bin_written_from_any_type_is_the_bin_of_its_fp32_values(tmp_path, source, version):
    """The .bin writer converts each tensor on its turn: the file is the one the same model gives converted to fp32
    as a whole first, byte for byte."""
    w = random_weights(tiny_args(dim=64, hidden_dim=128, vocab_size=320, shared_classifier=False),
                       scale=0.2).quantize_as(source)
    formats.save(w, tmp_path / "streamed.bin", version=version)
    formats.save(w.to_fp32(), tmp_path / "whole.bin", version=version)
    assert (tmp_path / "streamed.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()


@pytest.mark.parametrize("write, target, reason", [
    (lambda out: _save_hf(out, "f32"), "model.safetensors", "File too large"),
    (lambda out: _save_hf(out, "bf16"), "model.safetensors", "File too large"),
    (_save_checkpoint, "ckpt.pt", "File too large"),
    (_save_gguf, "m.gguf", r"the write stopped short \(\d+ of \d+ bytes written: a full disk, or a file size limit"),
], ids=["hf", "hf-bf16", "checkpoint", "gguf"])
def test_a_full_disk_under_a_library_writer_is_one_line_and_keeps_the_old_file(tmp_path, small_file_limit, write,
                                                                                 target, reason):
    """safetensors and torch.save report a failed write with their own error types (SafetensorError, a
    RuntimeError raised while handling the OSError), NumPy's tofile (the gguf writer's) by its byte counts alone:
    the same one line as our own writers, the old file kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / target).write_bytes(b"old")
    path = out if target == "model.safetensors" else out / target
    with pytest.raises(BabyLlamaError, match=f"cannot write output .*{target}: {reason}"):
        write(path)
    assert (out / target).read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: File too large (os error 27)",
    'Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: "File too large" })',
], ids=["display", "debug"])
def test_a_library_error_that_names_the_systems_error_is_one_line(tmp_path, message):
    """safetensors' Rust writer gives the system's error only in its message: as Rust displays an io::Error, or
    (safetensors 0.4.1) in its debug form; either is the one line a full disk gets."""
    class LibraryError(Exception):
        pass

    with pytest.raises(BabyLlamaError, match=r"cannot write output .*m\.safetensors: File too large$"):
        with safeio.pending(tmp_path / "m.safetensors"):
            raise LibraryError(message)
    assert list(tmp_path.iterdir()) == []



def small_model(folder: Path, tokenizer: Tokenizer, seed: int) -> Path:
    """folder/m.bin, a model whose files fit under SMALL_FILE_LIMIT (12.5 KB as .bin, 7 KB as bf16 safetensors),
    with `tokenizer` beside it."""
    folder.mkdir()
    args = tiny_args(dim=8, n_heads=2, n_kv_heads=2, hidden_dim=16, n_layers=1)
    formats.save(random_weights(args, seed), folder / "m.bin")
    tokenizer.save(folder / "tokenizer.bin")
    return folder / "m.bin"


def long_tokenizer() -> Tokenizer:
    """byte_tokenizer's 300 tokens with merges of 500 bytes: 25 KB as a tokenizer.bin or a tokenizer.model, more
    than SMALL_FILE_LIMIT."""
    short = byte_tokenizer(300)
    return Tokenizer(short.pieces[:259] + [p + b"-" * 500 for p in short.pieces[259:]], list(short.scores))


def zero_adapter(model: Path, folder: Path) -> Path:
    """A rank-2 LoRA adapter of `model`'s wq whose factors are zeros."""
    from babyllama.adapter import Adapter, base_identity, lora_key, save_adapter

    weights = formats.load(model)
    a = weights.args
    tensors = {lora_key(layer, "wq", which): np.zeros(shape, dtype=np.float32) for layer in range(a.n_layers)
               for which, shape in (("A", (2, a.dim)), ("B", (a.dim, 2)))}
    folder.mkdir()
    save_adapter(Adapter(2, 4.0, ["wq"], base_identity(weights), tensors), folder / "adapter.safetensors")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_hf_export_leaves_the_earlier_export_whole(tmp_path, capsys, file_size_limit):
    """The new model.safetensors fits, the new tokenizer.model does not (a full disk): the folder keeps the earlier
    export's files, all of them, never the new model beside the old config and tokenizer; a new folder goes."""
    pytest.importorskip("safetensors")
    pytest.importorskip("google.protobuf")
    old = small_model(tmp_path / "old", byte_tokenizer(300), seed=0)
    new = small_model(tmp_path / "new", long_tokenizer(), seed=1)
    out = tmp_path / "hf"
    assert main(["export", str(out), "--model", str(old), "--dtype", "bf16"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    file_size_limit(SMALL_FILE_LIMIT)
    msg = cli_error(capsys, "export", str(out), "--model", str(new), "--dtype", "bf16")
    assert msg.endswith(f"cannot write output {out / 'tokenizer.model'}: File too large")
    assert snapshot(out) == before  # no temporary file left either
    adapter = zero_adapter(new, tmp_path / "lora")
    for extra in ([], ["--lora", str(adapter)]):  # the adapter (written first, in OUT/adapter) goes too
        cli_error(capsys, "export", str(tmp_path / "fresh" / "hf"), "--model", str(new), "--dtype", "bf16", *extra)
        assert not (tmp_path / "fresh").exists()


def test_a_failed_bin_export_leaves_the_earlier_model_and_tokenizer_whole(tmp_path, capsys, file_size_limit):
    """m.bin fits, the tokenizer.bin given to replace the old one does not: both old files stay."""
    out = small_model(tmp_path / "out", byte_tokenizer(300), seed=0)
    new = small_model(tmp_path / "new", byte_tokenizer(300), seed=1)
    long_tokenizer().save(tmp_path / "long.bin")
    before = snapshot(out.parent)
    file_size_limit(SMALL_FILE_LIMIT)
    msg = cli_error(capsys, "export", str(out), "--model", str(new), "--tokenizer", str(tmp_path / "long.bin"))
    assert msg.endswith(f"cannot write output {out.with_name('tokenizer.bin')}: File too large")
    assert snapshot(out.parent) == before


def test_files_written_together_appear_together(tmp_path):
    """Inside committed_together every write waits for the block's end (a block inside it joins it); an error
    anywhere removes them all."""
    with safeio.committed_together():
        safeio.write_text(tmp_path / "a", "a")
        with safeio.committed_together():
            safeio.write_text(tmp_path / "b", "b")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == []
    assert snapshot(tmp_path) == {"a": b"a", "b": b"b"}
    with pytest.raises(ValueError), safeio.committed_together():
        safeio.write_text(tmp_path / "a", "new a")
        safeio.write_text(tmp_path / "c", "c")
        raise ValueError
    assert snapshot(tmp_path) == {"a": b"a", "b": b"b"}


def test_a_signal_while_files_go_in_together_leaves_the_old_set_or_the_new_one(tmp_path, monkeypatch):
    """Ctrl-C while the files are synced to disk (the slow part) leaves every target as it was, no temporary file
    left; one that arrives between the renames is held back until all are done: never new files beside old."""
    import signal

    for name in "ab":
        (tmp_path / name).write_text("old")
    synced = safeio._synced

    def interrupted_at_b(tmp):
        if Path(tmp).name.startswith("b."):
            raise KeyboardInterrupt
        synced(tmp)

    monkeypatch.setattr(safeio, "_synced", interrupted_at_b)
    with pytest.raises(KeyboardInterrupt), safeio.committed_together():
        safeio.write_text(tmp_path / "a", "new")
        safeio.write_text(tmp_path / "b", "new")
    assert snapshot(tmp_path) == {"a": b"old", "b": b"old"}
    monkeypatch.setattr(safeio, "_synced", synced)
    replace = os.replace

    def signalled_after(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", signalled_after)
    with pytest.raises(KeyboardInterrupt), safeio.committed_together():
        safeio.write_text(tmp_path / "a", "new")
        safeio.write_text(tmp_path / "b", "new")
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"a": b"new", "b": b"new"}


def test_llama2c_export_py_version_minus_one_and_dtype_names(tmp_path, capsys, tiny):
    """export.py's `--version -1 --dtype fp16` (its Hugging Face export) writes a Hugging Face folder of fp16
    tensors, whatever OUT is named; `--dtype fp32` is f32."""
    pytest.importorskip("safetensors")
    import json

    out = tmp_path / "hf.bin"  # llama2.c writes the folder at the path given
    assert main(["export", str(out), "--model", str(tiny), "--version", "-1", "--dtype", "fp16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert main(["export", str(tmp_path / "hf32"), "--model", str(tiny), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "hf32" / "config.json").read_text())["torch_dtype"] == "float32"
    capsys.readouterr()
    assert "is Hugging Face output, not --to gguf" in cli_error(
        capsys, "export", str(tmp_path / "m.gguf"), "--model", str(tiny), "--version", "-1", "--to", "gguf")



@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_llama2c_export_py_version_writes_a_bin_whatever_out_is_named(tmp_path, capsys, tiny, version):
    """export.py writes version N's .bin at the path given (`export.py model_q80 --version 2 ...`); a name that
    says GGUF is refused rather than given llama2.c's bytes."""
    out = tmp_path / "model_q80"
    assert main(["export", str(out), "--model", str(tiny), "--version", str(version)]) == 0
    assert formats.read_header(out)[1] == version
    capsys.readouterr()
    msg = cli_error(capsys, "export", str(tmp_path / "m.gguf"), "--model", str(tiny), "--version", str(version))
    assert f"--version {version} is llama2.c .bin output, and {tmp_path / 'm.gguf'} is named as a GGUF file" in msg


# ------------------------------------------------------------------------------------- the source is not the output


@pytest.mark.parametrize("extra", [[], ["--version", "2"], ["--version", "0"]])
def test_export_refuses_to_write_over_the_model_it_reads(tmp_path, capsys, tiny, extra):
    before = tiny.read_bytes()
    link = tmp_path / "link.bin"
    link.symlink_to(tiny)
    for out, source in ((tiny, tiny), (tiny, link), (link, tiny)):
        msg = cli_error(capsys, "export", str(out), "--model", str(source), *extra)
        assert f"{out} is the model being exported ({source}): writing over it would lose it" in msg
    assert tiny.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("to", ["bin", "gguf"])
def test_export_refuses_to_write_over_the_tokenizer_it_reads(tmp_path, capsys, tiny, to):
    tok = tmp_path / "tok.bin"
    byte_tokenizer(formats.load(tiny).args.vocab_size).save(tok)
    before = tok.read_bytes()
    msg = cli_error(capsys, "export", str(tok), "--model", str(tiny), "-z", str(tok), "--to", to)
    assert f"{tok} is the tokenizer this export reads ({tok}): writing over it would lose it" in msg
    assert tok.read_bytes() == before


def test_export_refuses_to_write_a_gguf_over_itself(capsys, tiny_gguf):
    before = tiny_gguf.read_bytes()
    msg = cli_error(capsys, "export", str(tiny_gguf), "--model", str(tiny_gguf), "--dtype", "q8_0")
    assert "is the model being exported" in msg and tiny_gguf.read_bytes() == before


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_bin_export_without_a_tokenizer_says_so(tmp_path, capsys, tiny):
    """A checkpoint or .bin with no tokenizer beside it gave a .bin and nothing else, without a word (its Hugging
    Face export says so; `run` then guesses the built-in tokenizer of that vocabulary size)."""
    tiny.with_name("tokenizer.bin").unlink()
    out = tmp_path / "out" / "m.bin"
    assert main(["export", str(out), "--model", str(tiny)]) == 0
    assert (f"note: {out} gets no tokenizer.bin beside it (none came with {tiny}): pass --tokenizer TOK to add "
            "one, or -z TOKENIZER when running it") in capsys.readouterr().err
    byte_tokenizer(300).save(out.with_name("tokenizer.bin"))  # one already there is the one it runs with
    assert main(["export", str(out), "--model", str(tiny)]) == 0
    assert "gets no tokenizer.bin" not in capsys.readouterr().err


@pytest.mark.parametrize("to", ["bin", "gguf"])
def test_export_refuses_to_write_over_a_file_a_hugging_face_model_is_read_from(tmp_path, capsys, tiny, to):
    """Its weights, config.json, tokenizer_config.json (read for a chat template) and a shard index given as the
    source: each was written over, the export exiting 0, when only the folder or the given path was checked."""
    pytest.importorskip("safetensors")
    import json

    from safetensors import safe_open

    hf = tmp_path / "hf"
    assert main(["export", str(hf), "--model", str(tiny)]) == 0
    capsys.readouterr()
    (hf / "tokenizer_config.json").write_text("{}\n")
    with safe_open(str(hf / "model.safetensors"), framework="numpy") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = folder_bytes(hf)
    read = ["model.safetensors", "config.json", "tokenizer_config.json"]
    for source, names in ((hf, read), (index, [*read, index.name]), (hf / "model.safetensors", read)):
        for name in names:
            msg = cli_error(capsys, "export", str(hf / name), "--to", to, "--hf", str(source))
            what = "the model being exported" if hf / name == source else "a file of the model being exported"
            assert f"{hf / name} is {what} ({source}): writing over it would lose it" in msg
    assert folder_bytes(hf) == before and leftovers(tmp_path) == []
    assert main(["export", str(hf / "beside.gguf"), "--hf", str(hf)]) == 0  # a new file in the folder is no loss


def test_export_refuses_to_write_over_a_file_a_meta_model_is_read_from(tmp_path, capsys, tiny):
    pytest.importorskip("torch")
    from babyllama.interop.meta import save_meta

    meta = save_meta(formats.load(tiny), tmp_path / "meta")
    before = folder_bytes(meta)
    for name in ("params.json", "consolidated.00.pth"):
        msg = cli_error(capsys, "export", str(meta / name), "--to", "bin", "--meta-llama", str(meta))
        assert f"{meta / name} is a file of the model being exported ({meta}): writing over it would lose it" in msg
    assert folder_bytes(meta) == before


def test_export_takes_out_after_the_hf_folder_and_refuses_the_folder_itself(tmp_path, capsys, tiny):
    pytest.importorskip("safetensors")
    hf = tmp_path / "hf"
    assert main(["export", str(hf), "--model", str(tiny)]) == 0
    capsys.readouterr()
    files = folder_bytes(hf)
    weights = next(hf.glob("*.safetensors"))
    for argv in (["--hf", str(hf), str(hf)], [str(hf), "--hf", str(hf)]):
        assert f"{hf} is the model being exported ({hf})" in cli_error(capsys, "export", *argv)
    msg = cli_error(capsys, "export", "--hf", str(weights), str(hf))
    assert f"{hf} is the folder of the model being exported ({weights})" in msg
    assert folder_bytes(hf) == files
    out = tmp_path / "back.bin"
    assert main(["export", "--hf", str(hf), str(out)]) == 0  # OUT after the source, as with the other flags
    assert formats.load(out).args == formats.load(tiny).args
    capsys.readouterr()
    assert "export needs OUT" in cli_error(capsys, "export", "--hf", str(hf), code=2)
    assert "export needs OUT" in cli_error(capsys, "export", "--hf", str(weights), str(weights), code=2)
