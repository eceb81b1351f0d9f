"""`babyllama serve`: an OpenAI-compatible HTTP server with continuous batching and prefix reuse, and a chat
page at /. app.py holds the routes, service.py what they do, scheduler.py the one thread that runs the
engine, protocol.py OpenAI's shapes, metrics.py the Prometheus metrics, static/ the page. Needs the `serve`
extra (FastAPI, uvicorn, prometheus-client)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeConfig
from ..errors import BabyLlamaError
from .app import create_app

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


class Server(uvicorn.Server):
    """uvicorn's server, which on the signal to stop (Ctrl-C, SIGTERM) first ends every request in flight (a
    whole answer gets a 503, a stream an error event), so that none is still generating when the grace period
    ends (uvicorn would then cancel its task: a traceback, and a plain-text 500)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app.state.service.shut_down()
        await super().shutdown(sockets)


class HeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, which closes a connection that has not brought a whole request line and headers
    `header_timeout_s` after it opened or after its previous answer ended. uvicorn has no such limit: a client
    that sends its headers a byte a minute (slowloris; uvicorn's keep-alive timer stops at the first byte), or
    goes on sending the body of a request already answered without it (a 401, a 413), would hold a connection,
    and one of the process's file descriptors, forever. The body of a request being answered is limited by the
    request's time limit (Service.read_body)."""

    header_timeout_s = ServeConfig.header_timeout_s
    header_timer: asyncio.TimerHandle | None = None
    answered: object = None  # the request cycle whose answer ended as the timer started (None: none yet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
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
        super().connection_lost(exc)

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


def with_header_timeout(seconds: float) -> type[HeaderTimeout]:
    """The protocol class (uvicorn makes one per connection) with its header time limit."""
    return type("HeaderTimeout", (HeaderTimeout,), {"header_timeout_s": seconds})


def run(app: FastAPI, sockets: list[socket.socket], log_level: str = "info") -> None:
    """Serve `app` with uvicorn on the listening `sockets` (see `listen`) until told to stop; a connection whose
    request headers take longer than its ServeConfig's header_timeout_s is closed."""
    protocol = with_header_timeout(app.state.service.config.header_timeout_s)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACE_S, http=protocol)
    Server(config, app).run(sockets=sockets)
