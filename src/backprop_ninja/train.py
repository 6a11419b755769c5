"""Exercise 4 as a trainer: SGD with hand-written gradients, checkpoints that resume exactly.

On the CPU the batches are drawn from the generator that initialised the model, as in the
lecture. Its state is part of every checkpoint, so a run cut into pieces with --resume gives
bit-for-bit the parameters of the same run made straight.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import model as M
from . import workdir as W
from .atomic import model_autograd_grads
from .data import Dataset, default_data_path
from .errors import UserError
from .gradcheck import compare
from .layers import check_batch_size
from .steps import STEPS

FLUSH_EVERY = 100  # steps between fetches of the loss (one device sync per fetch)


@dataclass(frozen=True)
class TrainConfig:
    """What defines a run's trajectory; all but ``steps`` must match when it is resumed."""

    steps: int = 200_000
    batch_size: int = 32
    lr: float = 0.1
    lr_decay_step: int = 100_000
    lr_decay_to: float = 0.01
    seed: int = M.LECTURE_SEED

    def lr_at(self, step: int) -> float:
        return self.lr if step < self.lr_decay_step else self.lr_decay_to

    def validate(self) -> None:
        check_batch_size(self.batch_size)
        for name in ("steps", "lr_decay_step"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "lr_decay_to"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


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
    cfg: M.ModelConfig
    data: Dataset
    params: M.Params
    generator: torch.Generator
    step: int
    metrics: list[dict]
    # config.json and metrics.jsonl are written at the first checkpoint that adds a step, never
    # before: a resume that fails at once (a bad flag, a diverging first step, Ctrl-C) leaves
    # the run's files as they were
    files_written: bool = False
    start_step: int = 0


class Diverged(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# starting and resuming

def start_run(workdir: Path, input_path: str | None, cfg_flags: dict, tcfg: TrainConfig,
              split_seed: int, device: str) -> RunState:
    if (workdir / W.CHECKPOINT).exists():
        raise UserError(f"{workdir} already holds a run (at step {checkpoint_step(workdir)}); "
                        "continue it with --resume, or train into another -o WORKDIR")
    if (workdir / W.MODEL).exists():
        raise UserError(f"{workdir} already holds a trained model; train into another -o WORKDIR "
                        "(or delete this one)")
    tcfg.validate()
    path = Path(input_path).resolve() if input_path else None
    data = Dataset.load(path or default_data_path(), block_size=cfg_flags["block_size"], seed=split_seed)
    cfg = M.ModelConfig(vocab_size=data.vocab.size, **cfg_flags)
    if cfg.n_embd < 1 or cfg.n_hidden < 1:
        raise UserError("--n-embd and --n-hidden must be at least 1")
    # As in the lecture, the generator that initialised the model goes on to draw the batches.
    # On a GPU the batches need a generator there: a CUDA one with the same seed.
    init_g = torch.Generator().manual_seed(tcfg.seed)
    params = M.init_params(cfg, generator=init_g, device=device)
    g = init_g if torch.device(device).type == "cpu" else \
        torch.Generator(device=device).manual_seed(tcfg.seed)
    config = make_config(cfg, tcfg, data, path, split_seed)
    return RunState(workdir, config, tcfg, cfg, data, params, g, 0, [])


def make_config(cfg: M.ModelConfig, tcfg: TrainConfig, data: Dataset, path: Path | None,
                split_seed: int) -> dict:
    sizes = {k: int(x.shape[0]) for k, (x, _) in data.splits.items()}
    return {"format": W.FORMAT, "model": cfg.to_dict(), "train": asdict(tcfg),
            "data": {"input": str(path) if path else None, "sha256": data.sha256,
                     "split_seed": split_seed, "vocab": list(data.vocab.chars),
                     "examples": sizes}}


def resume_run(workdir: Path, input_path: str | None, cfg_flags: dict, train_flags: dict,
               split_seed: int | None, device: str) -> RunState:
    """Load a run to continue it. Reads only: nothing in the directory changes until the
    resumed run saves its first new checkpoint."""
    config = W.read_config(workdir)
    if not (workdir / W.CHECKPOINT).exists():
        raise UserError(f"{workdir} has no checkpoint to resume; start the run without --resume")
    check_same(config["model"], cfg_flags)
    check_same(config["train"], {k: v for k, v in train_flags.items() if k != "steps"})
    check_same(config["data"], {"split_seed": split_seed})
    tcfg = train_config(config, workdir)
    if train_flags.get("steps") is not None:
        tcfg = replace(tcfg, steps=train_flags["steps"])
    tcfg.validate()
    path = Path(input_path).resolve() if input_path else None
    if path is not None and config["data"].get("sha256") is None and path != W.input_path(config).resolve():
        raise UserError(f"-i {input_path} is not the file this run was trained on "
                        f"({W.input_path(config)}); drop -i to resume, or train into a new -o WORKDIR")
    data = W.load_data(config, path, takes_input=True)  # a moved file is fine if its bytes match
    if path is not None:
        config["data"]["input"] = str(path)
    cfg = M.ModelConfig(**config["model"])
    tensors = W.load_tensors(workdir / W.CHECKPOINT, "start the run without --resume")
    params = {k: v.to(device) for k, v in W.check_params(tensors, cfg, workdir / W.CHECKPOINT).items()}
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
    step = int(meta["step"])
    if tcfg.steps < step:
        raise UserError(f"--steps {tcfg.steps} is below the checkpoint's step {step}; pass a total of "
                        f"at least {step} to resume")
    metrics = W.read_metrics(workdir, before_step=step)
    if len(metrics) != step:
        raise UserError(f"{workdir / W.METRICS} is missing steps before the checkpoint's step "
                        f"{step}; train again into a new -o WORKDIR")
    config["train"] = asdict(tcfg)
    return RunState(workdir, config, tcfg, cfg, data, params, g, step, metrics, start_step=step)


def train_config(config: dict, workdir: Path) -> TrainConfig:
    recorded = config["train"]
    fields = TrainConfig.__dataclass_fields__
    if set(recorded) != set(fields) or not all(
            isinstance(recorded[k], (int, float)) and not isinstance(recorded[k], bool) for k in fields):
        raise W.bad_config(workdir / W.CONFIG, f"the train section needs numbers {sorted(fields)}")
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

def save_progress(state: RunState, unsaved: list[dict]) -> None:
    """Checkpoint the run; the first time, also write its config and all its metrics so far."""
    if state.files_written:
        W.append_metrics(state.workdir, unsaved)
    else:
        W.write_config(state.workdir, state.config)
        W.write_metrics(state.workdir, state.metrics)
        state.files_written = True
    W.save_checkpoint(state.workdir, state.params, state.generator, state.step)


def save_model(state: RunState) -> tuple[float, float]:
    """Calibrate batchnorm on the whole training set; save the model; return train/val loss."""
    device = state.params["W1"].device
    Xtr, Ytr = (t.to(device) for t in state.data.splits["train"])
    stats = M.calibrate(state.params, Xtr)
    W.save_tensors(state.workdir / W.MODEL, {**state.params, "bn_mean": stats.mean, "bn_var": stats.var},
                   {"step": str(state.step)})
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    return M.evaluate(state.params, Xtr, Ytr, stats), M.evaluate(state.params, Xva, Yva, stats)


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
def update_to_data(params: M.Params, grads: M.Params, lr: float) -> dict[str, float]:
    """log10 of std(lr * grad) / std(param) per parameter: the batchnorm lecture's diagnostic."""
    out = {}
    for name, p in params.items():
        ratio = (lr * grads[name]).std() / p.std().clamp_min(1e-12)
        out[name] = round(float(ratio.clamp_min(1e-30).log10()), 4)
    return out


def verify_grads(grads: M.Params, reference: M.Params, step: int) -> None:
    for name, ref in reference.items():
        row = compare(name, grads[name], ref)
        if not row.approx:
            raise UserError(f"gradient check failed at step {step}: d{name} differs from autograd "
                            f"(max abs diff {row.maxdiff:.3g}); this is a bug, please report it")


def run_loop(state: RunState, opts: Options) -> str:
    """Train from state.step to tcfg.steps; return 'done' or 'interrupted'. Saves as it goes."""
    tcfg, device = state.tcfg, state.params["W1"].device
    X, Y = (t.to(device) for t in state.data.splits["train"])
    stepper = STEPS[opts.grad](state.params, X, Y, tcfg.batch_size)
    state.params = stepper.params
    ix = torch.empty(tcfg.batch_size, dtype=torch.long, device=device)
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    pending: list[torch.Tensor] = []
    unsaved: list[dict] = []
    bar = tqdm(total=tcfg.steps, initial=state.step, unit="step", file=sys.stderr, mininterval=0.5,
               disable=None if opts.progress else True, dynamic_ncols=True)
    last_good = state.step if (state.workdir / W.CHECKPOINT).exists() else None
    t0, s0 = time.perf_counter(), state.step
    probe_size = max(2, min(X.shape[0], 1024))
    resumed = state.start_step > 0

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        first = state.step - len(pending)
        losses = torch.stack(pending).tolist()
        pending = []
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
        probe = M.forward(state.params, X[:probe_size], Y[:probe_size]).loss.item()
        if not (math.isfinite(probe) and all(torch.isfinite(p).all() for p in state.params.values())):
            raise diverged(probe, state.step)
        save_progress(state, unsaved)
        unsaved = []
        last_good = state.step

    try:
        with StopFlag() as stop, torch.no_grad():  # no graph: the gradients are hand-written
            while state.step < tcfg.steps and not stop.requested:
                i = state.step
                lr = tcfg.lr_at(i)
                torch.randint(0, X.shape[0], (tcfg.batch_size,), generator=state.generator, out=ix)
                reference = model_autograd_grads(state.params, X[ix], Y[ix]) if i < opts.check_grads else None
                pending.append(stepper.step(ix, lr))
                if reference is not None:
                    verify_grads(stepper.grads, reference, i)
                state.step = i + 1
                if state.step % FLUSH_EVERY == 0:
                    flush()
                if opts.diag_every and state.step % opts.diag_every == 0:
                    flush()
                    state.metrics[-1]["ud"] = update_to_data(state.params, stepper.grads, lr)
                if opts.eval_every and state.step % opts.eval_every == 0:
                    flush()
                    val = M.evaluate(state.params, Xva, Yva, M.calibrate(state.params, X))
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
    train_loss, val_loss = save_model(state)
    W.write_loss_plot(state.workdir / W.LOSS_PLOT, state.metrics,
                    f"{state.workdir.name}: n_hidden {state.cfg.n_hidden}, batch {state.tcfg.batch_size}")
    opts.log(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
             f"(batchnorm calibrated on the whole training set)")
    if outcome == "interrupted":
        opts.log(f"interrupted at step {state.step} of {state.tcfg.steps}; a checkpoint is saved: "
                 f"continue with `backprop-ninja train -o {state.workdir} --resume`")
    return outcome


def auto_threads(batch_size: int, n_hidden: int) -> int:
    """One thread for the lecture's tiny tensors (threads cost more than they save), all otherwise."""
    return 1 if batch_size * n_hidden <= 1 << 16 else (os.cpu_count() or 1)
