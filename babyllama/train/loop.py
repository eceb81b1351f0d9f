"""The training loop (llama2.c's train.py): one process, or one per device under torchrun (DDP, or FSDP with
`fsdp=true`).

Batches are defined globally so that the run does not depend on how many processes share it: each
iteration draws batch_size × gradient_accumulation_steps window starts from one generator that every rank
seeds alike; rank r takes micro-batches r, r+W, r+2W, ... of them (W = world size) and accumulates
gradient_accumulation_steps / W of them. Averaged over ranks, the gradient is the single-process one.

Each iteration: lr from the schedule (linear warmup, cosine decay to min_lr), micro-batches forward and
backward (DDP syncs gradients only on the last one: `no_sync`), clip, AdamW step. Every eval_interval
iterations (and at the end) the val loss is estimated on fixed batches and ckpt.pt is written.

With a `teacher` (distill.py), the training loss mixes cross-entropy with distillation from the teacher's
distributions on the same batch; validation losses stay plain cross-entropy.

Fine-tuning (finetune.py) starts from a base model's weights instead, optionally with LoRA (lora.py): the base
frozen, only the adapter trained, checkpointed and written as adapter.safetensors. Chat data is drawn as whole
conversations whose non-assistant targets are -1 (data.Examples), so the same loss covers assistant tokens only.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from .. import safeio
from ..adapter import ADAPTER_FILE, adapter_paths, save_adapter
from ..config import TOKENIZER_BIN, llama_hidden_dim
from ..errors import BabyLlamaError, Terminated, first_line, note, say
from ..model import Transformer
from ..tokenizer import Tokenizer, vocab_mismatch
from . import checkpoint, distill, finetune
from .config import MODEL_KEYS, TrainConfig
from .data import META, Examples, open_split, read_meta
from .lora import adapter_from_state, is_factor
from .metrics import MetricsLog, peak_flops, plot_losses


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE: join the process group (NCCL on GPU, gloo on CPU)."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
             int(os.environ.get("WORLD_SIZE", 1)))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BabyLlamaError("device cuda requested but no CUDA GPU is available (use --device=cpu)")
        if d.enabled:
            device = torch.device("cuda", d.local_rank)
        elif device.index is None:  # "cuda": the current GPU (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BabyLlamaError("device mps requested but MPS is not available here (use --device=cpu)")
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Linear warmup from 0, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * it / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (not on norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU; under FSDP every rank must take part."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_options()
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _load_state_dicts(model, optimizer, ckpt: dict, source: str, lora: bool = False) -> None:
    """Restore a checkpoint's model and optimizer state, checked first (`source`: how errors begin); a LoRA
    checkpoint holds the adapter's factors only."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _state_options(strict=not lora)
    state = checkpoint._strip_prefixes(ckpt["model"])
    if lora and set(state) != {name for name, _ in model.named_parameters() if is_factor(name)}:
        raise BabyLlamaError("cannot resume: the checkpoint's LoRA factors do not match this run's (rank, targets)")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if not lora or is_factor(name)}
    checkpoint.check_resumed_state(ckpt, expected, source)
    set_model_state_dict(model, state, options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)


DATA_NAME = "data"  # a fine-tune's --data, pretokenized into out_dir
PENDING_DATA_NAME = "data.pending"  # a new run's, until its first checkpoint replaces an earlier run's


class Trainer:
    def __init__(self, cfg: TrainConfig, ckpt: dict | None = None, given: Collection[str] | None = None):
        self.cfg = cfg
        self.dist, self.device = setup_distributed(cfg.device)
        self.dtype = resolve_dtype(cfg, self.device)
        if self.dist.enabled:  # one line per process, so a launch shows every rank came up
            print(f"rank {self.dist.rank} of {self.dist.world}: {dist.get_backend()} on {self.device}"
                  f"{' (FSDP)' if cfg.fsdp else ' (DDP)'}", flush=True)
        self.out_dir = Path(cfg.out_dir)
        if self.dist.master:
            safeio.output_dir(self.out_dir, "run folder (out_dir)")
        W = self.dist.world
        if cfg.gradient_accumulation_steps % W:
            raise BabyLlamaError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a "
                                 f"multiple of the number of processes ({W})")
        self.accum = cfg.gradient_accumulation_steps // W  # micro-steps per rank per iteration

        # a fine-tune's base (not needed when a full fine-tune resumes: its checkpoint holds every weight)
        base = finetune.open_base(cfg, given) if cfg.base and (ckpt is None or cfg.lora_rank) else None
        self.data_dir = self._open_data_dir(base)
        if ckpt is not None:
            self._check_tokenizer()
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.max_seq_len  # at most
        self.tokens_seen = 0  # input positions processed by all ranks (chat batches pad to their longest only)
        self.train_data = open_split(self.data_dir, "train", cfg.max_seq_len, cfg.vocab_size)
        self.val_data = open_split(self.data_dir, "val", cfg.max_seq_len, cfg.vocab_size)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.base:
            model, self.lora = finetune.make_model(cfg, base, ckpt)
        else:
            model, self.lora = Transformer(cfg.model_args()), None
        self.model_args = model.args
        model = model.to(self.device)
        self.raw = model
        if cfg.fsdp:
            if not self.dist.enabled:
                resumed = (" (the setting of the run resumed: --fsdp=false resumes it in one process, its "
                           "checkpoint holds whole tensors)" if cfg.init_from == "resume" else "")
                raise BabyLlamaError(f"fsdp=true needs several processes: launch with torchrun --nproc_per_node=N"
                                     f"{resumed}")
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        self.teacher = (distill.load_teacher(cfg.teacher, cfg.vocab_size, cfg.max_seq_len, self.device,
                                             self.data_dir / TOKENIZER_BIN) if cfg.teacher else None)
        self.optimizer = make_optimizer(model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: global batches
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per rank
        self.iter_num, self.best_val_loss, self.last_loss = 0, float("inf"), float("nan")
        self.saved_at: int | None = None  # the step of the checkpoint in out_dir, once there is this run's
        self.tokenizer_installed = False  # the data's tokenizer.bin copied beside this run's checkpoint
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except (RuntimeError, KeyError, ValueError, TypeError) as e:  # states that do not fit this model
                raise BabyLlamaError(f"cannot resume from {self.out_dir / checkpoint.CKPT_NAME}: "
                                     f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
        wrapped: torch.nn.Module = model
        if cfg.compile:
            wrapped = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule around the model
        if self.dist.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = wrapped
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype)
        self.autocast = (torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype
                         else contextlib.nullcontext())
        self.peak = peak_flops(self.device, self.dtype, cfg.peak_flops)
        # an evaluation alone leaves the run's logs as they are
        keeps_logs = self.dist.master and not cfg.eval_only
        replaces = ckpt is None and (self.out_dir / checkpoint.CKPT_NAME).exists()
        self.metrics = MetricsLog(self.out_dir, self.iter_num if ckpt else None, replaces) if keeps_logs else None

    def _open_data_dir(self, base) -> Path:
        """The pretokenized data folder (made here from a fine-tune's `data`), its vocabulary checked."""
        cfg = self.cfg
        data_dir = Path(cfg.data_dir or self.out_dir / DATA_NAME)
        resumed = cfg.init_from == "resume" and (data_dir / META).is_file()  # keeps what the first run made
        if resumed and self.dist.master:  # what a new run stopped before its first checkpoint left: no run's now
            shutil.rmtree(self.out_dir / PENDING_DATA_NAME, ignore_errors=True)
        if cfg.data and not resumed:
            earlier_run = (self.out_dir / checkpoint.CKPT_NAME).exists() and data_dir.exists()
            if cfg.eval_only or earlier_run:  # out_dir's data stays its checkpoint's (see _commit_data)
                data_dir = self.out_dir / PENDING_DATA_NAME
            if self.dist.master:
                if data_dir.name == PENDING_DATA_NAME and data_dir.is_dir():  # what a stopped run left
                    shutil.rmtree(data_dir)
                finetune.prepare_data(cfg, base, data_dir)
            if self.dist.enabled:
                wait_for_peers("while the first one prepared the data (its error is above)")
        if cfg.init_from == "resume" and cfg.data_dir and not data_dir.exists():  # relative to where it started
            raise BabyLlamaError(f"data_dir not found: {data_dir} (a resume reads the data_dir the run started with, "
                                 "relative to the folder it started in, unless --data_dir names another)")
        meta = read_meta(data_dir) if cfg.data_dir or cfg.data else None
        if meta is None:
            raise BabyLlamaError("set --data_dir to a folder made by `babyllama data pretokenize` (or --vocab_size=N "
                                 "for data/tokN, as llama2.c's train.py finds it)")
        if cfg.base:
            finetune.check_vocab(cfg, meta, data_dir, base if cfg.data_dir else None)
            finetune.check_data_word_weight(cfg, meta, data_dir)
        data_vocab = int(meta.get("vocab_size") or 0)
        if cfg.vocab_size == 0:
            cfg.vocab_size = data_vocab
            if not cfg.vocab_size:
                raise BabyLlamaError(f"{data_dir} has no meta.json: set --vocab_size")
        elif data_vocab and cfg.vocab_size != data_vocab:  # the model could not be run with the data's tokenizer
            fix = ("a resumed model keeps its vocabulary: resume on data pretokenized with the run's tokenizer"
                   if cfg.init_from == "resume" else "leave vocab_size at 0 to take the data's")
            raise BabyLlamaError(f"vocab_size {cfg.vocab_size} differs from the data's ({data_vocab}, "
                                 f"{data_dir / 'meta.json'}): {fix}")
        return data_dir

    # ------------------------------------------------------------------------------------ state

    def _restore(self, ckpt: dict) -> None:
        _load_state_dicts(self.raw, self.optimizer, ckpt, f"cannot resume from {self.out_dir / checkpoint.CKPT_NAME}",
                          lora=self.lora is not None)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num = self.saved_at = int(ckpt["iter_num"])
        self.best_val_loss = float(ckpt["best_val_loss"])
        rng = ckpt["rng"]
        self.data_gen.set_state(rng["data"])
        if self.dist.world == 1:  # per-rank dropout streams are not saved; rank 0's is the only one
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save_checkpoint(self) -> None:
        model_sd, optim_sd = _state_dicts(self.raw, self.optimizer)  # collective under FSDP
        if not self.dist.master:
            return
        rng = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # the tokenizer, the adapter and the checkpoint replace their predecessors together or not at all: a
        # failed write (a full disk) or a signal between them left an earlier run's checkpoint beside this
        # run's tokenizer, or an adapter of a later step than the checkpoint's
        with safeio.committed_together():
            if not self.tokenizer_installed:
                self._install_tokenizer()
            if self.lora is not None:  # the base stays where it is: the checkpoint holds the adapter only
                model_sd = {k: v for k, v in model_sd.items() if is_factor(k)}
                save_adapter(adapter_from_state(model_sd, self.lora), self.out_dir / ADAPTER_FILE)
            checkpoint.save({"model": model_sd, "optimizer": optim_sd, "scaler": self.scaler.state_dict(),
                             "model_args": checkpoint.portable_model_args(self.model_args),
                             "config": checkpoint.portable_config(self.cfg.to_dict(), self.model_args.vocab_size),
                             "iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "rng": rng,
                             "lora": self.lora},
                            self.out_dir / checkpoint.CKPT_NAME)
        self.tokenizer_installed = True
        if self.lora is None:  # an earlier LoRA run's adapter here is not this checkpoint's: --lora would merge it
            for stale in adapter_paths(self.out_dir / ADAPTER_FILE):
                stale.unlink(missing_ok=True)
        self.saved_at = self.iter_num
        if self.metrics is not None:
            self.metrics.checkpointed()
        self._commit_data()

    def _commit_data(self) -> None:
        """A new run in a folder that holds an earlier run's checkpoint and data pretokenizes into data.pending,
        which its first checkpoint moves over data (as its log): a run stopped before then leaves the earlier
        run's checkpoint and data together, as a resume of it needs them."""
        if self.data_dir.name != PENDING_DATA_NAME or self.cfg.eval_only:
            return
        final, replaced = self.out_dir / DATA_NAME, self.out_dir / f"{DATA_NAME}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        if final.exists():
            final.rename(replaced)
        self.data_dir.rename(final)  # the open shards are mapped: they stay readable under the new name
        safeio.fsync_dir(self.out_dir)
        shutil.rmtree(replaced, ignore_errors=True)
        self.data_dir = final

    # ------------------------------------------------------------------------------------ steps

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every evaluation)."""
        self.model.eval()
        out = {}
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            total = 0.0
            for _ in range(self.cfg.eval_iters):
                x, y = data.batch(data.draw(self.cfg.batch_size, gen), self.device)[:2]  # unweighted
                with self.autocast:
                    _, loss = self.model(x, y)
                total += loss.item()
            out[split] = total / self.cfg.eval_iters
        self.model.train()
        return out

    def _sync_context(self, last_micro_step: bool):
        """Gradients are all-reduced once per iteration, on the last micro-step."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
            return self.model.no_sync()
        if self.cfg.fsdp:
            # fully_shard() swaps in an FSDP class with this method; torch's stubs cannot know it
            self.raw.set_requires_gradient_sync(last_micro_step)  # type: ignore[operator]
        return contextlib.nullcontext()

    def loss(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of one micro-batch: cross-entropy (weighted per target when the data weighs its
        tokens), or with a teacher the distillation loss."""
        if self.teacher is None:
            return self.model(x, y, weights=weights)[1]
        logits, _ = self.model(x)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(x)
        return distill.distillation_loss(logits, teacher_logits, y, self.cfg.kd_alpha, self.cfg.kd_temperature)

    def step(self) -> torch.Tensor:
        """One optimizer step over this rank's share of a global batch; returns that share of the global batch's
        mean loss (the mean over all its targets: the ranks' shares add up to it)."""
        cfg, W, r = self.cfg, self.dist.world, self.dist.rank
        lr = lr_at(cfg, self.iter_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        starts = self.train_data.draw(cfg.gradient_accumulation_steps * cfg.batch_size, self.data_gen)
        starts = starts.reshape(cfg.gradient_accumulation_steps, cfg.batch_size)
        # every rank draws the whole global batch, so each knows its total target weight without a collective
        weighted = self.teacher is None  # distillation averages over the targets unweighted
        global_weight = sum(self.train_data.target_weight(s, weighted) for s in starts)
        self.tokens_seen += sum(self.train_data.tokens(s) for s in starts)
        total = torch.zeros((), device=self.device)
        for m in range(self.accum):
            picks = starts[m * W + r]
            x, y, weights = self.train_data.batch(picks, self.device)
            # a micro-batch's mean counts by its share of the global batch's targets (DDP divides the summed
            # gradients by W); for windows, where every micro-batch holds as many targets, this is self.accum
            share = global_weight / (W * self.train_data.target_weight(picks, weighted))
            with self._sync_context(m == self.accum - 1):
                with self.autocast:
                    loss = self.loss(x, y, weights)
                loss = loss / share
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return total

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any process: the same answer on every one, as a collective save needs."""
        return self.global_mean(torch.tensor(float(flag), device=self.device)) > 0

    def global_mean(self, value: torch.Tensor) -> float:
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value /= self.dist.world
        return value.item()

    # ------------------------------------------------------------------------------------ loop

    def evaluate_and_save(self) -> None:
        losses = self.estimate_loss()
        self.check_finite("validation", losses["val"])
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.dist.master:
            print(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                  flush=True)
        if self.metrics is not None:
            self.metrics.write(iter=self.iter_num, train_loss=losses["train"], val_loss=losses["val"])
        if self.iter_num > 0 and not self.cfg.eval_only and (self.cfg.always_save_checkpoint or
                                                             self.any_rank(improved)):
            self.save_checkpoint()
        if self.metrics is not None and not self.metrics.pending:  # loss.png goes with out_dir's checkpoint too
            plot_losses(self.out_dir)

    def run(self) -> dict:
        cfg, master = self.cfg, self.dist.master
        if master:
            if not cfg.eval_only:  # an evaluation alone leaves a run's files as they are
                self._check_kept_tokenizer()
                self._check_checkpoint_targets()
                self._note_replaced_checkpoint()
            else:
                self._note_untrained_evaluation()
            n_params = sum(p.numel() for p in self.raw.parameters())
            trained = sum(p.numel() for p in self.raw.parameters() if p.requires_grad)
            lora = f" (LoRA rank {cfg.lora_rank}: {trained:,} trained)" if self.lora else ""
            base = f", fine-tuning {cfg.base}" if cfg.base else ""
            print(f"model: {n_params / 1e6:.2f}M parameters{lora}{base}, {self.dist.world} process(es) on "
                  f"{self.device}, {self.dtype}; {self._tokens_per_iter_text()}", flush=True)
            if self.teacher is not None:
                print(f"distilling from {cfg.teacher} (kd_alpha {cfg.kd_alpha}, kd_temperature "
                      f"{cfg.kd_temperature})", flush=True)
        start_iter = self.iter_num
        if cfg.eval_only:
            try:
                self.evaluate_and_save()
            finally:
                if master and self.data_dir.name == PENDING_DATA_NAME:  # nothing of an evaluation stays
                    shutil.rmtree(self.data_dir, ignore_errors=True)
            return {"iter": self.iter_num, "best_val_loss": self.best_val_loss, "saved_at": None}
        # a checkpoint is written only by an evaluation: a resumed run's first step was evaluated already
        evaluated_at = start_iter if cfg.init_from == "resume" else None
        if master and cfg.init_from == "resume" and start_iter >= cfg.max_iters:
            print(f"nothing to train: the run is at step {start_iter} and max_iters is {cfg.max_iters} "
                  f"(raise --max_iters to go on)", flush=True)
        try:
            self._train(evaluated_at)
        except (KeyboardInterrupt, Terminated):  # Ctrl-C, or SIGTERM (kill, timeout, a batch scheduler)
            if master:
                say(self._interrupted_text())
            raise
        except BrokenPipeError:  # the reader of the log went away (`| head`): the run stops short, and says so
            with contextlib.suppress(OSError, ValueError):  # no second failure at exit's flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise BabyLlamaError(f"the output was closed (a broken pipe): stopped at step {self.iter_num}; "
                                 f"{self._kept_text()}") from None
        except RuntimeError as e:  # under torchrun: another process of the run gone (killed, out of memory)
            if _out_of_memory(e):
                raise BabyLlamaError(f"out of memory at step {self.iter_num} ({first_line(e)[:120]}): lower "
                                     "batch_size or max_seq_len (gradient_accumulation_steps keeps the tokens a "
                                     f"step), or train a smaller model; {self._kept_text()}") from None
            if not (self.dist.enabled and _lost_peer(e)):
                raise
            said = re.search(r"Connection \w+ by peer", first_line(e))  # gloo's, amid a file name and an address
            raise BabyLlamaError(f"another process of this torchrun run stopped at step {self.iter_num} "
                                 f"({said.group() if said else first_line(e)[:160]}); {self._kept_text()}") from None
        if self.dist.enabled:
            dist.barrier()
        return {"iter": self.iter_num, "loss": self.last_loss, "best_val_loss": self.best_val_loss,
                "saved_at": self.saved_at}

    def check_finite(self, which: str, loss: float) -> None:
        """A loss that is NaN or infinite never comes back: stop before a checkpoint of such weights replaces
        the last good one (every process sees the same all-reduced loss, so all stop together)."""
        if not math.isfinite(loss):
            raise BabyLlamaError(f"training diverged: the {which} loss is {loss} at step {self.iter_num}; "
                                 f"{self._kept_text()}. Lower learning_rate (or lora_alpha)"
                                 f"{', or train in dtype=float32' if self.dtype != 'float32' else ''}")

    def _interrupted_text(self) -> str:
        """What a Ctrl-C leaves: the checkpoint of the last evaluation, which a resume goes on from."""
        return f"interrupted at step {self.iter_num}; {self._kept_text()}"

    def _kept_text(self) -> str:
        """Which checkpoint a run that stops now leaves behind."""
        ckpt = self.out_dir / checkpoint.CKPT_NAME
        if self.saved_at is None:
            kept = (f"{ckpt} is an earlier run's" if ckpt.exists() else "no checkpoint was written yet") + \
                f" (this run writes one every eval_interval={self.cfg.eval_interval} steps)"
            if self.metrics is not None and self.metrics.pending:
                kept += f"; so is {self.metrics.final.name}: this run's log is {self.metrics.path}"
            if self.data_dir.name == PENDING_DATA_NAME:
                kept += f"; and {self.out_dir / DATA_NAME}: this run's data is {self.data_dir}"
        else:
            kept = f"{ckpt} holds step {self.saved_at}: --init_from=resume goes on from there"
        return kept

    def _train(self, evaluated_at: int | None) -> None:
        cfg, master = self.cfg, self.dist.master
        flops_per_token = self.raw.flops_per_token()
        t0, t0_iter, t0_tokens = time.perf_counter(), self.iter_num, self.tokens_seen
        while self.iter_num < cfg.max_iters:
            # evaluate before training (a new run) and every eval_interval steps, not again on resume
            if self.iter_num % cfg.eval_interval == 0 and self.iter_num != evaluated_at:
                self.evaluate_and_save()
                evaluated_at = self.iter_num
                t0, t0_iter, t0_tokens = time.perf_counter(), self.iter_num, self.tokens_seen  # not training time
            lr = lr_at(cfg, self.iter_num)
            loss = self.step()
            if self.iter_num % cfg.log_interval == 0 or self.iter_num == cfg.max_iters:
                self.last_loss = self.global_mean(loss)  # also waits for the device: the timing below is real
                self.check_finite("training", self.last_loss)
                elapsed = time.perf_counter() - t0
                dt, tok_s = elapsed / (self.iter_num - t0_iter), (self.tokens_seen - t0_tokens) / elapsed
                t0, t0_iter, t0_tokens = time.perf_counter(), self.iter_num, self.tokens_seen
                if master:
                    self._log_step(self.last_loss, lr, dt, tok_s, flops_per_token)
        if evaluated_at != self.iter_num:
            self.evaluate_and_save()

    def _tokens_per_iter_text(self) -> str:
        if isinstance(self.train_data, Examples):
            return f"up to {self.tokens_per_iter:,} tokens per iteration (conversations padded to a batch's longest)"
        return f"{self.tokens_per_iter:,} tokens per iteration"

    def _log_step(self, loss: float, lr: float, dt: float, tok_s: float, flops_per_token: float) -> None:
        mfu = flops_per_token * tok_s / (self.peak * self.dist.world) if self.peak else None
        mfu_text = f" | mfu {100 * mfu:.2f}%" if mfu is not None else ""
        print(f"{self.iter_num} | loss {loss:.4f} | lr {lr:e} | {dt * 1000:.2f}ms | tok/s {tok_s:,.0f}{mfu_text}",
              flush=True)
        assert self.metrics is not None  # called on the master process, which keeps the metrics log
        self.metrics.write(iter=self.iter_num, loss=loss, lr=lr, dt_ms=dt * 1000, tokens_per_s=tok_s, mfu=mfu)

    def _check_tokenizer(self) -> None:
        """A resumed run goes on with the tokenizer its checkpoint was trained with: the data's must be it."""
        src, dst = self.data_dir / TOKENIZER_BIN, self.out_dir / TOKENIZER_BIN
        if src.is_file() and dst.is_file() and not Tokenizer.load(src).same_as(Tokenizer.load(dst)):
            raise BabyLlamaError(f"cannot resume: {src} is not the tokenizer this run was trained with ({dst}); "
                                 "resume with the run's data, or start a new run")

    def _install_tokenizer(self) -> None:
        """Keep the data's tokenizer.bin beside the checkpoint (sample and export look for it there), written
        with this run's first checkpoint: until then out_dir's tokenizer.bin belongs to the checkpoint an
        earlier run left there. A resumed run keeps its own."""
        src, dst = self.data_dir / TOKENIZER_BIN, self.out_dir / TOKENIZER_BIN
        if src.is_file() and not (self.cfg.init_from == "resume" and dst.exists()):
            safeio.copy_file(src, dst, "tokenizer")

    def _check_checkpoint_targets(self) -> None:
        """The files the first checkpoint writes, checked before training: a folder (or a pipe) in the place of one
        would otherwise fail the write only after eval_interval steps, with that training lost."""
        targets = [self.out_dir / checkpoint.CKPT_NAME]
        if self.lora is not None:
            targets += adapter_paths(self.out_dir / ADAPTER_FILE)
        for path in targets:
            safeio.check_target(path, "checkpoint")

    def _note_replaced_checkpoint(self) -> None:
        """A new run in a folder with a checkpoint replaces it at its first one: a forgotten --init_from=resume
        would lose the earlier run, so say so while it can still be stopped."""
        ckpt, first = self.out_dir / checkpoint.CKPT_NAME, min(self.cfg.eval_interval, self.cfg.max_iters)
        if self.cfg.init_from != "resume" and ckpt.exists() and first > 0:
            note(f"{ckpt} holds an earlier run, which this new run replaces at its first checkpoint (step "
                 f"{first}); --init_from=resume continues it instead")

    def _note_untrained_evaluation(self) -> None:
        """--eval_only evaluates the weights the run starts from: without --init_from=resume (or a base to
        fine-tune) those are random, which a user who meant out_dir's checkpoint would take for its loss."""
        ckpt = self.out_dir / checkpoint.CKPT_NAME
        if self.cfg.init_from != "resume" and not self.cfg.base and ckpt.exists():
            note(f"--eval_only without --init_from=resume evaluates freshly initialized weights, not {ckpt} "
                 "(add --init_from=resume for that)")

    def _check_kept_tokenizer(self) -> None:
        """Data without a tokenizer.bin leaves out_dir's in place (the user may have put it there): kept when
        it fits the model's vocabulary, else refused, as export does with a folder's tokenizer."""
        src, dst = self.data_dir / TOKENIZER_BIN, self.out_dir / TOKENIZER_BIN
        if not src.is_file() and self.cfg.init_from != "resume" and dst.exists():
            n = Tokenizer.load(dst).vocab_size
            if n != self.cfg.vocab_size:
                raise vocab_mismatch(dst, n, self.cfg.vocab_size, f" and {self.data_dir} has no {TOKENIZER_BIN}: "
                                     "remove it, or train in another out_dir")
            note(f"{self.data_dir} has no {TOKENIZER_BIN}: kept {dst}, which sample, run and export will use "
                 "with this model")


def _check_same_data(cfg: TrainConfig, saved: dict) -> None:
    """A resumed fine-tune trains on the data its first run pretokenized into out_dir/data: other --data would
    be silently ignored."""
    first = saved.get("data")
    if cfg.data and isinstance(first, str) and first and Path(cfg.data).resolve() != Path(first).resolve():
        raise BabyLlamaError(f"cannot resume with other data: this run trains on {first}, not {cfg.data} "
                             "(start a new run in another out_dir to train on it)")


def _check_same_base(cfg: TrainConfig, saved: dict) -> None:
    """A resumed full fine-tune holds every weight in its checkpoint: another --base would be recorded as the
    run's base without a weight of it trained. The base is recorded as given, relative to the folder the run
    started in: from another folder it may not be found, and the same file given by another path is the same
    base. (A LoRA run's base is checked by its weights: it may have moved.)"""
    first = saved.get("base")
    if cfg.lora_rank or not cfg.base or not isinstance(first, str) or not first:
        return
    given, started = Path(cfg.base), Path(first)
    if given.exists() and started.exists() and not os.path.samefile(given, started):
        raise BabyLlamaError(f"cannot resume with another base: this full fine-tune started from {first} (as given "
                             "then), and its checkpoint holds every weight (leave --base out)")


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether an allocation failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(e)


def wait_for_peers(when: str) -> None:
    """dist.barrier(), where a process that went away meanwhile (it stopped on an error of its own, which it
    printed) is one line here too, not gloo's traceback."""
    try:
        dist.barrier()
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        raise BabyLlamaError(f"another process of this torchrun run stopped {when}") from None


def _lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because a process at the other end went away (gloo's "Connection reset by
    peer" / "closed by peer", NCCL's remote errors), not for a bug of ours, whose traceback stays."""
    text = str(e)
    return "by peer" in text or ("NCCL" in text and "remote" in text.lower())


def _shape_changed(saved: dict, asked: dict, key: str) -> bool:
    """Whether `asked` changes the model-shape setting `key` of the checkpoint's config `saved`; multiple_of is
    judged at the saved dim, as a new dim changes the hidden width by itself (and is named for it)."""
    if key == "multiple_of":
        asked = {**asked, "dim": saved.get("dim")}
    return _shape_value(saved, key) != _shape_value(asked, key)


def _shape_value(config: dict, key: str):
    """What a model-shape setting of `config` makes of the model: n_kv_heads 0 is n_heads, and multiple_of counts
    through the hidden width it rounds to (n_kv_heads 4 with 4 heads, or multiple_of 48 where it rounds as 32
    does, is the same model)."""
    if key == "n_kv_heads":
        return config.get("n_kv_heads") or config.get("n_heads")
    if key == "multiple_of":
        try:
            return llama_hidden_dim(config["dim"], config["multiple_of"])
        except (KeyError, TypeError, ValueError):
            return config.get("multiple_of")
    return config.get(key)


def train(cfg: TrainConfig, given: Collection[str] | None = None) -> dict:
    """Run (or resume) training as configured. Returns {"iter", "loss", "best_val_loss", "saved_at"}: saved_at
    is the step of out_dir's checkpoint when it is this run's (None when it wrote none: an evaluation, or
    max_iters 0). `given`: the keys set by the run's config file and command line, where known (a fine-tune
    refuses a shape key given with another value than its base's; None: one whose value is not the default)."""
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = checkpoint.load(Path(cfg.out_dir) / checkpoint.CKPT_NAME)
        checkpoint.check_resumable(ckpt, str(Path(cfg.out_dir) / checkpoint.CKPT_NAME))
        saved, asked = ckpt["config"], cfg.to_dict()
        changed = [k for k in MODEL_KEYS if k in saved and _shape_changed(saved, asked, k)
                   and not (k == "vocab_size" and asked[k] == 0)]
        if cfg.base and changed == ["max_seq_len"]:  # a fine-tune's is the training window, not the model's context
            raise BabyLlamaError(f"cannot resume with another training window: this fine-tune trains on windows of "
                                 f"max_seq_len {saved['max_seq_len']} (leave max_seq_len out)")
        if changed:
            raise BabyLlamaError(f"cannot resume with a different model shape ({', '.join(changed)} changed)")
        _check_same_data(cfg, saved)
        _check_same_base(cfg, saved)
    new_out_dir = not Path(cfg.out_dir).exists()
    with contextlib.ExitStack() as held:
        with safeio.new_folders_removed_on_error(cfg.out_dir):  # a run refused while setting up leaves no empty out_dir
            if int(os.environ.get("RANK", 0)) == 0 and not cfg.eval_only:
                held.enter_context(_run_folder_lock(cfg.out_dir))
            trainer = Trainer(cfg, ckpt, given)
        try:
            return trainer.run()
        finally:
            if trainer.dist.enabled and dist.is_initialized():
                dist.destroy_process_group()
            if cfg.eval_only and new_out_dir and trainer.dist.master:  # an evaluation writes nothing: no folder
                with contextlib.suppress(OSError):
                    Path(cfg.out_dir).rmdir()  # only where it is empty


def _run_folder_lock(out_dir: str) -> contextlib.AbstractContextManager:
    """One run at a time writes a run folder: a second one (the command started again in another terminal) would
    empty the first's metrics.jsonl at once and then replace its checkpoints with its own."""
    safeio.output_dir(out_dir, "run folder (out_dir)")
    return safeio.folder_lock(out_dir, f"another training run is writing {out_dir}: wait for it to end, or choose "
                                       "another out_dir")
