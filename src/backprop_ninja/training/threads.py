"""How many CPU threads a process uses, in one place.

``train --num-threads N`` (or, with several processes on one machine, the cores divided among
them) sets the process's budget with ``set_budget``; every pass that wants "all the threads"
(evaluation, calibration, the teachers' predictions) asks ``budget()`` for it instead of the
machine's core count, so a user who asked for one thread gets one everywhere.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

_budget: int | None = None


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_budget(threads: int | None) -> None:
    """The most threads any pass of this process uses; None: every core."""
    global _budget
    _budget = threads


def budget() -> int:
    return _budget or cores()


@contextmanager
def using(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` threads; the previous setting comes back afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def all_threads():
    """The whole budget, for the big chunked passes of calibration and evaluation; the step's
    own setting (often one thread, for tensors as small as the lecture's) comes back after."""
    return using(budget())


def auto_threads(batch_size: int, params) -> int:
    """One thread for tensors as small as the lecture's (threads cost more than they save there),
    the whole budget otherwise: judged by the batch times the widest parameter dimension."""
    widest = max(max(p.shape) for p in params.values())
    return 1 if batch_size * widest <= 1 << 16 else budget()
