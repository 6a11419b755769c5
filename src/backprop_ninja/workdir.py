"""A run's work directory: what training writes and what eval, sample and plot read back.

    config.json             model and training config, vocabulary, input file, split seed
    model.safetensors       the parameters and the calibrated batchnorm statistics
    checkpoint.safetensors  parameters, step and batch-sampling RNG state, for --resume
    metrics.jsonl           one JSON line per step: step, loss, lr (+ val_loss, ud where measured)
    loss.png                log10 of the loss, averaged per 1000 steps

Tensors are stored as safetensors (no pickle). Every file is written to a temporary name and
renamed into place, so a crash or a bad run never leaves a good file half-overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import model as M
from .data import Dataset, Vocab, default_data_path
from .errors import UserError
from .layers import BatchNormStats

FORMAT = "backprop-ninja/1"
CONFIG, MODEL, CHECKPOINT, METRICS, LOSS_PLOT = (
    "config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "loss.png")


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
        raise UserError(f"{workdir} holds no run ({CONFIG} is missing); train one with "
                        f"`backprop-ninja train -o {workdir}`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"format {config.get('format')!r}")
        M.ModelConfig(**config["model"])
        return config
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a backprop-ninja config ({e}); train again into a new "
                        "-o WORKDIR") from None


def input_path(config: dict) -> Path:
    """The training file recorded in the config (null means the bundled names)."""
    recorded = config["data"]["input"]
    return default_data_path() if recorded is None else Path(recorded)


def load_data(config: dict) -> Dataset:
    """Reload the run's data and check it still has the vocabulary the model was trained on."""
    data = Dataset.load(input_path(config), block_size=config["model"]["block_size"],
                        seed=config["data"]["split_seed"])
    check_vocab(Vocab(tuple(config["data"]["vocab"])), data.vocab, input_path(config))
    return data


def check_vocab(expected: Vocab, found: Vocab, path: Path) -> None:
    if expected != found:
        added = sorted(set(found.chars) - set(expected.chars))
        missing = sorted(set(expected.chars) - set(found.chars))
        raise UserError(f"vocabulary mismatch: {path} now has characters {added} not in the run "
                        f"and lacks {missing}; use the file the run was trained on, or a new -o WORKDIR")


def check_params(tensors: dict[str, torch.Tensor], cfg: M.ModelConfig, path: Path) -> M.Params:
    expected = {k: tuple(v.shape) for k, v in M.init_params(cfg, dtype=torch.float32).items()}
    params = {}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise UserError(f"{path} does not match config.json (tensor {name}); "
                            "train again into a new -o WORKDIR")
        params[name] = tensors[name]
    return params


@dataclass
class Run:
    """A trained run, loaded: what eval, sample and plot need."""

    workdir: Path
    config: dict
    cfg: M.ModelConfig
    params: M.Params
    bn_stats: BatchNormStats
    metrics: list[dict]

    @cached_property
    def data(self) -> Dataset:
        """The run's data, reloaded from the recorded input file on first use."""
        return load_data(self.config)

    @property
    def vocab(self) -> Vocab:
        return Vocab(tuple(self.config["data"]["vocab"]))


def load_run(workdir: str | Path, device: str | torch.device = "cpu") -> Run:
    workdir = Path(workdir)
    config = read_config(workdir)
    cfg = M.ModelConfig(**config["model"])
    tensors = load_tensors(workdir / MODEL, "the run has no finished model; finish it with "
                           f"`backprop-ninja train -o {workdir} --resume`")
    params = check_params(tensors, cfg, workdir / MODEL)
    if "bn_mean" not in tensors or "bn_var" not in tensors:
        raise UserError(f"{workdir / MODEL} has no batchnorm statistics; train again into a new -o WORKDIR")
    stats = BatchNormStats(tensors["bn_mean"].to(device), tensors["bn_var"].to(device))
    return Run(workdir, config, cfg, {k: v.to(device) for k, v in params.items()}, stats,
               read_metrics(workdir))


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
