"""Training stack: the PyTorch model against the NumPy engine, and the whole pipeline end to end on a corpus
made here (train-vocab → pretokenize → train → export v0/v1/v2 → run, and sample on the checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from conftest import make_story_corpus, random_weights, run_cli, tiny_args  # noqa: E402

from babyllama import formats  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.model import TorchEngine, Transformer  # noqa: E402
from babyllama.tokenizer import BOS, Tokenizer  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only add overhead on a shared machine
TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=64", "--batch_size=16",
        "--gradient_accumulation_steps=1", "--learning_rate=3e-3", "--warmup_iters=20", "--eval_iters=5"]
PROMPT = "Once upon a time"


def ok(proc):
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("kw", [
    dict(),
    dict(shared_classifier=False),
    dict(n_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6),
    dict(n_kv_heads=4, dim=48, n_heads=4, hidden_dim=96),
], ids=["tied-gqa", "untied", "mqa-theta-eps", "mha"])
def test_logits_match_numpy_engine_at_every_position(kw):
    args = tiny_args(**kw)
    w = random_weights(args, seed=3, scale=0.2)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, 64)
    engine = Engine(w)
    expected = engine.forward(tokens, np.arange(64), engine.new_cache())
    model = Transformer.from_weights(w).eval()
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens)[None])
    assert np.abs(logits[0].numpy() - expected).max() <= 1e-4


def test_kv_cache_generation_path_matches_full_forward():
    args = tiny_args()
    w = random_weights(args, seed=4, scale=0.2)
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, 40)
    engine = Engine(w)
    expected = engine.forward(tokens, np.arange(40), engine.new_cache())
    te = TorchEngine(Transformer.from_weights(w))
    cache = te.new_cache(2)
    # a prompt in two chunks, then single tokens, in slot 1 (slot 0 holds something else)
    te.forward(tokens[:5], np.arange(5), cache, slots=np.zeros(5, int))
    parts = [te.forward(tokens[:17], np.arange(17), cache, slots=np.ones(17, int)),
             te.forward(tokens[17:30], np.arange(17, 30), cache, slots=np.ones(13, int))]
    parts += [te.forward(tokens[i:i + 1], [i], cache, slots=[1]) for i in range(30, 40)]
    assert np.abs(np.concatenate(parts) - expected).max() <= 1e-4
    last = te.forward(tokens[:8], np.arange(8), te.new_cache(), logits="last")
    assert last.shape == (1, args.vocab_size)


def test_weights_round_trip_through_the_model():
    for shared in (True, False):
        w = random_weights(tiny_args(shared_classifier=shared), seed=5)
        back = Transformer.from_weights(w).to_weights()
        assert back.args.shared_classifier == shared
        for name in ("tok_embeddings", "rms_att", "rms_ffn", "rms_final", "wq", "wk", "wv", "wo", "w1", "w2",
                     "w3", "wcls"):
            assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(w, name))), name


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train-vocab → pretokenize → train (200 steps) in a fresh folder, all through the CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    corpus.mkdir()
    make_story_corpus(corpus / "train.txt", 1500, seed=0)
    make_story_corpus(corpus / "valid.txt", 100, seed=1)
    ok(run_cli("data", "train-vocab", "--vocab-size", "512", "--input", "corpus", "--data-dir", "data", cwd=root))
    ok(run_cli("data", "pretokenize", "--input", "corpus", "--vocab-size", "512", "--data-dir", "data",
               "--workers", "2", cwd=root))
    ok(run_cli("train", "--data_dir=data/tok512", "--out_dir=out", *TINY, "--max_iters=200", "--eval_interval=100",
               "--log_interval=10", cwd=root, env=ONE_THREAD, timeout=300))
    return root


def test_shards_hold_bos_and_the_run_tokenizers_ids(pipeline):
    from babyllama.train.data import read_documents

    data = pipeline / "data"
    tok = Tokenizer.load(data / "tok512.bin")
    assert (data / "tok512" / "tokenizer.bin").read_bytes() == (data / "tok512.bin").read_bytes()
    meta = json.loads((pipeline / "data" / "tok512" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["shards"] == {"train": ["train.bin"], "val": ["valid.bin"]}
    shard = np.fromfile(pipeline / "data" / "tok512" / "valid.bin", dtype=np.uint16)
    docs = list(read_documents(pipeline / "corpus" / "valid.txt"))
    assert len(docs) == 100 and (shard == BOS).sum() == 100
    # sentencepiece (which pretokenized) and the tokenizer.bin encoder that `run` uses agree exactly
    assert shard.tolist() == [t for doc in docs for t in tok.encode(doc, bos=True)]


def test_training_loss_falls_and_artifacts_are_written(pipeline):
    out = pipeline / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in evals] == [0, 100, 200]
    assert [r["iter"] for r in steps] == list(range(10, 201, 10))
    assert evals[0]["val_loss"] > 5.5  # ~ln(512) untrained
    assert evals[-1]["val_loss"] < 0.3 * evals[0]["val_loss"]
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"] and steps[-1]["tokens_per_s"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 200 and ckpt["model_args"]["dim"] == 64 and ckpt["config"]["max_iters"] == 200
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))


def test_exports_run_like_sample_on_the_checkpoint(pipeline):
    for v in (0, 1, 2):
        ok(run_cli("export", f"exp/m{v}.bin", "--checkpoint", "out/ckpt.pt", "--version", str(v), cwd=pipeline))
    assert (pipeline / "exp" / "tokenizer.bin").is_file()  # copied beside the export so `run` finds it
    greedy = ["-t", "0", "-n", "60", "-i", PROMPT]
    sampled = ["-t", "1.0", "-p", "0.9", "-s", "7", "-n", "60"]
    for flags in (greedy, sampled):
        expected = ok(run_cli("sample", "--checkpoint", "out/ckpt.pt", *flags, cwd=pipeline, env=ONE_THREAD)).stdout
        assert len(expected) > 100
        for v in (0, 1):
            assert ok(run_cli("run", f"exp/m{v}.bin", *flags, cwd=pipeline)).stdout == expected
    q8 = ok(run_cli("run", "exp/m2.bin", *greedy, cwd=pipeline)).stdout
    assert q8.startswith(PROMPT.encode()) and len(q8) > 100
    assert formats.load(pipeline / "exp" / "m2.bin").version == 2


def test_trained_model_logits_match_its_export(pipeline):
    from babyllama.train.checkpoint import load_model

    model = load_model(pipeline / "out" / "ckpt.pt")
    tokens = np.fromfile(pipeline / "data" / "tok512" / "valid.bin", dtype=np.uint16)[:64].astype(np.int64)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens)[None])
    exported = pipeline / "parity.bin"
    ok(run_cli("export", str(exported), "--checkpoint", "out", "--version", "1", cwd=pipeline))
    engine = Engine(formats.load(exported))
    expected = engine.forward(tokens, np.arange(64), engine.new_cache())
    assert np.abs(logits[0].numpy() - expected).max() <= 1e-4
