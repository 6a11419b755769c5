"""Starting, resuming and saving a run: everything between the command line and the loop.

``start_run`` makes a new run's state from the model's spec, the flags and the data;
``resume_run`` loads one from its work directory and checks that nothing it depends on (the input
file, the teachers, the flags that define its trajectory) has changed. Neither writes anything:
the loop writes the run's files at its first checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import models
from .. import rundir
from ..data import Dataset, default_data_path
from ..errors import UserError
from ..models import memory
from ..models.base import Estimate, ModelSpec, Params, calibrate, estimate, evaluate
from . import distill
from .config import TrainConfig, check_same, resumed_config
from .optim import FlatParams, make_optimizer
from .threads import all_threads


@dataclass
class RunState:
    workdir: Path
    config: dict
    tcfg: TrainConfig
    spec: ModelSpec
    cfg: object  # the model's config dataclass
    data: Dataset
    params: Params
    generator: torch.Generator
    step: int
    metrics: list[dict]
    # config.json and metrics.jsonl are written at the first checkpoint that adds a step, never
    # before: a resume that fails at once (a bad flag, a diverging first step, Ctrl-C) leaves
    # the run's files as they were
    files_written: bool = False
    start_step: int = 0
    optimizer_state: dict = field(default_factory=dict)  # from the checkpoint, when resumed
    # what the run evaluates and saves as its model: the parameters, or with --ema their average
    model: Params | None = None
    teacher: distill.Teacher | None = None  # with --teacher: its predictions on the training examples



def start_run(workdir: Path, input_path: str | None, spec: ModelSpec, cfg_flags: dict,
              tcfg: TrainConfig, split_seed: int, device: str,
              teachers: list[str] | None = None) -> RunState:
    if (workdir / rundir.CHECKPOINT).exists():
        raise UserError(f"{workdir} already holds a run (at step {checkpoint_step(workdir)}); "
                        "continue it with --resume, or train into another -o WORKDIR")
    if (workdir / rundir.MODEL).exists():
        raise UserError(f"{workdir} already holds a trained model; train into another -o WORKDIR "
                        "(or delete this one)")
    if tcfg.dropout and not spec.dropout:
        with_dropout = ", ".join(m.name for m in models.MODELS.values() if m.dropout)
        raise UserError(f"--dropout does not apply to --type {spec.name} (it has no dropout; "
                        f"models with dropout: {with_dropout})")
    teachers = distill.records(check_teachers(spec, tcfg, teachers or []))
    path = Path(input_path).resolve() if input_path else None
    block_size = spec.block_size(spec.make_config(1, cfg_flags))
    fits = memory.checker(spec, lambda V, T: spec.config_for_data(cfg_flags, V, T),
                          tcfg.batch_size, tcfg.optimizer, tcfg.ema, tcfg.sam)
    data = Dataset.load(path or default_data_path(), block_size=block_size, seed=split_seed,
                        layout=spec.layout, compact=True, check_memory=fits)
    cfg = spec.config_for_data(cfg_flags, data.vocab.size, data.block_size)
    # As in the lecture, the generator that initialised the model goes on to draw the batches.
    # On a GPU the batches need a generator there: a CUDA one with the same seed.
    init_g = torch.Generator().manual_seed(tcfg.seed)
    params = {k: v.to(device) for k, v in spec.init(cfg, init_g).items()}
    Xtr, Ytr = data.splits["train"]
    with torch.no_grad():  # a model that cannot train on such a batch says so now, in one line
        spec.forward(params, Xtr[:tcfg.batch_size].to(device), Ytr[:tcfg.batch_size].to(device))
    g = init_g if torch.device(device).type == "cpu" else \
        torch.Generator(device=device).manual_seed(tcfg.seed)
    config = make_config(spec, cfg, tcfg, data, path, split_seed)
    teacher = None
    if teachers:
        config["teachers"] = teachers
        teacher = distill.load(teachers, tcfg.distill, config["data"], Xtr.to(device))
    return RunState(workdir, config, tcfg, spec, cfg, data, params, g, 0, [], teacher=teacher)


def check_teachers(spec: ModelSpec, tcfg: TrainConfig, teachers: list[str]) -> list[str]:
    """--teacher and --distill go together, on a model whose loss takes soft targets."""
    if teachers and not spec.soft_targets:
        takes = ", ".join(m.name for m in models.MODELS.values() if m.soft_targets)
        raise UserError(f"--teacher does not apply to --type {spec.name} (models that learn from "
                        f"a teacher: {takes})")
    if tcfg.distill and not teachers:
        raise UserError("--distill needs --teacher WORKDIR [WORKDIR ...]: the trained runs whose "
                        "predictions it mixes into the targets")
    if teachers and not tcfg.distill:
        raise UserError("--distill 0 leaves the teachers out of every target; pass a share above 0 "
                        "or drop --teacher")
    return teachers


def make_config(spec: ModelSpec, cfg, tcfg: TrainConfig, data: Dataset, path: Path | None,
                split_seed: int) -> dict:
    sizes = {k: int(x.shape[0]) for k, (x, _) in data.splits.items()}
    return {"format": rundir.FORMAT, "model": rundir.model_section(spec, cfg), "train": asdict(tcfg),
            "data": {"input": str(path) if path else None, "sha256": data.sha256,
                     "split_seed": split_seed, "vocab": list(data.vocab.chars),
                     "examples": sizes}}


def resume_run(workdir: Path, input_path: str | None, model_type: str | None, cfg_flags: dict,
               train_flags: dict, split_seed: int | None, device: str,
               teachers: list[str] | None = None) -> RunState:
    """Load a run to continue it. Reads only: nothing in the directory changes until the
    resumed run saves its first new checkpoint."""
    config = rundir.read_config(workdir)
    if not (workdir / rundir.CHECKPOINT).exists():
        raise UserError(f"{workdir} has no checkpoint to resume; start the run without --resume")
    spec, cfg = rundir.model_from_config(config)
    check_same(rundir.model_section(spec, cfg), {"type": model_type, **cfg_flags})
    tcfg = resumed_config(config["train"], workdir / rundir.CONFIG, train_flags)
    check_same(config["data"], {"split_seed": split_seed})
    path = Path(input_path).resolve() if input_path else None
    if path is not None and config["data"].get("sha256") is None \
            and path != rundir.input_path(config).resolve():  # a run from before the hash was kept
        raise UserError(f"-i {input_path} is not the file this run was trained on "
                        f"({rundir.input_path(config)}); drop -i to resume, or train into a new -o WORKDIR")
    fits = memory.checker(spec, lambda V, T: cfg, tcfg.batch_size, tcfg.optimizer, tcfg.ema,
                          tcfg.sam, source="config")
    # a moved file is fine if its bytes match
    data = rundir.load_data(config, path, takes_input=True, compact=True, check_memory=fits)
    if path is not None:
        config["data"]["input"] = str(path)
    tensors = rundir.load_tensors(workdir / rundir.CHECKPOINT, "start the run without --resume")
    params = {k: v.to(device) for k, v in
              rundir.check_params(tensors, spec, cfg, workdir / rundir.CHECKPOINT).items()}
    meta = rundir.checkpoint_meta(workdir)
    if meta.get("device", "cpu") != torch.device(device).type:
        raise UserError(f"the checkpoint was made on {meta['device']}; resume it with "
                        f"--device {meta['device']}")
    g = torch.Generator(device=device)
    try:
        g.set_state(tensors["rng_state"])
    except (KeyError, RuntimeError):
        raise UserError(f"{workdir / rundir.CHECKPOINT} has no valid RNG state; train again into a new "
                        "-o WORKDIR") from None
    expected = set(make_optimizer(FlatParams(params), tcfg.optim()).state())
    optimizer_state = {k: v.to(device) for k, v in tensors.items() if k in expected}
    if set(optimizer_state) != expected:
        raise UserError(f"{workdir / rundir.CHECKPOINT} lacks the optimiser's state "
                        f"({', '.join(sorted(expected - set(optimizer_state)))}); train again into "
                        "a new -o WORKDIR")
    step = int(meta["step"])
    if tcfg.steps < step:
        raise UserError(f"--steps {tcfg.steps} is below the checkpoint's step {step}; pass a total of "
                        f"at least {step} to resume")
    metrics = rundir.read_metrics(workdir, before_step=step)
    if len(metrics) != step:
        raise UserError(f"{workdir / rundir.METRICS} is missing steps before the checkpoint's step "
                        f"{step}; train again into a new -o WORKDIR")
    config["train"] = asdict(tcfg)
    recorded = config.get("teachers", [])
    if recorded and not spec.soft_targets:
        raise rundir.bad_config(workdir / rundir.CONFIG, f"{rundir.article(spec.name)} {spec.name} cannot have teachers")
    if teachers:  # moved teachers: the same model files (by SHA-256) in new directories
        recorded = config["teachers"] = distill.relocate(recorded, teachers)
    teacher = distill.load(recorded, tcfg.distill, config["data"], data.splits["train"][0].to(device)) \
        if recorded else None
    return RunState(workdir, config, tcfg, spec, cfg, data, params, g, step, metrics,
                    start_step=step, optimizer_state=optimizer_state, teacher=teacher)


def checkpoint_step(workdir: Path) -> str:
    try:
        return rundir.checkpoint_meta(workdir)["step"]
    except UserError:
        return "unknown"


def save_progress(state: RunState, unsaved: list[dict], optimizer_state: dict) -> None:
    """Checkpoint the run; the first time, also write its config and all its metrics so far."""
    if state.files_written:
        rundir.append_metrics(state.workdir, unsaved)
    else:
        rundir.write_config(state.workdir, state.config)
        rundir.write_metrics(state.workdir, state.metrics)
        state.files_written = True
    rundir.save_checkpoint(state.workdir, state.params, state.generator, state.step, optimizer_state)


def save_model(state: RunState, group=None, exact_train: bool = False,
               progress: bool | None = None) -> tuple[Estimate, float, int]:
    """Calibrate batchnorm on the whole training set; save the model (with --ema, the averaged
    parameters); return the train loss (exact with ``exact_train``, else estimated on a bounded
    sample when the training split is large: ``models.base.estimate``), the val loss (exact)
    and the number of batchnorm layers calibrated. In a group (``distributed.Group``)
    calibration and evaluation are sharded across the ranks, the train loss is exact, and rank
    0 writes."""
    spec, device = state.spec, next(iter(state.params.values())).device
    params = state.model if state.model is not None else state.params
    Xtr, Ytr = (t.to(device) for t in state.data.splits["train"])
    Xva, Yva = (t.to(device) for t in state.data.splits["val"])
    if group is not None:
        with all_threads():
            stats = group.calibrate(spec, params, Xtr)
            if group.is_writer:
                rundir.save_model(state.workdir, params, stats, state.step)
            n = Xtr.shape[0]
            train = Estimate(group.evaluate(spec, params, Xtr, Ytr, stats), 0.0, n, n, True)
            return train, group.evaluate(spec, params, Xva, Yva, stats), len(stats)
    with all_threads():
        stats = calibrate(spec, params, Xtr, progress=progress)
        rundir.save_model(state.workdir, params, stats, state.step)
        train = train_loss(spec, params, Xtr, Ytr, stats, exact_train, progress)
        last = state.metrics[-1] if state.metrics else {}
        if not stats and last.get("step") == state.step - 1 and "val_loss" in last:
            # without batchnorm the loop's val loss at this step is this very figure (the same
            # parameters, no statistics, the same chunks): not computed twice
            return train, last["val_loss"], 0
        return (train, evaluate(spec, params, Xva, Yva, stats, progress=progress, desc="val"),
                len(stats))


def train_loss(spec: ModelSpec, params: Params, X, Y, stats, exact: bool = False,
               progress: bool | None = None) -> Estimate:
    if exact:
        return Estimate(evaluate(spec, params, X, Y, stats, progress=progress, desc="train"),
                        0.0, X.shape[0], X.shape[0], True)
    return estimate(spec, params, X, Y, stats, progress=progress, desc="train")


def format_train(train: Estimate) -> str:
    """'train loss 2.0711', or 'train loss ~1.8123 +- 0.0021 (estimate on 20,133 of 284,808
    rows; --exact-train-loss for the exact figure)'."""
    if train.exact:
        return f"train loss {train.loss:.4f}"
    return (f"train loss ~{train.loss:.4f} +- {train.stderr:.4f} (estimated on a sample of "
            f"{train.items:,} of {train.of:,} rows; --exact-train-loss for the exact figure)")


def describe(state: RunState) -> str:
    """The model type, its config and the batch, for titles: 'mlp n_hidden 200, ..., batch 32'."""
    fields = ", ".join(f"{k} {v}" for k, v in rundir.model_section(state.spec, state.cfg).items()
                       if k not in ("type", "vocab_size"))
    return f"{state.spec.name} {fields}{', ' if fields else ''}batch {state.tcfg.batch_size}"


