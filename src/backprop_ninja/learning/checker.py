"""The checker of the four exercises: it grades a learner's file against autograd.

A starter file (see ``exercises``) holds the lecture's forward pass, done, and a ``backward``
function whose gradients are blanks. The checker imports the learner's file, calls its
``backward`` on the lecture's check batch with autograd forbidden, and grades each returned
gradient against autograd's, in backward order. It
names the first wrong tensor (the ones after it usually inherit its error) and, when it
recognises a classic mistake, says which (see ``hints``). Any error in the learner's
file is reported with its line number, never as a traceback of the checker.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from ..checking import atomic
from ..checking.gradcheck import Comparison, compare, format_table
from ..checking.models import autograd_param_grads
from ..data import Dataset, default_data_path
from ..errors import UserError
from ..models import mlp
from ..models.base import Params, loss_and_grads
from .exercises import TITLES, check_number
from .hints import (Context, exception_hint, exercise1_alternatives, exercise2_alternatives,
                    exercise3_alternatives, exercise4_alternatives, first_wrong_advice,
                    passing_notes)

# exercise 4's gradients in the order its backward pass reaches them
EXERCISE4_NAMES = ("W2", "b2", "bngain", "bnbias", "W1", "b1", "C")


# ---------------------------------------------------------------------------------------------
# running the learner's code

class LearnerError(Exception):
    """A problem in the learner's file, already phrased for them (with a line number if known).

    ``partial`` holds the gradients their backward had computed when it raised, by tensor name.
    """

    def __init__(self, message: str, partial: dict[str, Tensor] | None = None):
        super().__init__(message)
        self.partial = partial or {}


class AutogradUsed(Exception):
    pass


def load_learner(path: Path) -> ModuleType:
    """Import the learner's file under a fresh module name; errors become LearnerError."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; "
                        "make a starter with: backprop-ninja exercise N --init FILE")
    name = f"backprop_ninja_learner_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the like look their module up here
    try:
        with no_hard_exit():
            spec.loader.exec_module(module)
    except SyntaxError as e:
        text = (e.text or "").rstrip()
        raise LearnerError(f"{path}:{e.lineno}: SyntaxError: {e.msg}" +
                           (f"\n    {text.strip()}" if text else "")) from None
    except (Exception, SystemExit) as e:  # a script's sys.exit() must not end the checker
        raise LearnerError(describe_exception(e, path, "while importing the file")) from None
    finally:
        sys.modules.pop(name, None)
    return module


def learner_function(module: ModuleType, path: Path) -> Callable:
    fn = getattr(module, "backward", None)
    if not callable(fn):
        raise LearnerError(f"{path} has no function backward(...); the checker calls backward() "
                           "(start from: backprop-ninja exercise N --init FILE)")
    return fn


def describe_exception(e: BaseException, path: Path, when: str) -> str:
    """'FILE:LINE: Type: message' at the deepest frame inside the learner's file, plus a hint."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if same_file(f.filename, path)]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    text = f"{where}: {type(e).__name__} {when}: {e}"
    if frames and frames[-1].line:
        text += f"\n    {frames[-1].line.strip()}"
    hint = exception_hint(e)
    return text + (f"\n  hint: {hint}" if hint else "")


def same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def computed_so_far(e: BaseException, path: Path) -> dict[str, Tensor]:
    """The d<name> tensors in the learner's deepest frame when it raised, keyed by name."""
    tb, frame_locals = e.__traceback__, {}
    while tb is not None:
        if same_file(tb.tb_frame.f_code.co_filename, path):
            frame_locals = tb.tb_frame.f_locals
        tb = tb.tb_next
    return {k[1:]: v for k, v in frame_locals.items()
            if k.startswith("d") and isinstance(v, Tensor)}


@contextmanager
def no_hard_exit():
    """os._exit() in the learner's file becomes a SystemExit the checker reports, not its end."""
    def soft_exit(code=0):
        raise SystemExit(f"os._exit({code}) was called")

    saved, os._exit = os._exit, soft_exit
    try:
        yield
    finally:
        os._exit = saved


@contextmanager
def autograd_forbidden():
    """Make any use of autograd raise: the point of the exercises is to do without it."""
    def refuse(*args, **kwargs):
        raise AutogradUsed("autograd was used (backward/grad or a tensor that requires grad); "
                           "compute every gradient by hand with plain tensor ops")

    saved = torch.autograd.backward, torch.autograd.grad, torch.Tensor.backward
    torch.autograd.backward = torch.autograd.grad = torch.Tensor.backward = refuse
    try:
        # autograd saves tensors for backward only while it records a graph
        with torch.autograd.graph.saved_tensors_hooks(refuse, lambda x: x):
            yield
    finally:
        torch.autograd.backward, torch.autograd.grad, torch.Tensor.backward = saved


def call_learner(fn: Callable, path: Path, kwargs: dict[str, Tensor]) -> dict:
    """Call the learner's backward on copies of the inputs, so in-place edits cannot spoil ours."""
    copies = {k: v.clone() for k, v in kwargs.items()}
    try:
        with autograd_forbidden(), no_hard_exit():
            result = fn(**copies)
    except (Exception, SystemExit) as e:
        raise LearnerError(describe_exception(e, path, "in backward()"),
                           computed_so_far(e, path)) from None
    where = f"{path}:{fn.__code__.co_firstlineno}" if hasattr(fn, "__code__") else str(path)
    if not isinstance(result, dict):
        raise LearnerError(f"{where}: backward() returned {type(result).__name__}, expected a dict "
                           "mapping each tensor's name to its gradient, e.g. {\"logits\": dlogits}")
    for value in result.values():
        if isinstance(value, Tensor) and (value.requires_grad or value.grad_fn is not None):
            raise LearnerError(f"{where}: backward() returned a tensor that is part of an "
                               "autograd graph; compute every gradient by hand, without autograd")
    return result


# ---------------------------------------------------------------------------------------------
# grading

@dataclass
class Grade:
    """The graded rows of one exercise, and what to tell the learner about them."""

    title: str
    rows: list[Comparison]
    messages: list[str] = field(default_factory=list)
    extra_ok: bool = True  # exercise 4's training run

    @property
    def ok(self) -> bool:
        return self.extra_ok and all(r.approx for r in self.rows)

    def text(self) -> str:
        n_ok = sum(r.approx for r in self.rows)
        lines = [format_table(self.rows, self.title), *self.messages,
                 f"{n_ok}/{len(self.rows)} gradients match autograd"]
        if self.ok:
            lines.append("all correct: well done")
        return "\n".join(lines)


def grade(title: str, names: tuple[str, ...], ctx: Context, path: Path,
          alternatives: Callable[[str, Context], list[tuple[Tensor, str]]]) -> Grade:
    rows = [compare(name, ctx.got.get(name), ctx.ref[name]) for name in names]
    g = Grade(title, rows)
    wrong = [r for r in rows if not r.approx]
    if wrong:
        first = wrong[0]
        g.messages.append(f"\nfirst wrong: d{first.name} (the rows after it usually inherit its "
                          "error; fix it first)")
        g.messages.append("  " + first_wrong_advice(first.name, ctx, path, alternatives))
    g.messages += [f"note: {m}" for m in passing_notes(ctx, names)]
    return g


def call_and_grade(title: str, names: tuple[str, ...], fn: Callable, path: Path,
                   inputs: dict[str, Tensor], ctx: Context,
                   alternatives: Callable[[str, Context], list[tuple[Tensor, str]]]) -> Grade:
    """Grade what backward returns; if it raises, look for an earlier gradient already wrong
    (a wrong shape often only fails a few lines later)."""
    try:
        ctx.got = call_learner(fn, path, inputs)
    except LearnerError as e:
        ctx.got = e.partial
        wrong = [name for name in names if name in e.partial
                 and not compare(name, e.partial[name], ctx.ref[name]).approx]
        if not wrong:
            raise
        advice = first_wrong_advice(wrong[0], ctx, path, alternatives)
        raise LearnerError(f"{e}\nbefore that line, d{wrong[0]} was already wrong:\n"
                           f"  {advice}") from None
    return grade(title, names, ctx, path, alternatives)


# ---------------------------------------------------------------------------------------------
# the four exercises

@dataclass
class CheckResult:
    text: str
    ok: bool


def check(number: int, path: str | Path, data_path: str | Path | None = None,
          setup: atomic.CheckSetup | None = None, data: Dataset | None = None) -> CheckResult:
    """Grade the learner's file for one exercise; the text is what the command prints.

    ``setup`` (the lecture's check batch) and ``data`` (exercise 4's training data) are built from
    ``data_path`` unless given.
    """
    check_number(number)
    path = Path(path)
    try:
        fn = learner_function(load_learner(path), path)
        setup = setup or atomic.lecture_check_setup(data_path)
        if number == 4:
            data = data or Dataset.load(data_path or default_data_path())
            grade_ = check_exercise4(fn, path, setup, data)
        else:
            grade_ = CHECKS[number](fn, path, setup)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    return CheckResult(grade_.text(), grade_.ok)


def check_exercise1(fn: Callable, path: Path, s: atomic.CheckSetup) -> Grade:
    values, ref = atomic.autograd_reference(s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values}, ref, {})
    inputs = {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}
    return call_and_grade(TITLES[1], atomic.EXERCISE1_NAMES, fn, path, inputs, ctx,
                          exercise1_alternatives)


def check_exercise2(fn: Callable, path: Path, s: atomic.CheckSetup) -> Grade:
    values, ref = atomic.autograd_reference(s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values}, ref, {})
    inputs = {"logits": values["logits"], "Yb": s.Yb}
    return call_and_grade(TITLES[2], ("logits",), fn, path, inputs, ctx, exercise2_alternatives)


def check_exercise3(fn: Callable, path: Path, s: atomic.CheckSetup) -> Grade:
    values, ref = atomic.autograd_reference(s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values}, ref, {})
    inputs = {"hprebn": values["hprebn"], "bngain": s.params["bngain"],
              "bnvar_inv": values["bnvar_inv"], "bnraw": values["bnraw"],
              "dhpreact": ref["hpreact"]}
    return call_and_grade(TITLES[3], ("hprebn",), fn, path, inputs, ctx, exercise3_alternatives)


def exercise4_forward(p: Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The intermediates of the model's training forward, by the names exercise 4's starter
    file uses (a test keeps that file's forward in step with this)."""
    r = mlp.forward(p, Xb, Yb)
    bn, embcat = r.cache.bn, r.cache.lin1.x
    return dict(emb=embcat.view(r.cache.emb_shape), embcat=embcat, hprebn=r.acts["hprebn"],
                bnmean=bn.stats.mean, bnvar=bn.stats.var, bnvar_inv=bn.var_inv, bnraw=bn.xhat,
                hpreact=r.acts["hpreact"], h=r.acts["h"], logits=r.logits, loss=r.loss)


def check_exercise4(fn: Callable, path: Path, s: atomic.CheckSetup, data: Dataset) -> Grade:
    values = exercise4_forward(s.params, s.Xb, s.Yb)
    ref = autograd_param_grads(mlp.SPEC, s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values, "Yb": s.Yb}, ref, {})
    inputs = {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}
    g = call_and_grade(TITLES[4] + "\none batch against autograd:", EXERCISE4_NAMES, fn, path,
                       inputs, ctx, exercise4_alternatives)
    if not g.ok:
        g.messages.append("the training run waits until every gradient above is right")
        return g
    race = train_race(fn, path, data, s.cfg)
    g.extra_ok = race.ok
    g.messages.append(race.text())
    return g


CHECKS = {1: check_exercise1, 2: check_exercise2, 3: check_exercise3}


# ---------------------------------------------------------------------------------------------
# exercise 4: a short training run with the learner's gradients against one with the model's

@dataclass
class Race:
    steps: int
    mine: list[float]
    reference: list[float]
    tolerance: float
    window: int = 100

    def final(self, losses: list[float]) -> float:
        tail = losses[-self.window:]
        return sum(tail) / len(tail)

    @property
    def ok(self) -> bool:
        mine = self.final(self.mine)
        return mine == mine and mine <= self.final(self.reference) + self.tolerance

    def text(self) -> str:
        lines = [f"\ntraining {self.steps} SGD steps (batch 32, lr 0.1) with your gradients and "
                 "with the reference's, same batches:", "  step | your loss | reference"]
        for i in range(0, self.steps, self.steps // 5):
            lines.append(f"  {i:>4} | {self.mine[i]:>9.4f} | {self.reference[i]:>9.4f}")
        lines.append(f"  mean of the last {self.window}: yours {self.final(self.mine):.4f}, "
                     f"reference {self.final(self.reference):.4f}")
        lines.append("your gradients train the network, without autograd" if self.ok else
                     f"your loss does not fall like the reference's (more than {self.tolerance} "
                     "above it): look for a gradient that is right on one batch but not in general")
        return "\n".join(lines)


def train_race(fn: Callable, path: Path, data: Dataset, check_cfg: mlp.Config,
               steps: int = 500, lr: float = 0.1, batch_size: int = 32, seed: int = 1,
               tolerance: float = 0.05) -> Race:
    """The same SGD run twice from the same start on the same batches: learner's grads, model's."""
    Xtr, Ytr = data.splits["train"]
    cfg = mlp.Config(data.vocab.size, check_cfg.block_size, check_cfg.n_embd, check_cfg.n_hidden)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, Xtr.shape[0], (batch_size,), generator=g) for _ in range(steps)]
    mine, ref = (mlp.init(cfg, torch.Generator().manual_seed(mlp.LECTURE_SEED)) for _ in range(2))
    mine_losses, ref_losses = [], []
    with single_thread():
        for ix in batches:
            step_both(fn, path, mine, ref, Xtr[ix], Ytr[ix], lr, mine_losses, ref_losses)
    return Race(steps, mine_losses, ref_losses, tolerance)


def step_both(fn: Callable, path: Path, mine: Params, ref: Params, X: Tensor, Y: Tensor,
              lr: float, mine_losses: list[float], ref_losses: list[float]) -> None:
    values = exercise4_forward(mine, X, Y)
    grads = call_learner(fn, path, {"Xb": X, "Yb": Y, **mine, **values})
    for name, p in mine.items():
        if not isinstance(grads.get(name), Tensor) or grads[name].shape != p.shape:
            raise LearnerError(f"during training, backward() returned no gradient of {name}'s "
                               f"shape {list(p.shape)} on a batch other than the check's")
    sgd(mine, grads, lr)
    mine_losses.append(values["loss"].item())
    loss, ref_grads = loss_and_grads(mlp.SPEC, ref, X, Y)
    sgd(ref, ref_grads, lr)
    ref_losses.append(loss.item())


@contextmanager
def single_thread():
    """Batch-32 tensors are too small to share out: a thread pool only adds waiting (a lot of it
    on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sgd(params: Params, grads: dict, lr: float) -> None:
    for name, p in params.items():
        p -= lr * grads[name]
