"""Batchnorm across processes, proven against autograd of one process on the concatenated batch.

The ranks are threads here, their all-reduce a barrier that sums every rank's tensor in rank
order: the same hand-written code as a gloo group runs (``over_group`` and the fused steps'
``over_group`` take any in-place sum, in a ``GroupSum``), without starting processes. float64,
<= 1e-10.
"""

import pytest
import torch

from backprop_ninja import models
from backprop_ninja.checking.models import TINY, autograd_param_grads
from backprop_ninja.nn.group import GroupSum, over_group
from backprop_ninja.nn.normalisation import batchnorm_backward, batchnorm_forward, group_moments
from backprop_ninja.training import fused_mlp, fused_wavenet
from helpers import ThreadGroup

TOL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()


@pytest.mark.parametrize("shape", [(12, 5), (6, 4, 5)])
@pytest.mark.parametrize("world", [2, 3])
def test_group_batchnorm_layer_equals_autograd_on_the_whole_batch(shape, world):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5  # an offset mean: sums matter
    gain = torch.randn((1,) * (len(shape) - 1) + (shape[-1],), generator=g, dtype=torch.float64)
    bias = torch.randn_like(gain)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)  # random upstream gradient
    leaves = [t.clone().requires_grad_(True) for t in (x, gain, bias)]
    out_ref, _ = batchnorm_forward(*leaves)
    (out_ref * dout).sum().backward()
    xs, ds = x.chunk(world), dout.chunk(world)

    def rank(r, reduce):
        with over_group(GroupSum(reduce, r, world)):
            out, cache = batchnorm_forward(xs[r], gain, bias)
        return out, batchnorm_backward(ds[r], cache)

    results = ThreadGroup(world).run(rank)
    close(torch.cat([o for o, _ in results]), out_ref.detach())
    close(torch.cat([d[0] for _, d in results]), leaves[0].grad)
    close(sum(d[1] for _, d in results), leaves[1].grad)   # the flat all-reduce sums these
    close(sum(d[2] for _, d in results), leaves[2].grad)


def test_group_moments_equal_the_concatenated_batch_with_unequal_slices_and_any_centres():
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(k, 3, generator=g, dtype=torch.float64) * s + o
             for k, s, o in ((1, 1.0, 5.0), (4, 2.0, -3.0), (7, 0.5, 40.0))]  # means far apart
    centres = torch.stack([p[0] + 0.25 for p in parts])  # any centres: the residuals correct them
    residuals = torch.stack([(p - c).sum(0) for p, c in zip(parts, centres)])
    m2s = torch.stack([((p - c) ** 2).sum(0) for p, c in zip(parts, centres)])
    counts = torch.tensor([[1.0], [4.0], [7.0]], dtype=torch.float64)
    mean, m2, m = group_moments(centres, residuals, m2s, counts)
    whole = torch.cat(parts)
    assert m.item() == 12 and mean.shape == m2.shape == (3,)
    close(mean, whole.mean(0))
    close(m2 / 11, whole.var(0))  # Bessel's


def test_group_variance_in_float32_is_as_sound_as_one_process_two_pass():
    """A large mean and a small spread: sum(x^2) - m mean^2 would lose every digit in float32
    (the mean^2 term is 1e8 times the variance); the slots' M2 and Chan's combination keep it as
    well as the single process's two passes do."""
    g = torch.Generator().manual_seed(5)
    x64 = 1e4 + torch.randn(64, 8, generator=g, dtype=torch.float64)
    x = x64.float()
    gain, bias = torch.ones(1, 8), torch.zeros(1, 8)
    truth = x.double().var(0, keepdim=True)
    _, single = batchnorm_forward(x, gain, bias)
    world = 4

    def rank(r, reduce):
        with over_group(GroupSum(reduce, r, world)):
            return batchnorm_forward(x.chunk(world)[r], gain, bias)[1].stats.var

    group_var = ThreadGroup(world).run(rank)
    assert all(torch.equal(v, group_var[0]) for v in group_var)  # the same bits on every rank
    err_single = ((single.stats.var.double() - truth).abs() / truth).max().item()
    err_group = ((group_var[0].double() - truth).abs() / truth).max().item()
    print(f"relative error of the variance: one process {err_single:.1e}, group {err_group:.1e}")
    assert err_group <= max(2 * err_single, 1e-5), (err_group, err_single)
    naive = ((x * x).sum(0) - 64 * x.mean(0) ** 2) / 63  # the shortcut the slots avoid
    assert ((naive.double() - truth[0]).abs() / truth[0]).max().item() > 0.1


def test_fused_group_statistics_in_float32_are_as_sound_as_one_process():
    """The fused MLP's batchnorm over 2 ranks, float32, its pre-activations offset by 1e4: the
    group's 1/sqrt(var + eps) is as close to float64's as the single process's."""
    spec, params, X, Y, ix = setup("mlp", 64)
    params = {k: v.float() for k, v in params.items()}
    params["b1"] += 1e4
    world, k = 2, 32
    one = fused_mlp.FastStep(spec, params, X, Y, 64)
    one.forward_backward(ix)
    truth = one.hprebn.double().var(0, keepdim=True).add(one.eps.double()).rsqrt()

    pre = one.hprebn.double()
    xhat_truth = (pre - pre.mean(0, keepdim=True)) * truth

    def rank(r, reduce):
        step = fused_mlp.FastStep(spec, params, X, Y, k)
        step.over_group(GroupSum(reduce, r, world))
        step.forward_backward(ix[r * k:(r + 1) * k])
        return step.var_inv.clone(), step.xhat.clone()

    group = ThreadGroup(world).run(rank)
    assert torch.equal(group[0][0], group[1][0])
    err_one = ((one.var_inv.double() - truth).abs() / truth).max().item()
    err_group = ((group[0][0].double() - truth).abs() / truth).max().item()
    print(f"relative error of var_inv: one process {err_one:.1e}, group {err_group:.1e}")
    assert err_group <= max(2 * err_one, 1e-5), (err_group, err_one)
    # xhat, whose error is the mean's rounding (1e4 in float32) times var_inv, on either route
    xhat_one = (one.xhat.double() - xhat_truth).abs().max().item()
    xhat_group = (torch.cat([x for _, x in group]).double() - xhat_truth).abs().max().item()
    print(f"largest error of xhat: one process {xhat_one:.1e}, group {xhat_group:.1e}")
    assert xhat_group <= max(2 * xhat_one, 1e-3), (xhat_group, xhat_one)


def test_over_group_off_is_the_single_process_layer_bit_for_bit():
    x = torch.randn(8, 5, dtype=torch.float64)
    gain, bias = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    out1, cache1 = batchnorm_forward(x, gain, bias)
    with over_group(None):
        out2, cache2 = batchnorm_forward(x, gain, bias)
    assert torch.equal(out1, out2) and cache2.reduce is None
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_backward(x, cache1), batchnorm_backward(x, cache2)))


def setup(name: str, n: int):
    spec = models.get(name)
    overrides = {"mlp": {"n_embd": 3, "n_hidden": 6}, "wavenet": {"block_size": 4, "n_embd": 3, "n_hidden": 6}}[name]
    cfg = spec.make_config(11, overrides)
    params = {k: v.double() for k, v in spec.init(cfg, torch.Generator().manual_seed(1)).items()}
    g = torch.Generator().manual_seed(2)
    X = torch.randint(0, 11, (50, cfg.block_size), generator=g)
    Y = torch.randint(0, 11, (50,), generator=g)
    ix = torch.randint(0, 50, (n,), generator=g)
    return spec, params, X, Y, ix


@pytest.mark.parametrize("name", ["mlp", "wavenet"])
@pytest.mark.parametrize("route", ["eager", "fast"])
def test_ranks_gradients_after_the_all_reduce_equal_autograd_on_the_global_batch(name, route):
    world, n = 2, 12
    spec, params, X, Y, ix = setup(name, n)
    reference = autograd_param_grads(spec, params, X[ix], Y[ix])
    k = n // world
    fused = {"mlp": fused_mlp.FastStep, "wavenet": fused_wavenet.FastStep}[name]

    def rank(r, reduce):
        local = ix[r * k:(r + 1) * k]
        if route == "fast":
            step = fused(spec, params, X, Y, k)
            step.over_group(GroupSum(reduce, r, world))
            step.forward_backward(local)
            return {name: g.clone() for name, g in step.grads.items()}
        with over_group(GroupSum(reduce, r, world)):
            return spec.backward(spec.forward(params, X[local], Y[local]).cache)

    grads = ThreadGroup(world).run(rank)
    for p in reference:  # the flat all-reduce: SUM, then / N
        close(sum(g[p] for g in grads) / world, reference[p])


@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_padded_targets_weight_each_rank_by_its_count_of_real_targets(name):
    """Sequence models: the slices hold different numbers of real (not padded) targets, so the
    global gradient is sum_r c_r g_r / C, not the mean of the ranks' gradients."""
    from types import SimpleNamespace

    from backprop_ninja.data import Dataset, default_data_path
    from backprop_ninja.nn.losses import IGNORE_INDEX
    from backprop_ninja.training.distributed import GroupStep
    from backprop_ninja.training.optim import OptimConfig
    from backprop_ninja.training.steps import EagerStep

    spec = models.get(name)
    X, Y = Dataset.load(default_data_path(), block_size=None, layout="sequence").splits["train"]
    cfg = spec.make_config(27, {**TINY[name], "block_size": X.shape[1]})
    params = {k: v.double() for k, v in spec.init(cfg, torch.Generator().manual_seed(3)).items()}
    world, n = 2, 8
    ix = torch.arange(n) * 997 % X.shape[0]
    counts = (Y[ix] != IGNORE_INDEX).view(world, -1).sum(1)
    assert counts[0] != counts[1]  # the case that matters
    reference = autograd_param_grads(spec, params, X[ix], Y[ix])

    def rank(r, reduce):
        group = SimpleNamespace(rank=r, world=world, all_reduce=reduce, reduce_seconds=0.0)
        inner = EagerStep(spec, params, X, Y, n // world, OptimConfig())
        step = GroupStep(inner, group, Y, n)
        step.step(ix, 0.0)  # lr 0: the gradients, the parameters left as they were
        return dict(step.grads)

    for grads in ThreadGroup(world).run(rank):  # every rank holds the global gradient
        for p in reference:
            close(grads[p], reference[p])


@pytest.mark.parametrize("world", [2, 3])
def test_group_dropout_masks_are_the_single_process_masks_row_for_row(world):
    """Each rank draws the global batch's mask from the run's generator and keeps its rows:
    the ranks' outputs, side by side, are the one process's bit for bit, and every rank's
    generator ends where the one process's does."""
    from backprop_ninja.nn.dropout import dropout_forward

    x = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(6))
    whole, _ = dropout_forward(x, 0.3, g := torch.Generator().manual_seed(7))
    after = g.get_state()
    parts, states = [], []
    for r, xr in enumerate(x.chunk(world)):
        with over_group(GroupSum(lambda t: None, r, world)):
            out, _ = dropout_forward(xr, 0.3, g := torch.Generator().manual_seed(7))
        parts.append(out)
        states.append(g.get_state())
    assert torch.equal(torch.cat(parts), whole)
    assert all(torch.equal(s, after) for s in states)
