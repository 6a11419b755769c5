"""The command's check: the learner's code runs in a child process that cannot hang, crash,
swamp or fool the checker, and the checker grades what it sends back.

The child (``child``) gets its request on a pipe, runs the learner's file under the guard with a
time limit and, on Linux, a memory limit, and writes the tensors their code computed to a file;
this side loads them safely (safetensors, no pickle) and grades them itself (``checker``). The
child's prints are captured and cut short. A timeout, a crash, a kill, an answer missing or
malformed is one line naming the learner's file (and the line running then, when known).

A nanny process stands between the checker and the child, in a session of their own: the
learner's code that signals its parent hits the nanny, and the checker, which sees the nanny
die without reporting, says so in one line. The time limit ends the whole session.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .answer import Unreadable, load_answer
from .checker import Problem, grade_answer, prepare
from .child import CHILD_SCRIPT
from .exercises import TITLES
from .grading import CheckResult
from .learner import LearnerError, same_file

TIME_LIMIT_S = 60.0
# how much memory the learner's code may map beyond what the child has mapped once torch and the
# checker are loaded (~0.6 GiB): far more than any exercise needs, far less than a runaway loop
MEMORY_HEADROOM = 4 * 2**30
OUTPUT_LIMIT = 8_000  # bytes of the learner's prints shown; the rest is counted, not kept
KILL_GRACE_S = 20.0   # past the time limit: for starting Python and torch, and for the dump
# the nanny: starts the child, waits for it and reports its exit status and peak memory on a pipe
# the child never holds
NANNY_SCRIPT = ("import os, subprocess, sys\n"
                "status, request = int(sys.argv[1]), int(sys.argv[2])\n"
                "child = subprocess.Popen(sys.argv[3:], pass_fds=(request,))\n"
                "os.close(request)\n"
                "_, code, usage = os.wait4(child.pid, 0)\n"
                "os.write(status, f'{os.waitstatus_to_exitcode(code)} {usage.ru_maxrss}'.encode())\n")
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
    returncode: int | None  # the child's; None when the nanny died before it could tell
    killed: bool            # by us, past the time limit and the grace
    output: bytes           # the first OUTPUT_LIMIT bytes of what the child printed
    cut: int                # how many more bytes it printed
    peak: int = 0           # the child's peak resident memory, bytes


def check_in_child(number: int, path: str | Path, data_path: str | Path | None = None,
                   timeout: float = TIME_LIMIT_S,
                   memory: int | None = MEMORY_HEADROOM) -> CheckResult:
    """The learner's side of ``checker.check`` in a child process, graded here. A normal run
    gives exactly ``check``'s text; anything else one line."""
    try:
        problem = prepare(number, path, data_path)
    except LearnerError as e:
        return CheckResult(f"{TITLES[number]}\n{e}", False)
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-check-") as tmp:
        tmp = Path(tmp)
        request = {"number": number, "path": str(problem.path), "timeout": timeout,
                   "memory": memory, "names": list(problem.task.names),
                   "inputs": str(write_inputs(problem, tmp / "inputs.safetensors")),
                   "result": str(tmp / secrets.token_hex(8) / "answer.safetensors"),
                   "trace": str(tmp / "trace.txt"), "token": secrets.token_hex(16)}
        Path(request["result"]).parent.mkdir()
        run = run_child(request, timeout + KILL_GRACE_S)
        output = shown_output(run)
        trace_file = Path(request["trace"])
        trace = trace_file.read_text(errors="replace") if trace_file.is_file() else ""
        if run.killed or run.returncode != 0:
            return CheckResult(failure_line(run, request, trace, memory), False, output=output)
        try:
            answer = load_answer(Path(request["result"]), request["token"], problem.task.names)
        except Unreadable as e:
            return CheckResult(f"{problem.path}: the check's child process ended without an "
                               f"answer the checker can read: {e}", False, output=output)
    result = grade_answer(problem, answer)
    result.output = output
    return result


def write_inputs(problem: Problem, path: Path) -> Path:
    """What the learner's backward gets and exercise 4's training plan, for the child."""
    from safetensors.torch import save_file

    tensors = {f"input/{k}": own(v) for k, v in problem.task.inputs.items()}
    metadata = {}
    if problem.plan is not None:
        tensors.update({f"init/{k}": own(v) for k, v in problem.plan.init.items()})
        tensors.update({"plan/X": own(problem.plan.X), "plan/Y": own(problem.plan.Y)})
        metadata["lr"] = repr(problem.plan.lr)
    save_file(tensors, str(path), metadata=metadata)
    return path


def own(t):
    """A tensor with memory of its own (safetensors refuses views of one another)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def run_child(request: dict, deadline: float) -> ChildRun:
    """Start the nanny and through it the child, in a session of their own (so anything they
    start goes down with them); read the output as it comes (a full pipe would block it), send
    the request, and end the session past ``deadline``."""
    request_r, request_w = os.pipe()
    status_r, status_w = os.pipe()
    command = [sys.executable, "-c", NANNY_SCRIPT, str(status_w), str(request_r),
               sys.executable, "-c", CHILD_SCRIPT, str(request_r)]
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=child_environment(),
                                pass_fds=(request_r, status_w),
                                start_new_session=os.name == "posix")
    finally:
        os.close(request_r)
        os.close(status_w)
    with os.fdopen(request_w, "wb") as pipe:
        pipe.write(json.dumps(request).encode("utf-8"))
    reader = OutputReader(proc.stdout)
    killed = False
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        killed = True
    finally:
        end_process_group(proc)
    reader.join()
    with os.fdopen(status_r, "rb") as pipe:
        status = pipe.read().decode("ascii", errors="replace").split()
    returncode, peak = (int(status[0]), int(status[1]) * 1024) if len(status) == 2 else (None, 0)
    return ChildRun(returncode, killed, bytes(reader.head), reader.cut, peak)


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


def failure_line(run: ChildRun, request: dict, trace: str, memory: int | None) -> str:
    """One line for a child that gave no answer: why, and where in the learner's code."""
    where = learner_location(trace, request["path"])
    if run.killed or "Timeout (" in trace:
        return (f"{where}: stopped after {request['timeout']:g} s (the time limit; --timeout to "
                "change it): look for a loop that never ends")
    if run.returncode is None:
        return (f"{where}: your code killed the process that ran it (a signal to its parent?); "
                "the check survived it, but your code must not signal other processes")
    output = run.output.decode("utf-8", errors="replace")
    if run.returncode < 0 and ("bad_alloc" in output or memory and run.peak >= memory):
        return (f"{where}: the check ran out of memory (your code used "
                f"{run.peak / 2**30:.2g} GiB): look for a tensor far bigger than the batch's, or "
                "one that grows in a loop")
    if run.returncode == -getattr(signal, "SIGKILL", 9):
        return (f"{where}: the check was killed by signal 9 (SIGKILL), from outside the checker "
                "or by your code (os.kill?)")
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
