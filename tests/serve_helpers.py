"""Starting `babyllama serve` as a subprocess on a free loopback port, for the serve tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`babyllama serve ARGS` running on a free port; `url`, `client()` (openai), `get`/`post` (httpx)."""

    def __init__(self, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "babyllama", "serve", *args, "--port", str(self.port), "--log-level", "warning"]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=sigint_default)
        self._stderr = b""
        self._wait_ready()

    def _wait_ready(self, timeout: float = 300) -> None:
        """Until /health answers: the server listens once its kernels are built (on a machine's first run, a
        minute or more of compiling)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not start in time")

    def log(self) -> str:
        """What the server has written to stderr so far (read without waiting for more)."""
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._stderr += self.proc.stderr.read() or b""
        return self._stderr.decode(errors="replace")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw):
        openai = pytest.importorskip("openai")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=60, **kw)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers())
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric in /metrics."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout: float = 10) -> dict:
        """/health once no slot is active and nothing waits (a freed slot shows up between steps)."""
        end = time.monotonic() + timeout
        while True:
            health = self.get("/health").json()
            if (health["active"], health["queued"]) == (0, 0) or time.monotonic() > end:
                return health
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
