"""Downloads with the standard library only: `fetch()` (any URL; also behind `babyllama data download`)
and `babyllama download NAME` (a known model and its tokenizer).

Each file streams into `NAME.part` beside its destination and is renamed into place only when complete,
so a half-downloaded model is never mistaken for a model. An interrupted download resumes: the next run
asks the server for the rest with an HTTP Range request (and starts over if the server ignores it).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from . import formats
from .catalog import KnownModel
from .errors import BabyLlamaError
from .progress import progress_bar
from .tokenizer import Tokenizer
from .version import __version__

CHUNK = 1 << 16
TIMEOUT_S = 30


def download_model(model: KnownModel, folder: str | os.PathLike, url_base: str | None = None,
                   show_progress: bool = True) -> Path:
    """Fetch `model`'s files into folder/NAME/ (files already there are kept); returns the model path."""
    dest = Path(folder) / model.name
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BabyLlamaError(f"cannot create {dest}: {e.strerror}") from None
    for f in model.files:
        target = dest / f.save_as
        if not target.is_file():
            fetch(f.url(url_base), target, show_progress)
    model_path = dest / model.model_file
    check_files(model_path, dest / "tokenizer.bin")
    return model_path


def fetch(url: str, target: Path, show_progress: bool = True, timeout: float = TIMEOUT_S):
    """Download `url` to `target` through `target.part`, resuming a previous partial download. Returns
    the response headers (e.g. for a checksum the server advertises)."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"babyllama/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send from that offset: our .part is stale, start over
            part.unlink()
            return fetch(url, target, show_progress, timeout)
        raise BabyLlamaError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise BabyLlamaError(f"download failed: cannot reach {url} ({reason}); no internet connection? "
                             "Fetch the file elsewhere and pass its path to babyllama") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the Range header and sends the whole file
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        try:
            with open(part, "ab" if have else "wb") as out, progress_bar(
                    total=total, initial=have, unit="B", unit_scale=True, desc=target.name,
                    disable=not show_progress) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (TimeoutError, OSError, HTTPException) as e:
            raise BabyLlamaError(f"download failed: interrupted ({e}); run the same command again to "
                                 "resume") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise BabyLlamaError(f"download failed: ended early ({got} of {total} bytes); run the same command "
                             "again to resume")
    os.replace(part, target)
    return resp.headers


def check_files(model_path: Path, tokenizer_path: Path) -> None:
    """A mirror that answers with an HTML page instead of a model must not leave a 'model' behind."""
    try:
        args = formats.read_header(model_path)[0]
        Tokenizer.load(tokenizer_path, args.vocab_size)
    except BabyLlamaError as e:
        for path in (model_path, tokenizer_path):
            path.unlink(missing_ok=True)  # so that the next run fetches them again
        raise BabyLlamaError(f"the downloaded files are not a usable model (removed them): {e}") from None
