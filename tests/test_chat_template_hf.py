"""The chat template against Meta's Llama 2 format, from outside: Meta's reference `chat_completion` layout
encoded by sentencepiece, and transformers' `apply_chat_template` with the template Meta's Hugging Face
checkpoints (Llama-2-*-chat-hf) publish in their tokenizer_config.json, on Meta's tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file

from babyllama.chat_template import encode_chat
from babyllama.tokenizer import BOS, EOS, Tokenizer

# Llama-2-7b-chat-hf's tokenizer_config.json "chat_template", written out here as the reference
META_HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONS = {
    "one turn": [_msg("user", "Hello there")],
    "system": [_msg("system", "You are kind."), _msg("user", "Hi")],
    "two turns": [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Tell me a story.")],
    "system, three turns": [_msg("system", "Be brief."), _msg("user", "a"), _msg("assistant", "b"),
                            _msg("user", "c"), _msg("assistant", "d"), _msg("user", "e")],
    "four turns": [_msg("user", "1"), _msg("assistant", "one"), _msg("user", "2"), _msg("assistant", "two"),
                   _msg("user", "3"), _msg("assistant", "three"), _msg("user", "4")],
    "padded": [_msg("user", "  hi  "), _msg("assistant", "  yo  "), _msg("user", " x ")],
    "empty system": [_msg("system", ""), _msg("user", "hi")],
    "empty reply": [_msg("user", "hi"), _msg("assistant", ""), _msg("user", "again")],
    "unicode": [_msg("system", "Réponds en français ☃"), _msg("user", "Ça va? 日本語 🙂"),
                _msg("assistant", "Très bien 👍"), _msg("user", "ñ")],
    "newlines": [_msg("user", "line1\nline2\n"), _msg("assistant", "\nok\n"), _msg("user", "\tbye")],
}


def _meta_reference(sp, dialog: list[dict]) -> list[int]:
    """llama/generation.py's chat_completion layout (Meta's llama repo), for a dialog ending with a user turn."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [_msg(dialog[1]["role"], b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"])] + dialog[2:]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += [BOS] + sp.encode(f"{b_inst} {prompt['content'].strip()} {e_inst} {answer['content'].strip()} ") + [EOS]
    return ids + [BOS] + sp.encode(f"{b_inst} {dialog[-1]['content'].strip()} {e_inst}")


@pytest.fixture(scope="module")
def meta_tokenizers(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    model = shared_file("fixtures/llama2-tokenizer.model")
    ours = Tokenizer.load(shared_file("fixtures/llama2-tokenizer.bin"))
    folder = tmp_path_factory.mktemp("meta-tokenizer")
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    # legacy: sentencepiece's own handling of the text after <s>, as Meta's tokenizer.model does it
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": META_HF_TEMPLATE}))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    return ours, spm.SentencePieceProcessor(model_file=str(model)), hf


def _hf_ids(hf, messages: list[dict]) -> list[int]:
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_ids_are_meta_reference_ids(meta_tokenizers, name):
    ours, sp, _ = meta_tokenizers
    messages = CONVERSATIONS[name]
    assert encode_chat(ours, messages)[0] == _meta_reference(sp, messages)


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "padded"])
def test_chat_ids_are_transformers_apply_chat_template_ids(meta_tokenizers, name):
    # "padded" is left to the Meta reference: transformers' tokenizer splits a run of spaces after [INST]
    # differently from sentencepiece, whose ids Meta's models saw
    ours, _, hf = meta_tokenizers
    messages = CONVERSATIONS[name]
    assert encode_chat(ours, messages)[0] == _hf_ids(hf, messages)


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "padded"])
def test_the_babyllama_templates_jinja_gives_its_ids(meta_tokenizers, name):
    """The "babyllama" template (replies end in EOS with no closing space: the built-in chat model's) as
    transformers runs its Jinja, which an export writes to tokenizer_config.json, gives encode_chat's ids."""
    from babyllama.chat_template import TEMPLATES

    ours, _, hf = meta_tokenizers
    messages = CONVERSATIONS[name]
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                 chat_template=TEMPLATES["babyllama"].jinja)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    assert ids == encode_chat(ours, messages, template="babyllama")[0]
    if any(m["role"] == "assistant" for m in messages):
        assert ids != encode_chat(ours, messages)[0]
