"""What the endpoints do: check a request against the model (the context, token ids, the model's name), hand
its choices to the scheduler as one job each, and turn their tokens into OpenAI's answer, whole or streamed
as server-sent events (whole UTF-8 characters, cut at stop strings)."""

from __future__ import annotations

import asyncio
import bisect
import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..api import Model, unseeded
from ..chat_template import encode_chat, get_template
from ..config import ServeConfig
from ..errors import BabyLlamaError
from ..sampler import Sampler, choice_seed
from ..tokenizer import BOS, Tokenizer
from . import protocol as p
from .metrics import Metrics
from .scheduler import Emitter, Finished, Job, QueueFull, Scheduler, SchedulerFailed, Token

DISCONNECT_POLL_S = 0.25  # how often a whole (not streamed) answer checks that its client is still there
RequestT = TypeVar("RequestT", p.CompletionRequest, p.ChatRequest)  # the request shapes `parse` validates
FAILURES = ("timeout", "error", "shutdown")  # a Finished event that ends the whole request, not one choice
# a stream is passed on as it comes: nginx buffers a proxied answer unless told not to (X-Accel-Buffering), and a
# stream is never an answer to keep
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    reported: int = 0  # tokens whose log-probabilities a stream has sent

    def answered(self) -> int:
        """How many of its tokens belong to the answer (and so to its logprobs): those whose text begins inside
        the text sent so far, as tokens past a stop string's cut do not, and once the choice has ended
        otherwise, all (the last ones may have no text of their own: a character's first bytes)."""
        if self.finish is not None and not self.text.stopped:
            return len(self.tokens)
        return bisect.bisect_left(self.offsets, self.text.sent)  # offsets never decrease

    def take_unreported(self) -> tuple[int, int]:
        """The tokens [start, end) of the answer not yet reported by a stream, now counted as reported."""
        start, self.reported = self.reported, max(self.reported, self.answered())
        return start, self.reported

    def completion_logprobs(self, tok: Tokenizer, start: int, end: int) -> dict:
        """The completions API's logprobs of the tokens [start, end)."""
        return p.completion_logprobs(tok, self.tokens[start:end], self.offsets[start:end], self.prev(start))

    def chat_logprobs(self, tok: Tokenizer, start: int, end: int) -> dict:
        """The chat API's logprobs of the tokens [start, end)."""
        return p.chat_logprobs(tok, self.tokens[start:end], self.prev(start))

    def prev(self, k: int) -> int:
        """The token that token k follows."""
        return self.tokens[k - 1].id if k > 0 else self.text.prev


@dataclass(eq=False)  # one object per request: hashed by identity (Service.live)
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
    ended_early: str | None = None  # why the request ended before its answer was complete, once it has
    client_checked: float = field(default_factory=time.monotonic)  # when a whole answer last polled its client

    @property
    def jobs(self) -> list[Job]:
        return [c.job for c in self.choices]

    @property
    def logprobs(self) -> bool:
        """Whether the answer reports log-probabilities (completions: logprobs 0 reports the chosen token's)."""
        return bool(self.req.logprobs) if self.chat else self.req.logprobs is not None

    @property
    def complete(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    def usage(self) -> dict:
        """OpenAI's count: the prompt once, however many choices continue it."""
        return p.usage(self.n_prompt, sum(len(c.tokens) for c in self.choices))


class Service:
    def __init__(self, model: Model, config: ServeConfig):
        self.config = config
        self.tok = model.tokenizer
        self.chat_template = config.chat_template or model.chat_template
        get_template(self.chat_template)  # an unknown name fails the server's start, not every chat request
        self.seq_len = model.args.max_seq_len
        self.vocab_size = model.args.vocab_size
        self.metrics = Metrics(config.slots)
        self.bytes_per_token = self.tok.most_bytes_per_token()
        self.scheduler = Scheduler(model.engine, config.slots, config.queue, self.metrics,
                                   config.max_tokens_per_step, config.prefix_min)
        self.live: set[Pending] = set()  # the requests being answered
        self.closing = asyncio.Event()  # set when the server shuts down: no request is taken any more

    # ------------------------------------------------------------------ the endpoints

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "babyllama",
                "context_length": self.seq_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist here (this server runs "
                                f"{self.config.model_name!r})", param="model", code="model_not_found")

    async def completions(self, request: Request) -> dict | EventSourceResponse:
        deadline = self.deadline()
        req = await self.parse(request, p.CompletionRequest, deadline)
        ids = await self.prompt_ids(req.prompt)
        max_new = req.max_tokens or 16
        self.check_room(len(ids), max_new, "prompt", asked=req.max_tokens is not None)
        echo, held = self.prompt_text(req.prompt, ids) if req.echo else ("", b"")
        return await self.answer(request, req, ids, max_new, req.logprobs, deadline, chat=False, echo=echo,
                                 held=held)

    async def chat(self, request: Request) -> dict | EventSourceResponse:
        deadline = self.deadline()
        req = await self.parse(request, p.ChatRequest, deadline)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]  # developer: the system role
        self.check_text_fits(sum(self.tok.text_bytes(m["content"]) for m in messages), "conversation", "messages")
        try:
            ids, _ = await asyncio.to_thread(encode_chat, self.tok, messages, template=self.chat_template)
        except BabyLlamaError as e:
            raise APIError(400, str(e), param="messages") from None
        if len(ids) >= self.seq_len:
            raise APIError(400, f"the conversation is {len(ids)} tokens; the model's context is {self.seq_len} "
                                "tokens and leaves no room for a reply", param="messages",
                           code="context_length_exceeded")
        max_new = req.reply_budget or self.seq_len - len(ids)
        self.check_room(len(ids), max_new, "messages",
                        "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self.answer(request, req, ids, max_new, top, deadline, chat=True)

    def deadline(self) -> float:
        """When a request that arrives now must be answered (time.monotonic()): its body's upload, queueing
        and generation all count."""
        return time.monotonic() + self.config.timeout_s

    # ------------------------------------------------------------------ checking a request

    async def read_body(self, request: Request, deadline: float) -> bytes:
        """The body, by the request's deadline (else 408, and the connection is closed: the rest of the body
        will not be read) unless the server shuts down first (503), refused (413) past max_body_bytes without
        reading the rest. A client that goes away while sending it is a ClientGone."""
        upload = asyncio.ensure_future(self.receive_body(request))
        shutdown = asyncio.ensure_future(self.closing.wait())
        try:
            done, _ = await asyncio.wait({upload, shutdown}, timeout=max(deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            upload.cancel()  # no-op once done; else the rest of the body is not wanted
            shutdown.cancel()
        if upload in done:
            try:
                return upload.result()
            except ClientDisconnect:  # ended early, as a client gone while its answer generates is counted
                self.metrics.cancelled.labels("disconnected").inc()
                raise ClientGone from None
        if shutdown in done:
            raise self.failure("shutdown")
        raise APIError(408, f"the request body did not arrive within the server's time limit "
                            f"({self.config.timeout_s:g} s)", code="body_timeout", headers={"Connection": "close"})

    async def receive_body(self, request: Request) -> bytes:
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

    async def parse(self, request: Request, schema: type[RequestT], deadline: float) -> RequestT:
        raw = await self.read_body(request, deadline)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise APIError(415, f"Content-Encoding {encoding} is not supported: send the JSON body uncompressed",
                           code="unsupported_media_type")
        raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte order mark, which JSON parsers may ignore (RFC 8259)
        try:
            req = schema.model_validate_json(raw or b"null")
        except ValidationError as e:
            where = lone_surrogate(raw) if e.errors(include_url=False)[0]["type"] == "json_invalid" else None
            if where is not None:  # valid JSON ("\ud83d", half an emoji) that pydantic's parser calls invalid
                names = [str(x).encode("utf-8", "backslashreplace").decode() for x in where]  # a key may hold it
                raise APIError(400, f"{'.'.join(names)}: the text holds a lone UTF-16 surrogate (half of a "
                                    "character), which is not Unicode", param=names[0]) from None
            raise APIError(400, validation_message(e), param=validation_param(e)) from None
        self.check_model(req.model)
        return req

    async def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; a long text is encoded beside the event loop, not on it."""
        if isinstance(prompt, str):
            self.check_text_fits(self.tok.text_bytes(prompt), "prompt", "prompt")
            return await asyncio.to_thread(self.tok.encode, prompt, bos=True)
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def prompt_text(self, prompt: str | list[int], ids: list[int]) -> tuple[str, bytes]:
        """What echo repeats: the prompt as given, or the text of its token ids; and the first bytes of a
        character those ids leave unfinished, which the completion's text takes up (so that echo and completion
        read as the text of all the ids, not with U+FFFD for the character's two halves)."""
        if isinstance(prompt, str):
            return prompt, b""
        stream = self.tok.stream()
        text = "".join(stream.push(t) for t in (ids[1:] if ids[0] == BOS else ids))
        return text, stream.held

    def check_text_fits(self, n_bytes: int, what: str, param: str) -> None:
        """Refuses text that can never fit the context before encoding it (which takes seconds for a megabyte):
        a token stands for at most `most_bytes_per_token` bytes of it."""
        if n_bytes > self.seq_len * self.bytes_per_token:
            raise APIError(400, f"the {what} is {n_bytes} bytes, more than the model's context of {self.seq_len} "
                                f"tokens can hold (a token covers at most {self.bytes_per_token} bytes); "
                                f"shorten the {what}", param=param, code="context_length_exceeded")

    def check_room(self, n_prompt: int, max_new: int, param: str, budget: str = "max_tokens",
                   asked: bool = True) -> None:
        """`param`: the request field of the prompt; `budget`: the one that asked for `max_new` tokens (`asked`:
        the request gave it, not its default), which is the field at fault where the prompt alone fits."""
        if n_prompt + max_new > self.seq_len:
            raise APIError(400, f"the model's context is {self.seq_len} tokens, but the prompt is {n_prompt} tokens "
                                f"and {budget} asks for {max_new} more; shorten the prompt or lower {budget}",
                           param=budget if asked and n_prompt < self.seq_len else param,
                           code="context_length_exceeded")

    # ------------------------------------------------------------------ generating

    async def answer(self, request: Request, req: p.CompletionRequest | p.ChatRequest, ids: list[int], max_new: int,
                     logprobs: int | None, deadline: float, chat: bool, echo: str = "",
                     held: bytes = b"") -> dict | EventSourceResponse:
        """Queue one job per choice (choice i samples with seed + i), then answer whole or as a stream; `held`:
        the first bytes of a character the echoed prompt leaves unfinished (see prompt_text)."""
        if self.closing.is_set():
            raise self.failure("shutdown")
        most = self.config.slots + self.config.queue  # choices that find a slot, and those that may wait for one
        if req.n > most:
            raise APIError(400, f"n={req.n} is more choices than this server takes at once ({most}: "
                                f"{self.config.slots} slots and a queue of {self.config.queue})", param="n")
        events: asyncio.Queue = asyncio.Queue()
        emit = Emitter(asyncio.get_running_loop(), events)
        base = req.seed if req.seed is not None and req.seed >= 0 else unseeded()
        controls = req.controls
        problem = controls.problem(self.vocab_size)  # the rest was checked with the request: the bias's token ids
        if problem:
            raise APIError(400, " ".join(problem), param=problem[0])
        jobs = [Job(ids, max_new, Sampler(req.temperature, req.top_p, choice_seed(base, i), controls), emit,
                    index=i, logprobs=logprobs, deadline=deadline, submitted=deadline - self.config.timeout_s)
                for i in range(req.n)]  # submitted: the request's arrival (its time to first token counts from there)
        try:
            self.scheduler.submit(jobs)
        except QueueFull:
            raise APIError(429, "the server is busy (its queue is full); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerFailed:
            raise self.failure("error") from None
        self.metrics.prompt_tokens.inc(len(ids) * req.n)
        # a chat reply is decoded as after BOS (no leading space); a completion continues its prompt
        choices = [Choice(job, p.ChoiceText(self.tok, BOS if chat else ids[-1], req.stops, held)) for job in jobs]
        pending = Pending(req, chat, len(ids), choices, events, echo, p.new_id("chatcmpl" if chat else "cmpl"))
        if req.stream:
            return EventSourceResponse(self.stream(pending), headers=STREAM_HEADERS)
        return await self.whole(request, pending)

    def stop_jobs(self, jobs: list[Job]) -> None:
        """Stop the jobs (those still queued or generating): their slots are freed between steps."""
        for job in jobs:
            job.cancel()
        self.scheduler.wake()

    def end_early(self, pending: Pending, reason: str) -> None:
        """End a request before its answer is complete (its client gone, its time limit, the server's shutdown, an
        error): its jobs stop, and babyllama_cancelled_requests_total counts it once, under the first reason."""
        if pending.ended_early is None:
            pending.ended_early = reason
            self.metrics.cancelled.labels(reason).inc()
        self.stop_jobs(pending.jobs)

    def end_unfinished(self, pending: Pending) -> None:
        """What every answer does as it ends: an incomplete one ended early (if nothing else ended it, its
        client went away: the stream's write failed, or the handler was cancelled)."""
        self.live.discard(pending)
        if not pending.complete:
            self.end_early(pending, "disconnected")

    def shut_down(self) -> None:
        """The server is stopping: every request still uploading, queued or generating ends now (a whole answer
        with a 503, a stream with an error event), and new ones are refused, so that nothing waits for the grace
        period. Once only: the signal's handler calls it, and uvicorn's shutdown again."""
        if self.closing.is_set():
            return
        self.closing.set()
        for pending in list(self.live):
            self.interrupt(pending)

    def interrupt(self, pending: Pending) -> None:
        """Stop a request's jobs and hand its answer the shutdown event (which ends it, as a failure would)."""
        self.stop_jobs(pending.jobs)
        pending.events.put_nowait((0, Finished("shutdown")))

    def track(self, pending: Pending) -> None:
        """Count an answer that begins among those shut_down ends (a stream begins once its response is sent:
        if shut_down ran before, it is interrupted now)."""
        self.live.add(pending)
        if self.closing.is_set():
            self.interrupt(pending)

    def take_token(self, choice: Choice, token: Token) -> str:
        """The text to send for a token; at a stop string the choice ends (its slot is freed next step)."""
        choice.tokens.append(token)
        choice.offsets.append(choice.text.start_of(token.id))
        piece = choice.text.push(token.id)
        if choice.text.stopped:
            choice.finish = "stop"
            self.stop_jobs([choice.job])
        return piece

    def finish_choice(self, choice: Choice, reason: str) -> str:
        """The text left at a choice's end; the end is a stop where that text completes a stop string (the
        U+FFFD of an unfinished character can)."""
        piece = choice.text.finish()
        choice.finish = "stop" if choice.text.stopped else reason
        return piece

    async def next_event(self, request: Request, pending: Pending) -> tuple[int, Token | Finished]:
        """The next (choice index, event) of a whole answer. Every DISCONNECT_POLL_S, whether events keep coming
        or not, it checks that the client is still there, and ends the request when it is not. (A stream
        notices a gone client when a write fails: its generator is then cancelled.) Events already there are
        taken without a wait (a step's tokens come together)."""
        while True:
            wait = pending.client_checked + DISCONNECT_POLL_S - time.monotonic()
            if wait <= 0:
                await self.check_client(request, pending)
                continue
            if not pending.events.empty():
                return pending.events.get_nowait()
            try:
                return await asyncio.wait_for(pending.events.get(), wait)
            except asyncio.TimeoutError:
                continue

    async def check_client(self, request: Request, pending: Pending) -> None:
        pending.client_checked = time.monotonic()
        if await request.is_disconnected():
            self.end_early(pending, "disconnected")
            raise ClientGone

    async def whole(self, request: Request, pending: Pending) -> dict:
        parts = [[pending.echo] for _ in pending.choices]
        self.track(pending)
        try:
            while not pending.complete:
                i, event = await self.next_event(request, pending)
                if isinstance(event, Finished) and event.reason in FAILURES:
                    self.end_early(pending, event.reason)
                    raise self.failure(event.reason, event.message)
                choice = pending.choices[i]
                if choice.finish is not None:
                    continue  # tokens of a choice cut at a stop string, generated before the cut took effect
                if isinstance(event, Token):
                    parts[i].append(self.take_token(choice, event))
                    continue
                parts[i].append(self.finish_choice(choice, event.reason))
        finally:
            self.end_unfinished(pending)
        out = []
        for i, choice in enumerate(pending.choices):
            content = "".join(parts[i])
            n = choice.answered()
            if pending.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": content},
                            "logprobs": choice.chat_logprobs(self.tok, 0, n) if pending.logprobs else None,
                            "finish_reason": choice.finish})
            else:
                lp = choice.completion_logprobs(self.tok, 0, n) if pending.logprobs else None
                out.append({"index": i, "text": content, "logprobs": lp, "finish_reason": choice.finish})
        return p.envelope("chat.completion" if pending.chat else "text_completion", pending.id,
                          self.config.model_name, out, pending.usage(), pending.created)

    async def stream(self, pending: Pending) -> AsyncIterator[bytes]:
        """The answer as server-sent events. Each wake-up takes every event that has arrived (one step's tokens
        come together) and writes one block: a choice's consecutive tokens become one chunk of text (unless
        logprobs ask for a chunk per token: see stream_block), so a client that reads slower than the tokens
        come gets fewer, larger chunks instead of a growing backlog."""
        req, choices = pending.req, pending.choices
        self.track(pending)
        try:
            for i in range(len(choices)):
                if pending.chat:
                    yield self.chunk(pending, i, None, None, first=True)
                elif pending.echo:
                    yield self.chunk(pending, i, pending.echo, None)
            failed = False
            while not failed and not pending.complete:
                try:
                    events = [await self.next_stream_event(pending)]
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    yield KEEPALIVE
                    continue
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
            self.end_unfinished(pending)

    async def next_stream_event(self, pending: Pending) -> tuple[int, Token | Finished]:
        """The stream's next event. Until the first one (a request queued for a slot, a long prompt prefilled)
        nothing else would be written for minutes, and proxies and clients with a read timeout (nginx: 60 s)
        would drop the connection: raises asyncio.TimeoutError every `keepalive_s` for a comment line to be sent. Once
        tokens flow, the wait has no timer (one per token would cost more than the comment saves)."""
        if any(c.tokens or c.finish for c in pending.choices):
            return await pending.events.get()
        return await asyncio.wait_for(pending.events.get(), self.config.keepalive_s)

    def stream_block(self, pending: Pending, events: list[tuple[int, Token | Finished]]) -> tuple[list[bytes], bool]:
        """The chunks for events that arrived together, and whether the answer failed (an error event ends
        it). With logprobs, a token's log-probabilities go in the chunk that carries the start of its text: text
        held back (a possible stop string, a character's first bytes) holds them back too, and a token past a
        stop string's cut is not reported."""
        choices, out = pending.choices, []
        texts: dict[int, list[str]] = {}  # text of plain tokens not yet in a chunk, per choice

        def flush(i: int) -> None:
            pieces = texts.pop(i, None)
            if pieces:
                out.append(self.text_chunk(pending, i, "".join(pieces)))

        for i, event in events:
            if isinstance(event, Finished) and event.reason in FAILURES:
                for j in list(texts):
                    flush(j)
                self.end_early(pending, event.reason)
                out.append(sse(self.failure(event.reason, event.message).body))
                return out, True
            choice = choices[i]
            if choice.finish is not None:
                continue  # tokens of a choice cut at a stop string, generated before the cut took effect
            if isinstance(event, Token):
                piece = self.take_token(choice, event)
            else:
                piece = self.finish_choice(choice, event.reason)
            if pending.logprobs:
                start, end = choice.take_unreported()
                if piece or end > start:
                    out.append(self.chunk(pending, i, piece, None, (start, end)))
            elif piece:
                texts.setdefault(i, []).append(piece)
            if choice.finish is not None:
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

    def chunk(self, pending: Pending, i: int, piece: str | None, finish: str | None,
              logged: tuple[int, int] | None = None, first: bool = False) -> bytes:
        """One streamed chunk of choice i: its new text (or, first, the chat's role), its finish reason, and the
        log-probabilities of its tokens [start, end) when `logged` names them."""
        this = pending.choices[i]
        if pending.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            if logged is not None:
                choice["logprobs"] = this.chat_logprobs(self.tok, *logged)
            kind = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
            if logged is not None:
                choice["logprobs"] = this.completion_logprobs(self.tok, *logged)
            kind = "text_completion"
        body = p.envelope(kind, pending.id, self.config.model_name, [choice], created=pending.created)
        if pending.req.include_usage:
            body["usage"] = None
        return sse(body)

    def failure(self, reason: str, message: str | None = None) -> APIError:
        """The error that ends a request for one of FAILURES (`message`: what failed in the model's arithmetic,
        for "error")."""
        if reason == "timeout":
            # the same request would run past the limit again: OpenAI's SDKs retry a 5xx (twice by default, each
            # attempt up to --timeout) unless told not to
            return APIError(504, f"the request ran past the server's time limit ({self.config.timeout_s:g} s)",
                            "server_error", code="timeout", headers={"x-should-retry": "false"})
        if reason == "shutdown":
            return APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if message:
            return APIError(500, f"the model failed on this request: {message}", "server_error", code="model_error")
        return APIError(500, "the generation failed on the server (see its log)", "server_error",
                        code="internal_error")


def sse(body: dict) -> bytes:
    """One server-sent event carrying `body` as compact JSON (which has no line breaks: one `data:` line)."""
    return format_sse_event(data_str=compact(body))


def compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


DONE = format_sse_event(data_str="[DONE]")
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients (EventSource, openai's, httpx-sse) skip it


def lone_surrogate(raw: bytes) -> list[str | int] | None:
    """Where a JSON body holds a string with a lone UTF-16 surrogate (as Python's json reads it), else None."""
    try:
        todo: list[tuple[list[str | int], object]] = [([], json.loads(raw))]
    except (ValueError, RecursionError):
        return None
    while todo:
        where, value = todo.pop()
        if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
            return where or ["body"]
        if isinstance(value, dict):  # a key is text too
            todo += [([*where, k], v) for k, v in reversed(value.items())] + [([*where, k], k) for k in value]
        elif isinstance(value, list):
            todo += [([*where, i], v) for i, v in reversed(list(enumerate(value)))]
    return None


def validation_param(e: ValidationError) -> str | None:
    """The request field the first error is about, as OpenAI's `param` names it: the top-level field (pydantic's
    deeper locations name union members, "prompt.list[int].0"), or the field a whole-request check names."""
    err = e.errors(include_url=False)[0]
    named = (err.get("ctx") or {}).get("param")
    if named is not None:
        return str(named)
    return str(err["loc"][0]) if err["loc"] else None


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as one line: where and what ("max_tokens: Input should be greater than or equal to 1").
    A whole-request check's message names its field itself ("top_k must be ..."): it has no place to prefix."""
    parts = []
    for err in e.errors(include_url=False)[:3]:
        if not err["loc"] and (err.get("ctx") or {}).get("param") is not None:
            parts.append(err["msg"])
            continue
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
