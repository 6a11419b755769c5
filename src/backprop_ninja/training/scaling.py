"""How data-parallel training scales: steps/s and examples/s of the fast step at a model's recipe
size and a large one, for 1 process x 1 thread, 1 process x 2 threads and 2 processes x 1
thread (the last also with gloo's event loop under SCHED_IDLE, ``--gloo-loop idle``, and for a
model trained with AdamW with ZeRO-1), with the gradient sync's share
of the step (its all-reduce, or ZeRO-1's reduce-scatter) and the efficiency (N-process
examples/s over N times one process's).

Every configuration runs in freshly spawned processes (``distributed.launch``), on random
examples of the model's shape (the step's cost does not depend on the letters), the same global
batch in each; the timed steps follow a warm-up, and rank 0 reports. Figures, not a test: the
machine and its load decide them.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .. import models
from . import distributed
from .bench import SIZES
from .optim import OptimConfig
from .steps import make_step

VOCAB = 27
EXAMPLES = 20_000
SEQUENCE_BLOCK = 16
# (batch, config overrides): the recipe's size, and a large one
LARGE = {"mlp": (4096, {"n_hidden": 1024}), "transformer": (256, {})}
# (processes, threads each, ZeRO-1, gloo's event loop: ``distributed.join``)
CONFIGS = ((1, 1, False, "normal"), (1, 2, False, "normal"), (2, 1, False, "normal"),
           (2, 1, False, "idle"))
ZERO = (2, 1, True, "normal")  # for a model trained with AdamW, also its moments sharded (``zero``)


def sizes(spec) -> list[tuple[int, dict]]:
    large = LARGE.get(spec.name, SIZES[spec.name][-1])
    recipe = (spec.recipe["batch_size"], {})
    return [recipe] if large == recipe else [recipe, large]


def bench_rank(job: dict) -> int:
    """One rank of a timed configuration; rank 0 writes its figures to ``job['out']``."""
    group = distributed.join(job["timeout"], "cpu", None, job["gloo_loop"])
    try:
        torch.set_num_threads(job["threads"])
        spec = models.get(job["type"])
        overrides = dict(job["overrides"])
        if spec.layout == "sequence":
            overrides["block_size"] = SEQUENCE_BLOCK
        cfg = spec.make_config(VOCAB, overrides)
        params = spec.init(cfg, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        T = spec.block_size(cfg)
        X = torch.randint(0, VOCAB, (EXAMPLES, T), generator=g)
        Y = torch.randint(0, VOCAB, (EXAMPLES, T) if spec.layout == "sequence" else (EXAMPLES,),
                          generator=g)
        batch = job["batch"]
        opt = OptimConfig(name=spec.recipe.get("optimizer", "sgd"))
        step = make_step("fast", spec, params, X, Y, batch // group.world,
                         OptimConfig(shards=group.world) if job["zero"] else opt)
        if group.world > 1:
            step = group.wrap_step(step, Y, batch, opt if job["zero"] else None)
        ix = torch.empty(batch, dtype=torch.long)
        with torch.no_grad():
            for i in range(job["warmup"] + job["steps"]):
                if i == job["warmup"]:
                    sync = torch.zeros(1)
                    group.all_reduce(sync)  # every rank starts the clock together
                    group.reduce_seconds, t0 = 0.0, time.perf_counter()
                    if getattr(step, "zero", None) is not None:
                        step.zero.sharding.seconds = 0.0
                torch.randint(0, EXAMPLES, (batch,), generator=g, out=ix)
                step.step(ix, 0.01)
            elapsed = time.perf_counter() - t0
        if getattr(step, "zero", None) is not None:  # ZeRO-1's all-gathers are its sync too
            group.reduce_seconds += step.zero.sharding.seconds
        if group.is_writer:
            Path(job["out"]).write_text(json.dumps({"seconds": elapsed,
                                                    "reduce_seconds": group.reduce_seconds}))
        return 0
    finally:
        group.close()


def scaling(name: str, steps: int, log=print) -> list[dict]:
    spec = models.get(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = CONFIGS + ((ZERO,) if spec.recipe.get("optimizer") == "adamw" else ())
        for batch, overrides in sizes(spec):
            base = None
            for nproc, threads_each, zero, loop in configs:
                out = Path(tmp) / f"{batch}-{nproc}-{threads_each}-{zero}-{loop}.json"
                job = {"type": name, "batch": batch, "overrides": overrides, "threads": threads_each,
                       "zero": zero, "gloo_loop": loop,
                       "steps": steps, "warmup": max(5, steps // 10), "out": str(out),
                       "timeout": distributed.DEFAULT_TIMEOUT}
                distributed.launch(job, bench_rank, nproc, None, distributed.DEFAULT_TIMEOUT)
                got = json.loads(out.read_text())
                rate = steps / got["seconds"]
                if (nproc, threads_each) == (1, 1):
                    base = rate
                row = {"type": name, "batch": batch, "config": overrides, "processes": nproc,
                       "threads": threads_each, "zero": zero, "gloo_loop": loop, "steps_per_s": rate,
                       "examples_per_s": rate * batch,
                       "allreduce_share": got["reduce_seconds"] / got["seconds"],
                       "vs_1x1": rate / base, "efficiency": rate / (nproc * base) if nproc > 1 else None}
                rows.append(row)
                size = "recipe" if (batch, overrides) == sizes(spec)[0] else \
                    "large" + "".join(f", {k} {v}" for k, v in overrides.items())
                eff = f"  efficiency {row['efficiency']:.2f}" if row["efficiency"] else ""
                how = f"{nproc} proc x {threads_each} thread" + (", ZeRO-1" if zero else "") \
                    + (", gloo loop idle" if loop == "idle" else "")
                log(f"{name} batch {batch:>5} ({size}): {how}  "
                    f"{rate:8.1f} steps/s  {rate * batch:10,.0f} examples/s  all-reduce "
                    f"{100 * row['allreduce_share']:4.1f}% of the step  {row['vs_1x1']:.2f}x 1x1{eff}")
    return rows
