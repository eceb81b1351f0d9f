"""`babyllama serve` around its requests: clients that go away (before their body is sent, while a whole
answer generates), bodies that stall, time limits and how they are counted, Ctrl-C with requests in flight,
and start-up (the address to listen on, the slots' memory, the kernels built before it listens)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import never_ending_model, run_cli
from serve_helpers import ROOT, Server, free_port

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

LONG = {"prompt": "x", "max_tokens": 2000, "temperature": 0}  # seconds of generation on the slow model


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """conftest.never_ending_model: 2000 greedy tokens take seconds, on a fast machine too."""
    return str(never_ending_model(tmp_path_factory.mktemp("slow")))


@pytest.fixture(scope="module")
def strict(slow_model):
    """The slow model with a one-second time limit: a long answer always runs past it."""
    s = Server(slow_model, "--slots", "2", "--timeout", "1")
    yield s
    s.stop()


def cancelled(server: Server, reason: str) -> float:
    found = re.search(rf'babyllama_cancelled_requests_total\{{reason="{reason}"\}} (\S+)', server.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


def answered(server: Server, status: int) -> float:
    found = re.search(rf'babyllama_requests_total\{{endpoint="/v1/completions",status="{status}"\}} (\S+)',
                      server.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the condition did not come true in time"
        time.sleep(0.05)


def raw_request(server: Server, body: bytes, length: int | None = None) -> socket.socket:
    """A connection that has sent a POST to /v1/completions with `body` and a Content-Length of `length`
    (default: the body's)."""
    conn = socket.create_connection(("127.0.0.1", server.port))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body) if length is None else length, body))
    return conn


def reply(conn: socket.socket) -> tuple[bytes, bytes]:
    """The status line and headers, and the body, of the answer on `conn`, read until the server closes the
    connection."""
    conn.settimeout(60)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_whole_answer_whose_client_leaves_while_tokens_flow_is_cancelled(slow_model):
    """The client of a whole (not streamed) answer goes away while its tokens keep coming: the request is
    cancelled (counted once, as disconnected) and its slot freed long before max_tokens."""
    server = Server(slow_model, "--slots", "1")
    try:
        generated = server.metric("babyllama_generated_tokens_total")
        conn = raw_request(server, json.dumps(LONG).encode())
        wait_for(lambda: server.metric("babyllama_generated_tokens_total") > generated + 20)  # tokens flow
        conn.close()
        wait_for(lambda: server.get("/health").json()["active"] == 0)
        assert cancelled(server, "disconnected") == 1
        assert server.metric("babyllama_generated_tokens_total") - generated < LONG["max_tokens"]
    finally:
        server.stop()


def test_a_client_that_leaves_while_sending_its_body_is_no_error(strict):
    """Content-Length promises more than the client sends before it closes: the request ends as a gone
    client's (499, counted, and among the cancelled as disconnected, as serve.md says: it was not), nothing
    logged."""
    gone, dropped = answered(strict, 499), cancelled(strict, "disconnected")
    raw_request(strict, b'{"prompt": "x"', length=100).close()
    wait_for(lambda: answered(strict, 499) == gone + 1)
    assert cancelled(strict, "disconnected") == dropped + 1
    assert "Traceback" not in strict.log() and "ClientDisconnect" not in strict.log()
    assert strict.get("/health").json()["status"] == "ok"


def test_a_body_that_stalls_runs_into_the_time_limit(strict):
    """Headers, 10 of the 100 bytes promised, then nothing: the time limit (--timeout 1) covers the body too:
    408 in OpenAI's error shape, and the connection is closed."""
    head, body = reply(raw_request(strict, b'{"prompt":', length=100))  # read until the server closes it
    assert head.startswith(b"HTTP/1.1 408 "), head
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and "time limit (1 s)" in error["message"]


def test_every_request_past_its_time_limit_is_counted_once(strict):
    """A whole answer and a stream of one choice, and a whole answer of three, all run past --timeout: each
    request is counted once as a timeout (not once per choice, and not zero times for one choice)."""
    before = cancelled(strict, "timeout")

    def ask(kind: str):
        if kind == "stream":
            with httpx.stream("POST", strict.url + "/v1/completions", json={**LONG, "stream": True},
                              timeout=60) as r:
                return [line for line in r.iter_lines() if line.startswith("data:")]
        return strict.post("/v1/completions", {**LONG, "n": 3 if kind == "three" else 1})

    with ThreadPoolExecutor(3) as pool:
        one, three, stream = pool.map(ask, ["one", "three", "stream"])
    assert one.status_code == three.status_code == 504 and one.json()["error"]["code"] == "timeout"
    assert json.loads(stream[-2][5:])["error"]["code"] == "timeout" and stream[-1] == "data: [DONE]"
    assert cancelled(strict, "timeout") == before + 3
    assert strict.wait_idle()["active"] == 0


def test_the_official_client_does_not_retry_a_request_past_its_time_limit(strict):
    """OpenAI's SDK retries a 5xx twice by default, each attempt running up to --timeout again: the 504 says
    x-should-retry: false, so the client raises after the one attempt."""
    openai = pytest.importorskip("openai")
    before = answered(strict, 504)
    client = openai.OpenAI(base_url=strict.url + "/v1", api_key="none", max_retries=2)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=client.models.list().data[0].id, **LONG)
    assert e.value.status_code == 504 and e.value.response.headers["x-should-retry"] == "false"
    assert answered(strict, 504) == before + 1


def closed_by_server(conn: socket.socket, trickle: bytes) -> bool:
    """Whether the server closes `conn` while the client sends `trickle` a byte at a time, a byte every 0.2 s
    (a slowloris client, whose headers never end), or within a minute after."""
    for byte in trickle:
        try:
            conn.sendall(bytes([byte]))
        except OSError:  # reset: closed
            return True
        if closed_within(conn, 0.2):
            return True
    return closed_within(conn, 60)


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` within `seconds` of silence (what it sends meanwhile is read and dropped)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset: closed
        return True


def test_a_client_whose_headers_never_end_is_disconnected(slow_model):
    """A connection whose request line and headers trickle in is closed after --header-timeout: when it opens,
    and on a kept-alive connection after an answer, whose next request's first byte stops uvicorn's keep-alive
    timer; so is one whose client goes on sending the body of a request answered without it. A request whose
    headers arrive in time is answered."""
    server = Server(slow_model, "--header-timeout", "1")
    try:
        trickle = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 20
        with socket.create_connection(("127.0.0.1", server.port)) as fresh:
            assert closed_by_server(fresh, trickle)
        with socket.create_connection(("127.0.0.1", server.port)) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            kept.settimeout(60)
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            assert closed_by_server(kept, trickle)
        # answered before its body came (413: too large to read), the client goes on sending that body
        with raw_request(server, b"{", length=1 << 30) as refused:
            refused.settimeout(60)
            assert refused.recv(65536).startswith(b"HTTP/1.1 413")
            assert closed_by_server(refused, b"a" * 20)
        assert server.get("/health").status_code == 200
    finally:
        server.stop()


def test_a_client_that_stops_reading_its_answer_is_disconnected(slow_model):
    """A client that reads none of a long streamed answer (16 choices of 600 tokens with 20 alternatives each:
    megabytes) is dropped once what waits to be sent has sat there --header-timeout: its connection is reset
    before the answer's end, instead of being held forever by a writer waiting for room in the socket."""
    server = Server(slow_model, "--header-timeout", "1")
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 600, "n": 16,
                           "temperature": 0, "logprobs": True, "top_logprobs": 20, "stream": True}).encode()
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
        conn.connect(("127.0.0.1", server.port))
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: server.get("/health").json()["active"] > 0)
        wait_for(lambda: server.get("/health").json()["active"] + server.get("/health").json()["queued"] == 0,
                 timeout=300)  # the answer generated, or cancelled when its client was dropped
        time.sleep(2)  # past --header-timeout since the buffers filled
        conn.settimeout(30)
        data = b""
        try:
            while chunk := conn.recv(1 << 20):
                data += chunk
        except ConnectionResetError:
            pass
        conn.close()
        assert len(data) < 1 << 20 and b"[DONE]" not in data  # reset, or ended by the server, with most unsent
        assert server.get("/health").status_code == 200
    finally:
        server.stop()


HEALTH = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


def status_on(conn: socket.socket) -> bytes:
    """The status line of the answer to GET /health on the kept-alive `conn`, the whole answer read."""
    conn.sendall(HEALTH)
    conn.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return head.split(b"\r\n")[0]


def served_connection(server: Server, refused: list[bytes]) -> socket.socket:
    """A kept-alive connection the server answers 200 on: a connection closed just before may still count for a
    moment (its close not yet handled), so one answered otherwise (its status line added to `refused`) is closed
    and another opened."""
    for _ in range(200):
        conn = socket.create_connection(("127.0.0.1", server.port))
        status = status_on(conn)
        if status == b"HTTP/1.1 200 OK":
            return conn
        refused.append(status)
        conn.close()
        time.sleep(0.05)
    raise AssertionError("no connection was served")


def test_connections_past_the_cap_are_answered_503_and_closed(slow_model):
    """With --max-connections 2 and two connections open (idle, kept alive), a request on a third is answered in
    OpenAI's error shape, 503 with Retry-After (and counted in /metrics), and that connection is closed; the two
    go on being served, and once one of them closes a new connection is served again."""
    server = Server(slow_model, "--max-connections", "2")
    refused: list[bytes] = []
    try:
        first = served_connection(server, refused)
        second = served_connection(server, refused)
        with first, second:
            third = socket.create_connection(("127.0.0.1", server.port))
            third.sendall(HEALTH)
            head, body = reply(third)  # read until the server closes it
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and error["type"] == "server_error"
            assert status_on(second) == b"HTTP/1.1 200 OK"
            first.close()
            served_connection(server, refused).close()  # served again once the server has seen the close
        assert set(refused) <= {b"HTTP/1.1 503 Service Unavailable"}
        metric = f'babyllama_requests_total{{endpoint="/health",status="503"}} {1 + len(refused)}.0'
        assert metric in server.get("/metrics").text
    finally:
        server.stop()


def test_serve_raises_the_open_files_limit_to_fit_its_connections():
    """A soft limit on open files below --max-connections' needs (macOS's 256) is raised toward the hard one."""
    script = ("import resource; from babyllama.serve import open_files_for; "
              "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard)); open_files_for(512); "
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    soft, hard = (int(v) for v in out.stdout.split())
    assert soft == (576 if hard < 0 else min(576, hard))  # 512 and 64 for the server's own files; -1: unlimited


def test_ctrl_c_ends_the_requests_in_flight_at_once(slow_model):
    """SIGINT with a whole answer and a stream generating, a request queued and one still sending its body:
    each ends at once, the whole answers and the upload with OpenAI's 503, the stream with an error event and
    [DONE]; the server exits (130, as Ctrl-C) without waiting out uvicorn's grace period, and logs no
    traceback."""
    server = Server(slow_model, "--slots", "2")
    answers: dict[str, object] = {}

    def whole(name: str) -> None:
        answers[name] = server.post("/v1/completions", LONG)

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            answers["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

    threads = [threading.Thread(target=whole, args=("whole",)), threading.Thread(target=stream)]
    # sent first: by the time /health shows the others under way, the server is reading its body
    upload = raw_request(server, b'{"prompt":', length=100)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: server.get("/health").json()["active"] == 2)
        threads.append(threading.Thread(target=whole, args=("queued",)))
        threads[-1].start()
        wait_for(lambda: server.get("/health").json()["queued"] == 1)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == -signal.SIGINT  # a shell reports 130
        head, body = reply(upload)
        assert head.startswith(b"HTTP/1.1 503 "), head + body
        assert json.loads(body)["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(timeout=60)
        for name in ("whole", "queued"):
            r = answers[name]
            assert isinstance(r, httpx.Response) and r.status_code == 503, name
            assert r.json()["error"] == {"message": "the server is shutting down", "type": "server_error",
                                         "param": None, "code": "shutting_down"}
        events = answers["stream"]
        assert isinstance(events, list) and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][5:])["error"]["code"] == "shutting_down"
        log = server.log()
        assert "Traceback" not in log and "graceful shutdown exceeded" not in log, log
    finally:
        server.stop()


def test_ctrl_c_twice_exits_without_a_traceback(slow_model):
    """A second Ctrl-C while the server stops (a double tap) forces uvicorn's exit, which cancels the lifespan
    task: that was logged as a traceback of the cancellation. The exit is clean, with status 130."""
    server = Server(slow_model)
    try:
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == -signal.SIGINT  # a shell reports 130
        log = server.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        server.stop()


def test_a_request_just_after_the_signal_to_stop_gets_503(slow_model):
    """The signal to stop refuses new requests at once: uvicorn notices it only at its next tick (up to 0.1 s),
    and until then answered requests on open connections as if nothing had happened. Requests sent on a
    kept-alive connection right after SIGTERM are each answered 503 (shutting_down) until the connection
    closes. (A client held up past the tick finds the connection closed and no answer: on a busy machine the
    signal is sent to a new server again, a few times at most, until one request is answered.)"""
    statuses: list = []
    for _ in range(5):
        server = Server(slow_model)
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                assert client.get("/health").status_code == 200  # the connection is open
                server.proc.send_signal(signal.SIGTERM)
                for _ in range(20):
                    try:
                        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
                    except httpx.TransportError:  # closed: the server is on its way out
                        break
                    statuses.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None))
            assert server.proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            server.stop()
        if statuses:
            break
    assert statuses and set(statuses) == {(503, "shutting_down")}, statuses


def serving_on_port_0(model: str, **popen) -> tuple[subprocess.Popen, int]:
    """`babyllama serve MODEL --port 0` started, and the port its "serving" line names once it answers there."""
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "serve", model, "--port", "0",
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    try:
        line = b""
        while b"serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited"
        port = int(re.search(rb"http://127\.0\.0\.1:(\d+) ", line).group(1))
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, port


def test_a_server_started_with_sigint_ignored_still_exits_130_on_it(slow_model):
    """A server started with SIGINT ignored (`nohup`, a background job of a script) still stops on it, and its
    exit status says so (uvicorn's raising the signal again does nothing there)."""
    proc, _ = serving_on_port_0(slow_model, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_an_address_it_cannot_listen_on_is_one_error_line():
    """A port in use, or an address that is not this machine's: one error line (exit 1), and no "serving"
    line before it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, why in (("127.0.0.1", "address already in use"),
                          ("192.0.2.1", "cannot assign requested address")):  # TEST-NET-1: nobody's address
            out = run_cli("serve", "--host", host, "--port", str(port))
            err = out.stderr.decode()
            assert out.returncode == 1 and "serving" not in err and "Traceback" not in err, err
            assert err.splitlines()[-1] == f"babyllama: error: cannot listen on {host}:{port}: {why}", err


def test_port_0_serves_on_the_port_it_got(slow_model):
    """--port 0: the "serving" line names the free port the system chose, where the server answers."""
    proc, port = serving_on_port_0(slow_model)
    try:
        assert port != 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_kernels_are_built_before_the_server_listens(monkeypatch, capsys):
    """Start-up builds and loads the kernels (as `run`'s first step does) before it binds the address: a
    cold start's first request does not wait for a compiler, and /health is not ok before it can answer."""
    from babyllama import kernels, serve
    from babyllama.cli import main

    monkeypatch.setattr(kernels, "_backend", None)  # as in a fresh process: chosen (and built) on first use
    loaded_when_listening = []

    def listen(host: str, port: int) -> list:
        loaded_when_listening.append(kernels._backend is not None)
        return []

    monkeypatch.setattr(serve, "listen", listen)
    monkeypatch.setattr(serve, "run", lambda *args: None)
    assert main(["serve", "--port", str(free_port())]) == 0
    assert loaded_when_listening == [True]
    assert "serving 'babyllama-stories'" in capsys.readouterr().err


def test_an_ipv6_host_in_brackets_is_that_address(monkeypatch, capsys):
    """--host [::1], as a URL writes the address: the server listens on ::1 (a loopback address: no warning)
    and names it http://[::1]:PORT; the bracketed name is not looked up as a host name."""
    from babyllama import serve
    from babyllama.cli import main

    hosts = []
    monkeypatch.setattr(serve, "listen", lambda host, port: hosts.append(host) or [])
    monkeypatch.setattr(serve, "run", lambda *args: None)
    port = free_port()
    assert main(["serve", "--host", "[::1]", "--port", str(port)]) == 0
    err = capsys.readouterr().err
    assert hosts == ["::1"] and f"on http://[::1]:{port} (" in err and "warning" not in err, err


def test_no_color_turns_the_server_log_s_colors_off(monkeypatch):
    """uvicorn colors its log on a terminal whatever NO_COLOR (no-color.org) or TERM=dumb say; serve passes them on."""
    from babyllama.serve import log_colors

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert log_colors() is None  # uvicorn's choice: colors on a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert log_colors() is False
    monkeypatch.setenv("NO_COLOR", "")  # set but empty: not asked for (no-color.org)
    monkeypatch.setenv("TERM", "dumb")
    assert log_colors() is False


def test_the_access_log_goes_to_stderr_with_the_other_server_lines(capsys):
    """uvicorn writes its per-request lines on stdout and everything else on stderr: they go to stderr, in
    uvicorn's format."""
    import logging

    import uvicorn

    from babyllama.serve import log_config

    uvicorn.Config(lambda scope, receive, send: None, log_config=log_config(), use_colors=False)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/health", "1.1", 200)
    out, err = capsys.readouterr()
    assert out == "" and 'INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 200' in err, (out, err)
