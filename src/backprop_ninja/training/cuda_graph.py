"""The fused step on CUDA: a chunk of steps captured in one CUDA graph and replayed.

At the lecture's size a step is ~35 tiny kernels. Launched one by one from Python, each costs more
than its arithmetic, and a GPU ends up slower than the CPU. A CUDA graph launches them all with
one call. But a graph replays fixed kernels on fixed addresses with fixed arguments, so whatever
changes from step to step must come from device memory:

- the batch. Steps are grouped into chunks of ``CHUNK``; chunk c (steps c*CHUNK to c*CHUNK+CHUNK-1)
  draws its CHUNK x batch indices with one ``randint`` from a generator seeded with
  ``chunk_seed(seed, c)``. A step's batch is then a function of the run's seed and of the step
  alone: a run resumed at any step draws what the straight run drew, with no RNG state to carry,
  and the RNG stays outside the graph (no generator has to be registered with it).
- the learning rate, and the optimiser's other per-step numbers (AdamW's bias corrections): a
  CHUNK x k table computed on the host by the run's schedule and copied to the device when it
  changes (a Python number would be frozen into the graph when it is captured).
- the loss: step r of a chunk writes it into slot r of a device buffer, which the training loop
  reads with one copy every ``FLUSH_EVERY`` steps, never an ``.item()`` per step.

The graph holds a chunk's CHUNK steps unrolled: step r reads row r of the batches and of the
table and writes loss slot r, all fixed addresses, nothing indexed at run time. It is captured
after a warm-up on a side stream, and the warm-up is the first whole chunk itself, run eagerly:
capturing runs nothing, so no step is lost or repeated. Steps that do not make a whole chunk (a
run that starts or stops mid-chunk, a gradient check, evaluation every 150 steps) run the same
kernels eagerly, one step at a time. A replay runs the kernels that the eager step launches, on
the same buffers, so both give the same bits: that is what makes a run resumed mid-chunk bit-exact.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .optim import OPTIMIZERS, Averaged

CHUNK = 100  # steps per chunk of batches, and per graph replay
GOLDEN = 0x9E3779B97F4A7C15  # odd, so seed + (c + 1) * GOLDEN differs for every chunk c


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of a chunk's batches: one per chunk, from the run's seed (never the seed itself,
    which initialised the model)."""
    return (seed + (chunk + 1) * GOLDEN) % 2**64


class ChunkedBatches:
    """A run's batch indices on its device, a chunk at a time: step s takes row s % size of
    chunk s // size, and a chunk is one ``randint`` from a generator seeded by ``chunk_seed``."""

    def __init__(self, N: int, batch_size: int, seed: int, device, size: int = CHUNK):
        self.N, self.seed, self.size = N, seed, size
        self.rows = torch.empty(size, batch_size, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device)
        self.loaded: int | None = None

    def load(self, chunk: int) -> None:
        if chunk != self.loaded:
            self.generator.manual_seed(chunk_seed(self.seed, chunk))
            torch.randint(0, self.N, self.rows.shape, generator=self.generator, out=self.rows)
            self.loaded = chunk

    def indices(self, step: int) -> Tensor:
        self.load(step // self.size)
        return self.rows[step % self.size]


class FixedBatches:
    """Given batches in place of drawn ones (the benchmark times every route on the same ones):
    the list's batches are the steps from chunk ``first`` on."""

    def __init__(self, batches: Sequence[Tensor], size: int = CHUNK):
        self.size = size
        self.rows = torch.empty(size, batches[0].shape[0], dtype=torch.long, device=batches[0].device)
        self.use(batches, 0)

    def use(self, batches: Sequence[Tensor], first: int) -> None:
        self.batches, self.first, self.loaded = list(batches), first, None

    def load(self, chunk: int) -> None:
        if chunk != self.loaded:
            start = (chunk - self.first) * self.size
            part = self.batches[start:start + self.size]
            torch.stack(part, out=self.rows[:len(part)])
            self.loaded = chunk


def not_capturable(step) -> str | None:
    """Why ``step`` cannot run as a CUDA graph, or None if it can: it must be a fused step
    (``forward_backward`` into buffers allocated once) with an optimiser that has a graph update,
    on CUDA."""
    if not hasattr(step, "forward_backward"):
        return "no fused step"
    if step.sam is not None:
        return "--sam's second pass has no graph"
    if isinstance(step.optimizer, Averaged):
        return "--ema's averaging has no graph update"
    if step.optimizer.decay is not None:
        return "weight decay on some parameters only has no graph update"
    if type(step.optimizer) not in OPTIMIZERS.values():
        return f"{type(step.optimizer).__name__} has no graph update"
    if step.flat.device.type != "cuda":
        return "not on CUDA"
    return None


def warm_up_and_capture(work: Callable[[], None], device) -> torch.cuda.CUDAGraph:
    """Run ``work`` eagerly on a side stream (the warm-up that the CUDA-graph notes ask for: cuBLAS
    and the allocator set up their per-stream state there), then capture it on that same stream.
    Capturing runs nothing: ``work`` has run exactly once when this returns."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        work()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        work()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph


class GraphRunner:
    """Runs a fused step (``fused_mlp.FastStep``, ``fused_wavenet.FastStep``) as the module's
    docstring says. ``capture=False`` runs every step eagerly with the same bookkeeping: the
    reference the graph is tested against, and what the CPU tests exercise."""

    def __init__(self, step, batches, lr_at: Callable[[int], float], capture: bool | None = None):
        self.step, self.batches, self.lr_at = step, batches, lr_at
        self.opt = step.optimizer  # its update reads the step's numbers from the table
        self.size, flat = batches.size, step.flat
        self.capture = flat.device.type == "cuda" if capture is None else capture
        self.table = torch.zeros(self.size, self.opt.columns, dtype=flat.dtype, device=flat.device)
        self.losses = torch.zeros(self.size, dtype=flat.dtype, device=flat.device)
        self.slots = [(batches.rows[r], self.losses[r],
                       [self.table[r, j:j + 1] for j in range(self.opt.columns)])
                      for r in range(self.size)]
        self.graph = None
        self.chunk: int | None = None
        self.numbers = None         # the table's contents, as last copied in
        self.unread = self.done = 0  # loss slots [unread, done) are run but not yet read
        self.read: list[float] = []  # losses of a replaced chunk, read before their slots were reused

    def indices(self, i: int) -> Tensor:
        """Step i's batch indices (for a gradient check before the step)."""
        self.prepare(i)
        return self.batches.rows[i % self.size]

    def advance(self, i: int, limit: int) -> int:
        """Run step i, or the whole chunk if it starts at i and ends by ``limit`` (the next step
        at which the loop has something to do); return how many steps ran."""
        self.prepare(i)
        r = i % self.size
        if r == 0 and i + self.size <= limit:
            self.run_chunk()
            n = self.size
        else:
            self.run_slot(r)
            n = 1
        self.opt.t += n
        self.done = r + n
        return n

    def take_losses(self) -> list[float]:
        """The losses of the steps run since the last call, in order (one device read)."""
        losses = self.read
        if self.done > self.unread:
            losses = losses + self.losses[self.unread:self.done].tolist()
        self.read, self.unread = [], self.done
        return losses

    def drop_losses(self) -> None:
        """Forget the losses not yet read (the benchmark never reads them: no device read)."""
        self.read, self.unread = [], self.done

    def prepare(self, i: int) -> None:
        """Load step i's chunk, its batches and its numbers, unless it is loaded."""
        chunk, r = divmod(i, self.size)
        if chunk == self.chunk:
            return
        self.read = self.take_losses()
        self.batches.load(chunk)
        self.load_numbers(chunk, i)
        self.chunk, self.unread, self.done = chunk, r, r

    def load_numbers(self, chunk: int, i: int) -> None:
        """The table for the steps from i to the chunk's end (rows before i are never run: 0)."""
        t0 = self.opt.t
        numbers = [[0.0] * self.opt.columns if s < i else self.opt.numbers(self.lr_at(s), t0 + s - i + 1)
                   for s in range(chunk * self.size, (chunk + 1) * self.size)]
        if numbers == self.numbers:
            return
        source = torch.tensor(numbers, dtype=self.table.dtype)
        if self.table.is_cuda:
            source = source.pin_memory()  # an asynchronous copy: no wait for the queued steps
        self.table.copy_(source, non_blocking=True)
        self.numbers = numbers

    def run_slot(self, r: int) -> None:
        """Step r of the loaded chunk, its kernels launched one by one."""
        ix, loss, cols = self.slots[r]
        self.step.forward_backward(ix, loss_out=loss)
        self.opt.update(cols)

    def run_slots(self) -> None:
        for r in range(self.size):
            self.run_slot(r)

    def run_chunk(self) -> None:
        if not self.capture:
            self.run_slots()
        elif self.graph is None:
            self.graph = warm_up_and_capture(self.run_slots, self.step.flat.device)
        else:
            self.graph.replay()
