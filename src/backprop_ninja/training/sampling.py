"""Sampling: many items at once, one batched forward pass per character position.

Every item starts from the boundary token (a context model sees a window of block_size of them;
a sequence model a sequence of one, which grows up to block_size, its last position predicting);
at each position the whole batch draws its next index from softmax(logits / temperature)
(optionally restricted to the top k), and an item ends at the boundary token. Items still
running at ``max_len`` are cut there.

On a GPU nothing in the loop waits for the device but the check whether every item has ended,
made every ``CHECK_EVERY`` positions there (every position on the CPU, where it costs nothing).
The positions drawn after the last item ended change no item.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UserError
from ..models.base import ModelSpec, Params, Stats

CHECK_EVERY = 8  # positions between checks that some item still runs, on a GPU (a host sync)


@torch.no_grad()
def sample_indices(spec: ModelSpec, params: Params, stats: Stats, block_size: int, num: int,
                   generator: torch.Generator, max_len: int, temperature: float = 1.0,
                   top_k: int | None = None) -> list[list[int]]:
    """``num`` items as lists of vocabulary indices, without the closing boundary token."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {temperature}")
    device = next(iter(params.values())).device
    sequence = spec.layout == "sequence"
    context = torch.zeros(num, 1 if sequence else block_size, dtype=torch.long, device=device)
    V = spec.forward(params, context[:1], stats=stats).logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= V:
        raise UserError(f"--top-k must be between 1 and the vocabulary size {V}, got {top_k}")
    out = torch.zeros(num, max_len, dtype=torch.long, device=device)
    running = torch.ones(num, dtype=torch.bool, device=device)
    length = torch.full((num,), max_len, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else CHECK_EVERY
    for t in range(max_len):
        logits = spec.forward(params, context, stats=stats).logits
        logits = (logits[:, -1] if sequence else logits) / temperature
        probs = torch.softmax(restrict_top_k(logits, top_k), dim=1)
        ix = torch.multinomial(probs, 1, generator=generator).view(-1)
        ended = running & (ix == 0)
        length.masked_fill_(ended, t)  # not length[ended] = t: a boolean index waits for the GPU
        running &= ~ended
        out[:, t] = ix * running
        context = torch.cat([context, ix.view(-1, 1)], dim=1)[:, -block_size:]
        if (t + 1) % check_every == 0 and not running.any():
            break
    return [row[:n].tolist() for row, n in zip(out.cpu(), length.cpu().tolist())]


def restrict_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    if top_k is None or top_k >= logits.shape[1]:
        return logits
    kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))
