"""GGUF out (and back in): what the `gguf` package's reader sees must be our model, metadata and vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import byte_tokenizer, engine_logits, random_weights, run_cli, tiny_args, torch_checkpoint

from babyllama import formats
from babyllama.cli import main
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
    meta = {k: f.contents() for k, f in reader.fields.items()}
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


def test_gguf_q8_0_within_quantization_error(tmp_path, sp_model):
    w, reader = export_gguf(tmp_path, "q8_0", tied=True, tokenizer=sp_model)
    assert {k: f.contents() for k, f in reader.fields.items()}["general.file_type"] == 7
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
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == 6
    i = tok.pieces.index(b" the")
    assert tokens[i] == "\u2581the" and types[i] == 1


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
    assert "has 320 tokens but the model's vocab_size is 333" in error(
        out, "--model", str(tmp_path / "odd.bin"), "--tokenizer", str(sp_model))
    assert "--version applies to .bin output, not --to gguf" in error(
        out, "--model", str(tmp_path / "odd.bin"), "--version", "2")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert "not a readable GGUF file" in error(str(tmp_path / "y.bin"), "--model", str(tmp_path / "bad.gguf"))


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
