"""`python -m babyllama`, and the `babyllama` command (its entry point: `run`)."""

import signal
import sys


def run() -> int:
    """The CLI. Ctrl-C while its modules load or its command line is parsed (the first fraction of a second,
    outside main's own handling) ends it as Ctrl-C does later: exit status 130, no traceback. A Ctrl-C that lands
    inside an extension module's import can surface as that import's ImportError (NumPy reports one as a bad
    install): after a Ctrl-C, that too is exit 130."""
    interrupted = []

    def note_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    # where SIGINT is Python's default (not ignored, as for a background job, nor set by an embedding program)
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, note_interrupt)
    try:
        from .cli import main
    except KeyboardInterrupt:
        return 130
    except ImportError:
        if interrupted:
            return 130
        raise
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        return 130


def entry() -> int:
    """The `babyllama` command and `python -m babyllama`: run(), and after a Ctrl-C the end a Ctrl-C gives any
    program, killed by SIGINT (a shell still reports status 130), so that a script or loop that ran it stops too
    (a shell goes on after a child that merely exits 130: it takes the interrupt as handled). The KeyboardInterrupt
    raised here, uncaught, makes the interpreter finish as usual and then end by SIGINT; it prints nothing."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a background job's (nohup): a plain exit 130
    code = run()
    if code != 130 or ignored:
        return code
    sys.excepthook = lambda *exc: None
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(entry())
