"""Data-parallel training across processes on torch.distributed's collectives, the sync written
by hand: gloo on the CPU, NCCL on CUDA (one GPU per process).

``DistributedDataParallel`` hooks into autograd, and no training step here builds a graph; so
the group's work is done by hand, in the step (``GroupStep``), around the loop (``Group``) and in
the layers that see the global batch (``nn.group.over_group``: batchnorm and dropout; the fused
steps' ``over_group``).

Semantics. ``--batch-size`` is the global batch. Every rank draws the global batch's indices from
the run's generator, as a single process does, and keeps its slice (rank r: rows r*k .. r*k+k-1,
k = batch / N); so an N-process run takes the single-process run's batches and updates, up to the
order of float sums. Each rank's backward gives the gradient of its slice's mean loss; the global
gradient is the mean over every target of the batch:

    g = sum_r c_r g_r / C,     c_r: the targets that count in rank r's slice, C = sum_r c_r

one all-reduce (SUM) of the flat gradient buffer, then a scale. Every rank knows every c_r (it
holds the global indices), so the weighting costs no collective. For the context models every
row is one target, c_r = k, and this is SUM then / N. For the sequence models makemore's padding
(IGNORE_INDEX) makes c_r differ: each rank multiplies its gradient by c_r before the SUM and the
sum is divided by C. The loss is weighted the same way and summed once per flush (every 100
steps), with the ranks' stop requests riding along, so that every rank stops at the same step.

Batchnorm across processes: the statistics of the global batch from one all-reduce of every
rank's count, centre (its own mean), residual sum about the centre and sum of squares about it,
each in its own slot of a zeroed table, combined by Chan, Golub and LeVeque's pairwise formula
(``nn.normalisation.group_moments``: numerically sound, and the same bits on every rank), and in
the backward sum(dy) and sum(dy * xhat) all-reduced. Every rank's slice has k rows, so the
ranks' upstream gradients share one scale (1/k where the true one is 1/(N k)) and the formula,
linear in dy, gives N times each rank's share, which the SUM / N above takes back out exactly.

Evaluation and calibration are sharded: each rank takes a contiguous part of the split and one
all-reduce adds up the sums (per batchnorm layer for the calibration).

Only rank 0 prints, shows progress and writes files. The work directory's lock is held by the
launching process (``--nproc``) or by rank 0 (torchrun). Each rank checks at every evaluation that
the parameters and optimiser state are the same bits as every other rank's.

Launching: ``launch`` starts N local workers with torch.multiprocessing (spawn), on a TCPStore of
torch's own on 127.0.0.1; under torchrun (``RANK``/``WORLD_SIZE`` in the environment) the workers
join the group through ``env://``. Nothing here opens a socket of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError
from ..models.base import ModelSpec, Params, Stats, chunks
from ..nn.losses import IGNORE_INDEX
from ..nn.group import GroupSum, over_group
from ..nn.normalisation import StatsAccumulator
from . import threads
from .optim import Averaged, OptimConfig, descend
from .zero import ZeroAdamW, ZeroSharpnessAware

DEFAULT_TIMEOUT = 60.0
SPAWNED = "BACKPROP_NINJA_SPAWNED"  # set in the workers that ``launch`` starts (their parent holds the lock)
GRACE = 10.0  # seconds beyond --timeout that the launcher waits for the ranks left before killing them


# the single-tensor collectives, by their names in this torch (renamed in 2.13)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GroupError(UserError):
    pass


def in_group_env() -> bool:
    """Whether this process was started as one rank of a group (by ``launch`` or by torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def spawned() -> bool:
    return os.environ.get(SPAWNED) == "1"


def check_nproc(nproc: int, batch_size: int | None = None) -> None:
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if batch_size is not None and nproc > batch_size:
        raise UserError(f"--nproc {nproc} is larger than the batch ({batch_size}): each process "
                        "needs at least one example; use fewer processes or a larger --batch-size")
    if batch_size is not None and batch_size % nproc:
        raise UserError(f"--batch-size {batch_size} is the global batch and {nproc} processes do "
                        f"not divide it; pass a multiple of {nproc}")


def backend_for(device: str, backend: str | None) -> str:
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("--backend nccl needs CUDA GPUs (one per process) and this machine has "
                        "none; use --backend gloo (the CPU's)")
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError("--backend nccl reduces CUDA tensors; train with --device cuda, or use "
                        "--backend gloo on the CPU")
    return backend


class Group:
    """This process's rank in the group, and every collective the training does, each turning
    a failure (a rank gone, a timeout) into a one-line error that names this rank."""

    def __init__(self, rank: int, world: int, local_rank: int, local_world: int, timeout: float):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.timeout = timeout
        self.is_writer = rank == 0
        self.reduce_seconds = 0.0  # time spent in the step's gradient all-reduce (for the benchmark)

    # ---- collectives
    def _failed(self, e: Exception) -> GroupError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return GroupError(f"rank {self.rank}: the group broke off ({first}): another rank stopped "
                          f"or none answered within --timeout {self.timeout:g} s; the last "
                          "checkpoint is kept: continue with --resume")

    def collective(self, fn, *args) -> None:
        """``fn(*args)``, one of torch.distributed's collectives, its failure one line."""
        try:
            fn(*args)
        except (RuntimeError, ValueError) as e:
            raise self._failed(e) from None

    def all_reduce(self, t: Tensor) -> None:
        """Sum ``t`` in place over the group."""
        self.collective(dist.all_reduce, t)

    def reduce_scatter(self, out: Tensor, t: Tensor) -> None:
        """The group's sum of ``t`` (world equal parts), this rank's part into ``out``."""
        self.collective(REDUCE_SCATTER, out, t)

    def all_gather_into(self, out: Tensor, t: Tensor) -> None:
        """Every rank's ``t``, in rank order, into ``out`` (world times its size)."""
        self.collective(ALL_GATHER, out, t)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.collective(dist.all_gather, out, t)
        return out

    def log(self, message: str) -> None:
        if self.is_writer:
            print(message, flush=True)

    # ---- the start
    def check_same(self, what: dict) -> None:
        """Every rank must start from the same code, data and config: their SHA-256 gathered
        and compared; a one-line error names the ranks that differ from rank 0."""
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
        digest.update(code_digest())
        mine = torch.tensor(list(digest.digest()), dtype=torch.int64)
        gathered = self.all_gather(mine)
        differ = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
        if differ:
            raise GroupError(f"rank(s) {', '.join(map(str, differ))} start from other code, data or "
                             "config than rank 0 (SHA-256 of the package, the input file and the "
                             "run's config differ); give every machine the same files")

    def check_same_state(self, step: int, tensors: list[Tensor]) -> None:
        """At each evaluation: the parameters, the EMA and the optimiser state hold the same bits
        on every rank, or training stops."""
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        gathered = self.all_gather(torch.tensor(list(h.digest()), dtype=torch.int64))
        differ = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
        if differ:
            raise GroupError(f"at step {step} the parameters or optimiser state of rank(s) "
                             f"{', '.join(map(str, differ))} differ from rank 0's; this is a bug, "
                             "please report it (the last checkpoint is kept)")

    # ---- the loop
    def reduce_losses(self, losses: list[float], stop: bool) -> tuple[list[float], bool]:
        """The ranks' weighted losses summed into the global batch's, and whether any rank
        was asked to stop: one all-reduce per flush."""
        t = torch.tensor(losses + [1.0 if stop else 0.0], dtype=torch.float64)
        self.all_reduce(t)
        values = t.tolist()
        return values[:-1], values[-1] > 0

    # ---- sharded evaluation and calibration
    def shard(self, X: Tensor) -> Tensor:
        N = X.shape[0]
        return X[N * self.rank // self.world: N * (self.rank + 1) // self.world]

    @torch.no_grad()
    def calibrate(self, spec: ModelSpec, params: Params, X: Tensor, chunk: int = 4096) -> Stats:
        """``models.base.calibrate`` over the group: each rank its shard of X, one all-reduce of
        the float64 sums per batchnorm layer."""
        X = self.shard(X)
        stats: Stats = {}
        spans = chunks(X.shape[0], chunk)
        while True:
            acc, name = StatsAccumulator(), None
            for start, stop in spans:
                norm_inputs = spec.forward(params, X[start:stop], stats=stats).norm_inputs
                name = next((k for k in norm_inputs if k not in stats), None)
                if name is None:
                    return stats
                acc.add(norm_inputs[name])
            H = acc.total.numel()
            packed = torch.cat([acc.total.reshape(-1), acc.total_sq.reshape(-1),
                                torch.tensor([acc.count], dtype=torch.float64, device=X.device)])
            self.all_reduce(packed)
            acc.total = packed[:H].view(acc.total.shape)
            acc.total_sq = packed[H:2 * H].view(acc.total_sq.shape)
            acc.count = int(round(float(packed[-1])))
            stats[name] = acc.stats()

    @torch.no_grad()
    def evaluate(self, spec: ModelSpec, params: Params, X: Tensor, Y: Tensor, stats: Stats) -> float:
        """``models.base.evaluate`` over the group: the mean over every target that counts,
        from each rank's shard, one all-reduce of [sum, count]."""
        from ..models.base import evaluate

        X, Y = self.shard(X), self.shard(Y)
        count = int((Y != IGNORE_INDEX).sum())
        total = evaluate(spec, params, X, Y, stats) * count if count else 0.0
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        self.all_reduce(t)
        return float(t[0] / t[1])

    # ---- the step
    def wrap_step(self, stepper, Y: Tensor, batch_size: int,
                  zero: OptimConfig | None = None) -> "GroupStep":
        return GroupStep(stepper, self, Y, batch_size, zero)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


_code_digest: bytes | None = None


def code_digest() -> bytes:
    """SHA-256 of the package's Python sources, in path order."""
    global _code_digest
    if _code_digest is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _code_digest = h.digest()
    return _code_digest


class GroupStep:
    """A step of any route, taken by one rank on its slice of the global batch, its gradient
    summed over the group (and with ``--sam`` the second pass's too: the first pass's gradient
    is the group's before SAM measures its norm). With ``zero`` (the run's AdamW config) the
    update rule is ZeRO-1's (``zero``): the gradient reduce-scattered, AdamW's moments sharded,
    the parameters all-gathered; the inner step's own rule is then a stateless placeholder, and
    ``grads`` keep this rank's own (unreduced) gradient: the group's is in shards."""

    def __init__(self, inner, group: Group, Y: Tensor, batch_size: int,
                 zero: OptimConfig | None = None):
        self.inner, self.group = inner, group
        self.optimizer, self.sam = inner.optimizer, inner.sam
        self.zero = None
        if zero is not None:
            self.zero = ZeroAdamW(inner.buffers, zero, group)
            self.optimizer = Averaged(self.zero, zero.ema) if zero.ema else self.zero
            self.sam = (ZeroSharpnessAware(self.zero, zero.sam, group.all_reduce) if zero.sam
                        else None)
        self.params, self.grads, self.buffers = inner.params, inner.grads, inner.buffers
        self.gradfn = getattr(inner, "forward_backward", None) or inner.gradients
        self.k = batch_size // group.world
        self.lo = group.rank * self.k
        self.Y = Y
        self.weighted = Y.ndim > 1  # a sequence model: padded targets make the counts differ
        self.scale = 1.0 / group.world
        self.weight: Tensor | None = None
        self.place = GroupSum(group.all_reduce, group.rank, group.world)  # batchnorm's, dropout's
        if hasattr(inner, "over_group"):
            inner.over_group(self.place)

    def step(self, ix: Tensor, lr: float) -> Tensor:
        if self.weighted:
            counts = (self.Y[ix] != IGNORE_INDEX).view(self.group.world, -1).sum(1)
            self.weight = counts[self.group.rank].to(self.buffers.grad.dtype)
            self.scale = 1.0 / float(counts.sum())
        with over_group(self.place):
            return descend(self.gradients, ix[self.lo:self.lo + self.k], lr, self.optimizer,
                           self.sam)

    def gradients(self, local: Tensor) -> Tensor:
        loss = self.gradfn(local)
        grad = self.buffers.grad
        if self.weight is not None:
            grad.mul_(self.weight)
            loss = loss * self.weight
        t0 = time.perf_counter()
        if self.zero is None:
            self.group.all_reduce(grad)
        else:  # this rank's shard of the group's gradient, where its update rule reads it
            grad = self.zero.scatter()
        self.group.reduce_seconds += time.perf_counter() - t0
        grad.mul_(self.scale)
        return loss * self.scale


# ---------------------------------------------------------------- joining and launching

def join(timeout: float, device: str, backend: str | None, gloo_loop: str = "normal") -> Group:
    """Join the group this process was started in (by ``launch`` or torchrun)."""
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; train with one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = backend_for(device, backend)
    if backend == "nccl":
        if torch.cuda.device_count() < local_world:
            raise UserError(f"{local_world} processes on this machine need {local_world} GPUs (one "
                            f"each); it has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    try:
        if spawned():  # the launcher serves the store; every rank is its client
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False, timeout=timedelta(seconds=timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        else:  # torchrun: rank 0 serves the store at MASTER_ADDR:MASTER_PORT
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"rank {rank} could not join the group at {os.environ.get('MASTER_ADDR')}:"
                        f"{os.environ.get('MASTER_PORT')} ({first})") from None
    if backend == "gloo" and gloo_loop == "idle":
        yield_gloo_loop()
    return Group(rank, world, local_rank, local_world, timeout)


GLOO_LOOP = "gloo_tcp_loop"  # the name gloo gives its TCP transport's event-loop thread


def yield_gloo_loop() -> int:
    """Put gloo's event-loop thread in this process under SCHED_IDLE (``--gloo-loop idle``);
    return how many threads changed (0 where there is no such thread, or no Linux scheduler to
    ask).

    Why: when a rank's data arrives before this rank has posted its receive, the loop thread
    spins on the readable socket (epoll reports it until the receive is posted). On a machine
    with as many busy threads as cores, a thread woken on that core then waits behind the spin
    until the scheduler's next tick, 4 ms: measured on 2 cores, a 2-process all-reduce of 8 KB
    took 0.35 ms at the median and 4.0 ms at the 90th percentile, and the large MLP's step spent
    a quarter of its time in its collectives. Under SCHED_IDLE any woken thread runs at once;
    the 90th percentile fell to 0.30 ms. The price: the loop runs only on a core that nothing
    else wants, so on a machine loaded by other jobs each collective waits for one, and the
    same step ran 3 to 10 times slower (README, "Many processes"). Hence an option, not the
    default."""
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_IDLE"):
        return 0
    changed = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != GLOO_LOOP:
                    continue
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            changed += 1
        except OSError:  # the thread ended, or the scheduler refused: leave it as it is
            continue
    return changed


def _worker(rank: int, world: int, target, args, errors) -> None:
    """A spawned rank: the train command's own function; its one-line error goes back to the
    launcher (which prints one for the group), its exit code too."""
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a rank killed with SIGKILL
    # would leave to the resource tracker's warnings; one rank has one bar, a thread lock will do
    tqdm.set_lock(threading.RLock())
    try:
        code = target(args)
    except UserError as e:
        errors.send((rank, isinstance(e, GroupError), str(e)))
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    errors.close()
    # every file is written and the group is closed: leave without the interpreter's teardown,
    # in which a collective library's leftover thread can abort the process ("terminate called
    # without an active exception") after a run that went well
    os._exit(code or 0)


def launch(args, target, nproc: int, port: int | None, timeout: float) -> int:
    """Start ``nproc`` local ranks, each calling ``target(args)``, and wait for them: the
    caller holds the work directory's lock for the whole group. A rank that dies stops the
    rest (they see the group break at their next collective, or within ``timeout``); the
    launcher then names it in one line."""
    import multiprocessing as mp

    try:
        store = dist.TCPStore("127.0.0.1", port or 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        if "EADDRINUSE" in str(e) or "in use" in str(e):
            raise UserError(f"port {port} on 127.0.0.1 is in use; pass another --master-port, or "
                            "leave it out to take a free one") from None
        raise UserError(f"could not listen on 127.0.0.1:{port} ({str(e).splitlines()[0][:200]})") \
            from None
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(nproc)]  # each rank's one-line error, if any
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                            "MASTER_ADDR", "MASTER_PORT", SPAWNED)}
    procs = []
    try:
        for r in range(nproc):  # each child inherits the environment as it is at its start
            os.environ.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                              LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(store.port), **{SPAWNED: "1"})
            p = ctx.Process(target=_worker, args=(r, nproc, target, args, pipes[r][1]), daemon=False)
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return wait(procs, timeout, store, [receive for receive, _ in pipes])


def wait(procs, timeout: float, store, errors) -> int:
    forwarded = {}

    def forward(signum, frame):  # Ctrl-C or SIGTERM: every rank stops at the same step boundary
        forwarded[signum] = True
        for p in procs:
            if p.exitcode is None and p.pid:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first_death, deadline = None, None
    try:
        while any(p.exitcode is None for p in procs):
            for r, p in enumerate(procs):
                if first_death is None and p.exitcode is not None and p.exitcode < 0:
                    first_death = (r, -p.exitcode)
                if deadline is None and p.exitcode not in (None, 0, 130):
                    # a rank failed: the rest stop at their next collective, or after the
                    # timeout; one that does neither (stopped, wedged) is killed after it
                    deadline = time.monotonic() + timeout + GRACE
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.exitcode is None:
                        p.kill()
            time.sleep(0.05)
            for p in procs:
                p.join(0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        del store
    codes = [p.exitcode for p in procs]
    if first_death is None:  # ranks that ended between two looks: a signal's death is the cause
        first_death = next(((r, -c) for r, c in enumerate(codes) if c is not None and c < 0), None)
    if first_death is not None:
        r, sig = first_death
        raise UserError(f"rank {r} of {len(procs)} was killed by {signal.Signals(sig).name}; the "
                        "other ranks stopped; the last checkpoint is kept: continue with --resume")
    if all(c == 0 for c in codes):
        return 0
    if any(c == 130 for c in codes) and all(c in (0, 130) for c in codes):
        return 130
    reported = []
    for receive in errors:
        if receive.poll():
            reported.append(receive.recv())
    if reported:  # the cause first: an error of a rank's own before the group's breaking off
        rank, _, message = min(reported, key=lambda e: (e[1], e[0]))
        raise UserError(message)
    bad = [r for r, c in enumerate(codes) if c not in (0, 130)]
    raise UserError(f"rank {bad[0]} of {len(procs)} failed (exit code {codes[bad[0]]}); see its "
                    "output above")


def default_threads(local_world: int) -> int:
    """The machine's cores shared out among its local processes."""
    return max(1, threads.cores() // local_world)
