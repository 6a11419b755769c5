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


def as_index(t: Tensor | None) -> Tensor | None:
    """Indices as int64, for lookups and the loss: data stored in a smaller integer type
    (``data``) is widened one batch or chunk at a time. An int64 tensor comes back as it is."""
    return t if t is None or t.dtype == torch.long else t.long()


# The working memory one evaluation or calibration chunk may take: its rows are sized to it
# from the model's own activations (``row_bytes``, an upper bound: the forward with its caches),
# not fixed.
CHUNK_BYTES = 512 << 20
# Above this many targets in the training split the train loss is estimated by default, on a
# seeded sample of rows holding about this many targets (names.txt, 182,625 / 208,251 targets
# in the context / sequence layout, stays exact).
TRAIN_SAMPLE_TARGETS = 1 << 18
TRAIN_SAMPLE_SEED = 0


def _tensor_bytes(obj, seen: set) -> int:
    if isinstance(obj, Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


@torch.no_grad()
def row_bytes(spec: ModelSpec, params: Params, X: Tensor, stats: Stats | None = None) -> int:
    """Bytes a forward takes per row of X, measured: the tensors a training forward keeps
    (its backward caches, logits and activations) at two small batch sizes, the difference
    over the rows. An upper bound for the cache-free forward, which frees each layer's
    intermediates as the next one runs."""
    sizes = []
    for n in (2, 4):
        rows = X[:n] if X.shape[0] >= n else X[:1].expand(n, *X.shape[1:])
        result = spec.forward(params, rows, stats=stats or None)
        sizes.append(_tensor_bytes((result.logits, result.cache, result.norm_inputs, result.acts),
                                   {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
                                    for p in params.values()}))
    return max(1, (sizes[1] - sizes[0]) // 2)


# ... and at most this many rows (of full length) a chunk: beyond it the intermediates outgrow
# the CPU's caches and the pass gets slower, not faster (a WaveNet's val loss measured 26 s per
# million targets in one chunk against 16 in chunks of 4096)
MAX_CHUNK_ROWS = 4096


def chunk_rows(spec: ModelSpec, params: Params, X: Tensor, stats: Stats | None = None,
               budget: int = CHUNK_BYTES) -> int:
    """Rows per evaluation chunk: as many as fit ``budget`` bytes of activations, at least 64
    and at most ``MAX_CHUNK_ROWS``."""
    return max(64, min(MAX_CHUNK_ROWS, budget // row_bytes(spec, params, X, stats)))


def _bar(total: int, desc: str | None, progress: bool | None):
    """A progress bar on stderr, with the time left; off when not a terminal, or when
    ``progress`` is False."""
    from tqdm import tqdm
    import sys
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, mininterval=0.5, leave=False,
                disable=True if progress is False or not desc else None, dynamic_ncols=True)


@torch.no_grad()
def calibrate(spec: ModelSpec, params: Params, X: Tensor, chunk: int | None = None, *,
              progress: bool | None = None) -> Stats:
    """Each batchnorm layer's mean and unbiased variance over all of X, layer by layer.

    Computed in chunks sized to memory (``chunk`` rows if given), with float64 sums, so the
    whole set never sits in memory; the forward keeps no backward caches.
    """
    stats: Stats = {}
    if X.shape[0] >= 2 and not spec.forward(params, X[:2], keep_cache=False).norm_inputs:
        return stats  # no batchnorm layer: nothing to calibrate
    chunk = chunk or chunk_rows(spec, params, X[:4], None)
    spans = chunks(X.shape[0], chunk)
    layer = 0
    while True:  # one pass per batchnorm layer, with the statistics of those before it fixed
        acc, name = StatsAccumulator(), None
        layer += 1
        with _bar(X.shape[0], f"calibrating batchnorm {layer}", progress) as bar:
            for start, stop in spans:
                norm_inputs = spec.forward(params, X[start:stop], stats=stats,
                                           keep_cache=False).norm_inputs
                name = next((k for k in norm_inputs if k not in stats), None)
                if name is None:
                    return stats
                acc.add(norm_inputs[name])
                bar.update(stop - start)
        stats[name] = acc.stats()


def chunks(N: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most ``size`` rows (one more for the last), never a 1-row tail:
    the layers after the one being calibrated still normalise with their chunk's statistics."""
    bounds = list(range(0, N, size)) + [N]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def _lengths(spec: ModelSpec, Y: Tensor) -> Tensor | None:
    """For a sequence model: each row's positions up to its last target that counts. The models
    are causal (position t sees positions <= t only), so the columns after a chunk's longest row
    can be left out of its forward without changing a single logit that counts."""
    if spec.layout != "sequence" or Y.dim() != 2:
        return None
    valid = (Y != IGNORE_INDEX)
    pos = torch.arange(1, Y.shape[1] + 1, device=Y.device)
    return (valid * pos).amax(1)


def _spans(spec: ModelSpec, X: Tensor, Y: Tensor, chunk: int):
    """(rows, columns) per chunk. Context layouts: ``chunk`` rows at a time, in order, every
    column. Sequence layouts: rows sorted by length (shortest first), each chunk trimmed to its
    longest row and holding as many rows as ``chunk`` full-length rows' memory allows at that
    length (activations grow at least linearly with the positions): short items go many to a
    chunk."""
    N = X.shape[0]
    lengths = _lengths(spec, Y)
    if lengths is None:
        return [(slice(a, b), X.shape[1]) for a, b in chunks(N, chunk)]
    T = X.shape[1]
    ordered, order = torch.sort(lengths, stable=True)
    ordered = ordered.clamp(min=1).tolist()
    spans, a = [], 0
    while a < N:
        b = min(N, a + chunk)
        while True:  # grow while the chunk's longest row leaves room
            longest_row = ordered[b - 1]
            fit = max(chunk, chunk * T // longest_row)
            grown = min(N, a + fit)
            if grown <= b:
                break
            b2 = grown
            if ordered[b2 - 1] * (b2 - a) > chunk * T:  # too far: the longer rows need room
                lo, hi = b, b2  # the last b with ordered[b-1] * (b - a) <= chunk * T
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if ordered[mid - 1] * (mid - a) <= chunk * T:
                        lo = mid
                    else:
                        hi = mid - 1
                b = lo
                break
            b = b2
        if N - b == 1:
            b = N  # never a 1-row tail
        spans.append((order[a:b], ordered[b - 1]))
        a = b
    return spans


@torch.no_grad()
def evaluate(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, stats: Stats,
             chunk: int | None = None, *, progress: bool | None = None,
             desc: str | None = None) -> float:
    """Mean cross-entropy over every target of (X, Y) that counts (padding does not),
    normalising with the given statistics. Exact: every row; in chunks sized to memory
    (``chunk`` rows if given), by the forward that keeps no backward caches. ``desc`` names
    the progress bar (none without it)."""
    # summed on the device in float64 (the same products and order as Python floats would
    # give), read back once: a GPU run waits for the host once per evaluation, not per chunk
    counts = (Y != IGNORE_INDEX).reshape(Y.shape[0], -1).sum(1)   # targets that count, per row
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    chunk = chunk or chunk_rows(spec, params, X[:4], stats)
    spans = _spans(spec, X, Y, chunk)
    with _bar(X.shape[0], desc, progress) as bar:
        for rows, T in spans:
            xb, yb = X[rows], Y[rows]
            if xb.dim() == 2 and T < xb.shape[1]:
                xb, yb = xb[:, :T], yb[:, :T]
            loss = spec.forward(params, xb, yb, stats, keep_cache=False).loss
            n_rows = xb.shape[0]
            total += loss.double() * counts[rows].sum()
            bar.update(n_rows)
    return (total / counts.sum()).item()


class Estimate(NamedTuple):
    """A loss over a split: exact (every row, stderr 0) or estimated on a seeded sample of
    ``items`` rows out of ``of``, with the standard error of that estimate."""

    loss: float
    stderr: float
    items: int
    of: int
    exact: bool

    def as_dict(self) -> dict:
        return {"loss": self.loss, "stderr": self.stderr, "items": self.items, "of": self.of}


@torch.no_grad()
def row_losses(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, stats: Stats,
               chunk: int | None = None, *, progress: bool | None = None,
               desc: str | None = None) -> tuple[Tensor, Tensor]:
    """Each row's summed cross-entropy over its targets that count (float64), and their counts,
    from the cache-free forward's logits."""
    counts = (Y != IGNORE_INDEX).reshape(Y.shape[0], -1).sum(1)
    sums = torch.zeros(X.shape[0], dtype=torch.float64, device=X.device)
    chunk = chunk or chunk_rows(spec, params, X[:4], stats)
    spans = _spans(spec, X, Y, chunk)
    with _bar(X.shape[0], desc, progress) as bar:
        for rows, T in spans:
            xb, yb = X[rows], as_index(Y[rows])
            if xb.dim() == 2 and T < xb.shape[1]:
                xb, yb = xb[:, :T], yb[:, :T]
            logits = spec.forward(params, xb, stats=stats, keep_cache=False).logits
            logp = torch.log_softmax(logits.double(), dim=-1)
            target = yb.clamp(min=0).unsqueeze(-1)
            nll = -logp.gather(-1, target).squeeze(-1) * (yb != IGNORE_INDEX)
            sums[rows] = nll.reshape(nll.shape[0], -1).sum(1)
            bar.update(xb.shape[0])
    return sums, counts


@torch.no_grad()
def estimate(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, stats: Stats, *,
             targets: int | None = None, seed: int = TRAIN_SAMPLE_SEED,
             progress: bool | None = None, desc: str | None = None) -> Estimate:
    """The loss over (X, Y), estimated on a seeded sample of rows (without replacement) that
    holds about ``targets`` targets; exact (``evaluate``) when the split holds no more than
    that. The estimate is the ratio of the sample's summed losses to its targets, its standard
    error the ratio estimator's, with the finite-population correction. Rows are sampled
    whole (an item of a sequence model, its positions together), since positions of one item
    are not independent."""
    N = X.shape[0]
    targets = targets or TRAIN_SAMPLE_TARGETS
    counts = (Y != IGNORE_INDEX).reshape(N, -1).sum(1)
    total = int(counts.sum())
    if total <= targets:
        return Estimate(evaluate(spec, params, X, Y, stats, progress=progress, desc=desc),
                        0.0, N, N, True)
    k = min(N, max(2, -(-N * targets // total)))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(N, generator=g)[:k].sort().values.to(X.device)
    sums, c = row_losses(spec, params, X[rows], Y[rows], stats, progress=progress, desc=desc)
    c = c.double()
    ratio = sums.sum() / c.sum()
    resid = sums - ratio * c
    var = (1 - k / N) * (resid * resid).sum() / (k - 1) / k / c.mean() ** 2
    return Estimate(ratio.item(), var.sqrt().item(), k, N, False)
