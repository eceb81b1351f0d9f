"""Shared fixtures: paths into ../shared (skipped with a reason when absent) and tiny random models."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from babyllama import formats
from babyllama.config import ModelArgs
from babyllama.tokenizer import EOS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BABYLLAMA_SHARED", ROOT.parent / "shared"))


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


# a chat template other than Llama 2's (ChatML, as Hugging Face and llama.cpp write it in Jinja)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def cpu_has(*flags: str) -> bool:
    from babyllama import kernels_native

    have = kernels_native.cpu_flags()
    return have is not None and set(flags) <= have


@functools.cache
def llama_cpp_trouble() -> str | None:
    """Why llama.cpp (llama-cpp-python, the bench extra) cannot decode here, or None: not installed, or its
    process dies decoding a tiny Q8_0 GGUF (bench.llamacpp_trial, once: PyPI's llama-cpp-python builds for the CPU
    it is installed on, and on Sapphire Rapids-class Xeons its AMX matrix products crash). Any other failure is the
    test's to report."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python (the bench extra) is not installed"
    from babyllama import bench
    from babyllama.interop.gguf import save_gguf
    from babyllama.interop.vocab import from_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        save_gguf(random_weights(tiny_args(dim=64, hidden_dim=128)), path, from_tokenizer(byte_tokenizer(300)), "q8_0")
        try:
            bench.llamacpp_trial(path)
        except RuntimeError as e:
            if str(e).startswith("killed by"):
                return f"llama.cpp (llama-cpp-python) dies decoding here: {e}"
    return None


def crashing_program(path: Path, logged: str = "") -> str:
    """An executable at `path` that prints `logged` on stderr, then dies of SIGSEGV, as a native library's crash
    ends a process (a stand-in for a reference program, or for the Python a measuring child runs on)."""
    path.write_text(f"#!/bin/sh\n{f'echo {logged!r} >&2' if logged else ''}\nkill -SEGV $$\n")
    path.chmod(0o755)
    return str(path)


def require_llama_cpp() -> None:
    """Skip the test, with the reason, where llama.cpp cannot decode here (llama_cpp_trouble)."""
    reason = llama_cpp_trouble()
    if reason is not None:
        pytest.skip(reason)


def native_build(arch: str):
    """The native kernels built for instruction set `arch` (kernels_native.ARCHES, or any -march value), or a
    skip saying why they cannot run here."""
    from babyllama import kernels_native

    if kernels_native.compiler() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    needs = kernels_native.ARCHES[arch][1] if arch in kernels_native.ARCHES else set()
    if needs and not cpu_has(*needs):
        pytest.skip(f"the CPU lacks {', '.join(sorted(needs - (kernels_native.cpu_flags() or set())))}: the "
                    f"{arch} build cannot run here")
    k = kernels_native.load(arch)
    if k is None:
        pytest.skip(f"the {arch} build failed (compiler too old for its -march?)")
    return k


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


def scripted_weights(chain: dict[int, int], vocab_size: int = 300, seq_len: int = 64) -> formats.Weights:
    """A model whose greedy next token is chain[token], EOS after any other token: its blocks add nothing to the
    residual (zero matrices), each token in chain has an embedding axis of its own (the others share the last
    one), and the classifier maps an axis to the token that follows."""
    states = sorted(chain)
    args = tiny_args(dim=max(32, -(-(len(states) + 1) // 8) * 8), vocab_size=vocab_size, max_seq_len=seq_len)
    w = random_weights(args)
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        getattr(w, name)[:] = 0
    w.rms_att[:], w.rms_ffn[:], w.rms_final[:] = 1, 1, 1
    emb, cls = np.zeros((vocab_size, args.dim), np.float32), np.zeros((vocab_size, args.dim), np.float32)
    emb[:, -1], cls[EOS, -1] = 1.0, 30.0
    for k, t in enumerate(states):
        emb[t, -1], emb[t, k], cls[chain[t], k] = 0.0, 1.0, 30.0
    w.tok_embeddings, w.wcls = emb, cls
    return w


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=64, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(kind: str, **kw) -> formats.Weights:
    """A random model of rows wide enough for every kernel's blocks (dim 64, grouped-query heads), as `kind`:
    fp32, q8_0 (runq.c's groups) or q4_0 (llama.cpp's blocks)."""
    args = tiny_args(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=320, **kw)
    w = random_weights(args, scale=0.2)
    return {"fp32": w, "q8_0": w.quantize(), "q4_0": w.quantize_q4()}[kind]


def byte_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A tokenizer with llama2.c's special and byte tokens plus a few merges, padded to vocab_size."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    extra = [b" ", b"e", b"t", b"a", b"o", b" t", b"th", b" th", b"he", b" the", b"in", b"an"]
    pieces += extra
    pieces += [f"tok{i}".encode() for i in range(vocab_size - len(pieces))]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    return Tokenizer(pieces, scores)


def recording_bar(events: list[int]) -> type:
    """A stand-in for progress.progress_bar that records its total (as -total) and then each update."""
    class Bar:
        def __init__(self, total: int | None = None, **kw):
            events.append(-(total or 0))

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> bool:
            return False

        def update(self, n: int) -> None:
            events.append(n)

    return Bar


def never_ending_model(folder: Path) -> Path:
    """A random model with a 2048-token context whose greedy text never ends early (BOS's and EOS's classifier
    rows are zero, so their logits (0) lose to the largest of the other 298), and a byte tokenizer beside it.
    14M parameters: 2000 tokens take seconds on a fast machine too. Returns the model's path."""
    weights = random_weights(tiny_args(dim=384, n_layers=8, n_heads=6, n_kv_heads=6, hidden_dim=1024,
                                       max_seq_len=2048, shared_classifier=False))
    weights.wcls[1:3] = 0
    formats.save(weights, folder / "m.bin", version=1)
    byte_tokenizer(300).save(folder / "tokenizer.bin")
    return folder / "m.bin"


def sigint_default() -> None:
    """A `preexec_fn` for children that a test interrupts with SIGINT: a shell starts background jobs with SIGINT
    ignored and children inherit that (Python then installs no KeyboardInterrupt handler), so in a suite run
    with `&` they would not see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, input: str | bytes | None = None, timeout: float = 120, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m babyllama ARGS` as a user would; returns the completed process (bytes stdout).
    `env` adds to the environment; the package is found from any `cwd`."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    stdin = input.encode() if isinstance(input, str) else input
    return subprocess.run([sys.executable, "-m", "babyllama", *args], input=stdin or None,
                          capture_output=True, timeout=timeout, cwd=cwd or ROOT, env=full_env)


def alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie waiting for its parent is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# The kernel backend is chosen (and its libraries loaded: numba's LLVM alone is ~70 MB resident) before any
# figure is taken, so that the scripts measure the model's memory, not the backend's code.
MEMORY_PRELUDE = """
from babyllama import kernels
kernels.backend()

def status(field):  # a /proc/self/status figure in bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

def peak_from_here():  # resident bytes now; the peak (VmHWM) starts again from here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS:")
"""


# open_model(argv[1], quantize=argv[2] or "-" for none): the peak resident bytes it adds, and the bytes of the
# layer matrices it returns
LOAD_PEAK = """
import sys
from babyllama import formats
from babyllama.loading import open_model

before = peak_from_here()
w = open_model(sys.argv[1], quantize=None if sys.argv[2] == "-" else sys.argv[2]).weights
print(status("VmHWM:") - before, sum(a.nbytes for ms in w.layer_matrices().values() for m in ms
                                     for a in formats.matrix_arrays(m)))
"""


def run_memory_script(script: str, *args: str) -> list[int]:
    """Run `script` in a fresh interpreter with the package on its path, after MEMORY_PRELUDE (its `status` and
    `peak_from_here`); the integers it prints. Callers skip where /proc/self/clear_refs cannot be written."""
    r = subprocess.run([sys.executable, "-c", MEMORY_PRELUDE + script, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return [int(v) for v in r.stdout.split()]


@dataclass
class Limited:
    """What `run_limited` saw: exit code (negative: killed by that signal), output, the child's peak
    resident memory, and whether it ran out of time (then it was killed)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    max_rss: int  # bytes
    timed_out: bool


# thread pools sized for the test, not the machine: each thread reserves stack and malloc-arena address
# space, which an address-space limit counts
SMALL_POOLS = {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2",
               "MALLOC_ARENA_MAX": "2"}


# The launcher of run_limited: sets the address-space limit, runs the command in a child of its own and reports
# that child's peak RSS on a pipe. A process's ru_maxrss starts from its parent's RSS at fork time (and keeps
# it across exec), so the command is forked from this small launcher, not from the (large) test process.
_LAUNCHER = """
import os, resource, signal, sys
fd, limit, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
os.write(fd, str(usage.ru_maxrss * 1024).encode())
os.close(fd)
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_limited(args: list[str], address_space: int = 1 << 30, timeout: float = 120, env: dict | None = None,
                cwd: Path | None = None, stdin: bytes | None = None, program: list[str] | None = None) -> Limited:
    """Run `python -m babyllama ARGS` (or `program`) under an address-space limit (RLIMIT_AS), so that an
    allocation sized by a corrupt file fails instead of swapping the machine, and report its own peak memory
    and whether it hung (its process group is killed after `timeout` seconds)."""
    import signal

    full_env = {**os.environ, **SMALL_POOLS,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})}
    cmd = program or [sys.executable, "-m", "babyllama", *args]
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report_w), str(address_space), *cmd],
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or ROOT, env=full_env,
                                pass_fds=(report_w,), start_new_session=True)
    finally:
        os.close(report_w)
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        out, err = proc.communicate(stdin)
    finally:
        timer.cancel()
    with os.fdopen(report_r, "rb") as report:
        peak = report.read()
    return Limited(proc.returncode, out, err, int(peak) if peak else 0, killed.is_set())


def one_line_error(result, pattern: str, code: int = 1) -> str:
    """The process failed with exactly one line on stderr, our error line containing `pattern`."""
    err = result.stderr.decode(errors="replace")
    assert not getattr(result, "timed_out", False), f"hung: {err}"
    assert result.returncode == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("babyllama") and ": error: " in lines[0] and pattern in lines[0], err
    return lines[0]


def cli_error(capsys, *argv: str, code: int = 1) -> str:
    """`babyllama ARGV` run in this process: exit `code` (2: argparse's usage error) and one error line on
    stderr, which is returned."""
    from babyllama.cli import main

    if code == 2:  # argparse's own usage errors exit; babyllama's (errors.UsageError) return 2
        try:
            status = main(list(argv))
        except SystemExit as e:
            status = e.code
        assert status == 2
    else:
        assert main(list(argv)) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # argparse names the subcommand ("babyllama data pretokenize: error: ..."); babyllama's own line does not
    prefix = "babyllama" if code == 2 else "babyllama: error: "
    assert len(err) == 1 and err[0].startswith(prefix) and ": error: " in err[0], err
    return err[0]


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
    path) with a strong ETag (a hash of the bytes), honours `Range: bytes=N-` (416 past the end) unless
    `honour_ranges` is False, and an `If-Range` that names another version with the whole file; advertises
    `advertised` as a sha256 the way Hugging Face does, answers the paths of `redirects` with a 302, and logs (path,
    Range header) per request."""

    def __init__(self, files: dict[str, bytes] | bytes, advertised: str | None = None):
        self.files, self.advertised = files, advertised
        self.honour_ranges = True
        self.cut_after: int | None = None  # send this many bytes of the next response, then close (a lost connection)
        self.redirects: dict[str, str] = {}  # URL path -> where a 302 sends it
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
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files if isinstance(srv.files, bytes) else srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if_range = self.headers.get("If-Range")
        partial = bool(rng) and srv.honour_ranges and if_range in (None, etag)
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if partial else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        if srv.advertised:
            self.send_header("X-Linked-Etag", f'"{srv.advertised}"')
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:
            body, srv.cut_after = body[:srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

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


def train_sentencepiece(path: Path, vocab_size: int = 320, seed: int = 0, **options) -> Path:
    """A small sentencepiece BPE model with Llama 2's settings (byte fallback, no normalization, digits
    split), trained in a second on made-up sentences: any vocab size from ~300 up. `options`: more of the
    trainer's settings."""
    spm = pytest.importorskip("sentencepiece")
    import io

    rng = np.random.default_rng(seed)
    words = "the a cat dog sat on mat ran to park sun was happy little girl boy played with ball tree big red".split()
    lines = [" ".join(rng.choice(words, 12)) + "." for _ in range(400)]
    buf = io.BytesIO()
    settings = dict(model_type="bpe", byte_fallback=True, character_coverage=1.0,
                    normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                    allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   **{**settings, **options})
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


def logits_after(engine, tokens) -> np.ndarray:
    """`engine`'s logits for the token that follows `tokens` (one prefill in a fresh cache): the logits that
    chose it, for `assert_greedy_agree`'s `logits_at`."""
    return engine.forward(list(tokens), np.arange(len(tokens)), engine.new_cache(), logits="last")[0]


def batched_decode_side_by_side(engine, other, vocab_size: int, steps: int):
    """Three sequences prompted at different lengths into both engines' caches, then decoded together one token
    each per step at different positions (the step that --compile captures as a CUDA graph): yields each
    step's (NumPy engine's logits, `other`'s logits); the NumPy engine's argmax feeds the next step."""
    caches = engine.new_cache(3), other.new_cache(3)
    rng = np.random.default_rng(2)
    for slot, n in enumerate((5, 9, 2)):
        prompt = rng.integers(0, vocab_size, n)
        for eng, cache in zip((engine, other), caches):
            eng.forward(prompt, np.arange(n), cache, slots=np.full(n, slot))
    slots, positions = np.array([2, 0, 1]), np.array([2, 5, 9])
    tokens = rng.integers(0, vocab_size, 3)
    for _ in range(steps):
        want = engine.forward(tokens, positions, caches[0], slots=slots)
        yield want, other.forward(tokens, positions, caches[1], slots=slots)
        tokens, positions = want.argmax(-1), positions + 1


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


def resident_bytes(a: np.ndarray) -> int:
    """Resident bytes of the mappings that hold a's bytes (Linux: /proc/self/smaps; madvise on part of a
    mapping splits it, so there may be several), whole mappings counted."""
    start, end = a.ctypes.data, a.ctypes.data + a.nbytes
    inside, total, found = False, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if head.count("-") == 1 and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < end and start < hi
                found |= inside
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    assert found, "no mapping holds the array"
    return total


_LIFT_AFTER_CALL: list = []  # what undoes a limit set for a test's body alone (small_file_limit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Limits on this process set for a test are lifted as soon as its body returns: pytest then writes the test's
    progress to its own output, which may be a file already over the limit (a CI log)."""
    yield
    while _LIFT_AFTER_CALL:
        _LIFT_AFTER_CALL.pop()()


@pytest.fixture
def file_size_limit():
    """A function that limits the size files of this process may grow to, from then on for the rest of the test's
    body (RLIMIT_FSIZE, as `ulimit -f` sets): a disk that fills up."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def lift() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def limit(nbytes: int) -> None:
        if hard != resource.RLIM_INFINITY and hard < nbytes:
            pytest.skip("the hard file-size limit is below the test's")
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
        _LIFT_AFTER_CALL.append(lift)

    try:
        yield limit
    finally:
        lift()


SMALL_FILE_LIMIT = 16 << 10


@pytest.fixture
def small_file_limit(file_size_limit):
    """Files of this process may grow to SMALL_FILE_LIMIT (16 KB) while the test's body runs."""
    file_size_limit(SMALL_FILE_LIMIT)


@contextlib.contextmanager
def folder_held_elsewhere(path):
    """The folder `path` locked as another process's safeio.folder_lock holds it: a flock of its own (flock locks
    belong to an open file, so this conflicts with this process's folder_lock too)."""
    fcntl = pytest.importorskip("fcntl")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)
