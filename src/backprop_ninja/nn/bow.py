"""Bag of words: makemore's CausalBoW, where every position averages itself and the positions
before it (its masked, all-zero attention is a uniform average over t' <= t).

Dimension letters: n batch, T positions, C channels (n_embd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class CausalAverageCache(NamedTuple):
    counts: Tensor  # 1 x T x 1, t + 1: how many positions output t averages; nothing else is needed


def causal_average_forward(x: Tensor) -> tuple[Tensor, CausalAverageCache]:
    """y_t = mean(x_0..x_t) = cumsum(x)_t / (t + 1), over the positions of x (n x T x C)."""
    T = x.shape[1]
    counts = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(1, T, 1)
    return x.cumsum(1) / counts, CausalAverageCache(counts)


def causal_average_backward(dy: Tensor, cache: CausalAverageCache) -> tuple[Tensor]:
    """dx_s = sum_{t >= s} dy_t / (t + 1): x_s is in every average from t = s on, with weight
    1 / (t + 1).

    That is the transpose of the lower-triangular averaging matrix applied to dy, but it is a
    suffix (reversed cumulative) sum of dy / counts, O(T) per channel: no T x T matrix is built
    and no O(T^2) product done. A dy constant over positions would hide a dy read at the wrong
    position (dy_s for dy_t): the check's dy is random."""
    return (torch.flip(torch.flip(dy / cache.counts, (1,)).cumsum(1), (1,)),)
