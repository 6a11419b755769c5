"""FlattenConsecutive(k): concatenate every k consecutive positions, the WaveNet's tree step.

(n, T, C) -> (n, T/k, C*k). The output is always 3-D: the size-1 position dimension that the
last level leaves is removed by the model where its levels end, not here, so any number of
levels works (the lecture's layer squeezed it inside, which breaks a level placed after it).

Dimension letters: n batch, T positions, C channels, k positions merged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class FlattenCache(NamedTuple):
    shape: torch.Size  # the input's shape, n x T x C


def flatten_consecutive_forward(x: Tensor, k: int) -> tuple[Tensor, FlattenCache]:
    n, T, C = x.shape
    if T % k:
        raise ValueError(f"FlattenConsecutive({k}) needs a number of positions divisible by {k}, "
                         f"got {T}")
    return x.reshape(n, T // k, C * k), FlattenCache(x.shape)


def flatten_consecutive_backward(dout: Tensor, cache: FlattenCache) -> tuple[Tensor]:
    """A reshape moves no value: its gradient is the same numbers in the input's shape."""
    return (dout.reshape(cache.shape),)
