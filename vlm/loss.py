"""Next-token loss with per-task sums, normalised by the loss tokens of the whole global batch.

Normalising each micro-batch by the *global* count of loss tokens (all ranks, all accumulation steps) makes the
gradient the exact token-mean over the global batch: one process with batch B·W·A, W processes with B each,
or accumulation over A micro-batches all give the same update.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlm.data import IGNORE, TASKS, Sample


class LossSums(NamedTuple):
    total: torch.Tensor       # () fp32 sum of token losses (differentiable)
    per_task: torch.Tensor    # (T,) fp32 detached sums per task
    counts: torch.Tensor      # (T,) loss tokens per task


def next_token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor,
                         n_tasks: int = len(TASKS)) -> LossSums:
    """Summed cross-entropy of predicting labels[:, t+1] from position t, in fp32.

    Args: logits (B, L, V); labels (B, L) with IGNORE; task (B, L) task id of each token, -1 on padding."""
    target = labels[:, 1:]
    tok_task = task[:, 1:]
    keep = target != IGNORE
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view_as(target)
    idx = torch.where(keep, tok_task, 0).reshape(-1)
    per_task = torch.zeros(n_tasks, device=logits.device).index_add_(0, idx, losses.detach().reshape(-1))
    counts = torch.zeros(n_tasks, device=logits.device).index_add_(0, idx, keep.reshape(-1).float())
    return LossSums(losses.sum(), per_task, counts)


def backward_scale(global_loss_tokens: int, world_size: int, accumulation_steps: int) -> float:
    """Factor turning a micro-batch loss *sum* into what `accelerator.backward` expects.

    accelerate (and DeepSpeed) divide the loss by the accumulation steps and DDP/ZeRO average gradients over
    ranks, so sum · W · A / N_global yields gradients of the token-mean over the global batch."""
    return world_size * accumulation_steps / max(global_loss_tokens, 1)


def unigram_entropy(samples: Sequence[Sample], n_tasks: int = len(TASKS)) -> dict[str, float]:
    """Per task, the entropy (nats per loss token) of the targets' empirical unigram distribution: the loss of
    the best model that ignores context, the baseline a trained model must beat."""
    counts: list[Counter] = [Counter() for _ in range(n_tasks)]
    for s in samples:
        counts[s.task].update(t for t in s.labels if t != IGNORE)
    out = {}
    for task, c in enumerate(counts):
        total = sum(c.values())
        if total:
            out[TASKS[task]] = -sum(n / total * math.log(n / total) for n in c.values())
    return out
