"""The HTTP server on FastAPI: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health,
/metrics and the chat page at /. Here: the routes, the bearer key, OpenAI-shaped errors for everything
(404s and 405s included) and the request counter; what the endpoints do is in service.py."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import Model
from ..config import ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .service import APIError, ClientGone, Service

STATIC = Path(__file__).parent / "static"
KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
# The page and its files are revalidated on every load (their ETag and Last-Modified make that a 304): left to a
# browser's heuristic caching, a page from an upgraded server could run with a stale script or style
PAGE_CACHING = {"Cache-Control": "no-cache"}


def create_app(model: Model, config: ServeConfig) -> FastAPI:
    service = Service(model, config)
    metrics, scheduler = service.metrics, service.scheduler

    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        except asyncio.CancelledError:  # a second Ctrl-C forced the exit: told to stop, not waited for
            scheduler.stop(wait=False)
            raise
        scheduler.stop()

    app = FastAPI(title="babyllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # a path with a trailing slash is a 404 that names the path meant, not a bare 307 to an absolute URL built from
    # the Host header (which a client without redirects shows as nothing, and which drops a proxy's path prefix)
    app.router.redirect_slashes = False
    app.state.service = service
    # the last added runs first: every answer is counted, and the key is checked inside CORS, so that a page of
    # another origin can read the 401 (without CORS headers a browser shows it only as a failed fetch)
    app.add_middleware(Authorize, config=config)
    app.add_middleware(RefuseOtherOrigins, config=config)
    # any request header: OpenAI's SDKs add their own (X-Stainless-*), and a browser asks before sending them
    # and a page on a public origin may call a server on this machine (Chromium's Private Network Access preflight)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["*"], allow_private_network=True)
    app.add_middleware(Count, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            path = request.url.path
            return error_response(APIError(404, f"no such path: {path}{v1_hint(path)}", "not_found_error"))
        return error_response(APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))  # Allow

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.api_route("/health", methods=["GET", "HEAD"])  # health checkers probe with HEAD
    async def health():  # 503 once the server shuts down too: a load balancer stops sending it requests
        status = "error" if not scheduler.healthy else "shutting_down" if service.closing.is_set() else "ok"
        return JSONResponse({"status": status, **scheduler.status()}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if not name:  # /v1/models/
            raise HTTPException(404)
        service.check_model(name)
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat(request)

    files = PageFiles(directory=STATIC)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index(request: Request):  # as its files are served: a revalidation is a 304
        return await files.get_response("index.html", request.scope)

    app.mount("/static", files, name="static")
    return app


class PageFiles(StaticFiles):
    """The page's script and style, with PAGE_CACHING."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_CACHING)
        return response


class Count:
    """Counts answers by endpoint and status. Plain ASGI, as Authorize: Starlette's BaseHTTPMiddleware relays
    every chunk of a stream through a task and a memory stream of its own, a cost paid per token."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # a browser's CORS preflight: no request
            await self.app(scope, receive, send)
            return
        path = Request(scope).url.path
        endpoint = path if path in KNOWN_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class Authorize:
    """Refuses requests without the key (when one is set)."""

    def __init__(self, app: ASGIApp, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            # needs_key: only when a key is set
            if needs_key(self.config, request) and not key_matches(cast(str, self.config.api_key),
                                                                   request.headers.get("authorization", "")):
                response = error_response(APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                   "authentication_error", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RefuseOtherOrigins:
    """With --cors-origin, refuses (403) what a page of any other origin sends. CORS keeps such a page from reading
    an answer, and a refused preflight stops its JSON requests, but a "simple" request (a POST of text/plain) gets
    no preflight: it would still run. A page of this server itself (the chat page: its Origin names the Host the
    request was sent to) and requests without an Origin (curl, the SDKs) pass."""

    def __init__(self, app: ASGIApp, config: ServeConfig):
        self.app = app
        self.allowed = None if "*" in config.cors_origins else frozenset(config.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed is not None and scope["type"] == "http" and scope["method"] != "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and origin.lower() not in self.allowed and \
                    urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
                response = error_response(APIError(403, f"this server does not take requests from pages of "
                                                        f"{origin[:200]} (see its --cors-origin)", "permission_error",
                                                   code="origin_not_allowed"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def v1_hint(path: str) -> str:
    """For an API path without its /v1 (a client's base URL given without it, a common slip): where it is."""
    if f"/v1{path}" in KNOWN_PATHS or path.startswith("/models/"):
        return f" (the API is under /v1: {'/v1' + path}; a client's base URL ends with /v1)"
    if path.endswith("/") and path.rstrip("/") in KNOWN_PATHS:
        return f" (without the trailing slash: {path.rstrip('/')})"
    return ""


def needs_key(config: ServeConfig, request: Request) -> bool:
    """The API and the metrics need the key when one is set; /health, the page and CORS preflights do not."""
    path = request.url.path
    return bool(config.api_key) and (path.startswith("/v1/") or path == "/metrics") and request.method != "OPTIONS"


def key_matches(key: str, authorization: str) -> bool:
    """`Authorization: Bearer KEY` (the scheme in any case, as RFC 7235 has it), the key compared in constant
    time."""
    scheme, _, credentials = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.lstrip(" ").encode(), key.encode())


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
