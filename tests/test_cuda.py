"""The CUDA paths on a GPU (every test skips where PyTorch sees none): the engine `--device cuda` builds (bf16,
eager and captured in CUDA graphs) against the NumPy engine, stories260K's greedy text against the NumPy
engine's up to a near-tie, and training, sampling and LoRA fine-tuning on the GPU through the CLI and the
Trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    assert_greedy_agree,
    batched_decode_side_by_side,
    make_story_corpus,
    random_weights,
    run_cli,
    shared_file,
    tiny_args,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (PyTorch sees none)")

from babyllama import formats  # noqa: E402
from babyllama.api import make_engine  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.tokenizer import BOS, Tokenizer  # noqa: E402
from babyllama.train.metrics import GPU_PEAK_BF16  # noqa: E402


def greedy(engine, prompt: list[int], steps: int) -> list[int]:
    """The prompt and the greedy tokens that follow it, as run.c's `-n steps` counts them: one from each
    position below `steps` (the prompt's last included), so steps + 1 tokens in all."""
    cache, tokens = engine.new_cache(), list(prompt)
    logits = engine.forward(tokens, np.arange(len(tokens)), cache, logits="last")[0]
    while True:
        tokens.append(int(logits.argmax()))
        if len(tokens) > steps:
            return tokens
        logits = engine.forward(tokens[-1:], [len(tokens) - 1], cache)[0]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "cuda-graphs"])
def test_the_cuda_engine_stays_near_the_numpy_engine_in_batched_steps(compile):
    """Three sequences at different positions decoded together, step after step (the shapes a CUDA graph
    replays), within bf16's error of the NumPy engine's fp32 logits."""
    args = tiny_args(n_kv_heads=2)
    w = random_weights(args, seed=6, scale=0.2)
    engine, te = Engine(w), make_engine(w, "cuda", compile=compile)
    assert te.model.output.weight.dtype == torch.bfloat16 and te.device.type == "cuda"
    for want, got in batched_decode_side_by_side(engine, te, args.vocab_size, steps=6):
        err = np.abs(got - want)
        assert err.max() <= 0.05 * np.abs(want).max() and err.mean() <= 0.01 * np.abs(want).max()


def test_stories260k_greedy_on_cuda_follows_the_numpy_engine_up_to_a_near_tie(stories260k, tok512):
    """The real model, greedy for 200 positions on the GPU (bf16) and in the NumPy engine (which prints run.c's
    golden text, test_golden.py): the same tokens up to a position whose top-2 margin is within twice the
    largest logit difference measured between the two, and `run --device cuda` prints the GPU's text."""
    w = formats.load(stories260k)
    cpu, gpu = Engine(w), make_engine(w, "cuda")
    want = greedy(cpu, [BOS], 200)
    got = greedy(gpu, [BOS], 200)
    expected = cpu.forward(want, np.arange(len(want)), cpu.new_cache())
    err = float(np.abs(gpu.forward(want, np.arange(len(want)), gpu.new_cache()) - expected).max())
    assert err <= 0.05 * np.abs(expected).max()
    same = assert_greedy_agree(want, got, lambda i: expected[i - 1], max_margin=2 * err, min_same=2)
    print(f"stories260K on cuda: {same} of {len(want)} tokens as the NumPy engine; largest logit difference {err:.4f}")

    tok = Tokenizer.load(tok512)
    end = got.index(BOS, 1) if BOS in got[1:] else len(got)  # run stops where the model emits BOS
    text = b"".join(tok.decode_piece(a, b) for a, b in zip(got[:end - 1], got[1:end])) + b"\n"
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--device", "cuda", "-t", "0", "-n", "200",
                   "--raw-bytes")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == text


@pytest.fixture(scope="module")
def cuda_training(tmp_path_factory):
    """A corpus made here, pretokenized with tok512, and 60 compiled bf16 training steps on the GPU."""
    tok512 = shared_file("fixtures/tok512.bin")
    root = tmp_path_factory.mktemp("cuda-train")
    (root / "corpus").mkdir()
    make_story_corpus(root / "corpus" / "train.txt", 1500, seed=0)
    make_story_corpus(root / "corpus" / "valid.txt", 100, seed=1)
    proc = run_cli("data", "pretokenize", "--input", "corpus", "--tokenizer", str(tok512), "--out-dir", "data",
                   "--workers", "2", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    proc = run_cli("train", "--data_dir=data", "--out_dir=out", "--device=cuda", "--compile=True",
                   "--dtype=bfloat16", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
                   "--max_seq_len=64", "--batch_size=32", "--learning_rate=3e-3", "--warmup_iters=10",
                   "--max_iters=60", "--eval_interval=30", "--eval_iters=5", "--log_interval=10", cwd=root,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return root, proc


def test_training_on_cuda_lowers_the_loss_and_reports_mfu(cuda_training):
    root, _ = cuda_training
    records = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < 0.6 * evals[0]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["tokens_per_s"] > 0 for r in steps)
    if any(name in torch.cuda.get_device_name() for name in GPU_PEAK_BF16):  # a GPU of known peak: MFU
        assert all(0 < r["mfu"] < 1 for r in steps)
    ckpt = torch.load(root / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 60 and all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_sample_on_cuda_continues_the_prompt(cuda_training):
    root, _ = cuda_training
    proc = run_cli("sample", "--checkpoint", "out", "--device", "cuda", "-t", "0", "-n", "40",
                   "-i", "Once upon a time", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().startswith("Once upon a time") and len(proc.stdout) > len("Once upon a time") + 20


def test_lora_fine_tuning_on_cuda_lowers_the_held_out_loss(tmp_path):
    from test_finetune import make_task, records, settings

    from babyllama.train.config import FINETUNE_DEFAULTS, resolve_config
    from babyllama.train.loop import Trainer

    root = make_task(tmp_path / "task")
    trainer = Trainer(resolve_config(None, settings(root, root / "lora", device="cuda"), defaults=FINETUNE_DEFAULTS))
    trainer.run()
    evals = [r["val_loss"] for r in records(root / "lora") if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < 0.2 * evals[0]
    assert next(p for p in trainer.raw.parameters() if p.requires_grad).device.type == "cuda"


def test_bench_counts_the_bf16_bytes_the_cuda_engine_reads(tmp_path):
    from babyllama.bench import decode_bytes, measure

    w = random_weights(tiny_args(), seed=1)
    formats.save(w, tmp_path / "m.bin", 1)
    res = measure(tmp_path / "m.bin", False, repeats=1, tokens=8, batch=2, prompt_len=8, device="cuda")
    assert res["decode"] > 0 and res["decode_bytes"] == decode_bytes(w) // 2
