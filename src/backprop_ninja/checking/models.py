"""A whole model's hand-written backward against both oracles (``backprop-ninja check --type``).

1. autograd: a row per parameter, in float32, on a batch of the real data: autograd runs
   through the model's own forward (the layers' forwards are themselves checked against
   independent references in ``checking.registry``).
2. float64 central differences of the loss, on a tiny instance of the same model (every
   parameter element nudged both ways), as a relative error per parameter.

Parameters that a recipe initialises to a constant (batchnorm gain 1 and bias 0, a zero bias)
are jittered first: with gain 1 a gradient that forgot the gain would pass, with a zero bias one
that forgot the bias term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..models.base import Dropout, ModelSpec, Params
from ..nn.losses import SoftTargets
from .gradcheck import Comparison, compare, finite_difference_grads, relative_error

FD_TOLERANCE = 1e-6  # relative error of the float64 finite differences
# each model's tiny configuration for the finite differences (overrides of its recipe's config):
# a few hundred parameters, so that every one of them can be nudged in float64
TINY = {"bigram": {}, "mlp": {"n_embd": 3, "n_hidden": 6},
        "wavenet": {"block_size": 4, "n_embd": 3, "n_hidden": 6},
        "rnn": {"n_embd": 3, "n_embd2": 4}, "gru": {"n_embd": 3, "n_embd2": 4},
        "bow": {"n_embd": 3, "n_embd2": 4}, "transformer": {"n_layer": 2, "n_head": 2, "n_embd": 8}}
# A gradient that is exactly zero in exact arithmetic (b1 under batchnorm) has no relative error
# to speak of: both sides are noise, the differences' own about eps * |loss| / h ~ 1e-9 an entry.
# Both norms under this floor count as a match (a real gradient here is above 1e-3).
FD_ZERO = 1e-7


def autograd_param_grads(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor,
                         dropout: Dropout | None = None, soft: SoftTargets | None = None) -> Params:
    """Autograd's parameter gradients of the model's loss: the reference for its backward
    (with ``dropout``, the masks its generator draws: pass a copy of the step's generator;
    with ``soft``, the loss against a teacher's soft targets too)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        spec.forward(leaves, X, Y, dropout=dropout, **({} if soft is None else {"soft": soft})
                     ).loss.backward()
    return {k: v.grad for k, v in leaves.items()}


def model_rows(spec: ModelSpec, params: Params, X: Tensor, Y: Tensor) -> list[Comparison]:
    """One row per parameter: the model's backward against autograd on one batch."""
    with torch.no_grad():
        result = spec.forward(params, X, Y)
        grads = spec.backward(result.cache)
    reference = autograd_param_grads(spec, params, X, Y)
    return [compare(name, grads.get(name), reference[name]) for name in params]


def jitter_constants(params: Params, g: torch.Generator) -> Params:
    """Add N(0, 0.1^2) noise to every parameter whose entries are all equal."""
    out = {}
    for name, p in params.items():
        constant = p.numel() > 0 and bool((p == p.reshape(-1)[0]).all())
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1
        out[name] = p + noise if constant else p
    return out


@dataclass
class ModelCheck:
    rows: list[Comparison]              # float32 backward vs autograd, per parameter
    fd_errors: dict[str, float]         # float64 relative error vs finite differences
    #                                     (0 where both are below FD_ZERO: a true zero)
    loss: float                         # the batch loss of the float32 check
    fd_config: object                   # the tiny configuration of the finite differences
    params: Params                      # the parameters of the float32 check

    @property
    def ok(self) -> bool:
        return all(r.approx for r in self.rows) and \
            all(e <= FD_TOLERANCE for e in self.fd_errors.values())


def check_model(spec: ModelSpec, cfg, X: Tensor, Y: Tensor, params: Params | None = None,
                seed: int = 0, fd_batch: int = 4) -> ModelCheck:
    """Both oracles: autograd at ``cfg`` on the batch (X, Y), with ``params`` (default: the
    recipe's init, constants jittered); finite differences on the model's tiny configuration
    with ``fd_batch`` examples of the same batch (cut to its context)."""
    g = torch.Generator().manual_seed(seed)
    if params is None:
        params = jitter_constants(spec.init(cfg, g), g)
    rows = model_rows(spec, params, X, Y)
    with torch.no_grad():
        loss = float(spec.forward(params, X, Y).loss)
    tiny = replace(cfg, **TINY[spec.name])
    Xs = X[:fd_batch, X.shape[1] - spec.block_size(tiny):]
    return ModelCheck(rows, finite_difference_errors(spec, tiny, Xs, Y[:fd_batch], g), loss, tiny,
                      params)


def finite_difference_errors(spec: ModelSpec, cfg, X: Tensor, Y: Tensor,
                             g: torch.Generator) -> dict[str, float]:
    params = jitter_constants({k: v.double() for k, v in spec.init(cfg, g).items()}, g)
    with torch.no_grad():
        result = spec.forward(params, X, Y)
        grads = spec.backward(result.cache)
    numeric = finite_difference_grads(lambda **p: spec.forward(p, X, Y).loss, params,
                                      torch.ones((), dtype=torch.float64))
    return {name: 0.0 if max(grads[name].norm(), numeric[name].norm()) <= FD_ZERO
            else relative_error(grads[name], numeric[name]) for name in params}
