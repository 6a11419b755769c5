"""ZeRO-1 (``training.zero``): AdamW's moments sharded across ranks, proven against the
replicated rule. Ranks are threads here (``helpers.ThreadGroup``); the 2-process runs are in
test_distributed.py."""

import pytest
import torch

from backprop_ninja.training.optim import AdamW, FlatParams, OptimConfig
from backprop_ninja.training.zero import ZeroAdamW
from helpers import ThreadGroup


def params_like_a_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g),
            "ln.bias": torch.randn(4, generator=g)}  # 44 entries: 3 ranks get 15, 15 and 14


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_adamw_takes_the_replicated_updates_bit_for_bit(world):
    """Weight decay with a no-decay parameter (its mask sliced with the shards), uneven shards
    (padding), 5 steps: every rank's parameters equal the replicated AdamW's, and the gathered
    moments its moments. Each rank keeps ceil(P / world) entries of each moment."""
    cfg = OptimConfig(name="adamw", weight_decay=0.1, no_decay=("bias",))
    grads = [[torch.randn(44, generator=torch.Generator().manual_seed(10 * s + r))
              for r in range(world)] for s in range(5)]
    reference = FlatParams(params_like_a_model())
    rule = AdamW(reference, cfg)
    for step in grads:
        total = step[0].clone()
        for g in step[1:]:
            total += g  # rank order, as the group sums
        reference.grad.copy_(total)
        rule.step(0.01)
    threads = ThreadGroup(world)

    def rank(r, _):
        buffers = FlatParams(params_like_a_model(), shards=world)
        zero = ZeroAdamW(buffers, cfg, threads.collectives_for(r))
        assert zero.rule.m.numel() == zero.shard.grad.numel() == -(-44 // world)
        for step in grads:
            buffers.grad.copy_(step[r])
            zero.scatter()
            zero.step(0.01)
        return buffers.flat_padded.clone(), zero.state()

    for flat, state in threads.run(rank):
        assert torch.equal(flat[:44], reference.flat) and not flat[44:].any()  # padding stays 0
        assert torch.equal(state["adamw_m"], rule.m) and torch.equal(state["adamw_v"], rule.v)
        assert int(state["adamw_t"]) == 5


def test_sharded_state_loads_back_into_its_shards():
    cfg = OptimConfig(name="adamw")
    full = {"adamw_m": torch.arange(44.0), "adamw_v": torch.arange(44.0) * 2,
            "adamw_t": torch.tensor(9)}
    threads = ThreadGroup(3)

    def rank(r, _):
        zero = ZeroAdamW(FlatParams(params_like_a_model(), shards=3), cfg, threads.collectives_for(r))
        zero.load_state(full)
        return zero.rule.m.clone(), zero.state()

    for r, (m, state) in enumerate(threads.run(rank)):
        assert torch.equal(m[:44 - 15 * r][:15], full["adamw_m"][15 * r:15 * r + 15])
        assert all(torch.equal(state[k], full[k]) for k in full)
