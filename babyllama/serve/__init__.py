"""`babyllama serve`: an OpenAI-compatible HTTP server with continuous batching and prefix reuse, and a chat
page at /. app.py holds the routes, service.py what they do, scheduler.py the one thread that runs the
engine, protocol.py OpenAI's shapes, metrics.py the Prometheus metrics, static/ the page. Needs the `serve`
extra (FastAPI, uvicorn, prometheus-client)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeConfig
from ..errors import BabyLlamaError
from .app import Count, create_app
from .metrics import Metrics
from .protocol import error_body

__all__ = ["ServeConfig", "address", "create_app", "listen", "run"]

GRACE_S = 5  # uvicorn's wait for requests in flight once told to stop (they end at once: Service.shut_down)


def address(host: str, port: int) -> str:
    """HOST:PORT as a URL writes it ([::1]:8000 for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (those uvicorn would bind), or a one-line error
    that names the address and why (in use, not this machine's, unknown): bound before the server says that it
    serves, so that it says so only once it does. Port 0 picks a free port, the same for every address."""
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise cannot_listen(host, port, e) from None
    sockets: list[socket.socket] = []
    bound = port
    try:
        for family, kind, proto, _, where in dict.fromkeys(found):  # getaddrinfo may repeat an address
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "::" beside "0.0.0.0", as asyncio
            sock.bind((where[0], bound, *where[2:]))
            sock.listen()
            bound = sock.getsockname()[1]  # with port 0, the port the first address got
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise cannot_listen(host, port, e) from None
    return sockets


def cannot_listen(host: str, port: int, e: OSError) -> BabyLlamaError:
    why = e.strerror or str(e)
    return BabyLlamaError(f"cannot listen on {address(host, port)}: {why[:1].lower()}{why[1:]}")


def no_lifespan_traceback(record: logging.LogRecord) -> bool:
    """uvicorn's report of the lifespan task cancelled by a forced exit (starlette's traceback of the
    cancellation, or uvicorn's own), left out: the exit is what was asked."""
    text = str(record.msg)
    return not (text.startswith("Exception in 'lifespan' protocol") or
                (text.startswith("Traceback") and text.rstrip().endswith("CancelledError")))


def no_upgrade_advice(record: logging.LogRecord) -> bool:
    """uvicorn's two warnings for any request with an Upgrade header (`curl --http2` sends h2c's), the second
    advising a WebSocket library, left out: the server has no WebSocket route, and answers such a request as
    HTTP/1.1, as it should."""
    text = str(record.msg)
    return not (text.startswith("Unsupported upgrade request") or text.startswith("No supported WebSocket library"))


class Server(uvicorn.Server):
    """uvicorn's server, which on the signal to stop (Ctrl-C, SIGTERM) first ends every request in flight (a
    whole answer gets a 503, a stream an error event), so that none is still generating when the grace period
    ends (uvicorn would then cancel its task: a traceback, and a plain-text 500)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app
        self.stopped_by: int | None = None  # the first signal that told it to stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
            # at once: uvicorn notices should_exit only at its next tick (up to 0.1 s), and until then takes
            # new requests as if nothing had happened (a signal handler may not touch the loop's objects itself)
            with contextlib.suppress(RuntimeError):  # no loop running yet: shutdown() does it
                asyncio.get_running_loop().call_soon_threadsafe(self.app.state.service.shut_down)
        super().handle_exit(sig, frame)
        if self.force_exit:  # a second Ctrl-C: uvicorn cancels the lifespan task and logs that as a traceback
            logging.getLogger("uvicorn.error").addFilter(no_lifespan_traceback)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.service.shut_down()
        await super().shutdown(sockets)


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer on a connection past the server's cap: OpenAI's error shape, 503 with Retry-After (clients
    retry it), and the connection closed after it."""
    body = json.dumps(error_body("the server has too many open connections; retry shortly", "server_error",
                                 code="too_many_connections")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ConnectionLimits(H11Protocol):
    """uvicorn's h11 protocol, with the limits uvicorn lacks, so that clients cannot hold the process's file
    descriptors. A connection that has not brought a whole request line and headers `header_timeout_s` after it
    opened or after its previous answer ended is closed: otherwise a client that sends its headers a byte a
    minute (slowloris; uvicorn's keep-alive timer stops at the first byte), or goes on sending the body of a
    request already answered without it (a 401, a 413), would hold its connection forever. The body of a request
    being answered is limited by the request's time limit (Service.read_body); its answer, by its client reading
    it: a connection whose client has read nothing of what waits to be sent for `header_timeout_s` is dropped
    (the answer's writer waits for room in the socket, and would wait forever). And a connection opened while
    `max_connections` others are open has its request answered 503 (`too_many_connections`) and is closed:
    uvicorn's own limit (limit_concurrency) answers in plain text, not the API's JSON."""

    header_timeout_s = ServeConfig.header_timeout_s
    max_connections = ServeConfig.max_connections
    refuse: Callable = staticmethod(too_many_connections)  # the app a connection past the cap is answered by
    header_timer: asyncio.TimerHandle | None = None
    answered: object = None  # the request cycle whose answer ended as the timer started (None: none yet)
    reader_timer: asyncio.TimerHandle | None = None  # runs while the transport's buffer is full

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # the set holds this one too
            self.app = self.refuse
        self.wait_for_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self.answered:  # a new request's headers have all arrived: it is being answered
            self.stop_header_timer()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may begin a pipelined request at once
        if self.cycle is answered and not self.transport.is_closing():
            self.wait_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        self.stop_reader_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stop_reader_timer()
        self.reader_timer = self.loop.call_later(self.header_timeout_s, self.reader_too_slow)

    def resume_writing(self) -> None:
        self.stop_reader_timer()
        super().resume_writing()

    def stop_reader_timer(self) -> None:
        if self.reader_timer is not None:
            self.reader_timer.cancel()
            self.reader_timer = None

    def reader_too_slow(self) -> None:
        self.reader_timer = None
        # a reset, not a close: close() waits for the buffer to be sent, and the kernel would go on holding what
        # the socket has queued (megabytes) for a client that takes none of it
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def wait_for_headers(self) -> None:
        self.stop_header_timer()
        self.answered = self.cycle
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_late)

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_late(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no request is being answered (nginx closes such connections too)


def with_limits(config: ServeConfig, metrics: Metrics) -> type[ConnectionLimits]:
    """The protocol class (uvicorn makes one per connection) with `config`'s header time limit and connection cap,
    its 503s counted in `metrics` as the app's answers are."""
    limits = {"header_timeout_s": config.header_timeout_s, "max_connections": config.max_connections,
              "refuse": Count(too_many_connections, metrics)}
    return type("ConnectionLimits", (ConnectionLimits,), limits)


def open_files_for(connections: int) -> None:
    """Raise the process's soft limit on open files (Linux's usual 1,024, macOS's 256) toward its hard limit, so
    that `connections` sockets fit beside the files the server holds: past the limit accept() fails, and
    clients would wait unanswered instead of getting the cap's 503."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
    except (OSError, ValueError):  # not allowed here: the cap then guards fewer connections than it says
        pass


def log_colors() -> bool | None:
    """uvicorn's use_colors: off where NO_COLOR is set (no-color.org) or the terminal is dumb, else its own
    choice (colors on a terminal)."""
    return False if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb" else None


def log_config() -> dict:
    """uvicorn's logging, in its own format, but its per-request access lines on stderr with every other line
    of the server's (uvicorn writes them on stdout)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def run(app: FastAPI, sockets: list[socket.socket], log_level: str = "info") -> int | None:
    """Serve `app` with uvicorn on the listening `sockets` (see `listen`) until told to stop, with its
    ServeConfig's limits on connections (ConnectionLimits). Returns the signal that stopped it, if any: uvicorn
    raises it again as it returns, which does nothing where the process was started with it ignored (`nohup`,
    a background job of a script)."""
    open_files_for(app.state.service.config.max_connections)
    protocol = with_limits(app.state.service.config, app.state.service.metrics)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACE_S, http=protocol,
                            use_colors=log_colors(), log_config=log_config())
    server = Server(config, app)
    logging.getLogger("uvicorn.error").addFilter(no_upgrade_advice)
    server.run(sockets=sockets)
    return server.stopped_by
