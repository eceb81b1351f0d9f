"""Files the safe way, for every reader and writer in babyllama.

Reading: only regular files are opened. A named pipe would block `open()` until a writer appears, a
device such as /dev/zero never ends, and a directory is not a file: all three are refused with one line
before anything is read (`check_regular` for libraries that open a path themselves, `open_regular` for
our own reads, which opens without blocking and checks the descriptor, so a pipe swapped in after the
check is refused too). JSON is parsed with a size bound and one error type.

Writing: `atomic_write` (and `pending`/`commit` for libraries that write a path themselves) writes to a new
NAME.PID.XXXXXXXX.tmp beside the target (its own, should another process write the same target), fsyncs it,
renames it over the target and fsyncs the folder: after a crash or a kill the target is either the old file
or the complete new one, never a torn one. An error or Ctrl-C removes the temporary file; one a kill left is
removed by a later write of the same target once its writer is gone (`sweep_stale_temps`). The files of one
output (a model, its tokenizer, its config) are renamed into place together once all are written
(`committed_together`), so that a failure on the last leaves none of the others new beside old ones. The rename
would put a regular file in place of whatever is there, so a target that exists and is not a regular file (a
directory, a named pipe, a device) is refused before anything is written. `output_file` and `output_dir` make
an output's folders; a place that cannot be written is one line naming the output and the reason.

Also here: a lock on a folder that two processes must not write at once (`folder_lock`), and babyllama's cache
folders (`cache_folder`: $BABYLLAMA_CACHE, else ~/.cache/babyllama).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple

from .errors import BabyLlamaError

MAX_JSON_BYTES = 64 << 20  # config files, shard indexes, params.json, meta.json: a few MB at most


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, what: str, mode: int) -> BabyLlamaError:
    return BabyLlamaError(f"{what} {path} is {_kind(mode)}, not a regular file")


@contextlib.contextmanager
def mapping(path: str | os.PathLike) -> Iterator[None]:
    """Around a map of the file at `path`: a map that memory limits refuse (ulimit -v, ENOMEM) is said as such,
    of that file (the system's error names no file)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise _map_refused(path, e.strerror) from None
        raise


def unreadable_safetensors(path: str | os.PathLike, e: Exception) -> BabyLlamaError:
    """The error for a safetensors file the package could not open: its own error type carries the system's
    refusal as text, and a mapping that memory limits refuse (ulimit -v: "os error 12") is no fault of the file."""
    if "(os error 12)" in str(e):
        return _map_refused(path, e)
    return BabyLlamaError(f"{path}: not a readable safetensors file ({e})")


def _map_refused(path: str | os.PathLike, why: object) -> BabyLlamaError:
    return BabyLlamaError(f"{path}: out of memory mapping it ({why})")


def not_found(path: str | os.PathLike, what: str, hint: str = "") -> BabyLlamaError:
    """The error for a `path` that Path.exists() says is not there: a loop of symbolic links or a link to
    nothing said as such (exists() is False for both), else "WHAT not found: PATH" and `hint`."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError as e:
        if path.is_symlink():
            return _os_error(path, what, e)
    except OSError as e:  # ELOOP: a loop of symbolic links
        return _os_error(path, what, e)
    except ValueError:  # a NUL byte in the name
        pass
    return BabyLlamaError(f"{what} not found: {path}{hint}")


def _os_error(path: Path, what: str, e: OSError) -> BabyLlamaError:
    if isinstance(e, FileNotFoundError) and path.is_symlink():
        return BabyLlamaError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return BabyLlamaError(f"{what} not found: {path}")
    return BabyLlamaError(f"cannot read {what} {path}: {e.strerror or e}")


def check_regular(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path when it names a regular file (symlinks followed); one-line error otherwise."""
    path = Path(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise _os_error(path, what, e if isinstance(e, OSError) else OSError(str(e))) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, what, st.st_mode)
    return path


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open a regular file for reading bytes; a pipe, device or directory is refused without blocking."""
    path = Path(path)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except IsADirectoryError:
        raise _refuse(path, what, stat.S_IFDIR) from None
    except (OSError, ValueError) as e:
        raise _os_error(path, what, e if isinstance(e, OSError) else OSError(str(e))) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, st.st_mode)
        if nonblock:
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


def file_size(path: str | os.PathLike, what: str = "file") -> int:
    return os.stat(check_regular(path, what)).st_size


def read_bytes(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The whole of a regular file, refused (before reading) when larger than `max_bytes`."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise BabyLlamaError(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} such a file can be")
        try:
            return f.read()
        except OSError as e:
            raise _os_error(Path(path), what, e) from None


def read_text(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> str:
    """A UTF-8 text file's text, without the byte-order mark Windows editors put first (no part of the text)."""
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BabyLlamaError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


# what a JSON escape of half a UTF-16 surrogate pair ("\ud800" alone) decodes to: no character, which cannot be
# written as UTF-8 (a path, a document written back) nor encoded
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE = "a \\u escape of half a UTF-16 surrogate pair, which is no character"


def has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string with a lone surrogate anywhere (keys included)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads with one error type: malformed or absurdly nested JSON, or a string that is no text (a lone
    surrogate), is a BabyLlamaError."""
    try:
        value = json.loads(text)
        lone = has_lone_surrogate(value)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BabyLlamaError(f"{where}: invalid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if lone:
        raise BabyLlamaError(f"{where}: invalid JSON ({LONE_SURROGATE})")
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int | None = MAX_JSON_BYTES,
              expect: type | None = dict) -> Any:
    """A JSON file's value; with `expect`, the top-level value must be of that type (an object by default)."""
    value = parse_json(read_bytes(path, what, max_bytes), str(path))
    if expect is not None and not isinstance(value, expect):
        names: dict[type, str] = {dict: "an object", list: "a list"}
        name = names.get(expect, expect.__name__)
        raise BabyLlamaError(f"{path}: {what} must hold {name}, not {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ writing


# NumPy's tofile (the gguf writer's) reports a short write by its counts alone, without the system's reason
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def _cannot_write(path: Path, what: str, e: OSError) -> BabyLlamaError:
    blocker = _in_the_way(path) if isinstance(e, (FileExistsError, NotADirectoryError)) else None
    reason = blocker or e.strerror or str(e)
    short = _SHORT_WRITE.fullmatch(reason) if e.strerror is None else None
    if short:
        reason = f"the write stopped short ({short[2]} of {short[1]} bytes written: a full disk, or a file size limit?)"
    return BabyLlamaError(f"cannot write {what} {path}: {reason}")


def _in_the_way(path: Path) -> str | None:
    """What keeps the folders of `path` from being made: the nearest of it and its parents that exists, when it
    is not a directory, or a symbolic link to nothing (mkdir's bare "File exists" for either)."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            try:
                os.stat(p)
            except FileNotFoundError:
                return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
            except OSError as e:
                return f"{p} cannot be followed: {e.strerror or e}"
        if p.exists():
            return None if p.is_dir() else f"{p} is not a directory"
    return None


def refuse_folder_name(path: str | os.PathLike, what: str) -> None:
    """A file's path given with a trailing slash names a folder (Path() drops the slash: the file would be
    written under the folder's name)."""
    text = os.fspath(path)
    if isinstance(text, str) and text.endswith(("/", os.sep)) and text.rstrip("/" + os.sep):
        raise BabyLlamaError(f"{what} {text} ends with a slash, which names a folder: give a file name")


def check_target(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` as a Path when nothing is there or a regular file is (to be replaced); one-line error otherwise."""
    refuse_folder_name(path, what)
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise _cannot_write(path, what, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, what, st.st_mode)
    return path


def _make_folder(folder: Path, path: Path, what: str) -> None:
    """mkdir -p `folder`, the folder of (or the) output `path`; one line naming `path` where it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(path, what, e) from None


def output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """The folder `path`, created with its parents where missing; one-line error where it cannot be."""
    path = Path(path)
    _make_folder(path, path, what)
    return path


def output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` ready to be written: its folder created, the target checked (`check_target`), and a file made and
    removed beside it (what the write will do: a folder that refuses files, read-only or a /proc, says so now,
    not after the work whose result it was to hold)."""
    refuse_folder_name(path, what)
    path = Path(path)
    _make_folder(path.parent, path, what)
    check_target(path, what)
    _new_temp(path, what).unlink()
    return path


@contextlib.contextmanager
def new_folders_removed_on_error(path: str | os.PathLike) -> Iterator[None]:
    """A block that may create the folder `path` and its missing parents: if it fails, those of them it made
    are removed again while they are empty (what a failed run wrote into them stays, a resumable partial
    download for one); one the block removed itself is passed over to its parents."""
    created = []
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:  # deepest first: the order they can be removed in
        created.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise


_LOCKED: set[tuple[int, int]] = set()  # (device, inode) of the folders this process holds (folder_lock)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """An exclusive lock on the existing folder `path` for the block: a flock on the folder itself, so that no
    lock file is left behind, and gone with the process however it ends. A folder another process holds is
    BabyLlamaError(busy); one this process holds already (a fine-tune pretokenizing into its own run folder) is
    entered again; where locks are not to be had (no fcntl, a file system without them) the block runs without
    one."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _LOCKED:
        os.close(fd)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BabyLlamaError(busy) from None
        except OSError:
            pass  # no locks on this file system
        _LOCKED.add(key)
        try:
            yield
        finally:
            _LOCKED.discard(key)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read from /proc where Linux shows it: setting it to read it back (the portable way)
    changes it for a moment for every thread of the process, the server's included."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask."""
    return 0o666 & ~current_umask()


def temp_path(path: str | os.PathLike) -> Path:
    """NAME.tmp beside `path`: a fixed name for a folder built there and renamed into place, so that what an
    interrupted run left is found and removed by the next (files get a name of their own: `_new_temp`)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _temp_prefix(path: Path) -> str:
    """NAME.PID. of this process's temporary files for `path`, NAME cut to 200 bytes so that the temporary name
    fits where the target's does (255 bytes)."""
    prefix = path.name
    while len(os.fsencode(prefix)) > 200:
        prefix = prefix[:-1]
    return f"{prefix}.{os.getpid()}."


def _new_temp(path: Path, what: str) -> Path:
    """A new empty file beside `path`, NAME.PID.XXXXXXXX.tmp, for this write alone: two processes writing one
    target (a run started twice on one out_dir) would otherwise write into one temporary file, and the first
    rename would publish the mix of both. Stale ones of the same target go first (`sweep_stale_temps`)."""
    prefix = _temp_prefix(path)
    sweep_stale_temps(path.parent, prefix[: -len(f".{os.getpid()}.")])
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, what, e) from None
    os.close(fd)
    return Path(name)


STALE_TEMP_AGE = 60.0  # seconds a dead writer's temporary file is left alone (see sweep_stale_temps)


def sweep_stale_temps(folder: Path, name: str) -> None:
    """Remove the temporary files that writers of NAME killed outright (SIGKILL, the OOM killer, a power cut)
    left: an exception or Ctrl-C removes its own (`pending`), a kill cannot. One is stale when its writer's pid
    (in its name) is no live process here and it has not changed for STALE_TEMP_AGE seconds: a writer on another
    machine or in another pid namespace sharing the folder, which looks dead from here, is still writing its
    file, so its file is recent. Only regular files of this exact pattern are touched; anything unexpected
    (an unreadable folder, a file gone meanwhile) leaves things as they are."""
    pattern = re.compile(re.escape(name) + r"\.(\d{1,10})\.[a-z0-9_]{8}\.tmp")
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(name)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or _process_alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TEMP_AGE:
                os.unlink(entry.path)


# whether os.kill(pid, 0) only asks whether pid lives: on Windows it terminates the process
_CAN_PROBE_PIDS = os.name == "posix"


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this machine (one of another user counts: it may be a writer). Where
    that cannot be asked (Windows), every writer counts as alive: nothing is swept."""
    if pid <= 0 or not _CAN_PROBE_PIDS:
        return True  # not a writer's pid, or no way to ask: never swept
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def home_cache(*parts: str, instead: str) -> Path:
    """~/.cache/babyllama/PARTS. Where no home folder can be found (no $HOME and no password entry: a container
    run as an arbitrary user id), an OSError that names `instead`, the setting that puts the folder elsewhere."""
    try:
        if os.environ.get("HOME") == "":  # set but empty is no home (Path.home() reads it as /): as if unset
            import pwd

            home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        else:
            home = Path.home()
    except (KeyError, RuntimeError, ImportError):  # no password entry (3.10: KeyError; 3.11 on: RuntimeError)
        raise OSError(errno.ENOENT, f"no home folder to keep babyllama's cache in (set HOME or {instead})") from None
    return home.joinpath(".cache", "babyllama", *parts)


def cache_folder(name: str) -> Path:
    """babyllama's cache folder `name`: $BABYLLAMA_CACHE/NAME, else ~/.cache/babyllama/NAME (home_cache). A "~" in
    the variable is the home folder: a shell leaves it unexpanded in quotes, as Docker's ENV and systemd do."""
    base = os.environ.get("BABYLLAMA_CACHE")
    return Path(base).expanduser() / name if base else home_cache(name, instead="BABYLLAMA_CACHE")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, what: str = "output") -> Path:
    """Finish a write made to `tmp` by name (a library's writer): fsync it, rename it to `path`, fsync the
    folder. The file gets the mode of any new file: safetensors' writer creates its files 0600."""
    check_target(path, what)
    _synced(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path)


def _synced(tmp: str | os.PathLike) -> None:
    """`tmp` given a new file's mode and its bytes on disk, before it is renamed over a target."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fchmod(fd, new_file_mode())
        os.fsync(fd)
    finally:
        os.close(fd)


class _Written(NamedTuple):
    """A file written to its temporary name and not yet renamed over its target."""

    tmp: Path
    path: Path
    what: str


# the files written inside the innermost committed_together block of this thread (None outside one)
_HELD: contextvars.ContextVar[list[_Written] | None] = contextvars.ContextVar("safeio_held", default=None)


@contextlib.contextmanager
def committed_together() -> Iterator[None]:
    """A block whose written files (every `pending` in it, and so `atomic_write`, `write_text`, `copy_file`, ...)
    are renamed over their targets only once the whole block has succeeded, in the order they were written; an
    error anywhere in it removes them all, leaving every target as it was. A block inside another joins it."""
    if _HELD.get() is not None:
        yield
        return
    held: list[_Written] = []
    token = _HELD.set(held)
    try:
        yield
    except BaseException:
        _remove_temps(held)
        raise
    finally:
        _HELD.reset(token)
    _commit_all(held)


def _commit_all(held: list[_Written]) -> None:
    """Rename each of `held` into place: every target checked and every file synced first (the slow part, which an
    error or Ctrl-C stops before anything is renamed: every temporary file removed), then the renames, with
    SIGINT and SIGTERM held back until all are done (a signal then ends the process with the new set in place)."""
    renamed = 0
    try:
        for written in held:
            check_target(written.path, written.what)
        for written in held:
            _synced(written.tmp)
        with _signals_held_back():
            for written in held:
                os.replace(written.tmp, written.path)
                renamed += 1
    except BaseException as e:
        _remove_temps(held[renamed:])
        if isinstance(e, OSError) and renamed < len(held):
            raise _cannot_write(held[renamed].path, held[renamed].what, e) from None
        raise
    for folder in dict.fromkeys(written.path.parent for written in held):
        fsync_dir(folder)


@contextlib.contextmanager
def _signals_held_back() -> Iterator[None]:
    """SIGINT and SIGTERM held while the block runs and raised again as soon as it ends (as KeyboardInterrupt,
    errors.Terminated where the command unwinds, else their default action). Python runs signal handlers in the
    main thread only, so elsewhere the block runs as it is; a signal mask would not do: the kernels' threads
    would take the signal instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])


def _remove_temps(held: list[_Written]) -> None:
    for written in held:
        with contextlib.suppress(OSError):
            os.unlink(written.tmp)


@contextlib.contextmanager
def pending(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """A temporary name for a library to write `path` by name; committed when the block ends without an
    error (inside `committed_together`, when that block does), removed otherwise. The target is checked first
    (`check_target`); an OSError of the write itself (one naming no file, or the temporary file or the target),
    also one behind a library's own error type (a full disk under torch.save or safetensors), becomes one line
    naming `path`."""
    path = check_target(path, what)
    tmp = _new_temp(path, what)
    held = _HELD.get()
    try:
        yield tmp
        if held is None:
            commit(tmp, path, what)
        else:
            held.append(_Written(tmp, path, what))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        system = _system_error(e)
        if system is not None and _names(system, tmp, path):
            raise _cannot_write(path, what, system) from None
        raise


def _system_error(e: BaseException) -> OSError | None:
    """The system's refusal behind a failed write: `e` itself, the OSError a library's own error was raised
    while handling (torch.save's RuntimeError), or the one it names in its message (safetensors' Rust
    writer: "... (os error 27)", or in 0.4.1 Rust's debug form "IoError(Os { code: 27, ... })"); None for
    our own errors and for anything else."""
    if isinstance(e, BabyLlamaError) or not isinstance(e, Exception):
        return None
    seen: BaseException | None = e
    for _ in range(8):  # a chain is short; a cycle must not loop
        if seen is None:
            break
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    code = re.search(r"\(os error (\d+)\)|\bOs \{ code: (\d+)", str(e))
    if code is None:
        return None
    errno = int(code.group(1) or code.group(2))
    return OSError(errno, os.strerror(errno))


def _names(e: OSError, *paths: Path) -> bool:
    """Whether `e` is about one of `paths`, or names no file (a write's ENOSPC, EIO)."""
    return e.filename is None or os.fspath(e.filename) in map(os.fspath, paths)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str = "output") -> Iterator[IO]:
    """A file object whose contents replace `path` only once the block completes (temp name, fsync, rename);
    mode "w" writes UTF-8 text."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_write writes whole files: mode 'wb' or 'w'")
    with pending(path, what) as tmp:
        with open(tmp, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def append_text(path: str | os.PathLike, text: str, what: str = "output") -> None:
    """Append `text` to the log `path` (not atomic: a torn last line is for its reader to skip); a write the
    system refuses (a full disk) is one line naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _cannot_write(Path(path), what, e) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, what: str = "file") -> Path:
    """Copy a regular file atomically."""
    with open_regular(src, what) as f, atomic_write(dst) as out:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    return Path(dst)
