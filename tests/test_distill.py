"""Knowledge distillation in the training loop (babyllama/train/distill.py): the loss's arithmetic, the
teacher checks, and a student trained on a teacher's distributions learning them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import byte_tokenizer, random_weights, tiny_args  # noqa: E402

from babyllama import formats  # noqa: E402
from babyllama.errors import BabyLlamaError  # noqa: E402
from babyllama.train.distill import distillation_loss  # noqa: E402

F = torch.nn.functional
VOCAB = 64


def random_logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_alpha_zero_is_plain_cross_entropy():
    logits, teacher = random_logits(2, 5, VOCAB), random_logits(2, 5, VOCAB, seed=1)
    targets = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    want = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
    assert torch.allclose(distillation_loss(logits, teacher, targets, 0.0, 2.0), want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_term_is_hinton_kd_with_t_squared(temperature):
    """alpha=1: T² · KL(teacher_T ‖ student_T) per position, averaged; compared with torch's kl_div."""
    logits, teacher = random_logits(3, 7, VOCAB), random_logits(3, 7, VOCAB, seed=1)
    targets = torch.randint(VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    s = F.log_softmax(logits.view(-1, VOCAB) / temperature, -1)
    t = F.log_softmax(teacher.view(-1, VOCAB) / temperature, -1)
    want = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    got = distillation_loss(logits, teacher, targets, 1.0, temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # and the mix is linear in alpha
    ce = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
    mixed = distillation_loss(logits, teacher, targets, 0.3, temperature)
    assert mixed.item() == pytest.approx(0.3 * want.item() + 0.7 * ce.item(), rel=1e-5)


def test_kl_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    logits = random_logits(2, 4, VOCAB)
    targets = torch.zeros(2, 4, dtype=torch.long)
    assert distillation_loss(logits, logits.clone(), targets, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, random_logits(2, 4, VOCAB, seed=5), targets, 1.0, 1.0).item() > 0.1


def test_ignored_targets_are_left_out_of_both_terms():
    logits, teacher = random_logits(1, 6, VOCAB), random_logits(1, 6, VOCAB, seed=1)
    targets = torch.tensor([[3, 4, -1, 5, -1, 6]])
    keep = targets[0] != -1
    want = distillation_loss(logits[:, keep], teacher[:, keep], targets[:, keep], 0.5, 1.5)
    assert distillation_loss(logits, teacher, targets, 0.5, 1.5).item() == pytest.approx(want.item(), rel=1e-6)


def test_gradient_flows_to_the_student_only():
    logits = random_logits(2, 3, VOCAB).requires_grad_()
    teacher = random_logits(2, 3, VOCAB, seed=1).requires_grad_()
    distillation_loss(logits, teacher.detach(), torch.zeros(2, 3, dtype=torch.long), 0.5, 2.0).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert teacher.grad is None


# ------------------------------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random-token shards (no structure of their own to learn) and a random teacher whose blocks add
    nothing to the residual stream (wo = w2 = 0): a sharp next-token distribution for each current token,
    which a student can only learn from the teacher."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 40_000), ("val.bin", 4_000)):
        rng.integers(0, VOCAB, n).astype(np.uint16).tofile(data / name)
    meta = {"vocab_size": VOCAB, "shards": {"train": ["train.bin"], "val": ["val.bin"]}}
    (data / "meta.json").write_text(json.dumps(meta))
    teacher = root / "teacher.bin"
    weights = random_weights(tiny_args(vocab_size=VOCAB, max_seq_len=64), seed=1, scale=0.5)
    weights.wo[:], weights.w2[:] = 0.0, 0.0
    formats.save(weights, teacher)
    return root


def settings(setup, out, **kw) -> dict:
    base = dict(data_dir=str(setup / "data"), out_dir=str(out), dim="32", n_layers="2", n_heads="4",
                n_kv_heads="2", max_seq_len="32", batch_size="16", gradient_accumulation_steps="1",
                learning_rate="1e-2", warmup_iters="5", max_iters="120", eval_interval="1000", eval_iters="2",
                log_interval="40", seed="3")
    return {**base, **{k: str(v) for k, v in kw.items()}}


def teacher_kl(student_dir, teacher_path, tokens) -> float:
    """Mean KL(teacher ‖ student) in nats over the next-token distributions of `tokens` (1, T)."""
    from babyllama.model import Transformer
    from babyllama.train.checkpoint import load_model

    student = load_model(student_dir / "ckpt.pt")
    teacher = Transformer.from_weights(formats.load(teacher_path)).eval()
    with torch.no_grad():
        s, t = F.log_softmax(student(tokens)[0], -1), F.log_softmax(teacher(tokens)[0], -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_student_learns_the_teachers_distributions(setup, tmp_path):
    """The same run with and without the teacher: on random tokens the labels alone teach a uniform
    guess, the teacher's distributions teach the student to predict like the teacher."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    torch.set_num_threads(1)
    teacher = setup / "teacher.bin"
    train(resolve_config(None, settings(setup, tmp_path / "labels")))
    train(resolve_config(None, settings(setup, tmp_path / "kd", teacher=teacher, kd_alpha=1.0, kd_temperature=1.0)))
    tokens = torch.from_numpy(np.fromfile(setup / "data" / "val.bin", dtype=np.uint16)[:32].astype(np.int64))[None]
    with_labels, with_teacher = (teacher_kl(tmp_path / d, teacher, tokens) for d in ("labels", "kd"))
    assert with_teacher < 0.5 * with_labels, (with_teacher, with_labels)
    ckpt = torch.load(tmp_path / "kd" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["teacher"] == str(teacher) and ckpt["config"]["kd_alpha"] == 1.0
    # the validation loss stays cross-entropy on the (random) real tokens: about ln(vocab), not the KD loss
    assert ckpt["best_val_loss"] == pytest.approx(math.log(VOCAB), abs=0.6)


@pytest.mark.parametrize("kw,message", [
    (dict(max_seq_len=128), "context of 64 tokens"),
    (dict(kd_alpha=1.5), "kd_alpha must be in"),
    (dict(kd_temperature=0), "kd_temperature must be positive"),
])
def test_bad_teacher_settings_are_one_line_errors(setup, tmp_path, kw, message):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    with pytest.raises(BabyLlamaError, match=message):
        train(resolve_config(None, settings(setup, tmp_path, teacher=setup / "teacher.bin", max_iters=1, **kw)))


@pytest.mark.parametrize("key", ["kd_alpha", "kd_temperature"])
def test_distillation_settings_without_a_teacher_are_refused(tmp_path, key):
    from babyllama.train.config import resolve_config

    with pytest.raises(BabyLlamaError, match=f"^{key} needs a teacher to distill from"):
        resolve_config(None, {"data_dir": str(tmp_path), "out_dir": str(tmp_path / "out"), key: "0.9"})
    assert getattr(resolve_config(None, {"data_dir": str(tmp_path), key: "0.5" if key == "kd_alpha" else "1"}),
                   key) in (0.5, 1.0)  # the default value itself is what no teacher means


def test_word_weight_under_distillation_is_refused(tmp_path):
    """Distillation averages over the targets unweighted: a word weight asked for would weigh nothing."""
    from babyllama.train.config import FINETUNE_DEFAULTS, resolve_config

    asked = {"base": "base.bin", "data": "chat", "out_dir": str(tmp_path / "out"), "teacher": "teacher.bin"}
    with pytest.raises(BabyLlamaError, match=r"^word_weight 5 weighs the requested words' cross-entropy, and "
                                             r"distillation \(--teacher\) averages over the targets unweighted"):
        resolve_config(None, {**asked, "word_weight": "5"}, defaults=FINETUNE_DEFAULTS)
    assert resolve_config(None, asked, defaults=FINETUNE_DEFAULTS).word_weight == 1


def test_a_run_resumed_without_its_teacher_goes_on_with_cross_entropy(setup, tmp_path, capsys):
    """--teacher= on resume drops the checkpoint's distillation settings with its teacher (they named the run's
    kd_alpha as given without a teacher); given again, they are refused as without a teacher. A teacher .bin
    without a tokenizer beside it is noted: its ids cannot be checked against the data's."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    out = tmp_path / "run"
    train(resolve_config(None, settings(setup, out, teacher=setup / "teacher.bin", kd_alpha=0.8, max_iters=4,
                                        eval_interval=4)))
    assert f"note: teacher {setup / 'teacher.bin'} has no tokenizer beside or inside it" in capsys.readouterr().err
    with pytest.raises(BabyLlamaError, match="^kd_alpha needs a teacher"):
        resolve_config(None, settings(setup, out, init_from="resume", teacher="", kd_alpha=0.8, max_iters=8))
    train(resolve_config(None, settings(setup, out, init_from="resume", teacher="", max_iters=8, eval_interval=4)))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["config"]["teacher"], ckpt["config"]["kd_alpha"], ckpt["iter_num"]) == ("", 0.5, 8)


def test_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    other = tmp_path / "other.bin"
    formats.save(random_weights(tiny_args(vocab_size=VOCAB + 1, max_seq_len=64)), other)
    with pytest.raises(BabyLlamaError, match="same tokenizer"):
        train(resolve_config(None, settings(setup, tmp_path / "out", teacher=other, max_iters=1)))
    with pytest.raises(BabyLlamaError, match="teacher: model file not found"):
        train(resolve_config(None, settings(setup, tmp_path / "out", teacher=tmp_path / "missing.bin", max_iters=1)))


def test_a_teacher_s_tokenizer_of_another_size_is_not_said_to_be_fixed_by_z(setup, tmp_path):
    """-z/--tokenizer sets the student's tokenizer (train refuses it without a base): the teacher's own
    tokenizer.bin is what is wrong, and the error says where a teacher reads it."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    (tmp_path / "teach").mkdir()
    formats.save(random_weights(tiny_args(vocab_size=VOCAB, max_seq_len=64)), tmp_path / "teach" / "m.bin")
    byte_tokenizer(300).save(tmp_path / "teach" / "tokenizer.bin")
    with pytest.raises(BabyLlamaError) as e:
        train(resolve_config(None, settings(setup, tmp_path / "out", teacher=tmp_path / "teach" / "m.bin",
                                            max_iters=1)))
    message = str(e.value)
    assert message.startswith("teacher: tokenizer ") and "has 300 tokens" in message
    assert "-z" not in message and message.endswith("(a teacher reads the tokenizer beside it or inside it)")


def tokenizer64(order: int = 1):
    """A VOCAB-token tokenizer; order -1 lists the same pieces' ids the other way round."""
    from babyllama.tokenizer import Tokenizer

    pieces = [bytes([97 + i % 26]) * (1 + i // 26) for i in range(VOCAB - 3)]
    return Tokenizer([b"<unk>", b"<s>", b"</s>"] + pieces[::order], [0.0] * VOCAB)


def test_teacher_with_a_tokenizer_other_than_the_datas_is_refused(setup, tmp_path):
    """The same vocabulary size, other pieces: the teacher's distributions would be over other tokens."""
    from babyllama.train.config import resolve_config
    from babyllama.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (data / name).write_bytes((setup / "data" / name).read_bytes())
    tokenizer64().save(data / "tokenizer.bin")
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "teacher.bin").write_bytes((setup / "teacher.bin").read_bytes())
    tokenizer64(order=-1).save(folder / "tokenizer.bin")
    kw = dict(data_dir=data, teacher=folder / "teacher.bin", max_iters=1)
    with pytest.raises(BabyLlamaError, match=r"teacher .* was trained with .*teacher/tokenizer.bin, not with the da"):
        train(resolve_config(None, settings(setup, tmp_path / "out", **kw)))
    tokenizer64().save(folder / "tokenizer.bin")  # the data's: taken
    assert train(resolve_config(None, settings(setup, tmp_path / "out", **kw)))["iter"] == 1


def test_a_teacher_in_any_format_distills_as_its_bin_does(setup, tmp_path):
    """--teacher reads what every other command reads: a GGUF copy teaches with the .bin's very logits."""
    pytest.importorskip("gguf")
    from babyllama.export import export
    from babyllama.loading import open_model
    from babyllama.train.distill import load_teacher

    teacher = setup / "teacher.bin"
    tokenizer64().save(tmp_path / "tok.bin")
    export(open_model(teacher, keep_quantized=False), tmp_path / "teacher.gguf", "gguf", tokenizer=tmp_path / "tok.bin")
    tokens = torch.arange(16)[None]
    a, b = (load_teacher(str(p), VOCAB, 32, torch.device("cpu")) for p in (teacher, tmp_path / "teacher.gguf"))
    with torch.no_grad():
        assert torch.equal(a(tokens)[0], b(tokens)[0])

