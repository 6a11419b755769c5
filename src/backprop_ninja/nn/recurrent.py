"""Recurrent layers over a whole sequence: makemore's RNNCell and GRUCell applied for
t = 0..T-1, and their backward passes through time.

Dimension letters: n batch, T positions, C input width (n_embd), H hidden width (n_embd2).
Every weight acts on the concatenation [x_t, h_{t-1}] ((C + H) x H), as makemore's cells do:
rows :C read the input, rows C: the previous state. The start state h0 (H) is a learned
parameter shared by every batch row, so its gradient sums over the batch.

Why these are fast (the model's step must beat autograd's on CPU): only the recurrent part is
sequential. Before the loop, the input parts x @ w[:C] + b of every step are one
(n*T) x C @ C x H matmul; inside, each step does one n x H @ H x H matmul (the two GRU gates
share theirs); after the backward loop, each weight gradient is one (C+H) x (n*T) @ (n*T) x H
matmul over the stacked per-step inputs and pre-activation gradients, not T small ones, and dx
is one matmul too. Local derivatives (1 - h^2, s (1 - s)) are computed for all steps at once.

A constant upstream gradient dhs would hide a time-index mistake in reading it (dhs[:, t+1] or
time-reversed dhs for dhs[:, t]): every position would carry the same value. The checks use a
random one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _previous_states(h0: Tensor, hs: Tensor) -> Tensor:
    """h_{t-1} for every step t, n x T x H: the start state, then every state but the last."""
    n, _, H = hs.shape
    return torch.cat([h0.expand(n, 1, H), hs[:, :-1]], dim=1)


class RNNCache(NamedTuple):
    x: Tensor   # n x T x C: the input half of every step's [x_t, h_{t-1}], for dw
    h0: Tensor  # H: the first step's h_{t-1}
    w: Tensor   # (C + H) x H: dx and the carried dh go back through it
    hs: Tensor  # n x T x H: tanh outputs (tanh' = 1 - h^2) and, shifted, the steps' h_{t-1}


def rnn_forward(x: Tensor, h0: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, RNNCache]:
    """h_t = tanh([x_t, h_{t-1}] @ w + b) for t = 0..T-1, h_{-1} = h0 for every batch row.

    Returns hs, n x T x H: every state, as the model reads each one out."""
    n, T, C = x.shape
    x_part = x @ w[:C] + b          # n x T x H: every step's input part in one matmul
    w_h = w[C:]
    hs = x.new_empty(n, T, w.shape[1])
    h = h0.expand(n, -1)
    for t in range(T):
        h = torch.tanh(x_part[:, t] + h @ w_h)
        hs[:, t] = h                # h advances: the next step reads this state (makemore PR #3)
    return hs, RNNCache(x, h0, w, hs)


def rnn_backward(dhs: Tensor, cache: RNNCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Back through time. Returns (dx, dh0, dw, db).

    h_t is read by the output at t and by step t+1, so its gradient is dhs[:, t] plus the dh
    carried back from step t+1 (none after the last step); then da_t = dh_t (1 - h_t^2) at the
    pre-activation, and dh_{t-1} = da_t @ w[C:]^T is carried on. dh0 is the gradient left at the
    start, summed over the batch (h0 is shared). dw = [x, h_prev]^T da, db = sum(da) and
    dx = da @ w[:C]^T over all steps at once, after the loop."""
    x, h0, w, hs = cache
    n, T, C = x.shape
    dtanh = 1.0 - hs * hs
    w_h_T = w[C:].T
    da = torch.empty_like(hs)       # gradient at every step's pre-activation
    dh = dhs.new_zeros(n, hs.shape[2])
    for t in range(T - 1, -1, -1):
        da[:, t] = (dhs[:, t] + dh) * dtanh[:, t]
        dh = da[:, t] @ w_h_T
    xh = torch.cat([x, _previous_states(h0, hs)], dim=2).reshape(n * T, -1)
    da_flat = da.reshape(n * T, -1)
    return da @ w[:C].T, dh.sum(0), xh.T @ da_flat, da_flat.sum(0)


class GRUCache(NamedTuple):
    x: Tensor       # n x T x C: the input half of [x_t, h_{t-1}] and [x_t, r h_{t-1}], for dw
    h0: Tensor      # H: the first step's h_{t-1}
    w_r: Tensor     # (C + H) x H each: dx and the carried dh go back through them
    w_z: Tensor
    w_hbar: Tensor
    hs: Tensor      # n x T x H: the states; shifted, every step's h_{t-1}
    rz: Tensor      # n x T x 2H: the gates r then z (sigmoid outputs: s' = s (1 - s)); one
                    # tensor because both read [x_t, h_{t-1}] and share their matmuls
    hbar: Tensor    # n x T x H: candidate states (tanh outputs: tanh' = 1 - hbar^2)


def gru_forward(x: Tensor, h0: Tensor, w_r: Tensor, b_r: Tensor, w_z: Tensor, b_z: Tensor,
                w_hbar: Tensor, b_hbar: Tensor) -> tuple[Tensor, GRUCache]:
    """makemore's GRUCell for t = 0..T-1, h_{-1} = h0 for every batch row:

    xh = [x_t, h_{t-1}]; r = sigmoid(xh @ w_r + b_r); z = sigmoid(xh @ w_z + b_z);
    hbar = tanh([x_t, r * h_{t-1}] @ w_hbar + b_hbar); h_t = (1 - z) * h_{t-1} + z * hbar.

    Returns hs, n x T x H."""
    n, T, C = x.shape
    H = h0.shape[0]
    x_part = x @ torch.cat([w_r[:C], w_z[:C], w_hbar[:C]], 1) + torch.cat([b_r, b_z, b_hbar])
    w_rz_h = torch.cat([w_r[C:], w_z[C:]], 1)   # H x 2H: both gates in one matmul per step
    w_hbar_h = w_hbar[C:]
    hs, hbar = x.new_empty(n, T, H), x.new_empty(n, T, H)
    rz = x.new_empty(n, T, 2 * H)
    h = h0.expand(n, H)
    for t in range(T):
        rz_t = torch.sigmoid(x_part[:, t, :2 * H] + h @ w_rz_h)
        r_t, z_t = rz_t[:, :H], rz_t[:, H:]
        hbar_t = torch.tanh(x_part[:, t, 2 * H:] + (r_t * h) @ w_hbar_h)
        h = (1.0 - z_t) * h + z_t * hbar_t
        rz[:, t], hbar[:, t], hs[:, t] = rz_t, hbar_t, h
    return hs, GRUCache(x, h0, w_r, w_z, w_hbar, hs, rz, hbar)


def gru_backward(dhs: Tensor, cache: GRUCache) -> tuple[Tensor, ...]:
    """Back through time. Returns (dx, dh0, dw_r, db_r, dw_z, db_z, dw_hbar, db_hbar).

    Per step, with dh = dhs[:, t] + the gradient carried from step t+1:
    dz = dh (hbar - h_prev); dhbar = dh z; at the pre-activations da_hbar = dhbar (1 - hbar^2),
    da_z = dz z (1 - z); the reset product gets d(r h_prev) = da_hbar @ w_hbar[C:]^T, so
    da_r = d(r h_prev) h_prev r (1 - r). h_prev is read in four places and its gradient is the
    sum of all four: the blend dh (1 - z), the reset product d(r h_prev) r, and the two gates'
    linear layers da_r @ w_r[C:]^T + da_z @ w_z[C:]^T (one matmul). Weight and input gradients
    are one matmul each over all steps after the loop."""
    x, h0, w_r, w_z, w_hbar, hs, rz, hbar = cache
    n, T, C = x.shape
    H = h0.shape[0]
    h_prev = _previous_states(h0, hs)
    r, z = rz[..., :H], rz[..., H:]
    dsig, dtanh = rz * (1.0 - rz), 1.0 - hbar * hbar    # local derivatives, all steps at once
    w_rz_h_T = torch.cat([w_r[C:], w_z[C:]], 1).T       # 2H x H
    w_hbar_h_T = w_hbar[C:].T
    da_rz, da_hbar = torch.empty_like(rz), torch.empty_like(hbar)
    dh = dhs.new_zeros(n, H)
    for t in range(T - 1, -1, -1):
        dh = dhs[:, t] + dh         # h_t feeds the output at t and step t+1
        hp = h_prev[:, t]
        da_hbar[:, t] = dh * z[:, t] * dtanh[:, t]
        d_rh = da_hbar[:, t] @ w_hbar_h_T
        da_rz[:, t] = torch.cat([d_rh * hp, dh * (hbar[:, t] - hp)], 1) * dsig[:, t]
        dh = dh * (1.0 - z[:, t]) + d_rh * r[:, t] + da_rz[:, t] @ w_rz_h_T
    xh = torch.cat([x, h_prev], 2).reshape(n * T, C + H)
    xrh = torch.cat([x, r * h_prev], 2).reshape(n * T, C + H)
    da_rz_flat, da_hbar_flat = da_rz.reshape(n * T, 2 * H), da_hbar.reshape(n * T, H)
    dw_rz, db_rz = xh.T @ da_rz_flat, da_rz_flat.sum(0)
    dx = torch.cat([da_rz, da_hbar], 2) @ torch.cat([w_r[:C], w_z[:C], w_hbar[:C]], 1).T
    return (dx, dh.sum(0), dw_rz[:, :H].contiguous(), db_rz[:H], dw_rz[:, H:].contiguous(),
            db_rz[H:], xrh.T @ da_hbar_flat, da_hbar_flat.sum(0))
