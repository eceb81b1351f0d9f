"""Knowledge distillation: a frozen teacher model's next-token distributions as extra training signal.

With `teacher = "path/to/model.bin"` (any model babyllama reads, with the student's vocabulary), every training batch
also runs through the teacher, and the loss becomes

    kd_alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − kd_alpha) · CE(student, next token)

(Hinton et al., 2015): the KL term gives the student the teacher's whole distribution at every position,
far more signal per token than the one real next token; the cross-entropy term keeps the real labels, so
the student can learn what the teacher gets wrong. T² keeps the KL term's gradients at the scale of the
cross-entropy's whatever the temperature T. Validation losses stay plain cross-entropy on real tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BabyLlamaError, note
from ..model import Transformer
from ..tokenizer import Tokenizer


def load_teacher(path: str, vocab_size: int, seq_len: int, device: torch.device,
                 data_tokenizer: Path | None = None) -> Transformer:
    """The teacher of `path`, frozen and in eval mode on `device`; it must share the student's vocabulary
    (its size, and where both are known, the tokenizer: the tokenizer.bin beside it, as `run` takes it, and
    the data's `data_tokenizer`) and cover its context length."""
    from ..loading import carried_tokenizer, open_model

    try:
        source = open_model(path, keep_quantized=False)  # any format the other commands read
        # same-sized vocabularies can still give other ids
        carried = carried_tokenizer(source, advice=" (a teacher reads the tokenizer beside it or inside it)")
    except BabyLlamaError as e:
        raise BabyLlamaError(f"teacher: {e}") from None
    args = source.weights.args
    if args.vocab_size != vocab_size:
        raise BabyLlamaError(f"teacher {path} has a {args.vocab_size}-token vocabulary, the data {vocab_size}: "
                             "distillation needs the same tokenizer")
    if carried is None:  # a .bin alone: nothing to compare (its vocabulary size matched)
        note(f"teacher {path} has no tokenizer beside or inside it: its token ids are taken to mean the "
             "data's tokens (not checked)")
    if data_tokenizer is not None and data_tokenizer.is_file() and carried is not None and \
            not carried.same_as(Tokenizer.load(data_tokenizer)):
        raise BabyLlamaError(f"teacher {path} was trained with {source.tokenizer or 'the vocabulary it carries'}, "
                             f"not with the data's tokenizer ({data_tokenizer}): distillation needs the same tokenizer")
    if args.max_seq_len < seq_len:
        raise BabyLlamaError(f"teacher {path} has a context of {args.max_seq_len} tokens, shorter than "
                             f"max_seq_len={seq_len}")
    teacher = Transformer.from_weights(source.weights.to_fp32()).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """The loss above, averaged over the positions whose target is not -1 (the ignored ones, as in the
    model's cross-entropy). logits and teacher_logits (..., vocab); targets (...)."""
    vocab = logits.size(-1)
    logits, teacher_logits = logits.float().reshape(-1, vocab), teacher_logits.float().reshape(-1, vocab)
    targets = targets.reshape(-1)
    ce = F.cross_entropy(logits, targets, ignore_index=-1)
    if alpha == 0.0:
        return ce
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # per position
    keep = targets != -1
    kl = (kl * keep).sum() / keep.sum().clamp(min=1)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce
