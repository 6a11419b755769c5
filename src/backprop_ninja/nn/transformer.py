"""The pre-norm transformer block of makemore and GPT-2, as one layer pair built from the others:

    x1  = x + dropout(attention(layernorm(x; ln1)))          n x T x C
    out = x1 + dropout(mlp(layernorm(x1; ln2)))              n x T x C
    mlp = linear(C -> 4C), GELU (tanh approximation), linear(4C -> C)

Dropout (GPT-2's residual dropout, off unless a training step asks for it) zeroes a branch's
output values with probability p before the residual adds it; its backward reuses the mask.

Dimension letters: n batch, T positions, C channels (n_embd), nh heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .activations import GeluCache, gelu_backward, gelu_forward
from .attention import AttentionCache, attention_backward, attention_forward
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .linear import LinearCache, linear_backward, linear_forward
from .normalisation import LayerNormCache, layernorm_backward, layernorm_forward


class BlockCache(NamedTuple):
    ln1: LayerNormCache
    attn: AttentionCache
    ln2: LayerNormCache
    fc: LinearCache    # C -> 4C
    gelu: GeluCache
    fc2: LinearCache   # 4C -> C
    drop_attn: DropoutCache
    drop_mlp: DropoutCache


def block_forward(x: Tensor, ln1_w: Tensor, ln1_b: Tensor, w_qkv: Tensor, b_qkv: Tensor,
                  w_proj: Tensor, b_proj: Tensor, ln2_w: Tensor, ln2_b: Tensor,
                  w_fc: Tensor, b_fc: Tensor, w_fc2: Tensor, b_fc2: Tensor, n_head: int,
                  dropout: float = 0.0, rng: torch.Generator | None = None
                  ) -> tuple[Tensor, BlockCache]:
    """x n x T x C; ln weights and biases C; attention's as in attention_forward; w_fc C x 4C,
    b_fc 4C, w_fc2 4C x C, b_fc2 C. Each layer keeps its own cache; the residual sums keep
    nothing, since their gradient passes through unchanged. ``dropout`` applies only with an
    ``rng`` (a training step): the masks are drawn from it, the attention branch's first."""
    p = dropout if rng is not None else 0.0
    h, ln1 = layernorm_forward(x, ln1_w, ln1_b)
    a, attn = attention_forward(h, w_qkv, b_qkv, w_proj, b_proj, n_head)
    a, drop_attn = dropout_forward(a, p, rng)
    x1 = x + a
    h, ln2 = layernorm_forward(x1, ln2_w, ln2_b)
    f, fc = linear_forward(h, w_fc, b_fc)
    f, gelu = gelu_forward(f)
    m, fc2 = linear_forward(f, w_fc2, b_fc2)
    m, drop_mlp = dropout_forward(m, p, rng)
    return x1 + m, BlockCache(ln1, attn, ln2, fc, gelu, fc2, drop_attn, drop_mlp)


def block_backward(dout: Tensor, cache: BlockCache) -> tuple[Tensor, ...]:
    """The forward in reverse, one layer backward per line. A residual x + branch(x) sends dout
    both ways, so dx = dout + (the branch's dx). Returns the 13 gradients in input order: dx,
    then ln1 (w, b), attention (w_qkv, b_qkv, w_proj, b_proj), ln2 (w, b), mlp (w_fc, b_fc,
    w_fc2, b_fc2). A constant upstream gradient hides what it hides in each layer (see their
    backward passes); the residual adds nothing to hide."""
    (dm,) = dropout_backward(dout, cache.drop_mlp)
    dg, dw_fc2, db_fc2 = linear_backward(dm, cache.fc2)
    (df,) = gelu_backward(dg, cache.gelu)
    dh, dw_fc, db_fc = linear_backward(df, cache.fc)
    dh, dln2_w, dln2_b = layernorm_backward(dh, cache.ln2)
    dx1 = dout + dh
    (da,) = dropout_backward(dx1, cache.drop_attn)
    dh, dw_qkv, db_qkv, dw_proj, db_proj = attention_backward(da, cache.attn)
    dh, dln1_w, dln1_b = layernorm_backward(dh, cache.ln1)
    dx = dx1 + dh
    return (dx, dln1_w, dln1_b, dw_qkv, db_qkv, dw_proj, db_proj, dln2_w, dln2_b,
            dw_fc, db_fc, dw_fc2, db_fc2)
