"""Progress bars for long work (eval, download, data preparation, reading and writing models): tqdm on stderr when
it is installed and stderr is a terminal; otherwise a silent stand-in, so that the base install (numpy only) runs the
same code."""

from __future__ import annotations


class _Silent:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def stop_here(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int | None = None, desc: str | None = None, unit: str = "it", unit_scale: bool = False,
                 initial: int = 0, disable: bool = False, delay: float = 0.0):
    """A context manager with `.update(n)`. `disable=False` still hides the bar when stderr is not a
    terminal (tqdm's disable=None), so piped output and logs stay clean; `delay`: shown only once the work
    has lasted that many seconds (work that is usually quick, as loading a small model, draws none)."""
    if disable:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    class Bar(tqdm):
        def stop_here(self) -> None:
            """The work ends before the total (a limit was reached): the bar ends full at what was done."""
            self.total = self.n
            self.refresh()

    return Bar(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, disable=None,
               dynamic_ncols=True, delay=delay)
