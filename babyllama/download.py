"""Downloads with the standard library only: `fetch()` (any URL; also behind `babyllama data download`)
and `babyllama download NAME` (a known model and its tokenizer).

Each file streams into `NAME.part` beside its destination and is renamed into place only when complete
(and fsynced), so a half-downloaded model is never mistaken for a model. An interrupted download resumes:
the next run asks the server for the rest with an HTTP Range request (and starts over if the server ignores
it). The first response's validator (a strong ETag, else Last-Modified) is kept in `NAME.part.validator` and sent
as `If-Range`, so a file that changed on the server since is fetched whole instead of completed with the new
file's tail. A transfer has a total time limit: urllib's timeout only bounds each wait for data, which a server
dripping one byte every few seconds never trips.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from . import formats, safeio
from .catalog import KnownModel
from .config import TOKENIZER_BIN
from .errors import BabyLlamaError, first_line
from .progress import progress_bar
from .tokenizer import Tokenizer, vocab_mismatch
from .version import __version__

CHUNK = 1 << 16
TIMEOUT_S = 30  # connecting, and each wait for more data
TIME_LIMIT_S = 2 * 3600  # the whole transfer (headers included); an interrupted one resumes on the next run


def download_model(model: KnownModel, folder: str | os.PathLike, url_base: str | None = None,
                   show_progress: bool = True, time_limit: float | None = None) -> Path:
    """Fetch `model`'s files into folder/NAME/ (files already there are kept); returns the model path."""
    dest = Path(folder) / model.name
    with safeio.new_folders_removed_on_error(dest):
        safeio.output_dir(dest, "model folder")
        fetched = []
        try:
            for f in model.files:
                target = dest / f.save_as
                if not target.is_file():
                    fetch(f.url(url_base), target, show_progress, time_limit=time_limit)
                    fetched.append(target)
        except BabyLlamaError:
            _remove_if_no_model(dest / model.model_file, fetched)  # an error page saved as the model
            raise
        model_path = dest / model.model_file
        check_files(model_path, dest / TOKENIZER_BIN, fetched)  # inside: a refused download leaves no empty folder
    return model_path


class Deadline:
    """A wall-clock limit on a whole HTTP transfer. urllib's timeout bounds each wait for data, so a server
    that sends a byte every few seconds (or drips its headers) would keep a download going forever: when
    the limit passes, the connections opened through `opener()` are shut down, which ends any blocked read."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self.ends = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        # a timer cannot wait longer than TIMEOUT_MAX (~292 years): a longer limit is no limit
        self._timer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        """Seconds until the limit (0 once it has passed; the timer may fire a moment later)."""
        left = max(0.0, self.ends - time.monotonic())
        if left == 0.0:
            self.expired = True
        return left

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _tracked(self, http_class):
        """`http_class` that registers its socket once connected (the response keeps reading from it after
        the connection object lets go of it)."""
        deadline = self

        class Tracked(http_class):
            def connect(self):
                # connecting is bounded by its own timeout, which the deadline cannot cut short (no socket to shut
                # down yet): no longer than the time left
                left = deadline.left()
                if left == 0.0:
                    raise TimeoutError("the time limit passed")
                self.timeout = min(self.timeout, left) if isinstance(self.timeout, (int, float)) else left
                super().connect()
                with deadline._lock:
                    deadline._sockets.append(self.sock)
                    if deadline.expired:
                        self.sock.shutdown(socket.SHUT_RDWR)

        return Tracked

    def opener(self) -> urllib.request.OpenerDirector:
        deadline = self

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(deadline._tracked(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(deadline._tracked(http.client.HTTPSConnection), req, context=self._context)

        return urllib.request.build_opener(HTTP(), HTTPS())


def fetch(url: str, target: Path, show_progress: bool = True, timeout: float = TIMEOUT_S,
          time_limit: float | None = None) -> http.client.HTTPMessage:
    """Download `url` to `target` through `target.part`, resuming a previous partial download; the whole
    transfer may take at most `time_limit` seconds (default TIME_LIMIT_S). Returns the response headers
    (e.g. for a checksum the server advertises)."""
    time_limit = time_limit or TIME_LIMIT_S
    target = Path(target)
    # two downloads of one file would append to the same .part, and the first rename would publish the mix
    busy = f"another download into {target.parent} is running: wait for it to end"
    with Deadline(time_limit) as deadline, safeio.folder_lock(target.parent, busy):
        try:
            return _fetch(url, target, show_progress, timeout, deadline)
        except BabyLlamaError:
            if deadline.expired or deadline.left() < 0.05:  # a connect that timed out as the limit passed
                raise BabyLlamaError(f"download failed: {url} took longer than the time limit of {time_limit:g} s; "
                                     "run the same command again to resume") from None
            raise


def _unreachable(url: str, e: Exception, target: Path) -> BabyLlamaError:
    """Why `url` could not be opened, and what to do: a certificate that does not verify is no network fault
    (a Python without CA certificates: macOS's python.org installers ship without them), nor is a path given
    for a URL or a local file that is not there."""
    reason = getattr(e, "reason", None) or e
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:  # urlopen's own complaint (an unclosed "[" of an IPv6 address) says what is wrong
        return BabyLlamaError(f"download failed: {url} is not a valid URL ({reason})")
    if isinstance(reason, ssl.SSLCertVerificationError):
        hint = ("this Python could not verify the server's certificate: without CA certificates? (macOS: run "
                "the Install Certificates command that came with Python; else install ca-certificates or set "
                "SSL_CERT_FILE)")
    elif scheme not in ("http", "https", "ftp", "file"):
        hint = "a URL is needed (https://..., or file:///... for a local file)"
    elif scheme == "file":
        hint = "no such local file"
    else:  # the commands take a file already at `target` as downloaded
        hint = f"no internet connection? Fetch it elsewhere and put it at {target}: the same command then takes it"
    return BabyLlamaError(f"download failed: cannot reach {url} ({reason}); {hint}")


def _fetch(url: str, target: Path, show_progress: bool, timeout: float, deadline: Deadline):
    part = target.with_name(target.name + ".part")
    validator_file = target.with_name(target.name + ".part.validator")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"babyllama/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator := _read_validator(validator_file):
            headers["If-Range"] = validator
    try:
        resp = deadline.opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send from that offset: our .part is stale, start over
            part.unlink()
            validator_file.unlink(missing_ok=True)
            return _fetch(url, target, show_progress, timeout, deadline)
        # urllib's reasons may run over lines (a redirect loop's does): its first says what happened
        raise BabyLlamaError(f"download failed: HTTP {e.code} {first_line(str(e.reason))} for {url}") from None
    except (urllib.error.URLError, OSError, HTTPException, ValueError) as e:
        raise _unreachable(url, e, target) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the Range header, or the file changed (If-Range): it sends the whole file
        if not have:
            _keep_validator(validator_file, resp.headers)
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        try:
            with _open_part(part, have) as out, progress_bar(
                    total=total, initial=have, unit="B", unit_scale=True, desc=target.name,
                    disable=not show_progress) as bar:
                while chunk := resp.read1(CHUNK):  # whatever has arrived, so the deadline is seen promptly
                    _write_part(out, part, chunk)
                    bar.update(len(chunk))
                _write_part(out, part, b"")
            if deadline.expired:  # its shutdown ends a body of unknown length as the server's close would
                raise BabyLlamaError("download failed: the time limit passed")
        except (TimeoutError, OSError, HTTPException, ValueError) as e:
            raise BabyLlamaError(f"download failed: interrupted ({e}); run the same command again to "
                                 "resume") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise BabyLlamaError(f"download failed: ended early ({got} of {total} bytes); run the same command "
                             "again to resume")
    safeio.commit(part, target)
    validator_file.unlink(missing_ok=True)
    return resp.headers


def _keep_validator(path: Path, headers) -> None:
    """Note what identifies this version of the file, for the If-Range of a resume. A weak ETag may not be
    used in If-Range; without a validator a resume sends Range alone, as there is nothing better to ask."""
    etag = headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    try:
        if validator:
            path.write_text(validator, encoding="ascii", errors="replace")
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise _cannot_write_part(path, e) from None


def _read_validator(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip() or None
    except OSError:
        return None


def _cannot_write_part(part: Path, e: OSError) -> BabyLlamaError:
    """A local write failure (a full disk, a read-only folder) is no interrupted transfer: say which file."""
    return BabyLlamaError(f"download failed: cannot write {part}: {e.strerror or e} (what it holds is kept: run "
                          "the same command again to resume once it can be written)")


def _open_part(part: Path, have: int) -> BinaryIO:
    try:
        return open(part, "ab" if have else "wb")
    except OSError as e:
        raise _cannot_write_part(part, e) from None


def _write_part(out: BinaryIO, part: Path, chunk: bytes) -> None:
    """Append `chunk` to the .part file; an empty chunk flushes and fsyncs it."""
    try:
        if chunk:
            out.write(chunk)
        else:
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise _cannot_write_part(part, e) from None


def _remove_if_no_model(model_path: Path, fetched: list[Path]) -> None:
    """A model file this run fetched whose header is not a model's (a mirror's HTML page) is removed, so that a
    failed download leaves no such 'model' behind, whatever failed after it."""
    if model_path in fetched:
        try:
            formats.read_header(model_path)
        except BabyLlamaError:
            model_path.unlink(missing_ok=True)


def check_files(model_path: Path, tokenizer_path: Path, fetched: list[Path]) -> None:
    """A mirror that answers with an HTML page instead of a model must not leave a 'model' behind: the files at
    fault are removed where this run fetched them (so that the next run fetches them again); a file that was
    already there (the user's own copy) is kept, and so is a good file fetched beside a bad one."""
    faults: dict[Path, str] = {}
    args = n_tokens = None
    try:
        args = formats.read_header(model_path)[0]
    except BabyLlamaError as e:
        faults[model_path] = str(e)
    try:
        n_tokens = len(Tokenizer.load(tokenizer_path).pieces)
    except BabyLlamaError as e:
        faults[tokenizer_path] = str(e)
    if args is not None and n_tokens is not None and n_tokens != args.vocab_size:  # the model read as one
        faults[tokenizer_path] = str(vocab_mismatch(f"tokenizer {tokenizer_path}", n_tokens, args.vocab_size,
                                                    f" ({model_path})"))
    if faults:
        notes = []
        for path in faults:
            if path in fetched:
                path.unlink(missing_ok=True)
                notes.append(f"removed {path.name}")
            else:
                notes.append(f"kept {path.name}: it was there before")
        raise BabyLlamaError(f"the downloaded files are not a usable model ({'; '.join(notes)}): "
                             + "; ".join(faults.values()))
