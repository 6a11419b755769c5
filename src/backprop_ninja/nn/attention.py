"""Causal multi-head self-attention, as in makemore's Transformer and GPT-2.

    qkv    = x @ w_qkv + b_qkv                 n x T x 3C  (linear layer)
    q, k, v = qkv split along C, each viewed as nh heads of hs = C / nh: n x nh x T x hs
    scores = q @ k^T / sqrt(hs), -inf where s > t   n x nh x T x T (position t sees 0..t)
    att    = softmax(scores) over the last dim
    y      = att @ v, heads re-joined              n x T x C
    out    = y @ w_proj + b_proj                   n x T x C   (linear layer)

Internally the heads ride in the batch dimension (B = n * nh), so every product is one batched
matmul: no loop over heads or positions.

Dimension letters: n batch, T positions, C channels (n_embd), nh heads, hs head size, B = n*nh.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from .linear import LinearCache, linear_backward, linear_forward


class AttentionCache(NamedTuple):
    qkv: LinearCache   # x and w_qkv: the input projection's backward
    q: Tensor          # B x T x hs each, the heads of the projection, contiguous
    k: Tensor
    v: Tensor
    att: Tensor        # B x T x T, the softmax; exactly 0 above the diagonal
    proj: LinearCache  # y (n x T x C, heads re-joined) and w_proj: the output projection's backward
    scale: float       # 1 / sqrt(hs)


def check_heads(n_embd: int, n_head: int) -> None:
    """Each head gets n_embd / n_head channels, so n_head must divide n_embd."""
    if n_head < 1:
        raise UserError(f"--n-head must be at least 1, got {n_head}")
    if n_embd % n_head:
        below, above = n_embd // n_head * n_head, (n_embd // n_head + 1) * n_head
        nearest = f"{below} or {above}" if below else f"{above}"
        raise UserError(f"--n-embd {n_embd} is not divisible by --n-head {n_head}; each head gets "
                        f"n_embd / n_head channels: use --n-embd {nearest}, or another --n-head")


def causal_bias(T: int, like: Tensor) -> Tensor:
    """T x T: 0 where position t may attend to s (s <= t), -inf above the diagonal. Added to the
    scores before the softmax, which then gives exactly 0 there."""
    return torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def split_heads(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """n x T x 3C -> q, k, v, each B x T x hs: GPT-2's split into q, k, v (in that order), each
    viewed as nh heads of hs channels. One copy for all three, which makes them contiguous for
    the batched matmuls."""
    n, T, three_c = qkv.shape
    hs = three_c // (3 * n_head)
    heads = qkv.view(n, T, 3, n_head, hs).permute(2, 0, 3, 1, 4).reshape(3, n * n_head, T, hs)
    return heads.unbind(0)


def merge_heads(y: Tensor, n: int) -> Tensor:
    """B x T x hs -> n x T x C: the inverse of the head view, heads side by side in C."""
    B, T, hs = y.shape
    return y.view(n, B // n, T, hs).transpose(1, 2).reshape(n, T, B // n * hs)


def unmerge_heads(y: Tensor, n_head: int) -> Tensor:
    """n x T x C -> B x T x hs: the inverse of merge_heads (a copy, contiguous)."""
    n, T, C = y.shape
    return y.view(n, T, n_head, C // n_head).transpose(1, 2).reshape(n * n_head, T, C // n_head)


def attention_forward(x: Tensor, w_qkv: Tensor, b_qkv: Tensor, w_proj: Tensor, b_proj: Tensor,
                      n_head: int) -> tuple[Tensor, AttentionCache]:
    """x n x T x C, w_qkv C x 3C, b_qkv 3C, w_proj C x C, b_proj C -> out n x T x C."""
    n, T, C = x.shape
    check_heads(C, n_head)
    qkv, qkv_cache = linear_forward(x, w_qkv, b_qkv)
    q, k, v = split_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(C // n_head)
    # the scale and the mask in the matmul's own epilogue: one pass over the scores
    scores = torch.baddbmm(causal_bias(T, x), q, k.transpose(1, 2), alpha=scale)
    att = torch.softmax(scores, dim=-1)
    out, proj_cache = linear_forward(merge_heads(torch.bmm(att, v), n), w_proj, b_proj)
    return out, AttentionCache(qkv_cache, q, k, v, att, proj_cache, scale)


def softmax_backward(datt: Tensor, att: Tensor) -> Tensor:
    """Fused softmax backward over the last dim: dscores = att * (datt - sum(att * datt)).

    The sum is the gradient through the normaliser shared by a row, so each row of dscores sums
    to 0. A datt constant along a row (a constant upstream gradient straight into the softmax)
    makes the two terms cancel: the true dscores is 0 and a check driven that way would pass a
    backward returning zeros; the registry's random upstream gradient reaches datt through v,
    which makes it vary along each row. Where att is 0 (the masked positions) dscores is 0:
    they get no gradient, without the mask being kept.
    """
    return att * (datt - (att * datt).sum(-1, keepdim=True))


def attention_backward(dout: Tensor, cache: AttentionCache
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dw_qkv, db_qkv, dw_proj, db_proj). With dy the gradient of the heads' output:

        datt = dy @ v^T          dv = att^T @ dy
        dscores = att * (datt - sum(att * datt, last dim))            (softmax_backward)
        dq = dscores @ k / sqrt(hs)    dk = dscores^T @ q / sqrt(hs)

    and the two projections through linear_backward. What is cached and why: att (B x T x T)
    rather than q, k alone, since the softmax backward needs only att; recomputing it from q
    and k (as flash attention does to save memory at long T) would cost a second q @ k^T and
    softmax, while at makemore's block sizes (tens of positions) att is only nh * T / C times
    the size of an n x T x C activation. The scores and the mask are not kept: att is exactly
    0 above the diagonal, which zeroes dscores there. q, k, v are kept (one B x T x hs copy
    each; the projection's output itself is not), since recomputing them would cost the
    C x 3C projection again.

    A constant upstream gradient makes dy the same at every position, but datt = dy @ v^T still
    varies along each row, so no term vanishes identically. What is 0 for every dout is the key
    third of db_qkv: a bias shared by all keys shifts each row of scores by a constant, which
    the softmax ignores; that part of the check only confirms we return ~0 there.
    """
    n = dout.shape[0]
    dy, dw_proj, db_proj = linear_backward(dout, cache.proj)
    dy = unmerge_heads(dy, cache.q.shape[0] // n)                       # B x T x hs
    datt = torch.bmm(dy, cache.v.transpose(1, 2))
    dv = torch.bmm(cache.att.transpose(1, 2), dy)
    dscores = softmax_backward(datt, cache.att).mul_(cache.scale)
    dq = torch.bmm(dscores, cache.k)
    dk = torch.bmm(dscores.transpose(1, 2), cache.q)
    dqkv = join_heads(dq, dk, dv, n)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, cache.qkv)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


def join_heads(dq: Tensor, dk: Tensor, dv: Tensor, n: int) -> Tensor:
    """The inverse of split_heads: three B x T x hs -> n x T x 3C, in q, k, v order."""
    B, T, hs = dq.shape
    nh = B // n
    stacked = torch.stack((dq, dk, dv)).view(3, n, nh, T, hs)
    return stacked.permute(1, 3, 0, 2, 4).reshape(n, T, 3 * nh * hs)
