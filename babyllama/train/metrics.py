"""Run metrics: one JSON object per line in metrics.jsonl beside the checkpoint (training steps and
evaluations), a loss-curve PNG drawn from it, and MFU (model FLOPs utilisation)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import safeio
from ..errors import BabyLlamaError
from ..fields import is_int, is_number

METRICS_NAME = "metrics.jsonl"
PENDING_METRICS_NAME = "metrics.pending.jsonl"  # a new run's log until its first checkpoint
PLOT_NAME = "loss.png"

# dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device, dtype: str, override: float = 0.0) -> float | None:
    """Per-device peak FLOP/s to measure MFU against: `override` when set, else the table above for a
    16-bit run on a known GPU, else None (CPU peaks vary too much to guess)."""
    if override > 0:
        return override
    if device.type != "cuda" or dtype not in ("bfloat16", "float16"):
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


class MetricsLog:
    """Appends one JSON line per record. A run killed mid-write leaves a torn last line, which the reader
    skips; the file is rewritten (atomically) only when a run that started or resumed logs its first record (a
    resume that finds nothing to train leaves it as it is). A new run in a folder that
    holds an earlier run's checkpoint (`replaces`) logs to metrics.pending.jsonl until `checkpointed()` (at its
    first checkpoint) moves that over metrics.jsonl: a run stopped before then leaves the earlier run's
    checkpoint and log together, as a resume of it needs them."""

    def __init__(self, out_dir: str | os.PathLike, resume_from_iter: int | None = None, replaces: bool = False):
        self.final = Path(out_dir) / METRICS_NAME
        pending = self.final.with_name(PENDING_METRICS_NAME)
        self.path = pending if replaces and resume_from_iter is None else self.final
        self._resume_from_iter = resume_from_iter
        self._started = False

    def _start(self) -> None:
        """The log made this run's, once, before its first record (or checkpoint)."""
        if self._started:
            return
        if self.path == self.final:  # the log of a new run that never reached a checkpoint: no run's any more
            self.final.with_name(PENDING_METRICS_NAME).unlink(missing_ok=True)
        if self._resume_from_iter is None:
            safeio.write_text(self.path, "")
        else:  # drop what a crashed run logged after its last checkpoint: those steps will run again
            kept = [r for r in read_metrics(self.path) if r["iter"] <= self._resume_from_iter]
            safeio.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._started = True

    @property
    def pending(self) -> bool:
        """Whether the records go to metrics.pending.jsonl (out_dir's checkpoint is still an earlier run's)."""
        return self.path != self.final

    def checkpointed(self) -> None:
        """The run wrote a checkpoint: its log is metrics.jsonl from now on."""
        self._start()
        if self.pending:
            safeio.commit(self.path, self.final, "metrics file")
            self.path = self.final

    def write(self, **record) -> None:
        self._start()
        safeio.append_text(self.path, json.dumps(record) + "\n", "metrics log")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl: objects with an integer "iter". A torn last line (a kill during a
    write) is skipped; any other line that is not such a record is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = safeio.read_text(path, "metrics file").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not (isinstance(record, dict) and is_int(record.get("iter"))):
            if n == len(lines):  # no newline after it: the write was cut short
                break
            raise BabyLlamaError(f"{path}:{n}: not a metrics record; remove the line (or the file) to go on")
        records.append(record)
    return records


def plot_losses(out_dir: str | os.PathLike) -> Path | None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    import logging

    # with no writable config folder (a read-only or missing HOME) matplotlib works from a temporary one and
    # says so in a paragraph on stderr: the plot is the same, and the paragraph is not about the training
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    finally:
        mpl_log.setLevel(level)

    records = read_metrics(Path(out_dir) / METRICS_NAME)
    steps = [(r["iter"], r["loss"]) for r in records if is_number(r.get("loss"))]
    evals = [(r["iter"], r["val_loss"]) for r in records if is_number(r.get("val_loss"))]
    if not steps and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    if steps:
        ax.plot(*zip(*steps), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="val loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out_dir) / PLOT_NAME
    try:
        with safeio.pending(path, "loss plot") as tmp:  # a full disk: one line naming loss.png, no torn file
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
