"""How much memory this process may still use, so that a large allocation sized by a file (a KV cache for a
header's seq_len, RoPE tables) is refused with one clear line instead of a MemoryError, an address-space
failure or the kernel's OOM killer half-way through a run."""

from __future__ import annotations

import os

from .errors import BabyLlamaError


def _physical_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    """What RLIMIT_AS (ulimit -v) still allows this process to map, or None without such a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return soft - mapped
    except (ImportError, OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """The most one allocation may take here: the smaller of physical memory and what the address-space
    limit leaves; None when neither is known."""
    known = [b for b in (_physical_bytes(), _address_space_left()) if b is not None]
    return min(known) if known else None


def memory_free() -> int | None:
    """Memory the kernel can still give without swapping (MemAvailable: free pages plus reclaimable cache),
    within the address-space limit; None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    limit = _address_space_left()
    return free if limit is None else min(free, limit)


READ_SHARE = 0.25  # a model file up to this share of the free memory is read into memory by default


def read_by_default(nbytes: int) -> bool:
    """Whether a model file of `nbytes` is read into process memory rather than mapped, when neither is asked
    for: read where it takes at most a quarter of the free memory. Read weights sit in 2 MB transparent huge
    pages (NumPy asks for them), a map of a file already in the page cache in 4 KiB pages, and decode, which
    streams every weight once per token, runs faster from the former (docs/speed.md). Larger files are
    mapped: loading stays instant and memory grows only with what is touched."""
    free = memory_free()
    return free is not None and nbytes <= READ_SHARE * free


def check_fits(nbytes: int, what: str, hint: str = "") -> None:
    """Refuse an allocation of `nbytes` that cannot fit in memory, naming it."""
    limit = available_bytes()
    if limit is not None and nbytes > limit:
        raise BabyLlamaError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than this machine can give "
                             f"({max(limit, 0) / 2**30:.1f} GiB){'; ' + hint if hint else ''}")


def allocation_failed(what: str, nbytes: int, hint: str = "") -> BabyLlamaError:
    """The error for a MemoryError raised while allocating `what`."""
    return BabyLlamaError(f"{what} needs {nbytes / 2**30:.1f} GiB, which could not be allocated"
                          f"{'; ' + hint if hint else ''}")
