"""Properties of the sequence layers (token + position embeddings, RNN, GRU, causal average)
that a gradient check at one fixed shape cannot show: causality in time, the sums a shared row
receives, and a gate forced shut."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from backprop_ninja.nn import bow
from backprop_ninja.nn import embedding
from backprop_ninja.nn import recurrent
from backprop_ninja.checking.registry import _gru_reference, _rnn_reference
from backprop_ninja.checking.gradcheck import autograd_grads

F64 = torch.float64


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _rnn_params(g, C, H):
    return {"h0": _randn(g, H, scale=0.5), "w": _randn(g, C + H, H, scale=0.5),
            "b": _randn(g, H, scale=0.1)}


def _gru_params(g, C, H):
    params = {"h0": _randn(g, H, scale=0.5)}
    for gate in ("r", "z", "hbar"):
        params[f"w_{gate}"] = _randn(g, C + H, H, scale=0.5)
        params[f"b_{gate}"] = _randn(g, H, scale=0.1)
    return params


# --- causality in time: the class of makemore PR #3 -------------------------------------------
# makemore once shipped an RNN whose state never advanced (every step read the start state), so
# each output saw only its own input; the gradient checks pass for such a layer, as its forward
# and backward agree. What catches it: h_t must depend on every x_s with s <= t and on no x_s
# with s > t, in the forward (perturb x_s) and in the backward (where dh_t's gradient reaches).


def assert_causal(forward, dx_of, x, tol=1e-12):
    """forward: x -> hs (n x T x H); dx_of(x, t, dh) -> the gradient of sum(hs[:, t] * dh)
    with respect to x. Position t must see exactly the inputs at s <= t, both ways."""
    n, T, _ = x.shape
    g = torch.Generator().manual_seed(1)
    hs = forward(x)
    for s in range(T):
        x2 = x.clone()
        x2[:, s] += _randn(g, *x2[:, s].shape)
        changed = ((forward(x2) - hs).abs().amax(dim=(0, 2)) > tol).tolist()
        assert changed == [t >= s for t in range(T)], f"changing x_{s} changed h_t where {changed}"
    for t in range(T):
        dx = dx_of(x, t, _randn(g, n, hs.shape[2]))
        reached = (dx.abs().amax(dim=(0, 2)) > tol).tolist()
        assert reached == [s <= t for s in range(T)], f"dh_{t} reached x_s where {reached}"


def _manual_dx_of(forward, backward, params):
    """dx from a hand-written backward, with the upstream gradient at position t only."""
    def dx_of(x, t, dh):
        hs, cache = forward(x, **params)
        dhs = torch.zeros_like(hs)
        dhs[:, t] = dh
        return backward(dhs, cache)[0]
    return dx_of


def _autograd_dx_of(forward, params):
    def dx_of(x, t, dh):
        hs_t = lambda x: forward(x, **params)[:, t]  # noqa: E731
        return autograd_grads(hs_t, {"x": x}, dh)["x"]
    return dx_of


def _rnn_state_never_advances(x, h0, w, b):
    """The planted PR #3 bug: every step reads h0 instead of the previous state."""
    n, T, _ = x.shape
    h_start = h0.expand(n, -1)
    return torch.stack([torch.tanh(torch.cat([x[:, t], h_start], 1) @ w + b)
                        for t in range(T)], 1)


def _rnn_backward_no_carry(dhs, cache):
    """The same bug in a backward: the gradient is never carried to the previous step."""
    C = cache.x.shape[2]
    return ((dhs * (1.0 - cache.hs * cache.hs)) @ cache.w[:C].T,)


SHAPES = dict(n=st.integers(1, 5), T=st.integers(2, 6), C=st.integers(1, 4),
              H=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=15, deadline=None)
@given(**SHAPES)
def test_rnn_and_gru_are_causal(n, T, C, H, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, n, T, C)
    for fwd, bwd, params in ((recurrent.rnn_forward, recurrent.rnn_backward, _rnn_params(g, C, H)),
                             (recurrent.gru_forward, recurrent.gru_backward, _gru_params(g, C, H))):
        forward = lambda x: fwd(x, **params)[0]  # noqa: E731
        assert_causal(forward, _manual_dx_of(fwd, bwd, params), x)


def test_causality_check_catches_a_state_that_never_advances():
    g = torch.Generator().manual_seed(0)
    x, params = _randn(g, 3, 4, 2), _rnn_params(g, 2, 3)
    buggy = lambda x: _rnn_state_never_advances(x, **params)  # noqa: E731
    with pytest.raises(AssertionError, match="changing x_0"):
        assert_causal(buggy, _autograd_dx_of(_rnn_state_never_advances, params), x)
    # the same helper passes on the correct layer and on makemore's cell loop
    assert_causal(lambda x: recurrent.rnn_forward(x, **params)[0],
                  _manual_dx_of(recurrent.rnn_forward, recurrent.rnn_backward, params), x)
    assert_causal(lambda x: _rnn_reference(x, **params), _autograd_dx_of(_rnn_reference, params), x)


def test_causality_check_catches_a_backward_that_never_carries():
    g = torch.Generator().manual_seed(0)
    x, params = _randn(g, 3, 4, 2), _rnn_params(g, 2, 3)
    forward = lambda x: recurrent.rnn_forward(x, **params)[0]  # noqa: E731
    with pytest.raises(AssertionError, match="reached"):
        assert_causal(forward, _manual_dx_of(recurrent.rnn_forward, _rnn_backward_no_carry, params), x)


# --- against makemore's cells at other shapes than the registry's (T = 1 included) -----------


@settings(max_examples=15, deadline=None)
@given(**(SHAPES | {"T": st.integers(1, 6)}))
def test_recurrent_backward_matches_autograd_of_makemores_cells(n, T, C, H, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, n, T, C)
    for fwd, bwd, ref, params in (
            (recurrent.rnn_forward, recurrent.rnn_backward, _rnn_reference, _rnn_params(g, C, H)),
            (recurrent.gru_forward, recurrent.gru_backward, _gru_reference, _gru_params(g, C, H))):
        inputs = {"x": x} | params
        hs, cache = fwd(**inputs)
        torch.testing.assert_close(hs, ref(**inputs), rtol=1e-12, atol=1e-12)
        dhs = _randn(g, *hs.shape)
        expected = autograd_grads(ref, inputs, dhs)
        for name, grad in zip(inputs, bwd(dhs, cache)):
            torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12)


# --- the GRU with its update gate shut keeps its start state -----------------------------------


@settings(max_examples=15, deadline=None)
@given(**SHAPES)
def test_gru_with_z_forced_to_zero_keeps_h0(n, T, C, H, seed):
    g = torch.Generator().manual_seed(seed)
    params = _gru_params(g, C, H)
    params["b_z"] = params["b_z"] - 1e3   # z = sigmoid(-1e3 + O(1)) underflows to exactly 0
    hs, cache = recurrent.gru_forward(_randn(g, n, T, C), **params)
    torch.testing.assert_close(hs, params["h0"].expand(n, T, H), rtol=0, atol=0)
    # every step copies h_prev: the whole upstream gradient lands on h0, and nothing on the
    # input, the update gate's bias or the candidate's weights
    dhs = _randn(g, n, T, H)
    dx, dh0, _, _, _, db_z, dw_hbar, db_hbar = recurrent.gru_backward(dhs, cache)
    torch.testing.assert_close(dh0, dhs.sum((0, 1)), rtol=1e-12, atol=1e-12)
    for zero in (dx, db_z, dw_hbar, db_hbar):
        assert not zero.any()


# --- the causal average against its explicit matrix -------------------------------------------


def _averaging_matrix(T):
    """Row t holds 1/(t+1) at positions 0..t: y = A x along positions, dx = A^T dy."""
    return torch.tril(torch.ones(T, T, dtype=F64)) / torch.arange(1, T + 1, dtype=F64).view(T, 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), T=st.integers(1, 12), C=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_causal_average_backward_equals_the_explicit_matrix(n, T, C, seed):
    g = torch.Generator().manual_seed(seed)
    x, dy = _randn(g, n, T, C), _randn(g, n, T, C)
    A = _averaging_matrix(T)
    y, cache = bow.causal_average_forward(x)
    (dx,) = bow.causal_average_backward(dy, cache)
    torch.testing.assert_close(y, torch.einsum("ts,nsc->ntc", A, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, torch.einsum("ts,ntc->nsc", A, dy), rtol=1e-12, atol=1e-12)
    # every average's weights sum to 1, so the total gradient is kept
    torch.testing.assert_close(dx.sum(1), dy.sum(1), rtol=1e-12, atol=1e-12)


# --- token and position embeddings: shared rows add up ----------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), T=st.integers(1, 5), extra=st.integers(0, 3), V=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_position_rows_get_the_sum_over_the_batch(n, T, extra, V, seed):
    g = torch.Generator().manual_seed(seed)
    wte, wpe = _randn(g, V, 3), _randn(g, T + extra, 3)
    idx = torch.randint(0, V, (n, T), generator=g)
    x, cache = embedding.token_position_forward(wte, wpe, idx)
    dx = _randn(g, n, T, 3)
    dwte, dwpe = embedding.token_position_backward(dx, cache)
    # position row t is used by every batch row: it gets the sum; rows past T get nothing
    torch.testing.assert_close(dwpe[:T], dx.sum(0), rtol=1e-12, atol=1e-12)
    assert not dwpe[T:].any()
    loop = torch.zeros(V, 3, dtype=F64)  # the lecture's double loop for the token rows
    for k in range(n):
        for t in range(T):
            loop[idx[k, t]] += dx[k, t]
    torch.testing.assert_close(dwte, loop, rtol=1e-12, atol=1e-12)


def test_more_positions_than_position_rows_is_refused():
    with pytest.raises(ValueError, match="5 positions"):
        embedding.token_position_forward(torch.zeros(4, 2), torch.zeros(3, 2),
                                 torch.zeros(1, 5, dtype=torch.long))
