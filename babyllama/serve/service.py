"""What the endpoints do: check a request against the model (the context, token ids, the model's name), hand
its choices to the scheduler as one job each, and turn their tokens into OpenAI's answer, whole or streamed
as server-sent events (whole UTF-8 characters, cut at stop strings)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError

from ..api import Model
from ..chat_template import encode_chat
from ..errors import BabyLlamaError
from ..sampler import Sampler
from ..tokenizer import BOS, Tokenizer
from . import protocol as p
from .metrics import Metrics
from .scheduler import Emitter, Finished, Job, QueueFull, Scheduler, Token

DISCONNECT_POLL_S = 0.5  # how often a whole (not streamed) answer checks that its client is still there
ZERO_SEED = 0x5EED  # seed 0's stand-in (run.c reads 0 as "the time")


@dataclass
class ServeConfig:
    model_name: str = "babyllama"
    slots: int = 8
    queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0  # per request, queueing included
    max_tokens_per_step: int = 128
    prefix_min: int = 16  # 0: no prefix reuse
    chat_template: str | None = None
    cors_origins: tuple[str, ...] = ("*",)


class APIError(Exception):
    """An answer in OpenAI's error shape with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, p.error_body(message, type_, param, code), headers


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Choice:
    """One choice of a request: its job in the scheduler, its text so far, its tokens, how it ended."""

    job: Job
    text: p.ChoiceText
    tokens: list[Token] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text starts in the choice's text
    finish: str | None = None

    def logprobs(self, tok: Tokenizer, start: int = 0) -> dict:
        """The completions API's logprobs of the tokens from `start` on."""
        prev = self.tokens[start - 1].id if start > 0 else self.text.prev
        return p.completion_logprobs(tok, self.tokens[start:], self.offsets[start:], prev)


@dataclass
class Pending:
    """A request whose choices are generating: what its answer needs."""

    req: p.CompletionRequest | p.ChatRequest
    chat: bool
    n_prompt: int
    choices: list[Choice]
    events: asyncio.Queue
    echo: str = ""
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    templates: dict[int, tuple[str, str]] = field(default_factory=dict)  # Service.text_chunk's, per choice

    @property
    def jobs(self) -> list[Job]:
        return [c.job for c in self.choices]

    def usage(self) -> dict:
        """OpenAI's count: the prompt once, however many choices continue it."""
        return p.usage(self.n_prompt, sum(len(c.tokens) for c in self.choices))


class Service:
    def __init__(self, model: Model, config: ServeConfig):
        self.config = config
        self.tok = model.tokenizer
        self.seq_len = model.args.max_seq_len
        self.vocab_size = model.args.vocab_size
        self.metrics = Metrics(config.slots)
        self.bytes_per_token = self.tok.most_bytes_per_token()
        self.scheduler = Scheduler(model.engine, config.slots, config.queue, self.metrics,
                                   config.max_tokens_per_step, config.prefix_min)

    # ------------------------------------------------------------------ the endpoints

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "babyllama",
                "context_length": self.seq_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist here (this server runs "
                                f"{self.config.model_name!r})", param="model", code="model_not_found")

    async def completions(self, request: Request):
        req = await self.parse(request, p.CompletionRequest)
        ids = await self.prompt_ids(req.prompt)
        max_new = req.max_tokens or 16
        self.check_room(len(ids), max_new, "prompt")
        echo = self.prompt_text(req.prompt, ids) if req.echo else ""
        return await self.answer(request, req, ids, max_new, req.logprobs, chat=False, echo=echo)

    async def chat(self, request: Request):
        req = await self.parse(request, p.ChatRequest)
        messages = [{"role": m.template_role(), "content": m.text()} for m in req.messages]
        self.check_text_fits(sum(len(m["content"].encode()) for m in messages), "conversation", "messages")
        try:
            ids, _ = await asyncio.to_thread(encode_chat, self.tok, messages, template=self.config.chat_template)
        except BabyLlamaError as e:
            raise APIError(400, str(e), param="messages") from None
        if len(ids) >= self.seq_len:
            raise APIError(400, f"the conversation is {len(ids)} tokens; the model's context is {self.seq_len} "
                                "tokens and leaves no room for a reply", param="messages",
                           code="context_length_exceeded")
        max_new = req.reply_budget or self.seq_len - len(ids)
        self.check_room(len(ids), max_new, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self.answer(request, req, ids, max_new, top, chat=True)

    # ------------------------------------------------------------------ checking a request

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413, as an OpenAI error) past max_body_bytes without reading the rest."""
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                             code="body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def parse(self, request: Request, schema):
        raw = await self.read_body(request)
        try:
            req = schema.model_validate_json(raw or b"null")
        except ValidationError as e:
            raise APIError(400, validation_message(e), param=validation_param(e)) from None
        self.check_model(req.model)
        return req

    async def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; a long text is encoded beside the event loop, not on it."""
        if isinstance(prompt, str):
            self.check_text_fits(len(prompt.encode()), "prompt", "prompt")
            return await asyncio.to_thread(self.tok.encode, prompt, bos=True)
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """What echo repeats: the prompt as given, or the text of its token ids."""
        return prompt if isinstance(prompt, str) else self.tok.decode_text(ids[1:] if ids[0] == BOS else ids)

    def check_text_fits(self, n_bytes: int, what: str, param: str) -> None:
        """Refuses text that can never fit the context before encoding it (which takes seconds for a megabyte):
        a token stands for at most `most_bytes_per_token` bytes of it."""
        if n_bytes > self.seq_len * self.bytes_per_token:
            raise APIError(400, f"the {what} is {n_bytes} bytes, more than the model's context of {self.seq_len} "
                                f"tokens can hold (a token covers at most {self.bytes_per_token} bytes); "
                                f"shorten the {what}", param=param, code="context_length_exceeded")

    def check_room(self, n_prompt: int, max_new: int, param: str) -> None:
        if n_prompt + max_new > self.seq_len:
            raise APIError(400, f"the model's context is {self.seq_len} tokens, but the prompt is {n_prompt} tokens "
                                f"and max_tokens asks for {max_new} more; shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")

    # ------------------------------------------------------------------ generating

    async def answer(self, request: Request, req, ids: list[int], max_new: int, logprobs: int | None, chat: bool,
                     echo: str = ""):
        """Queue one job per choice (choice i samples with seed + i), then answer whole or as a stream."""
        if req.n > self.config.queue:
            raise APIError(400, f"n={req.n} is more than this server queues at once ({self.config.queue})",
                           param="n")
        events: asyncio.Queue = asyncio.Queue()
        emit = Emitter(asyncio.get_running_loop(), events)
        deadline = time.monotonic() + self.config.timeout_s
        base = req.seed if req.seed is not None else time.time_ns() % 2**32
        jobs = [Job(ids, max_new, Sampler(req.temperature, req.top_p, choice_seed(base, i)), emit, index=i,
                    logprobs=logprobs, deadline=deadline) for i in range(req.n)]
        try:
            self.scheduler.submit(jobs)
        except QueueFull:
            raise APIError(429, "the server is busy (its queue is full); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(len(ids) * req.n)
        # a chat reply is decoded as after BOS (no leading space); a completion continues its prompt
        choices = [Choice(job, p.ChoiceText(self.tok, BOS if chat else ids[-1], req.stops)) for job in jobs]
        pending = Pending(req, chat, len(ids), choices, events, echo, p.new_id("chatcmpl" if chat else "cmpl"))
        if req.stream:
            return EventSourceResponse(self.stream(pending))
        return await self.whole(request, pending)

    def cancel(self, jobs: list[Job], reason: str) -> None:
        """Stop the jobs still generating (a client gone, a time limit): their slots are freed between steps."""
        live = [j for j in jobs if not (j.cancelled or j.over)]
        for job in live:
            job.cancel()
        if live:
            self.metrics.cancelled.labels(reason).inc()
            self.scheduler.wake()

    def take_token(self, choice: Choice, token: Token) -> str:
        """The text to send for a token; at a stop string the choice ends (its slot is freed next step)."""
        choice.tokens.append(token)
        choice.offsets.append(choice.text.decoded)
        piece = choice.text.push(token.id)
        if choice.text.stopped:
            choice.finish = "stop"
            choice.job.over = True
            choice.job.cancel()
            self.scheduler.wake()
        return piece

    async def next_event(self, request: Request, pending: Pending) -> tuple[int, Token | Finished]:
        """The next (choice index, event) of a whole answer; cancels every job when the client goes away while
        it waits. (A stream notices a gone client when a write fails: its generator is then cancelled.) Events
        already there are taken without a wait (a step's tokens come together)."""
        if not pending.events.empty():
            return pending.events.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(pending.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel(pending.jobs, "disconnected")
                    raise ClientGone from None

    async def whole(self, request: Request, pending: Pending) -> dict:
        parts = [[pending.echo] for _ in pending.choices]
        try:
            while any(c.finish is None for c in pending.choices):
                i, event = await self.next_event(request, pending)
                choice = pending.choices[i]
                if choice.finish is not None:
                    continue  # tokens of a choice cut at a stop string, generated before the cut took effect
                if isinstance(event, Token):
                    parts[i].append(self.take_token(choice, event))
                    continue
                choice.job.over = True
                if event.reason in ("timeout", "error"):
                    self.cancel(pending.jobs, event.reason)
                    raise self.failure(event)
                parts[i].append(choice.text.finish())
                choice.finish = event.reason
        finally:
            self.cancel(pending.jobs, "disconnected")
        req, out = pending.req, []
        for i, choice in enumerate(pending.choices):
            content = "".join(parts[i])
            if pending.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": content},
                            "logprobs": p.chat_logprobs(self.tok, choice.tokens) if req.logprobs else None,
                            "finish_reason": choice.finish})
            else:
                lp = choice.logprobs(self.tok) if req.logprobs is not None else None
                out.append({"index": i, "text": content, "logprobs": lp, "finish_reason": choice.finish})
        return p.envelope("chat.completion" if pending.chat else "text_completion", pending.id,
                          self.config.model_name, out, pending.usage(), pending.created)

    async def stream(self, pending: Pending) -> AsyncIterator[bytes]:
        """The answer as server-sent events. Each wake-up takes every event that has arrived (one step's tokens
        come together) and writes one block: a choice's consecutive tokens become one chunk of text (unless
        logprobs ask for a chunk per token), so a client that reads slower than the tokens come gets fewer,
        larger chunks instead of a growing backlog."""
        req, choices = pending.req, pending.choices
        try:
            for i in range(len(choices)):
                if pending.chat:
                    yield self.chunk(pending, i, None, None, first=True)
                elif pending.echo:
                    yield self.chunk(pending, i, pending.echo, None)
            failed = False
            while not failed and any(c.finish is None for c in choices):
                events = [await pending.events.get()]
                while not pending.events.empty():
                    events.append(pending.events.get_nowait())
                block, failed = self.stream_block(pending, events)
                if block:
                    yield b"".join(block)
            if not failed and req.include_usage:
                kind = "chat.completion.chunk" if pending.chat else "text_completion"
                yield sse(p.envelope(kind, pending.id, self.config.model_name, [], pending.usage(), pending.created))
            yield DONE
        finally:
            self.cancel(pending.jobs, "disconnected")

    def stream_block(self, pending: Pending, events: list[tuple[int, Token | Finished]]) -> tuple[list[bytes], bool]:
        """The chunks for events that arrived together, and whether the answer failed (an error event ends
        it)."""
        choices, out = pending.choices, []
        texts: dict[int, list[str]] = {}  # text of plain tokens not yet in a chunk, per choice

        def flush(i: int) -> None:
            pieces = texts.pop(i, None)
            if pieces:
                out.append(self.text_chunk(pending, i, "".join(pieces)))

        for i, event in events:
            choice = choices[i]
            if choice.finish is not None:
                continue  # tokens of a choice cut at a stop string, generated before the cut took effect
            if isinstance(event, Token):
                piece = self.take_token(choice, event)
                if event.logprob is not None:
                    flush(i)
                    out.append(self.chunk(pending, i, piece, None, event))
                elif piece:
                    texts.setdefault(i, []).append(piece)
                if choice.finish is not None:
                    flush(i)
                    out.append(self.chunk(pending, i, None, choice.finish))
                continue
            choice.job.over = True
            if event.reason in ("timeout", "error"):
                for j in list(texts):
                    flush(j)
                self.cancel(pending.jobs, event.reason)
                out.append(sse(self.failure(event).body))
                return out, True
            rest = choice.text.finish()
            choice.finish = event.reason
            if rest:
                texts.setdefault(i, []).append(rest)
            flush(i)
            out.append(self.chunk(pending, i, None, choice.finish))
        for j in list(texts):
            flush(j)
        return out, False

    def text_chunk(self, pending: Pending, i: int, text: str) -> bytes:
        """`chunk(pending, i, text, None)` (plain text, no finish reason, no logprobs) from a template made once
        per choice: the chunk sent for nearly every token."""
        template = pending.templates.get(i)
        if template is None:
            marker = "\0"  # encoded as an escape, which nothing else in the chunk can contain
            whole = self.chunk(pending, i, marker, None).decode()
            head, found, tail = whole.partition(compact(marker))
            assert found and compact(marker) not in tail
            template = pending.templates[i] = head, tail
        head, tail = template
        return (head + compact(text) + tail).encode()

    def chunk(self, pending: Pending, i: int, piece: str | None, finish: str | None, token: Token | None = None,
              first: bool = False) -> bytes:
        """One streamed chunk of choice i: its new text (or, first, the chat's role), its finish reason."""
        req = pending.req
        if pending.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            if token is not None and req.logprobs:
                choice["logprobs"] = p.chat_logprobs(self.tok, [token])
            kind = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
            if token is not None and req.logprobs is not None:
                this = pending.choices[i]
                choice["logprobs"] = this.logprobs(self.tok, len(this.tokens) - 1)  # the token just taken
            kind = "text_completion"
        body = p.envelope(kind, pending.id, self.config.model_name, [choice], created=pending.created)
        if req.include_usage:
            body["usage"] = None
        return sse(body)

    def failure(self, event: Finished) -> APIError:
        if event.reason == "timeout":
            return APIError(504, f"the request ran past the server's time limit ({self.config.timeout_s:g} s)",
                            "server_error", code="timeout")
        return APIError(500, "the generation failed on the server (see its log)", "server_error",
                        code="internal_error")


def choice_seed(base: int, i: int) -> int:
    """Choice i samples with seed base + i (run.c's -s); 0, which run.c reads as "the time", becomes a fixed
    stand-in so that seed 0 is reproducible too."""
    return (base + i) % 2**64 or ZERO_SEED


def sse(body: dict) -> bytes:
    """One server-sent event carrying `body` as compact JSON (which has no line breaks: one `data:` line)."""
    return format_sse_event(data_str=compact(body))


def compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


DONE = format_sse_event(data_str="[DONE]")


def validation_param(e: ValidationError) -> str | None:
    """The request field the first error is about, as OpenAI's `param` names it: the top-level field (pydantic's
    deeper locations name union members, "prompt.list[int].0"), or the field a whole-request check names."""
    err = e.errors(include_url=False)[0]
    named = (err.get("ctx") or {}).get("param")
    if named is not None:
        return str(named)
    return str(err["loc"][0]) if err["loc"] else None


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as one line: where and what ("max_tokens: Input should be greater than or equal to 1")."""
    parts = []
    for err in e.errors(include_url=False)[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
