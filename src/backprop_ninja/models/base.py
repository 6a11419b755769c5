"""What every model of the zoo provides, and what is done the same way for all of them.

A model module holds a config dataclass (``vocab_size`` first, then the model's own fields with
the recipe's defaults), a seeded ``init(cfg, generator)``, one ``forward(params, X, Y=None,
stats=None, dropout=None)`` that serves training, evaluation, calibration and sampling, and a
``backward(cache)`` that reads as the forward in reverse, one layer-backward per line.
``ModelSpec`` bundles them for the registry in ``models/__init__``.

``dropout`` (a probability and the generator to draw masks from) is given only by a training
step of a model that has dropout (``ModelSpec.dropout``); without it nothing is dropped, as in
evaluation and sampling. The other models ignore it.

Batchnorm statistics are explicit: ``stats`` maps a batchnorm layer's name to its statistics;
a layer that has none there normalises with its batch's own (training mode). Calibration fills
them in after training, layer by layer (each layer's statistics are measured with those before
it already fixed).

Dimension letters: n batch, T positions (block_size), V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..nn.losses import IGNORE_INDEX
from ..nn.normalisation import BatchNormStats, StatsAccumulator

Params = dict[str, Tensor]
Stats = dict[str, BatchNormStats]


class Dropout(NamedTuple):
    """Dropout in a training step: the probability, and the generator of the masks."""

    p: float
    rng: torch.Generator


class Forward(NamedTuple):
    logits: Tensor          # n x V (or n x T x V)
    loss: Tensor | None     # scalar, when targets were given
    cache: Any              # the model's typed cache, what its backward reads
    norm_inputs: dict[str, Tensor]  # each batchnorm layer's input, by layer name, in forward order
    acts: dict[str, Tensor]  # named activations, for the diagnostics


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    config: type                                   # the config dataclass
    recipe: dict[str, Any]                         # training defaults: steps, lr, schedule, ...
    init: Callable[..., Params]                    # (cfg, generator) -> params
    forward: Callable[..., Forward]                # (params, X, Y=None, stats=None, dropout=None[, soft])
    backward: Callable[..., Params]                # (cache, act_grads=None) -> grads
    check_config: Callable[[Any], None] = lambda cfg: None  # UserError for a config it cannot build
    layout: str = "context"  # the data's layout (``data``): "context" or "sequence"
    dropout: bool = False    # whether its forward applies dropout (--dropout)
    # whether its forward takes a teacher's soft targets (``soft=``, for --teacher): the models
    # whose loss is makemore's padded cross-entropy over a sequence
    soft_targets: bool = False
    attention_maps: Callable[[Any], list[Tensor]] | None = None  # cache -> per layer n x nh x T x T
    # parameters that weight decay leaves alone, by the last part of their name (the layer
    # norms' gains and biases, the linear biases); () decays every parameter, as makemore does
    no_decay: tuple[str, ...] = ()

    def flags(self) -> tuple[str, ...]:
        """The config fields a user sets (the vocabulary comes from the data)."""
        return tuple(f.name for f in fields(self.config) if f.name != "vocab_size")

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in fields(self.config) if f.name != "vocab_size"}

    def make_config(self, vocab_size: int, flags: dict[str, Any]):
        """The config: the recipe's defaults, overridden by the flags given (not None); a
        UserError for one the model cannot be built with."""
        given = {k: v for k, v in flags.items() if v is not None}
        cfg = self.config(vocab_size=vocab_size, **{**self.defaults(), **given})
        self.check_config(cfg)
        return cfg

    def config_for_data(self, flags: dict[str, Any], vocab_size: int, block_size: int):
        """``make_config`` for loaded data: its vocabulary, and its block size (which a sequence
        model takes from the data when no --block-size was given)."""
        if "block_size" in self.flags():
            flags = {**flags, "block_size": block_size}
        return self.make_config(vocab_size, flags)

    def block_size(self, cfg) -> int | None:
        """Characters of context per example (1 for the bigram: the previous character); None
        for a sequence model whose block size is still to come from the data."""
        return getattr(cfg, "block_size", 1) or None


def require_positive(cfg, *names: str) -> None:
    """A one-line error for the first of the config's ``names`` that is below 1, as its flag."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def num_params(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def loss_and_grads(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor) -> tuple[Tensor, Params]:
    result = spec.forward(params, X, Y)
    return result.loss, spec.backward(result.cache)


@torch.no_grad()
def calibrate(spec: ModelSpec, params: Params, X: Tensor, chunk: int = 4096) -> Stats:
    """Each batchnorm layer's mean and unbiased variance over all of X, layer by layer.

    Computed in cache-sized chunks with float64 sums, so the whole set never sits in memory.
    """
    stats: Stats = {}
    spans = chunks(X.shape[0], chunk)
    while True:  # one pass per batchnorm layer, with the statistics of those before it fixed
        acc, name = StatsAccumulator(), None
        for start, stop in spans:
            norm_inputs = spec.forward(params, X[start:stop], stats=stats).norm_inputs
            name = next((k for k in norm_inputs if k not in stats), None)
            if name is None:
                return stats
            acc.add(norm_inputs[name])
        stats[name] = acc.stats()


def chunks(N: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most ``size`` rows (one more for the last), never a 1-row tail:
    the layers after the one being calibrated still normalise with their chunk's statistics."""
    bounds = list(range(0, N, size)) + [N]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def evaluate(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, stats: Stats,
             chunk: int = 4096) -> float:
    """Mean cross-entropy over every target of (X, Y) that counts (padding does not),
    normalising with the given statistics."""
    # summed on the device in float64 (the same products and order as Python floats would
    # give), read back once: a GPU run waits for the host once per evaluation, not per chunk
    counts = (Y != IGNORE_INDEX).reshape(Y.shape[0], -1).sum(1)   # targets that count, per row
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for start, stop in chunks(X.shape[0], chunk):
        loss = spec.forward(params, X[start:stop], Y[start:stop], stats).loss
        total += loss.double() * counts[start:stop].sum()
    return (total / counts.sum()).item()
