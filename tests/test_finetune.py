"""`babyllama finetune` on a tiny model and a small instruction set made here: LoRA trains the adapter only and
lowers the held-out loss; the merged adapter (export, run --lora, the NumPy engine) computes what the unmerged
PyTorch model does; resume after a kill; adapters refused on other bases; PEFT reads our Hugging Face adapter;
every base format; full fine-tuning; one-line errors; torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT, assert_greedy_agree, byte_tokenizer, random_weights, run_cli, tiny_args

from babyllama import formats
from babyllama.adapter import load_adapter, weights_sha256
from babyllama.errors import BabyLlamaError

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from babyllama.model import TorchEngine, Transformer  # noqa: E402
from babyllama.train.config import FINETUNE_DEFAULTS, resolve_config  # noqa: E402
from babyllama.train.loop import Trainer, train  # noqa: E402
from babyllama.train.lora import apply_lora, load_factors  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NAMES = ["tom", "ann", "bob", "sue"]
ARGS = tiny_args(vocab_size=300, max_seq_len=96)
PROMPT = [{"role": "user", "content": "Please say sue"}]


def conversation(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    return {"messages": [{"role": "user", "content": f"Please say {name}"},
                         {"role": "assistant", "content": f"{name} {name} the end"}], "words": [name]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_task(root):
    """base.bin (random weights) + tokenizer.bin beside it, and data/ with training and held-out requests."""
    root.mkdir(parents=True, exist_ok=True)
    w = random_weights(ARGS, seed=1, scale=0.1)
    w.tok_embeddings *= 4  # also the (tied) classifier: room for confident logits, which LoRA cannot add
    formats.save(w, root / "base.bin", 1)
    byte_tokenizer(300).save(root / "tokenizer.bin")
    rng = random.Random(0)
    (root / "data").mkdir(exist_ok=True)
    write_jsonl(root / "data" / "instruct_train.jsonl", [conversation(rng) for _ in range(200)])
    write_jsonl(root / "data" / "instruct_val.jsonl", [conversation(rng) for _ in range(24)])
    return root


def settings(root, out, **kw) -> dict:
    base = dict(base=str(root / "base.bin"), data=str(root / "data"), out_dir=str(out), lora_rank="8",
                learning_rate="2e-2", batch_size="16", max_iters="60", eval_interval="30", eval_iters="2",
                log_interval="1", warmup_iters="5", lr_decay_iters="60", device="cpu")
    return {**base, **{k: str(v) for k, v in kw.items()}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA fine-tune of the task, in process (the Trainer kept, to look inside)."""
    root = make_task(tmp_path_factory.mktemp("task"))
    base_hash = hashlib.sha256((root / "base.bin").read_bytes()).hexdigest()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(resolve_config(None, settings(root, root / "lora"), defaults=FINETUNE_DEFAULTS))
        trainer.run()
    finally:
        torch.set_num_threads(n)
    return root, trainer, base_hash


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unmerged_model(root, adapter_path) -> Transformer:
    """The base in PyTorch with the adapter's factors beside the frozen weights (nothing merged)."""
    adapter = load_adapter(adapter_path)
    model = Transformer.from_weights(formats.load(root / "base.bin"))
    apply_lora(model, adapter.rank, adapter.alpha, 0.0, adapter.targets)
    load_factors(model, adapter.tensors)
    return model.eval()


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_lowers_the_held_out_loss_and_trains_the_adapter_only(lora_run):
    root, trainer, base_hash = lora_run
    out = root / "lora"
    evals = [(r["iter"], r["val_loss"]) for r in records(out) if "val_loss" in r]
    assert [i for i, _ in evals] == [0, 30, 60]
    assert evals[-1][1] < 0.2 * evals[0][1]  # masked loss on the replies, held-out conversations
    # the base's weights are untouched: the file, and every frozen tensor of the trained model
    assert hashlib.sha256((root / "base.bin").read_bytes()).hexdigest() == base_hash
    base = Transformer.from_weights(formats.load(root / "base.bin")).state_dict()
    trained = trainer.raw.state_dict()
    frozen = [k for k in trained if ".lora_" not in k]
    assert sorted(frozen) == sorted(base) and all(torch.equal(trained[k], base[k]) for k in frozen)
    factors = {k for k, p in trainer.raw.named_parameters() if p.requires_grad}
    assert factors == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in
                       ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                        "feed_forward.w2", "feed_forward.w3") for ab in "AB"}
    assert len(trainer.optimizer.state) == len(factors)  # no optimizer state for the base
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == factors and ckpt["lora"]["rank"] == 8
    # the adapter on its own: its tensors are the checkpoint's, its config names the base
    adapter = load_adapter(out / "adapter.safetensors")
    assert set(adapter.tensors) == factors and adapter.alpha == 16.0 and adapter.rank == 8
    assert all(np.array_equal(adapter.tensors[k], ckpt["model"][k].numpy()) for k in factors)
    assert adapter.base["sha256"] == weights_sha256(formats.load(root / "base.bin"))
    assert adapter.base["args"]["dim"] == ARGS.dim
    assert any(np.abs(adapter.tensors[k]).max() > 0 for k in factors if k.endswith("lora_B"))


def test_a_merged_export_over_its_own_base_is_refused(lora_run, tmp_path):
    """`export BASE --model BASE --lora A` replaced the base with the merged model: the adapter's base was gone."""
    import shutil

    root, _, _ = lora_run
    shutil.copy(root / "base.bin", tmp_path / "base.bin")
    shutil.copy(root / "tokenizer.bin", tmp_path / "tokenizer.bin")
    before = (tmp_path / "base.bin").read_bytes()
    proc = run_cli("export", str(tmp_path / "base.bin"), "--model", str(tmp_path / "base.bin"), "--lora",
                   str(root / "lora"))
    assert proc.returncode == 1 and proc.stderr.decode().count("\n") == 1
    assert "is the base model: the merged model written over it would leave the adapter" in proc.stderr.decode()
    assert (tmp_path / "base.bin").read_bytes() == before
    shutil.copytree(root / "lora", tmp_path / "run")
    adapter = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("adapter.*")}
    for name in ("adapter.safetensors", "adapter.json"):
        proc = run_cli("export", str(tmp_path / "run" / name), "--model", str(root / "base.bin"), "--lora",
                       str(tmp_path / "run"))
        assert proc.returncode == 1 and proc.stderr.decode().count("\n") == 1
        assert f"is the adapter this export reads ({tmp_path / 'run' / name})" in proc.stderr.decode()
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("adapter.*")} == adapter


def test_merged_adapter_computes_what_the_unmerged_model_does(lora_run, tmp_path):
    """NumPy engine on the merged export vs PyTorch with the factors unmerged: logits within 1e-4 (measured
    ~2e-6), greedy tokens equal up to a near-tie; `run --lora` and `run MERGED.bin` print the same text."""
    from babyllama.api import load
    from babyllama.chat_template import encode_chat
    from babyllama.engine import Engine
    from babyllama.generate import generate
    from babyllama.sampler import Sampler
    from babyllama.tokenizer import EOS

    root, _, _ = lora_run
    tok = byte_tokenizer(300)
    proc = run_cli("export", str(tmp_path / "merged.bin"), "--model", str(root / "base.bin"), "--lora",
                   str(root / "lora"))
    assert proc.returncode == 0, proc.stderr.decode()
    ids, _ = encode_chat(tok, PROMPT)
    model = unmerged_model(root, root / "lora")
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].numpy()
    engine = Engine(formats.load(tmp_path / "merged.bin"))
    got = engine.forward(ids, np.arange(len(ids)), engine.new_cache())
    assert np.abs(got - want).max() <= 1e-4

    merged = load(root / "base.bin", root / "tokenizer.bin", lora=root / "lora")
    numpy_tokens = list(generate(merged.engine, ids, ARGS.max_seq_len, Sampler(0.0), stop_ids=(EOS,)))
    torch_tokens = list(generate(TorchEngine(model), ids, ARGS.max_seq_len, Sampler(0.0), stop_ids=(EOS,)))
    full = ids + torch_tokens

    def logits_at(i):
        with torch.no_grad():
            return model(torch.tensor([full[:len(ids) + i]]))[0][0, -1].numpy()

    assert_greedy_agree(torch_tokens, numpy_tokens, logits_at, max_margin=1e-3)
    assert tok.decode_text(numpy_tokens, ids[-1]).strip().startswith("sue sue")  # it learned the task

    flags = ["-z", str(root / "tokenizer.bin"), "-t", "0", "-n", "60", "-i", "[INST] Please say sue [/INST]"]
    with_lora = run_cli("run", str(root / "base.bin"), "--lora", str(root / "lora" / "adapter.json"), *flags)
    exported = run_cli("run", str(tmp_path / "merged.bin"), *flags)
    assert with_lora.returncode == exported.returncode == 0, with_lora.stderr.decode()
    assert with_lora.stdout == exported.stdout and b"sue sue" in with_lora.stdout
    assert b"LoRA adapter" in with_lora.stderr


def test_eval_instruct_scores_the_fine_tune_above_the_base(lora_run):
    root, _, _ = lora_run
    common = ["-z", str(root / "tokenizer.bin"), "--instruct", str(root / "data" / "instruct_val.jsonl"), "--json",
              "--samples", "1"]
    tuned = run_cli("eval", str(root / "base.bin"), "--lora", str(root / "lora"), *common)
    base = run_cli("eval", str(root / "base.bin"), *common)
    assert tuned.returncode == base.returncode == 0, tuned.stderr.decode()
    tuned, base = json.loads(tuned.stdout), json.loads(base.stdout)
    assert tuned["requests"] == base["requests"] == 24 and tuned["words_requested"] == 24
    assert tuned["word_share"] >= 0.8 > base["word_share"]
    assert tuned["topic_requests"] == 0 and tuned["topic_share"] is None  # none asked: null (JSON has no NaN)
    sample = tuned["samples"][0]
    assert sample["words"][0] in sample["request"] and sample["used"] == sample["words"]
    table = run_cli("eval", str(root / "base.bin"), *[a for a in common if a != "--json"])
    assert table.returncode == 0 and b"\n[words used: " in table.stdout, table.stderr.decode()
    assert re.search(rb"; topic: (none asked|mentioned|missed)\]\n", table.stdout), table.stdout[-300:]
    assert b"topic        - (no request asks for a topic)\n" in table.stdout and b"nan" not in table.stdout


def test_an_adapter_is_refused_on_any_other_base(lora_run, tmp_path):
    from babyllama.api import load

    root, _, _ = lora_run
    lora = root / "lora"
    formats.save(random_weights(ARGS, seed=2, scale=0.1), tmp_path / "other.bin", 1)
    formats.save(random_weights(tiny_args(vocab_size=300, max_seq_len=96, dim=48, n_heads=4), seed=1), tmp_path /
                 "wide.bin", 1)
    proc = run_cli("export", str(tmp_path / "q8.bin"), "--model", str(root / "base.bin"), "--version", "2")
    assert proc.returncode == 0
    tok = root / "tokenizer.bin"
    with pytest.raises(BabyLlamaError, match="trained on another base .*same shape, other weights"):
        load(tmp_path / "other.bin", tok, lora=lora)
    with pytest.raises(BabyLlamaError, match="trained on another model .*dim 32 vs 48"):
        load(tmp_path / "wide.bin", tok, lora=lora)
    with pytest.raises(BabyLlamaError, match="a quantized or rounded .* copy of the base is another base"):
        load(tmp_path / "q8.bin", tok, lora=lora)
    for dtype in ("f16", "f32"):  # an f16 copy is another base too; an f32 GGUF of it is the base itself
        gguf = tmp_path / f"{dtype}.gguf"
        assert run_cli("export", str(gguf), "--model", str(root / "base.bin"), "-z", str(tok), "--dtype",
                       dtype).returncode == 0
        if dtype == "f16":
            with pytest.raises(BabyLlamaError, match="a quantized or rounded .f16, bf16. copy of the base"):
                load(gguf, lora=lora)
        else:  # merged: the weights that run are in memory, no longer the mapped file's
            assert "(fp32, in memory), LoRA adapter" in load(gguf, lora=lora).description
    with pytest.raises(BabyLlamaError, match="other.bin is no adapter: an adapter is NAME.safetensors with"):
        load(root / "base.bin", tok, lora=tmp_path / "other.bin")  # a model given for the adapter
    merged = load(root / "base.bin", tok, quantize="q8_0", lora=lora)
    assert merged.weights.quantized  # merged, then quantized; and said so
    assert f"({merged.weights.kinds()}, quantized on load), LoRA adapter" in merged.description
    assert "fp32" not in merged.description
    proc = run_cli("run", str(tmp_path / "other.bin"), "-z", str(tok), "--lora", str(lora), "-n", "8")
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "another base" in err
    proc = run_cli("run", str(root / "base.bin"), "-z", str(tok), "--lora", str(tmp_path / "none"), "-n", "8")
    assert proc.returncode == 1 and "adapter file not found" in proc.stderr.decode()
    (tmp_path / "full").mkdir()  # a full fine-tune's run folder: a model, not an adapter
    (tmp_path / "full" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(BabyLlamaError, match=r"full holds a ckpt.pt but no adapter: a full fine-tune \(lora_rank 0\), "
                                             r"like any training run, is a model of its own; run it as the model"):
        load(root / "base.bin", tok, lora=tmp_path / "full")
    # a LoRA run folder whose tensors are missing (its config left) is not called a full fine-tune: that sent the
    # user to `chat RUN`, which says a LoRA fine-tune needs --lora
    (tmp_path / "full" / "adapter.json").write_text("{}")
    with pytest.raises(BabyLlamaError, match="adapter file not found: .*full/adapter.safetensors"):
        load(root / "base.bin", tok, lora=tmp_path / "full")


def test_chat_without_a_model_says_the_adapter_needs_its_base_named(tmp_path):
    """`chat --lora` with no model runs the built-in chat model (Q8_0): an adapter of the story model it was
    fine-tuned from is told to name its base, not that a quantized copy is another base."""
    from babyllama.adapter import Adapter, base_identity, lora_key, save_adapter

    story = formats.load(ROOT / "babyllama" / "assets" / "model.bin")
    a = story.args
    tensors = {lora_key(layer, "wq", which): np.zeros(shape, dtype=np.float32) for layer in range(a.n_layers)
               for which, shape in (("A", (2, a.dim)), ("B", (a.dim, 2)))}
    save_adapter(Adapter(2, 4.0, ["wq"], base_identity(story), tensors), tmp_path / "adapter.safetensors")
    proc = run_cli("chat", "--lora", str(tmp_path), "-n", "4", input="Hi\n")
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "was not trained on the built-in chat model, which chat runs when no MODEL is named: name the model it " \
           "was trained on" in err and "quantized" not in err
    proc = run_cli("chat", str(ROOT / "babyllama" / "assets" / "model.bin"), "--lora", str(tmp_path), "-n", "4",
                   input="Hi\n")
    assert proc.returncode == 0 and b"Assistant:" in proc.stdout, proc.stderr.decode()


def test_a_resume_with_an_empty_base_says_to_leave_it_out(lora_run, capsys):
    """`--base=` on a resume would replace the run's own base: said so, not "lora_rank needs a base model"."""
    from babyllama.cli import main

    root = lora_run[0]
    assert main(["finetune", "--init_from=resume", f"--out_dir={root / 'lora'}", "--base="]) == 1
    assert capsys.readouterr().err.strip() == (
        "babyllama: error: finetune needs a base model: leave --base out to resume with the run's own")


def test_a_lora_run_folder_given_as_the_model_names_its_base(lora_run):
    root, _, _ = lora_run
    for argv in (["run", str(root / "lora"), "-n", "4"], ["export", str(root / "m.bin"), "--checkpoint",
                                                          str(root / "lora")],
                 ["sample", "--checkpoint", str(root / "lora"), "-n", "4"], ["eval", str(root / "lora"), "--data",
                                                                               str(root / "lora" / "x.txt")]):
        proc = run_cli(*argv)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert f"is a LoRA fine-tune, which holds only the adapter: give its base model ({root / 'base.bin'}) with " \
               "--lora RUN (the run folder, or adapter.safetensors in it), as `babyllama run|chat|eval|serve BASE " \
               "--lora RUN` take it" in err and "merge it: `babyllama export OUT.bin --model BASE --lora RUN`" in err
    assert not (root / "m.bin").exists()


def test_peft_loads_the_hugging_face_adapter_with_our_logits(lora_run, tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    root, _, _ = lora_run
    for out, extra in ((tmp_path / "base_hf", []), (tmp_path / "tuned_hf", ["--lora", str(root / "lora")])):
        proc = run_cli("export", str(out), "--model", str(root / "base.bin"), *extra)
        assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in (tmp_path / "tuned_hf" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    tokens = torch.tensor([np.random.default_rng(0).integers(0, 300, 40).tolist()])
    with torch.no_grad():
        ours = unmerged_model(root, root / "lora")(tokens)[0]
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()(tokens).logits
        peft_model = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf"), tmp_path / "tuned_hf" / "adapter")
        with_peft = peft_model.eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned_hf").eval()(tokens).logits
    assert (with_peft - ours).abs().max() <= 1e-4 and (merged - ours).abs().max() <= 1e-4
    assert (plain - ours).abs().max() > 0.01  # the adapter matters: a no-op would pass the checks above
    # the plain model exported over the tuned folder would sit beside an adapter that is not its own
    proc = run_cli("export", str(tmp_path / "tuned_hf"), "--model", str(root / "base.bin"))
    assert proc.returncode == 1 and "holds an adapter folder from another export" in proc.stderr.decode()
    proc = run_cli("export", str(tmp_path / "tuned_hf"), "--model", str(root / "base.bin"),
                   "--lora", str(root / "lora"))
    assert proc.returncode == 0, proc.stderr.decode()  # the same export again: its own adapter is replaced


# ------------------------------------------------------------------------------------------------ resume


def test_resume_after_a_kill_continues_exactly(tmp_path, one_thread):
    """A run killed (SIGKILL) after a checkpoint, resumed with --init_from=resume, ends where an uninterrupted
    run ends: the same loss at every step and the same adapter, bit for bit (dropout on: RNG restored)."""
    root = make_task(tmp_path / "task")
    same = dict(max_iters=60, eval_interval=10, lr_decay_iters=60, lora_dropout=0.1, learning_rate="3e-3",
                batch_size=8)
    train(resolve_config(None, settings(root, tmp_path / "straight", **same), defaults=FINETUNE_DEFAULTS))

    flags = [f"--{k}={v}" for k, v in settings(root, tmp_path / "killed", **same).items()]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "finetune", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = torch.load(ckpt, weights_only=True)["iter_num"]
    assert 0 < killed_at < 60

    proc = run_cli("finetune", f"--out_dir={tmp_path / 'killed'}", "--init_from=resume", env=ONE_THREAD,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    losses = lambda out: [(r["iter"], r["loss"]) for r in records(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 60
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "killed")
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ------------------------------------------------------------------------------------------------ bases


def test_every_base_format_starts_from_the_same_weights(tmp_path, sp_model):
    """A checkpoint, .bin v0/v1/v2 (dequantized), GGUF, a Hugging Face and a Meta folder all load as the base
    (v2: the dequantized Q8_0 values); --hf and --meta-llama fine-tune end to end."""
    import shutil

    from babyllama.cli import main
    from babyllama.export import export
    from babyllama.interop.meta import save_meta
    from babyllama.loading import Source
    from babyllama.train.checkpoint import save
    from babyllama.train.config import TrainConfig
    from babyllama.train.finetune import open_base

    args = tiny_args(vocab_size=320, max_seq_len=64)
    w = random_weights(args, seed=3)
    src = Source(w, "bin", tmp_path / "w.bin", tokenizer=sp_model)
    export(src, tmp_path / "v0.bin", "bin", version=0)
    export(src, tmp_path / "v2.bin", "bin", version=2)
    export(src, tmp_path / "m.gguf", "gguf")
    export(src, tmp_path / "hf", "hf")
    shutil.copyfile(sp_model, save_meta(w, tmp_path / "meta", 2) / "tokenizer.model")
    save({"model": Transformer.from_weights(w).state_dict(), "model_args": args.to_dict()}, tmp_path / "ckpt.pt")
    want = Transformer.from_weights(w).state_dict()
    q8 = Transformer.from_weights(w.quantize()).state_dict()
    for base, kind, expected in (("v0.bin", "", want), ("v2.bin", "", q8), ("m.gguf", "", want), ("hf", "hf", want),
                                 ("meta", "meta", want), ("ckpt.pt", "", want)):
        cfg = TrainConfig(base=str(tmp_path / base), base_format=kind, max_seq_len=0)
        got = Transformer.from_weights(open_base(cfg).weights).state_dict()
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in want), base
        # Meta's params.json carries no context length: Llama 2's 4096 is assumed (interop/meta.py)
        assert (cfg.dim, cfg.vocab_size, cfg.max_seq_len) == (32, 320, 4096 if kind == "meta" else 64)

    rng = random.Random(0)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chat.jsonl", [conversation(rng) for _ in range(40)])
    for flag, folder in (("--hf", "hf"), ("--meta-llama", "meta")):
        out = tmp_path / f"out_{folder}"
        assert main(["finetune", flag, str(tmp_path / folder), f"--data={tmp_path / 'data'}", f"--out_dir={out}",
                     "--max_iters=2", "--eval_iters=1", "--batch_size=4", "--lora-rank", "2", "--max_seq_len=64",
                     "--device=cpu"]) == 0
        assert load_adapter(out).base["sha256"] == weights_sha256(w)


# ------------------------------------------------------------------------------------------------ full


def test_full_fine_tuning_trains_every_weight_into_a_model_of_its_own(tmp_path, capsys, one_thread):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    out = tmp_path / "full"
    flags = [f"--{k}={v}" for k, v in settings(root, out, lora_rank=0, learning_rate="1e-2", max_iters=30,
                                               eval_interval=30).items()]
    assert main(["finetune", *flags]) == 0
    assert "ckpt.pt; try: babyllama chat" in capsys.readouterr().out
    evals = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert evals[-1] < 0.1 * evals[0]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    base = Transformer.from_weights(formats.load(root / "base.bin")).state_dict()
    assert set(ckpt["model"]) == set(base) and not ckpt["lora"]
    assert all(not torch.equal(ckpt["model"][k], base[k]) for k in base)  # every tensor trained
    assert ckpt["config"]["max_seq_len"] == 96 and ckpt["config"]["dim"] == 32  # the base's shape, recorded
    proc = run_cli("run", str(out), "-t", "0", "-n", "40", "-i", "[INST] Please say bob [/INST]")
    assert proc.returncode == 0 and b"bob bob" in proc.stdout, proc.stderr.decode()


def test_shorter_training_windows_keep_the_bases_context(tmp_path, one_thread):
    """max_seq_len sizes the windows a fine-tune trains on: the model it writes keeps the base's context, in a
    full fine-tune as a merged adapter does."""
    root = make_task(tmp_path / "task")
    out = tmp_path / "short"
    train(resolve_config(None, settings(root, out, lora_rank=0, max_iters=2, eval_interval=2, eval_iters=1,
                                        max_seq_len=64), defaults=FINETUNE_DEFAULTS))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["max_seq_len"] == 64 and ckpt["model_args"]["max_seq_len"] == ARGS.max_seq_len
    proc = run_cli("export", str(tmp_path / "m.bin"), "--checkpoint", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert formats.load(tmp_path / "m.bin").args.max_seq_len == ARGS.max_seq_len


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter.json"])
def test_an_adapter_file_given_as_the_model_says_to_use_lora(lora_run, capsys, name):
    from babyllama.cli import main

    root, _, _ = lora_run
    adapter = root / "lora" / name
    for argv in (["run", str(adapter), "-n", "3"], ["export", str(root / "x.bin"), "--model", str(adapter)]):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (
            f"babyllama: error: {adapter}: a LoRA adapter, not a model: give it with --lora, beside the model it "
            f"was trained on (babyllama run BASE --lora {adapter})")


def test_a_device_given_as_the_adapter_is_named_as_what_it_is():
    from babyllama.adapter import load_adapter

    with pytest.raises(BabyLlamaError, match=r"^adapter file /dev/null is a device, not a regular file$"):
        load_adapter("/dev/null")


def test_a_full_fine_tune_over_a_lora_run_takes_its_adapter_away(tmp_path, one_thread):
    """A new full fine-tune in a LoRA run's folder replaces that run at its first checkpoint, adapter included:
    left there, `--lora FOLDER` merged it as if it were this run's."""
    from babyllama.adapter import load_adapter

    root = make_task(tmp_path / "task")
    out = tmp_path / "run"
    small = dict(max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=0, lr_decay_iters=2)
    train(resolve_config(None, settings(root, out, lora_rank=2, **small), defaults=FINETUNE_DEFAULTS))
    assert load_adapter(out).rank == 2
    train(resolve_config(None, settings(root, out, lora_rank=0, **small), defaults=FINETUNE_DEFAULTS))
    assert not (out / "adapter.safetensors").exists() and not (out / "adapter.json").exists()
    with pytest.raises(BabyLlamaError):
        load_adapter(out)


def test_plain_text_continues_pre_training(tmp_path, one_thread):
    root = make_task(tmp_path / "task")
    (root / "text").mkdir()
    (root / "text" / "stories.txt").write_text("".join(f"{n} went to the park.\n<|endoftext|>\n" for n in NAMES * 30))
    out = tmp_path / "text_out"
    result = train(resolve_config(None, settings(root, out, data=str(root / "text"), lora_rank=0, max_iters=20,
                                                 eval_interval=20, learning_rate="3e-3"), defaults=FINETUNE_DEFAULTS))
    assert result["iter"] == 20
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert "kind" not in meta and meta["shards"]["train"] == ["stories.bin"]
    evals = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert evals[-1] < 0.7 * evals[0]


def test_ctrl_c_while_a_fine_tune_pretokenizes_leaves_no_data_folder_and_says_so(tmp_path, capsys, monkeypatch):
    """The data folder a fine-tune made goes when it is interrupted while pretokenizing, which one line says
    (the pretokenizer's note that the folder is unfinished would name a folder that is gone)."""
    from babyllama.cli import main
    from babyllama.train import data

    root = make_task(tmp_path / "task")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_install_tokenizer", interrupt)  # after the shards, before meta.json
    out = tmp_path / "run"
    assert main(["finetune", *(f"--{k}={v}" for k, v in settings(root, out).items())]) == 130
    err = capsys.readouterr().err
    assert "unfinished" not in err and f"interrupted while pretokenizing {root}" in err, err
    assert not (out / "data").exists()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("lines, flags, message", [
    (None, ["--base="], "needs a base model"),
    (None, ["--lora_rank=4", "--lora_targets=wq,wz"], "lora targets must be some of wq,wk,wv,wo,w1,w2,w3"),
    (None, ["--data_dir=x"], "and --data_dir=x both name the data: give one (--data raw, pretokenized into"),
    (None, ["--lora_rank=4", "--fsdp"], "fsdp=true is for full training"),
    (None, ["--learning_rate=nan"], "learning_rate must be a finite number >= 0, got nan"),
    (None, ["--learning_rate=-1"], "learning_rate must be a finite number >= 0, got -1"),
    (None, ["--beta1=1.5"], "beta1 must be in [0, 1), got 1.5"),
    (None, ["--device=tpu"], "unknown device 'tpu' (auto, cpu, cuda, cuda:N or mps)"),
    (None, ["--max_seq_len=4096"], "max_seq_len 4096 is more than the base model's context (96)"),
    (None, ["--lora_rank=100000"], "lora_rank 100000 is more than the smallest side (16)"),
    (None, ["--dim=64", "--n_kv_heads=4"], "a fine-tune keeps its base model's shape: dim 64 (the base's: 32), "
                                           "n_kv_heads 4 (the base's: 2); leave dim and n_kv_heads out"),
    # train's default values, given: as much another shape as any other value
    (None, ["--dim=288", "--n_layers=6"], "a fine-tune keeps its base model's shape: dim 288 (the base's: 32), "
                                          "n_layers 6 (the base's: 2); leave dim and n_layers out"),
    (None, ["--multiple_of=7"], "a fine-tune keeps its base model's shape: multiple_of 7 (the base's hidden width 64 "
                                "is not dim 32's rounded to it); leave multiple_of out"),
    (None, ["--lora_alpha=32"], "lora_alpha is a LoRA setting: give lora_rank too (lora_rank 0 is full fine-tuning)"),
    (None, ["--lora_targets=wq"], "lora_targets is a LoRA setting: give lora_rank too"),
    (None, ["--hf=h"], "base.bin contradicts --hf h, which names the base (hf): give one"),
    (None, ["--meta-llama=m", "--base_format=hf"], "and --base_format=hf contradict --meta-llama m, which names the "
                                                   "base (meta): give one"),
    ([{"prompt": "a", "response": "b"}, "{oops", {"messages": [{"role": "robot", "content": "x"}]}], [],
     "2 malformed lines: line 2: invalid JSON (Expecting property name enclosed in double quotes); line 3: message 0 "
     "has unknown role 'robot'"),
    (["", " "], [], "no records (an empty dataset)"),
    (["{oops", {"prompt": "a"}], ["--skip_bad_lines=true"], "2 malformed lines: line 1: invalid JSON (Expecting "
                                                            "property name enclosed in double quotes); line 2: "),
    ([b'{"prompt": "caf\xe9", "response": "b"}', {"prompt": "a", "response": "b"}], [],
     "1 malformed line: line 1: not UTF-8 text (byte 16 of the line) (fix them, or pass --skip-bad-lines)"),
    ([{"prompt": "a", "response": "b" * 200}], [], "tokens, more than max_seq_len 96 + 1"),
])
def test_finetune_mistakes_are_one_line_errors_before_training(tmp_path, capsys, lines, flags, message):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    if lines is not None:
        (root / "data" / "instruct_train.jsonl").write_bytes(b"".join(
            (x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
            for x in lines))
        (root / "data" / "instruct_val.jsonl").unlink()
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=0).items()] + flags
    assert main(["finetune", *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "step 0" not in captured.out and not (tmp_path / "out" / "ckpt.pt").exists()
    assert not (tmp_path / "out").exists()  # refused before training: nothing left behind


@pytest.mark.parametrize("first, flags, message", [
    (4, ["--lora_rank=8"], "the checkpoint's LoRA rank 4, targets wq,wk,wv,wo,w1,w2,w3 and alpha 16.0 differ from "
                           "this run's (8,"),
    (4, ["--lora_alpha=64"], "and alpha 16.0 differ from this run's (4, wq,wk,wv,wo,w1,w2,w3, 64.0)"),
    (4, ["--lora_rank=0"], "holds a LoRA run of rank 4, and this run asks for full fine-tuning"),
    # the run's own lora_dropout (not a setting of this command) is no reason to name
    ((4, "--lora_dropout=0.1"), ["--lora_rank=0"], "holds a LoRA run of rank 4, and this run asks for full"),
    (0, ["--lora_rank=4"], "holds a full fine-tune, and this run asks for LoRA rank 4"),
])
def test_resume_with_another_lora_setting_says_so(tmp_path, capsys, one_thread, first, flags, message):
    from babyllama.cli import main

    first, *started_with = first if isinstance(first, tuple) else (first,)
    root = make_task(tmp_path / "task")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=first, max_iters=2, eval_interval=2,
                                                eval_iters=1).items()]
    assert main(["finetune", *argv, *started_with]) == 0
    adapter = (tmp_path / "out" / "adapter.json").read_bytes() if first else None
    capsys.readouterr()
    assert main(["finetune", *argv, *flags, "--max_iters=4", "--init_from=resume"]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    if first:  # the run's adapter stays as it was trained
        assert (tmp_path / "out" / "adapter.json").read_bytes() == adapter


@pytest.mark.parametrize("lora_rank, flag, message", [
    # a full fine-tune's checkpoint holds every weight: another base would only be recorded as the run's
    (0, "copy", "cannot resume with another base: this full fine-tune started from {base} (as given then), and its "
                "checkpoint holds every weight (leave --base out)"),
    # a LoRA run's base is known by its weights, whatever its shape (not by shape keys the user never gave)
    (4, "other", "cannot resume: {other} is not the base model this LoRA run started from"),
    (4, "window", "cannot resume with another training window: this fine-tune trains on windows of max_seq_len 96 "
                  "(leave max_seq_len out)"),
    (0, "window", "cannot resume with another training window"),
])
def test_resume_with_another_base_or_window_says_so(tmp_path, capsys, one_thread, lora_rank, flag, message):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=lora_rank, max_iters=2,
                                                eval_interval=2, eval_iters=1).items()]
    assert main(["finetune", *argv]) == 0
    (tmp_path / "copy.bin").write_bytes((root / "base.bin").read_bytes())
    other = tiny_args(dim=64, n_heads=8, n_kv_heads=8, vocab_size=300, max_seq_len=96)
    formats.save(random_weights(other), tmp_path / "other.bin", 1)
    ckpt = (tmp_path / "out" / "ckpt.pt").read_bytes()
    changed = {"copy": f"--base={tmp_path / 'copy.bin'}", "other": f"--base={tmp_path / 'other.bin'}",
               "window": "--max_seq_len=48"}[flag]
    capsys.readouterr()
    assert main(["finetune", *argv, changed, "--max_iters=4", "--init_from=resume"]) == 1
    err = capsys.readouterr().err
    assert message.format(base=root / "base.bin", other=tmp_path / "other.bin") in err, err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == ckpt


@pytest.mark.parametrize("flags", [["--n_kv_heads=0"], ["--multiple_of=32", "--n_heads=4"]])  # hidden 96: dim 32's
def test_shape_keys_that_make_the_bases_shape_are_accepted(tmp_path, flags, one_thread):
    """n_kv_heads 0 (as many as the heads) on a base whose every head has its own keys, and a multiple_of that
    rounds to the base's hidden width, make the base's model."""
    from babyllama.cli import main

    root = tmp_path / "task"
    make_task(root)
    args = replace(ARGS, n_kv_heads=ARGS.n_heads, hidden_dim=96)
    formats.save(random_weights(args, seed=1, scale=0.1), root / "base.bin", 1)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=4, max_iters=1, eval_interval=1,
                                                eval_iters=1).items()]
    assert main(["finetune", *argv, *flags]) == 0


def test_a_full_fine_tune_resumes_from_another_folder_with_its_base_by_another_path(tmp_path, capsys, monkeypatch,
                                                                                    one_thread):
    """The base is recorded as given (relative to where the run started): from another folder, the same file
    named by its absolute path, or through a link, is the run's base, not another."""
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    monkeypatch.chdir(root)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=0, max_iters=2, eval_interval=2,
                                                eval_iters=1, base="base.bin").items()]
    assert main(["finetune", *argv]) == 0
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.bin").symlink_to(root / "base.bin")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for base, iters in ((root / "base.bin", 4), ("link.bin", 6)):
        assert main(["finetune", *argv, f"--base={base}", f"--max_iters={iters}", "--init_from=resume"]) == 0, \
            capsys.readouterr().err


def test_the_suggested_chat_command_runs_the_adapter_with_the_runs_tokenizer(tmp_path, capsys, one_thread):
    """A base whose tokenizer was given (--tokenizer: none beside it, none inside it) needs it named again to
    chat: the line that suggests the chat command names it, quoted."""
    import shlex

    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    (tmp_path / "my tok").mkdir()
    (root / "tokenizer.bin").rename(tmp_path / "my tok" / "tok.bin")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=4, max_iters=1, eval_interval=1,
                                                eval_iters=1, tokenizer=tmp_path / "my tok" / "tok.bin").items()]
    assert main(["finetune", *argv]) == 0
    suggested = capsys.readouterr().out.strip().splitlines()[-1].split("try: ")[1]
    command = shlex.split(suggested)
    assert command[:2] == ["babyllama", "chat"], suggested
    proc = run_cli(*command[1:], "-n", "4", input="Please say bob\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Assistant:" in proc.stdout


def test_resume_from_another_folder_says_where_the_base_is_looked_for(tmp_path, capsys, monkeypatch, one_thread):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    monkeypatch.chdir(root)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", base="base.bin", max_iters=1, eval_interval=1,
                                                eval_iters=1).items()]
    assert main(["finetune", *argv]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    resume = ["finetune", f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=2"]
    assert main(resume) == 1
    err = capsys.readouterr().err
    assert "base model not found: base.bin (the run's, as given when it started; from another folder, or with the " \
           "base moved, pass --base)" in err and len(err.strip().splitlines()) == 1, err
    assert main([*resume, f"--base={root / 'base.bin'}"]) == 0


def test_skip_bad_lines_trains_on_the_rest_with_a_count(tmp_path, capsys):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    with open(root / "data" / "instruct_train.jsonl", "a") as f:
        f.write("not json\n" + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", max_iters=1, eval_iters=1).items()]
    assert main(["finetune", *argv, "--skip-bad-lines"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "2 malformed lines: line 201: invalid JSON" in captured.err
    assert "(224 conversations" in captured.out  # 200 training + 24 held-out; the 2 bad lines skipped
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


def test_data_too_small_to_hold_one_out_leaves_nothing(tmp_path, capsys):
    """One conversation and no validation file is refused before training, and the data this run pretokenized
    goes with it (a new out_dir is not made; an earlier run's folder keeps only its own)."""
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    one = tmp_path / "one"
    one.mkdir()
    (one / "chat.jsonl").write_text((root / "data" / "instruct_train.jsonl").read_text().splitlines()[0] + "\n")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", max_iters=1, eval_iters=1, data=one).items()]
    assert main(["finetune", *argv]) == 1
    assert "1 conversation, too few to hold one out for validation" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_data_dir_made_with_another_word_weight_is_refused(tmp_path, capsys):
    """The mask shards hold the requested words' loss weight: a run asking for another is stopped in one line
    (it would train with the shards' weight and record its own)."""
    from babyllama.cli import main
    from babyllama.train.data import pretokenize

    root = make_task(tmp_path / "task")
    pretokenize(root / "data", root / "tokenizer.bin", tmp_path / "tok", workers=1, word_weight=3)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", max_iters=1, eval_iters=1).items()
            if k != "data"]
    assert main(["finetune", *argv, f"--data_dir={tmp_path / 'tok'}", "--word_weight=5"]) == 1
    err = capsys.readouterr().err
    assert "was pretokenized with word_weight 3, this run asks for 5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    assert main(["finetune", *argv, f"--data_dir={tmp_path / 'tok'}", "--word_weight=3"]) == 0
    # a resumed run keeps its data: the way out is to leave the flag out, not --data
    assert main(["finetune", *argv, f"--data_dir={tmp_path / 'tok'}", "--word_weight=5", "--init_from=resume",
                 "--max_iters=2"]) == 1
    err = capsys.readouterr().err
    assert "a resumed run keeps its data, pretokenized with word_weight 3: leave --word_weight out" in err


def test_a_word_weight_with_nothing_to_weigh_is_refused(tmp_path, capsys):
    """word_weight weighs the reply tokens of requested words: plain text, or chat records that name no word,
    would train as if it were 1."""
    from babyllama.cli import main
    from babyllama.train.data import pretokenize

    root = make_task(tmp_path / "task")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "stories.txt").write_text("tom and ann went out. " * 200)
    pretokenize(tmp_path / "text", root / "tokenizer.bin", tmp_path / "tok", workers=1)
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Please say tom", "response": "tom tom"}] * 4)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", max_iters=1, eval_iters=1).items()
            if k != "data"]
    capsys.readouterr()
    for data, message in ((f"--data_dir={tmp_path / 'tok'}", "holds plain text"),
                          (f"--data={tmp_path / 'text'}", "holds plain text"),
                          (f"--data={tmp_path / 'plain.jsonl'}", "--word-weight 5 weighs nothing in")):
        assert main(["finetune", *argv, data, "--word_weight=5"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    assert main(["finetune", *argv, f"--data={root / 'data'}", "--word_weight=5", "--max_iters=0"]) == 0


def test_a_run_folder_inside_its_data_folder_is_not_read_as_data(tmp_path, capsys, one_thread):
    """--out_dir inside --data: a second run must not read the first's metrics.jsonl and adapter.json as data."""
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    argv = [f"--{k}={v}" for k, v in settings(root, root / "data" / "run", lora_rank=4, max_iters=1, eval_interval=1,
                                                eval_iters=1).items()]
    for _ in range(2):
        assert main(["finetune", *argv]) == 0, capsys.readouterr().err
        assert "(224 conversations" in capsys.readouterr().out
    assert (root / "data" / "run" / "metrics.jsonl").is_file()
    # nor another run's folder there, beside this run's out_dir
    other = [f"--{k}={v}" for k, v in settings(root, root / "data" / "run2", lora_rank=4, max_iters=1,
                                                 eval_interval=1, eval_iters=1).items()]
    assert main(["finetune", *other]) == 0, capsys.readouterr().err
    assert "(224 conversations" in capsys.readouterr().out


def test_a_checkpoint_is_not_fine_tuned_into_its_own_folder(tmp_path, capsys, one_thread):
    """--base=RUN --out_dir=RUN would replace the base's ckpt.pt with the fine-tune's (a LoRA run's holds only
    the adapter of a base then gone)."""
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    full = [f"--{k}={v}" for k, v in settings(root, tmp_path / "full", lora_rank=0, max_iters=1, eval_interval=1,
                                                eval_iters=1).items()]
    assert main(["finetune", *full]) == 0
    saved = (tmp_path / "full" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    for base, out in ((tmp_path / "full", tmp_path / "full"), (tmp_path / "full" / "ckpt.pt", f"{tmp_path}/full/")):
        argv = [f"--{k}={v}" for k, v in settings(root, out, base=base, max_iters=1, eval_iters=1).items()]
        assert main(["finetune", *argv]) == 1
        err = capsys.readouterr().err
        assert f"the base model {base} would be replaced: this run writes its ckpt.pt into out_dir" in err, err
        assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "full" / "ckpt.pt").read_bytes() == saved


def test_a_run_refused_while_setting_up_leaves_no_out_dir(tmp_path, capsys):
    from babyllama.cli import main

    assert main(["train", f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'runs' / 'out'}",
                 "--device=cpu"]) == 1
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--lora_rank=8", "--word_weight=999", "--lora_alpha=-5", "--lora_targets=zz",
                                  "--base_format=bogus", "--tokenizer=/nonexistent", "--skip_bad_lines",
                                  "--lora_dropout=0.5", "--data=x"])
def test_train_refuses_fine_tuning_settings_without_a_base(capsys, flag):
    from babyllama.cli import main

    assert main(["train", flag, "--data_dir=x"]) == 1
    key = flag[2:].split("=")[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"babyllama: error: {key} needs a base model to fine-tune (babyllama finetune --base=MODEL)"]


@pytest.mark.parametrize("alpha", ["inf", "nan", "0"])
def test_lora_alpha_must_be_finite(tmp_path, alpha):
    """lora_alpha = inf (TOML reads it) trained with every loss NaN and wrote an adapter no reader takes."""
    from babyllama.train.config import build_config

    config = tmp_path / "lora.toml"
    config.write_text(f"lora_rank = 2\nlora_alpha = {alpha}\n")
    with pytest.raises(BabyLlamaError, match=r"^lora_alpha must be positive and finite, got "):
        build_config(str(config), {"base": "base.bin", "data": "chat.jsonl"}, defaults=FINETUNE_DEFAULTS)


def test_finetune_min_lr_follows_a_given_learning_rate(tmp_path):
    """Full fine-tuning's usual rates (2e-5) are below finetune's default min_lr (1e-4): given alone, a rate
    decays to a tenth of itself; a min_lr given (file or flag) is kept, and one above the rate is refused."""
    from babyllama.train.config import build_config

    base = {"base": "base.bin", "data": "chat.jsonl"}
    assert build_config(None, base, defaults=FINETUNE_DEFAULTS).min_lr == FINETUNE_DEFAULTS["min_lr"]
    small = build_config(None, {**base, "learning_rate": "2e-5"}, defaults=FINETUNE_DEFAULTS)
    assert small.min_lr == pytest.approx(2e-6)
    config = tmp_path / "ft.toml"
    config.write_text("learning_rate = 3e-3\n")
    assert build_config(str(config), base, defaults=FINETUNE_DEFAULTS).min_lr == pytest.approx(3e-4)
    config.write_text("min_lr = 0.0\n")
    assert build_config(str(config), {**base, "learning_rate": "2e-5"}, defaults=FINETUNE_DEFAULTS).min_lr == 0.0
    with pytest.raises(BabyLlamaError, match=r"^min_lr 0.0001 is above learning_rate 2e-05"):
        build_config(None, {**base, "learning_rate": "2e-5", "min_lr": "1e-4"}, defaults=FINETUNE_DEFAULTS)
    # train's defaults are not fine-tuning's: its min_lr stays 0 whatever the rate
    assert build_config(None, {"learning_rate": "2e-5"}, checked=False).min_lr == 0.0


def test_train_help_offers_no_fine_tuning_setting_and_finetune_help_offers_them(capsys):
    from babyllama.cli import build_parser
    from babyllama.train.config import FINETUNE_KEYS

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        return capsys.readouterr().out

    train, finetune = help_of("train"), help_of("finetune")
    for key in ("base", *FINETUNE_KEYS):
        assert f"--{key} " not in train and f"--{key} " in finetune, key
    assert "--max_iters " in train and "--teacher " in train
    # a learning_rate given moves finetune's min_lr default (build_config): its help says so, train's has none
    assert "(default 0.0001; 0.1 x --learning_rate where that is given)" in " ".join(finetune.split())
    assert "--min_lr FLOAT, --min-lr FLOAT (default 0.0) " in " ".join(train.split())


def test_train_points_a_base_to_finetune(tmp_path, capsys):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    assert main(["train", f"--base={root / 'base.bin'}", f"--data={root / 'data'}",
                 f"--out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "to fine-tune a base model use babyllama finetune --base=MODEL" in err[0]
    assert not (tmp_path / "out").exists()
    # without data too: the base is the mistake to name, not fine-tuning's missing data
    assert main(["train", f"--base={root / 'base.bin'}", f"--out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "to fine-tune a base model use babyllama finetune --base=MODEL" in err[0], err


def test_each_command_points_a_resume_of_the_others_run_to_it(tmp_path, capsys, one_thread):
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    out = tmp_path / "out"
    argv = [f"--{k}={v}" for k, v in settings(root, out, max_iters=2, eval_interval=2, eval_iters=1).items()]
    assert main(["finetune", *argv]) == 0
    capsys.readouterr()
    for extra in ([], [f"--data_dir={root / 'data'}"]):  # another setting given was refused as such instead
        assert main(["train", "--init_from=resume", f"--out_dir={out}", "--max_iters=4", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"babyllama: error: {out} holds a fine-tuning run (base {root / 'base.bin'}): resume it with "
                       f"babyllama finetune --init_from=resume --out_dir={out}"]
    pretrained = tmp_path / "pretrained"
    (pretrained / "ckpt.pt").parent.mkdir()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    from babyllama.train.config import FIELDS, FINETUNE_KEYS

    for key in ("base", *FINETUNE_KEYS):  # a run from random weights, as `train` writes it
        ckpt["config"][key] = FIELDS[key].default
    torch.save(ckpt, pretrained / "ckpt.pt")
    for extra in ([], ["--lora_rank=2"], [f"--base={root / 'base.bin'}"]):  # refused as a full fine-tune before
        assert main(["finetune", "--init_from=resume", f"--out_dir={pretrained}", "--max_iters=4", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"babyllama: error: {pretrained} holds a run trained from random weights: resume it with "
                       f"babyllama train --init_from=resume --out_dir={pretrained}"]


# ------------------------------------------------------------------------------------------------ torchrun


def test_torchrun_lora_two_processes_match_one(tmp_path, one_thread):
    root = make_task(tmp_path / "task")
    same = dict(max_iters=4, eval_interval=100, eval_iters=1, gradient_accumulation_steps=2, batch_size=8)
    train(resolve_config(None, settings(root, tmp_path / "one", **same), defaults=FINETUNE_DEFAULTS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "babyllama",
           "finetune", *[f"--{k}={v}" for k, v in settings(root, tmp_path / "two", **same).items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2: gloo on cpu (DDP)" in proc.stdout
    one, two = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    assert all(np.allclose(one.tensors[k], two.tensors[k], atol=1e-5) for k in one.tensors)


def test_a_data_dir_made_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, capsys):
    """Shards encoded with other pieces (the same vocabulary size) would train the base on mis-encoded text."""
    from babyllama.cli import main
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.data import pretokenize

    root = make_task(tmp_path / "task")
    tok = Tokenizer.load(root / "tokenizer.bin")
    other = Tokenizer(tok.pieces[:259] + list(reversed(tok.pieces[259:271])) + tok.pieces[271:], tok.scores.tolist())
    other.save(tmp_path / "other.bin")
    pretokenize(root / "data", tmp_path / "other.bin", tmp_path / "tok", workers=1)
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", max_iters=1, eval_iters=1).items()
            if k != "data"]
    assert main(["finetune", *argv, f"--data_dir={tmp_path / 'tok'}"]) == 1
    err = capsys.readouterr().err
    assert "was tokenized with another tokenizer than the base model's" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    pretokenize(root / "data", root / "tokenizer.bin", tmp_path / "same", workers=1)
    assert main(["finetune", *argv, f"--data_dir={tmp_path / 'same'}"]) == 0


@pytest.mark.parametrize("word_weight", [1, 3])
def test_gradient_accumulation_keeps_the_loss_the_mean_over_the_global_batchs_reply_tokens(tmp_path, one_thread,
                                                                                         word_weight):
    """batch 4 x 1 micro-batch and batch 2 x 2 micro-batches draw the same conversations: the same mean over
    their reply tokens, so the same loss and update (conversations' replies differ in length)."""
    root = make_task(tmp_path / "task")
    same = dict(lora_rank=0, max_iters=1, eval_interval=100, eval_iters=1, word_weight=word_weight,
                learning_rate="1e-2", warmup_iters=0)
    runs = {}
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}"
        result = train(resolve_config(None, settings(root, out, batch_size=batch, gradient_accumulation_steps=accum,
                                                     **same), defaults=FINETUNE_DEFAULTS))
        runs[batch] = result["loss"], torch.load(out / "ckpt.pt", weights_only=True)["model"]
    (loss4, w4), (loss2, w2) = runs[4], runs[2]
    assert loss2 == pytest.approx(loss4, rel=1e-5)
    # AdamW's first step moves each weight by about lr (1e-2) times the sign of its gradient: a gradient near 0
    # may move by less in one run than in the other from rounding alone
    assert all(torch.allclose(w2[k], w4[k], atol=1e-4) for k in w4)


def test_resume_with_other_data_is_refused(tmp_path, capsys, one_thread):
    """A resumed fine-tune trains on what its first run pretokenized: other --data is refused, not ignored."""
    from babyllama.cli import main

    root = make_task(tmp_path / "task")
    argv = [f"--{k}={v}" for k, v in settings(root, tmp_path / "out", lora_rank=4, max_iters=2, eval_interval=2,
                                                eval_iters=1).items()]
    assert main(["finetune", *argv]) == 0
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "other" / "more.jsonl", [conversation(random.Random(1)) for _ in range(8)])
    capsys.readouterr()
    assert main(["finetune", *argv, f"--data={tmp_path / 'other'}", "--max_iters=4", "--init_from=resume"]) == 1
    err = capsys.readouterr().err
    assert f"cannot resume with other data: this run trains on {root / 'data'}, not {tmp_path / 'other'}" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["finetune", *argv, "--max_iters=4", "--init_from=resume"]) == 0


def test_a_new_run_keeps_the_earlier_runs_data_until_its_own_first_checkpoint(tmp_path, capsys, one_thread):
    """out_dir/data is what a resume of out_dir's checkpoint trains on: a new run (or an evaluation) with other
    --data pretokenizes beside it, and only the new run's first checkpoint moves its data over."""
    from babyllama.cli import main

    root, out = make_task(tmp_path / "task"), tmp_path / "out"
    argv = [f"--{k}={v}" for k, v in settings(root, out, lora_rank=4, max_iters=2, eval_interval=2,
                                                eval_iters=1).items()]
    assert main(["finetune", *argv]) == 0
    (tmp_path / "other").mkdir()
    write_jsonl(tmp_path / "other" / "more.jsonl", [conversation(random.Random(1)) for _ in range(8)])
    conversations = lambda: json.loads((out / "data" / "meta.json").read_text())["conversations"]  # noqa: E731
    first = conversations()
    other = [*argv, f"--data={tmp_path / 'other'}"]

    capsys.readouterr()
    assert main(["finetune", *other, "--eval_only=true"]) == 0
    assert conversations() == first and not (out / "data.pending").exists()
    assert "try:" not in capsys.readouterr().out  # the adapter there is not this run's
    assert main(["finetune", *other, "--max_iters=0"]) == 0  # no step, so no checkpoint: the earlier run stays
    assert conversations() == first and (out / "data.pending").is_dir()
    said = capsys.readouterr().out
    assert "no checkpoint written" in said and "try:" not in said
    assert main(["finetune", *argv, "--max_iters=4", "--init_from=resume"]) == 0
    assert conversations() == first and not (out / "data.pending").exists()  # the stopped run's, no run's now
    assert main(["finetune", *other]) == 0
    assert conversations() == 8 != first
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("data")) == ["data"]


@pytest.mark.parametrize("config, message", [
    ("[]", "adapter config must hold an object, not list"),
    ("null", "adapter config must hold an object, not NoneType"),
    ('{"dropout": "x"}', "field dropout must be a finite number, got 'x'"),
    ('{"dropout": 1.5}', "field dropout must be in [0, 1), got 1.5"),
    ('{"alpha": NaN}', "field alpha must be a positive finite number, got nan"),
    ('{"rank": "4"}', "field rank must be an integer, got '4'"),
    ('{"targets": [["wq"]]}', "lora targets must be some of wq,wk,wv,wo,w1,w2,w3"),
    ('{"targets": "wq"}', "field targets must be a list, got 'wq'"),
    ('{"base": {"args": {}}}', "field sha256 is missing"),
    ("[" * 100000 + "]" * 100000, "invalid JSON"),
], ids=["list", "null", "dropout-text", "dropout-range", "alpha-nan", "rank-text", "targets", "targets-text", "base",
        "deep"])
def test_a_hand_edited_adapter_config_is_one_line(lora_run, tmp_path, capsys, config, message):
    """run/export --lora read adapter.json: what does not hold an adapter's settings is refused in one line."""
    from babyllama.cli import main

    root, _, _ = lora_run
    saved = json.loads((root / "lora" / "adapter.json").read_text())
    text = json.dumps({**saved, **json.loads(config, parse_constant=float)}) if config.startswith("{") else config
    (tmp_path / "adapter.json").write_text(text)
    (tmp_path / "adapter.safetensors").write_bytes((root / "lora" / "adapter.safetensors").read_bytes())
    for argv in (["run", str(root / "base.bin"), "-n", "4"], ["export", str(tmp_path / "m.bin"), "--model",
                                                               str(root / "base.bin")]):
        assert main([*argv, "--lora", str(tmp_path / "adapter.json")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("babyllama: error: ") and message in err[0], err
        assert err[0].count("adapter.json") <= 1, err  # the file named once


def test_throughput_counts_the_tokens_the_chat_batches_hold(tmp_path, one_thread):
    """Chat batches are padded to their longest conversation, not to max_seq_len: tokens/s (and MFU) count the
    input positions the model was given."""
    root = make_task(tmp_path / "task")
    trainer = Trainer(resolve_config(None, settings(root, tmp_path / "out", max_iters=2, eval_interval=100,
                                                    eval_iters=1), defaults=FINETUNE_DEFAULTS))
    given = []
    trainer.raw.tok_embeddings.register_forward_hook(
        lambda module, inputs, _: given.append(inputs[0].numel()) if module.training else None)
    trainer.run()
    steps = [r for r in records(tmp_path / "out") if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2] and len(given) == 2
    for record, tokens in zip(steps, given):
        assert record["tokens_per_s"] * record["dt_ms"] / 1000 == pytest.approx(tokens)
    assert sum(given) < 2 * trainer.tokens_per_iter  # 16 conversations of ~20 tokens, not 16 x 96


def test_an_adapter_without_safetensors_installed_names_the_extra_with_torch_first(tmp_path, monkeypatch):
    """The interop extra holds torch: its hint installs the CPU wheel first (a bare `pip install
    'babyllama[interop]'` would pull a multi-GB CUDA build), and names a checkout's command too."""
    from babyllama.adapter import Adapter, base_identity, save_adapter

    w = random_weights(ARGS, seed=1)
    save_adapter(Adapter(4, 8.0, ["wq"], base_identity(w), {}), tmp_path / "adapter.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # not installed
    with pytest.raises(BabyLlamaError) as e:
        load_adapter(tmp_path)
    assert str(e.value) == ("reading a LoRA adapter (safetensors) needs babyllama's 'interop' extra: pip install "
                            "torch==2.13.0 && pip install 'babyllama[interop]' (in a source checkout: pip install "
                            "torch==2.13.0 && pip install -e '.[interop]')")
