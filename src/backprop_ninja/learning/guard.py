"""What the learner's code may not do while the checker runs it: use autograd, import the
package's own code (it holds the answers), start processes, signal other processes, or end the
process.

``guarded()`` is a context manager for a stretch of learner code (importing their file, calling
their ``backward``, running a notebook's cells); the check's child process enters it once, for
good, before any learner code runs (``forbid_for_good``). Each refusal raises an exception whose
message is one line for the learner, and is remembered (``tripped``), so that code which catches
it, or trips it in a thread of its own, is refused all the same.

What it covers, in every thread: reverse-mode autograd through the engine (``Tensor.backward``,
``torch.autograd.grad`` and ``backward`` however they were imported or captured,
``torch.autograd.functional``, ``torch.func``'s grad, vjp, jacrev and hessian), forward-mode AD
(``torch.autograd.forward_ad``, ``torch.func.jvp`` and ``jacfwd``), a graph's saved tensors in
the running thread; ``import`` and ``importlib.import_module`` of any ``backprop_ninja`` module
but the notebook's API; ``subprocess``, ``os.system``, ``os.fork``, ``os.exec*``,
``os.posix_spawn*``, ``multiprocessing``; ``os.kill`` and ``os.killpg`` of another process;
``os._exit``. It is a tutor's guard, not a prison: code that goes around Python (ctypes), edits
the checker's modules in ``sys.modules``, or copies the solution's text is not caught.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import sys
import sysconfig
import threading
import traceback
from contextlib import contextmanager

import torch

PACKAGE = "backprop_ninja"
# what the learner's code may import from the package: a notebook's install cell imports the
# package, its setup cell the notebook's check (``learning.notebook``)
ALLOWED = ("backprop_ninja", "backprop_ninja.learning", "backprop_ninja.learning.notebook")


class Refused(Exception):
    """The learner's code did what the check forbids; the message is one line for them."""


class AutogradUsed(Refused):
    def __init__(self, message: str = "autograd was used (backward/grad or a tensor that requires "
                                      "grad); compute every gradient by hand with plain tensor "
                                      "ops"):
        super().__init__(message)


class ImportRefused(Refused, ImportError):
    pass


class ProcessRefused(Refused):
    pass


class State:
    """How deep the guard is entered, what it saved, and the first refusal since it was."""

    def __init__(self):
        self.depth = 0
        self.saved: dict = {}
        self.first: tuple[Refused, traceback.StackSummary] | None = None
        self.lock = threading.RLock()


STATE = State()


def refusal(e: Refused) -> Refused:
    """Remember the first refusal with the stack it happened in, then hand it back to raise."""
    with STATE.lock:
        if STATE.depth and STATE.first is None:
            STATE.first = (e, traceback.extract_stack()[:-2])
    return e


def tripped() -> tuple[Refused, traceback.StackSummary] | None:
    """The first refusal since the guard was entered, and where, or None."""
    return STATE.first


def refuse_autograd(*args, **kwargs):
    raise refusal(AutogradUsed())


class RefusingEngine:
    """Stands in for autograd's engine: every route to a backward pass ends in it."""

    def __getattr__(self, name):
        return refuse_autograd


def is_refused_module(name: str) -> bool:
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return False
    return name not in ALLOWED and not name.startswith(ALLOWED[-1] + ".")


def refuse_import(name: str) -> None:
    raise refusal(ImportRefused(
        f"import of {name} refused: while the check runs your code, the package's own modules "
        "(its solutions among them) are off limits; compute the gradients yourself"))


def library_dirs() -> tuple[str, ...]:
    """Where the standard library and installed packages live."""
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) + os.sep
                 for k in ("stdlib", "platstdlib", "purelib", "platlib"))


LIBRARY_DIRS = library_dirs()


def from_learner(frame) -> bool:
    """Whether the import asked for in ``frame`` comes from the learner's code: the innermost
    frame that is not the standard library's or an installed package's (importlib.resources,
    say) is theirs, not the package's own."""
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            return False
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen") or
                os.path.realpath(filename).startswith(LIBRARY_DIRS)):
            return True
        frame = frame.f_back
    return False


def resolve(name: str, module_globals, level: int) -> str:
    if level == 0:
        return name
    package = (module_globals or {}).get("__package__") or ""
    try:
        return importlib.util.resolve_name("." * level + name, package)
    except (ImportError, ValueError):
        return name


def guarded_import(original):
    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        full = resolve(name, globals, level) if level else name
        if full == PACKAGE or full.startswith(PACKAGE + "."):
            wanted = [full] + [f"{full}.{item}" for item in fromlist or () if item != "*"]
            refused = [w for w in wanted if is_refused_module(w)]
            if refused and from_learner(sys._getframe(1)):
                refuse_import(refused[0])
        return original(name, globals, locals, fromlist, level)
    return __import__


def guarded_import_module(original):
    def import_module(name, package=None):
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if is_refused_module(full) and from_learner(sys._getframe(1)):
            refuse_import(full)
        return original(name, package)
    return import_module


def refuse_process(what: str):
    def refuse(*args, **kwargs):
        raise refusal(ProcessRefused(
            f"{what} refused: the check runs your code alone, without starting other programs "
            "(autograd in another process would not be your gradients)"))
    return refuse


def guarded_kill(original, what: str):
    def kill(pid, sig):
        if pid == os.getpid():
            return original(pid, sig)
        raise refusal(ProcessRefused(f"{what}({pid}, {sig}) refused: your code may not signal "
                                     "other processes (the checker among them)"))
    return kill


def quiet_refusals(original):
    """A refusal in the learner's thread is reported once, by the check: no traceback for it."""
    def excepthook(args):
        if not isinstance(args.exc_value, Refused):
            original(args)
    return excepthook


def refuse_exit(code=0):
    raise SystemExit(f"os._exit({code}) was called")


def patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every route the guard closes."""
    import _posixsubprocess  # noqa: the routes subprocess and multiprocessing start programs by
    import subprocess
    from torch._functorch import predispatch
    from torch.autograd import variable

    out = [(variable.Variable, "_execution_engine", RefusingEngine()),
           (predispatch, "_enter_dual_level_impl", refuse_autograd),
           (predispatch, "_make_dual_impl", refuse_autograd),
           (torch._C, "_enter_dual_level", refuse_autograd),
           (builtins, "__import__", guarded_import(builtins.__import__)),
           (importlib, "import_module", guarded_import_module(importlib.import_module)),
           (_posixsubprocess, "fork_exec", refuse_process("starting a program")),
           (subprocess.Popen, "_execute_child", refuse_process("starting a program")),
           (os, "_exit", refuse_exit),
           (threading, "excepthook", quiet_refusals(threading.excepthook)),
           (os, "kill", guarded_kill(os.kill, "os.kill")),
           (os, "killpg", guarded_kill(os.killpg, "os.killpg"))]
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve",
                 "spawnv", "spawnve", "popen"):
        if hasattr(os, name):
            out.append((os, name, refuse_process(f"os.{name}")))
    return out


def saved_tensor(x):
    raise refusal(AutogradUsed())


@contextmanager
def guarded():
    """The learner's code runs inside: every route above refused (re-entrant)."""
    enter()
    try:
        # a graph records the tensors it saves for backward: refuse it as it is built (this
        # thread; the engine refuses a graph built in any other when it is run)
        with torch.autograd.graph.saved_tensors_hooks(saved_tensor, lambda x: x):
            yield
    finally:
        leave()


def enter() -> None:
    with STATE.lock:
        if STATE.depth == 0:
            STATE.first = None
            STATE.saved = {}
            for owner, name, replacement in patches():
                STATE.saved[(owner, name)] = getattr(owner, name)
                setattr(owner, name, replacement)
        STATE.depth += 1


def leave() -> None:
    with STATE.lock:
        STATE.depth -= 1
        if STATE.depth == 0:
            for (owner, name), original in STATE.saved.items():
                setattr(owner, name, original)
            STATE.saved = {}


def forbid_for_good() -> None:
    """For the check's child process: the guard on from now until the process ends."""
    enter()
    torch.autograd.graph.saved_tensors_hooks(saved_tensor, lambda x: x).__enter__()
