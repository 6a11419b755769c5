"""The MLP of the lecture, built from the layer pairs, with a backward that mirrors its forward.

Dimension letters: n batch, T block_size, C n_embd, H n_hidden, V vocab size.

    emb     = C[X]                 n x T x C
    embcat  = emb.view(n, T*C)     n x T*C
    hprebn  = embcat @ W1 + b1     n x H
    hpreact = batchnorm(hprebn)    n x H     (batch statistics in training, given ones otherwise)
    h       = tanh(hpreact)        n x H
    logits  = h @ W2 + b2          n x V
    loss    = cross_entropy(logits, Y)

One forward path serves training, evaluation, calibration and sampling: the batchnorm statistics
are an explicit argument, never hidden state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import layers as L
from .layers import BatchNormStats

PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
LECTURE_SEED = 2147483647

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


def init_params(cfg: ModelConfig, seed: int = LECTURE_SEED, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> Params:
    """The lecture's initialisation, every tensor from one seeded generator, in PARAM_NAMES order.

    Biases are small random numbers rather than zeros, so that a wrong backward cannot hide.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    params = {**init_mlp_params(cfg, g), **init_batchnorm_params(cfg, g)}
    return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}


def init_mlp_params(cfg: ModelConfig, g: torch.Generator) -> Params:
    """C, W1, b1, W2, b2: the lecture draws these first, then its check batch, from the same g."""
    V, T, C, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    fan_in = T * C
    return {
        "C": torch.randn((V, C), generator=g),
        "W1": torch.randn((fan_in, H), generator=g) * (5 / 3) / fan_in ** 0.5,  # tanh gain / sqrt(fan_in)
        "b1": torch.randn(H, generator=g) * 0.1,
        "W2": torch.randn((H, V), generator=g) * 0.1,
        "b2": torch.randn(V, generator=g) * 0.1,
    }


def init_batchnorm_params(cfg: ModelConfig, g: torch.Generator) -> Params:
    H = cfg.n_hidden
    return {
        "bngain": torch.randn((1, H), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, H), generator=g) * 0.1,
    }


def num_params(params: Params) -> int:
    return sum(p.numel() for p in params.values())


class ModelCache(NamedTuple):
    emb: L.EmbeddingCache
    lin1: L.LinearCache
    bn: L.BatchNormCache | None  # None when normalised with given statistics (nothing to train)
    tanh: L.TanhCache
    lin2: L.LinearCache
    ce: L.CrossEntropyCache | None
    emb_shape: torch.Size


class ForwardResult(NamedTuple):
    logits: Tensor           # n x V
    loss: Tensor | None      # scalar, when targets were given
    hprebn: Tensor           # n x H, pre-batchnorm activations (calibration, diagnostics)
    h: Tensor                # n x H, post-tanh activations (diagnostics)
    cache: ModelCache


def forward(params: Params, X: Tensor, Y: Tensor | None = None,
            bn_stats: BatchNormStats | None = None) -> ForwardResult:
    """Logits (and the loss if Y is given). bn_stats=None normalises with the batch's own
    statistics (training); given statistics normalise evaluation and sampling batches."""
    emb, emb_c = L.embedding_forward(params["C"], X)
    embcat = emb.view(emb.shape[0], -1)
    hprebn, lin1_c = L.linear_forward(embcat, params["W1"], params["b1"])
    if bn_stats is None:
        hpreact, bn_c = L.batchnorm_forward(hprebn, params["bngain"], params["bnbias"])
    else:
        hpreact, bn_c = L.batchnorm_apply(hprebn, params["bngain"], params["bnbias"], bn_stats), None
    h, tanh_c = L.tanh_forward(hpreact)
    logits, lin2_c = L.linear_forward(h, params["W2"], params["b2"])
    loss, ce_c = L.cross_entropy_forward(logits, Y) if Y is not None else (None, None)
    cache = ModelCache(emb_c, lin1_c, bn_c, tanh_c, lin2_c, ce_c, emb.shape)
    return ForwardResult(logits, loss, hprebn, h, cache)


def backward(cache: ModelCache) -> Params:
    """Gradients of the loss for every parameter: the forward read bottom-up, a layer a line."""
    return backward_with_activations(cache)[0]


def backward_with_activations(cache: ModelCache) -> tuple[Params, dict[str, Tensor]]:
    """``backward``, and also the gradients of the activations (dlogits, dh, dhpreact, dhprebn)."""
    if cache.ce is None or cache.bn is None:
        raise ValueError("backward needs a training forward pass: targets given and bn_stats=None")
    (dlogits,) = L.cross_entropy_backward(1.0, cache.ce)
    dh, dW2, db2 = L.linear_backward(dlogits, cache.lin2)
    (dhpreact,) = L.tanh_backward(dh, cache.tanh)
    dhprebn, dbngain, dbnbias = L.batchnorm_backward(dhpreact, cache.bn)
    dembcat, dW1, db1 = L.linear_backward(dhprebn, cache.lin1)
    (dC,) = L.embedding_backward(dembcat.view(cache.emb_shape), cache.emb)
    grads = {"C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "bngain": dbngain, "bnbias": dbnbias}
    return grads, {"dlogits": dlogits, "dh": dh, "dhpreact": dhpreact, "dhprebn": dhprebn}


def loss_and_grads(params: Params, X: Tensor, Y: Tensor) -> tuple[Tensor, Params]:
    result = forward(params, X, Y)
    return result.loss, backward(result.cache)


@torch.no_grad()
def calibrate(params: Params, X: Tensor, chunk: int = 4096) -> BatchNormStats:
    """Mean and unbiased variance of the first layer's pre-activations over all of X.

    Computed in cache-sized chunks with float64 sums, so the whole set never sits in memory.
    """
    L.check_batch_size(X.shape[0])
    H = params["W1"].shape[1]
    total = torch.zeros(H, dtype=torch.float64, device=X.device)
    total_sq = torch.zeros(H, dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], chunk):
        hprebn = first_layer(params, X[start:start + chunk])
        total += hprebn.sum(0, dtype=torch.float64)
        total_sq += (hprebn * hprebn).sum(0, dtype=torch.float64)
    n = X.shape[0]
    mean = total / n
    var = (total_sq - n * mean * mean) / (n - 1)
    dtype = params["W1"].dtype
    return BatchNormStats(mean.view(1, H).to(dtype), var.clamp_min(0).view(1, H).to(dtype))


def first_layer(params: Params, X: Tensor) -> Tensor:
    emb, _ = L.embedding_forward(params["C"], X)
    hprebn, _ = L.linear_forward(emb.view(emb.shape[0], -1), params["W1"], params["b1"])
    return hprebn


@torch.no_grad()
def evaluate(params: Params, X: Tensor, Y: Tensor, bn_stats: BatchNormStats,
             chunk: int = 4096) -> float:
    """Mean cross-entropy over all of (X, Y), normalising with the given statistics."""
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        xb, yb = X[start:start + chunk], Y[start:start + chunk]
        loss = forward(params, xb, yb, bn_stats).loss
        total += loss.double().item() * xb.shape[0]
    return total / X.shape[0]
