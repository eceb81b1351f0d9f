"""Shared fixtures: paths into ../shared (skipped with a reason when absent) and tiny random models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from babyllama import formats
from babyllama.config import ModelArgs
from babyllama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BABYLLAMA_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the llama2.c fixtures; CI has it)")
    return path


@pytest.fixture
def stories260k() -> Path:
    return shared_file("fixtures/stories260K.bin")


@pytest.fixture
def tok512() -> Path:
    return shared_file("fixtures/tok512.bin")


def random_weights(args: ModelArgs, seed: int = 0, scale: float = 0.05) -> formats.Weights:
    """A model of `args`' shape with random fp32 weights (norm gains near 1)."""
    rng = np.random.default_rng(seed)
    L, d, h, kv, V = args.n_layers, args.dim, args.hidden_dim, args.kv_dim, args.vocab_size

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    emb = r(V, d)
    return formats.Weights(
        args, emb,
        rms_att=(1 + r(L, d)), rms_ffn=(1 + r(L, d)), rms_final=(1 + r(d)),
        wq=r(L, d, d), wk=r(L, kv, d), wv=r(L, kv, d), wo=r(L, d, d),
        w1=r(L, h, d), w2=r(L, d, h), w3=r(L, h, d),
        wcls=emb if args.shared_classifier else r(V, d),
    )


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=64, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


def byte_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A tokenizer with llama2.c's special and byte tokens plus a few merges, padded to vocab_size."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    extra = [b" ", b"e", b"t", b"a", b"o", b" t", b"th", b" th", b"he", b" the", b"in", b"an"]
    pieces += extra
    pieces += [f"tok{i}".encode() for i in range(vocab_size - len(pieces))]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    return Tokenizer(pieces, scores)


def run_cli(*args: str, input: str | None = None, timeout: float = 120, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m babyllama ARGS` as a user would; returns the completed process (bytes stdout).
    `env` adds to the environment; the package is found from any `cwd`."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "babyllama", *args], input=input.encode() if input else None,
                          capture_output=True, timeout=timeout, cwd=cwd or ROOT, env=full_env)


_NAMES = ["Tim", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Sue"]
_ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck"]
_PLACES = ["park", "garden", "forest", "beach", "house", "school"]
_THINGS = ["ball", "kite", "toy", "hat", "book", "cake"]
_FEELINGS = ["happy", "sad", "tired", "excited", "scared"]


def make_story_corpus(path: Path, n_stories: int, seed: int = 0) -> Path:
    """A TinyStories-layout text file (stories separated by `<|endoftext|>` lines) from a small grammar:
    a few hundred KB of learnable text, made on the spot (no dataset needed)."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    stories = []
    for _ in range(n_stories):
        name, animal, place, thing = pick(_NAMES), pick(_ANIMALS), pick(_PLACES), pick(_THINGS)
        lines = [f"Once upon a time, there was a little {animal} named {name}.",
                 f"{name} liked to play in the {place} with a {thing}.",
                 f"One day, {name} lost the {thing} and felt {pick(_FEELINGS)}.",
                 f"A friend found the {thing} near the {pick(_PLACES)}.",
                 f"{name} was {pick(_FEELINGS)} and said thank you. The end."]
        stories.append(" ".join(lines[:3]) + "\n" + " ".join(lines[3:]))
    path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


class RangeServer(ThreadingHTTPServer):
    """A local HTTP server for download tests. Serves `files` ({URL path: bytes}, or one payload at any
    path), honours `Range: bytes=N-` (416 past the end) unless `honour_ranges` is False, advertises
    `advertised` as a sha256 the way Hugging Face does, and logs (path, Range header) per request."""

    def __init__(self, files: dict[str, bytes] | bytes, advertised: str | None = None):
        self.files, self.advertised = files, advertised
        self.honour_ranges = True
        self.log: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), _RangeHandler)

    @property
    def ranges(self) -> list[str | None]:
        return [rng for _, rng in self.log]

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path.lstrip('/')}"


class _RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv, rng = self.server, self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.files if isinstance(srv.files, bytes) else srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        partial = bool(rng) and srv.honour_ranges
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if partial else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if srv.advertised:
            self.send_header("X-Linked-Etag", f'"{srv.advertised}"')
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """`serve(files, advertised=None)` starts a RangeServer in a thread; all are shut down after the test."""
    servers = []

    def start(files: dict[str, bytes] | bytes, advertised: str | None = None) -> RangeServer:
        server = RangeServer(files, advertised)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def train_sentencepiece(path: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """A small sentencepiece BPE model with Llama 2's settings (byte fallback, no normalization, digits
    split), trained in a second on made-up sentences: any vocab size from ~300 up."""
    spm = pytest.importorskip("sentencepiece")
    import io

    rng = np.random.default_rng(seed)
    words = "the a cat dog sat on mat ran to park sun was happy little girl boy played with ball tree big red".split()
    lines = [" ".join(rng.choice(words, 12)) + "." for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, allow_whitespace_only_pieces=True,
                                   minloglevel=2, num_threads=1)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A 320-token sentencepiece model (tiny_args(vocab_size=320) models go with it)."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok320.model", 320)


def engine_logits(weights: formats.Weights, tokens) -> np.ndarray:
    """The NumPy engine's logits (T, vocab) at every position of one sequence."""
    from babyllama.engine import Engine

    engine = Engine(weights)
    return engine.forward(tokens, np.arange(len(tokens)), engine.new_cache())


def top2_margin(logits: np.ndarray) -> float:
    """The gap between the largest and the second-largest logit of one row."""
    top = np.partition(np.asarray(logits, dtype=np.float64), -2)[-2:]
    return float(top[1] - top[0])


def assert_greedy_agree(expected: list[int], actual: list[int], logits_at, max_margin: float,
                        min_same: int = 1) -> int:
    """Greedy token streams from two different arithmetic paths agree: identical, or identical up to a
    position where the argmax was a near-tie. `logits_at(i)` gives the logits (of either path) that chose
    token i; at the first difference their top-2 margin must be below `max_margin` (a real bug diverges
    with a clear winner). Returns how many leading tokens are equal (at least `min_same`)."""
    same = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
    assert same >= min_same, f"the streams differ at token {same} (< {min_same})"
    if same < min(len(expected), len(actual)):
        margin = top2_margin(logits_at(same))
        assert margin < max_margin, f"token {same} differs ({expected[same]} vs {actual[same]}) with a clear " \
                                    f"top-2 margin {margin:.4f} >= {max_margin}: not a near-tie"
    else:
        assert len(expected) == len(actual), f"lengths differ: {len(expected)} vs {len(actual)}"
    return same


@pytest.fixture
def one_thread():
    """PyTorch on one thread during the test (tiny models: more threads only add overhead on a shared machine)."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torch_checkpoint(path: Path, args: ModelArgs, seed: int = 0, scale: float = 0.2):
    """Our PyTorch model with random weights, saved as a training checkpoint at `path`; returns the model."""
    pytest.importorskip("torch")
    from babyllama.model import Transformer
    from babyllama.train import checkpoint

    model = Transformer.from_weights(random_weights(args, seed, scale)).eval()
    checkpoint.save({"model": model.state_dict(), "model_args": args.to_dict()}, path)
    return model


def torch_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits, _ = model(torch.tensor([list(tokens)]))
    return logits[0].numpy()
