"""A training step's place in a data-parallel group, for the layers whose forward looks beyond
this process's slice of the global batch: batchnorm, whose statistics are the global batch's
(``normalisation``), and dropout, whose masks are drawn for the global batch, each process
keeping its own rows (``dropout``). Outside ``over_group`` (the default) neither changes, bit
for bit.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

from torch import Tensor


class GroupSum(NamedTuple):
    """The processes a step's global batch is spread over: ``reduce`` sums a tensor in place
    over them (an all-reduce), and this process, holding rows rank*k .. rank*k+k-1 of every
    batch, is ``rank`` of ``world``."""

    reduce: Callable[[Tensor], None]
    rank: int
    world: int


_local = threading.local()  # .group: this thread's GroupSum inside ``over_group``


@contextmanager
def over_group(group: GroupSum | None) -> Iterator[None]:
    """Training layers inside the block act for the group's global batch; None: each process
    for its own batch."""
    saved = current()
    _local.group = group
    try:
        yield
    finally:
        _local.group = saved


def current() -> GroupSum | None:
    return getattr(_local, "group", None)
