"""A configuration's memory, estimated before anything is allocated, and the one-line refusal
of what cannot fit in the machine.

The parts: the examples (``data``: N x T indices in their stored type), the parameters, the
optimiser's buffers (a flat copy of the parameters and their gradients; AdamW's two moments;
the --ema average; the --sam copy), the activations of a training step at the batch (its
forward's tensors, measured on PyTorch's ``meta`` device, which allocates nothing, and as much
again for the backward), an evaluation chunk (``base.CHUNK_BYTES``) and, with --teacher, the
teachers' prediction table when it is kept whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from .base import CHUNK_BYTES, ModelSpec

GiB = 1 << 30


def machine_bytes() -> int:
    """The machine's physical memory, or the control group's limit when lower. A fixed figure
    (not what is free now), so that a refusal does not depend on what else runs."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def index_itemsize(vocab_size: int, signed: bool = False) -> int:
    """Bytes per stored index (``data.index_dtype``)."""
    limit = vocab_size + (1 if signed else 0)
    return 1 if limit <= (128 if signed else 256) else 2 if limit <= 32768 else 4


def param_count(spec: ModelSpec, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in spec.init(cfg, torch.Generator()).values())


MEASURED_T = 512  # above this many positions, the bytes are extrapolated


def forward_bytes(spec: ModelSpec, cfg, rows: int, T: int) -> int:
    """Bytes of one training forward's tensors (caches, logits) over ``rows`` rows of T
    positions, measured on the meta device; the loss's probabilities counted as the logits'.
    A long sequence is measured at 256 and 512 positions and extrapolated as b T + c T^2
    (attention grows with the square of the block)."""
    if spec.layout == "sequence" and T > MEASURED_T:
        f1, f2 = (measured_bytes(spec, cfg, rows, t) for t in (MEASURED_T // 2, MEASURED_T))
        t1, t2 = MEASURED_T // 2, MEASURED_T
        c = max(0.0, (f2 / t2 - f1 / t1) / (t2 - t1))
        b = max(0.0, f1 / t1 - c * t1)
        return int(b * T + c * T * T)
    return measured_bytes(spec, cfg, rows, T)


def measured_bytes(spec: ModelSpec, cfg, rows: int, T: int) -> int:
    with torch.device("meta"):
        params = spec.init(cfg, torch.Generator())
        X = torch.zeros(rows, T, dtype=torch.long)
        result = spec.forward(params, X)
        tensors: list = []
        collect((result.logits, result.cache, result.norm_inputs, result.acts), tensors)
        ids = {id(p) for p in params.values()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors if id(t) not in ids)
        return nbytes + result.logits.numel() * result.logits.element_size()


def collect(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        if all(o is not obj for o in out):
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            collect(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            collect(v, out)


def estimate(spec: ModelSpec, cfg, *, rows: int, T: int, batch_size: int | None = None,
             optimizer: str | None = None, ema: float = 0.0, sam: float = 0.0,
             teacher_rows: int = 0) -> dict[str, int]:
    """Bytes per part of a run (a training run when ``batch_size`` is given, else evaluation or
    sampling)."""
    V = cfg.vocab_size
    layout_T = T if spec.layout == "sequence" else 1
    parts = {"data": rows * T * index_itemsize(V) + rows * layout_T * index_itemsize(V, signed=True)}
    n = param_count(spec, cfg)
    parts["parameters"] = 4 * n
    if batch_size:
        copies = 2 + (2 if optimizer == "adamw" else 0) + (1 if ema else 0) + (1 if sam else 0)
        parts["optimiser"] = 4 * n * copies
        parts["activations"] = 2 * forward_bytes(spec, cfg, batch_size, T)
    parts["evaluation"] = max(CHUNK_BYTES, 32 * forward_bytes(spec, cfg, 2, T))
    if teacher_rows:
        parts["teacher"] = teacher_rows * T * V * 4
    return parts


def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if v >= GiB // 10)


def check_fits(parts: dict[str, int], culprit: tuple[str, str], limit: int | None = None) -> None:
    """A one-line UserError when the parts together exceed the machine's memory (or ``limit``
    bytes); ``culprit`` is what to name (e.g. "--block-size 100001") and what to do."""
    limit = limit or machine_bytes()
    total = sum(parts.values())
    if total > limit:
        what, advice = culprit
        raise UserError(f"{what} needs about {total / GiB:,.1f} GiB of memory ({describe(parts)} "
                        f"GiB), more than this machine's {limit / GiB:.1f} GiB; {advice}")


def culprit(spec: ModelSpec, cfg, batch_size: int | None = None, source: str = "flags"
            ) -> tuple[str, str]:
    """The size furthest above its usual value (the recipe's default; 16 positions for a
    sequence model's block, 256 symbols for the vocabulary): what to name in a refusal, and
    what to do about it."""
    defaults = spec.defaults()
    ratios: dict[str, tuple[float, str, str]] = {}
    for name, value in vars(cfg).items():
        if name == "vocab_size" or not isinstance(value, int) or isinstance(value, bool):
            continue
        usual = defaults.get(name) or 16
        flag = f"--{name.replace('_', '-')}"
        advice = f"pass a smaller {flag}" + (" (or leave it out)" if name == "block_size" else "")
        ratios[name] = (value / usual, f"{flag} {value}", advice)
    if batch_size:
        usual = spec.recipe.get("batch_size", 32)
        ratios["batch_size"] = (batch_size / usual, f"--batch-size {batch_size}",
                                "pass a smaller --batch-size")
    ratios["vocab_size"] = (cfg.vocab_size / 256, f"a vocabulary of {cfg.vocab_size:,} symbols",
                            "use a file with fewer distinct characters")
    name = max(ratios, key=lambda k: ratios[k][0])
    _, what, advice = ratios[name]
    if source == "config" and name != "vocab_size":
        value = getattr(cfg, name)
        return (f"config.json's {name} {value}", "this run cannot be loaded on this machine; "
                "use a machine with more memory, or train a smaller model into a new -o WORKDIR")
    return what, advice


def check_model(spec: ModelSpec, cfg, limit: int | None = None) -> None:
    """For a run loaded from its config (eval, sample, resume): its parameters and an evaluation
    chunk must fit, before the parameters are allocated."""
    parts = estimate(spec, cfg, rows=0, T=spec.block_size(cfg) or 1)
    check_fits(parts, culprit(spec, cfg, source="config"), limit)


def checker(spec: ModelSpec, cfg_for, batch_size: int | None = None, optimizer: str | None = None,
            ema: float = 0.0, sam: float = 0.0, source: str = "flags", limit: int | None = None):
    """A ``check_memory(vocab, block_size, rows)`` for ``data.Dataset.load``: the whole run's
    estimate, checked before the examples are allocated. ``cfg_for(vocab_size, block_size)``
    makes the model's config."""
    def check(vocab, block_size: int, rows: int) -> None:
        cfg = cfg_for(vocab.size, block_size)
        T = spec.block_size(cfg) or 1
        parts = estimate(spec, cfg, rows=rows, T=T, batch_size=batch_size, optimizer=optimizer,
                         ema=ema, sam=sam)
        check_fits(parts, culprit(spec, cfg, batch_size, source), limit)
    return check
