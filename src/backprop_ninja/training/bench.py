"""``backprop-ninja bench [--type NAME]``: a model's training step by each route, timed in one
process, interleaved.

Routes (see ``steps``): autograd (``loss.backward()``, the baseline), lecture (the MLP only: the
lecture's manual backward with its Python loop for dC; not on CUDA, where it is launch-bound
beyond use), eager (the model's layer-by-layer hand-written step) and fast (the step that
``train`` uses: the fused step where the model has one; on CUDA replayed as a CUDA graph per
``cuda_graph.CHUNK`` steps, as ``train`` runs it, or eager with a note saying why it is not
captured). On CUDA also ``compiled-ro``: what a user with a GPU would reach for, the model's loss
as an nn.Module under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs over inductor's
forward and backward), ``loss.backward()`` and ``torch.optim.SGD``. Optionally ``compiled``:
torch.compile of the eager step. Compile times are reported in the notes.

Timing: every route runs on the same data, model and batches; rounds alternate between routes
(so drift in machine speed hits all alike) and the median round is reported, with its ratio to
autograd. Peak memory per step: on CUDA, the allocator's peak above what was allocated before the
route was built; on CPU, the process's peak resident memory above its level just before the route
was built, each route in a fresh process so that no route inherits another's freed memory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import models
from ..models.base import ModelSpec, loss_and_grads
from .cuda_graph import CHUNK, FixedBatches, GraphRunner, not_capturable
from .threads import auto_threads
from .steps import make_step, routes

VOCAB = 27  # the problems are shaped like names.txt
# (batch, config overrides) that ``bench`` times for each model: its recipe's size first (what
# --quick times), then a large one where the model has a fused step worth measuring at scale
SIZES = {"bigram": ((256, {}),), "mlp": ((32, {}), (4096, {"n_hidden": 1024})),
         "wavenet": ((32, {}), (512, {"n_hidden": 256})), "rnn": ((32, {}),), "gru": ((32, {}),),
         "bow": ((32, {}),), "transformer": ((32, {}),)}

@dataclass
class Row:
    impl: str
    model: str
    batch: int
    config: dict  # the model's config where it differs from the recipe's
    us_per_step: float
    steps_per_s: float
    ratio_vs_autograd: float
    peak_mem_bytes: int | None
    threads: int
    device: str
    note: str = ""


def make_problem(spec: ModelSpec, batch: int, overrides: dict, device: str, N: int = 182_625,
                 seed: int = 0):
    """Random examples shaped like the names' training split, and the recipe's initialisation."""
    cfg = spec.config(vocab_size=VOCAB, **{**spec.defaults(), **overrides})
    if spec.layout == "sequence":  # names.txt's: 25,626 training items in blocks of 16
        cfg = replace(cfg, block_size=cfg.block_size or 16)
        N = 25_626
    g = torch.Generator().manual_seed(seed)
    T = spec.block_size(cfg)
    X = torch.randint(0, VOCAB, (N, T), generator=g).to(device)
    Y = torch.randint(0, VOCAB, (N, T) if spec.layout == "sequence" else (N,), generator=g).to(device)
    params = {k: v.to(device) for k, v in spec.init(cfg, g).items()}
    return params, X, Y


def make_route(spec: ModelSpec, name: str, params, X, Y, batch: int):
    if name == "compiled":
        return CompiledStep(spec, params, X, Y, batch)
    if name == "compiled-ro":
        return ReduceOverheadStep(spec, params, X, Y, batch)
    step = make_step(name, spec, params, X, Y, batch)
    if name == "fast" and not_capturable(step) is None:
        return GraphRoute(step, X.shape[0], batch)
    return step


def route_names(spec: ModelSpec, device: str, compile: bool) -> list[str]:
    names = list(routes(spec))
    if device == "cuda":
        names = [n for n in names if n != "lecture"] + ["compiled-ro"]
    return names + (["compiled"] if compile else [])


def route_note(name: str, route, device: str) -> str:
    if hasattr(route, "compile_s"):
        return f"compile {route.compile_s:.1f} s"
    if isinstance(route, GraphRoute):
        return f"a CUDA graph per {CHUNK} steps"
    if name == "fast" and device == "cuda":
        return f"eager: {not_capturable(route)}, not captured"
    return ""


def run_batches(route, batches: list, lr: float) -> None:
    """One step per batch, in order: through the route's own ``run`` where it has one (a
    graph runs a chunk of steps per call)."""
    if hasattr(route, "run"):
        route.run(batches, lr)
        return
    for b in batches:
        route.step(b, lr)


class GraphRoute:
    """The fast step as ``train`` runs it on CUDA (``cuda_graph``): a graph replay per whole
    chunk of the given batches, eager steps for the rest. Built with its warm-up and capture
    done, on one chunk of random batches."""

    def __init__(self, step, N: int, batch: int):
        device = step.flat.device
        g = torch.Generator(device=device).manual_seed(3)
        first = [torch.randint(0, N, (batch,), generator=g, device=device) for _ in range(CHUNK)]
        self.lr, self.next = 0.01, 0
        self.batches = FixedBatches(first)
        self.runner = GraphRunner(step, self.batches, lambda s: self.lr)
        self.run(first, self.lr)

    def run(self, batches: list, lr: float) -> None:
        """Steps numbered on from the last call's, from a chunk boundary (so every chunk is
        loaded afresh, as in training); their losses are never read (no sync while timed)."""
        self.lr = lr
        start = self.next
        self.batches.use(batches, start // CHUNK)
        i, stop = start, start + len(batches)
        while i < stop:
            self.runner.drop_losses()
            i += self.runner.advance(i, stop)
        self.next = -(-stop // CHUNK) * CHUNK


class LossModule(torch.nn.Module):
    """A model's training loss as an nn.Module over nn.Parameters: the shape torch.compile
    expects (its CUDA graphs take parameters as static addresses)."""

    def __init__(self, spec: ModelSpec, params, X, Y):
        super().__init__()
        self.spec, self.names = spec, list(params)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in params.values()])
        self.register_buffer("X", X, persistent=False)
        self.register_buffer("Y", Y, persistent=False)

    def forward(self, ix):
        params = dict(zip(self.names, self.weights))
        return self.spec.forward(params, self.X[ix], self.Y[ix]).loss


class ReduceOverheadStep:
    """What a user with a GPU would reach for: ``torch.compile(module,
    mode="reduce-overhead")``, ``loss.backward()`` and ``torch.optim.SGD`` (foreach)."""

    def __init__(self, spec, params, X, Y, batch):
        self.module = LossModule(spec, params, X, Y)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.01, foreach=True)
        self.loss = torch.compile(self.module, mode="reduce-overhead")
        t = time.perf_counter()
        for _ in range(3):  # compile; then the runs that CUDA-graph trees take before recording
            self.step(torch.zeros(batch, dtype=torch.long, device=X.device), 0.0)
        sync(X.device.type)
        self.compile_s = time.perf_counter() - t

    def step(self, ix, lr):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.enable_grad():
            loss = self.loss(ix)
            loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class CompiledStep:
    """torch.compile of the eager step (forward, hand-written backward, update) as one graph."""

    def __init__(self, spec, params, X, Y, batch):
        self.spec = spec
        self.params = {k: v.clone() for k, v in params.items()}
        self.X, self.Y = X, Y
        self.lr = torch.tensor(0.0, device=X.device)
        self._step = torch.compile(self._eager_step, dynamic=False)
        t = time.perf_counter()
        self.step(torch.zeros(batch, dtype=torch.long, device=X.device), 0.0)
        sync(X.device.type)
        self.compile_s = time.perf_counter() - t

    def _eager_step(self, ix, lr):
        loss, grads = loss_and_grads(self.spec, self.params, self.X[ix], self.Y[ix])
        for name, p in self.params.items():
            p.sub_(grads[name] * lr)
        return loss

    def step(self, ix, lr):
        self.lr.fill_(lr)
        with torch.no_grad():
            return self._step(ix, self.lr)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_routes(built: dict, steps: dict[str, int], N: int, batch: int, device: str,
                repeats: int) -> dict[str, float]:
    """Median microseconds per step of each route over interleaved rounds; in a round each
    route runs its own number of steps (fewer for slow routes) on the same batches."""
    g = torch.Generator(device=device).manual_seed(1)
    ix = [torch.randint(0, N, (batch,), generator=g, device=device) for _ in range(max(steps.values()))]
    per_round: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for r in range(repeats + 1):  # round 0 warms up and is dropped
        for name in names[r % len(names):] + names[:r % len(names)]:
            batches = ix[:steps[name]]
            sync(device)
            t = time.perf_counter()
            run_batches(built[name], batches, 0.01)
            sync(device)
            if r:
                per_round[name].append((time.perf_counter() - t) / len(batches) * 1e6)
    return {name: statistics.median(v) for name, v in per_round.items()}


def steps_for(work: int, name: str) -> int:
    """Enough steps per round for a stable timing, few enough for the slow routes."""
    if work <= 1 << 16:
        return 40 if name == "lecture" else 400
    return 3 if name == "lecture" else 10


def round_steps(route, steps: int) -> int:
    """A graph route's steps rounded up to whole chunks (a partial chunk would run eagerly)."""
    return -(-steps // CHUNK) * CHUNK if isinstance(route, GraphRoute) else steps


def problem_work(params, batch: int) -> int:
    return batch * max(max(p.shape) for p in params.values())


def peak_memory(spec: ModelSpec, route: str, batch: int, overrides: dict, device: str) -> int | None:
    if device == "cuda":
        params, X, Y = make_problem(spec, batch, overrides, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step = make_route(spec, route, params, X, Y, batch)
        run_steps(step, X.shape[0], batch, device, 3)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_child, (spec.name, route, batch, overrides, torch.get_num_threads()))


def run_steps(step, N: int, batch: int, device: str, count: int) -> None:
    g = torch.Generator(device=device).manual_seed(2)
    run_batches(step, [torch.randint(0, N, (batch,), generator=g, device=device)
                       for _ in range(count)], 0.01)


def _cpu_peak_child(model: str, route: str, batch: int, overrides: dict, threads: int) -> int | None:
    torch.set_num_threads(threads)
    spec = models.get(model)
    params, X, Y = make_problem(spec, batch, overrides, "cpu")
    run_steps(make_route(spec, "fast", params, X, Y, 2), X.shape[0], 2, "cpu", 1)  # load lazy kernels
    if not reset_peak_rss():
        return None
    base = read_status_kb("VmRSS")
    step = make_route(spec, route, params, X, Y, batch)
    run_steps(step, X.shape[0], batch, "cpu", 3)
    return (read_status_kb("VmHWM") - base) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's record of peak resident memory (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def read_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def bench(spec: ModelSpec, device: str = "cpu", sizes=None, repeats: int = 5,
          memory: bool = True, compile: bool = False, log=print) -> list[Row]:
    """Every route of ``spec`` at each (batch, config overrides) size (default: the model's
    ``SIZES``); a table per size to ``log``, the rows returned."""
    rows: list[Row] = []
    names = route_names(spec, device, compile)
    for batch, overrides in sizes or SIZES[spec.name]:
        params, X, Y = make_problem(spec, batch, overrides, device)
        threads = auto_threads(batch, params) if device == "cpu" else torch.get_num_threads()
        torch.set_num_threads(threads)
        built = {name: make_route(spec, name, params, X, Y, batch) for name in names}
        steps = {name: round_steps(built[name], steps_for(problem_work(params, batch), name))
                 for name in names}
        timings = time_routes(built, steps, X.shape[0], batch, device, repeats)
        base = timings.get("autograd")
        size_rows = []
        for name in names:
            us = timings[name]
            mem = peak_memory(spec, name, batch, overrides, device) \
                if memory and not name.startswith("compiled") else None
            size_rows.append(Row(name, spec.name, batch, dict(overrides), round(us, 1),
                                 round(1e6 / us, 1), round(base / us, 2) if base else float("nan"),
                                 mem, threads, device, route_note(name, built[name], device)))
        log(format_rows(size_rows))
        rows += size_rows
    return rows


def format_rows(rows: list[Row]) -> str:
    r0 = rows[0]
    config = "".join(f", {k} {v}" for k, v in r0.config.items())
    lines = [f"{r0.model}, batch {r0.batch}{config} ({r0.device}, {r0.threads} thread(s)):",
             f"  {'route':<11} {'us/step':>10} {'steps/s':>9} {'vs autograd':>12} {'peak mem/step':>14}"]
    for r in rows:
        mem = "n/a" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.2f} MiB"
        lines.append(f"  {r.impl:<11} {r.us_per_step:>10.1f} {r.steps_per_s:>9.0f} "
                     f"{r.ratio_vs_autograd:>11.2f}x {mem:>14} {r.note}")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
