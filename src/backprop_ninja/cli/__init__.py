"""The command line: ``backprop-ninja <command>``. Each command lives in one module of this
package, which adds its subparser with ``register``; ``COMMANDS`` lists them all, in help order."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import check, check_layer, learn, plot, train

COMMANDS = (train, check, check_layer, learn, plot)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="backprop-ninja",
        description="makemore with hand-written backward passes, proven against autograd")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


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
    except PermissionError as e:  # the file system said no: name the file, not a traceback
        print(f"backprop-ninja: error: {permission_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backprop-ninja: interrupted", file=sys.stderr)
        return 130


def permission_message(e: PermissionError) -> str:
    import os

    path = e.filename
    if path is None:
        return f"permission denied ({e}); check the permissions of the files the command uses"
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return (f"cannot read {path} (permission denied); make it readable by you "
                "(chmod u+r, or ask its owner) or pass another file")
    return (f"cannot write {path} (permission denied); use a place you can write to, "
            "e.g. another -o WORKDIR")
