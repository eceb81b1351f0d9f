"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent
events or whole), /health, /metrics and the chat page at /, on FastAPI. Every request is checked here
(pydantic, the context, the key) and then handed to the scheduler as one job per choice; its tokens come
back on an asyncio queue and are turned into text (whole UTF-8 characters, cut at stop strings)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..api import Model
from ..chat_template import encode_chat
from ..errors import BabyLlamaError
from ..sampler import Sampler
from ..tokenizer import BOS
from . import protocol as p
from .metrics import CONTENT_TYPE, Metrics
from .scheduler import Finished, Job, QueueFull, Scheduler, Token, emitter

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5


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
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, p.error_body(message, type_, param, code), headers


def create_app(model: Model, config: ServeConfig) -> FastAPI:
    metrics = Metrics(config.slots)
    scheduler = Scheduler(model.engine, config.slots, config.queue, metrics, config.max_tokens_per_step,
                          config.prefix_min)
    seq_len = model.args.max_seq_len
    tok = model.tokenizer

    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="babyllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def count_and_authorize(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in KNOWN_PATHS else "other"
        if config.api_key and (path.startswith("/v1/") or path == "/metrics") and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                metrics.requests.labels(endpoint, "401").inc()
                return error_response(APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                               "authentication_error", code="invalid_api_key"))
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        message = {404: f"no such path: {request.url.path}", 413: "request body too large"}.get(exc.status_code,
                                                                                              str(exc.detail))
        return error_response(APIError(exc.status_code, message, kind.get(exc.status_code, "invalid_request_error")))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, str(exc)))

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        ok = scheduler.healthy
        return JSONResponse({"status": "ok" if ok else "error", **scheduler.status()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return model_card()

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, p.CompletionRequest)
        ids = prompt_ids(req.prompt)
        max_new = req.max_tokens or 16
        check_room(len(ids), max_new, "prompt")
        job_logprobs = req.logprobs
        return await respond(request, req, ids, max_new, job_logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, p.ChatRequest)
        try:
            ids, _ = encode_chat(tok, [{"role": m.role, "content": m.text()} for m in req.messages],
                                 template=config.chat_template)
        except BabyLlamaError as e:
            raise APIError(400, str(e), param="messages") from None
        if len(ids) >= seq_len:
            raise APIError(400, f"the conversation is {len(ids)} tokens; the model's context is {seq_len} "
                                "tokens and leaves no room for a reply", param="messages",
                           code="context_length_exceeded")
        max_new = req.reply_budget or seq_len - len(ids)
        check_room(len(ids), max_new, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await respond(request, req, ids, max_new, top, chat=True)

    # ------------------------------------------------------------------ helpers

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "babyllama",
                "context_length": seq_len}

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist here (this server runs {config.model_name!r})",
                           param="model", code="model_not_found")

    async def read_body(request: Request) -> bytes:
        """The body, refused (413, as an OpenAI error) past max_body_bytes without reading the rest."""
        too_large = APIError(413, f"the request body is larger than this server takes ({config.max_body_bytes} "
                                  "bytes)", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > config.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise too_large
        return bytes(body)

    async def parse(request: Request, schema):
        raw = await read_body(request)
        try:
            req = schema.model_validate_json(raw or b"null")
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from None
        check_model(req.model)
        return req

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, str):
            return tok.encode(prompt, bos=True)
        if any(not 0 <= t < model.args.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {model.args.vocab_size})", param="prompt")
        return list(prompt)

    def prompt_text(prompt, ids: list[int]) -> str:
        """What echo repeats: the prompt as given, or the text of its token ids."""
        return prompt if isinstance(prompt, str) else tok.decode_text(ids[1:] if ids[0] == BOS else ids)

    def check_room(n_prompt: int, max_new: int, param: str) -> None:
        if n_prompt + max_new > seq_len:
            raise APIError(400, f"the model's context is {seq_len} tokens, but the prompt is {n_prompt} tokens and "
                                f"max_tokens asks for {max_new} more; shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")

    async def respond(request: Request, req, ids: list[int], max_new: int, logprobs: int | None, chat: bool):
        if req.n > config.queue:
            raise APIError(400, f"n={req.n} is more than this server queues at once ({config.queue})", param="n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        emit = emitter(loop, events)
        deadline = time.monotonic() + config.timeout_s
        base = req.seed if req.seed is not None else time.time_ns() % 2**32
        jobs = [Job(ids, max_new, Sampler(req.temperature, req.top_p, choice_seed(base, i)), emit, index=i,
                    logprobs=logprobs, deadline=deadline) for i in range(req.n)]
        try:
            scheduler.submit(jobs)
        except QueueFull:
            raise APIError(429, "the server is busy (its queue is full); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        metrics.prompt_tokens.inc(len(ids) * req.n)
        texts = [p.ChoiceText(tok, BOS if chat else ids[-1], req.stops) for _ in jobs]  # a reply: no leading space
        echo = prompt_text(req.prompt, ids) if not chat and req.echo else ""
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return EventSourceResponse(stream(request, req, jobs, events, texts, rid, len(ids), chat, echo))
        return await whole(request, req, jobs, events, texts, rid, len(ids), chat, echo)

    async def next_event(request: Request, events: asyncio.Queue, jobs: list[Job]):
        """The next (index, event) of a whole (not streamed) answer; cancels every job when the client goes
        away while it waits. (A stream notices a gone client when a write fails: its generator is cancelled.)"""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(jobs, "disconnected")
                    raise ClientGone from None

    def cancel(jobs: list[Job], reason: str) -> None:
        """Stop the jobs still generating (a client gone, a time limit): their slots are freed between steps."""
        live = [j for j in jobs if not (j.cancelled or j.over)]
        for job in live:
            job.cancel()
        if live:
            metrics.cancelled.labels(reason).inc()
            scheduler.wake()

    def on_token(job: Job, text: p.ChoiceText, event: Token) -> str:
        """The text to send for a token; at a stop string the job ends (its slot is freed next step)."""
        piece = text.push(event.id)
        if text.stopped:
            job.over = True
            job.cancel()
            scheduler.wake()
        return piece

    async def whole(request, req, jobs, events, texts, rid, n_prompt, chat, echo):
        parts = [[echo] for _ in jobs]
        entries = [[] for _ in jobs]
        finish = [None] * len(jobs)
        counts = [0] * len(jobs)
        try:
            while any(f is None for f in finish):
                i, event = await next_event(request, events, jobs)
                if finish[i] is not None:
                    continue
                if isinstance(event, Token):
                    counts[i] += 1
                    parts[i].append(on_token(jobs[i], texts[i], event))
                    entries[i].append(event)
                    if texts[i].stopped:
                        finish[i] = "stop"
                else:
                    jobs[i].over = True
                    check_failed(event, jobs)
                    parts[i].append(texts[i].finish())
                    finish[i] = event.reason
        finally:
            cancel(jobs, "disconnected")
        choices = []
        for i in range(len(jobs)):
            content = "".join(parts[i])
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": content},
                          "logprobs": p.chat_logprobs(tok, entries[i]) if req.logprobs else None,
                          "finish_reason": finish[i]}
            else:
                choice = {"index": i, "text": content, "finish_reason": finish[i],
                          "logprobs": p.completion_logprobs(tok, entries[i], 0) if req.logprobs is not None else None}
            choices.append(choice)
        return p.envelope("chat.completion" if chat else "text_completion", rid, config.model_name, choices,
                          p.usage(n_prompt * len(jobs), sum(counts)))

    async def stream(request, req, jobs, events, texts, rid, n_prompt, chat, echo) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        finished, counts = [False] * len(jobs), [0] * len(jobs)

        def chunk(i: int, piece: str | None, finish: str | None, token: Token | None = None,
                  first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                if token is not None and req.logprobs:
                    choice["logprobs"] = p.chat_logprobs(tok, [token])
            else:
                choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
                if token is not None and req.logprobs is not None:
                    choice["logprobs"] = p.completion_logprobs(tok, [token], texts[i].sent - len(piece or ""))
            body = p.envelope(kind, rid, config.model_name, [choice])
            if req.include_usage:
                body["usage"] = None
            return sse(body)

        try:
            for i in range(len(jobs)):
                if chat:
                    yield chunk(i, None, None, first=True)
                elif echo:
                    yield chunk(i, echo, None)
            while not all(finished):
                i, event = await events.get()
                if finished[i]:
                    continue
                if isinstance(event, Token):
                    counts[i] += 1
                    piece = on_token(jobs[i], texts[i], event)
                    if piece or event.logprob is not None:
                        yield chunk(i, piece, None, event)
                    if texts[i].stopped:
                        finished[i] = True
                        yield chunk(i, None, "stop")
                    continue
                jobs[i].over = True
                if event.reason in ("timeout", "error"):
                    cancel(jobs, event.reason)
                    yield sse(p.error_body(failure_message(event), "server_error", code=event.reason))
                    break
                rest = texts[i].finish()
                finished[i] = True
                if rest:
                    yield chunk(i, rest, None)
                yield chunk(i, None, event.reason)
            else:
                if req.include_usage:
                    yield sse(p.envelope(kind, rid, config.model_name, [], p.usage(n_prompt * len(jobs), sum(counts))))
            yield format_sse_event(data_str="[DONE]")
        finally:
            cancel(jobs, "disconnected")

    def check_failed(event: Finished, jobs: list[Job]) -> None:
        if event.reason in ("timeout", "error"):
            cancel(jobs, event.reason)
        if event.reason == "timeout":
            raise APIError(504, failure_message(event), "server_error", code="timeout")
        if event.reason == "error":
            raise APIError(500, failure_message(event), "server_error", code="internal_error")

    def failure_message(event: Finished) -> str:
        if event.reason == "timeout":
            return f"the request ran past the server's time limit ({config.timeout_s:g} s)"
        return "the generation failed on the server (see its log)"

    return app


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def choice_seed(base: int, i: int) -> int:
    """Choice i samples with seed base + i (run.c's -s); 0, which run.c reads as "the time", becomes a fixed
    stand-in so that seed 0 is reproducible too."""
    return (base + i) % 2**64 or ZERO_SEED


ZERO_SEED = 0x5EED
KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def sse(body: dict) -> bytes:
    """One server-sent event carrying `body` as compact JSON."""
    return format_sse_event(data_str=json.dumps(body, ensure_ascii=False, separators=(",", ":")))


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as one line: where and what ("max_tokens: Input should be greater than or equal to 1")."""
    parts = []
    for err in e.errors(include_url=False)[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
