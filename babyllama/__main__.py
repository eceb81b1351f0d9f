"""`python -m babyllama`, and the `babyllama` command (its entry point: `run`)."""

import sys


def run() -> int:
    """The CLI. Ctrl-C while its modules load (a fraction of a second after start) ends it as Ctrl-C does later:
    exit status 130, no traceback."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
