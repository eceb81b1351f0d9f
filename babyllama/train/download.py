"""Downloading a dataset archive (TinyStories by default): resumable, checksummed, with a progress bar.

The transfer is `babyllama.download.fetch` (a partial download is kept as NAME.part and continued with an
HTTP Range request). The archive's sha256 is checked against --sha256, or else against the sha256 the
server advertises (Hugging Face sends it as the X-Linked-Etag / ETag of large files); without either, the
digest is printed so it can be pinned.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tarfile
import zlib
from http.client import HTTPMessage
from pathlib import Path

from .. import safeio
from ..errors import BabyLlamaError, first_line, say

try:
    from lzma import LZMAError
except ImportError:  # a Python built without liblzma reads no .tar.xz at all
    LZMAError = OSError  # type: ignore[misc,assignment]

TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
CHUNK = 1 << 20
_SHA256 = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def check_sha256(sha256: str | None) -> None:
    """--sha256 must be a digest (64 hex digits), checked before anything is downloaded."""
    if sha256 is not None and not _HEX_DIGEST.fullmatch(sha256):
        raise BabyLlamaError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")


def advertised_sha256(headers: HTTPMessage) -> str | None:
    """The sha256 a server advertises for the file (Hugging Face's X-Linked-Etag or ETag), or None."""
    for key in ("X-Linked-Etag", "ETag"):
        m = _SHA256.match((headers.get(key) or "").strip())
        if m:
            return m.group(1)
    return None


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, time_limit: float | None = None) -> Path:
    """Fetch `url` into `dest` (continuing a previous partial download, within `time_limit` seconds) and
    verify its sha256."""
    from ..download import fetch

    check_sha256(sha256)
    dest = Path(dest)
    if dest.is_file():
        say(f"{dest} already downloaded")
        _verify(dest, sha256, downloaded_now=False)
        return dest
    with safeio.new_folders_removed_on_error(dest.parent):  # a failed download leaves no empty folder
        safeio.output_dir(dest.parent, "data folder")
        headers = fetch(url, dest, time_limit=time_limit)
    _verify(dest, sha256 or advertised_sha256(headers))
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, downloaded_now: bool = True) -> None:
    """Check `path` against the sha256 `expected`. A download that does not match is moved aside; a file that
    was there before is left where it is: the --sha256 given may be the mistake, and the file gigabytes."""
    digest = file_sha256(path)
    if expected is None:
        say(f"sha256 {digest} (no checksum to compare with: pass --sha256 to pin it)")
        return
    if digest != expected.lower():
        if not downloaded_now:
            raise BabyLlamaError(f"checksum mismatch for {path.name}, downloaded before: expected {expected}, got "
                                 f"{digest} (left as it is: check --sha256, or delete {path} to download it afresh)")
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        raise BabyLlamaError(f"checksum mismatch for {path.name}: expected {expected}, got {digest} "
                             f"(moved to {bad.name}; run again to download afresh)")
    say(f"sha256 ok ({digest})")


def extract(archive: Path, dest: str | os.PathLike) -> Path:
    """Unpack a tar archive (.tar, .tar.gz, .tar.bz2 or .tar.xz) into `dest`, refusing members that would land
    outside it. A new `dest` is unpacked under a temporary name and renamed when complete, so a kill never
    leaves a half-unpacked folder that looks finished; a refused archive leaves nothing."""
    dest = Path(dest)
    if dest.exists():
        return _extract(archive, dest)
    tmp = safeio.temp_path(dest)
    if tmp.exists():
        shutil.rmtree(tmp)  # what an interrupted earlier run left
    try:
        _extract(archive, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dest)
    return dest


# what writing the unpacked files may fail with through no fault of the archive (a member path too long or
# clashing with another is the archive's)
FOLDER_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _extract(archive: Path, dest: Path) -> Path:
    safeio.output_dir(dest)
    try:
        with tarfile.open(safeio.check_regular(archive, "archive")) as tar:
            if not tar.getmembers():  # zeros read as an empty archive: nothing to train on, which unpacking hides
                raise BabyLlamaError(f"cannot extract {archive}: the archive holds no files (a corrupt download? "
                                     "remove it and run again to download afresh)")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Pythons before 3.10.12 / 3.11.4 have no extraction filters: check paths ourselves
                root = dest.resolve()
                for m in tar.getmembers():
                    if not (root / m.name).resolve().is_relative_to(root) or m.issym() or m.islnk():
                        raise BabyLlamaError(f"cannot extract {archive}: unsafe member {m.name!r} (a link, or a "
                                             "path outside the folder)")
                tar.extractall(dest)
            while tar.fileobj.read(CHUNK):  # to the compressed stream's end, where gzip, bz2 and xz check their
                pass                        # CRC: tar stops at its last member, and would take a corrupt one
    except tarfile.ReadError:
        raise BabyLlamaError(f"cannot extract {archive}: not a readable tar archive (.tar, .tar.gz, .tar.bz2 or "
                             ".tar.xz)") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, LZMAError) as e:  # EOFError: a cut archive
        if isinstance(e, OSError) and e.errno in FOLDER_ERRORS:  # the folder's fault, not the archive's
            where = e.filename or dest
            raise BabyLlamaError(f"cannot extract {archive}: cannot write {where}: {e.strerror} (the archive is "
                                 "kept: run the same command again once the folder can be written)") from None
        raise BabyLlamaError(f"cannot extract {archive}: {first_line(e) or type(e).__name__} (a corrupt or "
                             "incomplete archive? remove it and run again to download afresh)") from None
    return dest
