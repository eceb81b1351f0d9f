"""`babyllama serve`: an OpenAI-compatible HTTP server with continuous batching and prefix reuse, and a chat
page at /. app.py holds the routes, service.py what they do, scheduler.py the one thread that runs the
engine, protocol.py OpenAI's shapes, metrics.py the Prometheus metrics, static/ the page. Needs the `serve`
extra (FastAPI, uvicorn, prometheus-client)."""

from __future__ import annotations

from .app import create_app
from .service import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
