"""The train, eval, sample and bench commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from . import catalog
from .catalog import DISTILL_DEFAULT as DEFAULT_DISTILL
from .flags import DEFAULT_WORKDIR, add_model_flags, add_workdir_flag, model_flags

# torch and the training code are imported by the commands that run, not here: --help and a
# usage error answer without the seconds that importing torch takes

TRAIN_FLAGS = ("steps", "batch_size", "lr", "lr_decay_step", "lr_decay_to", "seed", "optimizer",
               "weight_decay", "warmup_steps", "lr_schedule", "dropout", "ema", "sam", "distill")
SPLIT_SEED = 42
MAX_SAMPLES = 100_000
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> str:
    import torch

    name = name or default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def cmd_train(args: argparse.Namespace) -> int:
    for flag in ("eval_every", "checkpoint_every", "diag_every", "check_grads", "num_samples"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more, got {getattr(args, flag)}")
    if args.num_threads is not None and args.num_threads < 1:
        raise UserError(f"--num-threads must be at least 1, got {args.num_threads}")
    check_seed(args.seed, "--seed")
    if args.grad == "autograd" and args.check_grads:
        raise UserError("--check-grads compares the hand-written gradients with autograd's; with "
                        "--grad autograd it would compare autograd with itself: use --grad fast "
                        "or eager with it")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be above 0 seconds, got {args.timeout:g}")
    from .. import rundir
    from ..training import distributed

    workdir = Path(args.out_dir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"-o {workdir} is a file, not a directory; pass a directory for the run")
    if distributed.in_group_env():  # one rank of a group: started by --nproc or by torchrun
        return train_rank(args)
    if args.zero and (args.nproc is None or args.nproc < 2):
        raise UserError("--zero shards AdamW's moments across processes: train with --nproc 2 "
                        "or more (or under torchrun), or drop --zero")
    if args.nproc is not None:
        distributed.check_nproc(args.nproc)
    with rundir.locked(workdir, resume=args.resume):  # held here for the whole group
        if args.nproc is not None and args.nproc > 1:
            distributed.check_nproc(args.nproc, global_batch(args, workdir))
            check_group_flags(args, run_optimizer(args, workdir))
            resolve_device(args.device)
            return distributed.launch(args, train_rank, args.nproc, args.master_port, args.timeout)
        return train_locked(args, workdir)


def global_batch(args: argparse.Namespace, workdir: Path) -> int:
    """The batch a run will take (the flag, the resumed run's, or the recipe's), to check
    --nproc against before starting any process."""
    from .. import models, rundir

    if args.batch_size is not None:
        return args.batch_size
    if args.resume and (workdir / rundir.CONFIG).exists():
        return int(rundir.read_config(workdir)["train"]["batch_size"])
    return int(models.get(args.type or catalog.DEFAULT).recipe["batch_size"])


def run_optimizer(args: argparse.Namespace, workdir: Path) -> str:
    """The optimiser a run will take (the flag, the resumed run's, or the recipe's)."""
    from .. import models, rundir

    if args.optimizer is not None:
        return args.optimizer
    if args.resume and (workdir / rundir.CONFIG).exists():
        return rundir.read_config(workdir)["train"].get("optimizer", "sgd")
    return models.get(args.type or catalog.DEFAULT).recipe.get("optimizer", "sgd")


def check_group_flags(args: argparse.Namespace, optimizer: str) -> None:
    """What several processes cannot do, said before any starts (and again in each rank)."""
    if args.check_grads:
        raise UserError("--check-grads compares one process's gradients with autograd's; drop it "
                        "with several processes, or check with one")
    if args.grad == "autograd":
        raise UserError("--grad autograd is a one-process reference: over a group, batchnorm's "
                        "statistics are summed outside autograd's graph; train with --grad fast "
                        "or eager")
    if args.zero and optimizer != "adamw":
        raise UserError(f"--zero shards AdamW's moments, and this run's optimiser is {optimizer}, "
                        "which keeps none: drop --zero")


def train_rank(args: argparse.Namespace) -> int:
    """One rank of a data-parallel group (``training.distributed``): joins it, then trains as
    a single process does, on its slice of each global batch. Rank 0 holds the work directory's
    lock under torchrun; under --nproc the launching process holds it."""
    from .. import rundir
    from ..training import distributed

    workdir = Path(args.out_dir)
    check_group_flags(args, run_optimizer(args, workdir))
    device = resolve_device(args.device or (rundir.checkpoint_device(workdir) if args.resume else None))
    group = distributed.join(args.timeout, device, args.backend, args.gloo_loop)
    try:
        if distributed.spawned() or not group.is_writer:
            return train_locked(args, workdir, group)
        with rundir.locked(workdir, resume=args.resume):
            return train_locked(args, workdir, group)
    finally:
        group.close()


def train_locked(args: argparse.Namespace, workdir: Path, group=None) -> int:
    import torch

    from .. import models, rundir
    from ..training import distributed, loop, threads
    from ..training.config import new_config
    from ..training.run import resume_run, start_run

    # a resumed run stays on the device its checkpoint (and its RNG state) was made on
    device = resolve_device(args.device or (rundir.checkpoint_device(workdir) if args.resume else None))
    if group is not None and device == "cuda":
        device = f"cuda:{group.local_rank}"
    log = print if group is None else group.log
    train_flags = {k: getattr(args, k) for k in TRAIN_FLAGS}
    if args.resume:
        spec = rundir.model_from_config(rundir.read_config(workdir))[0]
        state = resume_run(workdir, args.input, args.type, model_flags(args, spec),
                                train_flags, args.split_seed, device, args.teacher)
    else:
        spec = models.get(args.type or catalog.DEFAULT)
        flags = model_flags(args, spec)
        spec.make_config(1, flags)  # a bad flag fails before the data is read
        tcfg = new_config(spec.recipe, train_flags, teachers=bool(args.teacher))
        split_seed = SPLIT_SEED if args.split_seed is None else args.split_seed
        state = start_run(workdir, args.input, spec, flags, tcfg, split_seed, device,
                               args.teacher)
    batch = state.tcfg.batch_size
    if group is not None:
        batch = join_run(state, group, args.zero)
    elif state.config.get("processes", 1) != 1:  # a run of several processes, resumed in one
        log(f"resuming a run of {state.config['processes']} processes with 1: the same global "
            f"batch of {batch}")
        state.config["processes"] = 1
    threads.set_budget(args.num_threads or (group and distributed.default_threads(group.local_world)))
    step_threads = args.num_threads or threads.auto_threads(batch, state.params)
    torch.set_num_threads(step_threads)
    teachers = state.config.get("teachers") or []
    taught = (f"; distilled from {count(len(teachers), 'teacher')} "
              f"({', '.join(t['workdir'] for t in teachers)}), share {state.tcfg.distill:g}"
              if teachers else "")
    log(f"training {rundir.article(spec.name)} {spec.name} of "
          f"{count(sum(p.numel() for p in state.params.values()), 'parameter')} on "
          f"{count(len(state.data.items), 'item')} ({count(state.data.vocab.size, 'symbol')}) "
          f"from step {state.step:,} to {state.tcfg.steps:,}{taught}; gradients: {args.grad}; "
          f"{device}, {count(step_threads, 'thread')}; writing to {workdir}")
    opts = loop.Options(grad=args.grad, eval_every=args.eval_every,
                        checkpoint_every=args.checkpoint_every, diag_every=args.diag_every,
                        check_grads=args.check_grads, progress=not args.no_progress, log=log,
                        group=group, exact_train_loss=args.exact_train_loss, zero=args.zero)
    outcome = loop.train(state, opts)
    if outcome == "interrupted":
        return 130
    if args.num_samples and (group is None or group.is_writer):
        return print_samples(workdir, args.num_samples, seed=None, temperature=1.0, top_k=None,
                             device=device)
    return 0


def join_run(state, group, zero: bool = False) -> int:
    """A rank's part of the run: the global batch shared out, the world size in the config, the
    same code, data, config and update rule (``--zero`` changes every step's collectives) on
    every rank; returns the rank's slice of the batch."""
    from ..training import distributed

    batch = state.tcfg.batch_size
    distributed.check_nproc(group.world, batch)
    before = state.config.get("processes", 1)
    if state.step and before != group.world:
        group.log(f"resuming a run of {before} process(es) with {group.world}: the same global batch "
                  f"of {batch}, {batch // group.world} examples per process")
    state.config["processes"] = group.world
    group.check_same({"config": state.config, "step": state.step, "zero": zero})
    return batch // group.world


def cmd_scaling(args: argparse.Namespace) -> int:
    from ..training import scaling

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    rows = scaling.scaling(args.type, args.steps,
                           log=(lambda s: None) if args.json else print)
    if args.json:
        print(json.dumps(rows))
    return 0


def count(n: int, noun: str) -> str:
    """'1 item', '20,001 items'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def check_seed(seed: int | None, flag: str) -> None:
    """A seed that a torch generator takes (a 64-bit integer)."""
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"{flag} must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}; "
                        "pass a smaller seed")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .. import rundir
    from ..models import memory
    from ..training import threads
    from ..models.base import evaluate
    from ..training.run import format_train, train_loss

    if args.num_threads is not None and args.num_threads < 1:
        raise UserError(f"--num-threads must be at least 1, got {args.num_threads}")
    threads.set_budget(args.num_threads)
    torch.set_num_threads(threads.budget())
    device = resolve_device(args.device)
    run = rundir.load_run(args.out_dir, device, checkpoint=True)
    if run.note:
        print(run.note, file=sys.stderr)
    fits = memory.checker(run.spec, lambda V, T: run.cfg, source="config")
    data = rundir.load_data(run.config, compact=True, check_memory=fits)
    progress = False if args.no_progress else None
    X, Y = (t.to(device) for t in data.splits["train"])
    train = train_loss(run.spec, run.params, X, Y, run.stats, args.exact_train_loss, progress)
    # "train": the exact figure; "train_estimate": a sample's, when the training split is large
    result = {"train": train.loss} if train.exact else {"train_estimate": train.as_dict()}
    for split in ("val", "test"):
        X, Y = (t.to(device) for t in data.splits[split])
        result[split] = evaluate(run.spec, run.params, X, Y, run.stats, progress=progress,
                                 desc=split)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"train {format_train(train).removeprefix('train ')}")
        for split in ("val", "test"):
            print(f"{split:5s} loss {result[split]:.4f}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    check_seed(args.seed, "--seed")
    return print_samples(Path(args.out_dir), args.num_samples, args.seed, args.temperature,
                         args.top_k, resolve_device(args.device))


def print_samples(workdir: Path, num: int, seed: int | None, temperature: float,
                  top_k: int | None, device: str) -> int:
    import torch

    from .. import rundir
    from ..training.sampling import sample_indices

    if not 1 <= num <= MAX_SAMPLES:
        raise UserError(f"-n must be between 1 and {MAX_SAMPLES:,}, got {num}; "
                        "run sample again for more")
    run = rundir.load_run(workdir, device, checkpoint=True)
    if run.note:
        print(run.note, file=sys.stderr)
    items = run.data.items
    g = torch.Generator(device=device)
    g.manual_seed(seed) if seed is not None else g.seed()
    max_len = 2 * max(len(w) for w in items) + 10
    samples = sample_indices(run.spec, run.params, run.stats, run.spec.block_size(run.cfg), num,
                             g, max_len, temperature, top_k)
    texts = [run.vocab.decode(s) for s in samples]
    for text in texts:
        print(text)
    known = set(items)
    new = sum(t not in known for t in texts)
    print(f"{new:,} of {count(num, 'sample')} {'is' if new == 1 else 'are'} new (not in the "
          "training file)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import models
    from ..training import bench

    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.data is not None:
        return cmd_scale(args)
    spec = models.get(args.type)
    device = resolve_device(args.device)
    sizes = bench.SIZES[spec.name][:1] if args.quick else None
    rows = bench.bench(spec, device, sizes=sizes, repeats=args.repeats, memory=not args.no_memory,
                   compile=args.compile, log=(lambda s: None) if args.json else print)
    if args.json:
        print(bench.rows_to_json(rows))
    return 0


def add_exact_train_flag(p) -> None:
    p.add_argument("--exact-train-loss", action="store_true",
                   help="the final train loss over every training row; by default a training "
                        "split of more than 262,144 targets is estimated on a seeded sample of "
                        "about that many (val and test are always exact)")


def cmd_scale(args: argparse.Namespace) -> int:
    from .. import models
    from ..data import load_items
    from ..training import scale

    load_items(args.data)  # a bad file fails here, in one line
    types = args.types or list(models.MODELS)
    for name in types:
        models.get(name)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    result = scale.scale(args.data, types, args.steps, args.exact_train_loss, args.compare,
                         log=(lambda s: None) if args.json else print)
    if args.json:
        print(scale.to_json(result))
    return 0


def register(sub) -> None:
    types = catalog.types()
    p = sub.add_parser("train", help="train a model with hand-written gradients (by default the "
                                     "lecture's MLP with its recipe)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Each type's recipe: the defaults of the flags above that say "
                              "\"the type's recipe\".\n\n" + catalog.recipe_table())
    p.add_argument("--type", default=None, metavar="NAME",
                   help=f"model type: {types} (default {catalog.DEFAULT}; a resumed run keeps its own)")
    p.add_argument("-i", "--input", "--input-file", dest="input", default=None,
                   help="UTF-8 text file, one item per line (default: the bundled names.txt)")
    add_workdir_flag(p, f"work directory for the model, checkpoint and logs (default: {DEFAULT_WORKDIR})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its checkpoint up to --steps in total")
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=None,
                   help="total optimiser steps, SGD or AdamW (default: the type's recipe)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default: the type's recipe)")
    add_model_flags(p, "")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=None,
                   help="learning rate (default: the type's recipe)")
    p.add_argument("--lr-decay-step", type=int, default=None,
                   help="step from which --lr-decay-to is used (default: the type's recipe)")
    p.add_argument("--lr-decay-to", type=float, default=None,
                   help="learning rate after the decay step (default: the type's recipe)")
    p.add_argument("--lr-schedule", choices=("step", "cosine"), default=None,
                   help="step: --lr until --lr-decay-step, then --lr-decay-to; cosine: a half "
                        "cosine from --lr down to --lr-decay-to at --lr-decay-step (default: the "
                        "type's recipe)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear learning-rate warm-up from 0 over this many steps (default: the "
                        "type's recipe)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="update rule, written by hand over flat buffers (default: the type's "
                        "recipe, sgd for the lecture's models, adamw for makemore's)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="decoupled weight decay, as AdamW's (recipe: 0, makemore's 0.01, the "
                        "transformer's 0.2 on its weight matrices and embeddings only)")
    p.add_argument("--dropout", type=float, default=None,
                   help="residual dropout probability in training (transformer only; its recipe "
                        "0.2), its masks reused by the hand-written backward")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the parameters, avg = DECAY avg + "
                        "(1 - DECAY) p after each step, and evaluate, sample and save it as the "
                        "model (recipe: 0, off; 0.9995 for the transformer)")
    p.add_argument("--sam", type=float, default=None, metavar="RHO",
                   help="sharpness-aware minimisation: each update uses the gradient taken RHO "
                        "away from the parameters along the batch's normalised gradient, a second "
                        "forward and backward per step (recipe: 0, off; 0.05 for the transformer)")
    p.add_argument("--teacher", nargs="+", default=None, metavar="WORKDIR",
                   help="distillation: trained runs on the same file and split (any sequence "
                        "model) whose mean predictions are mixed into every target (rnn, gru, "
                        "bow, transformer)")
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="the teachers' share of each target: (1 - ALPHA) onehot(label) + ALPHA "
                        f"teachers (default {DEFAULT_DISTILL} with --teacher)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the initialisation and of batch sampling (default: the type's "
                        f"recipe, {catalog.SEED} for the lecture's models, {catalog.MAKEMORE_SEED} "
                        "for makemore's)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the 80/10/10 item split (default 42)")
    p.add_argument("--eval-every", type=int, default=10_000,
                   help="steps between val-loss measurements (0: never; default 10000)")
    p.add_argument("--checkpoint-every", type=int, default=10_000,
                   help="steps between checkpoints, which eval, sample and plot read while the "
                        "run trains (0: only at the end; default 10000)")
    p.add_argument("--diag-every", type=int, default=1000,
                   help="steps between update-to-data ratio records in metrics.jsonl (0: never; "
                        "default 1000)")
    p.add_argument("--check-grads", type=int, default=0, metavar="N",
                   help="compare the gradients with autograd's during the first N steps "
                        "(default 0)")
    p.add_argument("--grad", choices=("fast", "eager", "autograd"), default="fast",
                   help="gradient route: fast (default, fused hand-written), eager (layer by layer, "
                        "hand-written) or autograd (a reference for checking only)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU threads (default: 1 for small models, all cores for large ones)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--num-samples", type=int, default=10,
                   help="samples to print after training (0: none; default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel training in N local processes (gloo on the CPU, NCCL on "
                        "CUDA, one GPU each); --batch-size stays the global batch. Under torchrun "
                        "leave it out: the ranks come from the environment")
    p.add_argument("--timeout", type=float, default=catalog.GROUP_TIMEOUT_S, metavar="SECONDS",
                   help="with several processes: how long a collective waits for the other ranks "
                        "before the group stops with an error (default %(default)g)")
    p.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help="with --nproc: the port on 127.0.0.1 the ranks meet on (default: a free one)")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="with several processes: gloo (default on the CPU) or nccl (default on CUDA)")
    p.add_argument("--zero", action="store_true",
                   help="with several processes and AdamW: shard its moments across the ranks "
                        "(ZeRO-1), each keeping 1/N of them; the same updates, the same files")
    p.add_argument("--gloo-loop", choices=("normal", "idle"), default="normal",
                   help="with several processes on CPUs: idle puts gloo's event-loop thread under "
                        "SCHED_IDLE, so that no woken thread waits behind its spin: faster on a "
                        "machine that runs nothing else, much slower on a loaded one (README, "
                        "Many processes; default normal)")
    add_exact_train_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("scaling", help="data-parallel scaling: steps/s and examples/s of 1 process "
                                       "x 1 thread, 1 x 2 threads and 2 processes x 1 thread")
    p.add_argument("--type", default=catalog.DEFAULT, metavar="NAME",
                   help=f"model type: {types} (default {catalog.DEFAULT})")
    p.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("eval", help="train/val/test loss of a trained run")
    add_workdir_flag(p, f"the run's work directory (default: {DEFAULT_WORKDIR})")
    p.add_argument("--json", action="store_true",
                   help='print {"train": .., "val": .., "test": ..}; a train loss estimated on a '
                        'sample is "train_estimate": {"loss", "stderr", "items", "of"} instead')
    add_exact_train_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--num-threads", type=int, default=None,
                   help="CPU threads (default: all cores; on a machine shared with other jobs "
                        "one thread can be faster)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to evaluate (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate items from a trained run")
    add_workdir_flag(p, f"the run's work directory (default: {DEFAULT_WORKDIR})")
    p.add_argument("-n", "--num-samples", type=int, default=20, help="how many items (default 20)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k likeliest symbols")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to sample (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="time a model's training step by autograd and by its "
                                     "hand-written routes")
    p.add_argument("--type", default=catalog.DEFAULT, metavar="NAME",
                   help=f"model type: {types} (default {catalog.DEFAULT})")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per route (median reported)")
    p.add_argument("--quick", action="store_true", help="only the model's recipe size")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the eager step (reports its compile time)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="instead: what FILE costs each model at its recipe, each in a fresh "
                        "process: load time, steps/s, final-evaluation and test time, end-to-end "
                        "time and peak memory")
    p.add_argument("--types", nargs="+", default=None, metavar="NAME",
                   help="with --data: the model types (default: all)")
    p.add_argument("--steps", type=int, default=20, help="with --data: training steps (default 20)")
    p.add_argument("--compare", action="store_true",
                   help="with --data: also the val split's evaluation before and after the "
                        "cache-free, memory-sized evaluation (seconds per million targets, peak memory)")
    add_exact_train_flag(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu. On cuda, fast is the fused step "
                        "as a CUDA graph, and compiled-ro (torch.compile with "
                        "mode='reduce-overhead', compiled first) is timed too")
    p.set_defaults(func=cmd_bench)
