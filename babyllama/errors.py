"""The one exception type for user-facing mistakes.

The CLI turns a `BabyLlamaError` into a single line on stderr and a non-zero exit, and so an `OSError` that
escapes (the system's refusal, named with its file); anything else is a bug and keeps its traceback.
"""

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from types import ModuleType


class BabyLlamaError(Exception):
    """A problem with the user's input (bad file, bad flag, missing dependency), not a bug."""


class _StderrLines(logging.Handler):
    """Each record's line on stderr as it is; one that cannot be written (stderr closed, a full disk, a reader
    gone) is dropped rather than ending the work it was about."""

    def emit(self, record: logging.LogRecord) -> None:
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: a closed stream
                print(getattr(record, "line", record.getMessage()), file=sys.stderr, flush=True)


# The package's diagnostics (notes at INFO, warnings at WARNING) go through the "babyllama" logger, whose own
# handler prints them on stderr as the CLI shows them. A program that embeds babyllama quiets them with
# logging.getLogger("babyllama").setLevel(logging.ERROR), or takes them into its own logs by setting
# propagate = True and removing that handler; a logger the program set a level or handler on before the import
# is left as it is.
LOG = logging.getLogger("babyllama")
if LOG.level == logging.NOTSET and not LOG.handlers:
    LOG.addHandler(_StderrLines())
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def say(line: str, level: int = logging.INFO) -> None:
    """A diagnostic line on stderr: a record of the "babyllama" logger. Its stderr handler prints the line as it
    is (a file name's bytes that are not UTF-8, which Python holds as lone surrogates, as those bytes); the
    record's message, which other handlers may write to a UTF-8 file, has them as U+FFFD."""
    try:
        message = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        message = line.encode("utf-8", "backslashreplace").decode("utf-8")
    LOG.log(level, message, extra={"line": line})


def note(message: str) -> None:
    """Something the user may want to know, on stderr, marked as every diagnostic of the CLI is."""
    say(f"babyllama: note: {message}")


def warn(message: str) -> None:
    """Something that probably is not what the user meant, on stderr (the command goes on)."""
    say(f"babyllama: warning: {message}", logging.WARNING)


class UsageError(BabyLlamaError):
    """A command line that does not say enough to run (a required value left out where the parser cannot tell):
    exit status 2, as argparse's own usage errors."""


# the PyTorch that the extras' hints, the README, docs/ and .ci/run install first (its CPU wheel, where pip's
# configuration offers one): a bare torch requirement pulls a multi-GB CUDA build
TORCH_PIN = "torch==2.13.0"


def missing_extra(what: str, extra: str) -> BabyLlamaError:
    """The error for a feature whose optional dependencies are not installed: the install command for the
    released package and for a source checkout (PyTorch's CPU wheel first, where the extra needs torch)."""
    torch_first = f"pip install {TORCH_PIN} && " if extra in ("train", "interop") else ""
    return BabyLlamaError(f"{what} needs babyllama's '{extra}' extra: {torch_first}pip install 'babyllama[{extra}]' "
                          f"(in a source checkout: {torch_first}pip install -e '.[{extra}]')")


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise `missing_extra(what, extra)`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(what, extra) from None


class Terminated(SystemExit):
    """SIGTERM (kill, timeout, a batch scheduler, a service manager) turned into an exception in the main thread
    by `sigterm_unwinds`: the command unwinds as after Ctrl-C (a compile stopped, temporary files removed,
    workers ended, locks let go) and the process exits with status 143."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Terminated for the block (in the main thread only, where handlers are set), instead of
    ending the process where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def counted(n: int, one: str, many: str | None = None) -> str:
    """n and the noun, singular for 1: "1 story", "2,000 stories"."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def first_line(e: BaseException | str) -> str:
    """An exception's message (or a text) on one line (torch's run over several), or its type when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
