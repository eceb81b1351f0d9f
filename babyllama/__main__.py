"""`python -m babyllama`, and the `babyllama` command (its entry point: `run`)."""

import sys


def run() -> int:
    """The CLI. Ctrl-C while its modules load or its command line is parsed (the first fraction of a second,
    outside main's own handling) ends it as Ctrl-C does later: exit status 130, no traceback."""
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())
