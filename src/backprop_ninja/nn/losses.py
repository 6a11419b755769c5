"""Softmax cross-entropy, the mean over the targets, with an optional ignore index for padding,
and optionally against a teacher's soft targets too (distillation).

Dimension letters: N rows (n, or n*T flattened), V vocab size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -1  # makemore's padding target: no loss, no gradient


class SoftTargets(NamedTuple):
    """A teacher's predictions for the batch, and how much of each target they make up."""

    probs: Tensor   # like the logits (n x V, or n x T x V): each row a distribution over V
    weight: float   # alpha in [0, 1]: the target is (1 - alpha) onehot(y) + alpha probs


class CrossEntropyCache(NamedTuple):
    probs: Tensor         # N x V, softmax(logits)
    targets: Tensor       # N int64 (IGNORE_INDEX where padded)
    keep: Tensor | None   # N bool, the targets that count (None: all of them)
    count: int            # how many targets count: the mean's denominator
    shape: torch.Size     # the logits' shape (n x V, or n x T x V)
    soft: Tensor | None = None  # N x V, alpha * the teacher's probabilities (None: no teacher)
    hard: float = 1.0     # 1 - alpha: the one-hot target's share


def cross_entropy_forward(logits: Tensor, targets: Tensor, ignore_index: int | None = None,
                          soft: SoftTargets | None = None) -> tuple[Tensor, CrossEntropyCache]:
    """Mean of -log softmax(logits)[target] over the targets that are not ``ignore_index``.

    With ``soft`` (distillation), the target of each row is the mixture q = (1 - alpha) onehot(y)
    + alpha t of the label and the teacher's distribution t, and the loss is the cross-entropy
    -sum_v q_v log p_v: (1 - alpha) times the plain loss plus alpha times -sum_v t_v log p_v.
    log_softmax first: the loss stays finite where a probability underflows to 0.
    """
    shape = logits.shape
    logprobs = torch.log_softmax(logits.reshape(-1, shape[-1]), dim=1)
    targets = targets.reshape(-1)
    keep = None if ignore_index is None else targets != ignore_index
    picked = logprobs.gather(1, (targets if keep is None else targets * keep).view(-1, 1)).view(-1)
    hard, scaled = 1.0, None
    if soft is not None:
        hard, scaled = 1.0 - soft.weight, soft.probs.reshape(-1, shape[-1]) * soft.weight
        picked = hard * picked + (scaled * logprobs).sum(1)
    if keep is None:
        loss = -picked.mean()
        count = targets.numel()
    else:
        count = int(keep.sum())
        loss = -(picked * keep).sum() / count
    return loss, CrossEntropyCache(logprobs.exp(), targets, keep, count, shape, scaled, hard)


def cross_entropy_backward(dloss: Tensor | float, cache: CrossEntropyCache) -> tuple[Tensor]:
    """Exercise 2, fused: dlogits = (softmax(logits) - onehot(y)) / count, times dloss.

    Each row sums to zero: the wrong classes are pushed down by their probability and the right
    one pulled up by 1 - p, so the pull balances the push. A row whose target is ignored had no
    part in the loss and gets no gradient at all. With soft targets it is (p - q) / count for the
    mixed target q: each row still sums to zero, as q does to one.

    A batch whose every target is ignored has nothing to learn from: its loss is a mean over
    nothing (NaN, as ``F.cross_entropy`` gives) and its gradient zero, not a division by zero.
    """
    if cache.count == 0:
        return (torch.zeros(cache.shape, dtype=cache.probs.dtype, device=cache.probs.device),)
    dlogits = cache.probs.clone()
    rows = torch.arange(dlogits.shape[0], device=dlogits.device)
    if cache.soft is not None:  # distillation: dlogits = (p - q) / count, q the mixed target
        dlogits -= cache.soft
    if cache.keep is None:
        dlogits[rows, cache.targets] -= cache.hard
    else:
        dlogits[rows, cache.targets * cache.keep] -= cache.keep.to(dlogits.dtype) * cache.hard
        dlogits *= cache.keep.view(-1, 1)
    return ((dlogits * (dloss / cache.count)).view(cache.shape),)
