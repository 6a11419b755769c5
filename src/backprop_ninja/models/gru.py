"""makemore's GRU: the recurrent model of ``rnn`` with a gated cell (reset r, update z, and
the candidate hbar): h_t = (1 - z) * h_{t-1} + z * hbar. See ``nn.recurrent`` for its backward
through time."""

from __future__ import annotations

from .rnn import make_spec

SPEC = make_spec("gru", "makemore's GRU: reset and update gates and a candidate state, from a "
                        "learned start state")
