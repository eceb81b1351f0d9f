"""GGUF out (and back in): what the `gguf` package's reader sees must be our model, metadata and vocabulary."""

from __future__ import annotations

import mmap
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    CHATML,
    LOAD_PEAK,
    ROOT,
    byte_tokenizer,
    cli_error,
    engine_logits,
    logits_after,
    random_weights,
    resident_bytes,
    run_cli,
    run_memory_script,
    tiny_args,
    torch_checkpoint,
)

from babyllama import formats, kernels, kernels_native
from babyllama.cli import main
from babyllama.errors import BabyLlamaError
from babyllama.interop.state_dict import to_state_dict

gguf = pytest.importorskip("gguf")

TOKENS = np.random.default_rng(3).integers(0, 320, 32).tolist()


def export_gguf(tmp_path, dtype: str, tied: bool, tokenizer=None):
    args = tiny_args(vocab_size=320, rope_theta=500000.0, norm_eps=1e-6, shared_classifier=tied)
    w = random_weights(args, seed=6, scale=0.2)
    formats.save(w, tmp_path / "m.bin")
    out = tmp_path / f"m-{dtype}.gguf"
    extra = ["--tokenizer", str(tokenizer)] if tokenizer else []
    r = run_cli("export", str(out), "--model", str(tmp_path / "m.bin"), "--dtype", dtype, *extra)
    assert r.returncode == 0, r.stderr.decode()
    return w, gguf.GGUFReader(out)


def gguf_metadata(reader) -> dict:
    """The gguf package's reading of a file's metadata: key -> a number, a string or a list of them. Decoded from
    ReaderField's parts (every gguf since 0.10 has them; ReaderField.contents() came in 0.16)."""
    def value(field, part: int):
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return field.parts[part].tobytes().decode("utf-8")
        return field.parts[part].tolist()[0]

    return {key: [value(f, i) for i in f.data] if f.types[0] == gguf.GGUFValueType.ARRAY else value(f, f.data[0])
            for key, f in reader.fields.items()}


def test_gguf_carries_llama2s_chat_template_and_reads_back(tmp_path, sp_model):
    """llama.cpp lays a chat out by the file's tokenizer.chat_template (ChatML when there is none)."""
    from babyllama.chat_template import get_template
    from babyllama.loading import open_model

    _, reader = export_gguf(tmp_path, "f32", tied=True, tokenizer=sp_model)
    meta = gguf_metadata(reader)
    assert meta["tokenizer.chat_template"] == get_template().jinja and "[INST]" in meta["tokenizer.chat_template"]
    assert open_model(tmp_path / "m-f32.gguf").weights.args.vocab_size == 320


def test_a_gguf_with_its_own_chat_template_is_noted_on_load(tmp_path, monkeypatch):
    """A GGUF file whose tokenizer.chat_template is not Llama 2's (a ChatML fine-tune's, say) still runs with
    Llama 2's [INST] layout: its load line says so. Llama 2's own template (babyllama's exports, llama.cpp's
    conversions of Meta's chat models: the same words) and a file without one are not noted."""
    from babyllama import chat_template
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer
    from babyllama.loading import open_model

    weights, vocab = random_weights(tiny_args(vocab_size=300)), from_tokenizer(byte_tokenizer(300))
    notes = {}
    for name, jinja in (("ours", chat_template.get_template().jinja), ("chatml", CHATML), ("none", None)):
        template = chat_template.ChatTemplate(name, chat_template._llama2_turn, jinja)
        monkeypatch.setattr(chat_template, "get_template", lambda name=None, t=template: t)
        if jinja is None:  # the writer refuses None: a file without the key
            monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, value: None)
        save_gguf(weights, tmp_path / f"{name}.gguf", vocab)
        assert ("tokenizer.chat_template" in gguf_metadata(gguf.GGUFReader(tmp_path / f"{name}.gguf"))) == bool(jinja)
        notes[name] = open_model(tmp_path / f"{name}.gguf").describe()
    assert "chat_template" not in notes["ours"] and "chat_template" not in notes["none"]
    assert notes["chatml"].endswith("; the file has its own chat_template, which babyllama does not run: chat and "
                                    "serve use Llama 2's [INST] template unless --chat-template or a model card "
                                    "names another")


def gguf_tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def gguf_name(name: str) -> str:  # written out here independently of babyllama.interop.gguf
    table = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{table[rest[: -len('.weight')]]}.weight"


def test_gguf_f32_metadata_tokenizer_tensors(tmp_path, sp_model):
    import sentencepiece as spm

    w, reader = export_gguf(tmp_path, "f32", tied=False, tokenizer=sp_model)
    meta = gguf_metadata(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 0
    expect = {"llama.context_length": 64, "llama.embedding_length": 32, "llama.block_count": 2,
              "llama.feed_forward_length": 64, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.rope.freq_base": 500000.0, "llama.rope.dimension_count": 8, "llama.vocab_size": 320}
    assert {k: meta[k] for k in expect} == expect
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    scores = np.float32([sp.get_score(i) for i in range(n)])
    np.testing.assert_array_equal(np.float32(meta["tokenizer.ggml.scores"]), scores)
    types = meta["tokenizer.ggml.token_type"]
    assert types[:4] == [2, 3, 3, 6] and types[3:259] == [6] * 256 and set(types[259:]) == {1}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)

    tensors = gguf_tensors(reader)
    ours = to_state_dict(w)
    assert set(tensors) == {gguf_name(k) for k in ours}
    for name, t in ours.items():
        np.testing.assert_array_equal(tensors[gguf_name(name)], t, err_msg=name)


def test_user_defined_symbols_travel_as_token_type_4(tmp_path, capsys):
    """A sentencepiece model's user-defined symbols are GGUF's token type 4 (llama.cpp then keeps them whole, as
    sentencepiece does); babyllama running the GGUF keeps them whole too, and a .bin made from it, whose
    tokenizer.bin cannot mark them, is warned about in one line."""
    import sentencepiece as spm
    from conftest import train_sentencepiece

    from babyllama.loading import open_model, tokenizer_for

    symbols = ["<|im_start|>", "<|im_end|>"]
    model = train_sentencepiece(tmp_path / "ud.model", 320, user_defined_symbols=symbols)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = [sp.piece_to_id(s) for s in symbols]
    _, reader = export_gguf(tmp_path, "f32", tied=False, tokenizer=model)
    types = gguf_metadata(reader)["tokenizer.ggml.token_type"]
    assert [types[i] for i in ids] == [4, 4] and types.count(4) == 2
    text = "<|im_start|>user\nthe cat sat on the mat<|im_end|>\n<|im_start|>"
    tok = tokenizer_for(open_model(tmp_path / "m-f32.gguf"))
    assert tok.encode(text, bos=False) == sp.encode(text) and ids[0] in sp.encode(text)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out" / "m.bin"), "--model", str(tmp_path / "m-f32.gguf")]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "has user-defined symbols (<|im_start|>, <|im_end|>), which a tokenizer.bin" \
        in warnings[0], warnings


def test_gguf_q8_0_within_quantization_error(tmp_path, sp_model):
    w, reader = export_gguf(tmp_path, "q8_0", tied=True, tokenizer=sp_model)
    assert gguf_metadata(reader)["general.file_type"] == 7
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    tensors = gguf_tensors(reader)
    for name, t in to_state_dict(w).items():
        got = tensors[gguf_name(name)]
        if t.ndim == 1:
            assert types[gguf_name(name)] == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got, t)
            continue
        assert types[gguf_name(name)] == gguf.GGMLQuantizationType.Q8_0
        # per block of 32: |error| <= half a step (max|x|/127), plus the fp16 rounding of the scale
        blocks = t.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= 0.5 * step * 1.01 + 127 * step * 2**-11), name
        assert not np.array_equal(got, t)


def test_gguf_bf16_export_rounds_to_nearest_even(tmp_path, sp_model):
    """`--dtype bf16`: the matrices are the fp32 weights rounded to bfloat16 as PyTorch rounds them, norms f32;
    the file says MOSTLY_BF16."""
    torch = pytest.importorskip("torch")
    w, reader = export_gguf(tmp_path, "bf16", tied=True, tokenizer=sp_model)
    assert gguf_metadata(reader)["general.file_type"] == 32
    types = {t.name: t.tensor_type for t in reader.tensors}
    tensors = gguf_tensors(reader)
    for name, t in to_state_dict(w).items():
        key = gguf_name(name)
        want = t if t.ndim == 1 else torch.from_numpy(t).to(torch.bfloat16).float().numpy()
        assert types[key] == (gguf.GGMLQuantizationType.F32 if t.ndim == 1 else gguf.GGMLQuantizationType.BF16)
        np.testing.assert_array_equal(tensors[key].reshape(t.shape), want)
        assert t.ndim == 1 or not np.array_equal(want, t)


def test_gguf_f16_and_back_to_bin(tmp_path, sp_model):
    w, reader = export_gguf(tmp_path, "f16", tied=False, tokenizer=sp_model)
    tensors = gguf_tensors(reader)
    for name, t in to_state_dict(w).items():
        want = t if t.ndim == 1 else t.astype(np.float16).astype(np.float32)  # norms stay f32
        np.testing.assert_array_equal(tensors[gguf_name(name)], want)

    # GGUF in: f32 file -> .bin gives the very same model and a tokenizer.bin
    export_gguf(tmp_path, "f32", tied=False, tokenizer=sp_model)
    back = tmp_path / "back" / "m.bin"
    assert main(["export", str(back), "--model", str(tmp_path / "m-f32.gguf")]) == 0
    got = formats.load(back)
    assert got.args == w.args
    assert np.abs(engine_logits(got, TOKENS) - engine_logits(w, TOKENS)).max() == 0
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(back.with_name("tokenizer.bin"))
    ref = Tokenizer.from_sentencepiece(sp_model)
    assert tok.pieces == ref.pieces and np.array_equal(tok.scores, ref.scores)


def test_checkpoint_to_gguf(tmp_path, sp_model):
    """Our training checkpoint -> GGUF: every tensor is the model's parameter under llama.cpp's name."""
    model = torch_checkpoint(tmp_path / "ckpt.pt", tiny_args(vocab_size=320, shared_classifier=False), seed=10)
    out = tmp_path / "m.gguf"
    assert main(["export", str(out), "--checkpoint", str(tmp_path), "--tokenizer", str(sp_model)]) == 0
    tensors = gguf_tensors(gguf.GGUFReader(out))
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert set(tensors) == {gguf_name(k) for k in params}
    for name, p in params.items():
        np.testing.assert_array_equal(tensors[gguf_name(name)], p, err_msg=name)


def test_gguf_vocab_from_tokenizer_bin(tmp_path):
    """A llama2.c tokenizer.bin beside the model: its pieces become sentencepiece text with types."""
    tok = byte_tokenizer(320)
    tok.save(tmp_path / "tokenizer.bin")
    _, reader = export_gguf(tmp_path, "f32", tied=True)
    meta = gguf_metadata(reader)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == 6
    i = tok.pieces.index(b" the")
    assert tokens[i] == "\u2581the" and types[i] == 1


def test_a_token_llama_cpp_ends_generation_at_by_its_text_is_noted(tmp_path):
    """llama.cpp ends generation at tokens whose text marks an end of turn (a ChatML fine-tune's <|im_end|>) even
    without an eot_token_id key; babyllama ends at EOS only and ran past them without a word: the load says so
    (a sentencepiece model's user-defined symbols may be such tokens: the file still runs). A look-alike text is
    no such token."""
    from babyllama.interop.gguf import load_gguf

    notes: list[str] = []
    load_gguf(llama_gguf(tmp_path / "chatml.gguf", pieces={300: "<|im_start|>", 301: "<|im_end|>"}), notes=notes)
    assert [n for n in notes if "llama.cpp ends generation" in n] == [
        "the vocabulary holds '<|im_end|>' (id 301), at which llama.cpp ends generation; babyllama ends it at EOS "
        "(id 2) only"]
    proc = run_cli("run", str(tmp_path / "chatml.gguf"), "-n", "4")
    assert proc.returncode == 0 and b"'<|im_end|>' (id 301), at which llama.cpp ends generation" in proc.stderr
    notes.clear()
    load_gguf(llama_gguf(tmp_path / "alike.gguf", pieces={300: "<|im_start|>", 301: "<|im_end|>x"}), notes=notes)
    assert not [n for n in notes if "llama.cpp ends generation" in n]


def test_an_array_where_a_number_belongs_is_said_to_be_one(tmp_path):
    """A key holding an array (llama.cpp takes per-layer arrays for head_count_kv) was shown as the reader's
    placeholder, "got Skipped(length=2)"."""
    from conftest import one_line_error

    path = llama_gguf(tmp_path / "arrays.gguf", metadata={"llama.attention.head_count_kv": [2, 2]})
    one_line_error(run_cli("run", str(path), "-n", "4"),
                   "field llama.attention.head_count_kv must be an integer, got an array of 2 values")


def test_descriptive_text_that_is_not_utf8_is_read_with_replacement(tmp_path):
    """GGUF strings are UTF-8, but a tool that wrote a Latin-1 general.name made no corrupt model (llama.cpp runs
    it): descriptive keys read with U+FFFD; a key the model's arithmetic or vocabulary depends on stays strict."""
    from babyllama.interop.gguf import read_gguf

    path = llama_gguf(tmp_path / "latin1.gguf", metadata={"general.name": "cafe", "general.author": "Zoe"})
    data = bytearray(path.read_bytes())
    for key, text in ((b"general.name", b"cafe"), (b"general.author", b"Zoe")):
        at = data.index(key + struct.pack("<IQ", 8, len(text)) + text) + len(key) + 12
        data[at + len(text) - 1] = 0xE9  # "caf\xe9", "Zo\xe9": Latin-1
    path.write_bytes(data)
    meta = read_gguf(path)[0]
    assert (meta["general.name"], meta["general.author"]) == ("caf\ufffd", "Zo\ufffd")
    assert main(["run", str(path), "-n", "4", "-t", "0"]) == 0
    tokens = bytearray(path.read_bytes())
    at = tokens.index(b"tok10")
    tokens[at + 4] = 0xE9
    path.write_bytes(tokens)
    with pytest.raises(BabyLlamaError, match="tokenizer.ggml.tokens is not UTF-8"):
        read_gguf(path)


def test_a_gguf_file_name_that_is_not_utf8_still_names_the_model(tmp_path):
    """general.name comes from the file name, and GGUF strings are UTF-8: a name's other bytes (a Latin-1 name on
    Linux) become U+FFFD instead of a UnicodeEncodeError."""
    if sys.platform != "linux":
        pytest.skip("file names of any bytes are Linux's (macOS and Windows store Unicode names)")
    from babyllama.interop.gguf import read_gguf, save_gguf
    from babyllama.interop.vocab import load_vocab

    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    out = tmp_path / os.fsdecode(b"caf\xe9.gguf")
    save_gguf(random_weights(tiny_args()), out, load_vocab(tmp_path / "tokenizer.bin"))
    assert read_gguf(out)[0]["general.name"] == "caf\ufffd"
    assert main(["run", str(out), "-n", "4", "-t", "0"]) == 0


def test_gguf_bad_inputs(tmp_path, capsys, sp_model):
    w = random_weights(tiny_args(vocab_size=333), seed=1)
    formats.save(w, tmp_path / "odd.bin")

    def error(*argv):
        assert main(["export", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("babyllama: error: ")
        return err[0]

    out = str(tmp_path / "x.gguf")
    assert "no tokenizer found" in error(out, "--model", str(tmp_path / "odd.bin"))
    assert "put tokenizer.bin beside it or pass --tokenizer" in error(out, "--model", str(tmp_path / "odd.bin"))
    from babyllama.interop.hf import save_hf

    save_hf(w, tmp_path / "hf")  # a Hugging Face source finds its tokenizer.model in its folder, never a .bin beside
    assert "put tokenizer.model in its folder or pass --tokenizer" in error(out, "--hf", str(tmp_path / "hf"))
    assert "has 320 tokens but the model's vocab_size is 333" in error(
        out, "--model", str(tmp_path / "odd.bin"), "--tokenizer", str(sp_model))
    assert "--version applies to .bin output, not --to gguf" in error(
        out, "--model", str(tmp_path / "odd.bin"), "--version", "2", "--to", "gguf")
    assert "--version 2 is llama2.c .bin output" in error(out, "--model", str(tmp_path / "odd.bin"), "--version", "2")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert "not a readable GGUF file" in error(str(tmp_path / "y.bin"), "--model", str(tmp_path / "bad.gguf"))


def test_a_gguf_file_cut_short_after_its_size_was_taken_is_one_line(tmp_path, monkeypatch):
    """The tensors are checked against the map's bytes, not the size taken before it was made (a file rewritten in
    place as it is opened): a NumPy ValueError otherwise."""
    from babyllama.interop import gguf as ours
    from babyllama.interop.vocab import load_vocab

    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    path = tmp_path / "m.gguf"
    ours.save_gguf(random_weights(tiny_args()), path, load_vocab(tmp_path / "tokenizer.bin"))
    real_size = ours.safeio.file_size

    def size_then_cut(p, what="file"):
        size = real_size(p, what)
        with open(path, "r+b") as f:
            f.truncate(size - 1000)
        return size

    monkeypatch.setattr(ours.safeio, "file_size", size_then_cut)
    with pytest.raises(BabyLlamaError, match="past the end of the file"):
        ours.read_gguf(path)


def test_stories260k_through_gguf_runs_like_run_c(tmp_path):
    """A real trained model (GQA, tied) and its tokenizer.bin through GGUF and back: `run` still prints
    exactly run.c's greedy text."""
    from conftest import shared_file

    model, tok = shared_file("fixtures/stories260K.bin"), shared_file("fixtures/tok512.bin")
    golden = shared_file("fixtures/golden/s260k_t0_n120_dog.txt").read_bytes()
    g = tmp_path / "s260k.gguf"
    assert main(["export", str(g), "--model", str(model), "--tokenizer", str(tok)]) == 0
    assert main(["export", str(tmp_path / "back" / "m.bin"), "--model", str(g)]) == 0
    r = run_cli("run", str(tmp_path / "back" / "m.bin"), "-t", "0", "-n", "120", "-i", "Once upon a time, a little dog")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == golden


# ---------------------------------------------------------------- llama.cpp's quantized files, run as they are


def test_gguf_q4_0_and_q8_0_run_as_mapped_blocks(tmp_path, sp_model):
    """Q4_0 and Q8_0 GGUF tensors are babyllama's block types: loaded without an fp32 copy (views of the
    memory-mapped file, the embedding table included), the same bytes babyllama's own quantizers give, so the
    model's logits equal those of the same model quantized in memory."""
    from babyllama.engine import Engine
    from babyllama.interop.gguf import load_gguf
    from babyllama.quant import BlockTensor, quantize_q8_0

    for dtype in ("q4_0", "q8_0"):
        w, _ = export_gguf(tmp_path, dtype, tied=False, tokenizer=sp_model)
        notes = []
        got, vocab = load_gguf(tmp_path / f"m-{dtype}.gguf", keep_quantized=True, notes=notes)
        assert notes == [] and vocab is not None and got.kinds() == dtype.replace("q8_0", "q8_0 blocks")
        for m in (got.tok_embeddings, got.wcls, *got.wq, *got.w2):
            assert isinstance(m, BlockTensor) and isinstance(m.data.base, np.memmap)
        if dtype == "q4_0":
            want = w.quantize_q4()
        else:
            q = lambda m: quantize_q8_0(m)  # noqa: E731
            want = formats.Weights(w.args, q(w.tok_embeddings), w.rms_att, w.rms_ffn, w.rms_final, wcls=q(w.wcls),
                                   **{name: [q(m) for m in getattr(w, name)] for name in MATRICES})
        for name in MATRICES:
            for a, b in zip(getattr(got, name), getattr(want, name), strict=True):
                np.testing.assert_array_equal(a.data, b.data, err_msg=name)
        a, b = Engine(got), Engine(want)
        np.testing.assert_array_equal(a.forward(TOKENS[:5], range(5), a.new_cache()),
                                      b.forward(TOKENS[:5], range(5), b.new_cache()))
        # the default read dequantizes, as export always has
        np.testing.assert_array_equal(load_gguf(tmp_path / f"m-{dtype}.gguf")[0].wq, got.to_fp32().wq)


def test_the_kernels_types_are_read_without_the_gguf_package(tmp_path, sp_model):
    """F32, F16, BF16, Q8_0 and Q4_0 files run without the gguf package (an extra, whose import alone takes ~60 ms
    of a run's start): the same text as with it. Other types need it, and say so in one line. The types'
    numbers and block sizes are the package's."""
    from babyllama.interop.gguf import _OWN_TYPES

    for t in _OWN_TYPES.values():
        qtype = gguf.GGMLQuantizationType(t.id)
        assert (qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) == (t.name, t.block, t.type_bytes)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "gguf.py").write_text("raise ImportError('the gguf package is not installed')\n")
    without = {"PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}
    for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        export_gguf(tmp_path, dtype, tied=dtype == "q4_0", tokenizer=sp_model)
        argv = ("run", str(tmp_path / f"m-{dtype}.gguf"), "-t", "0", "-n", "24", "-i", "the")
        r, ref = run_cli(*argv, env=without), run_cli(*argv)
        assert r.returncode == 0 and ref.returncode == 0, r.stderr.decode()
        assert len(r.stdout) > 20 and r.stdout == ref.stdout, dtype
    # the types the native kernels convert: the same blocks without the package; where the kernels are not
    # native, the package converts them, and its absence is one line naming the extra
    write_mixed_gguf(tmp_path / "mixed.gguf")
    load = ("from babyllama.interop.gguf import load_gguf; import hashlib, sys; "
            f"w, _ = load_gguf({str(tmp_path / 'mixed.gguf')!r}, keep_quantized=True); "
            "print(hashlib.sha256(b''.join(m.block_bytes().tobytes() for ms in w.layer_matrices().values() "
            "for m in ms) + w.wcls.block_bytes().tobytes()).hexdigest())")
    if kernels.native_backend() is not None:
        r, ref = (subprocess.run([sys.executable, "-c", load], capture_output=True, env={**os.environ, **env})
                  for env in (without, {"PYTHONPATH": str(ROOT)}))
        assert r.returncode == 0 and ref.returncode == 0, r.stderr.decode()
        assert len(r.stdout) == 65 and r.stdout == ref.stdout
    r = run_cli("run", str(tmp_path / "mixed.gguf"), "-n", "4", env={**without, "BABYLLAMA_KERNELS": "numpy"})
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "needs babyllama's 'interop' extra" in err[0], err


MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# where each llama.cpp type keeps its fp16 scale(s) (byte offsets in a block): random bytes elsewhere are valid
FP16_FIELDS = {"Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid llama.cpp blocks of `qtype` with random values: random bytes, small positive fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype.name]:
        scale = rng.uniform(0.001, 0.004, (rows, cols // block)).astype(np.float16)
        data[:, :, off:off + 2] = scale[:, :, None].view(np.uint8)
    return data.reshape(rows, -1)


def write_gguf(path, args, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    """A llama GGUF of `args`' shape with the given (data, type) tensors and no vocabulary."""
    from babyllama.interop.gguf import add_llama_metadata

    w = gguf.GGUFWriter(path, "llama")
    add_llama_metadata(w, args)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CONVERTED_KINDS = ("Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def write_mixed_gguf(path) -> dict:
    """A model whose matrices take turns among CONVERTED_KINDS (the embedding Q6_K, the classifier Q4_K);
    returns its tensors."""
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    args = tiny_args(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=4, vocab_size=300, shared_classifier=False)
    kinds = [T[k] for k in CONVERTED_KINDS]
    tensors = {"token_embd.weight": (random_blocks(T.Q6_K, 300, 256, rng), T.Q6_K),
               "output.weight": (random_blocks(T.Q4_K, 300, 256, rng), T.Q4_K),
               "output_norm.weight": (np.ones(256, np.float32), T.F32)}
    shapes = {"attn_q": (256, 256), "attn_k": (256, 256), "attn_v": (256, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_down": (256, 512), "ffn_up": (512, 256)}
    for layer in range(args.n_layers):
        for i, (name, (rows, cols)) in enumerate(shapes.items()):
            qtype = kinds[(layer * len(shapes) + i) % len(kinds)]
            tensors[f"blk.{layer}.{name}.weight"] = (random_blocks(qtype, rows, cols, rng), qtype)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{layer}.{norm}.weight"] = (np.ones(256, np.float32), T.F32)
    write_gguf(path, args, tensors)
    return tensors


def test_k_quants_and_other_types_are_converted_to_the_nearest_block_type(tmp_path):
    """Q4_1, Q5_0, Q5_1 and Q2_K-Q5_K become Q4_0 and Q6_K becomes Q8_0 on load (never fp32), each within that
    type's quantization error of the file's own values, with the error reported per source type; the model
    then runs on the kernels like any other."""
    from babyllama.engine import Engine
    from babyllama.interop.gguf import load_gguf

    path = tmp_path / "mixed.gguf"
    tensors = write_mixed_gguf(path)
    notes = []
    w, vocab = load_gguf(path, keep_quantized=True, notes=notes)
    assert vocab is None and w.kinds() == "q4_0, q8_0 blocks"
    if os.path.exists("/proc/self/smaps"):  # every matrix was converted: what the checks read of the file is let go
        edges = 2 * mmap.PAGESIZE * len(tensors) + 64 * 1024  # pages two tensors share; the kernel's fault-around
        assert resident_bytes(w.rms_final) <= edges < path.stat().st_size / 2  # rms_final: a view of the map
    assert {n.source: n.target for n in notes} == {**{k: "q4_0" for k in CONVERTED_KINDS[:-1]}, "Q6_K": "q8_0"}
    reference = load_gguf(path)[0]  # every tensor dequantized to fp32
    for note in notes:
        bound = 0.01 if note.target == "q8_0" else 0.1  # random blocks: 0.5% and ~6% measured
        assert 0 < note.relative_rms_error < bound, str(note)
    for name in MATRICES:
        for mine, ref in zip(getattr(w, name), getattr(reference, name), strict=True):
            err = np.sqrt(np.mean((mine.dequantize() - ref) ** 2) / np.mean(ref ** 2))
            assert err < (0.01 if mine.kind == "q8_0" else 0.1), name
    logits = Engine(w).forward([1, 2, 3], range(3), Engine(w).new_cache())
    plain = Engine(w, plain=True)
    np.testing.assert_allclose(logits, plain.forward([1, 2, 3], range(3), plain.new_cache()),
                               atol=1e-4 * np.abs(logits).max(), rtol=0)


@pytest.mark.parametrize("kind, bound", [("q8_0", 0.01), ("f16", 1e-3)])
def test_a_type_asked_for_is_made_from_the_files_own_weights(tmp_path, kind, bound):
    """--quantize on a file of other llama.cpp types quantizes the file's own weights: not the nearest block
    type's conversion of them (Q5_0 through Q4_0 to Q8_0 would keep Q4_0's error)."""
    from babyllama.formats import dense
    from babyllama.interop.gguf import load_gguf
    from babyllama.loading import open_model

    path = tmp_path / "mixed.gguf"
    write_mixed_gguf(path)
    source = open_model(path, quantize=kind)
    reference = load_gguf(path)[0]  # every tensor dequantized to fp32
    assert not any("converted to q4_0" in str(note) for note in source.conversions)
    for name in MATRICES:
        for mine, ref in zip(getattr(source.weights, name), getattr(reference, name), strict=True):
            err = np.sqrt(np.mean((dense(mine) - ref) ** 2) / np.mean(ref ** 2))
            assert err < bound, (name, err)


def test_a_5_bit_grid_made_q4_0_tries_other_scales_and_comes_closer():
    """Q5_0 weights at llama.cpp's Q4_0 scale sit on its rounding ties for half their values: the conversion
    searches scales (quant.quantize_q4_0_searched) and reports a smaller error than that scale gives; Q4_K keeps
    llama.cpp's (the reference blocks)."""
    from babyllama.interop import gguf as ours
    from babyllama.quant import quantize_q4_0

    rng = np.random.default_rng(3)
    for name, searched in (("Q5_0", True), ("Q4_K", False)):
        qtype = ours.tensor_type(gguf.GGMLQuantizationType[name].value)
        data = random_blocks(gguf.GGMLQuantizationType[name], 64, 256, rng)
        ref = ours._dequantized(data, qtype).reshape(-1, 256)
        note = ours.ConversionNote(name, "q4_0")
        blocks = ours._convert(data, qtype, 256, note)
        reference = quantize_q4_0(ref)
        assert np.array_equal(blocks.data, reference.data) != searched, name
        reference_error = np.sqrt(np.sum((reference.dequantize() - ref) ** 2) / np.sum(ref ** 2))
        assert (note.relative_rms_error < 0.95 * reference_error) == searched, (name, note.relative_rms_error)


@pytest.mark.parametrize("name", CONVERTED_KINDS)
def test_the_native_conversion_gives_the_blocks_of_the_gguf_package_and_our_quantizer(name):
    """kernels.c converts each of these types in one pass: the same Q4_0/Q8_0 blocks as the gguf package's
    dequantizer followed by quant.py's conversion quantizer (the error's sums within float64 rounding of NumPy's), on
    blocks with random values and scales of both signs."""
    from babyllama.interop import gguf as ours
    from babyllama.quant import QUANTIZERS, quantize_q4_0_searched

    native = kernels_native.load()
    if native is None:
        pytest.skip("no native kernels (no C compiler)")
    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(5)
    for cols in (256, 768):
        data = rng.integers(0, 256, (300, cols // block, size), dtype=np.uint8)
        for off in FP16_FIELDS[name]:
            scales = rng.uniform(-0.004, 0.004, (300, cols // block, 1)).astype(np.float16)
            data[:, :, off:off + 2] = scales.view(np.uint8)
        data = data.reshape(300, -1)
        kind = ours.nearest_kind(ours.tensor_type(qtype.value))
        ref = ours._dequantized(data, ours.tensor_type(qtype.value)).reshape(-1, cols)
        searched = kind == "q4_0" and name in ours.SEARCHED_Q4_0_SOURCES
        want = quantize_q4_0_searched(ref) if searched else QUANTIZERS[kind](ref)
        got, err_sq, ref_sq = native.convert_ggml(data, qtype.value, cols, kind, searched=searched)
        np.testing.assert_array_equal(got.data, want.data)
        assert err_sq == pytest.approx(float(np.square(want.dequantize() - ref, dtype=np.float64).sum()), rel=1e-12)
        assert ref_sq == pytest.approx(float(np.square(ref, dtype=np.float64).sum()), rel=1e-12)


@pytest.mark.parametrize("kernels", ["native", "numpy"])
def test_a_converted_tensor_with_a_nan_scale_is_refused(tmp_path, kernels, monkeypatch):
    """A Q4_K tensor whose scale is NaN makes NaN weights: loading refuses the file, whichever route converts."""
    from babyllama import kernels as backends
    from babyllama.interop import gguf as ours

    if kernels == "numpy":
        monkeypatch.setattr(backends, "native_backend", lambda: None)
    elif kernels_native.load() is None:
        pytest.skip("no native kernels (no C compiler)")
    path = tmp_path / "mixed.gguf"
    tensors = write_mixed_gguf(path)
    data, qtype = tensors["output.weight"]
    data = data.reshape(300, -1, 144)
    data[7, 0, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    write_gguf(path, tiny_args(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=4, vocab_size=300,
                               shared_classifier=False), {**tensors, "output.weight": (data.reshape(300, -1), qtype)})
    with pytest.raises(BabyLlamaError, match="tensor output.weight holds NaN or infinite values"):
        ours.load_gguf(path, keep_quantized=True)


CONVERTED_RSS = """
import sys
from babyllama.engine import Engine
from babyllama.interop.gguf import load_gguf
from babyllama.memory import keep_freed_memory

keep_freed_memory()  # as the babyllama command runs

before = peak_from_here()
w, _ = load_gguf(sys.argv[1], keep_quantized=True)
engine = Engine(w)
engine.forward([1, 2], [0, 1], engine.new_cache())
blocks = sum(m.nbytes for ms in w.layer_matrices().values() for m in ms)
print(status("VmRSS:") - before, status("VmHWM:") - before, blocks)
"""


def test_a_converted_model_is_resident_once_after_its_first_step(tmp_path):
    """The blocks converted on load are copied into the kernels' order on the first step and freed: their
    memory goes back to the system instead of staying with the allocator (which the babyllama command tells to
    keep what is freed), so the process holds the model's blocks about once (without that, about twice), and
    at no point more than about once and a bit: the file's bytes are handed back as each tensor is converted,
    the freed blocks every eighth of the model as they are copied."""
    from babyllama.memory import _glibc

    peak_reset = os.access("/proc/self/clear_refs", os.W_OK)
    if kernels.native_backend() is None or not peak_reset or _glibc("malloc_trim") is None:
        pytest.skip("needs the native kernels as the backend (they regroup the blocks), /proc (resetting its peak) "
                    "and glibc's malloc_trim")
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(3)
    write_dim1024_gguf(tmp_path / "q6_k.gguf", lambda name, shape: (random_blocks(T.Q6_K, *shape, rng), T.Q6_K))
    grown, peak, blocks = run_memory_script(CONVERTED_RSS, str(tmp_path / "q6_k.gguf"))
    assert blocks > 30e6 and grown < 1.4 * blocks and peak < 1.6 * blocks, (grown, peak, blocks)


def write_dim1024_gguf(path, matrix):
    """A GGUF of two layers of dim 1024 (hidden 4096, 300 tokens, tied classifier: 134 MB of layer matrices in
    fp32), each layer matrix `matrix(name, (rows, cols))` -> (data, type) ("blk.N.attn_q", ...), norms of ones."""
    T = gguf.GGMLQuantizationType
    args = tiny_args(dim=1024, hidden_dim=4096, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=300,
                     shared_classifier=True)
    tensors = {"token_embd.weight": (np.zeros((300, 1024), np.float32), T.F32),
               "output_norm.weight": (np.ones(1024, np.float32), T.F32)}
    shapes = {"attn_q": (1024, 1024), "attn_k": (1024, 1024), "attn_v": (1024, 1024), "attn_output": (1024, 1024),
              "ffn_gate": (4096, 1024), "ffn_down": (1024, 4096), "ffn_up": (4096, 1024)}
    for layer in range(args.n_layers):
        for name, shape in shapes.items():
            tensors[f"blk.{layer}.{name}.weight"] = matrix(f"blk.{layer}.{name}", shape)
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{layer}.{norm}.weight"] = (np.ones(1024, np.float32), T.F32)
    write_gguf(path, args, tensors)
    return path


def write_f32_gguf(path, dtype: str = "f32", nan_at: str | None = None):
    """write_dim1024_gguf's model with random matrices in F32, F16 or BF16, a NaN in the one named `nan_at`."""
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    rng = np.random.default_rng(4)

    def matrix(name, shape):
        m = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        if name == nan_at:
            m[5, 7] = np.nan
        if dtype == "bf16":  # its bits, truncated (a NaN stays one)
            return (m.view(np.uint32) >> 16).astype(np.uint16), qtype
        return m.astype(np.float32 if dtype == "f32" else np.float16), qtype

    return write_dim1024_gguf(path, matrix)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the peak RSS through /proc")
@pytest.mark.parametrize("dtype,quantize", [("f32", "-"), ("f32", "q8_0"), ("f32", "q4_0"), ("f16", "-"),
                                           ("f16", "q4_0"), ("bf16", "-"), ("bf16", "q4_0")])
def test_an_fp32_gguf_is_resident_once_as_it_loads(tmp_path, dtype, quantize):
    """A GGUF's F32 layer matrices are copied into (layers, out, in) stacks; the file's pages under each stack's
    matrices are handed back once it is made, so that loading peaks at the model once and one stack's file
    pages (here 1.28x the layers), not the mapped file and the copy together (2.0x). F16 and BF16 matrices stay
    as they are (half the bytes; converted to fp32 the peak would be over twice their size). Quantized on load,
    each matrix is quantized as it is read: the peak is the quantized model and about one fp32 matrix, never the
    fp32 model."""
    path = write_f32_gguf(tmp_path / f"{dtype}.gguf", dtype)
    peak, layers = run_memory_script(LOAD_PEAK, str(path), quantize)
    if quantize == "-":
        expected = 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * (4 if dtype == "f32" else 2)  # 134 or 67 MB
        assert layers == expected and peak < 1.4 * layers, (peak, layers)
    else:  # the largest matrix, ffn_gate's, is 16 MiB in fp32 (and 8 in the file, read while its copy is made)
        converted = 0 if dtype == "f32" else 8 * 2**20
        assert layers < 40e6 and peak < layers + 2 * 16 * 2**20 + converted, (peak, layers)


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0", "bf16"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_quantizing_a_gguf_on_load_is_quantizing_it_after(tmp_path, dtype, quantize, sp_model):
    """Quantized as each matrix is read, a GGUF's F32/F16/BF16 model is the one quantize_as makes of it loaded whole:
    the same types, group size and bytes."""
    from babyllama import kernels
    from babyllama.loading import open_model

    export_gguf(tmp_path, dtype, tied=False, tokenizer=sp_model)
    path = tmp_path / f"m-{dtype}.gguf"
    on_load = open_model(path, quantize=quantize).weights
    after = open_model(path).weights.quantize_as(quantize, kernels.q4_0_blocks)
    assert on_load.kinds() == after.kinds() == {"q4_0": "q4_0", "q8_0": "q8_0 gs 32", "bf16": "bf16"}[quantize]
    assert (on_load.version, on_load.group_size) == (after.version, after.group_size)
    for a, b in zip(named_matrices(on_load), named_matrices(after), strict=True):
        for x, y in zip(formats.matrix_arrays(a), formats.matrix_arrays(b), strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(on_load.rms_att, after.rms_att)


def named_matrices(w: formats.Weights):
    return [w.tok_embeddings, w.wcls, *(m for ms in w.layer_matrices().values() for m in ms)]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_a_nan_is_refused_when_it_is_quantized_on_load(tmp_path, dtype):
    """A NaN in an F16 or BF16 matrix is refused by name when the model is quantized on load (the quantizers
    give its block a NaN scale), as when it is read whole (BF16: checked on its bits)."""
    from babyllama.loading import open_model

    path = write_f32_gguf(tmp_path / "nan.gguf", dtype, nan_at="blk.1.ffn_up")
    for quantize in (None, "q8_0", "q4_0"):
        with pytest.raises(BabyLlamaError, match="tensor blk.1.ffn_up.weight holds NaN or infinite values"):
            open_model(path, quantize=quantize)


def test_converting_on_threads_gives_the_same_blocks_and_error(monkeypatch):
    """A converted tensor's rows go to several threads a few at a time: the blocks and the reported error are
    the same on one thread as on three."""
    from babyllama.interop import gguf as ours

    T = gguf.GGMLQuantizationType
    data = random_blocks(T.Q4_K, 300, 256, np.random.default_rng(2))
    monkeypatch.setattr(ours, "_CONVERT_ELEMENTS", 64 * 256)  # chunks of 64 rows: five of them
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(ours, "worker_count", lambda threads=threads: threads)
        note = ours.ConversionNote("Q4_K", "q4_0")
        blocks = ours._convert(data, ours.tensor_type(T.Q4_K.value), 256, note)
        results.append((blocks.data, note.err_sq, note.ref_sq))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:] and results[0][1] > 0


@pytest.mark.parametrize("dtype", ["q4_0", "bf16"])
def test_running_or_exporting_a_gguf_keeps_its_tensors_as_stored(tmp_path, sp_model, dtype):
    """`run`/`chat`/`eval` (loading.open_model) keep a Q4_0 or BF16 file's tensors as they are and say what was
    converted; `export` (loading.load_source) reads them as stored too, each written out converted on its turn:
    read as fp32, the whole model in fp32 was held (110M bf16 GGUF to a .bin: 741 MB peak, 353 as stored)."""
    from babyllama.loading import load_source, open_model

    export_gguf(tmp_path, dtype, tied=True, tokenizer=sp_model)
    path = tmp_path / f"m-{dtype}.gguf"
    running = open_model(path)
    assert running.weights.kinds() == dtype and running.conversions == []
    assert f"({dtype}, mapped)" in running.describe()
    exporting = load_source(model=str(path))
    assert exporting.weights.kinds() == dtype
    np.testing.assert_array_equal(exporting.weights.to_fp32().wq, running.weights.to_fp32().wq)
    r = run_cli("run", str(path), "-t", "0", "-n", "12")
    assert r.returncode == 0, r.stderr.decode()


def test_the_pytorch_engine_and_export_get_a_files_own_weights_not_the_kernels_conversion(tmp_path):
    """The PyTorch engine computes in fp32 (bf16 on CUDA) whatever its weights' type, and export writes fp32 or
    quantizes anew: a file of llama.cpp types of no native kernel's (Q5_0, the K-quants, ...) reaches both as the
    file's own weights, dequantized, not through the lossy conversion to Q4_0/Q8_0 made for the native kernels
    (`run --device cpu` on stories260K as Q5_0 read 2.2571 nats a token through it, 2.0331 on its own weights)."""
    pytest.importorskip("torch")
    from babyllama import load
    from babyllama.api import make_engine
    from babyllama.interop.gguf import load_gguf
    from babyllama.loading import load_source

    path = tmp_path / "mixed.gguf"
    write_mixed_gguf(path)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    own = load_gguf(path)[0]  # every tensor dequantized to fp32
    model = load(path, tokenizer=tmp_path / "tok.bin", device="cpu")
    assert "converted" not in model.description  # but said, beside "mapped":
    assert re.search(r"; \d+ \w+ tensors? dequantized to fp32", model.description), model.description
    tokens = [1, 5, 9, 42, 7]
    np.testing.assert_array_equal(logits_after(model.engine, tokens), logits_after(make_engine(own, "cpu"), tokens))
    exporting = load_source(model=str(path)).weights
    for name in MATRICES:
        np.testing.assert_array_equal(getattr(exporting.to_fp32(), name), getattr(own, name))


def test_a_lora_adapter_fine_tuned_on_a_k_quant_gguf_runs_on_every_engine_and_exports(tmp_path):
    """finetune (PyTorch) trains on a GGUF's own weights, as the PyTorch engine and export read them: the adapter
    (known by the hash of those weights) merges on the NumPy engine, the PyTorch one and in export alike (trained
    on the kernels' Q4_0/Q8_0 conversion, it was refused by all but the NumPy engine)."""
    pytest.importorskip("torch")
    from babyllama import load

    path = tmp_path / "mixed.gguf"
    write_mixed_gguf(path)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    (tmp_path / "stories.txt").write_text("Once upon a time there was a cat. The cat sat in the sun.\n" * 40)
    r = run_cli("finetune", f"--base={path}", f"--tokenizer={tmp_path / 'tok.bin'}",
                f"--data={tmp_path / 'stories.txt'}", f"--out_dir={tmp_path / 'lora'}", "--lora_rank=2",
                "--max_iters=2", "--batch_size=2", "--max_seq_len=32", "--eval_interval=2", "--eval_iters=1",
                "--warmup_iters=1", "--device=cpu", timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    tokens = [1, 5, 9, 42, 7]
    logits = {device: logits_after(load(path, tokenizer=tmp_path / "tok.bin", lora=tmp_path / "lora",
                                        device=device).engine, tokens) for device in ("numpy", "cpu")}
    np.testing.assert_allclose(logits["numpy"], logits["cpu"], atol=1e-4)  # one merged model, two arithmetics
    r = run_cli("export", str(tmp_path / "merged.bin"), "--model", str(path), "--lora", str(tmp_path / "lora"),
                "--tokenizer", str(tmp_path / "tok.bin"))
    assert r.returncode == 0, r.stderr.decode()


def test_a_q4_0_model_exports_the_same_gguf_after_it_ran(tmp_path):
    """A Q4_0 model's matrices, put in the native kernels' byte order by running it, go into a GGUF file as
    llama.cpp's blocks all the same."""
    from babyllama.engine import Engine
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    w = random_weights(tiny_args(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=3, vocab_size=320)).quantize_q4()
    vocab = from_tokenizer(byte_tokenizer(320))
    save_gguf(w, tmp_path / "before.gguf", vocab, "q4_0", name="m")
    engine = Engine(w)
    engine.forward([1, 2], range(2), engine.new_cache())
    if not w.wq[0].regrouped:
        pytest.skip("the kernels here keep Q4_0 blocks as they are (no native build with AVX2)")
    save_gguf(w, tmp_path / "after.gguf", vocab, "q4_0", name="m")
    assert (tmp_path / "after.gguf").read_bytes() == (tmp_path / "before.gguf").read_bytes()


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_a_16_bit_gguf_runs_its_weights_as_they_are(tmp_path, sp_model, dtype):
    """An F16 or BF16 file's matrices stay as the file holds them (memory-mapped, half the bytes of fp32); the
    kernels read each weight as the fp32 value it stands for, so every path gives exactly the logits of the model
    converted to fp32: a prompt, decode steps, sequences decoded together; the command line the text of the file
    exported to a version 1 .bin (fp32)."""
    from babyllama.engine import Engine
    from babyllama.formats import BF16Tensor, dense
    from babyllama.loading import open_model

    export_gguf(tmp_path, dtype, tied=False, tokenizer=sp_model)
    path = tmp_path / f"m-{dtype}.gguf"
    w16 = open_model(path).weights
    assert w16.kinds() == dtype and not w16.quantized
    matrices = [w16.tok_embeddings, w16.wcls, *(m for stack in w16.layer_matrices().values() for m in stack)]
    if dtype == "f16":
        assert all(m.dtype == np.float16 for m in matrices)
    else:
        assert all(isinstance(m, BF16Tensor) for m in matrices)
    if kernels.backend().name != "native":  # numba: small fp32 matrices through BLAS, 16-bit ones in its own loop
        pytest.skip("the 16-bit = fp32 exactness is the native kernels', which are not in use here")
    w32 = w16.to_fp32()
    assert w32.kinds() == "fp32"
    np.testing.assert_array_equal(w32.wq, np.stack([dense(m) for m in w16.wq]))
    e16, e32 = Engine(w16), Engine(w32)
    for n in (1, 4, len(TOKENS)):  # a decode step, a short prompt, a long one (sgemm)
        np.testing.assert_array_equal(engine_logits(w16, TOKENS[:n]), engine_logits(w32, TOKENS[:n]))
    caches = e16.new_cache(3), e32.new_cache(3)
    tokens, slots = np.array(TOKENS[:3]), np.arange(3)
    for pos in range(3):  # three sequences a step at a time, together
        got, want = (e.forward(tokens + pos, np.full(3, pos), c, slots) for e, c in zip((e16, e32), caches))
        np.testing.assert_array_equal(got, want)
    plain = Engine(w16, plain=True)  # NumPy converts the weights and multiplies in fp32: other sums, same values
    np.testing.assert_allclose(plain.forward(TOKENS, np.arange(len(TOKENS)), plain.new_cache()),
                               engine_logits(w32, TOKENS), rtol=1e-4, atol=1e-4)
    back = tmp_path / f"{dtype}-as-fp32.bin"
    assert main(["export", str(back), "--model", str(path)]) == 0
    texts = [run_cli("run", str(m), "-z", str(sp_model), "-t", "0", "-n", "40", "-i", "the") for m in (path, back)]
    assert all(r.returncode == 0 for r in texts), texts[0].stderr.decode()
    assert len(texts[0].stdout) > 40 and texts[0].stdout == texts[1].stdout


# ------------------------------------------------------------ what llama.cpp would run differently: refused


class _WriterWithoutArchitecture(gguf.GGUFWriter):
    def add_architecture(self) -> None:  # the writer's constructor adds general.architecture: leave it out
        pass


def llama_gguf(path, args=None, metadata: dict | None = None, tensors: dict | None = None, arch: str | None = "llama",
               pieces: dict[int, str] | None = None):
    """A small llama GGUF written with the gguf package (random fp32 weights, a byte vocabulary whose tokens
    `pieces` names (id -> text) replace): babyllama's llama.* keys, then `metadata` (key -> value: str, bool, int
    (uint32), float (float32) or a list of ints (uint32); added, or replacing a key above) and extra fp32
    `tensors`; general.architecture `arch` (None: no such key)."""
    from babyllama.interop.gguf import add_llama_metadata
    from babyllama.interop.vocab import from_tokenizer

    args = args or tiny_args(vocab_size=320)
    vocab = from_tokenizer(byte_tokenizer(args.vocab_size))
    tokens = list(vocab.tokens)
    for i, text in (pieces or {}).items():
        tokens[i] = text
    w = gguf.GGUFWriter(path, arch) if arch else _WriterWithoutArchitecture(path, "llama")
    add_llama_metadata(w, args)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    T = gguf.GGUFValueType
    for key, value in (metadata or {}).items():
        for added in w.kv_data:  # gguf before 0.17.1 refuses a key given twice instead of replacing it
            added.pop(key, None)
        if isinstance(value, list):
            w.add_array(key, value)
            continue
        kind = {str: T.STRING, bool: T.BOOL, int: T.UINT32, float: T.FLOAT32}[type(value)]
        w.add_key_value(key, value, kind)
    for name, t in {**{gguf_name(k): t for k, t in to_state_dict(random_weights(args, seed=2)).items()},
                    **(tensors or {})}.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("metadata,tensors,pattern", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, {},
     "rope scaling 'linear' with factor 4 is not supported"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 8.0,
      "llama.rope.scaling.original_context_length": 16}, {}, "rope scaling 'yarn' with factor 8 is not supported"),
    ({"llama.rope.scale_linear": 2.0}, {}, "rope scaling 'linear' with factor 2 is not supported"),
    ({"llama.rope.scaling.attn_factor": 1.5}, {}, "rope.scaling.attn_factor 1.5 is not supported"),
    ({}, {"rope_freqs.weight": np.float32([1, 1, 8, 8])}, "tensor rope_freqs.weight scales RoPE's frequencies"),
])
def test_rope_scaling_is_refused(tmp_path, metadata, tensors, pattern):
    """llama.cpp applies a GGUF's rope scaling (a scaling type with its factor, the older rope.scale_linear, an
    attention factor, Llama 3.1's rope_freqs factors); the engine runs plain RoPE, so such a file is refused in
    one line rather than run as another model (or exported with "rope_scaling": null)."""
    path = llama_gguf(tmp_path / "scaled.gguf", metadata=metadata, tensors=tensors)
    from conftest import one_line_error

    one_line_error(run_cli("run", str(path), "-n", "4"), pattern)
    one_line_error(run_cli("export", str(tmp_path / "hf"), "--to", "hf", "--model", str(path)), pattern)


@pytest.mark.parametrize("metadata,tensors", [
    ({}, {}),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, {}),  # "none": llama.cpp never scales
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}, {}),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 0.0, "llama.rope.scale_linear": 1.0}, {}),
    ({"llama.rope.scaling.attn_factor": 1.0}, {"rope_freqs.weight": np.ones(4, np.float32)}),
])
def test_plain_rope_written_out_is_accepted(tmp_path, metadata, tensors):
    """Scaling type "none", a factor of 1 (or 0, llama.cpp's "unset"), an attention factor of 1 and rope_freqs
    factors that are all ones are plain RoPE: the same model as the file without them."""
    from babyllama.interop.gguf import load_gguf

    plain = load_gguf(llama_gguf(tmp_path / "plain.gguf"))[0]
    written = load_gguf(llama_gguf(tmp_path / "written.gguf", metadata=metadata, tensors=tensors))[0]
    assert written.args == plain.args
    np.testing.assert_array_equal(engine_logits(written, TOKENS[:6]), engine_logits(plain, TOKENS[:6]))


@pytest.mark.parametrize("metadata,pattern", [
    ({"tokenizer.ggml.bos_token_id": 5}, "tokenizer.ggml.bos_token_id 5: not supported"),
    ({"tokenizer.ggml.eos_token_id": 7}, "tokenizer.ggml.eos_token_id 7: not supported"),
    ({"tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1},
     "tokenizer.ggml.bos_token_id 2, tokenizer.ggml.eos_token_id 1: not supported"),
    ({"tokenizer.ggml.add_bos_token": False}, "tokenizer.ggml.add_bos_token false: not supported"),
    ({"tokenizer.ggml.add_eos_token": True}, "tokenizer.ggml.add_eos_token true: not supported"),
    ({"tokenizer.ggml.unknown_token_id": 5}, "tokenizer.ggml.unknown_token_id 5: not supported"),
    ({"tokenizer.ggml.add_space_prefix": False}, "tokenizer.ggml.add_space_prefix false: not supported"),
    ({"tokenizer.ggml.eot_token_id": 300},
     "tokenizer.ggml.eot_token_id 300 (llama.cpp ends generation there): not supported"),
    ({"tokenizer.ggml.eom_token_id": 1},
     "tokenizer.ggml.eom_token_id 1 (llama.cpp ends generation there): not supported"),
])
def test_special_tokens_other_than_llama2cs_are_refused(tmp_path, metadata, pattern):
    """The engine prepends BOS id 1 to every prompt and a chat reply ends at EOS id 2 (llama2.c's convention);
    llama.cpp follows the file's own ids and add_bos/add_eos flags, so a file that sets them otherwise is refused
    in one line saying what differs."""
    from conftest import one_line_error

    path = llama_gguf(tmp_path / "specials.gguf", metadata=metadata)
    err = one_line_error(run_cli("run", str(path), "-n", "4"), pattern)
    assert "llama2.c's convention (BOS id 1 prepended to every prompt, EOS id 2" in err


def test_llama2cs_special_tokens_written_out_are_accepted(tmp_path):
    """The ids 1 and 2 and add_bos_token true, add_eos_token false written out (as babyllama's export and llama.cpp's
    converter write them) or absent: the file runs."""
    from babyllama.interop.gguf import load_gguf

    written = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
               "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
               "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.eot_token_id": 2}
    for metadata in ({}, written):
        vocab = load_gguf(llama_gguf(tmp_path / "m.gguf", metadata=metadata))[1]
        assert vocab is not None and (vocab.bos_id, vocab.eos_id) == (1, 2)


def test_a_rotary_dimension_larger_than_the_head_says_so(tmp_path):
    """rope.dimension_count must be the head size (embedding_length / head_count): larger is named as such;
    smaller is a partial rotary embedding."""
    from conftest import one_line_error

    args = tiny_args(dim=64, n_heads=16, n_kv_heads=8, vocab_size=320)  # heads of 4
    larger = llama_gguf(tmp_path / "larger.gguf", args, {"llama.rope.dimension_count": 8})
    one_line_error(run_cli("run", str(larger), "-n", "4"),
                   "the rotary dimension (rope.dimension_count 8) is larger than the head size 4 "
                   "(embedding_length 64 / head_count 16)")
    partial = llama_gguf(tmp_path / "partial.gguf", args, {"llama.rope.dimension_count": 2})
    one_line_error(run_cli("run", str(partial), "-n", "4"), "partial rotary embedding (2 of 4) is not supported")


@pytest.mark.parametrize("dtype, tensor, why", [
    ("f16", "blk.0.attn_q.weight", ""),
    ("q8_0", "blk.0.ffn_down.weight", " (its rows of 80 do not split into q8_0 blocks: written as f16)"),
])
def test_a_weight_beyond_fp16s_range_refuses_f16_gguf_output(tmp_path, capsys, dtype, tensor, why):
    """fp16 tensors (--dtype f16, and a matrix whose rows do not split into blocks of 32) would hold infinities
    where a weight lies beyond 65504, which every reader refuses as a corrupt file: refused in one line, naming the
    tensor, as Hugging Face f16 output refuses it; bf16 holds such weights."""
    args = tiny_args(vocab_size=300, hidden_dim=80)
    w = random_weights(args, seed=1)
    w.wq[0, 0, 0] = w.w2[0, 0, 0] = 7e4
    formats.save(w, tmp_path / "m.bin")
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    out = tmp_path / "m.gguf"
    assert main(["export", str(out), "--model", str(tmp_path / "m.bin"), "--dtype", dtype]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # q8_0: a note on the f16 matrices first
    assert err[-1] == f"babyllama: error: tensor {tensor}{why}: weights beyond fp16's range (|w| > 65504): use bf16"
    assert len(err) == 1 + (dtype != "f16")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert main(["export", str(out), "--model", str(tmp_path / "m.bin"), "--dtype", "bf16"]) == 0


@pytest.mark.parametrize("dim, hidden_dim, dtype, note, file_type", [
    (32, 80, "q8_0", "2 of 16 matrices written as f16: their rows (of 80)", "MOSTLY_Q8_0"),
    (48, 100, "q4_0", "16 of 16 matrices written as f16: their rows (of 48, 100)", "MOSTLY_F16"),
    (32, 96, "q4_0", None, "MOSTLY_Q4_0"),
])
def test_matrices_written_as_f16_for_want_of_whole_blocks_are_said(tmp_path, capsys, dim, hidden_dim, dtype, note,
                                                                   file_type):
    """Rows that do not split into blocks of 32 are written as f16 (as llama.cpp's converter does): a note says
    how many, and a file with no matrix in the type asked for says f16 in general.file_type."""
    w = random_weights(tiny_args(dim=dim, hidden_dim=hidden_dim, n_heads=4, vocab_size=300, shared_classifier=False))
    formats.save(w, tmp_path / "m.bin")
    byte_tokenizer(300).save(tmp_path / "tokenizer.bin")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.gguf"), "--model", str(tmp_path / "m.bin"), "--dtype", dtype]) == 0
    err = capsys.readouterr().err
    assert (f"note: {note} do not split into {dtype}'s blocks of 32" in err) if note else "note:" not in err, err
    meta = gguf_metadata(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert meta["general.file_type"] == gguf.LlamaFileType[file_type]


@pytest.mark.parametrize("arch, pattern", [
    ("mistral", "unsupported architecture 'mistral' (only 'llama' GGUF files)"),
    ("qwen2", "unsupported architecture 'qwen2' (only 'llama' GGUF files)"),
    (None, "general.architecture is missing (only 'llama' GGUF files, which say so)"),
])
def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path, arch, pattern):
    from conftest import one_line_error

    path = llama_gguf(tmp_path / "other.gguf", arch=arch)
    one_line_error(run_cli("run", str(path), "-n", "4"), pattern)
    one_line_error(run_cli("export", str(tmp_path / "o.bin"), "--model", str(path)), pattern)


def test_a_file_of_a_split_gguf_model_says_to_merge_them(tmp_path):
    """llama.cpp's gguf-split writes a model as several files (split.count in the first): one file alone lacks
    most tensors, which is no corrupt file."""
    from conftest import one_line_error

    path = llama_gguf(tmp_path / "m-00001-of-00003.gguf", metadata={"split.count": 3, "split.no": 0})
    one_line_error(run_cli("run", str(path), "-n", "4"),
                   "one of 3 files of a split GGUF model; merge them into one first")


def test_a_vocab_size_or_token_list_that_disagrees_with_the_embedding_is_one_line(tmp_path, capsys):
    """llama.vocab_size, the token list and the embedding's rows must agree: a file where they do not is refused
    on load in one line (the embedding sizes the model), not run with a vocabulary it does not have."""
    from babyllama.interop.gguf import add_llama_metadata, load_gguf
    from babyllama.interop.vocab import from_tokenizer

    path = llama_gguf(tmp_path / "vs.gguf", metadata={"llama.vocab_size": 500})
    msg = cli_error(capsys, "run", str(path), "-n", "4")
    assert "llama.vocab_size is 500 but tensor token_embd.weight has 320 rows" in msg
    with pytest.raises(BabyLlamaError, match="llama.vocab_size is 500"):
        load_gguf(path)
    args = tiny_args(vocab_size=320)
    w = gguf.GGUFWriter(tmp_path / "short.gguf", "llama")
    add_llama_metadata(w, args)
    vocab = from_tokenizer(byte_tokenizer(300))
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    for name, t in to_state_dict(random_weights(args, seed=2)).items():
        w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "its vocabulary has 300 tokens but the model's vocab_size is 320" in \
        cli_error(capsys, "run", str(tmp_path / "short.gguf"), "-n", "4")
