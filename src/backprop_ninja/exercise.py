"""The learner's side of the four exercises: starter files, and a checker that grades them.

A starter file (``templates/exerciseN.py``) holds the lecture's forward pass, done, and a
``backward`` function whose gradients are blanks. The templates are written as the solution with
each blank's answer fenced between ``# BLANK d<name>: <forward line>`` and ``# END``: the starter
replaces a fence by ``d<name> = None  # TODO: <forward line>``, the solution drops the fences.

The checker imports the learner's file, calls its ``backward`` on the lecture's check batch with
autograd forbidden, and grades each returned gradient against autograd's, in backward order. It
names the first wrong tensor (the ones after it usually inherit its error) and, when it
recognises a classic mistake, says which (see the hints section). Any error in the learner's
file is reported with its line number, never as a traceback of the checker.

Dimension letters: n batch, T block_size, C n_embd, H n_hidden, V vocab size.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import atomic
from . import layers as L
from . import model as M
from .data import Dataset, default_data_path
from .errors import UserError
from .gradcheck import Comparison, approx_equal, compare, format_table, gradient_problem

TITLES = {
    1: "exercise 1: the atomic backward, all 26 tensors",
    2: "exercise 2: the fused cross-entropy backward, dlogits",
    3: "exercise 3: the fused batchnorm backward, dhprebn",
    4: "exercise 4: your backward trains the network",
}
# exercise 4's gradients in the order its backward pass reaches them
EXERCISE4_NAMES = ("W2", "b2", "bngain", "bnbias", "W1", "b1", "C")
BLANK_RE = re.compile(r"^(\s*)# BLANK (d\w+): (.*)$")
END_RE = re.compile(r"^\s*# END\s*$")


# ---------------------------------------------------------------------------------------------
# starter and solution files

def template_text(number: int) -> str:
    check_number(number)
    return (resources.files("backprop_ninja") / "templates" / f"exercise{number}.py").read_text()


def render(text: str, solution: bool) -> str:
    """The starter (each fenced answer replaced by a blank) or the solution (fences dropped)."""
    out: list[str] = []
    in_blank = False
    for line in text.splitlines():
        blank = BLANK_RE.match(line)
        if blank:
            indent, name, forward_line = blank.groups()
            if not solution:
                out.append(f"{indent}{name} = None  # TODO: {forward_line}")
            in_blank = True
        elif END_RE.match(line):
            in_blank = False
        elif solution or not in_blank:
            out.append(line)
    return "\n".join(out) + "\n"


def starter_text(number: int) -> str:
    return render(template_text(number), solution=False)


def solution_text(number: int) -> str:
    return render(template_text(number), solution=True)


def write_starter(number: int, path: str | Path, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pick another file name, "
                        "or pass --force to overwrite it")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; pick a file name for the starter")
    try:
        path.write_text(starter_text(number))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


def check_number(number: int) -> None:
    if number not in TITLES:
        raise UserError(f"there are exercises 1 to 4, not {number}")


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


@dataclass
class Context:
    """What the hints need to recompute the classic mistakes: inputs, forward values, reference."""

    n: int
    Xb: Tensor
    values: dict[str, Tensor]     # forward intermediates and parameters, by name
    ref: dict[str, Tensor]        # autograd's gradients, by name
    got: dict[str, object]        # the learner's returned dict


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


def first_wrong_advice(name: str, ctx: Context, path: Path,
                       alternatives: Callable[[str, Context], list[tuple[Tensor, str]]]) -> str:
    value = ctx.got.get(name)
    if value is None:
        return missing_advice(name, ctx, path)
    problem = gradient_problem(value, ctx.ref[name])
    if problem is not None:
        return f"d{name} {problem}"
    hint = diagnose(name, value, ctx.ref[name], alternatives(name, ctx), ctx)
    return f"hint: {hint}" if hint else \
        f"d{name} differs from autograd's; recheck the local derivative and the chain rule"


def missing_advice(name: str, ctx: Context, path: Path) -> str:
    if name not in ctx.got:
        if f"d{name}" in ctx.got:
            return (f"the returned dict has 'd{name}': key each gradient by the tensor's name "
                    f"without the d, '{name}'")
        return f"the returned dict has no '{name}'; it needs every tensor's name as a key"
    blanks = blank_lines(path)
    if name not in blanks:
        return f"d{name} is None: it must be a tensor of {name}'s shape"
    advice = f"d{name} is still None: fill in the blank at line {blanks[name]}"
    first = min(blanks, key=blanks.get)
    if blanks[first] < blanks[name]:
        advice += f", after the first blank above it, d{first} at line {blanks[first]}"
    return advice


def blank_lines(path: Path) -> dict[str, int]:
    """Line numbers of the blanks still left in the file: ``d<name> = None``, by name."""
    pattern = re.compile(r"^\s*d(\w+)\s*=\s*None\b")
    found: dict[str, int] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        match = pattern.match(line)
        if match:
            found.setdefault(match.group(1), i)
    return found


# ---------------------------------------------------------------------------------------------
# hints: recognising the classic mistakes
#
# A mistake is recognised by recomputing what it would have produced. The reference gradients of
# the tensors above the first wrong one are right (the learner's match them), so e.g. a gradient
# that kept only one branch equals that branch's contribution computed from the reference.

def diagnose(name: str, got: Tensor, ref: Tensor, alternatives: list[tuple[Tensor, str]],
             ctx: Context) -> str | None:
    if got.shape != ref.shape:
        return shape_hint(name, got, ref)
    got = got.detach().to(ref.dtype)
    if not torch.isfinite(got).all():
        return f"d{name} contains nan or inf: look for a division by zero or a log of zero"
    if not got.any() and ref.abs().max() > 1e-6:
        return (f"d{name} is all zeros: was it started with zeros_like and never written, "
                "or multiplied by a gradient that is still zero?")
    for alternative, message in alternatives:
        if approx_equal(got, alternative):
            return message
    if name == "C":
        hint = embedding_hint(got, ref, ctx.Xb)
        if hint:
            return hint
    if got.ndim == 2 and got.shape[0] == got.shape[1] and approx_equal(got, ref.T):
        return TRANSPOSE_HINT
    return factor_hint(name, got, ref, ctx.n)


def shape_hint(name: str, got: Tensor, ref: Tensor) -> str:
    gs, rs = tuple(got.shape), tuple(ref.shape)
    if len(gs) == 2 and gs == rs[::-1]:
        return f"d{name} has shape {list(gs)}, the transpose of {list(rs)}: {TRANSPOSE_HINT}"
    if squeeze_shape(gs) == squeeze_shape(rs):
        values = " (the values are right)" if approx_equal(got.detach().reshape(rs), ref) else ""
        if len(gs) < len(rs):
            return (f"d{name} has shape {list(gs)} but {name} is {list(rs)}{values}: a "
                    "dimension of size 1 was dropped. Sum with keepdim=True; broadcasting would "
                    "hide the missing dim and silently pair up the wrong entries further down")
        return (f"d{name} has shape {list(gs)} but {name} is {list(rs)}{values}: it has an extra "
                f"dimension of size 1; {name} is {len(rs)}-D, so sum without keepdim")
    summed = sum_to_shape(got.detach(), rs)
    if summed is not None:
        dims = broadcast_dims(gs, rs)
        right = " Summing yours over it gives the right answer." if approx_equal(summed, ref) else ""
        return (f"d{name} has shape {list(gs)}, the shape of the broadcast result: {name} "
                f"{list(rs)} was broadcast along dim {dims} in the forward pass, so its gradient "
                f"is a sum over that dim (keeping {name}'s shape).{right}")
    return f"d{name} must have the shape of {name}, {list(rs)}; it has {list(gs)}"


def squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def broadcast_dims(big: tuple[int, ...], small: tuple[int, ...]) -> list[int]:
    """The dims of `big` along which a tensor of shape `small` was broadcast to make `big`."""
    lead = len(big) - len(small)
    pairs = enumerate(zip(big[lead:], small))
    return list(range(lead)) + [lead + i for i, (b, s) in pairs if b != s]


def sum_to_shape(x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """x summed down to `shape` if `shape` broadcasts to x's shape, else None."""
    lead = x.ndim - len(shape)
    if lead < 0 or any(s not in (1, b) for b, s in zip(x.shape[lead:], shape)):
        return None
    dims = broadcast_dims(tuple(x.shape), shape)
    return x.sum(dims, keepdim=True).reshape(shape) if dims else x


TRANSPOSE_HINT = ("a matmul backward is a matmul with a transpose: for out = x @ W, "
                  "dx = dout @ W.T and dW = x.T @ dout (each shape tells you which)")


def factor_hint(name: str, got: Tensor, ref: Tensor, n: int) -> str | None:
    """got = s * ref for a constant s: name the classic ones (sign, 1/n, Bessel's n-1)."""
    if ref.abs().max() < 1e-6:
        return None
    s = ((got * ref).sum() / (ref * ref).sum()).item()
    if not approx_equal(got, s * ref):
        return None
    known = ((-1.0, "the sign is flipped"),
             (n, f"it is n = {n} times too big: the loss is a mean over the batch, so a 1/n "
                 "belongs in it"),
             (1 / n, f"it is n = {n} times too small: the 1/n of the mean is in twice"),
             ((n - 1) / n, bessel_message(name)), (n / (n - 1), bessel_message(name)))
    for value, text in known:
        if abs(s - value) < 1e-3 * abs(value):
            return f"d{name} is the right answer times {s:.4g}: {text}"
    return f"d{name} is the right answer times {s:.4g}: a constant factor is off"


def bessel_message(name: str) -> str:
    return (f"d{name} mixes up n and n-1: the batch variance divides by n-1 (Bessel's "
            "correction), the mean by n; in the fused formula that is the n/(n-1) factor")


def branch_message(name: str, kept: str, lost: str) -> str:
    return (f"d{name} is only the gradient through {kept}: {name} also feeds {lost}. A tensor "
            "used on several branches adds up the gradient of each (+=); an = overwrote one")


def embedding_hint(got: Tensor, ref: Tensor, Xb: Tensor) -> str | None:
    """Rows looked up once right, rows looked up several times wrong: assigned, not accumulated."""
    uses = torch.bincount(Xb.reshape(-1), minlength=ref.shape[0])
    once, many = uses <= 1, uses > 1
    if many.any() and approx_equal(got[once], ref[once]) and not approx_equal(got[many], ref[many]):
        return ("dC is right for the rows of C looked up once and wrong for rows looked up several "
                "times: each lookup adds its gradient to the row (+= in the loop, or index_add_); "
                "an assignment like dC[Xb] = demb keeps only one of them")
    return None


def exception_hint(e: BaseException) -> str | None:
    text = str(e)
    if "NoneType" in text:
        return "a gradient used on this line is still None: fill in the blanks above it first"
    if "cannot be multiplied" in text:
        return TRANSPOSE_HINT
    if "must match the size" in text or "shape" in text and "invalid" in text:
        return "the shapes do not line up: each gradient must have the shape of its tensor"
    if "unexpected keyword argument" in text or "missing" in text and "argument" in text:
        return ("keep the arguments of backward() as the template names them: "
                "the checker passes them by keyword")
    return None


def exercise1_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    v, r, n = ctx.values, ctx.ref, ctx.n
    if name == "counts":
        return [(v["counts_sum_inv"] * r["probs"], branch_message(name, "probs", "counts_sum")),
                (r["counts_sum"].expand_as(v["counts"]),
                 branch_message(name, "counts_sum", "probs"))]
    if name == "logits":
        argmax = F.one_hot(v["logits"].max(1).indices, v["logits"].shape[1])
        return [(argmax * r["logit_maxes"], branch_message(name, "logit_maxes", "norm_logits"))]
    if name == "bndiff":
        return [(v["bnvar_inv"] * r["bnraw"], branch_message(name, "bnraw", "bndiff2")),
                (2 * v["bndiff"] * r["bndiff2"], branch_message(name, "bndiff2", "bnraw"))]
    if name == "bndiff2":
        return [((1.0 / n * r["bnvar"]).expand_as(v["bndiff2"]), bessel_message(name))]
    if name == "hprebn":
        via_mean = (r["bnmeani"] / n).expand_as(v["hprebn"])
        return [(r["bndiff"], branch_message(name, "bndiff", "bnmeani")),
                (via_mean, branch_message(name, "bnmeani", "bndiff")),
                (r["bndiff"] + r["bnmeani"] / (n - 1), bessel_message(name))]
    return []


def exercise2_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    probs = F.softmax(ctx.values["logits"], 1)
    return [(probs / ctx.n, "dlogits is softmax / n: the correct class also needs its -1 "
                            "(the derivative of -log p with respect to its own logit is p - 1)")]


def fused_batchnorm_dx(v: dict[str, Tensor], dhpreact: Tensor, factor: float) -> Tensor:
    n = dhpreact.shape[0]
    xhat = v["bnraw"]
    return v["bngain"] * v["bnvar_inv"] / n * (
        n * dhpreact - dhpreact.sum(0) - factor * xhat * (dhpreact * xhat).sum(0))


def exercise3_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    dhpreact = ctx.ref["hpreact"]
    right = fused_batchnorm_dx(ctx.values, dhpreact, ctx.n / (ctx.n - 1))
    return [(fused_batchnorm_dx(ctx.values, dhpreact, 1.0), bessel_message(name)),
            (right / ctx.values["bngain"], "dhprebn is missing the factor bngain: hpreact is "
                                           "bngain * bnraw + bnbias")]


def exercise4_alternatives(name: str, ctx: Context) -> list[tuple[Tensor, str]]:
    """The Bessel mistake in the fused batchnorm, carried down to W1, b1 and C."""
    if name not in ("W1", "b1", "C"):
        return []
    v = ctx.values
    (dlogits,) = L.cross_entropy_backward(1.0, L.cross_entropy_forward(v["logits"], v["Yb"])[1])
    dhpreact = (1.0 - v["h"] ** 2) * (dlogits @ v["W2"].T)
    dhprebn = fused_batchnorm_dx(v, dhpreact, 1.0)
    dembcat, dW1, db1 = L.linear_backward(dhprebn, L.LinearCache(v["embcat"], v["W1"]))
    emb_cache = L.EmbeddingCache(ctx.Xb, v["C"].shape[0])
    (dC,) = L.embedding_backward(dembcat.view(v["emb"].shape), emb_cache)
    wrong = {"W1": dW1, "b1": db1, "C": dC}[name]
    return [(wrong, f"d{name} is what dhprebn gives with 1 where the fused batchnorm formula has "
                    "n/(n-1): " + bessel_message("hprebn"))]


def passing_notes(ctx: Context, names: tuple[str, ...]) -> list[str]:
    """Exercise 1's max branch is ~0, so leaving it out passes; say so anyway."""
    got_logits, got_norm = ctx.got.get("logits"), ctx.got.get("norm_logits")
    if "logit_maxes" not in names or not all(isinstance(t, Tensor) for t in (got_logits, got_norm)):
        return []
    if got_logits.shape == got_norm.shape and torch.equal(got_logits, got_norm) \
            and approx_equal(got_logits, ctx.ref["logits"]):
        return ["dlogits equals dnorm_logits exactly: the branch through logit_maxes looks "
                "missing. Its gradient is ~0 (softmax does not change when a row is shifted), "
                "so the check passes; add it anyway"]
    return []


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


def exercise4_forward(p: M.Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    """The intermediates of the model's training forward, by the names exercise 4's starter
    file uses (a test keeps that file's forward in step with this)."""
    r = M.forward(p, Xb, Yb)
    bn, embcat = r.cache.bn, r.cache.lin1.x
    return dict(emb=embcat.view(r.cache.emb_shape), embcat=embcat, hprebn=r.hprebn,
                bnmean=bn.stats.mean, bnvar=bn.stats.var, bnvar_inv=bn.var_inv, bnraw=bn.xhat,
                hpreact=bn.gain * bn.xhat + p["bnbias"], h=r.h, logits=r.logits, loss=r.loss)


def check_exercise4(fn: Callable, path: Path, s: atomic.CheckSetup, data: Dataset) -> Grade:
    values = exercise4_forward(s.params, s.Xb, s.Yb)
    ref = atomic.model_autograd_grads(s.params, s.Xb, s.Yb)
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


def train_race(fn: Callable, path: Path, data: Dataset, check_cfg: M.ModelConfig,
               steps: int = 500, lr: float = 0.1, batch_size: int = 32, seed: int = 1,
               tolerance: float = 0.05) -> Race:
    """The same SGD run twice from the same start on the same batches: learner's grads, model's."""
    Xtr, Ytr = data.splits["train"]
    cfg = M.ModelConfig(data.vocab.size, check_cfg.block_size, check_cfg.n_embd, check_cfg.n_hidden)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, Xtr.shape[0], (batch_size,), generator=g) for _ in range(steps)]
    mine, ref = M.init_params(cfg), M.init_params(cfg)
    mine_losses, ref_losses = [], []
    with single_thread():
        for ix in batches:
            step_both(fn, path, mine, ref, Xtr[ix], Ytr[ix], lr, mine_losses, ref_losses)
    return Race(steps, mine_losses, ref_losses, tolerance)


def step_both(fn: Callable, path: Path, mine: M.Params, ref: M.Params, X: Tensor, Y: Tensor,
              lr: float, mine_losses: list[float], ref_losses: list[float]) -> None:
    values = exercise4_forward(mine, X, Y)
    grads = call_learner(fn, path, {"Xb": X, "Yb": Y, **mine, **values})
    for name, p in mine.items():
        if not isinstance(grads.get(name), Tensor) or grads[name].shape != p.shape:
            raise LearnerError(f"during training, backward() returned no gradient of {name}'s "
                               f"shape {list(p.shape)} on a batch other than the check's")
    sgd(mine, grads, lr)
    mine_losses.append(values["loss"].item())
    loss, ref_grads = M.loss_and_grads(ref, X, Y)
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


def sgd(params: M.Params, grads: dict, lr: float) -> None:
    for name, p in params.items():
        p -= lr * grads[name]
