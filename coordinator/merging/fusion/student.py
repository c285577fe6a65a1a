"""The student's side of fusion: a LoRA on the dense candidate, trained on the fused targets, folded in.

Per batch of fusion texts, with ``q`` the student's next-token distribution and, for each text, the
targets of the teacher MinCE chose for it (:mod:`.targets`):

    loss = kd_weight · (CE(p_topk ‖ q) + ULD(p, q)) + (1 − kd_weight) · LM

``CE(p_topk ‖ q)`` is the cross-entropy of the student against the teacher's top-k probabilities plus
one bucket for the rest of the vocabulary (the teacher's mass outside its top-k, and on ids the student
lacks, against the student's mass outside those ids): the targets are not renormalised, so a teacher
that is unsure keeps the student unsure rather than teaching it that only k tokens can follow; equal to
the KL divergence to that coarsened distribution up to the teacher's entropy;
``ULD`` is the L1 distance between sorted top-k probability vectors where the tokenizers do not align
1:1; ``LM`` the language-modelling loss on the text itself. The LoRA (``rank``, on the modules the
experts adapt) is merged into the dense weights at the end (``merge_and_unload``), so the next base is
a plain checkpoint. Training stops after ``steps`` steps or ``budget_s`` seconds, whichever comes first,
and logs a summary line every tenth of the run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cogen.coordinator.merging.fusion.targets import FusionText, Targets
from cogen.core import models
from cogen.core.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["StudentOptions", "StudentRun", "train_student"]


@dataclass(frozen=True)
class StudentOptions:
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 16
    kd_weight: float = 0.8
    budget_s: float = 1800.0
    seed: int = 0


@dataclass(frozen=True)
class StudentRun:
    steps: int
    tokens: int  # forward-pass tokens of the student
    seconds: float
    first_loss: float
    last_loss: float
    stopped: Literal["steps", "budget"]


def _kd(logq: torch.Tensor, row: int, target: Targets, n: int) -> tuple[torch.Tensor, int]:
    """Sum of the top-k cross-entropy (+ ULD) of text ``n``'s targets at ``logq[row]``, and its count."""
    total, count = logq.new_zeros(()), 0
    positions = target.positions[n]
    if positions.numel():
        idx = target.indices[n].to(logq.device)
        p = target.logprobs[n].to(logq.device).exp()  # -inf (ids the student lacks) weigh 0
        p_rest = (1.0 - p.sum(dim=-1)).clamp(min=0.0)  # the teacher's mass outside its (mapped) top-k
        q = logq[row, positions.to(logq.device)].gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, -torch.inf)
        q_rest = torch.log1p(-q.exp().sum(dim=-1).clamp(max=1.0 - 1e-6))
        top = (p * q.masked_fill(idx < 0, 0.0)).sum()
        total = total - top - (p_rest * q_rest).sum()
        count += int(positions.numel())
    uld = target.uld_positions[n]
    if uld.numel():
        width = target.uld_probs[n].shape[-1]
        mine = logq[row, uld.to(logq.device)].exp().topk(width, dim=-1).values
        total = total + (mine - target.uld_probs[n].to(logq.device)).abs().sum()
        count += int(uld.numel())
    return total, count


def train_student(
    model: nn.Module, modules: Sequence[str], corpus: Sequence[FusionText], targets: Sequence[Targets],
    chosen: Sequence[int], options: StudentOptions,
) -> tuple[nn.Module, StudentRun]:  # fmt: skip
    """Train a LoRA on ``modules`` of ``model`` towards each text's ``chosen`` teacher; returns the model
    with the LoRA folded in, and what the run did."""
    started = time.monotonic()
    device = next(model.parameters()).device
    targets_modules = sorted({m.rsplit(".", 1)[-1] for m in modules})
    student = models.add_lora(
        model, ModelConfig(lora_rank=options.rank, lora_alpha=options.rank, lora_dropout=0.0,
                           lora_targets=tuple(targets_modules)), seed=options.seed,
    )  # fmt: skip
    params = models.trainable_parameters(student)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    rng = random.Random(options.seed)
    order: list[int] = []
    first = last = float("nan")
    tokens, step = 0, 0
    stopped: Literal["steps", "budget"] = "steps"
    report_every = max(1, options.steps // 10)
    student.train()
    while step < options.steps:
        if time.monotonic() - started > options.budget_s:
            stopped = "budget"
            break
        if len(order) < options.batch_size:
            fresh = list(range(len(corpus)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: options.batch_size], order[options.batch_size :]
        ids = torch.tensor([corpus[n].ids for n in batch], device=device)
        logq = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), dim=-1)
        lm = -logq.gather(-1, ids[:, 1:, None]).mean()
        kd_sum, kd_count = logq.new_zeros(()), 0
        for row, n in enumerate(batch):
            total, count = _kd(logq, row, targets[chosen[n]], n)
            kd_sum, kd_count = kd_sum + total, kd_count + count
        kd = kd_sum / max(1, kd_count)
        loss = options.kd_weight * kd + (1 - options.kd_weight) * lm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step, tokens = step + 1, tokens + int(ids.numel())
        last = float(loss.detach())
        first = last if step == 1 else first
        if step % report_every == 0 or step == options.steps:
            logger.info("fusion student: step %d/%d, loss %.4f (kd %.4f, lm %.4f), %.0f s", step,
                        options.steps, last, float(kd.detach()), float(lm.detach()),
                        time.monotonic() - started)  # fmt: skip
    student.eval()
    folded: nn.Module = student.merge_and_unload()  # type: ignore[operator]
    for p in folded.parameters():
        p.requires_grad_(False)
    run = StudentRun(step, tokens, time.monotonic() - started, first, last, stopped)
    return folded, run
