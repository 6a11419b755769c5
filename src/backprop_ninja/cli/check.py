"""``backprop-ninja check [--type NAME]``: every hand-written gradient of a model against autograd
and float64 finite differences; for the lecture's MLP, exercises 1-3 as well."""

from __future__ import annotations

import argparse

from ..errors import UserError
from . import catalog
from .flags import add_model_flags, model_flags

CHECK_SEED = 2147483647


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from .. import models
    from ..checking import atomic
    from ..checking.gradcheck import format_table, tables_to_json
    from ..checking.models import FD_TOLERANCE, check_model
    from ..data import Dataset, default_data_path

    # the lecture's exercises 1-3, for the model they are about: (setup, report) makers by type
    LECTURE = {"mlp": (atomic.lecture_check_setup, atomic.run_check)}
    spec = models.get(args.type)
    flags = model_flags(args, spec)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    tables, lines = {}, []
    if spec.name in LECTURE:
        make_setup, run = LECTURE[spec.name]
        if flags["n_hidden"] is None:
            flags["n_hidden"] = 64  # the lecture checks with 64 hidden units
    probe = spec.make_config(1, flags)
    if spec.name in LECTURE:
        setup = make_setup(args.input, batch_size=args.batch_size,
                           **{k: v for k, v in flags.items() if v is not None})
        report = run(setup)
        tables.update(report.tables)
        n_exact = sum(r.exact for r in report.tables["exercise1"])
        lines.append(f"loss at initialisation: {report.loss:.4f}  (lecture: 3.3377; same batch, "
                     "its bngain/bnbias came from an unseeded RNG)\n")
        cfg, params, Xb, Yb = setup.cfg, setup.params, setup.Xb, setup.Yb
        titles = {"exercise1": f"exercise 1: atomic backward, {n_exact}/26 bit-exact",
                  "exercise2": "exercise 2: fused cross-entropy backward",
                  "exercise3": "exercise 3: fused batchnorm backward"}
    else:
        data = Dataset.load(args.input or default_data_path(), block_size=spec.block_size(probe),
                            layout=spec.layout)
        cfg = spec.config_for_data(flags, data.vocab.size, data.block_size)
        Xtr, Ytr = data.splits["train"]
        ix = torch.randint(0, Xtr.shape[0], (args.batch_size,),
                           generator=torch.Generator().manual_seed(CHECK_SEED))
        params, Xb, Yb, titles = None, Xtr[ix], Ytr[ix], {}
    result = check_model(spec, cfg, Xb, Yb, params)
    tables["model"] = result.rows
    titles["model"] = f"{spec.name}: the full backward, per parameter, float32 vs autograd"
    ok = result.ok and all(r.approx for rows in tables.values() for r in rows)
    if args.json:
        print(tables_to_json(tables, loss_at_init=result.loss, ok=ok,
                             finite_differences=result.fd_errors,
                             finite_differences_config=vars(result.fd_config)))
        return 0 if ok else 1
    lines.append(f"{spec.name}: {sum(p.numel() for p in result.params.values()):,} parameters, "
                 f"batch {Xb.shape[0]}, loss {result.loss:.4f}\n")
    for key, rows in tables.items():
        lines.append(format_table(rows, titles[key]) + "\n")
    lines.append(f"float64 finite differences on a tiny {spec.name} ({fd_config_text(result.fd_config)}),"
                 f" relative error per parameter (must be <= {FD_TOLERANCE:g}):")
    width = max(len(k) for k in result.fd_errors)
    lines += [f"  {k:<{width}}  {e:.2e}" for k, e in result.fd_errors.items()]
    lines.append("\nall gradients match autograd and finite differences" if ok else
                 "\nSOME GRADIENTS DO NOT MATCH")
    print("\n".join(lines))
    return 0 if ok else 1


def fd_config_text(cfg) -> str:
    return ", ".join(f"{k} {v}" for k, v in vars(cfg).items())


def register(sub) -> None:
    p = sub.add_parser("check", help="check every hand-written gradient of a model against "
                                     "autograd and finite differences")
    p.add_argument("--type", default=catalog.DEFAULT, metavar="NAME",
                   help=f"model type: {catalog.types()} (default {catalog.DEFAULT}: the "
                        "lecture's check, with exercises 1-3)")
    p.add_argument("-i", "--input", default=None,
                   help="line-per-item text file (default: the bundled names.txt)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (lecture: 32)")
    add_model_flags(p, "(default: the model's; 64 hidden units for the lecture's MLP check)")
    p.add_argument("--json", action="store_true", help="print the tables as one JSON object")
    p.set_defaults(func=cmd_check)
