"""ZeRO stage 1 (Rajbhandari et al., 2020) over the flat buffers, written by hand: AdamW's
moments sharded across a data-parallel group's ranks, as llm.c does it (``train --zero``).

The flat buffers of P entries are cut into W shards of S = ceil(P / W) entries (the last one
padded with zeros); rank r owns shard r. A step:

- reduce-scatter the flat gradient (SUM): rank r receives the group's sum of shard r alone, and
  scales it as the all-reduce's sum is scaled (``distributed.GroupStep``);
- AdamW updates shard r of the parameters from shard r of its moments: m and v hold S entries
  on each rank instead of P, so each rank keeps 1/W of the optimiser's state;
- all-gather the W updated shards into every rank's full parameters.

Each entry's arithmetic is ``optim.AdamW.update``'s own, on the shard. With two ranks a sum of
two numbers is the same in either order, so the run takes the replicated group's updates bit
for bit (tested); with more ranks, up to the order of the gradient's sums.

``--sam`` needs the whole gradient's norm: each rank's squared shard norm, all-reduced; each
rank moves its shard uphill and the group all-gathers p + e for the second pass, whose gradient
is reduce-scattered in turn; p comes back from a copy. The EMA (``optim.Averaged``) stays
replicated: it averages the gathered parameters.

Checkpoints hold the whole moments, gathered at each save (a collective: every rank calls
``state``), in the same files as without --zero: such a run resumes without --zero, with
another N, or the other way round.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .optim import AdamW, FlatParams, OptimConfig, decay_mask


class Sharding:
    """Shard ``rank`` of a flat buffer of ``P`` entries cut into ``world`` shards of ``S``.
    ``group`` provides ``reduce_scatter(out, t)`` and ``all_gather_into(out, t)``."""

    def __init__(self, P: int, group, like: Tensor):
        self.group, self.P, self.world = group, P, group.world
        self.S = -(-P // group.world)
        self.lo = group.rank * self.S
        self.padded = like.new_zeros(self.world * self.S)  # a whole buffer, padded: the scratch

    def mine(self, full: Tensor) -> Tensor:
        """A copy of this rank's shard of ``full`` (P entries), zero-padded."""
        out = full.new_zeros(self.S)
        hi = min(self.lo + self.S, self.P)
        if hi > self.lo:
            out[:hi - self.lo].copy_(full[self.lo:hi])
        return out

    def scatter(self, full: Tensor, out: Tensor) -> None:
        """The group's sum of ``full``, this rank's shard of it into ``out``."""
        self.padded[:self.P].copy_(full)
        self.padded[self.P:].zero_()
        self.group.reduce_scatter(out, self.padded)

    def gather(self, shard: Tensor, full: Tensor) -> None:
        """Every rank's ``shard``, side by side, into ``full``."""
        self.group.all_gather_into(self.padded, shard)
        full.copy_(self.padded[:self.P])

    def gathered(self, shard: Tensor) -> Tensor:
        full = shard.new_empty(self.P)
        self.gather(shard, full)
        return full


class ShardBuffers:
    """What an update rule reads of its buffers, for one shard: the parameters and the gradient
    (no names: the weight-decay mask comes sliced from the whole buffer's)."""

    def __init__(self, flat: Tensor, grad: Tensor):
        self.flat, self.grad, self.params = flat, grad, {}


class ZeroAdamW:
    """AdamW whose moments are sharded over the group. ``shard.grad`` is where the step's
    reduce-scatter puts this rank's part of the gradient; ``step`` updates the shard and
    gathers the whole parameters into ``buffers.flat``."""

    def __init__(self, buffers: FlatParams, cfg: OptimConfig, group):
        assert cfg.name == "adamw", cfg.name
        self.buffers, self.cfg = buffers, cfg
        self.sharding = Sharding(buffers.flat.numel(), group, buffers.flat)
        self.shard = ShardBuffers(self.sharding.mine(buffers.flat),
                                  buffers.flat.new_zeros(self.sharding.S))
        self.rule = AdamW(self.shard, cfg)
        full_mask = decay_mask(buffers, cfg)
        self.rule.decay = None if full_mask is None else self.sharding.mine(full_mask)

    def step(self, lr: float) -> None:
        self.rule.step(lr)
        self.sharding.gather(self.shard.flat, self.buffers.flat)

    def state(self) -> dict[str, Tensor]:
        """The whole moments, gathered: a collective, so every rank calls it."""
        return {"adamw_m": self.sharding.gathered(self.rule.m),
                "adamw_v": self.sharding.gathered(self.rule.v),
                "adamw_t": torch.tensor(self.rule.t, dtype=torch.long)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.rule.m.copy_(self.sharding.mine(state["adamw_m"]))
        self.rule.v.copy_(self.sharding.mine(state["adamw_v"]))
        self.rule.t = int(state["adamw_t"])
        self.shard.flat.copy_(self.sharding.mine(self.buffers.flat))


class ZeroSharpnessAware:
    """``optim.SharpnessAware`` over shards: e = rho g / |g| on this rank's shard, |g| from the
    group's squared shard norms; the second pass at the gathered p + e."""

    def __init__(self, zero: ZeroAdamW, rho: float, all_reduce):
        self.zero, self.rho, self.all_reduce = zero, rho, all_reduce
        self.saved = torch.empty_like(zero.buffers.flat)
        self.e = torch.empty_like(zero.shard.grad)
        self.moved = torch.empty_like(zero.shard.grad)
        self.first = None  # --check-grads runs in one process only

    def __call__(self, gradients, ix: Tensor) -> None:
        z, g = self.zero, self.zero.shard.grad
        self.saved.copy_(z.buffers.flat)
        norm2 = torch.dot(g, g).reshape(1)
        self.all_reduce(norm2)
        torch.mul(g, self.rho / (norm2.sqrt() + 1e-12), out=self.e)
        torch.add(z.shard.flat, self.e, out=self.moved)
        z.sharding.gather(self.moved, z.buffers.flat)
        gradients(ix)
        z.buffers.flat.copy_(self.saved)
