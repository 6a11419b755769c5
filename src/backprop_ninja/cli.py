"""The command line: ``backprop-ninja <command>``; each command's work lives in its own module."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def cmd_check(args: argparse.Namespace) -> int:
    from . import atomic
    from .gradcheck import format_table, tables_to_json

    if args.n_hidden < 1:
        raise UserError(f"--n-hidden must be at least 1, got {args.n_hidden}")
    setup = atomic.lecture_check_setup(args.input, n_hidden=args.n_hidden, batch_size=args.batch_size)
    report = atomic.run_check(setup)
    if args.json:
        print(tables_to_json(report.tables, loss_at_init=report.loss, ok=report.ok))
    else:
        n_exact = sum(r.exact for r in report.tables["exercise1"])
        print(f"loss at initialisation: {report.loss:.4f}  (lecture: 3.3377; same batch, its "
              "bngain/bnbias came from an unseeded RNG)\n")
        titles = {
            "exercise1": f"exercise 1: atomic backward, {n_exact}/26 bit-exact",
            "exercise2": "exercise 2: fused cross-entropy backward",
            "exercise3": "exercise 3: fused batchnorm backward",
            "model": "model: the full fused backward, per parameter",
        }
        for key, rows in report.tables.items():
            print(format_table(rows, titles[key]) + "\n")
        print("all gradients match autograd" if report.ok else "SOME GRADIENTS DO NOT MATCH AUTOGRAD")
    return 0 if report.ok else 1


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="backprop-ninja",
        description="makemore with hand-written backward passes, proven against autograd")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="check every hand-written gradient against autograd "
                                     "on the lecture's setup")
    p.add_argument("-i", "--input", default=None,
                   help="line-per-item text file (default: the bundled names.txt)")
    p.add_argument("--n-hidden", type=int, default=64, help="hidden units (lecture check: 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (lecture: 32)")
    p.add_argument("--json", action="store_true", help="print the tables as one JSON object")
    p.set_defaults(func=cmd_check)

    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules():
    """Modules that add their own subcommands with ``register(subparsers)``."""
    from . import learn_cli, train_cli
    return [train_cli, learn_cli]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except UserError as e:
        print(f"backprop-ninja: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backprop-ninja: interrupted", file=sys.stderr)
        return 130
