"""OpenAI's request and response shapes: pydantic models of the requests (validation), the text of a
choice as tokens arrive (UTF-8 streaming, stop strings) and the JSON of completions and chat completions."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..config import SEED_LIMIT
from ..sampler import Controls
from ..tokenizer import Tokenizer

MAX_CHOICES = 16
MAX_STOP = 4
# NaN and infinities (JSON's NaN and Infinity literals, which Python's json reads) are no sampling setting
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error that names the request field it is about (the answer's `param`) where pydantic's
    location cannot: one raised by a check of the whole request."""
    return PydanticCustomError("value_error", message, {"param": param})


class Strict(BaseModel):
    """A request object as OpenAI reads it: values of the wrong type are refused, not converted ("1" is no
    number, true no integer; an integer is a float), and null for an optional field means its default
    (clients such as LiteLLM send null for every field they leave unset)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
        return {k: v for k, v in data.items() if not (v is None and k in optional)}


class StreamOptions(Strict):
    include_usage: bool = False


# OpenAI fields that would change the answer and that this server does not implement: refused unless null, empty
# ({}, [], "") or one of the values that ask for what the server does anyway (a text reply, no tool call)
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (1,), "suffix": (),
    "tools": (), "functions": (), "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "modalities": (["text"],), "audio": ()}


class Common(Strict):
    """Fields both endpoints take. Other fields (user, metadata, ...) are ignored, as OpenAI's clients may send
    them; those of UNSUPPORTED are refused unless they ask for the default (the numeric ones are typed, so
    that `false` or "0" is refused as in every other number field, not read as 0)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(ge=-SEED_LIMIT, lt=SEED_LIMIT)] | None = None  # negative: random (llama.cpp's -1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    frequency_penalty: float = Controls.frequency_penalty
    presence_penalty: float = Controls.presence_penalty
    # llama.cpp's server's sampling controls (sampler.Controls; ranges checked there); repetition_penalty is the
    # name vLLM's and Hugging Face's clients send for repeat_penalty; top_k -1 (vLLM's "off") is 0
    top_k: int = Controls.top_k
    min_p: float = Controls.min_p
    repeat_penalty: float | None = None
    repetition_penalty: float | None = None
    repeat_last_n: int = Controls.repeat_last_n
    logit_bias: dict[str, float] | None = None  # OpenAI's: {"token id": bias in [-100, 100]}
    best_of: int = 1

    @field_validator("logit_bias")
    @classmethod
    def _bias_token_ids(cls, v):
        for key in v or {}:
            if not re.fullmatch("[0-9]{1,18}", key):  # longer ones are no vocabulary's (and int() refuses 4300+)
                shown = repr(key) if len(key) <= 40 else repr(key[:40]) + f" ({len(key)} characters)"
                raise ValueError(f"logit_bias keys must be token ids (up to 18 decimal digits), got {shown}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, None)  # a declared field, or one of model_extra
            if value not in (None, {}, [], "", *neutral):
                raise field_error(name, f"{name} is not supported by this server")
        return self

    @model_validator(mode="after")
    def _controls(self):
        both = None not in (self.repeat_penalty, self.repetition_penalty)
        if both and self.repeat_penalty != self.repetition_penalty:
            raise field_error("repetition_penalty", "repeat_penalty and repetition_penalty are one setting: give "
                                                    "one of them")
        problem = self.controls.problem()
        if problem:
            name, rule = problem
            if name == "repeat_penalty" and self.repeat_penalty is None:
                name = "repetition_penalty"  # the name the request used
            raise field_error(name, f"{name} {rule}")
        return self

    @property
    def controls(self) -> Controls:
        repeat = self.repeat_penalty if self.repeat_penalty is not None else self.repetition_penalty
        return Controls(0 if self.top_k == -1 else self.top_k, self.min_p,
                        Controls.repeat_penalty if repeat is None else repeat,
                        self.repeat_last_n, self.presence_penalty, self.frequency_penalty,
                        tuple((int(k), v) for k, v in (self.logit_bias or {}).items()))

    @property
    def stops(self) -> list[str]:
        return cast("list[str]", self.stop or [])  # _stops turned a single string into a list

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Common):
    prompt: str | Annotated[list[int], Field(min_length=1)] = ""
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        # OpenAI also takes a list of prompts (strings or token lists), which clients such as LangChain send
        if isinstance(v, list) and v and all(isinstance(x, (str, list)) for x in v):
            if len(v) == 1:
                return v[0]
            raise ValueError(f"a list of {len(v)} prompts is not supported: send one request per prompt")
        return v

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            raise field_error("echo", "echo with logprobs (the prompt's log-probabilities) is not supported")
        return self

    @model_validator(mode="after")
    def _chat_only_fields(self):
        if getattr(self, "max_completion_tokens", None) is not None:
            raise field_error("max_completion_tokens", "max_completion_tokens is a chat completions field; "
                                                       "/v1/completions takes max_tokens")
        return self


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @property
    def reply_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ------------------------------------------------------------------------------------ a choice's text


class ChoiceText:
    """The text of one choice as its tokens arrive: whole UTF-8 characters (tokenizer.TextStream), cut at
    the first stop string. Text that could be the start of a stop string is held back until it is not."""

    def __init__(self, tokenizer: Tokenizer, prev: int, stops: list[str], held: bytes = b""):
        self.prev = prev  # the token the choice's first token follows
        self.stream = tokenizer.stream(prev, held)  # held: the first bytes of a character the prompt began
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""  # decoded but not yet sent
        self.sent = 0  # characters sent so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that can be sent after `token` ("" while held back); sets `stopped` at a stop string."""
        return self._release(self.stream.push(token))

    def finish(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._release(self.stream.flush(), final=True)

    def _release(self, piece: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
        elif final or not self.stops:
            out, self.pending = self.pending, ""
        else:
            keep = self._partial_stop_length()
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.sent += len(out)
        return out

    def start_of(self, token: int) -> int:
        """Where `token`'s text starts in the choice's text, pushed next: after the characters decoded so far
        (held-back ones included), and after the U+FFFD of an unfinished character it cuts short."""
        return self.sent + len(self.pending) + self.stream.ends_held(token)

    def _partial_stop_length(self) -> int:
        """The longest tail of the pending text that is the start of a stop string."""
        text = self.pending
        for n in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None,
             created: int | None = None) -> dict:
    """An answer or a streamed chunk; `created` (default: now) is the same in every chunk of a stream."""
    out = {"id": rid, "object": kind, "created": int(time.time()) if created is None else created, "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def token_text(tokenizer: Tokenizer, token: int, prev: int) -> str:
    """A token as OpenAI's logprobs show it: the bytes it shows in the text (Tokenizer.shown_piece: after BOS
    without its leading space, a lone unprintable ASCII byte as nothing) as text, a lone byte >= 0x80 as U+FFFD."""
    return tokenizer.shown_piece(prev, token).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer: Tokenizer, entries: list, offsets: list[int], prev: int) -> dict:
    """The completions API's logprobs object for a choice's tokens (entries: scheduler.Token) that follow the
    token `prev`; offsets: where each token's text starts in the choice's text. As OpenAI's, a token's
    top_logprobs always show the sampled token: up to k + 1 entries when it is not among the k likeliest.
    Tokens that read the same (lone bytes, all U+FFFD) share a key: the sampled one's, else the likeliest's."""
    tokens, lps, tops = [], [], []
    for e in entries:
        tokens.append(token_text(tokenizer, e.id, prev))
        lps.append(e.logprob)
        top: dict[str, float] = {}
        for i, lp in e.top or []:
            top.setdefault(token_text(tokenizer, i, prev), lp)
        top[tokens[-1]] = e.logprob
        tops.append(top)
        prev = e.id
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": list(offsets)}


def chat_logprobs(tokenizer: Tokenizer, entries: list, prev: int) -> dict:
    """The chat API's logprobs object: {content: [{token, logprob, bytes, top_logprobs}]} for a reply's tokens
    (entries: scheduler.Token) that follow the token `prev`: the reply's first token after BOS without its
    leading space, as the content has it, so that the tokens (and their bytes) join into the content."""
    def one(token: int, lp: float, after: int) -> dict:
        return {"token": token_text(tokenizer, token, after), "logprob": lp,
                "bytes": list(tokenizer.shown_piece(after, token))}

    content = []
    for e in entries:
        content.append({**one(e.id, e.logprob, prev), "top_logprobs": [one(i, lp, prev) for i, lp in e.top or []]})
        prev = e.id
    return {"content": content}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
