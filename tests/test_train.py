"""Training stack: the PyTorch model against the NumPy engine, and the whole pipeline end to end on a corpus
made here (train-vocab → pretokenize → train → export v0/v1/v2 → run, and sample on the checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from conftest import (  # noqa: E402
    ROOT,
    batched_decode_side_by_side,
    byte_tokenizer,
    cli_error,
    make_story_corpus,
    random_weights,
    run_cli,
    tiny_args,
)

from babyllama import formats  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.model import TorchEngine, Transformer, rope_tables  # noqa: E402
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


TORCH_FORK_SCRIPT = """
import os, signal, sys, torch, babyllama
torch.set_num_threads(2)
model = babyllama.load(device="cpu")
text = model.generate("Once upon a time", steps=40, temperature=0)
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hung child ends by SIGALRM
    os._exit(0 if model.generate("Once upon a time", steps=40, temperature=0) == text else 3)
print(os.waitpid(pid, 0)[1])
"""


def test_a_process_forked_after_the_torch_engine_ran_still_generates():
    """PyTorch's CPU operations run on GNU OpenMP's threads, which do not survive a fork: a child forked after the
    engine ran (a worker of a multiprocessing fork pool) hung forever at its first step. It generates the same
    text on one thread, and says once why."""
    r = subprocess.run([sys.executable, "-c", TORCH_FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "0", (r.stdout, r.stderr)  # 14: SIGALRM, the child hung
    assert r.stderr.count("PyTorch's OpenMP threads do not survive a fork") == 1, r.stderr


@pytest.mark.parametrize("tokens, positions, slots, message", [
    ([1, 2, 3], [0, 1], None, "one entry per token"),
    ([1, 2], [0, 1, 2], None, "one entry per token"),
    ([1, 2], [0, 1], [0, 1, 1], "one entry per token"),
    ([], [], None, "at least one token"),
])
def test_torch_engine_refuses_lengths_that_do_not_match_as_the_numpy_engine_does(tokens, positions, slots, message):
    """A shorter positions or slots list was zipped with the tokens: logits for positions never asked for."""
    te = TorchEngine(Transformer.from_weights(random_weights(tiny_args())))
    with pytest.raises(ValueError, match=message):
        te.forward(tokens, positions, te.new_cache(2), slots)


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


@pytest.mark.parametrize("compile", [False, True])
def test_batched_decode_step_matches_the_numpy_engine(compile):
    """One token per sequence at different positions (the batched decode step that --compile compiles, and
    captures in a CUDA graph on a GPU) gives the NumPy engine's logits, with grouped key/value heads."""
    args = tiny_args(n_kv_heads=2)
    w = random_weights(args, seed=6, scale=0.2)
    engine, te = Engine(w), TorchEngine(Transformer.from_weights(w), compile=compile)
    for want, got in batched_decode_side_by_side(engine, te, args.vocab_size, steps=4):
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_engine_stays_near_the_numpy_engine(compile):
    """The engine `--device cuda` builds (bf16 weights and cache; RoPE tables left in fp32), run here on the
    CPU: a prompt, then batched single-token steps, eager and compiled, within bf16's error of the NumPy
    engine's fp32 logits (measured: 0.18 at most on logits up to 4.6; fp32 agrees to 5e-6)."""
    args = tiny_args(n_kv_heads=2)
    w = random_weights(args, seed=6, scale=0.2)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, 40)
    engine = Engine(w)
    want = engine.forward(tokens, np.arange(40), engine.new_cache())
    te = TorchEngine(Transformer.from_weights(w), compile=compile, dtype=torch.bfloat16)
    cache = te.new_cache(2)
    assert cache.layers[0][0].dtype == te.model.output.weight.dtype == torch.bfloat16
    cos, sin = rope_tables(args.head_size, args.max_seq_len, args.rope_theta)
    assert torch.equal(te.model.freqs_cos, cos) and torch.equal(te.model.freqs_sin, sin)
    te.forward(tokens[:20], np.arange(20), cache, slots=np.ones(20, int))  # another sequence in slot 1
    got = [te.forward(tokens[:20], np.arange(20), cache, slots=np.zeros(20, int))]
    got += [te.forward(tokens[i:i + 1], [i], cache, slots=[0]) for i in range(20, 40)]
    err = np.abs(np.concatenate(got) - want)
    assert err.max() <= 0.05 * np.abs(want).max() and err.mean() <= 0.01 * np.abs(want).max()


def test_weights_round_trip_through_the_model():
    for shared in (True, False):
        w = random_weights(tiny_args(shared_classifier=shared), seed=5)
        back = Transformer.from_weights(w).to_weights()
        assert back.args.shared_classifier == shared
        for name in ("tok_embeddings", "rms_att", "rms_ffn", "rms_final", "wq", "wk", "wv", "wo", "w1", "w2",
                     "w3", "wcls"):
            assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(w, name))), name


@pytest.mark.parametrize("extra, llama2c_reads", [
    ({}, True), (dict(n_kv_heads=2, hidden_dim=200, norm_eps=1e-6), True), (dict(ffn_dim_multiplier=1.3), True),
    (dict(rope_theta=500000.0), False), (dict(shared_classifier=False), False)])
def test_checkpoint_model_args_are_llama2c_s_where_it_computes_the_same_model(tmp_path, extra, llama2c_reads):
    """A checkpoint's model_args carried babyllama's every field, and llama2.c's export.py and sample.py
    (ModelArgs(**model_args)) refused all of them; now its fields alone where its model is the same, and the
    others (which it would refuse) only where they change the model. Read back, the model is the same."""
    import dataclasses

    from babyllama.config import ModelArgs
    from babyllama.train import checkpoint

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, max_seq_len=32, **extra)
    saved = checkpoint.portable_model_args(args)
    assert (set(saved) <= set(checkpoint.LLAMA2C_MODEL_ARGS)) == llama2c_reads
    model = Transformer(args)
    checkpoint.save({"model": model.state_dict(), "model_args": saved}, tmp_path / "ckpt.pt")
    back = checkpoint.model_from(checkpoint.load(tmp_path / "ckpt.pt")).args
    assert back == dataclasses.replace(args, ffn_dim_multiplier=None)  # its effect is in hidden_dim, which is kept


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
    # llama2.c's export.py and sample.py build ModelArgs(**model_args): its fields only, for a model it computes
    assert set(ckpt["model_args"]) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                                       "multiple_of", "norm_eps", "max_seq_len", "dropout"}
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))


def test_exports_run_like_sample_on_the_checkpoint(pipeline, capsysbinary, monkeypatch):
    from babyllama.cli import main
    from babyllama.export import export
    from babyllama.loading import load_source

    ok(run_cli("export", "exp/m1.bin", "--checkpoint", "out/ckpt.pt", "--version", "1", cwd=pipeline))
    assert (pipeline / "exp" / "tokenizer.bin").is_file()  # copied beside the export so `run` finds it
    src = load_source(checkpoint=str(pipeline / "out"))
    for v in (0, 2):  # in-process: a torch start-up per command is slow on a loaded machine
        export(src, pipeline / "exp" / f"m{v}.bin", "bin", version=v)
    assert [formats.read_header(pipeline / "exp" / f"m{v}.bin")[1] for v in (0, 1, 2)] == [0, 1, 2]

    greedy = ["-t", "0", "-n", "60", "-i", PROMPT]
    expected = ok(run_cli("sample", "--checkpoint", "out/ckpt.pt", *greedy, cwd=pipeline, env=ONE_THREAD)).stdout
    assert expected.startswith(PROMPT.encode()) and len(expected) > 100
    for v in (0, 1):
        assert ok(run_cli("run", f"exp/m{v}.bin", *greedy, cwd=pipeline)).stdout == expected
    q8 = ok(run_cli("run", "exp/m2.bin", *greedy, cwd=pipeline)).stdout
    assert q8.startswith(PROMPT.encode()) and len(q8) > 100

    # with a seed, sampling draws the same tokens too (the same sampler on the same logits)
    monkeypatch.chdir(pipeline)
    sampled = ["-t", "1.0", "-p", "0.9", "-s", "7", "-n", "60"]
    assert main(["sample", "--checkpoint", "out", "--device", "cpu", *sampled]) == 0
    expected = capsysbinary.readouterr().out
    assert len(expected) > 100
    assert ok(run_cli("run", "exp/m1.bin", *sampled, cwd=pipeline)).stdout == expected


def test_trained_model_logits_match_its_export(pipeline, tmp_path):
    from babyllama.export import export
    from babyllama.loading import load_source
    from babyllama.train.checkpoint import load_model

    model = load_model(pipeline / "out" / "ckpt.pt")
    tokens = np.fromfile(pipeline / "data" / "tok512" / "valid.bin", dtype=np.uint16)[:64].astype(np.int64)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens)[None])
    (path, *_) = export(load_source(checkpoint=str(pipeline / "out")), tmp_path / "m.bin", "bin", version=1)
    engine = Engine(formats.load(path))
    expected = engine.forward(tokens, np.arange(64), engine.new_cache())
    assert np.abs(logits[0].numpy() - expected).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ resume


def small_run(pipeline, out_dir, **kw) -> dict:
    """Settings (as command-line strings) for a short in-process run on the pipeline's data."""
    base = dict(data_dir=str(pipeline / "data" / "tok512"), out_dir=str(out_dir), dim="64", n_layers="2",
                n_heads="4", n_kv_heads="2", max_seq_len="64", batch_size="8", gradient_accumulation_steps="2",
                learning_rate="3e-3", warmup_iters="5", eval_interval="10", eval_iters="2", log_interval="1")
    return {**base, **{k: str(v) for k, v in kw.items()}}


def step_losses(out_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["loss"]) for r in records if "loss" in r]


def test_resume_continues_exactly(pipeline, tmp_path, one_thread, capsys):
    from babyllama.train.checkpoint import load_model
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    # dropout on: the resumed run must also restore the RNG that drives it
    same = dict(dropout=0.1, lr_decay_iters=20)
    straight = train(resolve_config(None, small_run(pipeline, tmp_path / "a", max_iters=20, **same)))
    train(resolve_config(None, small_run(pipeline, tmp_path / "b", max_iters=10, **same)))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 10
    resumed = train(resolve_config(None, {"out_dir": str(tmp_path / "b"), "init_from": "resume", "max_iters": "20"}))
    assert resumed["iter"] == straight["iter"] == 20
    assert resumed["loss"] == straight["loss"]
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")  # every step, not only the last
    a, b = load_model(tmp_path / "a" / "ckpt.pt"), load_model(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(p, b.state_dict()[k]) for k, p in a.state_dict().items())


def test_resume_refuses_a_different_model_shape(pipeline, tmp_path, one_thread):
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    run = small_run(pipeline, tmp_path, max_iters=2, n_kv_heads=0)
    train(resolve_config(None, run))
    with pytest.raises(BabyLlamaError, match=r"different model shape \(dim changed\)"):  # dim alone, not multiple_of
        train(resolve_config(None, {"out_dir": str(tmp_path), "init_from": "resume", "dim": "32"}))
    with pytest.raises(BabyLlamaError, match=r"different model shape \(dim, multiple_of changed\)"):
        train(resolve_config(None, {"out_dir": str(tmp_path), "init_from": "resume", "dim": "32", "multiple_of": "7"}))
    # the same shape said otherwise is no change: n_kv_heads = n_heads (saved as 0), a multiple_of that rounds the
    # hidden width to the same value
    cfg = resolve_config(None, run)
    assert cfg.n_kv_heads == 0
    from babyllama.config import llama_hidden_dim

    hidden = llama_hidden_dim(cfg.dim, cfg.multiple_of)
    assert hidden != cfg.multiple_of and llama_hidden_dim(cfg.dim, hidden) == hidden
    same = {"n_kv_heads": str(cfg.n_heads), "multiple_of": str(hidden), "max_iters": "3"}
    assert train(resolve_config(None, {"out_dir": str(tmp_path), "init_from": "resume", **same}))["iter"] == 3


# ------------------------------------------------------------------------------------------------ distributed


@pytest.fixture(scope="module")
def single_process_reference(pipeline, tmp_path_factory):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    out = tmp_path_factory.mktemp("single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(resolve_config(None, small_run(pipeline, out, max_iters=10, log_interval=5, eval_interval=100)))
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(pipeline, single_process_reference, tmp_path, mode):
    import subprocess
    import sys

    from babyllama.train.checkpoint import load_model

    # settings from a config file, with --key=value flags on top (as a user would launch it)
    settings = small_run(pipeline, tmp_path / "out", max_iters=10, log_interval=5, eval_interval=100)
    config = tmp_path / "run.toml"
    config.write_text("".join(f"{k} = {v if k not in ('data_dir', 'out_dir') else json.dumps(v)}\n"
                              for k, v in settings.items() if k not in ("max_iters", "learning_rate")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "babyllama",
           "train", str(config), "--max_iters=10", "--learning_rate=3e-3", f"--fsdp={mode == 'fsdp'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, **ONE_THREAD,
                               "PYTHONPATH": str(__import__("conftest").ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    label = "FSDP" if mode == "fsdp" else "DDP"
    assert f"rank 0 of 2: gloo on cpu ({label})" in proc.stdout and f"rank 1 of 2: gloo on cpu ({label})" in proc.stdout
    assert proc.stdout.count("model: ") == 1  # only rank 0 logs
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "loss.png", "metrics.jsonl", "tokenizer.bin"]
    # each step logged once (rank 0 alone writes), with the single-process run's loss
    got, want = step_losses(out), step_losses(single_process_reference)
    assert [i for i, _ in got] == [i for i, _ in want] == [5, 10]
    assert np.allclose([v for _, v in got], [v for _, v in want], rtol=0, atol=1e-4)
    a, b = load_model(out / "ckpt.pt"), load_model(single_process_reference / "ckpt.pt")
    assert all(torch.allclose(p, b.state_dict()[k], atol=1e-5) for k, p in a.state_dict().items())


def test_device_cuda_without_an_index_picks_the_current_gpu(monkeypatch):
    """`--device=cuda` (no index) on one GPU: torch.cuda.set_device needs an index, so the loop gives it the
    current GPU's."""
    from babyllama.train import loop

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    dist_info, device = loop.setup_distributed("cuda")
    assert device == torch.device("cuda", 0) and chosen == [device] and not dist_info.enabled


# ------------------------------------------------------------------------------------------------ run folders


def other_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """byte_tokenizer's size with other merges: the same vocabulary size, other ids for the same text."""
    tok = byte_tokenizer(vocab_size)
    pieces = list(tok.pieces)
    pieces[259:271] = reversed(pieces[259:271])
    return Tokenizer(pieces, tok.scores.tolist())


def text_shards(root, tokenizer: Tokenizer, name: str):
    """A few stories pretokenized with `tokenizer` into root/name (tokenizer.bin beside the shards)."""
    from babyllama.train.data import pretokenize

    corpus = root / f"{name}_corpus"
    corpus.mkdir(parents=True)
    make_story_corpus(corpus / "train.txt", 40, seed=0)
    make_story_corpus(corpus / "valid.txt", 8, seed=1)
    tokenizer.save(root / f"{name}.bin")
    pretokenize(corpus, root / f"{name}.bin", root / name, workers=1)
    return root / name


def tiny_run(data_dir, out_dir, **kw) -> dict:
    """Settings for a two-step run of a tiny model on the CPU."""
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), dim="32", n_layers="1", n_heads="2",
                max_seq_len="32", batch_size="4", gradient_accumulation_steps="1", max_iters="2",
                eval_interval="2", eval_iters="1", warmup_iters="0", device="cpu")
    return {**base, **{k: str(v) for k, v in kw.items()}}


def test_a_new_run_installs_its_datas_tokenizer_and_a_resume_checks_it(tmp_path, one_thread):
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    first, second = text_shards(tmp_path, byte_tokenizer(300), "a"), text_shards(tmp_path, other_tokenizer(), "b")
    out = tmp_path / "out"
    train(resolve_config(None, tiny_run(first, out)))
    train(resolve_config(None, tiny_run(second, out)))  # a new run in the same folder
    assert (out / "tokenizer.bin").read_bytes() == (second / "tokenizer.bin").read_bytes()
    with pytest.raises(BabyLlamaError, match=r"cannot resume: .*a/tokenizer.bin is not the tokenizer this run"):
        train(resolve_config(None, {"out_dir": str(out), "init_from": "resume", "max_iters": "4",
                                    "data_dir": str(first)}))
    assert train(resolve_config(None, {"out_dir": str(out), "init_from": "resume", "max_iters": "4"}))["iter"] == 4


def test_a_failed_checkpoint_write_leaves_the_earlier_runs_tokenizer(tmp_path, one_thread, monkeypatch):
    """A new run whose first checkpoint cannot be written (a full disk) leaves the folder as the earlier run left
    it: its checkpoint beside its own tokenizer (the new one was installed first, so `run` decoded the earlier
    weights with the new run's tokenizer and a resume was refused)."""
    import errno

    from babyllama.errors import BabyLlamaError
    from babyllama.train import checkpoint
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    first, second = text_shards(tmp_path, byte_tokenizer(300), "a"), text_shards(tmp_path, other_tokenizer(), "b")
    out = tmp_path / "out"
    train(resolve_config(None, tiny_run(first, out)))
    before = {name: (out / name).read_bytes() for name in ("tokenizer.bin", "ckpt.pt")}

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(BabyLlamaError, match="cannot write output .*ckpt.pt: No space left"):
        train(resolve_config(None, tiny_run(second, out)))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def test_a_tokenizer_put_in_out_dir_is_kept_when_the_data_has_none(tmp_path, one_thread, capsys):
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    (data / "tokenizer.bin").unlink()
    out.mkdir()
    (tmp_path / "a.bin").rename(out / "tokenizer.bin")  # the data's tokenizer, put there by hand
    mine = (out / "tokenizer.bin").read_bytes()
    train(resolve_config(None, tiny_run(data, out)))
    assert (out / "tokenizer.bin").read_bytes() == mine
    assert f"note: {data} has no tokenizer.bin: kept {out / 'tokenizer.bin'}" in capsys.readouterr().err
    byte_tokenizer(400).save(out / "tokenizer.bin")  # one that cannot be this model's
    with pytest.raises(BabyLlamaError, match=r"tokenizer.bin has 400 tokens but the model.s vocab_size is 300 and"):
        train(resolve_config(None, tiny_run(data, tmp_path / "out")))
    assert (out / "tokenizer.bin").is_file()


def test_a_checkpoint_without_its_tokenizer_asks_for_one(tmp_path, one_thread, monkeypatch):
    """Not the built-in tokenizer of the same size: the run's data had its own (here other_tokenizer)."""
    from babyllama.api import load
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, out = text_shards(tmp_path, other_tokenizer(512), "a"), tmp_path / "out"
    train(resolve_config(None, tiny_run(data, out)))
    (out / "tokenizer.bin").unlink()
    with pytest.raises(BabyLlamaError, match=r"no tokenizer.bin beside .*ckpt.pt \(training puts its data's there\)"):
        load(out)
    assert load(out, data / "tokenizer.bin").tokenizer.same_as(other_tokenizer(512))
    # where llama2.c's tinystories.py put a vocabulary of this size (its sample.py reads it): named, not read
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "tok512.bin").write_bytes((data / "tokenizer.bin").read_bytes())
    with pytest.raises(BabyLlamaError, match=r"\(-z/--tokenizer\) \(llama2.c's sample.py would read data/tok512.bin "
                                             r"here: -z data/tok512.bin\)$"):
        load(out)
    # and run.c's default, tokenizer.bin in the current folder: named too, not read
    (tmp_path / "tokenizer.bin").write_bytes((data / "tokenizer.bin").read_bytes())
    with pytest.raises(BabyLlamaError, match=r"here: -z data/tok512.bin\) \(run.c's default, tokenizer.bin in the "
                                             r"current folder, is read only when given: -z tokenizer.bin\)$"):
        load(out)


def test_a_vocab_size_other_than_the_datas_is_refused(tmp_path):
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data = text_shards(tmp_path, byte_tokenizer(300), "a")
    with pytest.raises(BabyLlamaError, match=r"vocab_size 1000 differs from the data's \(300, "):
        train(resolve_config(None, tiny_run(data, tmp_path / "out", vocab_size=1000)))
    assert not (tmp_path / "out").exists()


def evaluations(out_dir, name: str = "metrics.jsonl") -> list[int]:
    """The iterations a run's log (an absent one: none) holds evaluations of."""
    log = out_dir / name
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r["iter"] for r in records if "val_loss" in r]


def test_a_folder_where_the_checkpoint_goes_is_refused_before_training(tmp_path, one_thread, capsys):
    """ckpt.pt (or a LoRA run's adapter files) being a folder failed the first checkpoint's write, after
    eval_interval steps of training that were then lost; it is refused before the first step."""
    from babyllama.cli import main

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    (out / "ckpt.pt").mkdir(parents=True)
    argv = ["train", *(f"--{k}={v}" for k, v in tiny_run(data, out, max_iters=6, eval_interval=4).items())]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"babyllama: error: checkpoint {out / 'ckpt.pt'} is a directory, not a regular file"
    # no step was evaluated, in the log of record or in the one a run beside an earlier checkpoint starts with
    assert all(evaluations(out, name) == [] for name in ("metrics.jsonl", "metrics.pending.jsonl"))


def test_a_second_run_into_a_run_folder_in_use_is_refused(tmp_path, one_thread, capsys):
    """The same command started again while the first runs (another terminal) emptied the first's metrics.jsonl
    at once and replaced its checkpoints with its own: refused while another process holds the folder."""
    from conftest import folder_held_elsewhere

    from babyllama.cli import main

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    argv = ["train", *(f"--{k}={v}" for k, v in tiny_run(data, out).items())]
    assert main(argv) == 0
    log = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    with folder_held_elsewhere(out):  # as the first run's process holds it
        assert main(argv) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"babyllama: error: another training run is writing {out}: wait for it to end, or choose another out_dir")
        assert (out / "metrics.jsonl").read_bytes() == log
        assert main([*argv, "--eval_only=true", "--init_from=resume"]) == 0  # an evaluation writes nothing
    assert main(argv) == 0


def test_a_run_whose_loss_turns_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    """A learning rate that blows the weights up trained on with a NaN loss and wrote its NaN weights over the last
    good checkpoint at the next evaluation: it stops at the first NaN it logs, the checkpoint left as it was."""
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    train(resolve_config(None, tiny_run(data, out)))
    good = (out / "ckpt.pt").read_bytes()
    resume = {"out_dir": str(out), "init_from": "resume", "max_iters": "12", "eval_interval": "6",
              "log_interval": "1", "learning_rate": "1e8"}
    with pytest.raises(BabyLlamaError, match=r"^training diverged: the training loss is (nan|inf|-inf) at step \d+; "
                                             r".*ckpt.pt holds step 2: --init_from=resume goes on from there\. "
                                             r"Lower learning_rate \(or lora_alpha\)$"):
        train(resolve_config(None, resume))
    assert (out / "ckpt.pt").read_bytes() == good


def test_a_resumed_run_keeps_the_evaluation_at_its_checkpoint(tmp_path, one_thread):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data = text_shards(tmp_path, byte_tokenizer(300), "a")
    train(resolve_config(None, tiny_run(data, tmp_path / "out")))
    train(resolve_config(None, {"out_dir": str(tmp_path / "out"), "init_from": "resume", "max_iters": "4"}))
    assert evaluations(tmp_path / "out") == [0, 2, 4]


def test_resuming_from_another_folder_says_how_to_find_the_data(tmp_path, one_thread, monkeypatch):
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    text_shards(tmp_path, byte_tokenizer(300), "a")
    monkeypatch.chdir(tmp_path)
    train(resolve_config(None, tiny_run("a", tmp_path / "out")))  # data_dir "a", relative
    monkeypatch.chdir(tmp_path / "out")
    resume = {"out_dir": str(tmp_path / "out"), "init_from": "resume", "max_iters": "4"}
    with pytest.raises(BabyLlamaError, match=r"^data_dir not found: a \(a resume reads the data_dir the run started "
                                             r"with, relative to the folder it started in, unless --data_dir names"):
        train(resolve_config(None, resume))
    assert train(resolve_config(None, {**resume, "data_dir": str(tmp_path / "a")}))["iter"] == 4
    # data of another vocabulary: the resumed model keeps its own (vocab_size 0 would not help)
    other = text_shards(tmp_path, byte_tokenizer(400), "b")
    with pytest.raises(BabyLlamaError, match=r"a resumed model keeps its vocabulary: resume on data pretokenized "):
        train(resolve_config(None, {**resume, "max_iters": "6", "data_dir": str(other)}))


def test_resuming_a_finished_run_adds_no_evaluation(tmp_path, one_thread, capsys):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    train(resolve_config(None, tiny_run(data, out)))
    log, ckpt = (out / "metrics.jsonl").read_bytes(), (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert train(resolve_config(None, {"out_dir": str(out), "init_from": "resume"}))["iter"] == 2
    assert "nothing to train: the run is at step 2 and max_iters is 2" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_bytes() == log and (out / "ckpt.pt").read_bytes() == ckpt
    # records past the checkpoint (a run that went on without saving: always_save_checkpoint=false) stay too
    later = log + b'{"iter": 3, "loss": 1.0}\n'
    (out / "metrics.jsonl").write_bytes(later)
    assert train(resolve_config(None, {"out_dir": str(out), "init_from": "resume"}))["iter"] == 2
    assert (out / "metrics.jsonl").read_bytes() == later


def test_a_torchrun_process_gone_says_which_checkpoint_a_resume_goes_on_from(tmp_path, one_thread, capsys,
                                                                            monkeypatch):
    """Another process of a torchrun run killed: the survivors' collectives fail with gloo's "Connection reset by
    peer", which printed a traceback and no word of the checkpoint kept. (Here one process, its failure staged.)
    A RuntimeError that is no lost peer keeps its traceback."""
    from babyllama.cli import main
    from babyllama.train.loop import Trainer

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    step = Trainer.step
    failure = "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:55500: Connection reset by peer."

    def peer_gone_at_3(self):
        if self.iter_num == 3:
            self.dist.world = 2  # as under torchrun
            raise RuntimeError(failure)
        return step(self)

    monkeypatch.setattr(Trainer, "step", peer_gone_at_3)
    argv = ["train", *(f"--{k}={v}" for k, v in tiny_run(data, out, max_iters=6).items())]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"babyllama: error: another process of this torchrun run stopped at step 3 (Connection reset by peer); "
        f"{out / 'ckpt.pt'} holds step 2: --init_from=resume goes on from there")
    failure = "shape mismatch"
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(argv)


def test_a_torchrun_process_whose_data_failed_leaves_the_others_one_line(monkeypatch):
    """finetune --data under torchrun: the first process prepares the data while the others wait at a barrier;
    where it stops on bad data (its own one line), the others' barrier failed with gloo's traceback. (The barrier's
    failure staged here.)"""
    from babyllama.errors import BabyLlamaError
    from babyllama.train import loop

    def lost(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:29600")

    monkeypatch.setattr(loop.dist, "barrier", lost)
    with pytest.raises(BabyLlamaError, match="^another process of this torchrun run stopped while the first one "
                                             "prepared the data"):
        loop.wait_for_peers("while the first one prepared the data (its error is above)")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(loop.dist, "barrier", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        loop.wait_for_peers("now")


def raise_at_step_3(monkeypatch, error: BaseException):
    """Trainer.step raising `error` at step 3 (steps 0-2 train, step 2's checkpoint written); returns the real
    step, to put back."""
    from babyllama.train.loop import Trainer

    step = Trainer.step

    def failing(self):
        if self.iter_num == 3:
            raise error
        return step(self)

    monkeypatch.setattr(Trainer, "step", failing)
    return step


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_says_which_checkpoint_a_resume_goes_on_from(tmp_path, one_thread, capsys, monkeypatch, signal_name):
    """Ctrl-C, and SIGTERM (kill, timeout, a batch scheduler: it said nothing and exited 143), end with the step
    a resume goes on from."""
    from babyllama.cli import main
    from babyllama.errors import Terminated
    from babyllama.train.loop import Trainer

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    step = raise_at_step_3(monkeypatch, KeyboardInterrupt() if signal_name == "SIGINT" else Terminated(143))
    argv = ["train", *(f"--{k}={v}" for k, v in tiny_run(data, out, max_iters=6).items())]
    if signal_name == "SIGINT":
        assert main(argv) == 130
    else:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted at step 3; {out / 'ckpt.pt'} holds step 2: --init_from=resume goes on from there"
    monkeypatch.setattr(Trainer, "step", step)
    assert main(["train", f"--out_dir={out}", "--init_from=resume"]) == 0
    assert evaluations(out) == [0, 2, 4, 6]


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 6710886400 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, one_thread, capsys, monkeypatch, error):
    from babyllama.cli import main

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    raise_at_step_3(monkeypatch, error)
    assert main(["train", *(f"--{k}={v}" for k, v in tiny_run(data, out, max_iters=6).items())]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("babyllama: error: out of memory at step 3 (") and "Traceback" not in "".join(err)
    assert err[-1].endswith(f"lower batch_size or max_seq_len (gradient_accumulation_steps keeps the tokens a "
                            f"step), or train a smaller model; {out / 'ckpt.pt'} holds step 2: --init_from=resume "
                            "goes on from there")


def test_a_run_whose_log_reader_goes_away_stops_and_says_so(tmp_path):
    """`train ... | head -1`: the run cannot print its next line; it stops with a non-zero status and says
    which checkpoint a resume goes on from, as Ctrl-C does (it stopped with status 0 and nothing said)."""
    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    flags = " ".join(f"--{k}={v}" for k, v in tiny_run(data, out, max_iters=200, eval_interval=100,
                                                         log_interval=1).items())
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m babyllama train {flags} 2>err.txt | head -1; "
                                         "echo ${PIPESTATUS[0]}"], cwd=tmp_path, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    status = proc.stdout.decode().splitlines()[-1]
    err = (tmp_path / "err.txt").read_text()
    assert status == "1", err
    assert err.strip().splitlines()[-1].startswith("babyllama: error: the output was closed (a broken pipe): "
                                                   "stopped at step "), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_an_fsdp_run_resumed_in_one_process_says_how(tmp_path, one_thread, capsys):
    """A checkpoint of an FSDP run holds whole tensors: resumed in one process with --fsdp=false it goes on; the
    checkpoint's fsdp=true alone is refused, saying that it came from the run and what to pass."""
    from babyllama.cli import main

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    assert main(["train", *(f"--{k}={v}" for k, v in tiny_run(data, out).items())]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["fsdp"] = True  # as torchrun --nproc_per_node=2 ... --fsdp=true leaves it
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    assert main(["train", f"--out_dir={out}", "--init_from=resume", "--max_iters=4"]) == 1
    assert capsys.readouterr().err.strip() == (
        "babyllama: error: fsdp=true needs several processes: launch with torchrun --nproc_per_node=N (the setting "
        "of the run resumed: --fsdp=false resumes it in one process, its checkpoint holds whole tensors)")
    assert main(["train", f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--fsdp=false"]) == 0
    assert evaluations(out) == [0, 2, 4]


def test_a_new_run_stopped_before_its_first_checkpoint_leaves_the_earlier_runs_pair(tmp_path, one_thread,
                                                                                      monkeypatch, capsys):
    """ckpt.pt and tokenizer.bin in out_dir go together: sample and export read them as one model; so do
    metrics.jsonl and loss.png, which a resume of that checkpoint goes on with. The new run's log so far is
    metrics.pending.jsonl, which the interruption names."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import Trainer, train

    first, second = text_shards(tmp_path, byte_tokenizer(300), "a"), text_shards(tmp_path, other_tokenizer(), "b")
    out = tmp_path / "out"
    train(resolve_config(None, tiny_run(first, out, max_iters=4)))
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "tokenizer.bin", "metrics.jsonl", "loss.png")}
    step = Trainer.step

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", interrupted)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(resolve_config(None, tiny_run(second, out)))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert capsys.readouterr().err.strip().endswith(
        f"so is metrics.jsonl: this run's log is {out / 'metrics.pending.jsonl'}")
    assert evaluations(out) == [0, 2, 4] and (out / "metrics.pending.jsonl").exists()
    monkeypatch.setattr(Trainer, "step", step)
    train(resolve_config(None, {"out_dir": str(out), "init_from": "resume", "max_iters": "6"}))
    assert evaluations(out) == [0, 2, 4, 6] and not (out / "metrics.pending.jsonl").exists()


def test_a_new_run_over_a_checkpoint_says_it_replaces_it(tmp_path, one_thread, capsys):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    train(resolve_config(None, tiny_run(data, out)))
    assert "note: " not in capsys.readouterr().err
    train(resolve_config(None, tiny_run(data, out)))
    assert (f"note: {out / 'ckpt.pt'} holds an earlier run, which this new run replaces at its first checkpoint "
            "(step 2); --init_from=resume continues it instead") in capsys.readouterr().err
    # from that checkpoint on, metrics.jsonl is the new run's log alone
    assert evaluations(out) == [0, 2] and not (out / "metrics.pending.jsonl").exists()


def test_a_run_that_writes_no_checkpoint_says_why(tmp_path, one_thread, capsys):
    from babyllama.cli import main

    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"
    argv = ["train", *(f"--{k}={v}" for k, v in tiny_run(data, out).items())]
    assert main([*argv, "--max_iters=0"]) == 0
    said = capsys.readouterr().out
    assert "no checkpoint written: a run saves at its evaluations after step 0, and max_iters is 0" in said
    assert not (out / "ckpt.pt").exists()
    assert main(argv) == 0 and (out / "ckpt.pt").exists()
    assert "no checkpoint written" not in capsys.readouterr().out
    # a loss that never beats step 0's, with always_save_checkpoint off: llama2.c's rule, said
    assert main([*argv, "--learning_rate=0", "--always_save_checkpoint=false", "--max_iters=1",
                 "--eval_interval=1"]) == 0
    assert (f"none improved on step 0's validation loss (always_save_checkpoint=false); {out / 'ckpt.pt'} is still "
            "an earlier run's") in capsys.readouterr().out


@pytest.mark.parametrize("resume", [False, True])
def test_an_evaluation_only_run_leaves_the_runs_files_as_they_are(tmp_path, one_thread, capsys, resume):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data, other = text_shards(tmp_path, byte_tokenizer(300), "a"), text_shards(tmp_path, other_tokenizer(), "b")
    out = tmp_path / "out"
    train(resolve_config(None, tiny_run(data, out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    settings = {"out_dir": str(out), "init_from": "resume"} if resume else tiny_run(other, out)
    capsys.readouterr()
    train(resolve_config(None, {**settings, "eval_only": "true"}))
    printed = capsys.readouterr()
    assert "model: " in printed.out and "val loss" in printed.out  # it did evaluate
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # without resume it evaluates fresh weights, not the checkpoint beside them: said, as that loss is no run's
    untrained = (f"note: --eval_only without --init_from=resume evaluates freshly initialized weights, not "
                 f"{out / 'ckpt.pt'} (add --init_from=resume for that)")
    assert (untrained in printed.err) != resume
    if not resume:  # into a new out_dir: no folder left behind either
        train(resolve_config(None, {**tiny_run(data, tmp_path / "new"), "eval_only": "true"}))
        assert not (tmp_path / "new").exists()


def test_device_mps_without_mps_is_one_line(monkeypatch, capsys, tmp_path):
    from babyllama.cli import main

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(["train", "--device=mps", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: device mps requested but MPS is not available here (use --device=cpu)"]


def test_a_toml_config_reads_with_tomli_where_python_has_no_tomllib(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: a TOML config (the training docs' stories15M.toml) is read there with tomli,
    tomllib's original, which the train extra installs on 3.10 (here tomllib stands in for it)."""
    import sys

    from babyllama.train.config import read_config_file

    tomllib = pytest.importorskip("tomllib", reason="stands in for tomli (Python 3.11+)")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib fails, as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    config = tmp_path / "run.toml"
    config.write_text('dim = 64\nout_dir = "out"\n')
    assert read_config_file(config) == {"dim": 64, "out_dir": "out"}


@pytest.mark.parametrize("text,message", [('dim = "x"', "dim must be int, got 'x'"),
                                          ('decay_lr = "maybe"', "decay_lr must be true or false, got 'maybe'")])
def test_a_config_files_text_value_of_the_wrong_type_names_the_file(tmp_path, text, message):
    """A string where a config file's number or bool goes is parsed as the command line's values are; a bad one
    named the key alone, where every other config file error names the file."""
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import build_config

    config = tmp_path / "run.toml"
    config.write_text(text + "\n")
    with pytest.raises(BabyLlamaError) as e:
        build_config(str(config))
    assert str(e.value) == f"{config}: {message}"


def test_mfu_is_shown_only_against_a_known_peak_as_the_training_docs_say():
    from conftest import ROOT

    from babyllama.train.metrics import peak_flops

    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bfloat16") is None and peak_flops(cpu, "float32", 2e12) == 2e12
    text = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    assert "where a peak to measure against is known, MFU" in text
    assert "on CPU, or on a GPU not in the table, no MFU without `--peak_flops`" in text


def test_the_training_docs_torchrun_commands_fit_their_config(tmp_path):
    """Each process accumulates gradient_accumulation_steps / N micro-batches: a torchrun line of
    docs/training.md that runs stories15M.toml (its TOML block) on N processes needs N to divide its steps."""
    import re

    from conftest import ROOT

    from babyllama.train.config import read_config_file

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n## stories15M.toml\n(.*?)```", text, flags=re.S)
    assert block
    (tmp_path / "stories15M.toml").write_text(block.group(1))
    steps = read_config_file(tmp_path / "stories15M.toml")["gradient_accumulation_steps"]
    runs = re.findall(r"torchrun .*--nproc_per_node=(\d+) -m babyllama train stories15M\.toml(.*)", text)
    assert runs
    for nproc, rest in runs:
        given = re.search(r"--gradient_accumulation_steps=(\d+)", rest)
        assert (int(given.group(1)) if given else steps) % int(nproc) == 0, (nproc, rest)


def test_a_json_config_with_a_lone_surrogate_escape_is_one_line(tmp_path):
    """JSON may spell half a UTF-16 pair ("\\ud800"), which is no character: as out_dir it was a UnicodeEncodeError
    traceback when the folder was made. Refused when the file is read, as every JSON file babyllama reads."""
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import read_config_file

    config = tmp_path / "run.json"
    config.write_text('{"out_dir": "out\\ud800", "dim": 64}')
    with pytest.raises(BabyLlamaError, match=r"run.json: invalid JSON \(a \\u escape of half a UTF-16 surrogate"):
        read_config_file(config)
    config.write_text('{"out_dir": "out\\ud83d\\ude00"}')  # a whole pair is a character
    assert read_config_file(config) == {"out_dir": "out\U0001f600"}


@pytest.fixture
def llama2c_checkpoint(tmp_path):
    """A checkpoint as llama2.c's train.py writes it: a compiled model's state dict (`_orig_mod.` names), its
    model_args and config (train.py's keys), best_val_loss a tensor; tokenizer.bin beside it."""
    model = Transformer.from_weights(random_weights(tiny_args(hidden_dim=0), seed=5, scale=0.3))
    model_args = {k: v for k, v in model.args.to_dict().items()
                  if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")}
    config = {"out_dir": "out", "always_save_checkpoint": False, "wandb_log": False, "vocab_source": "custom",
              **model_args, "dropout": 0.0, "compile": True}
    out = tmp_path / "out15M"
    out.mkdir()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "model_args": model_args,
                "iter_num": 100, "best_val_loss": torch.tensor(3.5), "config": config}, out / "ckpt.pt")
    byte_tokenizer(300).save(out / "tokenizer.bin")
    return out / "ckpt.pt"


def test_sample_takes_sample_py_start_file_and_num_samples(llama2c_checkpoint, tmp_path, capsysbinary, monkeypatch):
    """sample.py's `--start=FILE:prompt.txt --num_samples=2 --max_new_tokens=N --top_k=K`, on a llama2.c
    checkpoint: the file's text is the prompt, and each sample is followed by sample.py's line of dashes."""
    from babyllama.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("the cat")
    argv = ["sample", f"--checkpoint={llama2c_checkpoint}", "--device", "cpu", "-t", "0", "--max_new_tokens=8",
            "--top_k=300"]
    assert main([*argv, "-i", "the cat"]) == 0
    one = capsysbinary.readouterr().out
    assert one.startswith(b"the cat") and b"-----" not in one
    assert main([*argv, "--start=FILE:prompt.txt", "--num_samples=2"]) == 0
    assert capsysbinary.readouterr().out == (one + b"---------------\n") * 2

    compiled = []  # sample.py's --compile=True: the decode step goes through torch.compile (a stand-in here)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    assert main([*argv, "-i", "the cat", "--compile=False"]) == 0 and not compiled
    assert main([*argv, "-i", "the cat", "--compile=True"]) == 0 and compiled
    assert capsysbinary.readouterr().out == one * 2


@pytest.mark.parametrize("always, saved_at", [(True, 4), (False, 3)])
def test_always_save_checkpoint_false_keeps_the_best_evaluations_checkpoint(tmp_path, one_thread, monkeypatch,
                                                                             always, saved_at):
    """llama2.c's always_save_checkpoint: false writes ckpt.pt only at an evaluation whose val loss is the best
    yet (llama2.c's default); true (babyllama's) at every evaluation."""
    from babyllama.train import checkpoint
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import Trainer, train

    val_losses = iter([5.0, 3.0, 4.0, 2.0, 6.0])  # steps 0-4: the best at step 3
    monkeypatch.setattr(Trainer, "estimate_loss", lambda self: {"train": 1.0, "val": next(val_losses)})
    data, out = text_shards(tmp_path, byte_tokenizer(300), "a"), tmp_path / "out"

    train(resolve_config(None, tiny_run(data, out, max_iters=4, eval_interval=1, always_save_checkpoint=always)))
    ckpt = checkpoint.load(out)
    assert ckpt["iter_num"] == saved_at and ckpt["best_val_loss"] == 2.0


def test_resuming_a_llama2c_checkpoint_says_what_reads_it(llama2c_checkpoint, tmp_path):
    """llama2.c's ckpt.pt cannot be resumed here: the error says so and what does read it, rather than that the
    file is malformed."""
    from babyllama.errors import BabyLlamaError
    from babyllama.train.config import resolve_config

    with pytest.raises(BabyLlamaError, match=r"was written by llama2.c's train.py, whose runs babyllama cannot "
                                             r"resume .* `babyllama finetune --base=CKPT` trains on"):
        resolve_config(None, {"out_dir": str(llama2c_checkpoint.parent), "init_from": "resume"})


def test_vocab_size_finds_the_data_where_llama2c_puts_it(tmp_path, one_thread, monkeypatch):
    """llama2.c's `train.py --vocab_source=custom --vocab_size=N` trains on data/tokN (where `data pretokenize
    --vocab-size N` writes too); the folder is recorded, so a resume finds it."""
    from babyllama.train import checkpoint
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    text_shards(tmp_path / "data", byte_tokenizer(300), "tok300")
    settings = {k: v for k, v in tiny_run("", "out").items() if k != "data_dir"}
    train(resolve_config(None, {**settings, "vocab_source": "custom", "vocab_size": "300"}))
    assert checkpoint.load("out")["config"]["data_dir"] == "data/tok300"
    assert train(resolve_config(None, {"out_dir": "out", "init_from": "resume", "max_iters": "4"}))["iter"] == 4


def test_sample_says_when_max_new_tokens_goes_past_the_context(llama2c_checkpoint, tmp_path, capsys, monkeypatch):
    """sample.py generates every one of --max_new_tokens (over a sliding window); sample stops at the context, and
    says so instead of printing fewer tokens than asked for without a word."""
    from babyllama.cli import main

    monkeypatch.chdir(tmp_path)
    context = torch.load(llama2c_checkpoint, weights_only=True)["model_args"]["max_seq_len"]
    n_prompt = len(Tokenizer.load(llama2c_checkpoint.parent / "tokenizer.bin").encode("the cat", bos=True))
    room = context - n_prompt + 1  # run.c's positions: the last prompt position yields the first new token
    argv = ["sample", f"--checkpoint={llama2c_checkpoint}", "--device", "cpu", "-t", "0", "-i", "the cat"]
    assert main([*argv, f"--max_new_tokens={room + 1}"]) == 0
    err = capsys.readouterr().err
    assert f"--max_new_tokens {room + 1} after the prompt's {n_prompt} tokens" in err
    assert f"it generates at most {room}" in err
    assert main([*argv, f"--max_new_tokens={room}"]) == 0  # the context holds them all: nothing to say
    assert main([*argv, f"--max_new_tokens={room + 1}", "-n", "10"]) == 0  # -n bounds the run, as asked
    assert "warning" not in capsys.readouterr().err


def test_sample_says_when_steps_or_the_prompt_outgrow_the_context(llama2c_checkpoint, tmp_path, capsys, monkeypatch):
    """As `run` does, but without pointing at --context-shift, which `sample` does not have."""
    from babyllama.cli import main

    monkeypatch.chdir(tmp_path)
    context = torch.load(llama2c_checkpoint, weights_only=True)["model_args"]["max_seq_len"]
    argv = ["sample", f"--checkpoint={llama2c_checkpoint}", "--device", "cpu", "-t", "0"]
    assert main([*argv, "-i", "the cat", "-n", str(context + 5)]) == 0
    err = capsys.readouterr().err
    assert f"-n {context + 5} is more than the model's context ({context} positions); it runs {context}\n" in err
    assert main([*argv, "-i", "the cat " * context, "--max_new_tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert f"more than the model's context ({context}): nothing will be generated (shorten it)" in err
    assert "--context-shift" not in err


def test_a_warm_up_longer_than_the_run_says_how_high_the_rate_gets(capsys):
    """Allowed (a short run under a long default warm-up, as finetune's 20), but the rate never reaches
    learning_rate: the warning says what it reaches, which is what lr_at gives the run's last step."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import lr_at

    cfg = resolve_config(None, {"max_iters": "5", "warmup_iters": "10", "learning_rate": "5e-3"})
    err = capsys.readouterr().err
    assert "warmup_iters 10 is longer than max_iters 5: the learning rate rises to 0.002 at most" in err
    assert max(lr_at(cfg, it) for it in range(cfg.max_iters)) == pytest.approx(2e-3)
    for settings in ({"max_iters": "10", "warmup_iters": "10"}, {"max_iters": "5", "warmup_iters": "10",
                                                                  "decay_lr": "false"}):
        resolve_config(None, settings)
        assert "warmup_iters" not in capsys.readouterr().err


def test_a_config_file_s_kind_is_its_suffix_in_any_case(tmp_path):
    from babyllama.train.config import read_config_file

    (tmp_path / "C.JSON").write_text('{"max_iters": 3}')
    (tmp_path / "C.PY").write_text("max_iters = 4\n")
    assert read_config_file(tmp_path / "C.JSON") == {"max_iters": 3}
    assert read_config_file(tmp_path / "C.PY") == {"max_iters": 4}


def test_sample_start_file_without_a_path_is_one_line(capsys):
    err = cli_error(capsys, "sample", "--start=FILE:")
    assert "--start=FILE: names no file" in err
