"""Chat templates: a conversation (system, user and assistant messages) as the token ids a model sees.

Llama 2's template, as run.c's chat mode and Meta's reference code lay it out: every user turn is its own
BOS-started segment, the system prompt rides inside the first one, and every assistant reply ends with EOS:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {reply 1} </s>
    <s>[INST] {user 2} [/INST] {reply 2} </s>

A reply ends with a space before EOS (a "▁" token), as Meta's `chat_completion` and the chat_template of Meta's
Hugging Face checkpoints write it, so a conversation is the ids those give (tests/test_chat_template_hf.py).
The "babyllama" template is the same layout without that space, the one the built-in chat model was tuned on;
a model card's chat_template names the template a model takes (`chat` and the server read it), else the
template a GGUF file or a Hugging Face folder carries where it is one of these (`named_template`).
Each part is encoded on its own (the user turn with BOS, the reply as the continuation after `[/INST]`), which
is exactly what the model sees when it generates: `chat`, the server and fine-tuning all go through
`encode_chat`, so a model is trained on the token boundaries it later runs with. The mask marks the tokens a
fine-tune learns from: the replies, their closing space and their EOS.

Whitespace around a message is stripped, as Meta's reference recommends and does, with two deliberate
differences at the edges: run.c feeds a chat line as typed (so `run -m chat -i "  hi "` differs from run.c,
whose layout is otherwise the same), and Meta strips the system block and the first user text joined, so with
a system prompt a user text's leading whitespace survives there, and an empty one drops the "\\n\\n" after
<</SYS>>; here each user text is stripped on its own, which keeps `chat`'s empty turn run.c's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import BabyLlamaError
from .tokenizer import EOS, Tokenizer

ROLES = ("system", "user", "assistant")
DEVELOPER = "developer"  # newer OpenAI clients send the system prompt under this role: the system message


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    turn: Callable[[str, str | None], str]  # (user text, system prompt or None) -> the turn's text
    jinja: str  # the same template for transformers' apply_chat_template (tokenizer_config.json's chat_template)
    reply_end: str = " "  # what a reply's text ends with before its EOS


def _llama2_turn(user: str, system: str | None = None) -> str:
    # an empty system message still gets its <<SYS>> block, as in Meta's chat_completion; `chat` (like run.c)
    # passes no system message at all when its system prompt is empty
    if system is not None:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


# the chat_template of Meta's Llama-2-*-chat-hf tokenizer_config.json: on Meta's tokenizer it gives encode_chat's ids
_LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Llama 2's layout with each reply ending in EOS right after its text (no closing space): the template the built-in
# chat model was fine-tuned on (its card, chat.json, names it), so that `chat` and the server give it the ids it
# learned from (an empty reply is EOS alone)
_TIGHT_JINJA = _LLAMA2_JINJA.replace("{{ ' ' + content.strip() + ' ' + eos_token }}",
                                     "{% if content.strip() %}{{ ' ' + content.strip() }}{% endif %}{{ eos_token }}")

TEMPLATES = {"llama2": ChatTemplate("llama2", _llama2_turn, _LLAMA2_JINJA),
             "babyllama": ChatTemplate("babyllama", _llama2_turn, _TIGHT_JINJA, reply_end="")}
DEFAULT_TEMPLATE = "llama2"


def get_template(name: str | None = None) -> ChatTemplate:
    try:
        return TEMPLATES[name or DEFAULT_TEMPLATE]
    except KeyError:
        raise BabyLlamaError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})") from None


def named_template(jinja: object) -> str | None:
    """The name of the known template (TEMPLATES) whose Jinja `jinja` is, whitespace aside; None for any other
    (or none). Meta's Llama-2-chat checkpoints and their llama.cpp conversions carry Llama 2's; babyllama's
    exports carry the template their model takes (the built-in chat model's: babyllama)."""
    if not isinstance(jinja, str):
        return None
    words = jinja.split()
    return next((name for name, tpl in TEMPLATES.items() if tpl.jinja.split() == words), None)


def foreign_template_note(jinja: object, where: str) -> list[str]:
    """A note when a model carries a chat template that is none of the known ones (a ChatML or Zephyr one, say):
    babyllama runs no Jinja, so chat and the server still lay a conversation out as Llama 2's [INST] template,
    which such a model was not tuned on. `where`: what holds it (a tokenizer_config.json, a GGUF file)."""
    if jinja is None or named_template(jinja) is not None:
        return []
    if not isinstance(jinja, str):  # a number, or a list without a "default" template: no template at all
        # a JSON value by its type; a GGUF array that was not read says what it is ("an array of 3 values")
        shown = type(jinja).__name__ if isinstance(jinja, (int, float, list, dict)) else repr(jinja)
        return [f"{where} has a chat_template that is no template ({shown}): ignored"]
    return [f"{where} has its own chat_template, which babyllama does not run: chat and serve use Llama 2's "
            "[INST] template unless --chat-template or a model card names another"]


def reply_closing(tokenizer: Tokenizer, template: str | None = None) -> list[int]:
    """The ids the template's closing text (`reply_end`) adds after a reply's last word, before its EOS (Llama 2's
    "▁"; none for babyllama's), as `encode_chat` writes a reply: what `chat` gives a reply it cut short or that
    ended at BOS, so that its history is the server's, which renders it from the reply's text."""
    end = get_template(template).reply_end
    if not end:
        return []
    word = tokenizer.encode(".", bos=False)  # a word to close; a space piece never merges into it
    return tokenizer.encode("." + end, bos=False)[len(word):]


def check_messages(messages: Sequence, generation: bool = True) -> list[tuple[str, str]]:
    """The conversation as (role, content) pairs, checked: an optional system message first, then user and
    assistant turns alternating from a user turn; for generation it ends with a user turn, for training
    with an assistant turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise BabyLlamaError("messages must be a non-empty list of {role, content} objects")
    pairs, given = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BabyLlamaError(f"message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES and role != DEVELOPER:
            raise BabyLlamaError(f"message {i} has unknown role {role!r} (system, user or assistant)")
        if not isinstance(content, str):
            raise BabyLlamaError(f"message {i} ({role}) needs its content as a string")
        pairs.append(("system" if role == DEVELOPER else role, content))
        given.append(role)
    first = 1 if pairs[0][0] == "system" else 0
    body = pairs[first:]
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise BabyLlamaError(f"messages must alternate user and assistant turns after an optional system "
                                 f"message; message {first + i} is {given[first + i]} where {expected} belongs")
    last = "user" if generation else "assistant"
    if not body or body[-1][0] != last:
        raise BabyLlamaError(f"the conversation must end with {'a user' if generation else 'an assistant'} message")
    return pairs


def encode_chat(tokenizer: Tokenizer, messages: Sequence, generation: bool = True,
                template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask of the same length: 1 on the assistant replies' tokens and
    their EOS, 0 elsewhere. With `generation`, the conversation ends with a user turn and the ids end where
    the model's reply begins; otherwise it ends with an assistant reply (a training example)."""
    tpl = get_template(template)
    pairs = check_messages(messages, generation)
    system = pairs[0][1] if pairs[0][0] == "system" else None
    ids: list[int] = []
    mask: list[int] = []
    first = True
    for role, content in pairs:
        if role == "user":
            turn = tokenizer.encode(tpl.turn(content.strip(), system if first else None), bos=True)
            first = False
            ids += turn
            mask += [0] * len(turn)
        elif role == "assistant":
            # Meta's reference ends a reply with a space before EOS: the model learns to close with that "▁"
            reply = tokenizer.encode(content.strip() + tpl.reply_end, bos=False) + [EOS]
            ids += reply
            mask += [1] * len(reply)
    return ids, mask
