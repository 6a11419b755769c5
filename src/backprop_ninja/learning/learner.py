"""Running the learner's code: importing their file and calling their ``backward``, both under
``guard`` (no autograd, no shortcut to the answers), and phrasing whatever goes wrong as a message
for them (with the line it happened at), never as a traceback of the checker.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

from torch import Tensor

from ..errors import UserError
from . import guard
from .hints import Context, exception_hint, first_wrong_advice


class LearnerError(Exception):
    """A problem in the learner's file, already phrased for them (with a line number if known).

    ``partial`` holds the gradients their backward had computed when it raised, by tensor name.
    """

    def __init__(self, message: str, partial: dict[str, Tensor] | None = None):
        super().__init__(message)
        self.partial = partial or {}


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
        with guard.guarded():
            spec.loader.exec_module(module)
            raise_if_refused()
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
    first = guard.tripped()
    if first is not None and not isinstance(e, (RefusedHere, SyntaxError)):
        e = RefusedHere(*first)  # what they did was refused, whatever it raised in the end
    frames = [f for f in traceback.extract_tb(e.__traceback__) if code.owns(f.filename)]
    if isinstance(e, RefusedHere):
        e, frames = e.refused, [f for f in e.stack if code.owns(f.filename)]
    where = code.where(frames[-1].filename, frames[-1].lineno) if frames else str(code)
    if isinstance(e, guard.Refused):  # one line: what was refused and why
        return f"{where}: {type(e).__name__} {when}: {e}"
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


class RefusedHere(Exception):
    """The guard refused something in the learner's code (perhaps in a thread of theirs, or caught
    by them): the refusal and the stack it happened in."""

    def __init__(self, refused: guard.Refused, stack):
        super().__init__(str(refused))
        self.refused, self.stack = refused, stack


def raise_if_refused() -> None:
    """The learner's code ran on after a refusal (it caught it, or its thread did): refuse it."""
    first = guard.tripped()
    if first is not None:
        raise RefusedHere(*first)


def call_learner(fn: Callable, code, kwargs: dict[str, Tensor]) -> dict:
    """Call the learner's backward on copies of the inputs, so in-place edits cannot spoil ours."""
    copies = {k: v.clone() for k, v in kwargs.items()}
    try:
        with guard.guarded():
            result = fn(**copies)
            raise_if_refused()
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
