"""The command's check in a child process that cannot hang, crash or swamp the checker: a time
limit, a memory limit where the OS allows one, the learner's prints captured and cut short, and
anything that ends the child early reported as one line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import learner
from .checker import check
from .exercises import TITLES, check_number
from .grading import CheckResult
from .learner import require_file, same_file

TIME_LIMIT_S = 60.0
# how much memory the learner's code may map beyond what the child has mapped once torch and the
# checker are loaded (~0.6 GiB): far more than any exercise needs, far less than a runaway loop
MEMORY_HEADROOM = 4 * 2**30
OUTPUT_LIMIT = 8_000  # bytes of the learner's prints shown; the rest is counted, not kept
KILL_GRACE_S = 20.0   # past the time limit: for starting Python and torch, and for the dump
CHILD_SCRIPT = ("import sys\n"
                "from backprop_ninja.learning.sandbox import child_main\n"
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
                          f"{learner.MEMORY_NOTE}: look for a tensor far bigger than the batch's",
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
    learner.MEMORY_NOTE = f" (the check lets your code use {headroom / 2**30:.3g} GiB)"
