"""The training loop: steps, with the loss logged, the val loss measured, the diagnostics
recorded and checkpoints saved as it goes, and the final calibration and save.

On the CPU the batches are drawn from the generator that initialised the model, as in the
lecture. Its state is part of every checkpoint, so a run cut into pieces with --resume gives
bit-for-bit the parameters of the same run made straight. On CUDA the batches are drawn a chunk
of steps at a time from generators seeded by the run's seed and the chunk (``cuda_graph``), and a
fused step runs as a CUDA graph per chunk: resumed runs are bit-exact there too.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from .. import rundir
from ..checking.gradcheck import compare
from ..checking.models import autograd_param_grads
from ..errors import UserError
from ..models.base import Dropout, ModelSpec, Params, calibrate, evaluate
from ..plots.loss import write_loss_plot
from . import cuda_graph
from .optim import OptimConfig, model_params, views
from .run import RunState, describe, format_train, save_model, save_progress
from .steps import make_step
from .threads import all_threads

# steps between fetches of the loss (one device sync per fetch); on CUDA a chunk of steps, so that
# a chunk's loss slots are read before the next chunk reuses them
FLUSH_EVERY = cuda_graph.CHUNK
# The val loss logged during training calibrates batchnorm on the first this-many training
# examples (the final figures use all of them): a WaveNet's calibration is a pass over the
# data per batchnorm layer, which over all 182,625 examples would cost as much as ~10k steps.
PROGRESS_CALIBRATION = 32_768


@dataclass
class Options:
    """How to run: free to change between a run and its resume."""

    grad: str = "fast"
    eval_every: int = 10_000
    checkpoint_every: int = 10_000
    diag_every: int = 1000
    check_grads: int = 0
    progress: bool = True
    exact_train_loss: bool = False  # the final train loss over every row, not a sample's
    log: Callable[[str], None] = field(default=print)
    # one rank of a data-parallel group (``distributed.Group``); None: a single process
    group: object | None = None
    zero: bool = False  # in a group: AdamW's moments sharded across the ranks (``zero``)


class Diverged(UserError):
    pass


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM, as job schedulers send, asks the loop to stop at the next step
    boundary, and says so at once with what comes next; a second one stops at once. In a group
    of processes (``group=True``) a second signal asks nothing more: the ranks agree on the step
    to stop at, and none may leave the group's collectives early."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, log: Callable[[str], None] | None = None, group: bool = False):
        self.requested = False
        self.group = group
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                break
        return self

    def _handle(self, signum, frame):
        first = not self.requested
        self.requested, self.signum = True, signum
        if self.group:
            if first:
                self.log(f"\n{self.NAMES.get(signum, 'signal')}: every process stops at the step "
                         "they agree on, then saves a checkpoint and the model")
            return
        # a second signal of the same kind stops at once
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                      else signal.SIG_DFL)
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        self.log(f"\n{self.NAMES.get(signum, 'signal')}: stopping at the next step boundary, then "
                 "saving a checkpoint and the model (calibrated and evaluated over the training "
                 f"and validation splits, which can take a while); {again} again to stop at once "
                 "without saving")

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


@torch.no_grad()
def update_to_data(before: Params, after: Params) -> dict[str, float]:
    """log10 of std(update) / std(param) per parameter, the batchnorm lecture's diagnostic, where
    the update is the change the step made to the parameter (after - before). For plain SGD that
    is the lecture's std(lr * grad); for AdamW it is not (the moments rescale every entry), which
    is why the change itself is measured."""
    out = {}
    for name, p in before.items():
        ratio = (after[name] - p).std() / p.std().clamp_min(1e-12)
        out[name] = round(float(ratio.clamp_min(1e-30).log10()), 4)
    return out


def next_diag(i: int, every: int) -> int:
    """The first step from i on whose update the diagnostics record: the last step of each
    ``every`` (49, 99, ... for 50), so that its row is the step count's multiple minus one."""
    return i if (i + 1) % every == 0 else ((i + 1) // every + 1) * every - 1


def check_step(stepper, runner, state: RunState, X: torch.Tensor, Y: torch.Tensor,
               dropout: Dropout | None, i: int) -> None:
    """Step i, its hand-written gradients compared with autograd's on the same batch, dropout
    masks and targets. With --sam both passes are checked: the first at p (recorded by the
    step), the second at the point p + e that the step moved to, with the next masks."""
    ix = runner.indices(i)
    masks = same_masks(dropout)
    soft = state.teacher and state.teacher.batch(ix)
    reference = autograd_param_grads(state.spec, state.params, X[ix], Y[ix], masks, soft)
    sam = stepper.sam  # every step has one (None without --sam)
    if sam is not None:
        sam.first = torch.empty_like(sam.e)
    state.step = i + runner.advance(i, i + 1)
    if sam is None:
        verify_grads(stepper.grads, reference, i)
        return
    first, sam.first = sam.first, None
    verify_grads(views(first, state.params), reference, i)
    moved = views(sam.saved + sam.e, state.params)
    verify_grads(stepper.grads, autograd_param_grads(state.spec, moved, X[ix], Y[ix], masks, soft), i)


def verify_grads(grads: Params, reference: Params, step: int) -> None:
    for name, ref in reference.items():
        row = compare(name, grads[name], ref)
        if not row.approx:
            raise UserError(f"gradient check failed at step {step}: d{name} differs from autograd "
                            f"(max abs diff {row.maxdiff:.3g}); this is a bug, please report it")


class PerStepBatches:
    """The lecture's batches: each step's indices drawn from the run's generator, once a step."""

    def __init__(self, generator: torch.Generator, N: int, batch_size: int, device: torch.device):
        self.generator, self.N = generator, N
        self.ix = torch.empty(batch_size, dtype=torch.long, device=device)
        self.step: int | None = None

    def __call__(self, step: int) -> torch.Tensor:
        if step != self.step:
            torch.randint(0, self.N, self.ix.shape, generator=self.generator, out=self.ix)
            self.step = step
        return self.ix


class EagerRunner:
    """One step a call, its kernels launched one by one: the step's own ``step(ix, lr)`` with a
    Python learning rate, its batch from ``indices``, its loss kept until ``take_losses``."""

    def __init__(self, stepper, indices: Callable[[int], torch.Tensor],
                 lr_at: Callable[[int], float]):
        self.stepper, self.indices, self.lr_at = stepper, indices, lr_at
        self.pending: list[torch.Tensor] = []

    def advance(self, i: int, limit: int) -> int:
        self.pending.append(self.stepper.step(self.indices(i), self.lr_at(i)))
        return 1

    def take_losses(self) -> list[float]:
        if not self.pending:
            return []
        losses = torch.stack(self.pending).tolist()
        self.pending = []
        return losses


def make_runner(stepper, state: RunState, N: int, device: torch.device):
    """What advances the run. On the CPU, the lecture's batches and the step one call at a time
    (the CPU's figures are pinned to this). On CUDA, batches a chunk at a time, and a fused step
    replayed as a CUDA graph per chunk; a step that cannot be captured runs eagerly."""
    tcfg = state.tcfg
    if device.type != "cuda":
        return EagerRunner(stepper, PerStepBatches(state.generator, N, tcfg.batch_size, device),
                           tcfg.lr_at)
    batches = cuda_graph.ChunkedBatches(N, tcfg.batch_size, tcfg.seed, device)
    if cuda_graph.not_capturable(stepper) is None:
        return cuda_graph.GraphRunner(stepper, batches, tcfg.lr_at)
    return EagerRunner(stepper, batches.indices, tcfg.lr_at)


def describe_runner(stepper) -> str:
    why = cuda_graph.not_capturable(stepper)
    if why is None:
        return f"the step runs as a CUDA graph of {cuda_graph.CHUNK} steps"
    return f"the step runs eagerly ({why}: no CUDA graph)"


def same_masks(dropout: Dropout | None) -> Dropout | None:
    """A copy of the step's dropout, its generator in the same state: autograd's reference then
    draws the masks the step is about to draw, and the step's own draws are untouched."""
    if dropout is None:
        return None
    twin = torch.Generator(device=dropout.rng.device)
    twin.set_state(dropout.rng.get_state())
    return Dropout(dropout.p, twin)


def next_stop(i: int, steps: int, periods: tuple[int, ...]) -> int:
    """The first step after i at which the loop has something to do: the end of the run, or a
    multiple of one of the (non-zero) periods."""
    return min([steps] + [(i // p + 1) * p for p in periods if p])


def run_loop(state: RunState, opts: Options) -> str:
    """Train from state.step to tcfg.steps; return 'done' or 'interrupted'. Saves as it goes."""
    tcfg, spec, device = state.tcfg, state.spec, next(iter(state.params.values())).device
    group = opts.group
    X, Y = (t.to(device) for t in state.data.splits["train"])
    # in a group every rank draws the global batch's masks from the run's generator and keeps its
    # rows (``nn.dropout``), as it does with the batch's indices
    dropout = Dropout(tcfg.dropout, state.generator) if tcfg.dropout else None
    local_batch = tcfg.batch_size if group is None else tcfg.batch_size // group.world
    opt = tcfg.optim(spec.no_decay)
    zero = group is not None and opts.zero  # then the group's sharded rule replaces the step's,
    stepper = make_step(opts.grad, spec, state.params, X, Y, local_batch,  # which keeps no state
                        OptimConfig(shards=group.world) if zero else opt, dropout, state.teacher)
    if group is not None:  # every rank draws the global batch; the step keeps its slice
        stepper = group.wrap_step(stepper, Y, tcfg.batch_size, opt if zero else None)
    if state.optimizer_state:
        stepper.optimizer.load_state(state.optimizer_state)
    state.params = stepper.params
    state.model = model_params(stepper.optimizer)
    flat = stepper.optimizer.buffers.flat
    if group is None:
        runner = make_runner(stepper, state, X.shape[0], device)
    else:  # eagerly (no CUDA graph)
        batches = PerStepBatches(state.generator, X.shape[0], tcfg.batch_size, device) \
            if device.type != "cuda" else \
            cuda_graph.ChunkedBatches(X.shape[0], tcfg.batch_size, tcfg.seed, device).indices
        runner = EagerRunner(stepper, batches, tcfg.lr_at)
    if device.type == "cuda" and group is None:
        opts.log(f"on {device}: {describe_runner(stepper)}")
    periods = (FLUSH_EVERY, opts.diag_every, opts.eval_every, opts.checkpoint_every)
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    unsaved: list[dict] = []
    writer = group is None or group.is_writer
    bar = tqdm(total=tcfg.steps, initial=state.step, unit="step", file=sys.stderr, mininterval=0.5,
               disable=None if opts.progress and writer else True, dynamic_ncols=True)
    agreed_stop = False  # in a group: a stop that every rank has seen (at a flush)
    last_good = state.step if (state.workdir / rundir.CHECKPOINT).exists() else None
    t0, s0 = time.perf_counter(), state.step
    probe_size = max(2, min(X.shape[0], 1024))
    resumed = state.start_step > 0

    def flush() -> None:
        nonlocal agreed_stop
        losses = runner.take_losses()
        if not losses:
            return
        if group is not None:  # the ranks' shares of each loss summed; any rank's stop request
            losses, agreed_stop = group.reduce_losses(losses, stop.requested)
        first = state.step - len(losses)
        for k, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise diverged(loss, first + k)
            row = {"step": first + k, "loss": loss, "lr": tcfg.lr_at(first + k)}
            state.metrics.append(row)
            unsaved.append(row)
        bar.update(len(losses))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)

    def diverged(loss: float, step: int) -> Diverged:
        kept = f"the checkpoint at step {last_good} is kept" if last_good is not None else \
            "no checkpoint had been saved yet"
        return Diverged(f"the loss became {loss} at step {step}; training stopped and {kept}; "
                        "lower --lr (or --lr-decay-to) and train again")

    def checkpoint() -> None:
        """Save, but only parameters that are healthy: finite, with a finite loss on a probe
        batch (the last update may have broken them even though the losses so far were fine)."""
        nonlocal unsaved, last_good
        flush()
        if resumed and state.step == state.start_step:
            return  # nothing new: the checkpoint on disk is this very state
        probe = spec.forward(state.params, X[:probe_size], Y[:probe_size], keep_cache=False).loss.item()
        if not (math.isfinite(probe) and all(torch.isfinite(p).all() for p in state.params.values())):
            raise diverged(probe, state.step)
        optimizer_state = stepper.optimizer.state()  # on every rank: with --zero a collective
        if writer:
            save_progress(state, unsaved, optimizer_state)
        unsaved = []
        last_good = state.step

    try:
        quiet = group is not None and not group.is_writer  # one rank speaks for the group
        with StopFlag(log=(lambda text: None) if quiet else None, group=group is not None) as stop, \
                torch.no_grad():  # no graph: hand-written
            while state.step < tcfg.steps and not (agreed_stop if group else stop.requested):
                i = state.step
                limit = next_stop(i, tcfg.steps, periods)
                before = None
                if opts.diag_every:  # stop before the step whose update is recorded, run it alone
                    k = next_diag(i, opts.diag_every)
                    if k == i:
                        before = views(flat.clone(), state.params)
                    limit = min(limit, k if k > i else i + 1)
                if i < opts.check_grads and group is None:
                    check_step(stepper, runner, state, X, Y, dropout, i)
                else:
                    state.step = i + runner.advance(i, limit)
                lr = tcfg.lr_at(state.step - 1)
                if state.step % FLUSH_EVERY == 0:
                    flush()
                if before is not None:
                    flush()
                    state.metrics[-1]["ud"] = update_to_data(before, state.params)
                if opts.eval_every and state.step % opts.eval_every == 0:
                    flush()
                    if group is None:
                        val = progress_val_loss(spec, state.model, X, Xva, Yva)
                    else:
                        group.check_same_state(state.step, [flat, *stepper.optimizer.state().values()])
                        val = group_val_loss(group, spec, state.model, X, Xva, Yva)
                    state.metrics[-1]["val_loss"] = val
                    rate = (state.step - s0) / (time.perf_counter() - t0)
                    if writer:
                        bar.write(f"step {state.step:>7}/{tcfg.steps}  loss {state.metrics[-1]['loss']:.4f}"
                              f"  val {val:.4f}  lr {lr:g}  {rate:,.0f} steps/s")
                if opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
                    checkpoint()
            checkpoint()
            stopped = agreed_stop if group else stop.requested
            return "interrupted" if stopped and state.step < tcfg.steps else "done"
    finally:
        bar.close()


def train(state: RunState, opts: Options) -> str:
    outcome = run_loop(state, opts)
    train, val_loss, calibrated = save_model(state, opts.group, opts.exact_train_loss,
                                             None if opts.progress else False)
    if opts.group is None or opts.group.is_writer:
        write_loss_plot(state.workdir / rundir.LOSS_PLOT, state.metrics,
                        f"{state.workdir.name}: {describe(state)}")
    note = " (batchnorm calibrated on the whole training set)" if calibrated else ""
    opts.log(f"step {state.step}: {format_train(train)}, val loss {val_loss:.4f}{note}")
    if outcome == "interrupted":
        opts.log(f"interrupted at step {state.step} of {state.tcfg.steps}; a checkpoint is saved: "
                 f"continue with `backprop-ninja train -o {state.workdir} --resume`")
    return outcome


def progress_val_loss(spec: ModelSpec, params: Params, X: torch.Tensor, Xva: torch.Tensor,
                      Yva: torch.Tensor) -> float:
    with all_threads():
        return evaluate(spec, params, Xva, Yva, calibrate(spec, params, X[:PROGRESS_CALIBRATION]))


def group_val_loss(group, spec: ModelSpec, params: Params, X: torch.Tensor, Xva: torch.Tensor,
                   Yva: torch.Tensor) -> float:
    """``progress_val_loss`` over the group: calibration and evaluation sharded across ranks."""
    with all_threads():
        return group.evaluate(spec, params, Xva, Yva,
                              group.calibrate(spec, params, X[:PROGRESS_CALIBRATION]))
