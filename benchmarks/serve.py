"""`babyllama serve` under load, beside single-stream `babyllama run`, on the bench shapes (random weights).

    python benchmarks/serve.py [--shapes 15M 110M] [--formats fp32 q8_0] [--pause-pid FILE] [--out FILE.json]

For each (shape, format) in one run on one machine:
  run      `babyllama run` alone: its "achieved tok/s" (tokens after the first, like run.c), sampled
           (temperature 1, top-p 1: a random model's greedy text soon repeats or ends);
  streams  C clients at once (C = 1, 4, 8, 16) each streaming completions of --tokens tokens after a short
           prompt, twice: aggregate generated tokens/s over the phase's wall time (prefill and time to first
           token included) and p50/p99 time to first token;
  arrivals 7 streams decoding while --long-prompt-token prompts arrive one per second: their TTFT p50/p99;
  burst    7 streams decoding when 8 such prompts arrive at once: TTFT p50/p99, and the running streams'
           time between tokens (p50/p99/max) while the burst is prefilled (chunked prefill bounds it): between
           chunks, strictly (a chunk holds a step's token, or several when the server's event loop fell behind).
Clients are threads of this process, each streaming over a plain socket (HTTP/1.1, de-chunking and splitting the
events by hand) and parsing no JSON but the last chunk's `usage`: the tokens counted are the ones the server
reports having generated and sent; a chunk's arrival time is that of the read that brought it. An HTTP library and
a JSON parse per chunk cost the client about as much CPU per token as the server spends, on the same cores. Models
come from babyllama.bench (cached under $BABYLLAMA_BENCH_DIR, $BABYLLAMA_CACHE/bench or ~/.cache/babyllama/bench);
the tokenizer is Meta's 32000-token one from ../shared/fixtures (-z to name another). Prompts are token ids
(distinct random ones: no prefix reuse). With --pause-pid, the process in that file (a background training job) is
stopped (SIGSTOP) for the measurements and always continued (SIGCONT) after. The load average is printed with
every phase: the figures only mean something on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from babyllama.bench import FORMATS, SHAPES, cache_dir, describe_machine, model_file  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer.bin"
VOCAB = 32000


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


@contextmanager
def paused(pid_file: str | None):
    """SIGSTOP the process named in pid_file for the block; SIGCONT it whatever happens."""
    pid = int(Path(pid_file).read_text().split()[0]) if pid_file and Path(pid_file).exists() else None
    if pid is not None:
        os.kill(pid, signal.SIGSTOP)
        print(f"paused pid {pid}", file=sys.stderr)
    try:
        yield
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
            print(f"continued pid {pid}", file=sys.stderr)


def run_speed(model: Path, tokenizer: Path, tokens: int) -> float:
    cmd = [sys.executable, "-m", "babyllama", "run", str(model), "-z", str(tokenizer), "-t", "1", "-p", "1",
           "-s", "7", "-i", "Once upon a time", "--max-new-tokens", str(tokens)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return float([x for x in out.stderr.splitlines() if x.startswith("achieved tok/s:")][-1].split(":")[1])


class Server:
    def __init__(self, model: Path, tokenizer: Path, slots: int, chunk: int):
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "babyllama", "serve", str(model), "-z", str(tokenizer), "--port", str(self.port),
               "--slots", str(slots), "--queue", "256", "--chunk", str(chunk), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        try:  # a server that never came up (or Ctrl-C meanwhile) is stopped here: no caller holds it yet
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self) -> None:
        for _ in range(600):
            if self.proc.poll() is not None:  # it refused its flags, or died: its own message is above
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it started")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Stream:
    """One streamed completion over a plain socket: when it was sent, when each chunk with text came, and the
    tokens the server reports having generated and sent (the stream's `usage`)."""

    def __init__(self, url: str, prompt: list[int], tokens: int, seed: int):
        self.sent = time.perf_counter()
        self.times: list[float] = []
        self.n = 0
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "seed": seed,
                "stream": True, "stream_options": {"include_usage": True}}
        for at, event in sse_events(url, "/v1/completions", json.dumps(body).encode()):
            if event.startswith(b'{"id"') and b'"usage":{' in event:
                self.n = json.loads(event)["usage"]["completion_tokens"]
            elif event.startswith(b"{") and b'"text":""' not in event:
                self.times.append(at)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent


def sse_events(url: str, path: str, body: bytes):
    """POST body and yield (arrival time, data of each server-sent event) from the chunked answer. A client
    this thin (no HTTP library, one JSON parse per stream) leaves the benchmark's shared cores to the server."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=600) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += recv(sock)
        head, raw = raw.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        text = b""  # the de-chunked body not yet split into events
        at = time.perf_counter()
        while True:
            while b"\r\n" not in raw:
                raw += recv(sock)
                at = time.perf_counter()
            size_line, rest = raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += recv(sock)
                at = time.perf_counter()
            text += rest[:size]
            raw = rest[size + 2:]
            *events, text = text.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield at, event[6:]
            if size == 0:
                return


def recv(sock) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise RuntimeError("the server closed the connection mid-answer")
    return data


def prompt_ids(seed: int, n: int) -> list[int]:
    import numpy as np

    return [1] + np.random.default_rng(seed).integers(3, VOCAB, n - 1).tolist()


def in_threads(fns) -> list:
    results = [None] * len(fns)

    def call(i):
        results[i] = fns[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def streams_phase(url: str, clients: int, tokens: int, rounds: int = 2) -> dict:
    def client(c):
        return [Stream(url, prompt_ids(1000 * c + r, 8), tokens, 100 * c + r) for r in range(rounds)]

    start = time.perf_counter()
    done = [s for per in in_threads([lambda c=c: client(c) for c in range(clients)]) for s in per]
    wall = time.perf_counter() - start
    ttfts = [s.ttft for s in done]
    return {"clients": clients, "requests": len(done), "tokens": sum(s.n for s in done),
            "tok_s": sum(s.n for s in done) / wall, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "load": load()}


def background_streams(url: str, n: int, tokens: int, stop: threading.Event, out: list) -> list[threading.Thread]:
    """n clients streaming back to back until `stop`; every finished Stream goes to `out`."""
    def loop(c):
        r = 0
        while not stop.is_set():
            out.append(Stream(url, prompt_ids(5000 + 100 * c + r, 8), tokens, c + r))
            r += 1

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in range(n)]
    for t in threads:
        t.start()
    return threads


def long_prompt_phase(url: str, prompt_len: int, bg_tokens: int, burst: bool, count: int = 8) -> dict:
    stop, bg = threading.Event(), []
    threads = background_streams(url, 7, bg_tokens, stop, bg)
    time.sleep(2.0)  # the 7 streams are decoding
    t0 = time.perf_counter()
    arrivals = []

    def arrive(i):
        if not burst:
            time.sleep(max(0.0, t0 + i - time.perf_counter()))
        arrivals.append(Stream(url, prompt_ids(9000 + i, prompt_len), 4, 9000 + i))

    in_threads([lambda i=i: arrive(i) for i in range(count)])
    t1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    gaps = [b - a for s in bg for a, b in zip(s.times, s.times[1:]) if t0 <= a and b <= t1]
    ttfts = [s.ttft for s in arrivals]
    return {"prompt_tokens": prompt_len, "arrivals": len(arrivals), "ttft_p50": pct(ttfts, 50),
            "ttft_p99": pct(ttfts, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "itl_max": max(gaps, default=float("nan")), "load": load()}


def measure(shape: str, fmt: str, tokenizer: Path, tokens: int, long_prompt: int, chunk: int) -> dict:
    model = model_file(shape, fmt, cache_dir())
    from babyllama.bench import shape_args

    seq_len = shape_args(shape).max_seq_len
    prompt_len = min(long_prompt, seq_len - 8)
    row = {"shape": shape, "format": fmt, "run_tok_s": run_speed(model, tokenizer, tokens), "run_load": load()}
    print(f"{shape} {fmt}: run {row['run_tok_s']:.1f} tok/s (load {row['run_load']})", file=sys.stderr)
    server = Server(model, tokenizer, 16, chunk)
    try:
        Stream(server.url, prompt_ids(1, 8), 8, 1)  # warm-up
        row["streams"] = []
        for c in (1, 4, 8, 16):
            r = streams_phase(server.url, c, tokens)
            row["streams"].append(r)
            print(f"  {c:2d} streams: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} p99 {r['ttft_p99']:.3f} s "
                  f"(load {r['load']})", file=sys.stderr)
        bg_tokens = min(tokens * 2, seq_len - 16)
        row["arrivals"] = long_prompt_phase(server.url, prompt_len, bg_tokens, burst=False)
        row["burst"] = long_prompt_phase(server.url, prompt_len, bg_tokens, burst=True)
        for name in ("arrivals", "burst"):
            r = row[name]
            print(f"  {name}: TTFT p50 {r['ttft_p50']:.3f} p99 {r['ttft_p99']:.3f} s; running streams' time between "
                  f"tokens p50 {1000 * r['itl_p50']:.0f} p99 {1000 * r['itl_p99']:.0f} max {1000 * r['itl_max']:.0f} "
                  f"ms (load {r['load']})", file=sys.stderr)
    finally:
        server.stop()
    return row


def table(rows: list[dict]) -> str:
    head = ("| shape | format | `run` tok/s | 1 stream | 4 streams | 8 streams | 16 streams | 8 streams / `run` "
            "| TTFT p50 / p99 at 1, 8, 16 streams (s) |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        s = {x["clients"]: x for x in r["streams"]}
        lines.append(f"| {r['shape']} | {r['format']} | {r['run_tok_s']:.1f} | "
                     + " | ".join(f"{s[c]['tok_s']:.1f}" for c in (1, 4, 8, 16))
                     + f" | {s[8]['tok_s'] / r['run_tok_s']:.2f}x | "
                     + ", ".join(f"{s[c]['ttft_p50']:.2f} / {s[c]['ttft_p99']:.2f}" for c in (1, 8, 16)) + " |")
    lines += ["", "| shape | format | prompt tokens | arriving 1/s beside 7 streams: TTFT p50 / p99 (s) "
                  "| burst of 8: TTFT p50 / p99 (s) "
                  "| burst: running streams' time between tokens p50 / p99 / max (ms) |", "|" + " --- |" * 6]
    for r in rows:
        a, b = r["arrivals"], r["burst"]
        lines.append(f"| {r['shape']} | {r['format']} | {a['prompt_tokens']} | {a['ttft_p50']:.2f} / "
                     f"{a['ttft_p99']:.2f} | {b['ttft_p50']:.2f} / {b['ttft_p99']:.2f} | {1000 * b['itl_p50']:.0f} / "
                     f"{1000 * b['itl_p99']:.0f} / {1000 * b['itl_max']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["15M", "110M"])
    ap.add_argument("--formats", nargs="+", default=["fp32", "q8_0"])
    ap.add_argument("-z", "--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--tokens", type=int, default=96, help="tokens per streamed completion (96)")
    ap.add_argument("--long-prompt", type=int, default=256, help="prompt tokens of the arrivals (256)")
    ap.add_argument("--chunk", type=int, default=128, help="the server's --chunk (128)")
    ap.add_argument("--pause-pid", default=None, metavar="FILE", help="SIGSTOP this pid (a file) while measuring")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not args.tokenizer.exists():
        sys.exit(f"tokenizer {args.tokenizer} not found (-z)")
    for flag, given, known in (("--shapes", args.shapes, SHAPES), ("--formats", args.formats, FORMATS)):
        if any(g not in known for g in given):
            ap.error(f"{flag} takes {', '.join(known)}, got {' '.join(given)}")
    for flag in ("tokens", "long_prompt", "chunk"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.out:  # before the measurement, not after it
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.touch()
    for shape in args.shapes:  # built before the clock: writing 440 MB is no measurement
        for fmt in args.formats:
            model_file(shape, fmt, cache_dir())
    machine = describe_machine()
    with paused(args.pause_pid):
        rows = [measure(s, f, args.tokenizer, args.tokens, args.long_prompt, args.chunk)
                for s in args.shapes for f in args.formats]
    result = table(rows)
    print(f"{machine}\nload average at the end: {load()}\n\n{result}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
