"""The learner's command: ``exercise N --init/--check/--show-solution``.

``--check`` grades in a child process with a time limit (``learning.sandbox.check_in_child``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import UserError
from .catalog import CHECK_TIME_LIMIT_S as TIME_LIMIT_S  # learning.sandbox's, without torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exercise", help="write the backward pass yourself: a starter file, "
                                        "then a check with hints",
                       description="Exercises 1-4 of the lecture and 5-8 on the zoo's layers. "
                                   "Start with --init FILE (a .py, or a .ipynb notebook for "
                                   "Jupyter or Colab), fill in the blanks, then --check FILE "
                                   "until every row matches.")
    p.add_argument("number", type=int, choices=range(1, 9), metavar="N",
                   help="1 atomic backward, 2 fused cross-entropy, 3 fused batchnorm, 4 training, "
                        "5 layer norm, 6 causal self-attention, 7 the WaveNet's batchnorm, "
                        "8 an RNN through time")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--init", metavar="FILE",
                        help="write a starter file with blanks to fill in: FILE.py, or "
                             "FILE.ipynb for a notebook")
    action.add_argument("--check", metavar="FILE",
                        help="grade your file (.py or .ipynb) against autograd")
    p.add_argument("--show-solution", action="store_true",
                   help="print the reference solution; with --init, write the solved file")
    p.add_argument("--force", action="store_true", help="let --init overwrite an existing file")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --check: stop your code after this long (default: "
                        f"{TIME_LIMIT_S:g}); it runs in a process of its own")
    p.add_argument("-i", "--input", default=None,
                   help="line-per-item text file for the check (default: the bundled names.txt)")
    p.set_defaults(func=cmd_exercise)


def cmd_exercise(args: argparse.Namespace) -> int:
    check_exercise_flags(args)
    if args.init:
        return init_exercise(args.number, Path(args.init), args.show_solution, args.force)
    if args.show_solution:
        from ..learning import exercises

        print(exercises.solution_text(args.number), end="")
        return 0
    from ..learning import sandbox

    timeout = TIME_LIMIT_S if args.timeout is None else args.timeout
    result = sandbox.check_in_child(args.number, args.check, args.input, timeout=timeout)
    if result.output:
        print(result.output, end="" if result.output.endswith("\n") else "\n")
    print(result.text)
    return 0 if result.ok else 1


def check_exercise_flags(args: argparse.Namespace) -> None:
    if not (args.init or args.check or args.show_solution):
        raise UserError("say what to do: --init FILE, --check FILE or --show-solution")
    if args.force and not args.init:
        raise UserError("--force only goes with --init FILE")
    if args.show_solution and args.check:
        raise UserError("--show-solution prints the solution, or with --init FILE writes it; "
                        "it does not go with --check")
    if args.timeout is not None and not args.check:
        raise UserError("--timeout only goes with --check FILE")
    if args.timeout is not None and not 0 < args.timeout < math.inf:
        raise UserError(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")


def init_exercise(number: int, path: Path, solution: bool, force: bool) -> int:
    """Write the starter (or solved) file; a notebook when the name ends in .ipynb."""
    from ..learning import exercises

    if path.suffix not in (".py", ".ipynb"):
        raise UserError(f"{path}: --init writes a .py file or a .ipynb notebook (what --check can "
                        f"grade), not {path.suffix or 'a name without a suffix'}; e.g. "
                        f"ex{number}.py or ex{number}.ipynb")
    if path.suffix == ".ipynb":
        from ..learning import notebook_build

        notebook_build.write_notebook(number, path, solution=solution, force=force)
        what = "the solved notebook" if solution else \
            "a notebook for Jupyter or Colab: fill in the cells d<name> = None"
        print(f"wrote {path}, {what}, then run its check cell; or from here:\n"
              f"  backprop-ninja exercise {number} --check {path}")
        return 0
    exercises.write_starter(number, path, force=force, solution=solution)
    what = ", the solution; check it with" if solution else \
        ": fill in the blanks (d<name> = None), then run"
    print(f"wrote {path}{what}:\n  backprop-ninja exercise {number} --check {path}")
    return 0
