"""The built-in chat model (babyllama/assets/chat.bin + chat.json, made by scripts/train_chat.sh): what ships,
that `babyllama chat` uses it when given no model while `run` keeps the story model, and that it follows a
request better than the story model it was made from."""

from __future__ import annotations

import hashlib
import json

from conftest import run_cli, shared_file

from babyllama import formats
from babyllama.loading import ASSETS, BUILTIN_CHAT, BUILTIN_CHAT_CARD, BUILTIN_MODEL

MODEL_BUDGET = 12_000_000  # every model file of the package, the story model's included, in bytes
REQUEST = "Write a story about a cat named Tom that uses the words ball, rain, happy."


def card() -> dict:
    return json.loads(BUILTIN_CHAT_CARD.read_text(encoding="utf-8"))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_model_files_fit_the_budget_and_match_the_chat_card():
    files = [p for p in ASSETS.iterdir() if p.suffix in (".bin", ".json", ".safetensors")]
    assert BUILTIN_CHAT in files and sum(p.stat().st_size for p in files) <= MODEL_BUDGET
    c = card()
    entry = c["files"]["chat.bin"]
    assert entry["bytes"] == BUILTIN_CHAT.stat().st_size and entry["sha256"] == sha256(BUILTIN_CHAT)
    # made from the story model that ships beside it (a retrained base needs scripts/train_chat.sh again)
    assert c["base"]["sha256"] == sha256(BUILTIN_MODEL), "chat.bin was made from another base: rerun " \
                                                         "scripts/train_chat.sh"
    chat, base = formats.load(BUILTIN_CHAT), formats.load(BUILTIN_MODEL)
    assert chat.quantized and chat.args.to_dict() == base.args.to_dict() == {**c["config"]}
    for split in ("words_from_openings", "common_words_from_openings", "words_from_anywhere"):
        scores = c["eval"]["instruct"][split]
        assert scores["chat"]["requests"] == scores["base"]["requests"] == scores["requests"] > 100
        assert scores["chat"]["word_share"] > scores["base"]["word_share"]
    assert c["reproduce"] == "scripts/train_chat.sh"
    assert c["training"]["iters"] == c["training"]["config"]["max_iters"] > 0
    assert c["training"]["config"]["word_weight"] > 1


def test_chat_without_a_model_uses_the_chat_model_and_run_the_story_model():
    flags = ["-t", "0", "-n", "120", "-i", REQUEST]
    default = run_cli("chat", *flags)
    explicit = run_cli("chat", str(BUILTIN_CHAT), *flags)
    story = run_cli("chat", str(BUILTIN_MODEL), *flags)
    assert default.returncode == explicit.returncode == story.returncode == 0, default.stderr.decode()
    assert default.stdout == explicit.stdout != story.stdout
    reply = default.stdout.decode().split("Assistant:", 1)[1]
    assert len(reply.split()) >= 20  # a story, not an echo
    run_default = run_cli("run", "-t", "0", "-n", "40")
    run_story = run_cli("run", str(BUILTIN_MODEL), "-t", "0", "-n", "40")
    assert run_default.returncode == 0 and run_default.stdout == run_story.stdout


def test_the_chat_model_follows_requests_better_than_its_base(tmp_path):
    """Requests about stories the chat model never saw (scripts/train_chat.sh's held-out stories: the same
    seeded split of train-00.txt, rare words from the stories' openings as in its training requests), greedy:
    the chat model mentions the requested topic and uses the requested words far more often than the story
    model, and uses most of them (51 of 66 words on these 24 requests with the shipped model, on AVX2 and
    AVX-512; the card's 85% is over all 227 held-out requests: 60% leaves room for near-ties between CPUs
    while failing a model that does not follow requests)."""
    from babyllama.instruct import make_instructions, write_jsonl
    from babyllama.train.data import read_documents

    data = shared_file("data/tinystories/train-00.txt")
    _, held_out, _, _ = make_instructions(list(read_documents(data)), 300, seed=0, first=4)
    requests = [r for r in held_out if len(r["messages"][1]["content"]) < 700][:24]
    write_jsonl(requests, tmp_path / "requests.jsonl")
    scores = {}
    for name, model in (("chat", BUILTIN_CHAT), ("base", BUILTIN_MODEL)):
        proc = run_cli("eval", str(model), "--instruct", str(tmp_path / "requests.jsonl"), "--json",
                       "--max-new-tokens", "460")
        assert proc.returncode == 0, proc.stderr.decode()
        scores[name] = json.loads(proc.stdout)
    assert scores["chat"]["requests"] == 24
    assert scores["chat"]["topic_hits"] >= scores["base"]["topic_hits"] + 4
    assert scores["chat"]["words_used"] >= scores["base"]["words_used"] + 8
    assert scores["chat"]["words_used"] >= 0.6 * scores["chat"]["words_requested"]
    assert scores["chat"]["finished"] >= scores["base"]["finished"]
