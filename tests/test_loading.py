"""Any model babyllama reads runs directly (format told by content, converted in memory), with the tokenizer
that comes with it; and the text the CLI and the API produce: whole UTF-8 characters, long flag names,
generated-token budgets."""

from __future__ import annotations

import io
import os

import pytest
from conftest import LOAD_PEAK, cli_error, random_weights, run_cli, run_memory_script, tiny_args, torch_checkpoint

from babyllama import formats
from babyllama.errors import BabyLlamaError
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
    assert b"loaded GGUF" in direct.stderr and b", mapped)" in direct.stderr


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


def test_mmap_flags_are_refused_for_formats_they_do_not_apply_to(tmp_path, tiny_bin, sp_model):
    """--mmap / --no-mmap (mmap= in the API) choose how a .bin file is read; a GGUF file is always mapped and the
    checkpoint formats are converted as they are read, so for those the flags are one error line, not ignored."""
    from conftest import one_line_error

    from babyllama import api
    from babyllama.errors import BabyLlamaError

    pytest.importorskip("gguf")
    gguf = tmp_path / "m.gguf"
    assert run_cli("export", str(gguf), "--model", str(tiny_bin), "--tokenizer", str(sp_model)).returncode == 0
    for flag in ("--mmap", "--no-mmap"):
        one_line_error(run_cli("run", str(gguf), "-n", "4", flag),
                       f"{gguf}: {flag} (mmap={flag == '--mmap'}) applies to llama2.c .bin files only; a GGUF file "
                       "is always memory-mapped")
        assert _greedy(tiny_bin, flag).stdout == _greedy(tiny_bin).stdout
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text("{}")
    for path, what in ((gguf, "a GGUF file is always memory-mapped"),
                       (tmp_path / "hf", "a Hugging Face checkpoint is converted as it is read"),
                       (tmp_path / "meta", "a Meta checkpoint is converted as it is read"),
                       (tmp_path / "ckpt.pt", "a training checkpoint is converted as it is read")):
        for mmap in (True, False):
            with pytest.raises(BabyLlamaError, match=f"applies to llama2.c .bin files only; {what}"):
                api.load(path, mmap=mmap)
    assert api.load(gguf).source_kind == "gguf"


@pytest.mark.parametrize("broken", ["link", "folder"])
def test_a_broken_tokenizer_beside_a_model_is_refused_not_replaced_by_the_builtin_one(tmp_path, capsys, broken):
    """A tokenizer.bin beside a .bin that is a symbolic link to nothing (its target moved) or a folder was passed
    over, and a .bin of the built-in tokenizer's vocabulary size ran with that one instead: garbage, without a
    word. It is refused where it would be used; -z still runs the model."""
    from babyllama.cli import main
    from babyllama.loading import BUILTIN_TOKENIZER

    model = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(vocab_size=Tokenizer.load(BUILTIN_TOKENIZER).vocab_size)), model)
    if broken == "link":
        (tmp_path / "tokenizer.bin").symlink_to(tmp_path / "moved" / "tok.bin")
        why = f"tokenizer.bin is a symbolic link to {tmp_path / 'moved' / 'tok.bin'}, which does not exist"
    else:
        (tmp_path / "tokenizer.bin").mkdir()
        why = "tokenizer.bin is a directory, not a regular file"
    assert main(["run", str(model), "-n", "4", "-t", "0"]) == 1
    assert why in capsys.readouterr().err
    assert main(["run", str(model), "-n", "4", "-t", "0", "-z", str(BUILTIN_TOKENIZER)]) == 0


@pytest.mark.parametrize("name", ["config.json", "ckpt.pt", "params.json"])
def test_a_model_folder_whose_file_links_to_nothing_says_so(tmp_path, name):
    """A Hugging Face cache's snapshot links its files into blobs/: a link whose blob went was passed over, and the
    folder said to hold "no model babyllama reads"; the link is named."""
    if name == "ckpt.pt":
        pytest.importorskip("torch", reason="a training checkpoint is read with the train extra")
    (tmp_path / name).symlink_to(tmp_path / "blobs" / "gone")
    if name == "config.json":
        (tmp_path / "model.safetensors").write_bytes(b"")  # its blob is still there
    with pytest.raises(BabyLlamaError, match=f"{name} is a symbolic link to {tmp_path / 'blobs' / 'gone'}, which "):
        open_model(tmp_path)


FOLDER_FILES = {"config.json": (b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
                                "the config.json of a Hugging Face model folder"),
                "params.json": (b'{"dim": 64, "n_layers": 2, "n_heads": 4}',
                                "the params.json of a Meta checkpoint folder"),
                "consolidated.00.pth": (b"PK\x03\x04" + bytes(60), "a shard of a Meta checkpoint"),
                "tokenizer_config.json": (b'{"bos_token": "<s>"}', "the tokenizer_config.json of a Hugging Face "
                                                                     "model folder")}


@pytest.mark.parametrize("name", FOLDER_FILES)
@pytest.mark.parametrize("command", ["run", "eval", "export", "serve"])
def test_a_model_folders_own_file_says_to_pass_the_folder(tmp_path, capsys, name, command):
    """A Hugging Face folder's config.json (or another of its JSON files), a Meta folder's params.json or one of its
    shards, given where a model is asked for, is no model on its own: one line says what it is and to pass the
    folder (it was read as a llama2.c header, "dim=538970747 is out of range", or as a training checkpoint)."""
    if command == "serve":
        pytest.importorskip("fastapi")
    content, what = FOLDER_FILES[name]
    path = tmp_path / "model" / name
    path.parent.mkdir()
    path.write_bytes(content)
    if name == "tokenizer_config.json":  # beside its folder's config
        (path.parent / "config.json").write_bytes(FOLDER_FILES["config.json"][0])
    (tmp_path / "stories.txt").write_text("Once upon a time.\n")
    argv = {"run": ["run", str(path)], "eval": ["eval", str(path), "--data", str(tmp_path / "stories.txt")],
            "export": ["export", str(tmp_path / "out.bin"), "--model", str(path)],
            "serve": ["serve", str(path), "--port", "0"]}[command]
    err = cli_error(capsys, *argv)
    assert err == f"babyllama: error: {path}: {what}, not a model file: pass the folder itself ({path.parent})"


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


def _matrix_arrays(w: formats.Weights) -> list:
    """Every matrix's arrays (values, scales or blocks), embedding and classifier first, layer by layer after."""
    mats = (w.tok_embeddings, w.wcls, *(m for ms in w.layer_matrices().values() for m in ms))
    return [a for m in mats for a in formats.matrix_arrays(m)]


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0", "f16", "bf16"])
def test_checkpoint_folders_are_quantized_as_they_are_read(tmp_path, tiny_bin, quantize):
    """`--quantize` on a Hugging Face folder (fp32 or fp16 safetensors) or a Meta one quantizes (or rounds to 16
    bits) each matrix as it is read: the same types, labels and bytes as doing it to the model read whole."""
    pytest.importorskip("safetensors")
    pytest.importorskip("torch")
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from babyllama import kernels
    from babyllama.interop.meta import save_meta

    hf = tmp_path / "hf"
    assert run_cli("export", str(hf), "--to", "hf", "--model", str(tiny_bin)).returncode == 0
    hf16 = tmp_path / "hf16"
    hf16.mkdir()
    (hf16 / "config.json").write_bytes((hf / "config.json").read_bytes())
    save_file({k: v.astype(np.float16) for k, v in load_file(hf / "model.safetensors").items()},
              hf16 / "model.safetensors")
    meta = save_meta(formats.load(tiny_bin), tmp_path / "meta", 2)
    for folder in (hf, hf16, meta):
        on_load = open_model(folder, quantize=quantize).weights
        after = open_model(folder).weights.quantize_as(quantize, kernels.q4_0_blocks)
        kinds = on_load.kinds()
        assert kinds == after.kinds() and (kinds == quantize if quantize in ("f16", "bf16") else
                                           "fp32" not in kinds and "f16" not in kinds)
        assert (on_load.version, on_load.group_size) == (after.version, after.group_size)
        for x, y in zip(_matrix_arrays(on_load), _matrix_arrays(after), strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(on_load.rms_ffn, after.rms_ffn)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the peak RSS through /proc")
def test_a_hugging_face_folder_is_read_a_tensor_at_a_time(tmp_path):
    """A Hugging Face folder of 134 MB of fp32 layer matrices (dim 1024, hidden 4096, two layers) quantized on
    load peaks at the quantized model and about two fp32 matrices (ffn_gate's is 16 MiB), never the fp32 model;
    read as it is, at the model once and a little (each tensor is read from the file into memory of its own,
    not left mapped beside the copy: 2.3x the layers before)."""
    pytest.importorskip("safetensors")
    args = tiny_args(dim=1024, hidden_dim=4096, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=300,
                     shared_classifier=True)
    formats.save(random_weights(args, seed=1, scale=0.02), tmp_path / "m.bin")
    folder = tmp_path / "hf"
    assert run_cli("export", str(folder), "--to", "hf", "--model", str(tmp_path / "m.bin")).returncode == 0
    for quantize in ("q4_0", "q8_0", "-"):
        peak, layers = run_memory_script(LOAD_PEAK, str(folder), quantize)
        if quantize == "-":
            assert layers == 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4 and peak < 1.4 * layers, (peak, layers)
        else:
            assert layers < 40e6 and peak < layers + 2 * 16 * 2**20, (quantize, peak, layers)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the peak RSS through /proc")
def test_a_bf16_hugging_face_folder_stays_bf16_in_memory(tmp_path):
    """The same folder in bfloat16 (what checkpoints usually hold): its matrices stay bfloat16 (67 MB of layers,
    half the fp32 model), and loading peaks near that, not at the fp32 model (134 MB)."""
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    args = tiny_args(dim=1024, hidden_dim=4096, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=300,
                     shared_classifier=True)
    formats.save(random_weights(args, seed=1, scale=0.02), tmp_path / "m.bin")
    folder = tmp_path / "hf"
    assert run_cli("export", str(folder), "--to", "hf", "--model", str(tmp_path / "m.bin")).returncode == 0
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    safetensors_torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, folder / "model.safetensors")
    peak, layers = run_memory_script(LOAD_PEAK, str(folder), "-")
    assert layers == 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * 2 and peak < 1.4 * layers, (peak, layers)



def test_a_hugging_face_weight_file_or_index_runs_like_its_folder(tmp_path, tiny_bin, sp_model):
    """What `export --hf` takes, `run` takes too: the folder's model.safetensors or its shard index."""
    pytest.importorskip("safetensors")
    import json

    folder = tmp_path / "hf"
    assert run_cli("export", str(folder), "--model", str(tiny_bin), "--tokenizer", str(sp_model)).returncode == 0
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        weight_map = {name: "model.safetensors" for name in f.keys()}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert detect_format(index) == "hf" and detect_format(folder / "model.safetensors") == "hf"
    assert _greedy(index).stdout == _greedy(folder / "model.safetensors").stdout == _greedy(tiny_bin).stdout
