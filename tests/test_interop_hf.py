"""Hugging Face Llama checkpoints in and out: `transformers` builds small random models here (no hub), and
our NumPy engine must give its logits at every position."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import CHATML, ROOT, engine_logits, random_weights, run_cli, tiny_args, torch_checkpoint, torch_logits

from babyllama import formats
from babyllama.cli import main
from babyllama.errors import BabyLlamaError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 32
TOKENS = np.random.default_rng(1).integers(0, 320, SEQ).tolist()


def make_hf_model(n_kv_heads: int, tied: bool, seed: int = 0):
    """A random LlamaForCausalLM with non-default theta/eps, weights scaled up so attention is far from
    uniform (a wrong rotary order would show), and norm gains away from 1 (a swapped norm would show)."""
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def save_as(model, folder, layout: str):
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:  # pytorch_model.bin, as older checkpoints ship (tied ones still carry lm_head.weight); "legacy": in
        model.save_pretrained(folder)  # torch's format before its zip (PyTorch 1.6), which cannot be mapped
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=layout != "legacy")
    return folder


@pytest.mark.parametrize("n_kv_heads, tied, layout", [
    (4, True, "safetensors"),  # multi-head, tied embeddings
    (2, False, "sharded"),  # grouped-query (TinyLlama-style), untied, sharded with an index
    (2, True, "pytorch"),  # pytorch_model.bin
    (2, False, "legacy"),  # pytorch_model.bin of PyTorch before 1.6, which transformers reads too
])
def test_hf_import_matches_transformers(tmp_path, n_kv_heads, tied, layout):
    model = make_hf_model(n_kv_heads, tied)
    folder = save_as(model, tmp_path / "hf", layout)
    source = [str(folder / "model.safetensors.index.json")] if layout == "sharded" else [str(folder)]
    out = tmp_path / "model.bin"
    r = run_cli("export", str(out), "--hf", *source)
    assert r.returncode == 0, r.stderr.decode()
    w = formats.load(out)
    a = w.args
    assert (a.n_heads, a.n_kv_heads, a.shared_classifier, a.max_seq_len) == (4, n_kv_heads, tied, 64)
    assert (a.rope_theta, a.norm_eps) == (500000.0, 1e-6)
    ours, theirs = engine_logits(w, TOKENS), hf_logits(model, TOKENS)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("layout", ["pytorch", "legacy"])
def test_a_pytorch_model_bin_weight_file_runs_as_its_folder_does(tmp_path, layout):
    """A weight file named for the model runs as a model.safetensors does: not taken for a training checkpoint
    (both are torch.save zips), nor, in torch's format before its zip, for a llama2.c .bin."""
    from babyllama.loading import detect_format, open_model

    folder = save_as(make_hf_model(2, True), tmp_path / "hf", layout)
    assert detect_format(folder / "pytorch_model.bin") == "hf"
    by_file, by_folder = (open_model(p).weights for p in (folder / "pytorch_model.bin", folder))
    np.testing.assert_array_equal(engine_logits(by_file, TOKENS), engine_logits(by_folder, TOKENS))




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_pytorch_model_bin_of_tensors_that_require_grad_runs(tmp_path, dtype):
    """llama2.c's export.py --version -1 saves clones of its parameters, which keep requires_grad: they run as
    the same weights saved without it do (NumPy refuses such tensors until they are detached)."""
    from babyllama.loading import open_model

    folder = save_as(make_hf_model(2, True).to(dtype), tmp_path / "hf", "pytorch")
    plain = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.clone().requires_grad_(True) for k, v in plain.items()}, tmp_path / "grad.bin")
    (tmp_path / "grad.bin").replace(folder / "pytorch_model.bin")
    reference = save_as(make_hf_model(2, True).to(dtype), tmp_path / "plain", "pytorch")
    np.testing.assert_array_equal(engine_logits(open_model(folder).weights, TOKENS),
                                  engine_logits(open_model(reference).weights, TOKENS))

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_pytorch_model_bin_of_strided_views_runs(tmp_path, dtype):
    """torch.save keeps a transposed or sliced view's strides: such matrices (the same values, stored column by
    column) run as the contiguous ones do (fp32 ones reached the kernels as strided NumPy views: a traceback)."""
    from babyllama.loading import open_model

    folder = save_as(make_hf_model(2, True).to(dtype), tmp_path / "hf", "pytorch")
    plain = torch.load(folder / "pytorch_model.bin", weights_only=True)
    views = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in plain.items()}
    assert not all(v.is_contiguous() for v in views.values())
    torch.save(views, tmp_path / "views.bin")
    (tmp_path / "views.bin").replace(folder / "pytorch_model.bin")
    reference = save_as(make_hf_model(2, True).to(dtype), tmp_path / "plain", "pytorch")
    np.testing.assert_array_equal(engine_logits(open_model(folder).weights, TOKENS),
                                  engine_logits(open_model(reference).weights, TOKENS))


def test_a_tied_config_over_an_lm_head_of_other_values_runs_untied(tmp_path, capsys):
    """config.json ties the classifier but the checkpoint keeps an lm_head.weight of other values: run untied with
    it, as transformers 5 does (with a warning), and say so; an lm_head.weight equal to the embedding is tied."""
    from safetensors.torch import load_file, save_file

    from babyllama.interop.hf import load_hf

    model = make_hf_model(2, tied=False)
    folder = save_as(model, tmp_path / "hf", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    capsys.readouterr()
    w = load_hf(folder)
    assert "says tie_word_embeddings, but the checkpoint's lm_head.weight differs from model.embed_tokens.weight: " \
           "running it untied" in capsys.readouterr().err
    assert not w.args.shared_classifier
    assert np.abs(engine_logits(w, TOKENS) - hf_logits(model, TOKENS)).max() <= 1e-4

    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors")
    w = load_hf(folder)
    assert w.args.shared_classifier and "note" not in capsys.readouterr().err


@pytest.mark.parametrize("other", ["sharded", "pytorch"])
def test_a_folder_with_two_checkpoints_runs_the_one_transformers_loads(tmp_path, other):
    """A model.safetensors beside another model's shards and index, or its pytorch_model.bin: transformers (4.x and
    5) reads model.safetensors first, and so does babyllama; so also where the index names shards no longer there
    (save_pretrained re-saving a sharded folder unsharded leaves its index)."""
    from babyllama.interop.hf import load_hf

    ours, another = make_hf_model(2, True, seed=0), make_hf_model(2, True, seed=1)
    folder = save_as(another, tmp_path / "hf", other)
    ours.save_pretrained(tmp_path / "ours")
    shutil.copy(tmp_path / "ours" / "model.safetensors", folder)
    expected = hf_logits(ours, TOKENS)
    assert np.abs(hf_logits(transformers.AutoModelForCausalLM.from_pretrained(folder), TOKENS) - expected).max() <= 1e-5
    assert np.abs(engine_logits(load_hf(folder), TOKENS) - expected).max() <= 1e-4
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    assert np.abs(engine_logits(load_hf(folder), TOKENS) - expected).max() <= 1e-4

def test_hf_version0_refuses_non_default_theta(tmp_path):
    folder = save_as(make_hf_model(2, True), tmp_path / "hf", "safetensors")
    r = run_cli("export", str(tmp_path / "m.bin"), "--hf", str(folder), "--version", "0")
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "version 0 files cannot carry rope_theta=500000.0" in lines[0]
    assert not (tmp_path / "m.bin").exists()


def test_hf_max_seq_len_override_and_bf16(tmp_path):
    model = make_hf_model(2, False)
    folder = tmp_path / "hf"
    model.to(torch.bfloat16).save_pretrained(folder)  # real checkpoints are often bfloat16
    assert main(["export", str(tmp_path / "m.bin"), "--hf", str(folder), "--max-seq-len", "48"]) == 0
    w = formats.load(tmp_path / "m.bin")
    assert w.args.max_seq_len == 48
    want = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(w.tok_embeddings, want["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w.w2[1], want["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("layout", ["safetensors", "pytorch"])
def test_a_bf16_hf_checkpoint_runs_in_bf16(tmp_path, layout):
    """A bfloat16 checkpoint (safetensors or pytorch_model.bin) runs with its matrices as they are stored
    (BF16Tensor: half the memory of fp32; the kernels read each weight as the fp32 value it stands for), q/k rows
    permuted back to Meta's order as the fp32 ones are: transformers' logits for the same bfloat16 weights in
    fp32 arithmetic; fp16 ones stay fp16."""
    from babyllama.formats import BF16Tensor
    from babyllama.loading import open_model

    model = make_hf_model(2, False)
    save_as(model.to(torch.bfloat16), tmp_path / "hf", layout)
    got = open_model(tmp_path / "hf").weights
    assert got.kinds() == "bf16" and not got.quantized
    assert all(isinstance(m, BF16Tensor) for m in (got.tok_embeddings, got.wcls, *got.wq, *got.wk, *got.w2))
    assert got.rms_att.dtype == np.float32
    reference = make_hf_model(2, False)  # the bfloat16 weights in an fp32 model (whose RoPE tables stay fp32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ours, theirs = engine_logits(got, TOKENS), hf_logits(reference, TOKENS)
    assert np.abs(ours - theirs).max() <= 1e-4
    save_as(model.to(torch.float16), tmp_path / "hf16", layout)
    assert open_model(tmp_path / "hf16").weights.kinds() == "f16"


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("tied", [True, False])
def test_bin_to_hf_round_trip(tmp_path, sp_model, tied):
    args = tiny_args(vocab_size=320, rope_theta=250000.0, norm_eps=1e-6, shared_classifier=tied)
    w = random_weights(args, seed=3, scale=0.2)
    formats.save(w, tmp_path / "m.bin", version=1)
    out = tmp_path / "hf"
    r = run_cli("export", str(out), "--to", "hf", "--model", str(tmp_path / "m.bin"), "--tokenizer", str(sp_model))
    assert r.returncode == 0, r.stderr.decode()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings == tied
    assert np.abs(hf_logits(model, TOKENS) - engine_logits(w, TOKENS)).max() <= 1e-4

    from babyllama.tokenizer import Tokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_sentencepiece(sp_model)
    # (transformers' own tokenizer differs from sentencepiece on runs of spaces and on "<s>" typed as text)
    for text in ["the cat sat on the mat.", "Zürich, 42 dogs!", "a big\nred tree"]:
        assert hf_tok(text)["input_ids"] == ours.encode(text, bos=True)

    # and back in: the Hugging Face directory imports to the same model
    assert main(["export", str(tmp_path / "back.bin"), "--hf", str(out)]) == 0
    back = formats.load(tmp_path / "back.bin")
    assert back.args == w.args
    np.testing.assert_array_equal(back.wq, w.wq)
    np.testing.assert_array_equal(back.wk, w.wk)
    assert (tmp_path / "tokenizer.bin").is_file()  # the directory's tokenizer.model came along


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_hf_export_in_16_bits(tmp_path, dtype):
    """`export --to hf --dtype f16|bf16`: every tensor (norms too, as Hugging Face checkpoints hold them) the fp32
    export's rounded as PyTorch rounds, config.json naming the type; transformers runs it (in fp32 arithmetic)
    as our engine runs the folder read back, its matrices kept in that type."""
    from safetensors.torch import load_file

    from babyllama.loading import open_model

    w = random_weights(tiny_args(vocab_size=320, rope_theta=250000.0, norm_eps=1e-6), seed=3, scale=0.2)
    formats.save(w, tmp_path / "m.bin")
    for folder, extra in (("hf32", ()), ("hf16", ("--dtype", dtype))):
        r = run_cli("export", str(tmp_path / folder), "--to", "hf", "--model", str(tmp_path / "m.bin"), *extra)
        assert r.returncode == 0, r.stderr.decode()
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    config = json.loads((tmp_path / "hf16" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == str(torch_dtype).removeprefix("torch.")
    fp32, half = (load_file(tmp_path / folder / "model.safetensors") for folder in ("hf32", "hf16"))
    assert fp32.keys() == half.keys()
    for name, t in fp32.items():
        assert half[name].dtype == torch_dtype and torch.equal(half[name], t.to(torch_dtype)), name
    ours = open_model(tmp_path / "hf16").weights
    assert ours.kinds() == dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", torch_dtype=torch.float32).eval()
    assert np.abs(hf_logits(model, TOKENS) - engine_logits(ours, TOKENS)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_model_safetensors_has_the_bytes_of_the_packages_own_writer(tmp_path, dtype):
    """model.safetensors, written a tensor at a time, is byte for byte what safetensors' save_file writes from
    the whole state dict at once (bfloat16 through its PyTorch writer): Hugging Face's names, its rotary row
    order, rounded as NumPy and PyTorch round."""
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    from babyllama.interop.hf import hf_name, interleaved_to_halves, save_hf
    from babyllama.interop.state_dict import to_state_dict

    args = tiny_args(vocab_size=320, n_heads=4, n_kv_heads=2)
    w = random_weights(args, seed=8, scale=0.2).quantize()  # Q8_0: every tensor dequantized on its turn
    save_hf(w, tmp_path / "hf", dtype=dtype)
    ref = {}
    for name, t in to_state_dict(w).items():
        heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads if name.endswith("wk.weight") else 0
        ref[hf_name(name)] = interleaved_to_halves(t, heads) if heads else t
    if dtype == "bf16":
        save_torch({k: torch.from_numpy(t).to(torch.bfloat16) for k, t in ref.items()}, tmp_path / "ref",
                   metadata={"format": "pt"})
    else:
        save_file({k: t.astype(np.float16 if dtype == "f16" else np.float32) for k, t in ref.items()},
                  tmp_path / "ref", metadata={"format": "pt"})
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "ref").read_bytes()


def test_checkpoint_to_hf_same_logits(tmp_path, sp_model):
    """Our training checkpoint -> Hugging Face directory -> transformers: the same logits as our model."""
    args = tiny_args(vocab_size=320, rope_theta=20000.0, shared_classifier=True)
    model = torch_checkpoint(tmp_path / "ckpt.pt", args, seed=9)
    r = run_cli("export", str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "ckpt.pt"), "--tokenizer", str(sp_model))
    assert r.returncode == 0, r.stderr.decode()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(hf_logits(hf, TOKENS) - torch_logits(model, TOKENS)).max() <= 1e-4


def test_llama2_tokenizer_goes_to_hf(tmp_path):
    from conftest import shared_file

    sp = shared_file("fixtures/llama2-tokenizer.model")
    w = random_weights(tiny_args(vocab_size=32000, n_layers=1), seed=4)
    formats.save(w, tmp_path / "m.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin"), "--tokenizer", str(sp)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp))
    text = "Once upon a time, a little dog named Élodie said: hello!"
    assert tok(text)["input_ids"] == [1] + ref.encode(text)


def test_an_exported_tokenizers_chat_template_gives_babyllamas_chat_ids(tmp_path):
    from conftest import shared_file

    from babyllama.chat_template import encode_chat
    from babyllama.tokenizer import Tokenizer

    sp = shared_file("fixtures/llama2-tokenizer.model")
    ours = Tokenizer.load(shared_file("fixtures/llama2-tokenizer.bin"))
    w = random_weights(tiny_args(vocab_size=32000, n_layers=1), seed=4)
    formats.save(w, tmp_path / "m.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin"), "--tokenizer", str(sp)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! Élodie here."}, {"role": "user", "content": "A story?"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert list(ids) == encode_chat(ours, messages)[0]


def test_a_hf_folder_with_its_own_chat_template_is_noted_on_load(tmp_path):
    from babyllama.chat_template import get_template
    from babyllama.interop.hf import save_hf
    from babyllama.loading import open_model

    save_hf(random_weights(tiny_args(), seed=1), tmp_path)
    assert "chat_template" not in open_model(tmp_path).describe()  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": get_template().jinja}))
    assert "chat_template" not in open_model(tmp_path).describe()  # Llama 2's: what chat and serve render
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert "has its own chat_template, which babyllama does not run" in open_model(tmp_path).describe()
    for value in (5, [{"name": "tool_use", "template": CHATML}]):  # no template: not said to be one
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
        described = open_model(tmp_path).describe()
        assert "does not run" not in described
        assert f"has a chat_template that is no template ({type(value).__name__}): ignored" in described
    for torn in ('{"chat_template": "{% for', "[1, 2]"):  # a template it may hold is not silently dropped
        (tmp_path / "tokenizer_config.json").write_text(torn)
        described = open_model(tmp_path).describe()
        assert "tokenizer_config.json" in described and "its chat_template, if it has one, is not used" in described


def test_transformers_5s_chat_template_jinja_is_read_kept_and_not_left_stale(tmp_path, tok512, capsys):
    """transformers 5 saves a tokenizer's chat template as chat_template.jinja and reads it before
    tokenizer_config.json's: it is the folder's template on load (noted) and on export (kept: Llama 2's was
    written instead), and a folder holding one is no export target (transformers would run it, not ours)."""
    from babyllama.loading import hf_chat_template, open_model

    w = random_weights(tiny_args(vocab_size=512), seed=2)
    formats.save(w, tmp_path / "m.bin")
    shutil.copyfile(tok512, tmp_path / "tokenizer.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin")]) == 0
    (tmp_path / "hf" / "chat_template.jinja").write_text(CHATML)
    assert hf_chat_template(tmp_path / "hf")[0] == CHATML
    assert "its chat_template.jinja has its own chat_template" in open_model(tmp_path / "hf").describe()
    assert main(["export", str(tmp_path / "out"), "--hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    capsys.readouterr()
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin")]) == 1
    assert "already holds another checkpoint (chat_template.jinja)" in capsys.readouterr().err


def test_a_bin_export_says_it_leaves_out_a_template_babyllama_does_not_know(tmp_path, tok512, capsys):
    """A ChatML template went nowhere in a .bin export without a word (a Hugging Face folder made from that .bin
    then carried Llama 2's); a known one goes into the card, as before."""
    w = random_weights(tiny_args(vocab_size=512), seed=2)
    formats.save(w, tmp_path / "m.bin")
    shutil.copyfile(tok512, tmp_path / "tokenizer.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin")]) == 0
    config = tmp_path / "hf" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHATML}))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out" / "m.bin"), "--hf", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "carries a chat template babyllama does not know, which a .bin and its card cannot hold" in err
    assert not (tmp_path / "out" / "m.json").exists()


def test_an_export_keeps_the_chat_template_its_source_carries(tmp_path, tok512):
    """A Hugging Face folder's template goes into its GGUF export as it is, a known one (Llama 2's, babyllama's)
    or not (ChatML: babyllama runs no Jinja, but llama.cpp does), and comes back from the file by its name."""
    from babyllama import api
    from babyllama.chat_template import TEMPLATES
    from babyllama.interop.gguf import read_gguf

    w = random_weights(tiny_args(vocab_size=512), seed=2)
    formats.save(w, tmp_path / "m.bin")
    shutil.copyfile(tok512, tmp_path / "tokenizer.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin")]) == 0
    config = tmp_path / "hf" / "tokenizer_config.json"
    for jinja, name in ((CHATML, None), (TEMPLATES["babyllama"].jinja, "babyllama")):
        config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": jinja}))
        assert api.load(str(tmp_path / "hf")).chat_template == name
        for given in ("hf", "hf/model.safetensors"):  # the folder, or its weight files
            assert main(["export", str(tmp_path / "m.gguf"), "--hf", str(tmp_path / given)]) == 0
            assert read_gguf(tmp_path / "m.gguf")[0]["tokenizer.chat_template"] == jinja
            assert api.load(str(tmp_path / "m.gguf")).chat_template == name
    # newer transformers' list of named templates: "default" is the template
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": [
        {"name": "tool_use", "template": CHATML}, {"name": "default", "template": TEMPLATES["babyllama"].jinja}]}))
    assert api.load(str(tmp_path / "hf")).chat_template == "babyllama"
    assert main(["export", str(tmp_path / "m.gguf"), "--hf", str(tmp_path / "hf")]) == 0
    assert read_gguf(tmp_path / "m.gguf")[0]["tokenizer.chat_template"] == TEMPLATES["babyllama"].jinja


SENTENCEPIECE_AFTER_TRANSFORMERS = """
import sys
import sentencepiece as spm
import transformers.utils.sentencepiece_model_pb2_new  # what transformers imports to convert a Llama tokenizer
sys.path.insert(0, "tests")
from conftest import byte_tokenizer
from babyllama.interop.vocab import from_tokenizer
sp = spm.SentencePieceProcessor(model_proto=from_tokenizer(byte_tokenizer(320)).to_sentencepiece())
print(sp.vocab_size(), sp.id_to_piece(3 + 0x41))
"""


def test_an_old_sentencepiece_protobuf_module_is_one_line(monkeypatch):
    """sentencepiece < 0.2's module was generated for protobuf 3 and raises TypeError under protobuf >= 4 (which the
    train extra alone does not rule out): writing tokenizer.model says what to install, no traceback."""
    import builtins

    from babyllama.errors import BabyLlamaError
    from babyllama.interop import vocab

    real_import = builtins.__import__

    def old_pb2(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "sentencepiece" and fromlist and "sentencepiece_model_pb2" in fromlist:
            raise TypeError("Descriptors cannot be created directly. If this call came from a _pb2.py file, ...")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", old_pb2)
    monkeypatch.setattr(vocab, "_registered_sentencepiece_proto", lambda: None)  # no other copy loaded either
    with pytest.raises(BabyLlamaError, match=r"^writing a sentencepiece tokenizer.model: sentencepiece's protobuf "
                                             r"module does not load \(Descriptors cannot be created directly\); "
                                             r"install sentencepiece>=0.2 \(the interop extra\)$"):
        vocab._sentencepiece_proto()


def test_a_tokenizer_model_is_written_after_transformers_registered_its_copy_of_the_proto():
    """transformers carries its own sentencepiece_model.proto, and protobuf registers one file of a name per
    process: a program that converted a Llama tokenizer with transformers, then exports to Hugging Face, still
    writes tokenizer.model."""
    r = subprocess.run([sys.executable, "-c", SENTENCEPIECE_AFTER_TRANSFORMERS], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["320", "<0x41>"]


def test_a_trained_models_tokenizer_bin_goes_to_hf_as_tokenizer_model(tmp_path):
    """stories260K with its tokenizer.bin beside it (no .model anywhere): the folder's tokenizer.model, written
    from the vocabulary, makes transformers encode TinyStories as babyllama (run.c's encoder) does."""
    from conftest import shared_file

    from babyllama.tokenizer import Tokenizer

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(shared_file("fixtures/stories260K.bin"), src / "m.bin")
    shutil.copyfile(shared_file("fixtures/tok512.bin"), src / "tokenizer.bin")
    assert main(["export", str(tmp_path / "hf"), "--model", str(src / "m.bin")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.load(src / "tokenizer.bin")
    lines = [line for line in shared_file("data/tinystories/valid.txt").read_text().splitlines() if line][:300]
    for text in lines + ["Once upon a time, Élodie saw 123 cats! 🐈"]:
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), text


# ------------------------------------------------------------------------------------------- bad input


def _error(capsys, *argv) -> str:
    assert main(["export", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("babyllama: error: ")
    return err[0]


def _config_dir(tmp_path, **config) -> str:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _tiny_bin(tmp_path):
    formats.save(random_weights(tiny_args(vocab_size=320)), tmp_path / "tiny.bin")
    return tmp_path / "tiny.bin"


def test_hf_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "m.bin")
    assert "Hugging Face model not found: " in _error(capsys, out, "--hf", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model.safetensors or pytorch_model.bin" in _error(capsys, out, "--hf", str(empty))
    mistral = _config_dir(tmp_path, model_type="mistral", architectures=["MistralForCausalLM"])
    assert "unsupported architecture 'mistral'" in _error(capsys, out, "--hf", mistral)
    gpt2 = _config_dir(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32)
    assert "unsupported architecture 'gpt2'" in _error(capsys, out, "--hf", gpt2)

    folder = save_as(make_hf_model(2, True), tmp_path / "hf", "safetensors")
    capsys.readouterr()  # transformers' progress bars
    config = json.loads((folder / "config.json").read_text())
    assert "field hidden_size is missing" in _error(
        capsys, out, "--hf", _config_dir(tmp_path, **{k: v for k, v in config.items() if k != "hidden_size"}))
    scaled = dict(config, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    (folder / "config.json").write_text(json.dumps(scaled))
    assert "rope scaling 'llama3' is not supported" in _error(capsys, out, "--hf", str(folder))
    (folder / "config.json").write_text(json.dumps(dict(config, rope_scaling={"type": "linear", "factor": 2.0})))
    assert "rope scaling 'linear' is not supported" in _error(capsys, out, "--hf", str(folder))
    (folder / "config.json").write_text(json.dumps(dict(config, rope_scaling={"type": "linear", "factor": 1.0})))
    assert main(["export", out, "--hf", str(folder)]) == 0  # positions divided by 1: plain RoPE
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["export", str(tmp_path / "plain.bin"), "--hf", str(folder)]) == 0
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    capsys.readouterr()
    (folder / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    msg = _error(capsys, out, "--hf", str(folder))
    assert "model.layers.0.mlp.gate_proj.weight has shape (80, 32), the config implies (96, 32)" in msg
    (folder / "config.json").unlink()
    assert "config.json: missing" in _error(capsys, out, "--hf", str(folder / "model.safetensors"))

    shutil.copytree(folder, tmp_path / "hf2")
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(config))
    assert "--dtype f16 does not apply to .bin output: versions 0 and 1 hold fp32" in _error(
        capsys, out, "--hf", str(tmp_path / "hf2"), "--dtype", "fp16")
    assert "--dtype f32 does not apply to .bin output" in _error(
        capsys, out, "--hf", str(tmp_path / "hf2"), "--dtype", "fp32", "--version", "2")
    # llama2.c's export.py command lines carry --dtype fp32 (its default, which its .bin output never reads)
    for source in (["--hf", str(tmp_path / "hf2")], ["--hf", str(tmp_path / "hf2"), "--version", "1"],
                   ["--model", str(_tiny_bin(tmp_path)), "--version", "0"]):  # (hf2's rope_theta is not version 0's)
        assert main(["export", str(tmp_path / "plain.bin"), *source]) == 0
        assert main(["export", str(tmp_path / "said.bin"), *source, "--dtype", "fp32"]) == 0
        assert (tmp_path / "said.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes(), source
    capsys.readouterr()
    assert "--dtype q8_0 applies to GGUF output; Hugging Face output takes f32, f16 or bf16" in _error(
        capsys, str(tmp_path / "hf3"), "--to", "hf", "--hf", str(tmp_path / "hf2"), "--dtype", "q8_0")
    (tmp_path / "hf2" / "pytorch_model.bin").write_bytes(b"")
    assert "already holds another checkpoint (pytorch_model.bin)" in _error(
        capsys, str(tmp_path / "hf2"), "--to", "hf", "--model", str(_tiny_bin(tmp_path)))
    (tmp_path / "hf4").mkdir()  # another model's fast tokenizer, which transformers would load instead of ours
    (tmp_path / "hf4" / "tokenizer.json").write_text("{}")
    assert "already holds another checkpoint (tokenizer.json)" in _error(
        capsys, str(tmp_path / "hf4"), "--to", "hf", "--model", str(_tiny_bin(tmp_path)))
    assert "--version applies to .bin output" in _error(capsys, str(tmp_path / "d"), "--to", "hf", "--hf",
                                                         str(tmp_path / "hf2"), "--version", "2")


def test_a_safetensors_file_cut_short_after_it_was_opened_is_one_line(tmp_path, monkeypatch):
    """safetensors checks a file's size when it opens it; the tensors are read later, one at a time: a file cut
    short in between (rewritten in place) is one line, not a NumPy reshape ValueError."""
    from babyllama.interop import hf

    hf.save_hf(random_weights(tiny_args()), tmp_path / "hf")
    shard = tmp_path / "hf" / "model.safetensors"
    real_header = hf._safetensors_header

    def header_then_cut(path):
        found = real_header(path)
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 1000)
        return found

    monkeypatch.setattr(hf, "_safetensors_header", header_then_cut)
    with pytest.raises(BabyLlamaError, match="the file changed while it was read"):
        hf.load_hf(tmp_path / "hf")


def test_an_architecture_refusal_names_what_is_not_llama():
    """A config without model_type says that it is missing (not that LlamaForCausalLM is unsupported); one whose
    architectures list a class besides LlamaForCausalLM names that class (not the model type 'llama')."""
    from babyllama.errors import BabyLlamaError
    from babyllama.interop.hf import args_from_config, config_from_args

    config = config_from_args(tiny_args())
    del config["model_type"]
    with pytest.raises(BabyLlamaError) as e:
        args_from_config(config)
    assert str(e.value) == ("config.json: field model_type is missing (a Llama config says 'llama'; only Llama models "
                            "can be converted)")
    config = config_from_args(tiny_args())
    config["architectures"] = ["LlamaForCausalLM", "LlavaForConditionalGeneration"]
    with pytest.raises(BabyLlamaError, match="unsupported architecture 'LlavaForConditionalGeneration' "):
        args_from_config(config)
    config["model_type"] = "mistral"
    with pytest.raises(BabyLlamaError, match="unsupported architecture 'mistral' "):
        args_from_config(config)
    assert args_from_config(config_from_args(tiny_args())) == tiny_args()


def test_hidden_act_swish_is_silu_and_others_are_refused():
    """transformers' ACT2FN maps "swish" to the same nn.SiLU as "silu": such a config was refused as another
    activation; gelu is one."""
    from babyllama.errors import BabyLlamaError
    from babyllama.interop.hf import args_from_config, config_from_args

    config = config_from_args(tiny_args())
    config["hidden_act"] = "swish"
    assert args_from_config(config) == tiny_args()
    config["hidden_act"] = "gelu"
    with pytest.raises(BabyLlamaError, match="hidden_act 'gelu' is not supported"):
        args_from_config(config)
    torch = pytest.importorskip("torch")
    activations = pytest.importorskip("transformers.activations")
    x = torch.linspace(-8, 8, 101)
    assert torch.equal(activations.ACT2FN["swish"](x), activations.ACT2FN["silu"](x))


def test_rope_parameters_theta_wins_over_a_disagreeing_top_level_one():
    """transformers 5 reads rope_parameters; a config whose two thetas disagree runs as it runs it."""
    from babyllama.interop.hf import args_from_config, config_from_args

    config = config_from_args(tiny_args())
    config.update(rope_theta=20000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert args_from_config(config).rope_theta == 10000.0
    del config["rope_parameters"]
    assert args_from_config(config).rope_theta == 20000.0
    # rope_scaling is transformers 5's other name for rope_parameters: its theta wins over the top level's too
    config["rope_scaling"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert args_from_config(config).rope_theta == 10000.0
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert transformers.LlamaConfig(**config).rope_parameters["rope_theta"] == 10000.0


def test_a_tensor_in_two_weight_files_is_refused(tmp_path):
    """The same tensor in two weight files (a folder read as all its *.safetensors, or files named) is refused,
    naming both: the last one read silently replaced the first."""
    from safetensors.numpy import save_file

    from babyllama.interop.hf import _tensor_index

    a = np.ones((2, 2), dtype=np.float32)
    save_file({"lm_head.weight": a, "model.norm.weight": a[0]}, str(tmp_path / "a.safetensors"))
    save_file({"lm_head.weight": 2 * a}, str(tmp_path / "b.safetensors"))
    with pytest.raises(BabyLlamaError, match=r"b.safetensors: tensor lm_head.weight is in .*a.safetensors too"):
        _tensor_index([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert set(_tensor_index([tmp_path / "a.safetensors"])) == {"lm_head.weight", "model.norm.weight"}


def test_a_config_without_rms_norm_eps_runs_with_transformers_default():
    """transformers runs a Llama config.json without rms_norm_eps with LlamaConfig's default, 1e-6 (not Llama 2's
    1e-5, which is the default of llama2.c's .bin files)."""
    from babyllama.interop.hf import args_from_config, config_from_args

    config = config_from_args(tiny_args(norm_eps=1e-5))
    del config["rms_norm_eps"]
    assert args_from_config(config).norm_eps == 1e-6
    transformers = pytest.importorskip("transformers")
    assert transformers.LlamaConfig(**config).rms_norm_eps == 1e-6


@pytest.mark.parametrize("name, settings, said", [
    ("generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 7]},
     "generation_config.json eos_token_id [2, 7]"),
    ("generation_config.json", {"eos_token_id": 7}, "generation_config.json eos_token_id 7"),
    ("config.json", {"eos_token_id": [2, 7]}, "config.json eos_token_id [2, 7]"),
    ("config.json", {"bos_token_id": 0}, "config.json bos_token_id 0"),
    ("tokenizer_config.json", {"add_bos_token": False}, "tokenizer_config.json add_bos_token false"),
    ("tokenizer_config.json", {"add_eos_token": True}, "tokenizer_config.json add_eos_token true"),
])
def test_a_folder_whose_special_tokens_differ_from_llama2cs_is_refused(tmp_path, name, settings, said):
    """transformers ends generation at any of a folder's EOS ids (a Llama 3 style list, or another id) and adds
    BOS only where its tokenizer says so; babyllama ran such a folder with llama2.c's convention without a word
    (a story past the "." that ends transformers' reply). Refused in one line, as a GGUF file's are; the ids and
    flags babyllama's own export writes load."""
    from babyllama.interop.hf import load_hf, save_hf

    save_hf(random_weights(tiny_args(), seed=1), tmp_path)
    load_hf(tmp_path)  # config.json and generation_config.json as written: llama2.c's ids
    path = tmp_path / name
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **settings}))
    with pytest.raises(BabyLlamaError, match=re.escape(f"{tmp_path}: {said}: not supported, babyllama runs "
                                                       "llama2.c's convention")):
        load_hf(tmp_path)
