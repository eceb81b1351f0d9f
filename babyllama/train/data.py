"""Training data: reading documents from the user's files, pretokenizing them into uint16 shards, and
drawing training batches from the shards.

Inputs (`--input PATH`, a file or a folder searched recursively):
  .txt    documents separated by lines holding only `<|endoftext|>`, surrounding whitespace ignored
          (TinyStories' layout); a file without separators is one document
  .jsonl  one document per line: a JSON string, or an object with a "text" or "story" field
  .json   a list of such strings/objects (TinyStories_all_data/data*.json)

  .jsonl  with chat records instead ({"messages": [...]} or {"prompt", "response"}: instruct.py), one
          conversation per line, rendered by chat_template.encode_chat as `chat` and the server render it

Pretokenized layout (llama2.c's): every document is encoded with BOS in front and the token ids of all
documents of one input file are concatenated into one shard of uint16 (`NAME.bin`). meta.json records
the vocabulary size and which shards are training and validation data (a shard whose name has the word
"val", "valid", "validation" or "dev"); tokenizer.bin is copied beside them so that later steps find it.

Chat data (meta.json "kind": "chat") keeps every conversation whole: beside `NAME.bin` lie `NAME.mask`
(uint8, the weight of each token as a target: 0 outside the assistant replies, 1 on the replies and their
EOS, `word_weight` on the reply tokens that spell the first use of a word the request asked for, when the
records say which: `babyllama data instruct`'s "words" and "topic_words") and `NAME.idx` (int64, the offset
where each conversation starts, and the end). Training draws whole conversations (`Examples`) and takes the
loss on the masked tokens only, weighted; plain text is drawn as random windows (`Windows`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import safeio
from ..config import CKPT_NAME, TOKENIZER_BIN
from ..documents import iter_documents
from ..errors import BabyLlamaError, Terminated, counted, say
from ..fields import Fields
from ..instruct import CHAT, TEXT, describe_bad_lines, even_shares, read_documents, read_jsonl
from ..progress import progress_bar
from .config import MAX_WORD_WEIGHT, check_word_weight

if TYPE_CHECKING:
    import torch

    from ..tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".json")
META = "meta.json"
INCOMPLETE = "pretokenize.incomplete"  # in a shard folder from the start of pretokenize until meta.json is written
MASK_SUFFIX, INDEX_SUFFIX = ".mask", ".idx"  # beside a chat shard NAME.bin: NAME.mask, NAME.idx
VAL_FRACTION = 0.1  # held out of a lone training shard when no validation shard exists


# ------------------------------------------------------------------------------------------------ reading


VOCAB_WORK_PREFIX = ".train-vocab-"  # train-vocab's temporary folder (in its --data-dir): its copy of the text


def input_files(path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The data files of `path` (a file, or a folder searched recursively), less those in `exclude` when that
    folder lies inside it (a fine-tune's out_dir: its metrics.jsonl and adapter.json are no documents), in a
    train-vocab work folder (one a killed run left) and .jsonl files without a record (as an empty .txt holds
    no document; when all are such, the first stays, so that reading it says the data is empty)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise BabyLlamaError(f"{path}: unsupported input type (use {', '.join(SUFFIXES)})")
        return [path]
    if not path.exists():
        raise safeio.not_found(path, "input")
    if not path.is_dir():  # a pipe or a device: said what it is
        safeio.check_regular(path, "input")
    skipped = Path(exclude).resolve() if exclude is not None else None
    if skipped is not None and (skipped == path.resolve() or not skipped.is_relative_to(path.resolve())):
        skipped = None  # not a folder inside the input: the input is not what it holds
    files = sorted(p for p in _files_below(path) if p.is_file() and p.suffix in SUFFIXES and not _is_shards_meta(p)
                   and not (skipped is not None and p.resolve().is_relative_to(skipped))
                   and not _in_a_run_folder(p, path)
                   and not any(part.startswith(VOCAB_WORK_PREFIX) for part in p.relative_to(path).parts[:-1]))
    if not files:
        raise BabyLlamaError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    return _without_blank_jsonl(files)


def _files_below(folder: Path) -> Iterator[Path]:
    """Every file below `folder`, in linked folders too (Path.rglob passes them over), each real folder once (a
    link to a folder above ends there)."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        yield from (Path(root) / name for name in names)


def _in_a_run_folder(path: Path, root: Path) -> bool:
    """Whether `path` lies in a folder below `root` that holds a training run (its ckpt.pt): an earlier run's
    metrics.jsonl and adapter.json are no documents, as the current run's out_dir is left out too."""
    folder = path.parent
    while folder != root and root in folder.parents:
        if (folder / CKPT_NAME).is_file():
            return True
        folder = folder.parent
    return False


def _is_shards_meta(path: Path) -> bool:
    """Whether `path` is the meta.json of a folder pretokenize wrote (beside its tokenizer.bin): output, not
    documents, when that folder lies inside the input folder (`--input data` and `--data-dir data`)."""
    return path.name == META and (path.parent / TOKENIZER_BIN).is_file()


# ------------------------------------------------------------------------------------------------ encoding


def load_encoder(path: str | os.PathLike) -> tuple[int, Callable[[list[str]], list[list[int]]]]:
    """(vocab size, texts → their ids, no BOS) with a sentencepiece .model (fast, C++) or a llama2.c
    tokenizer.bin."""
    path = Path(path)
    if not path.exists():
        raise safeio.not_found(path, "tokenizer")
    safeio.check_regular(path, "tokenizer")  # a folder, a pipe or a device: said what it is
    if path.suffix == ".model":
        from ..tokenizer import open_sentencepiece

        sp = open_sentencepiece(path)
        return sp.vocab_size(), lambda texts: sp.encode(texts)
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    return tok.vocab_size, lambda texts: [tok.encode(t, bos=False) for t in texts]


_worker_encode: Any = None  # a worker's texts -> ids function, or its Tokenizer for chat records
_worker_word_weight = 1  # a chat worker's weight for the tokens of requested words


def _end_with_parent(parent: int | None) -> None:
    """A worker ends when the process that started it does, however it ends (Linux's PR_SET_PDEATHSIG; a
    worker left behind would sleep forever holding the shard folder's lock, inherited with its descriptors).
    `parent`: the pid the worker's parent has, None where that is not the caller (a forkserver starts it)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def _start_worker(parent: int | None, init: Callable, *args) -> None:
    """A worker process: Ctrl-C (SIGINT to the terminal's whole process group) is the parent's to handle, which
    then ends the workers itself; SIGTERM ends it at once (the default action)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with_parent(parent)
    init(*args)


class _RemoteTraceback(Exception):
    """A worker's traceback, as text: the cause of its exception raised in the parent."""

    def __str__(self) -> str:
        return str(self.args[0])


def _reply_bytes(fn: Callable, batch: Any) -> bytes:
    """fn(batch) pickled as (True, result), or its exception as (False, exception, traceback text); an exception
    that does not come back whole through pickle is sent as a RuntimeError that names it."""
    import traceback

    try:
        return pickle.dumps((True, fn(batch)))
    except Exception as e:
        tb = traceback.format_exc()
        try:
            data = pickle.dumps((False, e, tb))
            pickle.loads(data)  # an exception whose __init__ takes other arguments pickles but is not rebuilt
            return data
        except Exception:
            return pickle.dumps((False, RuntimeError(f"{type(e).__name__} in a worker process"), tb))


def _serve_worker(conn: Any, parent: int | None, init: Callable, *args) -> None:
    """A worker's life: (function, batch) in, its reply (_reply_bytes) out, until None or the parent's end."""
    _start_worker(parent, init, *args)
    try:
        while (task := conn.recv()) is not None:
            conn.send_bytes(_reply_bytes(*task))
    except (EOFError, BrokenPipeError):  # the parent is gone
        pass


class WorkerPool:
    """Worker processes, each fed through a pipe of its own, whose results come back in order (imap).
    multiprocessing.Pool's workers share one queue and its locks: one killed while it held a lock (SIGTERM to
    the whole process group, as `timeout` and service managers send, or the OOM killer) left the others and
    the parent's Pool.terminate waiting for that lock forever. Here nothing is shared: a worker that dies is
    an end of file on its own pipe, and ending the pool kills what is left."""

    def __init__(self, workers: int, init: Callable, *args):
        import multiprocessing

        # a forkserver, not this process, is a worker's parent there
        parent = None if multiprocessing.get_start_method() == "forkserver" else os.getpid()
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.busy: dict[int, int] = {}  # worker -> the index of the item it works on
        try:
            for _ in range(max(1, workers)):  # each pipe made just before its worker: later workers hold no
                mine, theirs = multiprocessing.Pipe()  # copy of an earlier worker's end, so its death is EOF
                proc = multiprocessing.Process(target=_serve_worker, args=(theirs, parent, init, *args),
                                               daemon=True)
                self.conns.append(mine)
                proc.start()
                self.procs.append(proc)
                theirs.close()
        except OSError as e:  # too many open files or processes
            self.close(finished=False)
            raise BabyLlamaError(f"cannot start {workers} worker processes ({e.strerror or e}): use fewer "
                                 "--workers") from None

    def imap(self, fn: Callable, items: Iterable) -> Iterator[Any]:
        """fn(item) for each item, results in the items' order. A worker is sent an item only while it waits
        for one (one at a time: two could meet a result larger than a pipe's buffer coming the other way, both
        sides waiting), the next one as soon as it answers, whichever worker that is; results that come back
        before an earlier one wait here (at most four per worker: past that, new items wait)."""
        from multiprocessing.connection import wait

        n = len(self.conns)
        todo = enumerate(items)
        idle = list(range(n))
        done: dict[int, tuple] = {}
        next_out = 0
        more = True
        while True:
            while more and idle and len(done) < 4 * n:
                k, item = next(todo, (-1, None))
                if k < 0:
                    more = False
                    break
                w = idle.pop()
                self._send(w, (fn, item))
                self.busy[w] = k
            if next_out in done:
                ok, result, *tb = done.pop(next_out)
                next_out += 1
                if not ok:
                    if tb:
                        result.__cause__ = _RemoteTraceback(tb[0])
                    raise result
                yield result
                continue
            if not self.busy:
                return
            for conn in wait([self.conns[w] for w in self.busy]):
                w = self.conns.index(conn)
                done[self.busy.pop(w)] = self._receive(w)
                idle.append(w)

    def _send(self, w: int, task: Any) -> None:
        try:
            self.conns[w].send(task)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(w) from None

    def _receive(self, w: int) -> tuple:
        try:
            data = self.conns[w].recv_bytes()
        except (EOFError, ConnectionResetError):
            raise self._died(w) from None
        try:
            return pickle.loads(data)
        except Exception as e:  # a result that pickles but does not come back (its class's __reduce__)
            return (False, BabyLlamaError(f"a worker's result could not be read back: {e}"))

    def _died(self, w: int) -> BabyLlamaError:
        proc = self.procs[w]
        proc.join(1)
        if proc.exitcode in (-signal.SIGTERM, -signal.SIGINT):  # as a rule sent to us too (to the process group):
            time.sleep(0.2)  # our own arrives meanwhile and says "interrupted", not that a worker died
        code = proc.exitcode
        if code is None or code >= 0:
            return BabyLlamaError(f"a worker process ended unexpectedly (exit code {code})")
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", out of memory?" if code == -signal.SIGKILL else ""
        return BabyLlamaError(f"a worker process ended unexpectedly (killed by {name}{hint})")

    def close(self, finished: bool) -> None:
        """Ends the workers: told to stop when none has work left, else killed (their pending work dropped)."""
        gently = finished and not self.busy
        for conn, proc in zip(self.conns, self.procs):
            if gently:
                with contextlib.suppress(OSError):
                    conn.send(None)
            else:
                proc.kill()
        for proc in self.procs:  # only started processes are in procs
            proc.join()
            proc.close()
        for conn in self.conns:  # one more where a start failed
            conn.close()


@contextlib.contextmanager
def _worker_pool(workers: int, init: Callable, *args) -> Iterator[WorkerPool]:
    """A WorkerPool whose workers end with the block however it ends: after an error, Ctrl-C or SIGTERM its
    pending batches are dropped and the workers killed at once, and a worker ends with its parent."""
    pool = WorkerPool(workers, init, *args)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        pool.close(finished)


# the characters one batch sends a worker at most (UTF-8: up to 4 bytes each): its message fits a pipe's buffer
# (64 KiB on Linux), the workers' shares stay even and the progress bar moves
BATCH_CHARS = 12_000


def batched(items: list, max_count: int, size: Callable[[Any], int] = len) -> list[list]:
    """`items` in order, in batches of at most `max_count` whose sizes add up to at most BATCH_CHARS (an item
    larger than that goes alone)."""
    batches: list[list] = []
    chars = 0
    for item in items:
        n = size(item)
        if not batches or len(batches[-1]) == max_count or chars + n > BATCH_CHARS:
            batches.append([])
            chars = 0
        batches[-1].append(item)
        chars += n
    return batches


def _conversation_chars(pair: tuple[list[dict], list[str]]) -> int:
    messages, words = pair
    return sum(len(str(m.get("content", ""))) for m in messages) + sum(map(len, words))


def _init_worker(tokenizer_path: str) -> None:
    global _worker_encode
    _worker_encode = load_encoder(tokenizer_path)[1]


def _init_chat_worker(tokenizer_path: str, word_weight: int = 1) -> None:
    global _worker_encode, _worker_word_weight
    _worker_encode = _chat_tokenizer(Path(tokenizer_path))
    _worker_word_weight = word_weight


def _chat_tokenizer(path: Path):
    from ..tokenizer import Tokenizer

    # each worker converts the model; _install_tokenizer's conversion warns once about what it leaves out
    return Tokenizer.from_sentencepiece(path, note=False) if path.suffix == ".model" else Tokenizer.load(path)


def _encode_conversations(conversations: list[tuple[list[dict], list[str]]]) -> list[tuple[list[int], list[int]]]:
    from ..chat_template import encode_chat

    out = []
    for messages, words in conversations:
        ids, mask = encode_chat(_worker_encode, messages, generation=False)
        if words and _worker_word_weight > 1:
            mask = weigh_words(_worker_encode, ids, mask, words, _worker_word_weight)
        out.append((ids, mask))
    return out


def weigh_words(tokenizer: Tokenizer, ids: list[int], mask: list[int], words: Iterable[str],
                weight: int) -> list[int]:
    """`mask` with `weight` on the reply tokens that spell the first use of each of `words` as a whole word
    (lower case or capitalized, after a space, a quote or any other non-letter), found in the replies' text. A
    requested word is a few tokens among a story's hundreds, and a small model learns to use it only when those
    tokens count for more than the rest; only the first use, since a request asks for each word once and
    weighing every repeat teaches repeating it."""
    from bisect import bisect_left, bisect_right

    from ..tokenizer import EOS

    # every token outside the replies (and BOS/EOS) reads as a non-letter: no match runs across it
    pieces = [tokenizer.piece_bytes(t) if m and t > EOS else b"\0" for t, m in zip(ids, mask)]
    text = b"".join(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces]).tolist()
    out = list(mask)
    for word in words:
        forms = b"|".join(re.escape(form.encode()) for form in sorted({word, word.capitalize()}))
        # the space before the word counts with it (its own token where the vocabulary has no " word" piece)
        use = re.search(rb"(?: |(?<![A-Za-z]))(?:" + forms + rb")(?![A-Za-z])", text)
        if use:  # the tokens that overlap the word's bytes
            first, end = bisect_right(starts, use.start()) - 1, bisect_left(starts, use.end())
            out[first:end] = [weight] * (end - first)
    return out


def _encode_batch(texts: list[str]) -> np.ndarray:
    from ..tokenizer import BOS

    out = []
    for ids in _worker_encode(texts):
        out.append(BOS)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def encoding_processes(workers: int | None) -> int:
    """Encoding processes: `workers`, by default one per CPU this process may use (at most MAX_WORKERS); more
    than MAX_WORKERS is refused (each holds a tokenizer and a batch in memory, and more than the CPUs only take
    turns)."""
    from ..threads import usable_cpus

    if workers is not None and workers > MAX_WORKERS:
        raise BabyLlamaError(f"--workers {workers} is more than {MAX_WORKERS} encoding processes (this process may "
                             f"use {usable_cpus()} CPUs)")
    return max(1, min(workers or usable_cpus(), MAX_WORKERS))


MAX_WORKERS = 256


def shard_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "_".join(rel.with_suffix("").parts) + ".bin"


def shard_names(files: list[Path], root: Path) -> dict[Path, str]:
    """Each input file's shard name; two files that would share one (a.txt and a.jsonl, sub/a.txt and sub_a.txt)
    are refused: the second shard would replace the first."""
    names: dict[str, Path] = {}
    for f in files:
        name = shard_name(f, root)
        if name == TOKENIZER_BIN:  # pretokenize writes its tokenizer there, over the shard
            raise BabyLlamaError(f"{f} would be pretokenized into the shard {name}, the name of the tokenizer "
                                 "written beside the shards: rename it")
        if name in names:
            raise BabyLlamaError(f"{names[name]} and {f} would both be pretokenized into the shard {name}, the "
                                 "second replacing the first: rename one of them")
        names[name] = f
    return {f: name for name, f in names.items()}


VAL_WORDS = ("val", "valid", "validation", "dev")  # dev: `data instruct --dev-count`'s held-out split
VAL_WORDS_TEXT = f"{', '.join(VAL_WORDS[:-1])} or {VAL_WORDS[-1]}"


def is_val_shard(name: str) -> bool:
    """Whether a shard holds held-out data (validation, never trained on): its name has one of VAL_WORDS as a
    word (instruct_val, instruct_dev, TinyStories-valid), not merely inside one (festival_stories, devil)."""
    return not set(VAL_WORDS).isdisjoint(re.split(r"[^a-z0-9]+", Path(name).stem.lower()))


def file_kind(path: Path, skip_bad_lines: bool = False, say_skipped: bool = False) -> str:
    """CHAT for a .jsonl of chat records, else TEXT; "" for a .jsonl whose every line is malformed, skipped
    (`skip_bad_lines`; `say_skipped`: said on stderr, for the caller that leaves the file out)."""
    if path.suffix != ".jsonl":
        return TEXT
    # malformed lines beside records are reported where the file is encoded, with its conversations too long for
    # the context (one run names them all); a file of nothing else stops here unless skipped
    data = read_jsonl(path, skip_bad_lines, allow_empty=skip_bad_lines, defer_bad=True)
    if not data.items and say_skipped:
        say(f"skipped {describe_bad_lines(path, data.bad)}, and no record besides")
    return data.kind


def pretokenize(input_path: str | os.PathLike, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
                workers: int | None = None, batch_docs: int = 256, skip_bad_lines: bool = False,
                max_tokens: int | None = None, word_weight: int = 1, exclude: str | os.PathLike | None = None,
                say_unfinished: bool = True) -> dict:
    """Encode every document of `input_path` (BOS first) into uint16 shards in `out_dir`, one per input
    file, using `workers` processes; chat .jsonl files become chat shards (see the module docstring), where
    `max_tokens` bounds a conversation's length. Malformed lines (and over-long conversations) stop it
    before anything is written, unless `skip_bad_lines`. `word_weight` > 1 weighs the tokens of requested
    words in chat replies (see the module docstring). Files in `exclude` (a folder inside `input_path`) are
    left out. `say_unfinished`: an interruption says that the folder is unfinished (see _start_writing). Returns
    the meta.json contents."""
    with contextlib.ExitStack() as held:  # the folder's lock, from the first write (_start_writing) to meta.json
        return _pretokenize(held, input_path, tokenizer, out_dir, workers, batch_docs, skip_bad_lines, max_tokens,
                            word_weight, exclude, say_unfinished)


def _pretokenize(held: contextlib.ExitStack, input_path: str | os.PathLike, tokenizer: str | os.PathLike,
                 out_dir: str | os.PathLike, workers: int | None, batch_docs: int, skip_bad_lines: bool,
                 max_tokens: int | None, word_weight: int, exclude: str | os.PathLike | None,
                 say_unfinished: bool) -> dict:
    check_word_weight(word_weight, "--word-weight")

    root, out = Path(input_path), Path(out_dir)
    files = input_files(root, exclude)
    kinds = _without_blank_text({f: file_kind(f, skip_bad_lines) for f in files})
    if not any(kinds.values()):  # every file's lines skipped: the first's error says why nothing is left
        read_jsonl(next(iter(kinds)), skip_bad_lines)
    for f in [f for f, k in kinds.items() if not k]:  # left out beside the files that hold records
        file_kind(f, skip_bad_lines, say_skipped=True)
        del kinds[f]
    files = list(kinds)
    if len(set(kinds.values())) > 1:
        chat = next(f for f, k in kinds.items() if k == CHAT)
        raise BabyLlamaError(f"{root} mixes chat records ({chat.name}) with plain text: pretokenize them apart")
    kind = kinds[files[0]]
    names = shard_names(files, root)
    if all(is_val_shard(name) for name in names.values()):  # train would refuse it: say it before the work
        given = [str(f.relative_to(root)) if f != root else f.name for f in names]  # the user's files, not shards
        raise BabyLlamaError(f"{root}: only validation data ({', '.join(given)}: a name with the word "
                             f"{VAL_WORDS_TEXT}); add the training data beside it")
    if kind == TEXT and word_weight > 1:  # nothing would read it
        raise BabyLlamaError(f"--word-weight weighs the requested words in chat replies: {root} holds plain text")
    workers = encoding_processes(workers)
    vocab_size, _ = load_encoder(tokenizer)
    if vocab_size > 65536:
        raise BabyLlamaError(f"vocabulary of {vocab_size} tokens does not fit uint16 shards")
    if kind == CHAT:
        encoded = {f: _encode_chat_file(f, tokenizer, workers, skip_bad_lines, max_tokens, word_weight)
                   for f in files}
        if not any(len(offsets) > 1 for _, _, offsets in encoded.values()):
            raise BabyLlamaError(f"{root}: no conversations left to train on (an empty dataset)")
        encoded = {f: e for f, e in encoded.items() if len(e[2]) > 1}  # a file whose every line was skipped
        if word_weight > 1 and not any(mask.max(initial=0) > 1 for _, mask, _ in encoded.values()):
            raise BabyLlamaError(f"--word-weight {word_weight} weighs nothing in {root}: no reply uses a word its "
                                 "record asks for (\"words\", \"topic_words\": babyllama data instruct writes them)")
    shards: dict[str, list[str]] = {"train": [], "val": []}
    n_tokens = 0
    if kind == CHAT:
        _start_writing(out, held, say_unfinished)
        for f, (ids, mask, offsets) in encoded.items():
            name = names[f]
            _write_chat_shard(out / name, ids, mask, offsets)
            n_tokens += len(ids)
            shards["val" if is_val_shard(name) else "train"].append(name)
    else:
        _check_text_files(files)
        by_file = _documents_by_file(files, skip_bad_lines)
        first = next(by_file, None)
        if first is None:
            raise BabyLlamaError(f"{root}: no documents to pretokenize")
        _start_writing(out, held, say_unfinished)
        # closed before an error leaves the block: the error line is the last one on stderr
        with progress_bar(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                          desc="pretokenize") as bar, \
                _worker_pool(workers, _init_worker, str(tokenizer)) as pool:
            for f, docs in itertools.chain([first], by_file):
                name = names[f]
                shares, done = even_shares(f.stat().st_size, len(docs)), 0  # the file's bytes, over its documents
                batches = batched(docs, batch_docs)
                with safeio.atomic_write(out / name) as sink:
                    for batch, ids in zip(batches, pool.imap(_encode_batch, batches)):
                        sink.write(ids.tobytes())
                        n_tokens += len(ids)
                        bar.update(sum(shares[done:done + len(batch)]))
                        done += len(batch)
                shards["val" if is_val_shard(name) else "train"].append(name)
    _install_tokenizer(Path(tokenizer), out / TOKENIZER_BIN)
    meta = {"vocab_size": vocab_size, "tokenizer": str(tokenizer), "tokens": n_tokens, "shards": shards}
    if kind == CHAT:
        meta["kind"] = CHAT
        meta["conversations"] = sum(len(offsets) - 1 for _, _, offsets in encoded.values())
        meta["word_weight"] = word_weight
    safeio.write_text(out / META, json.dumps(meta, indent=2) + "\n")  # last: the folder is complete
    (out / INCOMPLETE).unlink()
    return meta


def _start_writing(out: Path, held: contextlib.ExitStack, say_unfinished: bool = True) -> None:
    """The shard folder, made, locked (two runs into one folder would mix their shards under the last one's
    meta.json), marked incomplete and without an earlier meta.json until this run writes its own: an interrupted
    run would leave an earlier meta.json describing shards it replaced, and without the mark a folder without
    meta.json would read as llama2.c's shards (every .bin, old and new alike). A folder this run made goes again
    when the run fails (a full disk); an interrupted run's stays marked, and says so (`say_unfinished`: unless the
    caller removes it)."""
    made = not out.exists()
    held.enter_context(safeio.new_folders_removed_on_error(out))  # the empty parents it makes, on a failure
    safeio.output_dir(out)
    held.enter_context(safeio.folder_lock(out, f"another pretokenize is writing {out}: wait for it to end, or "
                                               "choose another --out-dir"))
    safeio.write_text(out / INCOMPLETE, "babyllama data pretokenize is writing this folder, or was interrupted\n")
    (out / META).unlink(missing_ok=True)

    def clean_up(kind, error, trace) -> None:
        if kind is None:
            return
        interrupted = issubclass(kind, (KeyboardInterrupt, Terminated))
        if made and not interrupted:
            shutil.rmtree(out, ignore_errors=True)
        elif interrupted and say_unfinished:  # the folder reads as unfinished now: say what to do
            say(f"interrupted: {out} is unfinished ({INCOMPLETE} marks it); run the same command again")

    held.push(clean_up)


def _without_blank_jsonl(files: list[Path]) -> list[Path]:
    """`files` less the .jsonl files without a record, which get no shard as an empty .txt gets none; when all
    are such, the first stays, so that reading it says the data is empty."""
    kept = [f for f in files if f.suffix != ".jsonl" or _has_a_line(f)]
    return kept or files[:1]


def _without_blank_text(kinds: dict[Path, str]) -> dict[Path, str]:
    """Among chat files, the .txt files without a document are no plain text to mix with them: left out."""
    if CHAT not in kinds.values():
        return kinds
    return {f: k for f, k in kinds.items() if f.suffix != ".txt" or next(iter_documents(f), None) is not None}


def _has_a_line(path: Path) -> bool:
    with safeio.open_regular(path, "data file") as f:
        return any(line.strip() for line in f)


def _check_text_files(files: list[Path]) -> None:
    """Read every .txt and .json file once before a shard is written (.jsonl ones were read whole already): one
    that is not UTF-8 text, or not JSON, then stops the run with the folder as it was, not halfway through it."""
    for f in files:
        if f.suffix != ".jsonl":
            collections.deque(read_documents(f), maxlen=0)


def _documents_by_file(files: list[Path], skip_bad_lines: bool) -> Iterator[tuple[Path, list[str]]]:
    """(file, its documents) for each of `files` that holds any: a file without any gets no shard (an empty
    one holds no whole token, and training refuses it)."""
    for f in files:
        docs = list(read_documents(f, skip_bad_lines))
        if docs:
            yield f, docs


def _encode_chat_file(path: Path, tokenizer, workers: int | None, skip_bad_lines: bool,
                      max_tokens: int | None, word_weight: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, mask, conversation offsets) of one chat .jsonl file, every conversation checked: malformed lines
    and conversations too long for the context are reported together (one run names them all)."""
    data = read_jsonl(path, skip_bad_lines, defer_bad=True)
    bad = list(data.bad)
    linenos, conversations = zip(*data.items)
    words = [_requested_words(record) for record in data.records]
    pairs = list(zip(conversations, words))
    batches = batched(pairs, 256, _conversation_chars)
    encoded: list[tuple[list[int], list[int]]] = []
    # the bar closed before an error leaves the block: the error line is the last one on stderr
    with progress_bar(total=len(pairs), desc=f"pretokenize {path.name}", unit="conversation") as bar, \
            _worker_pool(min(encoding_processes(workers), len(batches)), _init_chat_worker, str(tokenizer),
                         word_weight) as pool:
        for batch in pool.imap(_encode_conversations, batches):
            encoded += batch
            bar.update(len(batch))
    kept = []
    for lineno, (ids, mask) in zip(linenos, encoded):
        if max_tokens is not None and len(ids) > max_tokens:
            bad.append((lineno, f"the conversation has {len(ids)} tokens, more than max_seq_len {max_tokens - 1} + 1"))
        else:
            kept.append((ids, mask))
    bad.sort()
    if bad and not skip_bad_lines:
        raise BabyLlamaError(describe_bad_lines(path, bad) + " (fix them, or pass --skip-bad-lines)")
    if bad:
        say(f"skipped {describe_bad_lines(path, bad)}")
    if not kept:  # every line skipped: the caller leaves the file out, or says the data is empty
        return np.zeros(0, np.uint16), np.zeros(0, np.uint8), np.zeros(1, np.int64)
    offsets = np.cumsum([0] + [len(ids) for ids, _ in kept], dtype=np.int64)
    all_ids = np.fromiter((t for i, _ in kept for t in i), dtype=np.uint16, count=int(offsets[-1]))
    all_mask = np.fromiter((m for _, ms in kept for m in ms), dtype=np.uint8, count=int(offsets[-1]))
    return all_ids, all_mask, offsets


def _requested_words(record: dict) -> list[str]:
    """What a record's request asked for by name (instruction data): its "words" and its topic's
    "topic_words" ("cat", "Tom"), where the record gives them as lists of strings."""
    out = []
    for key in ("words", "topic_words"):
        value = record.get(key)
        if isinstance(value, list):
            out += [w for w in value if isinstance(w, str) and w.strip()]
    return out


def _write_chat_shard(path: Path, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
    """NAME.bin, NAME.mask and NAME.idx, each written atomically (safeio.atomic_write)."""
    for target, array in ((path, ids), (path.with_suffix(MASK_SUFFIX), mask), (path.with_suffix(INDEX_SUFFIX),
                                                                              offsets)):
        with safeio.atomic_write(target) as f:
            array.tofile(f)


def _install_tokenizer(src: Path, dst: Path) -> None:
    """tokenizer.bin beside the shards (converted from a .model), so train/sample/export find it."""
    if src.suffix == ".model":
        from ..tokenizer import Tokenizer

        Tokenizer.from_sentencepiece(src).save(dst)
    elif src.resolve() != dst.resolve():
        safeio.copy_file(src, dst, "tokenizer")


# ------------------------------------------------------------------------------------------------ batches


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a pretokenized folder; for a folder of llama2.c shards (no meta.json), every .bin
    except tokenizer.bin, with llama2.c's convention that the first shard is the validation data."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise BabyLlamaError(f"data_dir {data_dir} is a file: give the folder that holds the shards "
                             f"({data_dir.parent})")
    if not data_dir.is_dir():
        raise safeio.not_found(data_dir, "data_dir", " (run `babyllama data pretokenize` first)")
    if (data_dir / INCOMPLETE).exists():
        raise BabyLlamaError(f"{data_dir}: an unfinished `babyllama data pretokenize` (interrupted, or still "
                             f"running: {INCOMPLETE}): run it again to completion")
    meta_path = data_dir / META
    if meta_path.exists():
        return _checked_meta(safeio.read_json(meta_path, "meta.json"), meta_path)
    names = sorted(p.name for p in data_dir.glob("*.bin") if p.name != TOKENIZER_BIN and not _is_vocab_file(p))
    if not names:
        inside = sorted(p for p in data_dir.iterdir() if (p / META).is_file())  # `data train-vocab`'s --data-dir
        hint = f"give the shard folder: --data_dir={inside[0]}" if inside else "run `babyllama data pretokenize` first"
        raise BabyLlamaError(f"{data_dir}: no token shards ({hint})")
    if len(names) > 1:
        return {"vocab_size": 0, "shards": {"val": names[:1], "train": names[1:]}}
    return {"vocab_size": 0, "shards": {"val": [], "train": names}}


def _is_vocab_file(path: Path) -> bool:
    """tok{N}.bin beside tok{N}.model: the tokenizer `data train-vocab` wrote, not a shard."""
    return re.fullmatch(r"tok\d+", path.stem) is not None and path.with_suffix(".model").is_file()


def _checked_meta(meta: dict, path: Path) -> dict:
    """meta.json's fields typed; shard names must be plain file names inside its folder."""
    f = Fields(meta, str(path))
    shards = f.sub("shards")
    checked = {"vocab_size": f.int("vocab_size", 0, lo=0, hi=65536),
               "shards": {split: shards.list(split, []) for split in ("train", "val")}}
    kind = f.str("kind", TEXT)
    if kind not in (TEXT, CHAT):
        raise BabyLlamaError(f"{path}: kind must be {TEXT!r} or {CHAT!r}, got {kind!r}")
    if kind == CHAT:
        checked.update(kind=CHAT, conversations=f.int("conversations", 0, lo=0),
                       word_weight=f.int("word_weight", 1, lo=1, hi=MAX_WORD_WEIGHT))
    for names in checked["shards"].values():
        for name in names:
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise BabyLlamaError(f"{path}: shard {name!r} is not a file name in its folder")
    return checked


def _tokens(path: Path, vocab_size: int) -> np.ndarray:
    """A shard's uint16 tokens, memory-mapped, after checking that it is whole (an even, non-zero number of
    bytes) and that every id fits the vocabulary (an out-of-range id would index past the embedding)."""
    size = safeio.file_size(path, "token shard")
    if size == 0:  # meta.json lists it: written by pretokenize, it held tokens
        raise BabyLlamaError(f"{path}: the token shard is empty (a torn file: pretokenize the data again)")
    if size % 2:
        raise BabyLlamaError(f"{path}: {size} bytes is not a whole number of uint16 tokens (a torn or foreign file)")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size and int(tokens.max()) >= vocab_size:
        raise BabyLlamaError(f"{path}: holds token id {int(tokens.max())}, outside the vocabulary of {vocab_size}")
    return tokens


def _shards(data_dir: Path) -> dict[str, list[str]]:
    """meta.json's train and val shard names, when there is training data."""
    shards = read_meta(data_dir)["shards"]
    if shards.get("val") and not shards["train"]:
        raise BabyLlamaError(f"{data_dir}: no training shards, only validation data ({', '.join(shards['val'])}: "
                             f"a name with the word {VAL_WORDS_TEXT})")
    return shards


def split_arrays(data_dir: str | os.PathLike, split: str, vocab_size: int = 0) -> list[np.ndarray]:
    """Memory-mapped token arrays of `split` ("train" or "val"), every id checked against `vocab_size` when
    given. Without validation shards the last VAL_FRACTION of the training tokens is held out (and no longer
    trained on)."""
    data_dir = Path(data_dir)
    shards = _shards(data_dir)
    arrays = lambda names: [_tokens(data_dir / n, vocab_size) for n in names]  # noqa: E731
    if shards.get("val"):
        return arrays(shards[split])
    if len(shards["train"]) > 1:  # no validation shard named: llama2.c's rule, the first shard
        return arrays(shards["train"][:1] if split == "val" else shards["train"][1:])
    if not shards["train"]:
        raise BabyLlamaError(f"{data_dir}: no training shards")
    (whole,) = arrays(shards["train"])
    cut = int(len(whole) * (1 - VAL_FRACTION))
    return [whole[cut:]] if split == "val" else [whole[:cut]]


def split_text(shards: dict[str, list[str]], chat: bool = False) -> str:
    """How training will split these shards (the rule of split_arrays, or of chat_shards), in words."""
    train, val = shards["train"], shards.get("val") or []
    if val:
        return f"{counted(len(train), 'train shard')} and {counted(len(val), 'val shard')}"
    if chat:
        return (f"{counted(len(train), 'shard')} (the last {VAL_FRACTION:.0%} of the conversations held out for "
                "validation: no shard is named val)")
    if len(train) > 1:
        return (f"{counted(len(train) - 1, 'train shard')} and 1 val shard (the first, {train[0]}, as in llama2.c: "
                "none is named val)")
    return f"1 shard (its last {VAL_FRACTION:.0%} held out for validation: no shard is named val)"


class Windows:
    """Random windows of seq_len+1 tokens (inputs and next-token targets) over token arrays, drawn with
    a torch.Generator whose state the checkpoint keeps (so resumed runs see the same batches)."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, what: str):
        self.seq_len = seq_len
        self.arrays = [a for a in arrays if len(a) > seq_len]
        counts = [len(a) - seq_len for a in self.arrays]
        if not counts:
            raise BabyLlamaError(f"{what}: not enough tokens for one window of max_seq_len+1={seq_len + 1}")
        self.ends = np.cumsum(counts)

    def draw(self, n: int, generator: torch.Generator) -> np.ndarray:
        """n window starts, as indices into the concatenation of every array's valid starts."""
        import torch

        return torch.randint(int(self.ends[-1]), (n,), generator=generator).numpy()

    def target_weight(self, starts: np.ndarray, weighted: bool = True) -> float:
        """How much the targets of a batch weigh in the loss: every position of every window, alike."""
        return float(self.tokens(starts))

    def tokens(self, starts: np.ndarray) -> int:
        """How many input positions a batch holds."""
        return len(starts) * self.seq_len

    def batch(self, starts: np.ndarray,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        import torch

        which = np.searchsorted(self.ends, starts, side="right")
        rows = []
        for w, s in zip(which, starts):
            off = s - (self.ends[w - 1] if w else 0)
            rows.append(self.arrays[w][off: off + self.seq_len + 1])
        xy = _to_device(torch.from_numpy(np.stack(rows).astype(np.int64)), device)
        return xy[:, :-1], xy[:, 1:], None  # every target weighs the same


class Examples:
    """Whole conversations of chat shards, one per batch row: inputs ids[:-1], targets ids[1:] with -1 where
    the mask is 0 (the model's loss ignores -1), so the loss is taken on the assistant replies and their EOS
    only. Rows are padded to the batch's longest conversation (inputs with 0, targets with -1). Drawn
    with a torch.Generator like `Windows`, so resumed runs see the same batches."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int, what: str):
        """shards: (tokens, mask, bounds) with bounds (n, 2) the [start, end) of each conversation."""
        self.seq_len = seq_len
        self.shards = shards
        parts = [np.column_stack([np.full(len(b), i), b]) for i, (_, _, b) in enumerate(shards)]
        self.rows = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), dtype=np.int64)
        if not len(self.rows):
            raise BabyLlamaError(f"{what}: no conversations")
        lengths = self.rows[:, 2] - self.rows[:, 1]
        longest = int(lengths.argmax())
        if lengths[longest] > seq_len + 1:
            raise BabyLlamaError(f"{what}: conversation {longest + 1} has {lengths[longest]} tokens, more than "
                                 f"the context holds (max_seq_len {seq_len} + 1); drop it or train a longer "
                                 "context")

    def __len__(self) -> int:
        return len(self.rows)

    def draw(self, n: int, generator: torch.Generator) -> np.ndarray:
        import torch

        return torch.randint(len(self.rows), (n,), generator=generator).numpy()

    def target_weight(self, picks: np.ndarray, weighted: bool = True) -> float:
        """How much the targets of a batch weigh in the loss: the sum of their mask weights (`weighted`), or how
        many there are (the reply tokens)."""
        total = 0
        for shard, start, end in self.rows[picks]:
            weight = self.shards[shard][1][start + 1:end]
            total += int(weight.sum(dtype=np.int64)) if weighted else int(np.count_nonzero(weight))
        return float(total)

    def _width(self, rows: np.ndarray) -> int:
        """The input length of a batch of these rows: its longest conversation less its last token."""
        return int((rows[:, 2] - rows[:, 1]).max()) - 1

    def tokens(self, picks: np.ndarray) -> int:
        """How many input positions a batch holds, padding included."""
        return len(picks) * self._width(self.rows[picks])

    def batch(self, picks: np.ndarray,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs, targets), and the targets' weights (float) when the shards weigh some tokens above 1
        (`pretokenize`'s word_weight), else None."""
        import torch

        rows = self.rows[picks]
        width = self._width(rows)
        x = np.zeros((len(rows), width), dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        w = np.zeros((len(rows), width), dtype=np.float32)
        for r, (shard, start, end) in enumerate(rows):
            tokens, mask, _ = self.shards[shard]
            ids, weight = tokens[start:end].astype(np.int64), mask[start + 1:end]
            x[r, :len(ids) - 1] = ids[:-1]
            y[r, :len(ids) - 1] = np.where(weight > 0, ids[1:], -1)
            w[r, :len(ids) - 1] = weight
        weights = _to_device(torch.from_numpy(w), device) if w.max() > 1 else None
        return _to_device(torch.from_numpy(x), device), _to_device(torch.from_numpy(y), device), weights


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on `device`: through pinned memory, without waiting, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_validation_split(data_dir: Path, conversations: int) -> None:
    """Chat data without validation shards holds its last conversations out: one conversation cannot be both
    trained on and held out."""
    if conversations < 2 and not _shards(data_dir).get("val"):
        raise BabyLlamaError(f"{data_dir}: {conversations} conversation, too few to hold one out for validation: add "
                             f"more, or a validation file (a name with the word {VAL_WORDS_TEXT})")


def chat_shards(data_dir: str | os.PathLike, split: str,
                vocab_size: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, mask, bounds) of `split`'s chat shards, each checked whole (see `_chat_shard`). Without
    validation shards the last VAL_FRACTION of the training conversations is held out (and no longer trained
    on)."""
    data_dir = Path(data_dir)
    shards = _shards(data_dir)

    def load(name: str):
        return _chat_shard(data_dir / name, vocab_size)

    if shards.get("val"):
        return [load(n) for n in shards[split]]
    loaded = [load(n) for n in shards["train"]]
    total = sum(len(b) for _, _, b in loaded)
    check_validation_split(data_dir, total)
    n_val = max(1, int(total * VAL_FRACTION))
    out, seen = [], 0  # conversations [0, total - n_val) train, the rest validation
    for tokens, mask, bounds in loaded:
        cut = min(max(total - n_val - seen, 0), len(bounds))
        part = bounds[:cut] if split == "train" else bounds[cut:]
        if len(part):
            out.append((tokens, mask, part))
        seen += len(bounds)
    return out


def _chat_shard(path: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chat shard's tokens, mask and conversation bounds: a mask byte per token, offsets from 0 to the
    token count that never go back (anything else is a torn or foreign file)."""
    tokens = _tokens(path, vocab_size)
    mask_path, index_path = path.with_suffix(MASK_SUFFIX), path.with_suffix(INDEX_SUFFIX)
    index_bytes = safeio.file_size(index_path, "chat index")
    if safeio.file_size(mask_path, "chat mask") != len(tokens) or index_bytes % 8 or index_bytes < 16:
        raise BabyLlamaError(f"{path}: its mask or index does not match its {len(tokens):,} tokens (a torn file?)")
    offsets = np.fromfile(index_path, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != len(tokens) or (np.diff(offsets) < 0).any():
        raise BabyLlamaError(f"{index_path}: conversation offsets that do not cover the shard's tokens")
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
    _check_targets(path, mask, offsets)
    return tokens, mask, np.column_stack([offsets[:-1], offsets[1:]])


def _check_targets(path: Path, mask: np.ndarray, offsets: np.ndarray) -> None:
    """Every conversation has something to learn, as pretokenize writes it: two tokens or more, the first (BOS)
    weighing 0, and a reply token (weight above 0) after it. A batch of conversations without one has no loss to
    average (a division by zero), an empty one no input. One pass over the mask; a few bytes per conversation."""
    starts = offsets[:-1]
    short = np.flatnonzero(np.diff(offsets) < 2)
    if len(short):
        raise BabyLlamaError(f"{path}: conversation {short[0] + 1} has {offsets[short[0] + 1] - starts[short[0]]} "
                             "tokens, nothing to learn (a torn or foreign index?)")
    firsts = np.flatnonzero(mask[starts])
    if len(firsts):
        raise BabyLlamaError(f"{path}: conversation {firsts[0] + 1}'s first token has the mask weight "
                             f"{mask[starts[firsts[0]]]}, not 0 (a torn or foreign mask?)")
    # with every first token weighing 0, the max over [start + 1, next start] is the max over one's targets
    silent = np.flatnonzero(np.maximum.reduceat(mask, starts + 1) == 0)
    if len(silent):
        raise BabyLlamaError(f"{path}: conversation {silent[0] + 1} has no reply token (a mask weight above 0) to "
                             "learn (a torn or foreign mask?)")


def open_split(data_dir: str | os.PathLike, split: str, seq_len: int, vocab_size: int = 0) -> Windows | Examples:
    """Training batches of `split`: whole conversations for chat data, random windows for plain text; token
    ids are checked against `vocab_size` when given."""
    what = f"{data_dir} ({split})"
    if read_meta(data_dir).get("kind") == CHAT:
        return Examples(chat_shards(data_dir, split, vocab_size), seq_len, what)
    return Windows(split_arrays(data_dir, split, vocab_size), seq_len, what)
