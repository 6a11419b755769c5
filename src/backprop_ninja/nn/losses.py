"""Softmax cross-entropy, the mean over the targets, with an optional ignore index for padding.

Dimension letters: N rows (n, or n*T flattened), V vocab size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -1  # makemore's padding target: no loss, no gradient


class CrossEntropyCache(NamedTuple):
    probs: Tensor         # N x V, softmax(logits)
    targets: Tensor       # N int64 (IGNORE_INDEX where padded)
    keep: Tensor | None   # N bool, the targets that count (None: all of them)
    count: int            # how many targets count: the mean's denominator
    shape: torch.Size     # the logits' shape (n x V, or n x T x V)


def cross_entropy_forward(logits: Tensor, targets: Tensor,
                          ignore_index: int | None = None) -> tuple[Tensor, CrossEntropyCache]:
    """Mean of -log softmax(logits)[target] over the targets that are not ``ignore_index``.

    log_softmax first: the loss stays finite where a probability underflows to 0.
    """
    shape = logits.shape
    logprobs = torch.log_softmax(logits.reshape(-1, shape[-1]), dim=1)
    targets = targets.reshape(-1)
    if ignore_index is None:
        loss = -logprobs.gather(1, targets.view(-1, 1)).mean()
        return loss, CrossEntropyCache(logprobs.exp(), targets, None, targets.numel(), shape)
    keep = targets != ignore_index
    picked = logprobs.gather(1, (targets * keep).view(-1, 1)).view(-1)
    count = int(keep.sum())
    loss = -(picked * keep).sum() / count
    return loss, CrossEntropyCache(logprobs.exp(), targets, keep, count, shape)


def cross_entropy_backward(dloss: Tensor | float, cache: CrossEntropyCache) -> tuple[Tensor]:
    """Exercise 2, fused: dlogits = (softmax(logits) - onehot(y)) / count, times dloss.

    Each row sums to zero: the wrong classes are pushed down by their probability and the right
    one pulled up by 1 - p, so the pull balances the push. A row whose target is ignored had no
    part in the loss and gets no gradient at all.
    """
    dlogits = cache.probs.clone()
    rows = torch.arange(dlogits.shape[0], device=dlogits.device)
    if cache.keep is None:
        dlogits[rows, cache.targets] -= 1.0
    else:
        dlogits[rows, cache.targets * cache.keep] -= cache.keep.to(dlogits.dtype)
        dlogits *= cache.keep.view(-1, 1)
    return ((dlogits * (dloss / cache.count)).view(cache.shape),)
