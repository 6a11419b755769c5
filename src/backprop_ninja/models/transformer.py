"""makemore's transformer, GPT-2 style: every backward by hand, in the layers it is built from.

Dimension letters: n batch, T block_size (the longest item + 1), C n_embd, V vocab; L n_layer.

    x      = wte[X] + wpe[0..T-1]                       n x T x C
    x      = block_l(x) for l = 0..L-1                  pre-norm: x + attn(ln1(x)), + mlp(ln2(x))
    x      = layernorm(x; lnf)
    logits = x @ lm_head                                n x T x V  (no bias)
    loss   = cross_entropy(logits, Y), padded targets ignored

The block (``nn.transformer``) holds causal multi-head self-attention and a 4x tanh-GELU MLP,
each with its residual. 204,544 parameters at makemore's size on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..nn.attention import check_heads
from ..nn.embedding import TokenPositionCache, token_position_backward, token_position_forward
from ..nn.linear import LinearCache, linear_backward, linear_forward
from ..nn.losses import (IGNORE_INDEX, CrossEntropyCache, SoftTargets, cross_entropy_backward,
                         cross_entropy_forward)
from ..nn.normalisation import LayerNormCache, layernorm_backward, layernorm_forward
from ..nn.transformer import BlockCache, block_backward, block_forward
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index, require_positive
from .rnn import ADAMW_RECIPE, uniform

# makemore's AdamW (betas 0.9/0.99, eps 1e-8), with what a practitioner adds against its
# overfitting: a warm-up, a cosine decay to a twentieth, residual dropout, stronger weight decay
# (on the weight matrices and embeddings only: NO_DECAY), the model as a moving average of the
# parameters over the last ~2000 steps, and sharpness-aware updates (each step's gradient taken
# 0.05 uphill: twice the work per step). Each was measured on val; see the README.
RECIPE = {**ADAMW_RECIPE, "steps": 40_000, "lr": 2e-3, "lr_decay_step": 40_000,
          "lr_decay_to": 1e-4, "warmup_steps": 1_000, "weight_decay": 0.2, "dropout": 0.2,
          "ema": 0.9995, "sam": 0.05}
# GPT-2's practice: decay pulls the layer norms' gains toward 0 and the biases toward nothing in
# particular, so they are left out (measured on val: the README's transformer section)
NO_DECAY = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "lnf_w", "lnf_b", "b_qkv", "b_proj", "b_fc", "b_fc2")

BLOCK_PARAMS = ("ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_proj", "b_proj", "ln2_w", "ln2_b",
                "w_fc", "b_fc", "w_fc2", "b_fc2")  # block_forward's order


@dataclass(frozen=True)
class Config:
    vocab_size: int
    block_size: int = 0   # 0: the longest item + 1, from the data
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64


def check_config(cfg: Config) -> None:
    require_positive(cfg, "n_layer", "n_head", "n_embd")
    if cfg.block_size < 0:
        raise UserError(f"--block-size must be at least 1, got {cfg.block_size}")
    check_heads(cfg.n_embd, cfg.n_head)


def init(cfg: Config, g: torch.Generator) -> Params:
    """makemore's (PyTorch's defaults): embeddings N(0, 1), linear layers U(+-1/sqrt(fan_in)),
    layer norms weight 1 and bias 0. The qkv bias is kept as 3 x n_head x head_size (its 3C
    values, viewed): the one parameter whose shape says how the heads split, so that the
    forward needs nothing but the parameters."""
    V, T, C, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head
    params = {"wte": torch.randn((V, C), generator=g), "wpe": torch.randn((T, C), generator=g)}
    for layer in range(cfg.n_layer):
        params.update({
            f"h{layer}.ln1_w": torch.ones(C), f"h{layer}.ln1_b": torch.zeros(C),
            f"h{layer}.w_qkv": uniform(g, C, C, 3 * C), f"h{layer}.b_qkv": uniform(g, C, 3, H, C // H),
            f"h{layer}.w_proj": uniform(g, C, C, C), f"h{layer}.b_proj": uniform(g, C, C),
            f"h{layer}.ln2_w": torch.ones(C), f"h{layer}.ln2_b": torch.zeros(C),
            f"h{layer}.w_fc": uniform(g, C, C, 4 * C), f"h{layer}.b_fc": uniform(g, C, 4 * C),
            f"h{layer}.w_fc2": uniform(g, 4 * C, 4 * C, C), f"h{layer}.b_fc2": uniform(g, 4 * C, C)})
    params.update({"lnf_w": torch.ones(C), "lnf_b": torch.zeros(C),
                   "lm_head": uniform(g, C, C, V)})
    return params


def n_layer(params: Params) -> int:
    return sum(1 for k in params if k.endswith(".ln1_w"))


class Cache(NamedTuple):
    emb: TokenPositionCache
    blocks: tuple[BlockCache, ...]
    lnf: LayerNormCache
    head: LinearCache
    ce: CrossEntropyCache | None
    qkv_bias_shape: torch.Size  # 3 x n_head x head_size


def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
            dropout: Dropout | None = None, soft: SoftTargets | None = None,
            keep_cache: bool = True) -> Forward:
    X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
    qkv_bias_shape = params["h0.b_qkv"].shape
    x, emb_c = token_position_forward(params["wte"], params["wpe"], X)       # n x T x C
    blocks = []
    for layer in range(n_layer(params)):
        weights = [params[f"h{layer}.{k}"].reshape(-1) if k == "b_qkv" else params[f"h{layer}.{k}"]
                   for k in BLOCK_PARAMS]
        x, block_c = block_forward(x, *weights, qkv_bias_shape[1], *(dropout or (0.0, None)))
        if keep_cache:  # without it, each block's cache is freed as the next one runs
            blocks.append(block_c)
    x, lnf_c = layernorm_forward(x, params["lnf_w"], params["lnf_b"])
    logits, head_c = linear_forward(x, params["lm_head"])                     # n x T x V
    loss, ce_c = cross_entropy_forward(logits, Y, IGNORE_INDEX, soft) if Y is not None else (None, None)
    cache = Cache(emb_c, tuple(blocks), lnf_c, head_c, ce_c, qkv_bias_shape) if keep_cache else None
    return Forward(logits, loss, cache, {}, {})


def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
    """The forward in reverse: head, final norm, the blocks from the last, the embeddings."""
    (dlogits,) = cross_entropy_backward(1.0, cache.ce)
    dx, dlm_head = linear_backward(dlogits, cache.head)
    dx, dlnf_w, dlnf_b = layernorm_backward(dx, cache.lnf)
    grads = {"lm_head": dlm_head, "lnf_w": dlnf_w, "lnf_b": dlnf_b}
    for layer in range(len(cache.blocks) - 1, -1, -1):
        dx, *dblock = block_backward(dx, cache.blocks[layer])
        grads.update({f"h{layer}.{k}": d for k, d in zip(BLOCK_PARAMS, dblock)})
        grads[f"h{layer}.b_qkv"] = grads[f"h{layer}.b_qkv"].view(cache.qkv_bias_shape)
    grads["wte"], grads["wpe"] = token_position_backward(dx, cache.emb)
    if act_grads is not None:
        act_grads["logits"] = dlogits
    return grads


def attention_maps(cache: Cache) -> list[Tensor]:
    """Each layer's attention weights, n x n_head x T x T (row t: how position t spreads its
    attention over positions 0..t)."""
    maps = []
    for block in cache.blocks:
        att = block.attn.att                                    # (n * n_head) x T x T
        maps.append(att.view(-1, cache.qkv_bias_shape[1], *att.shape[1:]))
    return maps


SPEC = ModelSpec(
    name="transformer", summary="makemore's transformer: GPT-2 style pre-norm blocks of causal "
                                "self-attention and a 4x GELU MLP, every backward by hand",
    config=Config, recipe=RECIPE, layout="sequence", dropout=True, soft_targets=True, init=init,
    forward=forward, backward=backward, check_config=check_config,
    attention_maps=attention_maps, no_decay=NO_DECAY)
