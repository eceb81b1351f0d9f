"""Training against llama2.c's own arithmetic (llama2c_reference.py: its model.py and train.py's loop): the same
seed gives the same initial weights, and the same batches give the same losses and weights step after step."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import llama2c_reference as ref  # noqa: E402
from conftest import byte_tokenizer, make_story_corpus  # noqa: E402

from babyllama.train.config import resolve_config  # noqa: E402
from babyllama.train.loop import Trainer, lr_at  # noqa: E402

# RoPE's angles are computed in float64 here and in float32 in llama2.c: the tables differ by up to 2e-6, which
# moves the losses by about 1e-6; a different lr, decay group, clipping or accumulation moves them by 1e-3 or more
LOSS_TOLERANCE = 2e-5
WEIGHT_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from babyllama.train.data import pretokenize

    root = tmp_path_factory.mktemp("llama2c_parity")
    (root / "corpus").mkdir()
    make_story_corpus(root / "corpus" / "train.txt", 60, seed=0)
    make_story_corpus(root / "corpus" / "valid.txt", 8, seed=1)
    byte_tokenizer(300).save(root / "tok.bin")
    pretokenize(root / "corpus", root / "tok.bin", root / "data", workers=1)
    return root / "data"


def trainer(data_dir, out_dir, **kw) -> Trainer:
    settings = dict(data_dir=data_dir, out_dir=out_dir, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    batch_size=4, gradient_accumulation_steps=3, learning_rate=3e-3, warmup_iters=3, max_iters=12,
                    weight_decay=0.1, grad_clip=0.5, min_lr=3e-4, device="cpu", dtype="float32", seed=1234)
    settings.update(kw)
    return Trainer(resolve_config(None, {k: str(v) for k, v in settings.items()}))


def reference_model(t: Trainer) -> ref.Transformer:
    """llama2.c's model of the trainer's shape, initialized as train.py does after torch.manual_seed(seed)."""
    c = t.cfg
    torch.manual_seed(c.seed)
    return ref.Transformer(ref.ModelArgs(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                                         vocab_size=c.vocab_size, multiple_of=c.multiple_of, max_seq_len=c.max_seq_len,
                                         dropout=c.dropout))


def test_the_same_seed_gives_llama2c_s_initial_weights(data_dir, tmp_path, one_thread):
    t = trainer(data_dir, tmp_path / "out")
    theirs = reference_model(t).state_dict()
    ours = t.raw.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("settings", [
    dict(),
    dict(warmup_iters=0, min_lr=0.0),
    dict(warmup_iters=5, max_iters=4),
    dict(decay_lr=False),
], ids=["warmup-cosine-min_lr", "no-warmup", "warmup-only", "constant"])
def test_the_learning_rate_is_train_py_s_at_every_step(settings):
    cfg = resolve_config(None, {"data_dir": "unused", **{k: str(v) for k, v in settings.items()}, "max_iters":
                                str(settings.get("max_iters", 40)), "learning_rate": "1e-3"})
    for it in range(cfg.max_iters + 1):  # train.py runs one step more, at max_iters
        expected = ref.get_lr(it, cfg.warmup_iters, cfg.max_iters, cfg.learning_rate, cfg.min_lr) if cfg.decay_lr \
            else cfg.learning_rate
        assert lr_at(cfg, it) == pytest.approx(expected, rel=1e-12, abs=1e-15), it


def test_steps_follow_llama2c_s_loop_on_the_same_batches(data_dir, tmp_path, one_thread):
    """The same initial weights and micro-batches through train.py's loop (lr schedule, decay of 2-D parameters
    only, accumulation, clipping, AdamW) and through the Trainer: the same loss at every step, the same weights."""
    t = trainer(data_dir, tmp_path / "out")
    theirs = reference_model(t)
    optimizer = theirs.configure_optimizers(t.cfg.weight_decay, t.cfg.learning_rate, (t.cfg.beta1, t.cfg.beta2))
    batches = []
    draw = t.train_data.batch

    def recorded(starts, device):
        x, y, weights = draw(starts, device)
        batches.append((x.contiguous(), y.contiguous()))
        return x, y, weights

    t.train_data.batch = recorded  # type: ignore[method-assign]
    for it in range(t.cfg.max_iters):
        ours = t.step().item()
        micro = batches[-t.cfg.gradient_accumulation_steps:]
        lr = ref.get_lr(it, t.cfg.warmup_iters, t.cfg.max_iters, t.cfg.learning_rate, t.cfg.min_lr)
        losses = ref.train_step(theirs, optimizer, lr, micro, t.cfg.grad_clip)
        # the Trainer reports the iteration's mean loss (train.py prints the last micro-batch's)
        assert ours == pytest.approx(sum(losses) / len(losses), abs=LOSS_TOLERANCE), it
    weights = t.raw.state_dict()
    moved = max((weights[k] - t0).abs().max().item() for k, t0 in reference_model(t).state_dict().items())
    assert moved > 100 * WEIGHT_TOLERANCE  # the steps changed the weights: agreeing below means something
    for name, tensor in theirs.state_dict().items():
        assert (weights[name] - tensor).abs().max().item() <= WEIGHT_TOLERANCE, name


def test_the_validation_loss_is_llama2c_s_on_the_same_batches(data_dir, tmp_path, one_thread):
    t = trainer(data_dir, tmp_path / "out", eval_iters=3)
    theirs = reference_model(t).eval()
    expected = {}
    with torch.no_grad():
        for split, data in (("train", t.train_data), ("val", t.val_data)):
            gen = torch.Generator().manual_seed(t.cfg.seed + 1)  # estimate_loss's fixed batches
            losses = []
            for _ in range(t.cfg.eval_iters):
                x, y = data.batch(data.draw(t.cfg.batch_size, gen), torch.device("cpu"))[:2]
                theirs(x.contiguous(), y.contiguous())
                losses.append(theirs.last_loss.item())
            expected[split] = sum(losses) / len(losses)
    got = t.estimate_loss()
    assert got == pytest.approx(expected, abs=LOSS_TOLERANCE)


def test_sample_py_finds_the_runs_tokenizer_where_data_train_vocab_writes_it(data_dir, tmp_path, one_thread):
    """llama2.c's sample.py picks the tokenizer by the checkpoint config's vocab_source: without one it took Meta's
    32,000-token tokenizer.model for any model, so a prompt's ids fell outside a small vocabulary (IndexError) and
    the generated ids decoded as other text."""
    from babyllama.train import checkpoint

    t = trainer(data_dir, tmp_path / "out", max_iters=1, eval_interval=1, eval_iters=1)
    t.run()
    saved = checkpoint.load(tmp_path / "out")
    assert ref.sample_py_tokenizer_model(saved) == os.path.join("data", "tok300.model")
    llama2 = {"config": checkpoint.portable_config(saved["config"], 32000), "model_args": {"vocab_size": 32000}}
    assert ref.sample_py_tokenizer_model(llama2) == "tokenizer.model"
