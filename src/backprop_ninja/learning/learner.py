"""Running the learner's code: importing their file, calling their ``backward`` with autograd
forbidden, and phrasing whatever goes wrong as a message for them (with the line it happened at),
never as a traceback of the checker.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import UserError
from .hints import Context, exception_hint, first_wrong_advice


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
