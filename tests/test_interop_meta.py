"""Meta's original checkpoint layout in: params.json + consolidated.NN.pth shards made from our own model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import engine_logits, random_weights, run_cli, tiny_args, torch_checkpoint, torch_logits

from babyllama import formats
from babyllama.cli import main
from babyllama.interop.meta import save_meta

torch = pytest.importorskip("torch")

TOKENS = np.random.default_rng(2).integers(0, 300, 32).tolist()


def meta_model(tmp_path, n_shards=2, **kw):
    args = tiny_args(rope_theta=1e6, norm_eps=1e-6, shared_classifier=False, **kw)
    w = random_weights(args, seed=5, scale=0.2)
    return w, save_meta(w, tmp_path / "llama-tiny", n_shards)


def test_meta_shards_follow_fairscale_layout(tmp_path):
    """Each shard holds Meta's model-parallel slice: column-parallel rows, row-parallel columns, the
    embedding split along dim, norms whole (the shapes of Llama-2-13B's two shards, scaled down)."""
    w, folder = meta_model(tmp_path)
    shards = [torch.load(folder / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    d, h, kv, V = 32, 64, 16, 300
    want = {"tok_embeddings.weight": (V, d // 2), "output.weight": (V // 2, d), "norm.weight": (d,),
            "layers.1.attention.wq.weight": (d // 2, d), "layers.1.attention.wk.weight": (kv // 2, d),
            "layers.1.attention.wo.weight": (d, d // 2), "layers.1.feed_forward.w1.weight": (h // 2, d),
            "layers.1.feed_forward.w2.weight": (d, h // 2), "layers.1.attention_norm.weight": (d,)}
    for shard in shards:
        assert {k: tuple(shard[k].shape) for k in want} == want
    np.testing.assert_array_equal(shards[1]["layers.0.attention.wo.weight"].numpy(), w.wo[0][:, d // 2:])
    params = json.loads((folder / "params.json").read_text())
    assert params["vocab_size"] == -1 and "hidden_dim" not in params


def test_meta_import_matches_model(tmp_path):
    w, folder = meta_model(tmp_path)
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    shard["rope.freqs"] = torch.ones(8)  # Meta's RoPE table, which the model computes for itself: not read
    torch.save(shard, folder / "consolidated.00.pth")
    out = tmp_path / "out.bin"
    r = run_cli("export", str(out), "--meta-llama", str(folder), "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr.decode()
    got = formats.load(out)
    assert got.args == w.args  # hidden_dim from multiple_of/ffn_dim_multiplier, theta and eps carried
    assert np.abs(engine_logits(got, TOKENS) - engine_logits(w, TOKENS)).max() <= 1e-4



def test_shards_are_joined_by_rank_with_or_without_leading_zeros(tmp_path):
    """Eleven shards named consolidated.0.pth to consolidated.10.pth: by name "10" sorts before "2", and the
    matrices were joined in that order without a word."""
    from babyllama.interop.meta import load_meta

    args = tiny_args(dim=88, n_heads=11, n_kv_heads=11, hidden_dim=176, vocab_size=528, n_layers=1)
    w = random_weights(args, seed=3, scale=0.2)
    folder = save_meta(w, tmp_path / "eleven", 11)
    want = engine_logits(load_meta(folder), TOKENS)
    for shard in folder.glob("consolidated.*.pth"):
        shard.rename(shard.with_name(f"consolidated.{int(shard.name.split('.')[1])}.pth"))
    np.testing.assert_array_equal(engine_logits(load_meta(folder), TOKENS), want)


def test_shards_in_torchs_format_before_its_zip_are_read(tmp_path):
    """Shards torch.save wrote before PyTorch 1.6 (one pickle, which cannot be memory-mapped) are read into memory."""
    from babyllama.interop.meta import load_meta

    w, folder = meta_model(tmp_path)
    for shard in folder.glob("consolidated.*.pth"):
        torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    assert np.abs(engine_logits(load_meta(folder), TOKENS) - engine_logits(w, TOKENS)).max() <= 1e-4

def test_meta_import_of_our_pytorch_model(tmp_path):
    """Our PyTorch model -> Meta layout (2 shards) -> export -> the NumPy engine gives its logits."""
    args = tiny_args(rope_theta=1e6, norm_eps=1e-6, shared_classifier=False)
    model = torch_checkpoint(tmp_path / "ckpt.pt", args, seed=8)
    save_meta(model.to_weights(), tmp_path / "meta", n_shards=2)
    assert main(["export", str(tmp_path / "m.bin"), "--meta-llama", str(tmp_path / "meta"),
                 "--max-seq-len", "64"]) == 0
    got = formats.load(tmp_path / "m.bin")
    assert np.abs(engine_logits(got, TOKENS) - torch_logits(model, TOKENS)).max() <= 1e-4


def test_meta_import_q8_and_defaults(tmp_path):
    w, folder = meta_model(tmp_path, n_shards=1)
    params = json.loads((folder / "params.json").read_text())
    del params["rope_theta"]  # Llama 2's params.json has neither theta nor a context length
    (folder / "params.json").write_text(json.dumps(params))
    assert main(["export", str(tmp_path / "q.bin"), "--meta-llama", str(folder), "--version", "2"]) == 0
    q = formats.load(tmp_path / "q.bin")
    assert q.version == 2 and q.args.max_seq_len == 4096 and q.args.rope_theta == 10000.0
    w.args.rope_theta, w.args.max_seq_len = 10000.0, 4096
    formats.save(w, tmp_path / "ref.bin", version=2)  # the same model, quantized by our own writer
    np.testing.assert_array_equal(engine_logits(q, TOKENS), engine_logits(formats.load(tmp_path / "ref.bin"), TOKENS))


def test_meta_bad_inputs(tmp_path, capsys):
    def error(*argv):
        assert main(["export", str(tmp_path / "m.bin"), *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("babyllama: error: ")
        return err[0]

    assert "not a directory" in error("--meta-llama", str(tmp_path / "nope"))
    _, folder = meta_model(tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(dict(params, use_scaled_rope=True)))
    assert "scaled RoPE" in error("--meta-llama", str(folder))
    (folder / "params.json").write_text(json.dumps(dict(params, multiple_of=256)))
    assert "feed_forward.w1.weight has shape (64, 32), the config implies (256, 32)" in error(
        "--meta-llama", str(folder))
    (folder / "params.json").write_text(json.dumps(dict(params, n_layers=params["n_layers"] - 1)))
    assert f"unexpected tensor layers.{params['n_layers'] - 1}." in error("--meta-llama", str(folder))
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")  # a rank missing
    assert "found consolidated.00.pth, consolidated.02.pth" in error("--meta-llama", str(folder))
    (folder / "consolidated.02.pth").rename(folder / "consolidated.01.pth")
    (folder / "consolidated.01.pth").write_bytes(b"garbage")
    assert "consolidated.01.pth: not a readable PyTorch checkpoint" in error("--meta-llama", str(folder))
    for f in folder.glob("*.pth"):
        f.unlink()
    assert "no consolidated.*.pth shards" in error("--meta-llama", str(folder))
    (folder / "params.json").unlink()
    assert "params.json: missing" in error("--meta-llama", str(folder))


@pytest.mark.parametrize("tied", [False, True])
def test_a_bf16_meta_checkpoint_keeps_its_matrices_in_bf16(tmp_path, tied):
    """Meta ships bfloat16 shards: their matrices (split across shards or not) stay bfloat16 (BF16Tensor: half the
    memory of fp32, which the native kernels read as the fp32 values they stand for), the norms become fp32; the
    values are the fp32 model's rounded as PyTorch rounds to bfloat16, and the classifier is still recognised as
    the embedding's when it is."""
    from babyllama.formats import BF16Tensor, dense
    from babyllama.interop.meta import load_meta

    w = random_weights(tiny_args(rope_theta=1e6, norm_eps=1e-6, shared_classifier=tied), seed=5, scale=0.2)
    folder = save_meta(w, tmp_path / "llama-tiny", 2)
    for shard in folder.glob("consolidated.*.pth"):
        torch.save({k: t.to(torch.bfloat16) for k, t in torch.load(shard, weights_only=True).items()}, shard)
    got = load_meta(folder)
    assert got.kinds() == "bf16" and got.args.shared_classifier == tied
    assert all(isinstance(m, BF16Tensor) for m in (got.tok_embeddings, got.wcls, *got.wq, *got.w2))
    assert got.rms_att.dtype == np.float32

    def rounded(a: np.ndarray) -> np.ndarray:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy()

    for name in ("wq", "wo", "w2"):
        for layer in range(w.args.n_layers):
            np.testing.assert_array_equal(dense(getattr(got, name)[layer]), rounded(getattr(w, name)[layer]))
    np.testing.assert_array_equal(dense(got.tok_embeddings), rounded(w.tok_embeddings))
    np.testing.assert_array_equal(got.rms_att, rounded(w.rms_att))  # stored in bf16 too: exact in fp32
    # the same values run as bf16 and as fp32 (exactly the same on the native kernels: see the GGUF tests)
    assert np.abs(engine_logits(got, TOKENS) - engine_logits(got.to_fp32(), TOKENS)).max() <= 1e-5
