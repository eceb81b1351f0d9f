"""Sample stories from a story model into a TinyStories-layout .txt file (each story followed by a line
`<|endoftext|>`), with babyllama's batched engine: training text for sequence-level distillation.

    python scripts/generate_stories.py MODEL TOKENIZER OUT.txt --stories N [--seed S] [--batch B]
                                       [--temperature 1.0] [--topp 0.95]

Story i (0-based) starts from BOS alone and is sampled with seed S + i, so files made with disjoint seed
ranges hold different stories and two processes can fill the two halves of a data set at once. A story
ends at the model's next BOS (the start of another story) or at its context length. Slots are refilled
as stories finish, so every forward pass carries a full batch; stories are written in seed order, so the
file of an interrupted run is the start of the complete one. Used by scripts/train_builtin.sh."""

from __future__ import annotations

import argparse
import time

from babyllama import load
from babyllama.generate import Batch, Sequence
from babyllama.progress import progress_bar
from babyllama.sampler import Sampler
from babyllama.tokenizer import BOS

SEPARATOR = "<|endoftext|>"


def story_text(tokenizer, ids: list[int]) -> str | None:
    """The story as training text, or None if it cannot stand as a document of the .txt layout."""
    text = tokenizer.decode(ids).strip()
    if not text or any(line.strip() == SEPARATOR for line in text.splitlines()):
        return None
    return text


def generate_stories(model_path: str, tokenizer_path: str, out_path: str, n_stories: int, seed: int = 1,
                     batch: int = 64, temperature: float = 1.0, topp: float = 0.95) -> dict:
    """Write n_stories sampled stories to out_path; returns counts (stories, tokens, bytes, seconds)."""
    model = load(model_path, tokenizer_path)
    seq_len = model.args.max_seq_len
    slots = Batch(model.engine, batch)
    index: dict[int, int] = {}  # id(sequence) -> story number
    done: dict[int, list[int]] = {}  # finished stories waiting for the ones before them
    started, written, kept, tokens, n_bytes = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    with open(out_path, "w", encoding="utf-8") as out, progress_bar(total=n_stories, desc="stories") as bar:
        while written < n_stories:
            while slots.free_slots and started < n_stories:
                seq = slots.add(Sequence([BOS], Sampler(temperature, topp, seed + started), seq_len))
                index[id(seq)] = started
                started += 1
            slots.step()
            for seq in [s for s in slots.active if s.done]:
                slots.release(seq)
                done[index.pop(id(seq))] = seq.generated
            while written in done:
                ids = done.pop(written)
                written += 1
                bar.update(1)
                text = story_text(model.tokenizer, ids)
                if text is None:
                    continue
                out.write(text + "\n" + SEPARATOR + "\n")
                kept, tokens, n_bytes = kept + 1, tokens + len(ids), n_bytes + len(text.encode("utf-8"))
    return {"stories": kept, "tokens": tokens, "bytes": n_bytes, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--stories", type=int, required=True)
    p.add_argument("--seed", type=int, default=1, help="story i samples with seed + i (must be >= 1)")
    p.add_argument("--batch", type=int, default=64, help="stories sampled at once")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topp", type=float, default=0.95)
    a = p.parse_args()
    if a.seed < 1:
        p.error("--seed must be >= 1 (seed 0 means the clock)")
    r = generate_stories(a.model, a.tokenizer, a.out, a.stories, a.seed, a.batch, a.temperature, a.topp)
    print(f"{a.out}: {r['stories']} stories, {r['tokens']:,} tokens, {r['bytes']:,} bytes in {r['seconds']:.0f} s "
          f"({r['tokens'] / r['seconds']:,.0f} tok/s)")


if __name__ == "__main__":
    main()
