"""The model zoo: one module per model, looked up by name (``train --type NAME``).

The command line, the checks, the benchmark, eval and sample find a model here and never name
one in an ``if``. See ``base`` for what a model module provides.
"""

from __future__ import annotations

from ..errors import UserError
from . import bigram, bow, gru, mlp, rnn, transformer, wavenet
from .base import ModelSpec

MODELS: dict[str, ModelSpec] = {m.SPEC.name: m.SPEC for m in (bigram, mlp, wavenet, rnn, gru, bow,
                                                        transformer)}
DEFAULT = "mlp"


def get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model type {name!r}; the types are {', '.join(MODELS)}") from None
