"""Exercise 4 as a trainer, for every model of the zoo: SGD with hand-written gradients,
checkpoints that resume exactly.

On the CPU the batches are drawn from the generator that initialised the model, as in the
lecture. Its state is part of every checkpoint, so a run cut into pieces with --resume gives
bit-for-bit the parameters of the same run made straight. On CUDA the batches are drawn a chunk
of steps at a time from generators seeded by the run's seed and the chunk (``cuda_graph``), and a
fused step runs as a CUDA graph per chunk: resumed runs are bit-exact there too.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checking.gradcheck import compare
from ..checking.models import autograd_param_grads
from ..data import Dataset, default_data_path
from ..errors import UserError
from .. import models
from ..models.base import Dropout, ModelSpec, Params, calibrate, evaluate
from . import cuda_graph as G
from . import distill as D
from . import workdir as W
from .optim import OPTIMIZERS, FlatParams, OptimConfig, make_optimizer, model_params, views
from .steps import make_step

# steps between fetches of the loss (one device sync per fetch); on CUDA a chunk of steps, so that
# a chunk's loss slots are read before the next chunk reuses them
FLUSH_EVERY = G.CHUNK
# The val loss logged during training calibrates batchnorm on the first this-many training
# examples (the final figures use all of them): a WaveNet's calibration is a pass over the
# data per batchnorm layer, which over all 182,625 examples would cost as much as ~10k steps.
PROGRESS_CALIBRATION = 32_768


@dataclass(frozen=True)
class TrainConfig:
    """What defines a run's trajectory; all but ``steps`` must match when it is resumed. The
    defaults are each model's recipe (``ModelSpec.recipe``).

    The learning rate: a linear warm-up from 0 over ``warmup_steps``, then ``lr``; with the
    "step" schedule ``lr_decay_to`` from ``lr_decay_step`` on (the lecture's), with "cosine" a
    half cosine from ``lr`` down to ``lr_decay_to`` at ``lr_decay_step``, constant after it.
    """

    steps: int
    batch_size: int
    lr: float
    lr_decay_step: int
    lr_decay_to: float
    seed: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "step"
    dropout: float = 0.0
    ema: float = 0.0
    sam: float = 0.0
    distill: float = 0.0  # the teachers' share of each target (with --teacher; see distill)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.lr_decay_step:
            return self.lr_decay_to
        if self.lr_schedule == "step":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.lr_decay_step - self.warmup_steps)
        return self.lr_decay_to + 0.5 * (self.lr - self.lr_decay_to) * (1 + math.cos(math.pi * progress))

    def optim(self, no_decay: tuple[str, ...] = ()) -> OptimConfig:
        return OptimConfig(self.optimizer, self.weight_decay, ema=self.ema, no_decay=no_decay,
                           sam=self.sam)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        for name in ("steps", "lr_decay_step", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "lr_decay_to"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise UserError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer} is not one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise UserError(f"--dropout must be at least 0 and below 1, got {self.dropout}")
        if not (math.isfinite(self.ema) and 0 <= self.ema < 1):
            raise UserError(f"--ema must be at least 0 and below 1, got {self.ema}: the weight of "
                            "the old average at each step (0.999 averages over ~1000 steps; 0: off)")
        if not (math.isfinite(self.distill) and 0 <= self.distill <= 1):
            raise UserError(f"--distill must be between 0 and 1, got {self.distill}: the teachers' "
                            "share of each target (0.5: half the label, half the teachers)")
        if not (math.isfinite(self.sam) and self.sam >= 0):
            raise UserError(f"--sam must be 0 (off) or more, got {self.sam}: the distance from the "
                            "parameters at which the step takes its gradient (e.g. 0.05)")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule} is not one of {', '.join(SCHEDULES)}")


SCHEDULES = ("step", "cosine")


@dataclass
class Options:
    """How to run: free to change between a run and its resume."""

    grad: str = "fast"
    eval_every: int = 10_000
    checkpoint_every: int = 10_000
    diag_every: int = 1000
    check_grads: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=print)


@dataclass
class RunState:
    workdir: Path
    config: dict
    tcfg: TrainConfig
    spec: ModelSpec
    cfg: object  # the model's config dataclass
    data: Dataset
    params: Params
    generator: torch.Generator
    step: int
    metrics: list[dict]
    # config.json and metrics.jsonl are written at the first checkpoint that adds a step, never
    # before: a resume that fails at once (a bad flag, a diverging first step, Ctrl-C) leaves
    # the run's files as they were
    files_written: bool = False
    start_step: int = 0
    optimizer_state: dict = field(default_factory=dict)  # from the checkpoint, when resumed
    # what the run evaluates and saves as its model: the parameters, or with --ema their average
    model: Params | None = None
    teacher: D.Teacher | None = None  # with --teacher: its predictions on the training examples


class Diverged(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# starting and resuming

def start_run(workdir: Path, input_path: str | None, spec: ModelSpec, cfg_flags: dict,
              tcfg: TrainConfig, split_seed: int, device: str,
              teachers: list[str] | None = None) -> RunState:
    if (workdir / W.CHECKPOINT).exists():
        raise UserError(f"{workdir} already holds a run (at step {checkpoint_step(workdir)}); "
                        "continue it with --resume, or train into another -o WORKDIR")
    if (workdir / W.MODEL).exists():
        raise UserError(f"{workdir} already holds a trained model; train into another -o WORKDIR "
                        "(or delete this one)")
    tcfg.validate()
    if tcfg.dropout and not spec.dropout:
        with_dropout = ", ".join(m.name for m in models.MODELS.values() if m.dropout)
        raise UserError(f"--dropout does not apply to --type {spec.name} (it has no dropout; "
                        f"models with dropout: {with_dropout})")
    teachers = D.records(check_teachers(spec, tcfg, teachers or []))
    path = Path(input_path).resolve() if input_path else None
    block_size = spec.block_size(spec.make_config(1, cfg_flags))
    data = Dataset.load(path or default_data_path(), block_size=block_size, seed=split_seed,
                        layout=spec.layout)
    cfg = spec.config_for_data(cfg_flags, data.vocab.size, data.block_size)
    # As in the lecture, the generator that initialised the model goes on to draw the batches.
    # On a GPU the batches need a generator there: a CUDA one with the same seed.
    init_g = torch.Generator().manual_seed(tcfg.seed)
    params = {k: v.to(device) for k, v in spec.init(cfg, init_g).items()}
    Xtr, Ytr = data.splits["train"]
    with torch.no_grad():  # a model that cannot train on such a batch says so now, in one line
        spec.forward(params, Xtr[:tcfg.batch_size].to(device), Ytr[:tcfg.batch_size].to(device))
    g = init_g if torch.device(device).type == "cpu" else \
        torch.Generator(device=device).manual_seed(tcfg.seed)
    config = make_config(spec, cfg, tcfg, data, path, split_seed)
    teacher = None
    if teachers:
        config["teachers"] = teachers
        teacher = D.load(teachers, tcfg.distill, config["data"], Xtr.to(device))
    return RunState(workdir, config, tcfg, spec, cfg, data, params, g, 0, [], teacher=teacher)


def check_teachers(spec: ModelSpec, tcfg: TrainConfig, teachers: list[str]) -> list[str]:
    """--teacher and --distill go together, on a model whose loss takes soft targets."""
    if teachers and not spec.soft_targets:
        takes = ", ".join(m.name for m in models.MODELS.values() if m.soft_targets)
        raise UserError(f"--teacher does not apply to --type {spec.name} (models that learn from "
                        f"a teacher: {takes})")
    if tcfg.distill and not teachers:
        raise UserError("--distill needs --teacher WORKDIR [WORKDIR ...]: the trained runs whose "
                        "predictions it mixes into the targets")
    if teachers and not tcfg.distill:
        raise UserError("--distill 0 leaves the teachers out of every target; pass a share above 0 "
                        "or drop --teacher")
    return teachers


def make_config(spec: ModelSpec, cfg, tcfg: TrainConfig, data: Dataset, path: Path | None,
                split_seed: int) -> dict:
    sizes = {k: int(x.shape[0]) for k, (x, _) in data.splits.items()}
    return {"format": W.FORMAT, "model": W.model_section(spec, cfg), "train": asdict(tcfg),
            "data": {"input": str(path) if path else None, "sha256": data.sha256,
                     "split_seed": split_seed, "vocab": list(data.vocab.chars),
                     "examples": sizes}}


def resume_run(workdir: Path, input_path: str | None, model_type: str | None, cfg_flags: dict,
               train_flags: dict, split_seed: int | None, device: str,
               teachers: list[str] | None = None) -> RunState:
    """Load a run to continue it. Reads only: nothing in the directory changes until the
    resumed run saves its first new checkpoint."""
    config = W.read_config(workdir)
    if not (workdir / W.CHECKPOINT).exists():
        raise UserError(f"{workdir} has no checkpoint to resume; start the run without --resume")
    spec, cfg = W.model_from_config(config)
    check_same(W.model_section(spec, cfg), {"type": model_type, **cfg_flags})
    tcfg = train_config(config, workdir)  # a field added since the run was made: its default
    check_same(asdict(tcfg), {k: v for k, v in train_flags.items() if k != "steps"})
    check_same(config["data"], {"split_seed": split_seed})
    if train_flags.get("steps") is not None:
        tcfg = replace(tcfg, steps=train_flags["steps"])
    tcfg.validate()
    path = Path(input_path).resolve() if input_path else None
    if path is not None and config["data"].get("sha256") is None \
            and path != W.input_path(config).resolve():  # a run from before the hash was kept
        raise UserError(f"-i {input_path} is not the file this run was trained on "
                        f"({W.input_path(config)}); drop -i to resume, or train into a new -o WORKDIR")
    data = W.load_data(config, path, takes_input=True)  # a moved file is fine if its bytes match
    if path is not None:
        config["data"]["input"] = str(path)
    tensors = W.load_tensors(workdir / W.CHECKPOINT, "start the run without --resume")
    params = {k: v.to(device) for k, v in
              W.check_params(tensors, spec, cfg, workdir / W.CHECKPOINT).items()}
    meta = W.checkpoint_meta(workdir)
    if meta.get("device", "cpu") != torch.device(device).type:
        raise UserError(f"the checkpoint was made on {meta['device']}; resume it with "
                        f"--device {meta['device']}")
    g = torch.Generator(device=device)
    try:
        g.set_state(tensors["rng_state"])
    except (KeyError, RuntimeError):
        raise UserError(f"{workdir / W.CHECKPOINT} has no valid RNG state; train again into a new "
                        "-o WORKDIR") from None
    expected = set(make_optimizer(FlatParams(params), tcfg.optim()).state())
    optimizer_state = {k: v.to(device) for k, v in tensors.items() if k in expected}
    if set(optimizer_state) != expected:
        raise UserError(f"{workdir / W.CHECKPOINT} lacks the optimiser's state "
                        f"({', '.join(sorted(expected - set(optimizer_state)))}); train again into "
                        "a new -o WORKDIR")
    step = int(meta["step"])
    if tcfg.steps < step:
        raise UserError(f"--steps {tcfg.steps} is below the checkpoint's step {step}; pass a total of "
                        f"at least {step} to resume")
    metrics = W.read_metrics(workdir, before_step=step)
    if len(metrics) != step:
        raise UserError(f"{workdir / W.METRICS} is missing steps before the checkpoint's step "
                        f"{step}; train again into a new -o WORKDIR")
    config["train"] = asdict(tcfg)
    recorded = config.get("teachers", [])
    if recorded and not spec.soft_targets:
        raise W.bad_config(workdir / W.CONFIG, f"a {spec.name} cannot have teachers")
    if teachers and [str(Path(t).resolve()) for t in teachers] != [r["workdir"] for r in recorded]:
        raise UserError(f"--teacher {' '.join(teachers)} differs from the run being resumed "
                        f"({' '.join(r['workdir'] for r in recorded) or 'none'}); drop --teacher "
                        "to resume it, or train into a new -o WORKDIR")
    teacher = D.load(recorded, tcfg.distill, config["data"], data.splits["train"][0].to(device)) \
        if recorded else None
    return RunState(workdir, config, tcfg, spec, cfg, data, params, g, step, metrics,
                    start_step=step, optimizer_state=optimizer_state, teacher=teacher)


def train_config(config: dict, workdir: Path) -> TrainConfig:
    """The recorded TrainConfig; fields added since a run was made take their defaults."""
    recorded = config["train"]
    fields = TrainConfig.__dataclass_fields__
    required = {k for k, f in fields.items() if f.default is MISSING}
    kinds = {k: (str,) if isinstance(f.default, str) else (int, float) for k, f in fields.items()}
    if not required <= set(recorded) <= set(fields) or not all(
            isinstance(v, kinds[k]) and not isinstance(v, bool) for k, v in recorded.items()):
        raise W.bad_config(workdir / W.CONFIG, f"the train section needs {sorted(fields)}")
    return TrainConfig(**recorded)


def check_same(recorded: dict, flags: dict) -> None:
    for key, value in flags.items():
        if value is not None and recorded.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value} differs from the run being resumed ({recorded.get(key)}); "
                            f"drop {flag} to resume it, or train into a new -o WORKDIR")


def checkpoint_step(workdir: Path) -> str:
    try:
        return W.checkpoint_meta(workdir)["step"]
    except UserError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# saving

def save_progress(state: RunState, unsaved: list[dict], optimizer_state: dict) -> None:
    """Checkpoint the run; the first time, also write its config and all its metrics so far."""
    if state.files_written:
        W.append_metrics(state.workdir, unsaved)
    else:
        W.write_config(state.workdir, state.config)
        W.write_metrics(state.workdir, state.metrics)
        state.files_written = True
    W.save_checkpoint(state.workdir, state.params, state.generator, state.step, optimizer_state)


def save_model(state: RunState) -> tuple[float, float, int]:
    """Calibrate batchnorm on the whole training set; save the model (with --ema, the averaged
    parameters); return the train and val losses and the number of batchnorm layers calibrated."""
    spec, device = state.spec, next(iter(state.params.values())).device
    params = state.model if state.model is not None else state.params
    Xtr, Ytr = (t.to(device) for t in state.data.splits["train"])
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    with all_threads():
        stats = calibrate(spec, params, Xtr)
        W.save_model(state.workdir, params, stats, state.step)
        return (evaluate(spec, params, Xtr, Ytr, stats),
                evaluate(spec, params, Xva, Yva, stats), len(stats))


# ---------------------------------------------------------------------------------------------
# the loop

class StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@torch.no_grad()
def update_to_data(params: Params, grads: Params, lr: float) -> dict[str, float]:
    """log10 of std(lr * grad) / std(param) per parameter: the batchnorm lecture's diagnostic."""
    out = {}
    for name, p in params.items():
        ratio = (lr * grads[name]).std() / p.std().clamp_min(1e-12)
        out[name] = round(float(ratio.clamp_min(1e-30).log10()), 4)
    return out


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
    batches = G.ChunkedBatches(N, tcfg.batch_size, tcfg.seed, device)
    if G.not_capturable(stepper) is None:
        return G.GraphRunner(stepper, batches, tcfg.lr_at)
    return EagerRunner(stepper, batches.indices, tcfg.lr_at)


def describe_runner(stepper) -> str:
    why = G.not_capturable(stepper)
    if why is None:
        return f"the step runs as a CUDA graph of {G.CHUNK} steps"
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
    X, Y = (t.to(device) for t in state.data.splits["train"])
    dropout = Dropout(tcfg.dropout, state.generator) if tcfg.dropout else None
    stepper = make_step(opts.grad, spec, state.params, X, Y, tcfg.batch_size,
                        tcfg.optim(spec.no_decay), dropout, state.teacher)
    if state.optimizer_state:
        stepper.optimizer.load_state(state.optimizer_state)
    state.params = stepper.params
    state.model = model_params(stepper.optimizer)
    runner = make_runner(stepper, state, X.shape[0], device)
    if device.type == "cuda":
        opts.log(f"on {device}: {describe_runner(stepper)}")
    periods = (FLUSH_EVERY, opts.diag_every, opts.eval_every, opts.checkpoint_every)
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    unsaved: list[dict] = []
    bar = tqdm(total=tcfg.steps, initial=state.step, unit="step", file=sys.stderr, mininterval=0.5,
               disable=None if opts.progress else True, dynamic_ncols=True)
    last_good = state.step if (state.workdir / W.CHECKPOINT).exists() else None
    t0, s0 = time.perf_counter(), state.step
    probe_size = max(2, min(X.shape[0], 1024))
    resumed = state.start_step > 0

    def flush() -> None:
        losses = runner.take_losses()
        if not losses:
            return
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
        probe = spec.forward(state.params, X[:probe_size], Y[:probe_size]).loss.item()
        if not (math.isfinite(probe) and all(torch.isfinite(p).all() for p in state.params.values())):
            raise diverged(probe, state.step)
        save_progress(state, unsaved, stepper.optimizer.state())
        unsaved = []
        last_good = state.step

    try:
        with StopFlag() as stop, torch.no_grad():  # no graph: the gradients are hand-written
            while state.step < tcfg.steps and not stop.requested:
                i = state.step
                if i < opts.check_grads:
                    check_step(stepper, runner, state, X, Y, dropout, i)
                else:
                    state.step = i + runner.advance(i, next_stop(i, tcfg.steps, periods))
                lr = tcfg.lr_at(state.step - 1)
                if state.step % FLUSH_EVERY == 0:
                    flush()
                if opts.diag_every and state.step % opts.diag_every == 0:
                    flush()
                    state.metrics[-1]["ud"] = update_to_data(state.params, stepper.grads, lr)
                if opts.eval_every and state.step % opts.eval_every == 0:
                    flush()
                    val = progress_val_loss(spec, state.model, X, Xva, Yva)
                    state.metrics[-1]["val_loss"] = val
                    rate = (state.step - s0) / (time.perf_counter() - t0)
                    bar.write(f"step {state.step:>7}/{tcfg.steps}  loss {state.metrics[-1]['loss']:.4f}"
                              f"  val {val:.4f}  lr {lr:g}  {rate:,.0f} steps/s")
                if opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
                    checkpoint()
            checkpoint()
            return "interrupted" if stop.requested and state.step < tcfg.steps else "done"
    finally:
        bar.close()


def train(state: RunState, opts: Options) -> str:
    outcome = run_loop(state, opts)
    train_loss, val_loss, calibrated = save_model(state)
    W.write_loss_plot(state.workdir / W.LOSS_PLOT, state.metrics,
                    f"{state.workdir.name}: {describe(state)}")
    note = " (batchnorm calibrated on the whole training set)" if calibrated else ""
    opts.log(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}{note}")
    if outcome == "interrupted":
        opts.log(f"interrupted at step {state.step} of {state.tcfg.steps}; a checkpoint is saved: "
                 f"continue with `backprop-ninja train -o {state.workdir} --resume`")
    return outcome


@contextmanager
def all_threads():
    """Every core for the big chunked passes of calibration and evaluation; the step's own
    setting (often one thread, for tiny tensors) comes back afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def progress_val_loss(spec: ModelSpec, params: Params, X: torch.Tensor, Xva: torch.Tensor,
                      Yva: torch.Tensor) -> float:
    with all_threads():
        return evaluate(spec, params, Xva, Yva, calibrate(spec, params, X[:PROGRESS_CALIBRATION]))


def describe(state: RunState) -> str:
    """The model type, its config and the batch, for titles: 'mlp n_hidden 200, ..., batch 32'."""
    fields = ", ".join(f"{k} {v}" for k, v in W.model_section(state.spec, state.cfg).items()
                       if k not in ("type", "vocab_size"))
    return f"{state.spec.name} {fields}{', ' if fields else ''}batch {state.tcfg.batch_size}"


def auto_threads(batch_size: int, params: Params) -> int:
    """One thread for tensors as small as the lecture's (threads cost more than they save there),
    all cores otherwise: judged by the batch times the widest parameter dimension."""
    widest = max(max(p.shape) for p in params.values())
    return 1 if batch_size * widest <= 1 << 16 else (os.cpu_count() or 1)
