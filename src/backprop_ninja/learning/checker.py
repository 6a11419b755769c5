"""The checker of the four exercises: it grades a learner's file against autograd.

A starter file (see ``exercises``) holds the lecture's forward pass, done, and a ``backward``
function whose gradients are blanks. The checker imports the learner's file, calls its
``backward`` on the lecture's check batch with autograd forbidden, and grades each returned
gradient against autograd's, in backward order. It
names the first wrong tensor (the ones after it usually inherit its error) and, when it
recognises a classic mistake, says which (see ``hints``). Any error in the learner's
file is reported with its line number, never as a traceback of the checker.

One grading path serves every way in: ``check`` grades a file in this process (a ``.py``, or a
notebook through ``notebook.check_notebook``); ``check_in_child`` runs that same ``check`` in a
child process with a time and a memory limit, so that a loop that never ends, a crash or a
runaway allocation in the learner's code becomes one line, not a hung or dead checker; and a
notebook's ``check(N, ...)`` grades tensors passed to it (``notebook``) with ``grade_gradients``.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..checking import atomic
from ..checking.gradcheck import Comparison, compare, format_table
from ..checking.models import autograd_param_grads
from ..data import Dataset, default_data_path
from ..errors import UserError
from ..models import mlp
from ..models.base import Params, loss_and_grads
from .exercises import LECTURE, TITLES, check_number
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


@dataclass(frozen=True)
class PyFile:
    """The learner's ``.py`` file, as messages name it: its frames in a traceback, its line
    numbers, and its blanks (``d<name> = None`` lines) for the advice about a missing gradient.
    ``notebook.NotebookCode`` is the same for a notebook's cells."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def owns(self, filename: str) -> bool:
        return same_file(filename, self.path)

    def where(self, filename: str, lineno: int) -> str:
        return f"{self.path}:{lineno}"

    def advice(self, name: str, ctx: Context, names: tuple[str, ...],
               alternatives: Alternatives) -> str:
        return first_wrong_advice(name, ctx, self.path, alternatives)


Alternatives = Callable[[str, Context], list[tuple[Tensor, str]]]


def require_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; "
                        "make a starter with: backprop-ninja exercise N --init FILE")


def load_learner(path: Path) -> ModuleType:
    """Import the learner's file under a fresh module name; errors become LearnerError."""
    require_file(path)
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
        raise LearnerError(describe_exception(e, PyFile(path), "while importing the file")) \
            from None
    finally:
        sys.modules.pop(name, None)
    return module


def learner_function(module: ModuleType, path: Path) -> Callable:
    fn = getattr(module, "backward", None)
    if not callable(fn):
        raise LearnerError(f"{path} has no function backward(...); the checker calls backward() "
                           "(start from: backprop-ninja exercise N --init FILE)")
    return fn


def describe_exception(e: BaseException, code, when: str) -> str:
    """'FILE:LINE: Type: message' at the deepest frame inside the learner's code, plus a hint.

    An exit and running out of memory are one line each: the code line would not help.
    """
    frames = [f for f in traceback.extract_tb(e.__traceback__) if code.owns(f.filename)]
    where = code.where(frames[-1].filename, frames[-1].lineno) if frames else str(code)
    if isinstance(e, SystemExit):
        said = "" if e.code is None else f": {e.code}"
        return (f"{where}: SystemExit {when}{said} (the check needs your code to run to its end: "
                "remove the exit)")
    if out_of_memory(e):
        return (f"{where}: ran out of memory {when}{MEMORY_NOTE}: look for a tensor far bigger "
                "than the batch's, or one that grows in a loop")
    text = f"{where}: {type(e).__name__} {when}: {e}"
    if frames and frames[-1].line:
        text += f"\n    {frames[-1].line.strip()}"
    hint = exception_hint(e)
    return text + (f"\n  hint: {hint}" if hint else "")


# what the memory limit lets the learner's code use, said when it runs out (set by limit_memory)
MEMORY_NOTE = ""


def out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failing (a RuntimeError that says so)."""
    text = str(e)
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text)


def same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def computed_so_far(e: BaseException, code) -> dict[str, Tensor]:
    """The d<name> tensors in the learner's deepest frame when it raised, keyed by name."""
    tb, frame_locals = e.__traceback__, {}
    while tb is not None:
        if code.owns(tb.tb_frame.f_code.co_filename):
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


def call_learner(fn: Callable, code, kwargs: dict[str, Tensor]) -> dict:
    """Call the learner's backward on copies of the inputs, so in-place edits cannot spoil ours."""
    copies = {k: v.clone() for k, v in kwargs.items()}
    try:
        with autograd_forbidden(), no_hard_exit():
            result = fn(**copies)
    except (Exception, SystemExit) as e:
        raise LearnerError(describe_exception(e, code, "in backward()"),
                           computed_so_far(e, code)) from None
    fn_code = getattr(fn, "__code__", None)
    where = code.where(fn_code.co_filename, fn_code.co_firstlineno) \
        if fn_code and code.owns(fn_code.co_filename) else str(code)
    if not isinstance(result, dict):
        raise LearnerError(f"{where}: backward() returned {type(result).__name__}, expected a dict "
                           "mapping each tensor's name to its gradient, e.g. {\"logits\": dlogits}")
    refuse_graph_tensors(result, f"{where}: backward() returned")
    return result


def refuse_graph_tensors(gradients: Mapping, what: str) -> None:
    """A gradient that autograd computed would pass; one still in a graph gives it away."""
    for value in gradients.values():
        if isinstance(value, Tensor) and (value.requires_grad or value.grad_fn is not None):
            raise LearnerError(f"{what} a tensor that is part of an autograd graph; compute "
                               "every gradient by hand, without autograd")


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
        return "\n".join([format_table(self.rows, self.title), *self.after_table()])

    def after_table(self) -> list[str]:
        """The lines under the table (a notebook draws the table itself)."""
        n_ok = sum(r.approx for r in self.rows)
        lines = [*self.messages, f"{n_ok}/{len(self.rows)} gradients match autograd"]
        return lines + (["all correct: well done"] if self.ok else [])


def grade(task: Task, got: Mapping, code) -> Grade:
    ctx = dataclasses.replace(task.ctx, got=dict(got))
    rows = [compare(name, ctx.got.get(name), ctx.ref[name]) for name in task.names]
    g = Grade(task.title, rows)
    wrong = [r for r in rows if not r.approx]
    if wrong:
        first = wrong[0]
        g.messages.append(f"\nfirst wrong: d{first.name} (the rows after it usually inherit its "
                          "error; fix it first)")
        g.messages.append("  " + code.advice(first.name, ctx, task.names, task.alternatives))
    g.messages += [f"note: {m}" for m in passing_notes(ctx, task.names)]
    return g


def call_and_grade(task: Task, fn: Callable, code) -> Grade:
    """Grade what backward returns."""
    try:
        got = call_learner(fn, code, task.inputs)
    except LearnerError as e:
        raise explain_failure(e, task, code) from None
    return grade(task, got, code)


def explain_failure(e: LearnerError, task: Task, code) -> LearnerError:
    """The learner's code raised: if a gradient it had already computed is wrong, say so (a wrong
    shape often only fails a few lines later); otherwise the error as it is."""
    ctx = dataclasses.replace(task.ctx, got=dict(e.partial))
    wrong = [name for name in task.names if name in e.partial
             and not compare(name, e.partial[name], ctx.ref[name]).approx]
    if not wrong:
        return e
    advice = code.advice(wrong[0], ctx, task.names, task.alternatives)
    return LearnerError(f"{e}\nbefore that line, d{wrong[0]} was already wrong:\n  {advice}")


# ---------------------------------------------------------------------------------------------
# the four exercises

@dataclass
class CheckResult:
    """What a check prints (``text``), whether every row matched, the graded rows when there are
    any (a notebook draws them as a table), and what the learner's code printed in a child."""

    text: str
    ok: bool
    grade: Grade | None = None
    output: str = ""

    def __repr__(self) -> str:  # a notebook shows the table already; this only sums it up
        return f"<CheckResult ok={self.ok}: {self.text.splitlines()[-1]}>"


@dataclass
class Task:
    """One exercise on the check batch: the tensors its backward gets, autograd's gradients (in
    ``ctx``), the rows to grade in backward order, and the recognisable mistakes."""

    title: str
    names: tuple[str, ...]
    inputs: dict[str, Tensor]
    ctx: Context
    alternatives: Alternatives


def check(number: int, path: str | Path, data_path: str | Path | None = None,
          setup: atomic.CheckSetup | None = None, data: Dataset | None = None) -> CheckResult:
    """Grade the learner's file (``.py``, or ``.ipynb``: see ``notebook``) for one exercise, in
    this process; the text is what the command prints.

    ``setup`` (the lecture's check batch) and ``data`` (exercise 4's training data) are built from
    ``data_path`` unless given.
    """
    check_number(number)
    path = Path(path)
    if number not in LECTURE:  # the zoo's layers: a problem of their own, no lecture batch
        from .zoo_exercises import check_zoo
        if path.suffix == ".ipynb":
            raise UserError(f"exercise {number} comes as a .py file for now (notebooks are for "
                            f"exercises 1 to 4); start one with: backprop-ninja exercise {number} "
                            "--init FILE.py")
        return check_zoo(number, path)
    if path.suffix == ".ipynb":
        from .notebook import check_notebook
        return check_notebook(number, path, data_path, setup, data)
    try:
        fn = learner_function(load_learner(path), path)
        setup = setup or atomic.lecture_check_setup(data_path)
        if number == 4:
            data = data or Dataset.load(data_path or default_data_path())
        grade_ = grade_function(number, fn, PyFile(path), make_task(number, setup), setup, data)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    return CheckResult(grade_.text(), grade_.ok, grade_)


def grade_function(number: int, fn: Callable, code, task: Task, setup: atomic.CheckSetup,
                   data: Dataset | None) -> Grade:
    """Call the learner's backward on the check batch and grade it; for exercise 4, then train
    with it."""
    g = call_and_grade(task, fn, code)
    if number == 4:
        if not g.ok:
            g.messages.append("the training run waits until every gradient above is right")
            return g
        race = train_race(fn, code, data, setup.cfg)
        g.extra_ok = race.ok
        g.messages.append(race.text())
    return g


def grade_gradients(task: Task, gradients: Mapping, code) -> Grade:
    """Grade gradients computed elsewhere (a notebook's cells) exactly as backward's are."""
    refuse_graph_tensors(gradients, "the gradients passed to check() hold")
    return grade(task, gradients, code)


def make_task(number: int, s: atomic.CheckSetup) -> Task:
    """Exercise ``number`` on setup ``s``: what its backward gets and autograd's answer."""
    if number == 4:
        return exercise4_task(s)
    values, ref = atomic.autograd_reference(s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values}, ref, {})
    if number == 1:
        return Task(TITLES[1], atomic.EXERCISE1_NAMES,
                    {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}, ctx, exercise1_alternatives)
    if number == 2:
        return Task(TITLES[2], ("logits",), {"logits": values["logits"], "Yb": s.Yb}, ctx,
                    exercise2_alternatives)
    inputs = {"hprebn": values["hprebn"], "bngain": s.params["bngain"],
              "bnvar_inv": values["bnvar_inv"], "bnraw": values["bnraw"],
              "dhpreact": ref["hpreact"]}
    return Task(TITLES[3], ("hprebn",), inputs, ctx, exercise3_alternatives)


def exercise4_forward(p: Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The intermediates of the model's training forward, by the names exercise 4's starter
    file uses (a test keeps that file's forward in step with this)."""
    r = mlp.forward(p, Xb, Yb)
    bn, embcat = r.cache.bn, r.cache.lin1.x
    return dict(emb=embcat.view(r.cache.emb_shape), embcat=embcat, hprebn=r.acts["hprebn"],
                bnmean=bn.stats.mean, bnvar=bn.stats.var, bnvar_inv=bn.var_inv, bnraw=bn.xhat,
                hpreact=r.acts["hpreact"], h=r.acts["h"], logits=r.logits, loss=r.loss)


def exercise4_task(s: atomic.CheckSetup) -> Task:
    values = exercise4_forward(s.params, s.Xb, s.Yb)
    ref = autograd_param_grads(mlp.SPEC, s.params, s.Xb, s.Yb)
    ctx = Context(s.Xb.shape[0], s.Xb, {**s.params, **values, "Yb": s.Yb}, ref, {})
    inputs = {"Xb": s.Xb, "Yb": s.Yb, **s.params, **values}
    return Task(TITLES[4] + "\none batch against autograd:", EXERCISE4_NAMES, inputs, ctx,
                exercise4_alternatives)


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


def train_race(fn: Callable, code, data: Dataset, check_cfg: mlp.Config,
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
            step_both(fn, code, mine, ref, Xtr[ix], Ytr[ix], lr, mine_losses, ref_losses)
    return Race(steps, mine_losses, ref_losses, tolerance)


def step_both(fn: Callable, code, mine: Params, ref: Params, X: Tensor, Y: Tensor,
              lr: float, mine_losses: list[float], ref_losses: list[float]) -> None:
    values = exercise4_forward(mine, X, Y)
    grads = call_learner(fn, code, {"Xb": X, "Yb": Y, **mine, **values})
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


# ---------------------------------------------------------------------------------------------
# the command's check: ``check`` in a child process that cannot hang, crash or swamp the caller

TIME_LIMIT_S = 60.0
# how much memory the learner's code may map beyond what the child has mapped once torch and the
# checker are loaded (~0.6 GiB): far more than any exercise needs, far less than a runaway loop
MEMORY_HEADROOM = 4 * 2**30
OUTPUT_LIMIT = 8_000  # bytes of the learner's prints shown; the rest is counted, not kept
KILL_GRACE_S = 20.0   # past the time limit: for starting Python and torch, and for the dump
CHILD_SCRIPT = ("import sys\n"
                "from backprop_ninja.learning.checker import child_main\n"
                "sys.exit(child_main(sys.argv[1]))\n")
FRAME_RE = re.compile(r'^\s*File "(.*)", line (\d+) in ')
SIGNALS = {
    "SIGSEGV": "a segmentation fault",
    "SIGBUS": "a bus error",
    "SIGFPE": "a floating-point exception",
    "SIGILL": "an illegal instruction",
    "SIGABRT": "an abort (os.abort(), or a C library giving up)",
}


@dataclass
class ChildRun:
    returncode: int
    killed: bool       # by us, past the time limit and the grace
    output: bytes      # the first OUTPUT_LIMIT bytes of what the child printed
    cut: int           # how many more bytes it printed


def check_in_child(number: int, path: str | Path, data_path: str | Path | None = None,
                   timeout: float = TIME_LIMIT_S,
                   memory: int | None = MEMORY_HEADROOM) -> CheckResult:
    """``check`` run in a child process with a time limit and (where the OS allows) a memory
    limit, the learner's prints captured and cut short. A timeout, a crash, a kill or the child
    running out of memory comes back as one line naming the learner's file (and the line running
    then, when known); a normal run gives exactly ``check``'s text."""
    check_number(number)
    path = Path(path)
    require_file(path)
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-check-") as tmp:
        result_file, trace_file = Path(tmp) / "result.json", Path(tmp) / "trace.txt"
        request = {"number": number, "path": str(path), "timeout": timeout, "memory": memory,
                   "data": None if data_path is None else str(data_path),
                   "result": str(result_file), "trace": str(trace_file)}
        run = run_child(request, timeout + KILL_GRACE_S)
        output = shown_output(run)
        if result_file.is_file():
            answer = json.loads(result_file.read_text())
            if "user_error" in answer:
                raise UserError(answer["user_error"])
            return CheckResult(answer["text"], answer["ok"], output=output)
        trace = trace_file.read_text(errors="replace") if trace_file.is_file() else ""
        return CheckResult(failure_line(run, request, trace), False, output=output)


def run_child(request: dict, deadline: float) -> ChildRun:
    """Start the child in a session of its own (so anything it starts goes down with it), read
    its output as it comes (a full pipe would block it), and kill it past ``deadline``."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, json.dumps(request)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=child_environment(),
                            start_new_session=os.name == "posix")
    reader = OutputReader(proc.stdout)
    killed = False
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        killed = True
    finally:
        end_process_group(proc)
    reader.join()
    return ChildRun(proc.returncode, killed, bytes(reader.head), reader.cut)


def child_environment() -> dict[str, str]:
    """This package first on the path (the child must grade with the same code), one thread (a
    batch of 32 gains nothing from more), and unbuffered prints (they arrive in order)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONIOENCODING="utf-8")
    return env


def end_process_group(proc: subprocess.Popen) -> None:
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        proc.kill()
    proc.wait()


class OutputReader:
    """Drains a pipe in a thread, keeping its first OUTPUT_LIMIT bytes and counting the rest."""

    def __init__(self, stream):
        self.stream, self.head, self.cut = stream, bytearray(), 0
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        while chunk := self.stream.read1(1 << 16):
            keep = max(0, OUTPUT_LIMIT - len(self.head))
            self.head += chunk[:keep]
            self.cut += len(chunk) - min(keep, len(chunk))

    def join(self) -> None:
        self.thread.join(timeout=10)
        self.stream.close()


def shown_output(run: ChildRun) -> str:
    """What the learner's code printed, and one line for what was cut."""
    text = run.output.decode("utf-8", errors="replace")
    if run.cut:
        text = text[:text.rfind("\n") + 1] if "\n" in text else text + "\n"
        text += (f"[{megabytes(run.cut)} more output cut: print less, e.g. a tensor's .shape "
                 "instead of the tensor]\n")
    return text


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def failure_line(run: ChildRun, request: dict, trace: str) -> str:
    """One line for a child that gave no result: why, and where in the learner's code."""
    where = learner_location(trace, request["path"])
    if run.killed or "Timeout (" in trace:
        return (f"{where}: stopped after {request['timeout']:g} s (the time limit; --timeout to "
                "change it): look for a loop that never ends")
    output = run.output.decode("utf-8", errors="replace")
    if run.returncode == -getattr(signal, "SIGKILL", 9) or run.returncode < 0 and \
            "bad_alloc" in output:
        return (f"{where}: the check was killed (out of memory, or from outside): look for a "
                "tensor far bigger than the batch's, or one that grows in a loop")
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        what = SIGNALS.get(name, "a signal")
        return f"{where}: the check crashed while running your code: {name}, {what}"
    if "Traceback (most recent call last)" in output:
        return (f"{where}: the check itself failed (exit code {run.returncode}; its traceback "
                "is above): please report it")
    return (f"{where}: the check ended (exit code {run.returncode}) before it could grade "
            "anything: does your code end the process?")


def learner_location(trace: str, path: str) -> str:
    """The innermost frame of the learner's file (or notebook cell) in a faulthandler dump, as
    messages name it; the file alone when none is there."""
    for line in trace.splitlines():
        match = FRAME_RE.match(line)
        if not match:
            continue
        filename, lineno = match.groups()
        if filename.startswith(f"{path}, cell "):
            return f"{filename}, line {lineno}"
        if same_file(filename, Path(path)):
            return f"{path}:{lineno}"
    return path


def child_main(argument: str) -> int:
    """The child's side: set the limits, grade, and leave the result in a file (the learner's
    code owns stdout and stderr)."""
    request = json.loads(argument)
    if request["memory"]:
        limit_memory(request["memory"])
    trace = open(request["trace"], "w")
    faulthandler.enable(file=trace)
    faulthandler.dump_traceback_later(request["timeout"], exit=True, file=trace)
    try:
        result = check(request["number"], request["path"], request["data"])
        answer = {"text": result.text, "ok": result.ok}
    except UserError as e:
        answer = {"user_error": str(e)}
    except MemoryError:
        answer = {"text": f"{TITLES[request['number']]}\n{request['path']}: ran out of memory"
                          f"{MEMORY_NOTE}: look for a tensor far bigger than the batch's",
                  "ok": False}
    faulthandler.cancel_dump_traceback_later()
    Path(request["result"]).write_text(json.dumps(answer))
    return 0


def limit_memory(headroom: int) -> None:
    """Cap the address space at what is mapped now plus ``headroom``, where the OS tells the
    first and enforces the second (Linux): a runaway allocation in the learner's code then fails
    as an error the checker reports, instead of swapping the machine or waking the OOM killer."""
    try:
        import resource

        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + headroom
        resource.setrlimit(resource.RLIMIT_AS,
                           (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ImportError, OSError, ValueError):
        return
    global MEMORY_NOTE
    MEMORY_NOTE = f" (the check lets your code use {headroom / 2**30:.3g} GiB)"
