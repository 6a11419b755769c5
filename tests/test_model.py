"""The model: sizes, initialisation, forward modes, and its fused backward against both oracles."""

import pytest
import torch

from backprop_ninja import model as M
from backprop_ninja.atomic import model_autograd_grads
from backprop_ninja.gradcheck import finite_difference_grads, relative_error
from backprop_ninja.layers import BatchNormStats


@pytest.mark.parametrize("H,count", [(64, 4137), (200, 12297)])
def test_parameter_count(H, count):
    assert M.num_params(M.init_params(M.ModelConfig(27, 3, 10, H))) == count


def test_init_is_seeded_and_reproducible():
    cfg = M.ModelConfig(27)
    a, b = M.init_params(cfg), M.init_params(cfg)
    c = M.init_params(cfg, seed=1)
    assert list(a) == list(M.PARAM_NAMES)
    for k in M.PARAM_NAMES:
        assert torch.equal(a[k], b[k])
        assert not torch.equal(a[k], c[k])
    assert a["b1"].shape == (200,) and a["b2"].shape == (27,)
    assert a["bngain"].shape == (1, 200) and a["bnbias"].shape == (1, 200)
    # biases are small and random, not zero; the gain is not one
    for k in ("b1", "b2", "bnbias"):
        assert 0 < a[k].abs().max() < 1
    assert (a["bngain"] != 1).all()


def small_problem(seed, n=6, V=5, T=2, C=3, H=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cfg = M.ModelConfig(V, T, C, H)
    params = M.init_params(cfg, generator=g, dtype=dtype)
    X = torch.randint(0, V, (n, T), generator=g)
    Y = torch.randint(0, V, (n,), generator=g)
    return params, X, Y


@pytest.mark.parametrize("seed,n,V", [(0, 4, 5), (1, 9, 3), (2, 16, 11)])
def test_model_backward_against_both_oracles(seed, n, V):
    params, X, Y = small_problem(seed, n=n, V=V)
    grads = M.backward(M.forward(params, X, Y).cache)
    ref = model_autograd_grads(params, X, Y)

    def loss(**p):
        return M.forward(p, X, Y).loss

    numeric = finite_difference_grads(loss, params, torch.tensor(1.0, dtype=torch.float64))
    assert list(grads) == list(M.PARAM_NAMES)
    for k in M.PARAM_NAMES:
        assert grads[k].shape == params[k].shape == ref[k].shape
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-10, atol=1e-12)
        if k != "b1":  # b1's true gradient is exactly 0 under batchnorm: compare absolutely
            assert relative_error(grads[k], numeric[k]) <= 1e-6, k
        else:
            assert grads[k].abs().max() < 1e-9 and numeric[k].abs().max() < 1e-6


def test_model_backward_float32_matches_autograd():
    params, X, Y = small_problem(3, n=32, V=27, T=3, C=10, H=64, dtype=torch.float32)
    grads = M.backward(M.forward(params, X, Y).cache)
    ref = model_autograd_grads(params, X, Y)
    for k in M.PARAM_NAMES:
        assert grads[k].shape == ref[k].shape
        assert (grads[k] - ref[k]).abs().max().item() <= 1e-6, (
            k, "a float32 bound measured on x86 CPU kernels (torch 2.13 CPU build); on other "
               "hardware it may be exceeded while approx holds")


def test_given_statistics_equal_batch_statistics_when_they_are_the_batchs():
    params, X, Y = small_problem(4, n=10)
    train = M.forward(params, X, Y)
    stats = train.cache.bn.stats
    evaluated = M.forward(params, X, Y, bn_stats=stats)
    torch.testing.assert_close(evaluated.logits, train.logits)
    torch.testing.assert_close(stats.var, train.hprebn.var(0, keepdim=True, unbiased=True))


def test_calibrate_is_the_unbiased_statistics_of_the_whole_set():
    params, _, _ = small_problem(5)
    X = torch.randint(0, 5, (1000, 2), generator=torch.Generator().manual_seed(0))
    stats = M.calibrate(params, X, chunk=300)  # chunks must not change the answer
    hprebn = M.first_layer(params, X)
    torch.testing.assert_close(stats.mean, hprebn.mean(0, keepdim=True))
    torch.testing.assert_close(stats.var, hprebn.var(0, keepdim=True, unbiased=True))


def test_evaluate_matches_one_big_batch():
    params, _, _ = small_problem(6)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 5, (500, 2), generator=g), torch.randint(0, 5, (500,), generator=g)
    stats = BatchNormStats(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    whole = M.forward(params, X, Y, bn_stats=stats).loss.item()
    assert M.evaluate(params, X, Y, stats, chunk=77) == pytest.approx(whole, rel=1e-12)


def test_backward_needs_a_training_forward():
    params, X, Y = small_problem(7)
    stats = BatchNormStats(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="training forward"):
        M.backward(M.forward(params, X, Y, bn_stats=stats).cache)
