"""Hints for the zoo's exercises (5 to 8): the classic mistakes of each layer's backward.

As in ``hints``, a mistake is recognised by recomputing what it would have produced and comparing
with ``approx_equal``: the gradients above the first wrong one are right (the learner's match
them), so each mistaken tensor is built from autograd's gradients of the tensors above it and the
forward values in ``ctx.values`` (which also hold the upstream gradient, under its argument's
name). Each ``exerciseN_alternatives(name, ctx)`` lists ``(tensor, message)`` pairs for the
first wrong tensor ``name``; ``hints.diagnose`` returns the message of the first that matches
(through ``checking.diagnose.classic``).

Dimension letters: n batch, T positions, C features, nh heads, hs head size, H hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checking.diagnose import bessel_message
from ..checking.gradcheck import approx_equal
from .hints import Context

Hints = list[tuple[Tensor, str]]


# ---------------------------------------------------------------------------------------------
# exercise 5: layer normalisation

LN_DIMS = {(0,): "dim 0 (the batch)", (1,): "dim 1 (the positions)",
           (0, 1): "dims (0, 1) (the batch and the positions, as batchnorm does)"}


def layernorm_dx(dxhat: Tensor, xhat: Tensor, rstd: Tensor, dims=(-1,), divisor=None,
                 mean_term=True, xhat_term=True, bessel=1.0) -> Tensor:
    """rstd * (dxhat - mean(dxhat) - bessel * xhat * mean(dxhat * xhat)), the sums over ``dims``
    divided by ``divisor`` (C, the right count, when None), each term optional: the right dx
    and the mistaken ones."""
    divisor = divisor or xhat.shape[-1]
    inner = dxhat.clone()
    if mean_term:
        inner -= dxhat.sum(dims, keepdim=True) / divisor
    if xhat_term:
        inner -= bessel * xhat * (dxhat * xhat).sum(dims, keepdim=True) / divisor
    return rstd * inner


def exercise5_alternatives(name: str, ctx: Context) -> Hints:
    v, r = ctx.values, ctx.ref
    if name == "xhat":
        return [(v["dout"], "dxhat is dout alone: out = weight * xhat + bias scales xhat by "
                            "weight, so dxhat = dout * weight")]
    if name == "weight":
        return [((v["dout"] * v["x"]).sum((0, 1)),
                 "dweight sums dout * x: weight multiplies xhat, the normalised x, so dweight "
                 "sums dout * xhat over the n x T rows")]
    if name != "x":
        return []
    return layernorm_dim_hints(r["xhat"], v) + layernorm_term_hints(r["xhat"], v)


def layernorm_dim_hints(dxhat: Tensor, v: dict[str, Tensor]) -> Hints:
    """The means taken over the batch or the positions, divided by C or by their own count."""
    C, hints = v["x"].shape[-1], []
    for dims, where in LN_DIMS.items():
        count = math.prod(v["x"].shape[d] for d in dims)
        for divisor in dict.fromkeys((C, count)):
            hints.append((layernorm_dx(dxhat, v["xhat"], v["rstd"], dims, divisor),
                          f"dx takes its means over {where} instead of the last dim: layer "
                          "normalisation normalises each row (one position of one sequence) by "
                          "the mean and variance of its own C features, so both means in dx are "
                          "over dim -1 (keepdim=True)"))
    return hints


def layernorm_term_hints(dxhat: Tensor, v: dict[str, Tensor]) -> Hints:
    xhat, rstd, C = v["xhat"], v["rstd"], v["x"].shape[-1]
    return [
        (layernorm_dx(dxhat, xhat, rstd, xhat_term=False),
         "dx is missing its xhat term: rstd * (dxhat - mean(dxhat)) is only the gradient through "
         "the mean; the variance depends on x too, which adds - xhat * mean(dxhat * xhat)"),
        (layernorm_dx(dxhat, xhat, rstd, mean_term=False),
         "dx is missing its mean term: the row's mean depends on every x of the row, which adds "
         "- mean(dxhat) inside the brackets"),
        (layernorm_dx(dxhat, xhat, rstd, mean_term=False, xhat_term=False),
         "dx is rstd * dxhat: that treats the row's mean and variance as constants; both depend "
         "on x, which adds - mean(dxhat) - xhat * mean(dxhat * xhat) inside the brackets"),
        (layernorm_dx(dxhat, xhat, rstd, bessel=C / (C - 1)),
         "dx has the factor C/(C-1) of Bessel's correction on its xhat term: layer "
         "normalisation's variance is the biased one (it divides by C), so the factor is 1"),
        (layernorm_dx(dxhat, xhat, torch.ones_like(rstd)),
         "dx is missing the factor rstd: xhat = (x - mean) * rstd"),
    ]


# ---------------------------------------------------------------------------------------------
# exercise 6: causal self-attention

def causal_mask(T: int) -> Tensor:
    """T x T, True where position t may attend to s (s <= t)."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def exercise6_alternatives(name: str, ctx: Context) -> Hints:
    v, r = ctx.values, ctx.ref
    if name == "v":
        return [(v["att"] @ v["dy"], "dv = att @ dy is missing a transpose: y = att @ v, so "
                                     "dv = att^T @ dy (each value v_s collects from every "
                                     "position t that reads it)")]
    if name == "att":
        return [(r["att"].transpose(-2, -1), "datt is the transpose of the right answer: "
                                             "y = att @ v, so datt = dy @ v^T"),
                (r["att"].masked_fill(~causal_mask(v["att"].shape[-1]), 0.0),
                 "datt is zero above the diagonal: autograd's datt = dy @ v^T is not masked "
                 "(att is 0 there, but y still depends on those entries); the mask acts on "
                 "dscores, where the softmax backward's factor att zeroes it")]
    if name == "scores":
        return softmax_hints(r["att"], v) + mask_hint(ctx)
    if name in ("q", "k"):
        return qk_hints(name, r["scores"], v)
    return []


def softmax_backward(datt: Tensor, att: Tensor) -> Tensor:
    return att * (datt - (att * datt).sum(-1, keepdim=True))


def softmax_hints(datt: Tensor, v: dict[str, Tensor]) -> Hints:
    att, hs = v["att"], v["q"].shape[-1]
    unmasked = torch.softmax(v["q"] @ v["k"].transpose(-2, -1) / math.sqrt(hs), -1)
    return [
        (datt, "dscores is datt: the softmax's backward is missing. Each row of att is "
               "exp(scores) / sum(exp(scores)), so dscores = att * (datt - sum(att * datt))"),
        (att * datt, "dscores is att * datt, missing - att * sum(att * datt, -1): every score of a "
                     "row also moves the row's normaliser, the sum in the softmax's denominator"),
        (datt - (att * datt).sum(-1, keepdim=True),
         "dscores is missing the factor att: dscores = att * (datt - sum(att * datt)); without "
         "it the gradient also reaches the masked positions above the diagonal"),
        (softmax_backward(datt, att) / math.sqrt(hs),
         "dscores has the 1/sqrt(hs) scale in it: scores are q @ k^T / sqrt(hs) already, so "
         "dscores is the softmax backward alone, and the scale belongs to dq and dk"),
        (softmax_backward(datt, unmasked), MASK_MESSAGE + " (this att was recomputed without the "
                                                          "mask: use the forward's att)"),
    ]


MASK_MESSAGE = ("dscores is nonzero above the diagonal, where the causal mask put -inf: those "
                "scores never reach the loss (att is exactly 0 there), so their gradient is 0. "
                "The softmax backward att * (...) gives that 0 by itself")


def mask_hint(ctx: Context) -> Hints:
    """Gradient above the diagonal, where autograd's is 0: the mask forgotten, however it came
    about. Not a recomputed mistake but a test of the learner's tensor, so it comes last."""
    got, ref = ctx.got.get("scores"), ctx.ref["scores"]
    if not isinstance(got, Tensor) or got.shape != ref.shape or not got.is_floating_point():
        return []
    below = causal_mask(ref.shape[-1])
    got = got.detach().to(ref.dtype)
    if approx_equal(got.masked_fill(below, 0.0), ref.masked_fill(below, 0.0)):
        return []
    right_below = approx_equal(got.masked_fill(~below, 0.0), ref.masked_fill(~below, 0.0))
    return [(got, MASK_MESSAGE + (" (on and below the diagonal it is right)" if right_below
                                  else ""))]


def qk_hints(name: str, dscores: Tensor, v: dict[str, Tensor]) -> Hints:
    """dq = dscores @ k / sqrt(hs) and dk = dscores^T @ q / sqrt(hs): the transposes and the
    scale."""
    hs = v["q"].shape[-1]
    other = v["k"] if name == "q" else v["q"]
    right_d = dscores if name == "q" else dscores.transpose(-2, -1)
    wrong_d = dscores.transpose(-2, -1) if name == "q" else dscores
    unscaled = right_d @ other
    return [
        (wrong_d @ other / math.sqrt(hs),
         f"d{name} multiplies the wrong one of dscores and dscores^T: scores[t, s] = q_t . k_s, "
         "so dq_t sums dscores[t, s] k_s over s (dq = dscores @ k) and dk_s sums dscores[t, s] "
         "q_t over t (dk = dscores^T @ q), each / sqrt(hs)"),
        (unscaled, f"d{name} is missing the 1/sqrt(hs) scale: scores = q @ k^T / sqrt(hs)"),
        (unscaled / hs, f"d{name} has the 1/sqrt(hs) scale twice: once in dscores or here, "
                        "not both"),
        (unscaled * math.sqrt(hs), f"d{name} multiplies by sqrt(hs): scores = q @ k^T / sqrt(hs) "
                                   "divides by it, so the gradient does too"),
    ]


# ---------------------------------------------------------------------------------------------
# exercise 7: the WaveNet's batchnorm over dims (0, 1)

def batchnorm3d_dx(v: dict[str, Tensor], dout: Tensor, dims=(0, 1), m=None,
                   bessel=None) -> Tensor:
    """gain * var_inv / m * (m * dout - sum(dout) - bessel * xhat * sum(dout * xhat)), the sums
    over ``dims``: the right dx with the defaults (m = n*T, bessel = m/(m-1)), and the
    miscounted ones."""
    m = m or v["x"].shape[0] * v["x"].shape[1]
    bessel = bessel or m / (m - 1)
    xhat = v["xhat"]
    return v["gain"] * v["var_inv"] / m * (
        m * dout - dout.sum(dims, keepdim=True)
        - bessel * xhat * (dout * xhat).sum(dims, keepdim=True))


def exercise7_alternatives(name: str, ctx: Context) -> Hints:
    if name != "x":
        return []
    v, dout = ctx.values, ctx.values["dout"]
    n, T = v["x"].shape[:2]
    m = n * T
    return [
        (batchnorm3d_dx(v, dout, (0,), n),
         "dx takes its sums over dim 0 only, with n: those are per-position statistics (T "
         "means per feature). The forward's statistics are over dims (0, 1), so the sums in dx "
         "are too, and the count is m = n*T"),
        (batchnorm3d_dx(v, dout, m=n),
         f"dx counts n = {n} values per feature where there are m = n*T = {m}: the statistics "
         "are over dims (0, 1), so exercise 3's formula holds with n replaced by n*T "
         "everywhere, Bessel's m/(m-1) included"),
        (batchnorm3d_dx(v, dout, bessel=n / (n - 1)),
         f"dx has Bessel's factor over n = {n} (n/(n-1)) where the variance divides by "
         f"n*T - 1 = {m - 1}: the factor is m/(m-1) with m = n*T"),
        (batchnorm3d_dx(v, dout, bessel=1.0),
         f"dx divides by n*T = {m} where the variance divides by n*T - 1 = {m - 1}: "
         + bessel_message("x")),
        (batchnorm3d_dx(v, dout) / v["gain"], "dx is missing the factor gain: "
                                              "out = gain * xhat + bias"),
    ]


# ---------------------------------------------------------------------------------------------
# exercise 8: an RNN back through time

def rnn_da(v: dict[str, Tensor], deriv: Tensor, carry: bool = True,
           transpose: bool = True) -> Tensor:
    """The loop of backward(): da_t = (dhs_t + dh) * deriv_t, dh = da_t @ w[C:]^T carried to
    step t-1; the mistakes drop the carry, transpose nothing, or use another derivative."""
    hs, dhs = v["hs"], v["dhs"]
    w_h = v["w"][v["x"].shape[-1]:]
    w_back = w_h.T if transpose else w_h
    da, dh = torch.zeros_like(hs), torch.zeros_like(hs[:, 0])
    for t in reversed(range(hs.shape[1])):
        da[:, t] = (dhs[:, t] + (dh if carry else 0.0)) * deriv[:, t]
        dh = da[:, t] @ w_back
    return da


def previous_states(v: dict[str, Tensor]) -> Tensor:
    """h_{t-1} for every step: h0, then every state but the last (n x T x H)."""
    hs = v["hs"]
    return torch.cat([v["h0"].expand(hs.shape[0], 1, -1), hs[:, :-1]], 1)


def exercise8_alternatives(name: str, ctx: Context) -> Hints:
    v, r = ctx.values, ctx.ref
    if name == "a":
        return rnn_loop_hints(v)
    if name == "h0":
        return [((r["a"][:, 0] @ v["w"][v["x"].shape[-1]:].T).mean(0),
                 "dh0 is averaged over the batch: h0 is shared by every sequence, so its "
                 "gradient is the sum of theirs")]
    if name == "w":
        x, hs = v["x"], v["hs"]
        rows = torch.cat([x, hs], 2).reshape(-1, x.shape[-1] + hs.shape[-1])
        return [(rows.T @ r["a"].reshape(-1, hs.shape[-1]),
                 "dw pairs step t's da_t with h_t, its own output: step t read [x_t, h_{t-1}], "
                 "so the rows of dw's matmul are h0, h_0, ..., h_{T-2} (the states shifted by "
                 "one)")]
    return []


def rnn_loop_hints(v: dict[str, Tensor]) -> Hints:
    hs = v["hs"]
    tanh_grad = 1 - hs ** 2
    previous = "the derivative of step t's tanh is 1 - h_t^2, from its own output h_t, not h_{t-1}"
    return [
        (rnn_da(v, tanh_grad, carry=False),
         "da is missing the carried gradient: h_t is read by the output at t and by step t+1, "
         "so dh_t = dhs[:, t] + (the gradient carried back from step t+1, da_{t+1} @ w[C:]^T)"),
        (rnn_da(v, 1 - hs), "da uses 1 - h_t as the tanh derivative: tanh' = 1 - tanh^2, so "
                            "it is 1 - h_t**2"),
        (rnn_da(v, 1 - previous_states(v) ** 2), previous),
        (rnn_da(v, 1 - hs.roll(1, 1) ** 2), previous + " (hs[:, t-1] is also the last state "
                                                         "at t = 0)"),
        (rnn_da(v, tanh_grad, transpose=False),
         "da carries dh back with w[C:] where w[C:]^T belongs: a_t = [x_t, h_{t-1}] @ w + b, so "
         "dh_{t-1} = da_t @ w[C:].T"),
    ]
