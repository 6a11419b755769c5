"""``backprop-ninja check-layer FILE.py[:NAME] --shapes "x=32x64,w=64x128"``: a gradient check
for anyone's hand-written backward that says what is wrong. torch and the engine are imported in
the command itself, so that ``--help`` and argument errors do not load them."""

from __future__ import annotations

import argparse

SHAPES_HELP = ("the inputs, in any order, by the forward's parameter names: NAME=AxBxC (a "
               "standard normal tensor), NAME=AxB:pos (uniform in [0.5, 2): for log, sqrt), "
               "NAME=A:int<K (integers in [0, K): indices), NAME=scalar; e.g. "
               "\"x=32x64,w=64x128,b=128\"")


def cmd_check_layer(args: argparse.Namespace) -> int:
    from ..checking.layer import check_layer
    from ..checking.layer_adapt import load_layer, make_inputs, parse_shapes
    from ..errors import UserError

    shapes = parse_shapes(args.shapes)
    layer, reference = load_layer(args.layer, args.reference)
    unknown = [k for k in shapes if layer.params is not None and k not in layer.params]
    if unknown:
        raise UserError(f"--shapes: {layer.name} has no parameter '{unknown[0]}' (its "
                        f"parameters: {', '.join(layer.params)})")
    inputs = make_inputs(shapes, seed=args.seed, device=args.device)
    batch = [b.strip() for b in args.batch.split(",") if b.strip()] if args.batch else None
    report = check_layer(layer, inputs, reference, batch=batch, seed=args.seed)
    print(report.json() if args.json else report.text())
    return 0 if report.ok else 1


def register(sub) -> None:
    p = sub.add_parser("check-layer", help="check a hand-written backward (an autograd.Function, "
                                           "a forward/backward pair, f and f_backward) and say "
                                           "what is wrong")
    p.add_argument("layer", metavar="FILE.py[:NAME]",
                   help="the file and the layer in it: a torch.autograd.Function subclass, a "
                        "function NAME with NAME_backward(dout, *inputs), or a pair NAME_forward "
                        "-> (out, cache) with NAME_backward(dout, cache); NAME may be left out "
                        "when the file has one layer")
    p.add_argument("--shapes", required=True, help=SHAPES_HELP)
    p.add_argument("--reference", metavar="NAME", default=None,
                   help="a differentiable function in the same file computing the same output: "
                        "autograd of it is an oracle (default: autograd of the forward itself "
                        "where it can follow it, and finite differences)")
    p.add_argument("--batch", metavar="NAMES", default=None,
                   help="the inputs whose dim 0 is the batch, comma-separated (default: every "
                        "input whose dim 0 has the size of the first input's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and dout (default 0)")
    p.add_argument("--device", default="cpu", help="device of the inputs (default cpu)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_check_layer)
