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
two numbers is the same in either order, so without ``--sam`` the run takes the replicated
group's updates bit for bit (tested); with more ranks, or with ``--sam`` (whose norm is summed
from the shards'), up to the order of float sums.

``--sam`` needs the whole gradient's norm: each rank's squared shard norm, all-reduced; each
rank moves its shard uphill and the group all-gathers p + e for the second pass, whose gradient
is reduce-scattered in turn; p comes back from a copy. The EMA (``optim.Averaged``) stays
replicated: it averages the gathered parameters.

Checkpoints hold the whole moments, gathered at each save (a collective: every rank calls
``state``), in the same files as without --zero: such a run resumes without --zero, with
another N, or the other way round.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .optim import AdamW, FlatParams, OptimConfig, decay_mask


class Sharding:
    """Rank ``rank``'s shard of flat buffers of ``P`` entries cut into ``world`` shards of
    ``S`` = ceil(P / world) (``FlatParams(..., shards=world)`` pads their storage to world * S).
    ``group`` provides ``reduce_scatter(out, t)`` and ``all_gather_into(out, t)``."""

    def __init__(self, P: int, group):
        self.group, self.P, self.world = group, P, group.world
        self.S = -(-P // group.world)
        self.lo = group.rank * self.S
        self.seconds = 0.0  # spent in the gathers (the scaling benchmark's sync share)

    def mine(self, full: Tensor) -> Tensor:
        """A copy of this rank's shard of ``full`` (P entries or more), zero-padded."""
        out = full.new_zeros(self.S)
        hi = min(self.lo + self.S, full.numel())
        if hi > self.lo:
            out[:hi - self.lo].copy_(full[self.lo:hi])
        return out

    def scatter(self, padded: Tensor, out: Tensor) -> None:
        """The group's sum of ``padded`` (world * S entries), this rank's shard into ``out``."""
        self.group.reduce_scatter(out, padded)

    def gather(self, padded: Tensor) -> None:
        """Every rank's shard of ``padded`` (world * S entries), from each rank's own part of
        it, into the whole of it: in place (NCCL allows it; gloo copies each part first)."""
        t0 = time.perf_counter()
        self.group.all_gather_into(padded, padded[self.lo:self.lo + self.S])
        self.seconds += time.perf_counter() - t0

    def gathered(self, shard: Tensor) -> Tensor:
        """Every rank's ``shard`` side by side, the padding cut off: a new tensor of P."""
        full = shard.new_empty(self.world * self.S)
        self.group.all_gather_into(full, shard)
        return full[:self.P]


class ShardBuffers:
    """What an update rule reads of its buffers, for one shard: the parameters and the gradient
    (no names: the weight-decay mask comes sliced from the whole buffer's)."""

    def __init__(self, flat: Tensor, grad: Tensor):
        self.flat, self.grad, self.params = flat, grad, {}


class ZeroAdamW:
    """AdamW whose moments are sharded over the group. ``shard.grad`` is where the step's
    reduce-scatter puts this rank's part of the gradient; ``step`` updates this rank's part of
    the parameters, in place in their padded storage, and gathers the others' parts around it.

    Memory per rank: m, v and AdamW's scratch for its denominator (3S) and the gradient's shard
    (S), where the replicated rule holds 3P: 2P against 3P with 2 ranks, P/2 with 8."""

    def __init__(self, buffers: FlatParams, cfg: OptimConfig, group):
        assert cfg.name == "adamw", cfg.name
        self.buffers, self.cfg = buffers, cfg
        self.sharding = sharding = Sharding(buffers.flat.numel(), group)
        assert buffers.flat_padded.numel() == sharding.world * sharding.S, \
            "the flat buffers must be padded to the group's shards (OptimConfig.shards)"
        self.shard = ShardBuffers(buffers.flat_padded[sharding.lo:sharding.lo + sharding.S],
                                  buffers.flat.new_zeros(sharding.S))
        self.rule = AdamW(self.shard, cfg)
        full_mask = decay_mask(buffers, cfg)
        self.rule.decay = None if full_mask is None else sharding.mine(full_mask)

    def scatter(self) -> Tensor:
        """The group's sum of the gradient buffers, this rank's shard of it (``shard.grad``)."""
        self.sharding.scatter(self.buffers.grad_padded, self.shard.grad)
        return self.shard.grad

    def step(self, lr: float) -> None:
        self.rule.step(lr)
        self.sharding.gather(self.buffers.flat_padded)

    def state(self) -> dict[str, Tensor]:
        """The whole moments, gathered: a collective, so every rank calls it."""
        return {"adamw_m": self.sharding.gathered(self.rule.m),
                "adamw_v": self.sharding.gathered(self.rule.v),
                "adamw_t": torch.tensor(self.rule.t, dtype=torch.long)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.rule.m.copy_(self.sharding.mine(state["adamw_m"]))
        self.rule.v.copy_(self.sharding.mine(state["adamw_v"]))
        self.rule.t = int(state["adamw_t"])


class ZeroSharpnessAware:
    """``optim.SharpnessAware`` over shards: e = rho g / |g| on this rank's shard, |g| from the
    group's squared shard norms; the second pass at the gathered p + e; p back from a copy."""

    def __init__(self, zero: ZeroAdamW, rho: float, all_reduce):
        self.zero, self.rho, self.all_reduce = zero, rho, all_reduce
        self.saved = torch.empty_like(zero.buffers.flat)
        self.e = torch.empty_like(zero.shard.grad)
        self.first = None  # --check-grads runs in one process only

    def __call__(self, gradients, ix: Tensor) -> None:
        z, g = self.zero, self.zero.shard.grad
        self.saved.copy_(z.buffers.flat)
        norm2 = torch.dot(g, g).reshape(1)
        self.all_reduce(norm2)
        torch.mul(g, self.rho / (norm2.sqrt() + 1e-12), out=self.e)
        z.shard.flat.add_(self.e)
        z.sharding.gather(z.buffers.flat_padded)
        gradients(ix)
        z.buffers.flat.copy_(self.saved)
