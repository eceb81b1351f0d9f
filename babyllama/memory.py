"""Memory. How much this process may still use, so that a large allocation sized by a file (a KV cache for a
header's seq_len, RoPE tables) is refused with one clear line instead of a MemoryError, an address-space
failure or the kernel's OOM killer half-way through a run; whether a model file is read or mapped when neither
is asked for (`read_by_default`); and how pages are held: a KV cache's zero pages of its own in 4 KiB pages
(`zeros_mapped`, `small_pages`), glibc's malloc keeping what a step frees for the next (`keep_freed_memory`,
`return_freed_memory`), a mapped file's pages handed back once a copy stands in for them (`release_mapped`)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import numpy as np

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


CGROUP_ROOT = Path("/sys/fs/cgroup")  # where cgroups are mounted (v2 there, v1's memory controller below it)
CGROUP_SELF = Path("/proc/self/cgroup")  # this process's cgroups: "0::/PATH" (v2), "N:memory:/PATH" (v1)
# (the folder below CGROUP_ROOT, the limit file, the usage file) of cgroup v2 and v1's memory controller
CGROUP_MEMORY = {2: ("", "memory.max", "memory.current"),
                 1: ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")}


def _cgroup_memory() -> tuple[int, int] | None:
    """The tightest memory limit of this process's cgroups and those above them (cgroup v2's memory.max, v1's
    memory.limit_in_bytes), with that cgroup's usage; None without one. A container's limit (docker --memory,
    Kubernetes) is such a limit, and inside it physical memory and MemAvailable are the host's: the kernel's
    OOM killer ends a process that trusts them."""
    try:
        lines = CGROUP_SELF.read_text().splitlines()
    except OSError:
        return None
    tightest = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = 2 if line.startswith("0::") else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        below, limit_file, usage_file = CGROUP_MEMORY[version]
        parts = [p for p in path.strip().split("/") if p]
        if ".." in parts:  # a cgroup outside this namespace's view: only the root's files are there
            parts = []
        for depth in range(len(parts), -1, -1):  # a container sees its own cgroup as the root
            folder = CGROUP_ROOT.joinpath(below, *parts[:depth])
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and (tightest is None or int(limit) < tightest[0]):
                    tightest = (int(limit), int((folder / usage_file).read_text()))
            except (OSError, ValueError):
                continue
    return tightest


def available_bytes() -> int | None:
    """The most one allocation may take here: the smallest of physical memory, the cgroup's memory limit and
    what the address-space limit leaves; None when none is known."""
    cgroup = _cgroup_memory()
    known = [b for b in (_physical_bytes(), cgroup[0] if cgroup else None, _address_space_left()) if b is not None]
    return min(known) if known else None


def memory_free() -> int | None:
    """Memory the kernel can still give without swapping (MemAvailable: free pages plus reclaimable cache),
    within the cgroup's limit (less its usage) and the address-space limit; None where /proc/meminfo is not
    there."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    cgroup = _cgroup_memory()
    limits = [free, max(cgroup[0] - cgroup[1], 0) if cgroup else None, _address_space_left()]
    return min(b for b in limits if b is not None)


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


MADV_DONTNEED = 4  # Linux: unmap the range from this process; a file's pages stay in the page cache
MADV_NOHUGEPAGE = 15  # Linux: back the range with 4 KiB pages only


def _madvise(start: int, end: int, advice: int) -> None:
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def small_pages(a: np.ndarray) -> None:
    """Back a (contiguous, not yet touched) with 4 KiB pages: with 2 MB transparent huge pages (NumPy asks for
    them for its large arrays; a kernel set to use them everywhere gives them to any map, zeros_mapped's too)
    the first write anywhere in one makes the whole 2 MB resident. For arrays written a
    little at a time all over, as a KV cache is (a row per position in every head's region), that would
    make all of it resident at the first step instead of as positions fill. Linux only; else nothing."""
    if sys.platform.startswith("linux") and a.flags.c_contiguous:
        start = -(-a.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        _madvise(start, (a.ctypes.data + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE, MADV_NOHUGEPAGE)


def empty_aligned(nbytes: int, align: int) -> np.ndarray:
    """An uninitialized uint8 array of `nbytes` whose first byte lies on a multiple of `align` (NumPy's own start
    16 bytes into a page)."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + nbytes]


def zeros_mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros in pages of their own, mapped from the OS (private, anonymous): a page takes memory only once
    written, whatever the allocator's settings (a block glibc hands out of its heap is zeroed by a memset,
    which makes all of it resident at once), and the array starts on a page boundary. Raises MemoryError where
    the map cannot be made."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    flags = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    try:
        pages = mmap.mmap(-1, max(count * dtype.itemsize, 1), **flags)
    except OSError as e:
        raise MemoryError(str(e)) from None
    return np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BELOW_BYTES = 32 << 20  # the ceiling of the threshold glibc adapts by itself
KEEP_FREED_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep memory this process frees for its next allocations: blocks under 32 MiB come
    from the heap, and up to 64 MiB freed at its top stays mapped. A prompt's activations and the kernels'
    buffers are allocated and freed anew by every step; glibc's defaults map the larger ones fresh time after
    time (its threshold adapts upwards, but its heap is trimmed back), and every page faults in and is zeroed
    again: a 256-token prompt of a 15M model took ~7,400 page faults, a third of its time. KV caches are mapped
    pages of their own (zeros_mapped), so they still take memory only as positions fill. The `babyllama`
    command calls this; a program that imports the package decides for itself. Returns whether the settings
    took (glibc only)."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BELOW_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def return_freed_memory() -> bool:
    """Hand the memory this process has freed back to the system now (glibc's malloc_trim), whatever
    keep_freed_memory set: after a model's blocks made on load (quantized, or converted from llama.cpp's other
    types) are freed for their regrouped copy, their memory would otherwise stay with the process, as much as
    the model again. Returns whether anything was returned (glibc only)."""
    malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(name: str, *argtypes):
    """glibc's function `name` with its argument types, or None (not Linux, or a C library without it: musl
    has neither mallopt nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def read_only_file_maps() -> list[tuple[int, int]]:
    """The address ranges of this process's read-only mappings of files (/proc/self/maps; ~0.5 ms to read
    with NumPy's and the kernels' libraries mapped)."""
    maps = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and "w" not in fields[1] and int(fields[4]) != 0:
                    lo, hi = (int(v, 16) for v in fields[0].split("-"))
                    maps.append((lo, hi))
    except (OSError, ValueError, IndexError):
        pass
    return maps


def file_mapped(a: np.ndarray, maps: list[tuple[int, int]]) -> bool:
    """Whether a's bytes lie in one of `maps` (what read_only_file_maps() gave)."""
    start = a.ctypes.data
    return any(lo <= start and start + a.nbytes <= hi for lo, hi in maps)


def release_mapped(*arrays: np.ndarray, maps: list[tuple[int, int]] | None = None) -> None:
    """Hand back the pages under `arrays` that lie in read-only maps of files: this process stops holding them
    resident, and a later read maps them again from the page cache (the same bytes). For matrices that a copy
    now stands in for, so that resident memory holds the copy alone. Per map, one call covers everything from
    the first such array's first whole page to the last one's last: each call costs the other cores a TLB
    flush, and what lies between (norms, another matrix) is mapped again from the cache on its next read.
    Anything else (memory read or computed, a writable map, another OS) is left alone. `maps`: what
    read_only_file_maps() gave, for a caller that releases arrays one at a time while no map changes."""
    if not sys.platform.startswith("linux"):
        return
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    maps = read_only_file_maps() if maps is None else maps
    for a in arrays:
        start = -(-a.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (a.ctypes.data + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        where = next(((lo, hi) for lo, hi in maps if lo <= start and end <= hi), None)
        if a.flags.c_contiguous and end > start and where is not None:
            lo, hi = spans.get(where, (start, end))
            spans[where] = (min(lo, start), max(hi, end))
    for start, end in spans.values():
        _madvise(start, end, MADV_DONTNEED)
