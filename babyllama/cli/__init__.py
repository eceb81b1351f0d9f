"""The `babyllama` command: argument parsing and dispatch only. Each command group has a module here whose
`add(sub)` declares its subcommands; the work is a thin call into the modules above, imported when the
subcommand runs so that `babyllama run` stays light (no torch, and NumPy only after `--threads` is applied)."""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import re
import sys

from ..errors import BabyLlamaError, UsageError, first_line, say, sigterm_unwinds
from ..memory import keep_freed_memory
from . import bench, data, evaluate, export, finetune, models, run, serve, train
from .common import Parser

GROUPS = (run, evaluate, models, data, train, finetune, export, bench, serve)


def build_parser() -> Parser:
    from ..version import __version__

    parser = Parser(prog="babyllama", description="The Llama 2 stack for small models.")
    parser.add_argument("--version", action="version", version=f"babyllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        group.add(sub)
    return parser


def quiet_library_warnings() -> None:
    """Libraries' warnings would break the one-line error: NumPy's floating-point notes (a NaN or an overflow
    is checked where it matters: weights at load, logits before sampling, eval's loss) and torch.load's notes
    about a file's pickle protocol."""
    import warnings

    warnings.filterwarnings("ignore", message=".*encountered in", category=RuntimeWarning)
    warnings.filterwarnings("ignore", module=r"torch\.serialization")


def keep_stderr() -> None:
    """With stderr closed (`2>&-`) Python's sys.stderr is None, and print(file=sys.stderr) writes to stdout:
    notes, errors and the tok/s line would land in the text. They go to /dev/null instead, which also takes
    descriptor 2, so that no file opened later gets it."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # for the life of the process


def _names_as_bytes(e: UnicodeError) -> tuple[str | bytes, int]:
    """The error handler of stdout and stderr: a lone surrogate (a file name's byte that is not UTF-8) goes out
    as the byte it stands for, as surrogateescape writes it; a character the locale's encoding lacks (the en
    dash of a table in a Latin-1 or ASCII locale) as "?"; decoding (a stream read back, as pytest reads what it
    captured) is surrogateescape's."""
    if not isinstance(e, UnicodeEncodeError):
        return codecs.lookup_error("surrogateescape")(e)
    c = ord(e.object[e.start])
    return (bytes([c - 0xDC00]) if 0xDC80 <= c <= 0xDCFF else "?"), e.start + 1


codecs.register_error("babyllama.names", _names_as_bytes)


def print_file_names_as_bytes() -> None:
    """A Linux file name is bytes, which Python keeps as lone surrogates where they are not UTF-8 (a Latin-1
    folder name): stdout and stderr write those bytes back as they were, as `ls` prints them, and what the
    locale's encoding cannot show as "?", instead of failing on the report of a command that has done its work
    (a UTF-8 locale's stdout is strict; C.UTF-8's already passes file names through). Generated text goes out as
    bytes of its own (printer.py) and is not affected."""
    for stream, own in ((sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__)):
        reconfigure = getattr(stream, "reconfigure", None)
        if stream is own and reconfigure is not None:  # the process's own, not one a caller put in its place
            reconfigure(errors="babyllama.names")


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that `args` ran, e.g. `babyllama data pretokenize`'s."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    keep_stderr()
    print_file_names_as_bytes()
    parser = build_parser()
    try:  # parsing too: --help or --version into a full disk or a closed stdout (Parser._print_message)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command they were given to, as its other mistakes are
            command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        quiet_library_warnings()
        keep_freed_memory()
        from ..threads import configure
        configure(getattr(args, "threads", None))
        if getattr(args, "sigterm_kills", False):
            return args.func(args) or 0
        with sigterm_unwinds():
            return args.func(args) or 0
    except BabyLlamaError as e:
        say(f"babyllama: error: {one_line(str(e))}", logging.ERROR)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    except MemoryError as e:  # an allocation the memory checks did not foresee (ulimit -v, a container's limit)
        say(f"babyllama: error: out of memory: {one_line(str(e).strip() or 'an allocation failed')}", logging.ERROR)
        return 1
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): not an error worth a traceback
        return 0
    except OSError as e:  # the system refused a file (a full disk, a read-only folder), not a bug to trace
        where = f": {os.fsdecode(e.filename)}" if e.filename is not None else ""
        say(f"babyllama: error: {one_line(f'{e.strerror or first_line(e)}{where}')}", logging.ERROR)
        return 1


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(message: str) -> str:
    """The error on one line: a file name may hold a newline (Linux allows any byte but / and NUL), which would
    split it; control characters are shown escaped, as repr() shows them ("\\n")."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)
