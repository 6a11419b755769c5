"""A run's work directory: what training writes and what eval, sample and plot read back.

    config.json             model and training config, vocabulary, input file, split seed
                            (and the teachers' directories and model hashes, with --teacher)
    model.safetensors       the parameters and the calibrated batchnorm statistics
                            (<layer>_mean, <layer>_var)
    checkpoint.safetensors  parameters, optimiser state (AdamW's moments), step and the RNG state
                            of batch sampling (and dropout), for --resume
    metrics.jsonl           one JSON line per step: step, loss, lr (+ val_loss, ud where measured)
    loss.png                log10 of the loss, averaged per 1000 steps, and the val loss
    .train.lock             held (an OS lock) by the train run using the directory, if any

Tensors are stored as safetensors (no pickle). Every file is written to a temporary name and
renamed into place, so a crash or a bad run never leaves a good file half-overwritten. A train
run holds an OS file lock on the directory for its whole life (the OS drops it when the process
dies, so a killed run leaves no stale lock); eval, sample and plot only read and need no lock.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import models
from .data import Dataset, Vocab, default_data_path
from .errors import UserError
from .models import memory
from .models.base import ModelSpec, Params, Stats
from .nn.normalisation import BatchNormStats

FORMAT = "backprop-ninja/1"
CONFIG, MODEL, CHECKPOINT, METRICS, LOSS_PLOT, LOCK = (
    "config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "loss.png",
    ".train.lock")


@contextmanager
def locked(workdir: Path, resume: bool = False) -> Iterator[None]:
    """Hold the directory's train lock; a second train run on it gets a one-line error.

    An OS lock (flock) rather than a marker file: it dies with its process, so a run killed
    with SIGKILL or a power cut never leaves a stale lock behind. A run that fails before it
    writes anything takes away what it made: the lock file, and the folders it created.
    """
    created = [d for d in (workdir, *workdir.parents) if not d.exists()]
    lock_created = not (workdir / LOCK).exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        remove_empty(created)
        if resume:
            raise UserError(f"cannot write in {workdir} (permission denied), so the run there "
                            "cannot be resumed; copy the folder somewhere you can write and "
                            "resume it there (eval and sample only read it)") from None
        raise UserError(f"cannot create the work directory {workdir} (permission denied); "
                        "pass -o a directory you can write to") from None
    try:
        try:
            take_lock(fd)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            lock_created = False
            raise UserError(f"{workdir} is in use by a running train ({holder}); wait for it to "
                            "finish, or train into another -o WORKDIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        if lock_created and not any((workdir / f).exists() for f in (CONFIG, CHECKPOINT, MODEL)):
            try:  # nothing of a run was written: leave no trace
                (workdir / LOCK).unlink()
            except OSError:
                pass
            remove_empty(created)
        os.close(fd)  # closing the descriptor releases the lock


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (innermost first) where they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def take_lock(fd: int, tries: int = 5) -> None:
    """The exclusive lock, or BlockingIOError. A few quick tries: ``train_running`` (eval or
    sample looking) holds a shared lock for a moment, which must not turn a train away."""
    import fcntl

    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(0.02)


def train_running(workdir: Path) -> str | None:
    """Who holds the directory's train lock ("pid N, started ..."), or None when no train runs
    there. Only looks: a shared lock taken and dropped at once."""
    import fcntl

    try:
        fd = os.open(workdir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def article(word: str) -> str:
    """'an' before a model's name that starts with a vowel sound (an mlp, an rnn), else 'a'."""
    return "an" if word in ("mlp", "rnn") or word[:1] in "aeio" else "a"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path`` only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"{path} is missing: {what}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupted ({str(e).splitlines()[0]}); train again into a new "
                        "-o WORKDIR") from None


def read_config(workdir: Path) -> dict:
    path = workdir / CONFIG
    if not path.exists():
        holder = train_running(workdir)
        if holder:
            raise UserError(f"{workdir} holds no run yet: a train ({holder}) is starting there and "
                            f"writes {CONFIG} with its first checkpoint; wait for that (every "
                            "--checkpoint-every steps)")
        raise UserError(f"{workdir} holds no run ({CONFIG} is missing); train one with "
                        f"`backprop-ninja train -o {workdir}`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_config(path, f"not JSON: {e}") from None
    problem = config_problem(config)
    if problem:
        raise bad_config(path, problem)
    return config


def bad_config(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a backprop-ninja config ({why}); train again into a new "
                     "-o WORKDIR")


def config_problem(config: object) -> str | None:
    """What is wrong with a parsed config.json, or None. Checked field by field, so that a bad
    file is reported as such and a bug in the code stays a bug."""
    if not isinstance(config, dict):
        return "not a JSON object"
    if config.get("format") != FORMAT:
        return f"format {config.get('format')!r}, expected {FORMAT!r}"
    for section in ("model", "train", "data"):
        if not isinstance(config.get(section), dict):
            return f"no {section!r} section"
    model = dict(config["model"])
    spec = models.MODELS.get(model.pop("type", models.DEFAULT))
    if spec is None:
        return f"model type {config['model']['type']!r} is not one of {', '.join(models.MODELS)}"
    fields = set(spec.config.__dataclass_fields__)
    if set(model) != fields or not all(type(v) is int and v > 0 for v in model.values()):
        return f"the model section of {article(spec.name)} {spec.name} needs positive integers {sorted(fields)}"
    data = config["data"]
    if not (data.get("input") is None or isinstance(data.get("input"), str)):
        return "data.input is not a path"
    if type(data.get("split_seed")) is not int:
        return "data.split_seed is not an integer"
    vocab = data.get("vocab")
    if not (isinstance(vocab, list) and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        return "data.vocab is not a list of characters"
    teachers = config.get("teachers", [])
    if not (isinstance(teachers, list) and all(
            isinstance(t, dict) and set(t) == {"workdir", "sha256"}
            and all(isinstance(v, str) for v in t.values()) for t in teachers)):
        return "teachers is not a list of {workdir, sha256}"
    return None


def input_path(config: dict) -> Path:
    """The training file recorded in the config (null means the bundled names)."""
    recorded = config["data"]["input"]
    return default_data_path() if recorded is None else Path(recorded)


def load_data(config: dict, path: Path | None = None, takes_input: bool = False,
              compact: bool = False, check_memory=None) -> Dataset:
    """Reload the run's data (from ``path`` if given, else the recorded file) and check that it
    is the file the model was trained on: same bytes (when the run recorded their hash; an
    edit with the same alphabet would silently change the split) and same vocabulary.

    ``takes_input``: the command has an -i flag, so the advice may say to pass one.
    """
    given = path is not None
    recorded_path = input_path(config)
    path = path or recorded_path
    if not path.exists():
        where = "pass its new location with -i FILE" if takes_input else "put it back there"
        what = f"-i {path} does not exist" if given else \
            f"the input file this run was trained on, {path}, is missing"
        raise UserError(f"{what}; {where}")
    if not path.is_file():
        what = f"-i {path}" if given else f"the input file this run was trained on, {path},"
        raise UserError(f"{what} is not a regular file (a folder, a fifo or a device); "
                        "the run needs the text file it was trained on")
    spec, cfg = model_from_config(config)
    data = Dataset.load(path, block_size=spec.block_size(cfg), seed=config["data"]["split_seed"],
                        layout=spec.layout, compact=compact, check_memory=check_memory)
    recorded = config["data"].get("sha256")
    if recorded is not None and recorded != data.sha256 and given and \
            path.resolve() != recorded_path.resolve():
        raise UserError(f"-i {path} is another file than the one this run was trained on "
                        f"({recorded_path}; their SHA-256 differ, so the split would too); "
                        "drop -i to use the recorded file, pass the same file moved, or train a "
                        "new run into a new -o WORKDIR")
    if recorded is not None and recorded != data.sha256:
        where = "restore the original (or pass its location with -i FILE)" if takes_input else \
            "restore the original"
        raise UserError(f"{path} has changed since this run was trained on it (its SHA-256 "
                        f"differs, so its split would too); {where}, or train a new run into "
                        "a new -o WORKDIR")
    check_vocab(Vocab(tuple(config["data"]["vocab"])), data.vocab, path)
    return data


def check_vocab(expected: Vocab, found: Vocab, path: Path) -> None:
    if expected != found:
        added = sorted(set(found.chars) - set(expected.chars))
        missing = sorted(set(expected.chars) - set(found.chars))
        raise UserError(f"vocabulary mismatch: {path} now has characters {added} not in the run "
                        f"and lacks {missing}; use the file the run was trained on, or a new -o WORKDIR")


def model_section(spec: ModelSpec, cfg) -> dict:
    """config.json's "model": the type, then the config's fields."""
    return {"type": spec.name, **asdict(cfg)}


def model_from_config(config: dict) -> tuple[ModelSpec, object]:
    """The model spec and config of a checked config.json (an untyped one is the lecture's MLP,
    as written before the zoo)."""
    fields = dict(config["model"])
    spec = models.get(fields.pop("type", models.DEFAULT))
    return spec, spec.config(**fields)


def check_params(tensors: dict[str, torch.Tensor], spec: ModelSpec, cfg, path: Path) -> Params:
    expected = {k: tuple(v.shape) for k, v in spec.init(cfg, torch.Generator()).items()}
    params = {}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise UserError(f"{path} does not match config.json (tensor {name}); "
                            "train again into a new -o WORKDIR")
        params[name] = tensors[name]
    return params


def save_model(workdir: Path, params: Params, stats: Stats, step: int) -> None:
    tensors = dict(params)
    for name, s in stats.items():
        tensors[f"{name}_mean"], tensors[f"{name}_var"] = s.mean, s.var
    save_tensors(workdir / MODEL, tensors, {"step": str(step)})


@dataclass
class Run:
    """A trained run, loaded: what eval, sample and plot need."""

    workdir: Path
    config: dict
    spec: ModelSpec
    cfg: object
    params: Params
    stats: Stats
    metrics: list[dict]
    # None for a finished model (model.safetensors); else the checkpoint's step, read while
    # the run trains (or after it was killed), and how its batchnorm statistics were made
    checkpoint_step: int | None = None
    note: str = ""

    @cached_property
    def data(self) -> Dataset:
        """The run's data, reloaded from the recorded input file on first use."""
        return load_data(self.config)

    @property
    def vocab(self) -> Vocab:
        return Vocab(tuple(self.config["data"]["vocab"]))


def load_run(workdir: str | Path, device: str | torch.device = "cpu",
             checkpoint: bool = False) -> Run:
    """The trained model of a run. With ``checkpoint``, a run that has no model.safetensors yet
    (a train is running, or was killed) is read from its latest checkpoint: its parameters (with
    --ema, their average, as the final model would be), and its batchnorm layers, if any,
    calibrated now over the training split, as training does at the end (``Run.note`` says so)."""
    workdir = Path(workdir)
    config = read_config(workdir)
    spec, cfg = model_from_config(config)
    memory.check_model(spec, cfg)  # before the parameters are allocated
    if checkpoint and not (workdir / MODEL).exists() and (workdir / CHECKPOINT).exists():
        return load_checkpoint_as_model(workdir, config, spec, cfg, device)
    tensors = load_tensors(workdir / MODEL, no_model_advice(workdir))
    params = {k: v.to(device) for k, v in check_params(tensors, spec, cfg, workdir / MODEL).items()}
    stats = {name[:-len("_mean")]: BatchNormStats(tensors[name].to(device),
                                                  tensors[name[:-len("_mean")] + "_var"].to(device))
             for name in tensors if name.endswith("_mean") and name[:-len("_mean")] + "_var" in tensors}
    probe = torch.zeros(2, spec.block_size(cfg), dtype=torch.long, device=device)
    missing = [k for k in spec.forward(params, probe, stats=stats).norm_inputs if k not in stats]
    if missing:
        raise UserError(f"{workdir / MODEL} has no batchnorm statistics for {', '.join(missing)}; "
                        "train again into a new -o WORKDIR")
    return Run(workdir, config, spec, cfg, params, stats, read_metrics(workdir))


def no_model_advice(workdir: Path) -> str:
    """What to do about a run without model.safetensors, for the state it is in."""
    holder = train_running(workdir)
    if holder:
        return (f"a train ({holder}) is still running there and writes the model when it "
                "ends; wait for it")
    if (workdir / CHECKPOINT).exists():
        return (f"the run stopped before its end; finish it with "
                f"`backprop-ninja train -o {workdir} --resume`")
    return f"train again with `backprop-ninja train -o {workdir}`"


def load_checkpoint_as_model(workdir: Path, config: dict, spec: ModelSpec, cfg,
                             device: str | torch.device) -> Run:
    from .models.base import calibrate

    path = workdir / CHECKPOINT
    tensors = load_tensors(path, no_model_advice(workdir))
    step = int(checkpoint_meta(workdir)["step"])
    params = {k: v.to(device) for k, v in check_params(tensors, spec, cfg, path).items()}
    what = f"the checkpoint at step {step:,}"
    if "ema_params" in tensors:  # the moving average, flat in the parameters' order
        flat, start, averaged = tensors["ema_params"].to(device), 0, {}
        if flat.numel() != sum(p.numel() for p in params.values()):
            raise UserError(f"{path} does not match config.json (ema_params); train again into "
                            "a new -o WORKDIR")
        for name, p in params.items():
            averaged[name] = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
        params, what = averaged, what + " (the moving average of the parameters, --ema)"
    run = Run(workdir, config, spec, cfg, params, {}, read_metrics(workdir, before_step=step + 1),
              checkpoint_step=step)
    running = train_running(workdir)
    state = "a train is still running there" if running else "the run has not finished"
    note = f"{workdir} has no {MODEL} yet ({state}): using {what}"
    probe = torch.zeros(2, spec.block_size(cfg), dtype=torch.long, device=device)
    if spec.forward(params, probe).norm_inputs:  # batchnorm: its statistics over the training split
        X = run.data.splits["train"][0].to(device)
        with torch.no_grad():
            run.stats = calibrate(spec, params, X)
        note += f", with batchnorm calibrated now over the {X.shape[0]:,} training examples"
    run.note = note
    return run


def read_metrics(workdir: Path, before_step: int | None = None) -> list[dict]:
    path = workdir / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut off by a crash: everything before it is good
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)
                and isinstance(row.get("loss"), (int, float))):
            raise UserError(f"{path} is corrupted (line {len(rows) + 1} is not a metrics row); "
                            "train again into a new -o WORKDIR")
        if before_step is not None and row["step"] >= before_step:
            break
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# what a train run writes as it goes

def write_config(workdir: Path, config: dict) -> None:
    write_text(workdir / CONFIG, json.dumps(config, indent=2, ensure_ascii=False))


def save_checkpoint(workdir: Path, params: Params, generator: torch.Generator, step: int,
                    optimizer_state: dict[str, torch.Tensor]) -> None:
    tensors = {**params, **optimizer_state, "rng_state": generator.get_state()}
    meta = {"step": str(step), "device": next(iter(params.values())).device.type}
    save_tensors(workdir / CHECKPOINT, tensors, meta)


def checkpoint_meta(workdir: Path) -> dict[str, str]:
    """The checkpoint's metadata (step, device); a one-line error if it is unreadable."""
    path = workdir / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        int(meta["step"])
        return meta
    except (SafetensorError, OSError, KeyError, ValueError):
        raise UserError(f"{path} is corrupted or not a backprop-ninja checkpoint; "
                        "train again into a new -o WORKDIR") from None


def checkpoint_device(workdir: Path) -> str | None:
    """The device a checkpoint was made on, if there is a readable one."""
    if not (workdir / CHECKPOINT).exists():
        return None
    return checkpoint_meta(workdir).get("device")


def write_metrics(workdir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(workdir / METRICS, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_metrics(workdir: Path, rows: list[dict]) -> None:
    with open(workdir / METRICS, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
