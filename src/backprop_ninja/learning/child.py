"""The check's child process: it runs the learner's file on the inputs the checker sent and
writes back what their code computed, never a verdict (``sandbox`` is the checker's side).

The request comes on a pipe whose descriptor is closed before any learner code runs: where the
inputs are, where to write the answer and the token that marks it as this run's are in no
argument, no environment variable and no open file of the learner's. Before their code runs the
child sets its memory limit and a time limit (faulthandler dumps where it was and exits), and
enters the guard for good (``guard.forbid_for_good``): no autograd, no import of the package's
own code, no programs started, no signals to other processes. The child computes no reference:
the right answers are not in its memory.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

from . import guard, learner
from .answer import Answer, save_answer
from .race import TrainingPlan, complete
from .run import run_exercise

CHILD_SCRIPT = ("import sys\n"
                "from backprop_ninja.learning.child import child_main\n"
                "child_main(int(sys.argv[1]))\n")


def read_request(fd: int) -> dict:
    with os.fdopen(fd, "rb") as pipe:  # closes the descriptor: the learner's code never sees it
        return json.loads(pipe.read().decode("utf-8"))


def load_inputs(path: str) -> tuple[dict, TrainingPlan | None]:
    """The backward's inputs and, for exercise 4, the training plan, from the checker's file."""
    from safetensors import safe_open

    inputs, init, plan_tensors = {}, {}, {}
    with safe_open(path, framework="pt") as f:
        lr = f.metadata().get("lr")
        for key in f.keys():
            group, _, name = key.partition("/")
            {"input": inputs, "init": init, "plan": plan_tensors}[group][name] = f.get_tensor(key)
    plan = TrainingPlan(init, plan_tensors["X"], plan_tensors["Y"], float(lr)) if init else None
    return inputs, plan


def child_main(fd: int) -> None:
    request = read_request(fd)
    inputs, plan = load_inputs(request["inputs"])
    if request["memory"]:
        limit_memory(request["memory"])
    trace = open(request["trace"], "w")
    faulthandler.enable(file=trace)
    faulthandler.dump_traceback_later(request["timeout"], exit=True, file=trace)
    hard_exit = os._exit
    number, path, names = request["number"], Path(request["path"]), tuple(request["names"])
    result, token = Path(request["result"]), request["token"]
    del request
    guard.forbid_for_good()
    try:
        answer = run_exercise(number, path, inputs, names, plan,
                              None if plan is None else lambda g: complete(g, plan.init))
    except MemoryError:  # outside the learner's code, e.g. copying its answer
        answer = Answer(error=f"{path}: ran out of memory{learner.MEMORY_NOTE}: look for a "
                              "tensor far bigger than the batch's")
    save_answer(result, answer, token)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    hard_exit(0)  # threads the learner's code left running end here


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
    learner.MEMORY_NOTE = f" (the check lets your code use {headroom / 2**30:.3g} GiB)"
