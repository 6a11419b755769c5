"""Properties of the part-2 layers (layer norm, attention, dropout, the transformer block) that
the registry's comparison with autograd does not state, and a planted bug that it must catch."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from backprop_ninja.errors import UserError
from backprop_ninja.nn import attention
from backprop_ninja.nn import dropout
from backprop_ninja.nn import normalisation
from backprop_ninja.nn import transformer
from backprop_ninja.checking.registry import REGISTRY, check_layer

F64 = torch.float64
SEEDS = st.integers(0, 2**31 - 1)


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def attention_params(g, C):
    return (randn(g, C, 3 * C, scale=0.5), randn(g, 3 * C, scale=0.1),
            randn(g, C, C, scale=0.5), randn(g, C, scale=0.1))


# --- layer norm ---------------------------------------------------------------------------

def layernorm_dx(seed, n, T, C, eps):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, n, T, C, scale=2.0) + 1.0
    _, cache = normalisation.layernorm_forward(x, torch.ones(C, dtype=F64), randn(g, C), eps=eps)
    dx, _, _ = normalisation.layernorm_backward(randn(g, n, T, C), cache)
    return dx, cache.xhat


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), T=st.integers(1, 5), C=st.integers(2, 12), seed=SEEDS)
def test_layernorm_dx_is_orthogonal_to_ones_per_row(n, T, C, seed):
    # adding a constant to a row does not change its output, whatever eps
    dx, _ = layernorm_dx(seed, n, T, C, normalisation.LN_EPS)
    torch.testing.assert_close(dx.sum(-1), torch.zeros(n, T, dtype=F64), atol=1e-10, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), T=st.integers(1, 5), C=st.integers(2, 12), seed=SEEDS)
def test_layernorm_dx_is_orthogonal_to_xhat_per_row_without_eps(n, T, C, seed):
    # scaling a row about its mean does not change its output when eps = 0 (with eps > 0 it
    # does, slightly: sum(dx * xhat) is then rstd * sum(dout * xhat) * eps / (var + eps))
    dx, xhat = layernorm_dx(seed, n, T, C, 0.0)
    torch.testing.assert_close(dx.sum(-1), torch.zeros(n, T, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close((dx * xhat).sum(-1), torch.zeros(n, T, dtype=F64),
                               atol=1e-10, rtol=0)


# --- attention ----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), T=st.integers(2, 7), nh=st.integers(1, 3), hs=st.integers(1, 4),
       seed=SEEDS, data=st.data())
def test_attention_is_causal(n, T, nh, hs, seed, data):
    t0 = data.draw(st.integers(1, T - 1))  # positions t0.. are "later"
    g = torch.Generator().manual_seed(seed)
    C = nh * hs
    x, params = randn(g, n, T, C), attention_params(g, C)
    out, cache = attention.attention_forward(x, *params, nh)
    # changing later inputs leaves earlier outputs as they were
    x2 = x.clone()
    x2[:, t0:] += randn(g, n, T - t0, C)
    out2, _ = attention.attention_forward(x2, *params, nh)
    torch.testing.assert_close(out2[:, :t0], out[:, :t0], atol=1e-12, rtol=0)
    assert not torch.allclose(out2[:, t0:], out[:, t0:])  # and the change did reach the later ones
    # an upstream gradient on the earlier outputs alone gives the later inputs exactly none
    dout = torch.zeros_like(out)
    dout[:, :t0] = randn(g, n, t0, C)
    dx = attention.attention_backward(dout, cache)[0]
    assert torch.all(dx[:, t0:] == 0)
    assert torch.all(cache.att.triu(1) == 0)  # the masked positions' weights are exactly 0


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 6), seed=SEEDS)
def test_softmax_backward_gives_masked_positions_no_gradient(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    scores = randn(g, B, T, T) + attention.causal_bias(T, torch.empty(0, dtype=F64))
    att = torch.softmax(scores, -1)
    dscores = attention.softmax_backward(randn(g, B, T, T), att)
    assert torch.all(dscores.triu(1) == 0)
    torch.testing.assert_close(dscores.sum(-1), torch.zeros(B, T, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("C,nh", [(10, 4), (3, 2), (8, 0)])
def test_attention_heads_must_divide_n_embd(C, nh):
    x, params = torch.randn(2, 3, C), attention_params(torch.Generator().manual_seed(0), C)
    expected = ("must be at least 1" if nh < 1
                else f"--n-embd {C} is not divisible by --n-head {nh};")
    with pytest.raises(UserError, match=expected) as info:
        attention.attention_forward(x.double(), *params, nh)
    assert "\n" not in str(info.value)


# --- dropout ------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), p=st.floats(0.05, 0.95),
       seed=SEEDS)
def test_dropout_backward_uses_the_forward_mask(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = randn(g, *shape).abs() + 0.1  # no zeros: out != 0 exactly where kept
    out, cache = dropout.dropout_forward(x, p, g)
    dout = randn(g, *shape).abs() + 0.1
    (dx,) = dropout.dropout_backward(dout, cache)
    kept = out != 0
    assert torch.equal(dx != 0, kept)
    torch.testing.assert_close(dx[kept], dout[kept] / (1 - p), rtol=1e-12, atol=0)
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)


def test_dropout_keeps_about_1_minus_p_and_is_the_same_in_float32():
    x = torch.ones(200, 500, dtype=F64)
    out, cache = dropout.dropout_forward(x, 0.3, torch.Generator().manual_seed(0))
    assert abs((cache.mult != 0).double().mean().item() - 0.7) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation
    _, cache32 = dropout.dropout_forward(x.float(), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(cache32.mult != 0, cache.mult != 0)


def test_dropout_p0_is_the_identity_and_draws_nothing():
    x, g = torch.randn(4, 5), torch.Generator().manual_seed(3)
    state = g.get_state()
    out, cache = dropout.dropout_forward(x, 0.0, g)
    assert out is x and torch.equal(g.get_state(), state)
    dout = torch.randn(4, 5)
    assert dropout.dropout_backward(dout, cache)[0] is dout


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_rejects_p_outside_0_1(p):
    with pytest.raises(UserError, match="--dropout must be at least 0 and below 1"):
        dropout.dropout_forward(torch.ones(3), p, torch.Generator())


# --- the transformer block ----------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), T=st.integers(1, 5), nh=st.integers(1, 2), hs=st.integers(1, 3),
       seed=SEEDS)
def test_block_with_zero_branch_outputs_is_the_identity(n, T, nh, hs, seed):
    # the branches' last layers (attention's projection, the MLP's second linear) are zero: both
    # residual branches add 0, and no gradient flows back through them
    g = torch.Generator().manual_seed(seed)
    C = nh * hs
    x = randn(g, n, T, C)
    w_qkv, b_qkv, _, _ = attention_params(g, C)
    zero_proj, zero_b = torch.zeros(C, C, dtype=F64), torch.zeros(C, dtype=F64)
    ln = (1 + randn(g, C, scale=0.1), randn(g, C, scale=0.1))
    out, cache = transformer.block_forward(x, *ln, w_qkv, b_qkv, zero_proj, zero_b, *ln,
                                  randn(g, C, 4 * C), randn(g, 4 * C),
                                  torch.zeros(4 * C, C, dtype=F64), zero_b, nh)
    assert torch.equal(out, x)
    dout = randn(g, n, T, C)
    grads = transformer.block_backward(dout, cache)
    assert len(grads) == 13
    assert torch.equal(grads[0], dout)


# --- the check can fail -------------------------------------------------------------------

def softmax_backward_without_the_sum(datt, att):
    return att * datt  # forgets the gradient through the row's normaliser


@pytest.mark.parametrize("name", ["attention", "block"])
def test_a_softmax_backward_without_its_sum_term_is_caught(monkeypatch, name):
    monkeypatch.setattr(attention, "softmax_backward", softmax_backward_without_the_sum)
    chk = check_layer(REGISTRY[name], seed=1, n=4, width=3)
    wrong = [k for k in chk.manual if not torch.allclose(chk.manual[k], chk.autograd[k],
                                                         rtol=1e-10, atol=1e-12)]
    assert "x" in wrong and "w_qkv" in wrong
    assert max(chk.relative_errors().values()) > 1e-2


def test_a_layernorm_backward_without_the_xhat_term_is_caught():
    def without_xhat_term(dout, cache):
        dxhat = dout * cache.weight
        dx = cache.rstd * (dxhat - dxhat.mean(-1, keepdim=True))
        c = dout.shape[-1]
        return dx, (dout * cache.xhat).reshape(-1, c).sum(0), dout.reshape(-1, c).sum(0)

    spec = dataclasses.replace(REGISTRY["layernorm_3d"], backward=without_xhat_term)
    chk = check_layer(spec, seed=1, n=4, width=3)
    assert not torch.allclose(chk.manual["x"], chk.autograd["x"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chk.manual["weight"], chk.autograd["weight"])  # only dx is wrong
