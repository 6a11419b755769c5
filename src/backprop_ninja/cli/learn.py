"""The learner's commands: ``exercise N --init/--check/--show-solution`` and ``plot``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exercise", help="write the backward pass yourself: a starter file, "
                                        "then a check with hints",
                       description="Exercises 1-4 of the lecture. Start with --init FILE, fill in "
                                   "the blanks, then --check FILE until every row matches.")
    p.add_argument("number", type=int, choices=(1, 2, 3, 4), metavar="N",
                   help="1 atomic backward, 2 fused cross-entropy, 3 fused batchnorm, 4 training")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--init", metavar="FILE",
                        help="write a starter file with blanks to fill in")
    action.add_argument("--check", metavar="FILE", help="grade your file against autograd")
    action.add_argument("--show-solution", action="store_true", help="print the reference solution")
    p.add_argument("--force", action="store_true", help="let --init overwrite an existing file")
    p.add_argument("-i", "--input", default=None,
                   help="line-per-item text file for the check (default: the bundled names.txt)")
    p.set_defaults(func=cmd_exercise)

    p = sub.add_parser("plot",
                       help="pictures: the dlogits of a batch, or a trained run's diagnostics")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = what.add_parser("dlogits", help="dlogits of the lecture's check batch as an image")
    q.add_argument("--out", default="dlogits.png", help="PNG file to write (default: dlogits.png)")
    q.add_argument("-i", "--input", default=None,
                   help="line-per-item text file (default: the bundled names.txt)")
    q.set_defaults(func=cmd_plot_dlogits)
    q = what.add_parser("diagnostics", help="activation and gradient histograms and the "
                                            "update-to-data ratio of a trained run")
    q.add_argument("-o", "--workdir", required=True,
                   help="the run's work directory (from train -o)")
    q.add_argument("--out", default=None,
                   help="PNG file to write (default: WORKDIR/diagnostics.png)")
    q.set_defaults(func=cmd_plot_diagnostics)


def cmd_exercise(args: argparse.Namespace) -> int:
    from ..learning import checker, exercises

    if args.force and not args.init:
        raise UserError("--force only goes with --init FILE")
    if args.show_solution:
        print(exercises.solution_text(args.number), end="")
        return 0
    if args.init:
        path = exercises.write_starter(args.number, args.init, force=args.force)
        print(f"wrote {path}: fill in the blanks (d<name> = None), then run:\n"
              f"  backprop-ninja exercise {args.number} --check {path}")
        return 0
    result = checker.check(args.number, args.check, args.input)
    print(result.text)
    return 0 if result.ok else 1


def cmd_plot_dlogits(args: argparse.Namespace) -> int:
    from ..learning import plots

    out = plots.plot_dlogits(args.out, args.input).path
    print(f"wrote {out}")
    return 0


def cmd_plot_diagnostics(args: argparse.Namespace) -> int:
    from ..learning import plots

    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "diagnostics.png"
    plots.plot_diagnostics(plots.load_run_for_plot(workdir), out)
    print(f"wrote {out}")
    return 0
