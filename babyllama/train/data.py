"""Training data: reading documents from the user's files, pretokenizing them into uint16 shards, and
drawing training batches from the shards.

Inputs (`--input PATH`, a file or a folder searched recursively):
  .txt    documents separated by lines holding exactly `<|endoftext|>` (TinyStories' layout); a file
          without separators is one document
  .jsonl  one document per line: a JSON string, or an object with a "text" or "story" field
  .json   a list of such strings/objects (TinyStories_all_data/data*.json)

Pretokenized layout (llama2.c's): every document is encoded with BOS in front and the token ids of all
documents of one input file are concatenated into one shard of uint16 (`NAME.bin`). meta.json records
the vocabulary size and which shards are training and validation data (a shard whose name contains
"val"); tokenizer.bin is copied beside them so that later steps find it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..documents import iter_documents
from ..errors import BabyLlamaError

SUFFIXES = (".txt", ".jsonl", ".json")
META = "meta.json"
TOKENIZER_BIN = "tokenizer.bin"
VAL_FRACTION = 0.1  # held out of a lone training shard when no validation shard exists


# ------------------------------------------------------------------------------------------------ reading


def input_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise BabyLlamaError(f"{path}: unsupported input type (use {', '.join(SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise BabyLlamaError(f"input not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise BabyLlamaError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    return files


def _doc_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("text", "story"):
            if isinstance(item.get(key), str):
                return item[key]
    raise BabyLlamaError(f"{where}: expected a string or an object with a \"text\" or \"story\" field")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one input file, stripped of surrounding whitespace, empty ones skipped."""
    try:
        if path.suffix == ".txt":
            docs = iter_documents(path)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                docs = [_doc_text(json.loads(line), f"{path}:{i + 1}") for i, line in enumerate(f) if line.strip()]
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise BabyLlamaError(f"{path}: a .json input must hold a list of documents")
            docs = [_doc_text(item, f"{path}[{i}]") for i, item in enumerate(data)]
    except UnicodeDecodeError:
        raise BabyLlamaError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BabyLlamaError(f"{path}: invalid JSON: {e}") from None
    for doc in docs:
        doc = doc.strip()
        if doc:
            yield doc


# ------------------------------------------------------------------------------------------------ encoding


def load_encoder(path: str | os.PathLike):
    """text → ids (no BOS) with a sentencepiece .model (fast, C++) or a llama2.c tokenizer.bin."""
    path = Path(path)
    if not path.is_file():
        raise BabyLlamaError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        from ..tokenizer import open_sentencepiece

        sp = open_sentencepiece(path)
        return sp.vocab_size(), lambda texts: sp.encode(texts)
    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    return tok.vocab_size, lambda texts: [tok.encode(t, bos=False) for t in texts]


_worker_encode = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_encode
    _worker_encode = load_encoder(tokenizer_path)[1]


def _encode_batch(texts: list[str]) -> np.ndarray:
    from ..tokenizer import BOS

    out = []
    for ids in _worker_encode(texts):
        out.append(BOS)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def shard_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "_".join(rel.with_suffix("").parts) + ".bin"


def is_val_shard(name: str) -> bool:
    return "val" in Path(name).stem.lower()


def pretokenize(input_path: str | os.PathLike, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
                workers: int | None = None, batch_docs: int = 256) -> dict:
    """Encode every document of `input_path` (BOS first) into uint16 shards in `out_dir`, one per input
    file, using `workers` processes. Returns the meta.json contents."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    root, out = Path(input_path), Path(out_dir)
    files = input_files(root)
    vocab_size, _ = load_encoder(tokenizer)
    if vocab_size > 65536:
        raise BabyLlamaError(f"vocabulary of {vocab_size} tokens does not fit uint16 shards")
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    shards = {"train": [], "val": []}
    n_tokens = 0
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="pretokenize")
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer),)) as pool:
        for f in files:
            docs = list(read_documents(f))
            name = shard_name(f, root)
            tmp = out / (name + ".tmp")
            step = f.stat().st_size / max(1, len(docs))
            batches = [docs[i:i + batch_docs] for i in range(0, len(docs), batch_docs)]
            with open(tmp, "wb") as sink:
                for batch, ids in zip(batches, pool.map(_encode_batch, batches)):
                    sink.write(ids.tobytes())
                    n_tokens += len(ids)
                    bar.update(step * len(batch))
            os.replace(tmp, out / name)
            shards["val" if is_val_shard(name) else "train"].append(name)
    bar.close()
    _install_tokenizer(Path(tokenizer), out / TOKENIZER_BIN)
    meta = {"vocab_size": vocab_size, "tokenizer": str(tokenizer), "tokens": n_tokens, "shards": shards}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _install_tokenizer(src: Path, dst: Path) -> None:
    """tokenizer.bin beside the shards (converted from a .model), so train/sample/export find it."""
    if src.suffix == ".model":
        from ..tokenizer import Tokenizer

        Tokenizer.from_sentencepiece(src).save(dst)
    elif src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------------ batches


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a pretokenized folder; for a folder of llama2.c shards (no meta.json), every .bin
    except tokenizer.bin, with llama2.c's convention that the first shard is the validation data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BabyLlamaError(f"data_dir not found: {data_dir} (run `babyllama data pretokenize` first)")
    meta_path = data_dir / META
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    names = sorted(p.name for p in data_dir.glob("*.bin") if p.name != TOKENIZER_BIN)
    if not names:
        raise BabyLlamaError(f"{data_dir}: no token shards (run `babyllama data pretokenize` first)")
    if len(names) > 1:
        return {"vocab_size": 0, "shards": {"val": names[:1], "train": names[1:]}}
    return {"vocab_size": 0, "shards": {"val": [], "train": names}}


def split_arrays(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """Memory-mapped token arrays of `split` ("train" or "val"). Without validation shards the last
    VAL_FRACTION of the training tokens is held out (and no longer trained on)."""
    data_dir = Path(data_dir)
    shards = read_meta(data_dir)["shards"]
    arrays = lambda names: [np.memmap(data_dir / n, dtype=np.uint16, mode="r") for n in names]  # noqa: E731
    if shards.get("val"):
        return arrays(shards[split])
    if len(shards["train"]) > 1:  # no validation shard named: llama2.c's rule, the first shard
        return arrays(shards["train"][:1] if split == "val" else shards["train"][1:])
    (whole,) = arrays(shards["train"])
    cut = int(len(whole) * (1 - VAL_FRACTION))
    return [whole[cut:]] if split == "val" else [whole[:cut]]


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

    def draw(self, n: int, generator) -> np.ndarray:
        """n window starts, as indices into the concatenation of every array's valid starts."""
        import torch

        return torch.randint(int(self.ends[-1]), (n,), generator=generator).numpy()

    def batch(self, starts: np.ndarray, device):
        import torch

        which = np.searchsorted(self.ends, starts, side="right")
        rows = []
        for w, s in zip(which, starts):
            off = s - (self.ends[w - 1] if w else 0)
            rows.append(self.arrays[w][off: off + self.seq_len + 1])
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1], xy[:, 1:]
