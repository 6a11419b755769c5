"""``backprop-ninja plot WHAT``: the dlogits of the lecture's check batch, a trained run's
diagnostics, a transformer's attention maps. Every picture goes through ``plots.figure.save``,
which refuses to replace a file that is not a PNG (``--force`` to do it anyway) and to create
folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .flags import DEFAULT_WORKDIR, add_workdir_flag

MAX_ITEMS = 16


def add_out_flags(q: argparse.ArgumentParser, default: str) -> None:
    q.add_argument("--out", default=None, metavar="FILE.png",
                   help=f"PNG file to write, in an existing folder (default: {default}); an "
                        "existing file that is not a PNG is refused")
    q.add_argument("--force", action="store_true",
                   help="replace --out even when it is an existing file that is not a PNG")


def run_plot(what: argparse._SubParsersAction, name: str, help: str, made_by: str, func
             ) -> argparse.ArgumentParser:
    """A `plot NAME` of a trained run: its work directory and the PNG to write there."""
    q = what.add_parser(name, help=help, description=help)
    add_workdir_flag(q, f"the run's work directory, from {made_by} (default: {DEFAULT_WORKDIR})")
    add_out_flags(q, f"WORKDIR/{name}.png")
    q.set_defaults(func=func)
    return q


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot",
                       help="pictures: the dlogits of a batch, a trained run's diagnostics, "
                            "a transformer's attention")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = what.add_parser("dlogits", help="dlogits of the lecture's check batch as an image")
    add_out_flags(q, "dlogits.png")
    q.add_argument("-i", "--input", default=None,
                   help="line-per-item text file (default: the bundled names.txt)")
    q.set_defaults(func=cmd_plot_dlogits)
    run_plot(what, "diagnostics", "activation and gradient histograms and the update-to-data "
                                  "ratio of a trained run", "train -o", cmd_plot_diagnostics)
    q = run_plot(what, "attention", "the attention maps of a trained transformer on a few "
                                    "validation items, a panel per layer and head",
                 "train --type transformer -o", cmd_plot_attention)
    q.add_argument("--items", type=int, default=2,
                   help=f"how many validation items, 1 to {MAX_ITEMS} (default 2)")


def load(workdir: Path):
    """The run to draw; a note on stderr when it is a checkpoint of an unfinished run."""
    import sys

    from ..plots import runs

    run = runs.load_run_for_plot(workdir)
    if run.note:
        print(run.note, file=sys.stderr)
    return run


def cmd_plot_dlogits(args: argparse.Namespace) -> int:
    from ..plots import dlogits, figure

    out = Path(args.out or "dlogits.png")
    figure.check_target(out, args.force)  # before the work
    dlogits.plot_dlogits(out, args.input, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_plot_diagnostics(args: argparse.Namespace) -> int:
    from ..plots import figure, runs

    workdir = Path(args.out_dir)
    out = Path(args.out) if args.out else workdir / "diagnostics.png"
    figure.check_target(out, args.force)
    runs.plot_diagnostics(load(workdir), out, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_plot_attention(args: argparse.Namespace) -> int:
    if not 1 <= args.items <= MAX_ITEMS:
        raise UserError(f"--items must be between 1 and {MAX_ITEMS}, got {args.items}")
    from ..plots import figure, runs

    workdir = Path(args.out_dir)
    out = Path(args.out) if args.out else workdir / "attention.png"
    figure.check_target(out, args.force)
    runs.plot_attention(load(workdir), out, items=args.items, force=args.force)
    print(f"wrote {out}")
    return 0
