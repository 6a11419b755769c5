"""The trainer: no graph, agreement with eager and autograd, exact resume, files, bad input."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from functools import lru_cache

from backprop_ninja import models
from backprop_ninja.checking.models import autograd_param_grads
from backprop_ninja.cli import main
from helpers import one_line_error
from backprop_ninja.data import Dataset, default_data_path
from backprop_ninja.models import mlp
from backprop_ninja.models.base import Dropout
from backprop_ninja.training import cuda_graph
from backprop_ninja.training.loop import same_masks
from backprop_ninja.training.optim import (Averaged, FlatParams, OptimConfig, SharpnessAware,
                                           make_optimizer, views)
from backprop_ninja.training.steps import AutogradStep, EagerStep, make_step, routes

SMALL = ["--n-hidden", "32", "--no-progress", "--num-samples", "0"]


def train(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / name
    return main(["train", "-o", str(out), *SMALL, *args]), out


RUN_TO_RUN = ("two runs bit-exact is a figure of the CPU kernels (torch 2.13 CPU build); on other "
              "hardware (a CUDA device's atomic adds, as in index_add_) it may fail while approx holds")


def checkpoint_step(workdir: Path) -> int:
    """The step recorded in the checkpoint's safetensors metadata."""
    with safe_open(str(workdir / "checkpoint.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


def straight_and_cut(tmp_path: Path, total: int, cut: int, *args: str) -> tuple[dict, dict]:
    """The checkpoints of a run made straight to ``total`` steps and of one stopped at ``cut``
    and resumed to ``total``."""
    assert train(tmp_path, "straight", "--steps", str(total), *args)[0] == 0
    assert train(tmp_path, "cut", "--steps", str(cut), *args)[0] == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", str(total),
                 "--no-progress", "--num-samples", "0"]) == 0
    return tuple(load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("straight", "cut"))


@lru_cache
def training_examples(block_size: int, layout: str = "context"):
    return Dataset.load(default_data_path(), block_size=block_size, layout=layout).splits["train"]


def setup(name="mlp", dtype=torch.float32, **overrides):
    """A model of the zoo at its recipe's size (or overrides) and the names' training examples."""
    spec = models.get(name)
    if spec.layout == "sequence":  # names.txt's longest item + 1
        overrides = {"block_size": 16, **overrides}
    cfg = spec.make_config(27, overrides)
    params = {k: v.to(dtype) for k, v in spec.init(cfg, torch.Generator().manual_seed(5)).items()}
    return (spec, params, *training_examples(spec.block_size(cfg), spec.layout))


STEP_ROUTES = [(name, route) for name in sorted(models.MODELS)
               for route in routes(models.get(name)) if route != "autograd"]


def batches(N, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (32,), generator=g) for _ in range(count)]


# --- the steps -------------------------------------------------------------------------------

class GraphBuilt(AssertionError):
    pass


def run_without_graph(step_fn):
    """Run step_fn with autograd on, failing if autograd saves a tensor or backward is called."""
    def pack(t):
        raise GraphBuilt("autograd saved a tensor for backward: a graph is being built")

    real_backward = torch.autograd.backward

    def no_backward(*a, **k):
        raise GraphBuilt("torch.autograd.backward was called")

    torch.autograd.backward = no_backward
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return step_fn()
    finally:
        torch.autograd.backward = real_backward


@pytest.mark.parametrize("name,route", STEP_ROUTES)
def test_no_autograd_graph_in_a_step(name, route):
    spec, params, X, Y = setup(name)
    # even handed parameters that ask for gradients, a step records nothing for autograd
    step = make_step(route, spec, {k: v.requires_grad_(True) for k, v in params.items()}, X, Y, 32)
    for ix in batches(X.shape[0], 3):
        loss = run_without_graph(lambda: step.step(ix, 0.1))
        assert loss.grad_fn is None and not loss.requires_grad
    assert all(not p.requires_grad for p in step.params.values())


def test_no_autograd_graph_in_a_training_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_without_graph(lambda: main(["train", "-o", str(out), *SMALL, "--steps", "200",
                                         "--eval-every", "100", "--diag-every", "50"]))
    assert rc == 0 and (out / "model.safetensors").exists()


def test_the_graph_detector_catches_autograd():
    spec, params, X, Y = setup()
    step = AutogradStep(spec, params, X, Y, 32)
    with pytest.raises(GraphBuilt):
        run_without_graph(lambda: step.step(batches(X.shape[0], 1)[0], 0.1))


FUSED = ["mlp", "wavenet"]  # the models with a fused step of their own


def test_the_fused_steps_are_the_fused_ones():
    for name in FUSED:
        assert routes(models.get(name))["fast"] is not EagerStep, name


@pytest.mark.parametrize("name,overrides", [("mlp", {"n_hidden": 16}), ("wavenet", {"n_hidden": 16})])
def test_fast_step_gradients_float64_against_autograd(name, overrides):
    spec, params, X, Y = setup(name, dtype=torch.float64, **overrides)
    step = make_step("fast", spec, params, X, Y, 32)
    for ix in batches(X.shape[0], 3):
        loss = step.forward_backward(ix)
        ref = autograd_param_grads(spec, step.params, X[ix], Y[ix])
        assert loss.item() == pytest.approx(spec.forward(step.params, X[ix], Y[ix]).loss.item(), rel=1e-12)
        for k in params:
            assert step.grads[k].shape == ref[k].shape
            torch.testing.assert_close(step.grads[k], ref[k], rtol=1e-9, atol=1e-13)
        step.optimizer.step(0.1)


@pytest.mark.parametrize("name", FUSED)
def test_fast_equals_eager_over_many_steps(name):
    spec, params, X, Y = setup(name)
    fast, eager = make_step("fast", spec, params, X, Y, 32), EagerStep(spec, params, X, Y, 32)
    for i, ix in enumerate(batches(X.shape[0], 300)):
        a, b = fast.step(ix, 0.1), eager.step(ix, 0.1)
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-5), i
    for k in params:
        torch.testing.assert_close(fast.params[k], eager.params[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,count", [("mlp", 1000), ("wavenet", 300), ("bigram", 300)])
def test_hand_written_and_autograd_runs_agree(name, count):
    """The recipe, gradients by hand vs by loss.backward(): same losses to float noise."""
    spec, params, X, Y = setup(name)
    lr = spec.recipe["lr"]
    fast, ref = make_step("fast", spec, params, X, Y, 32), AutogradStep(spec, params, X, Y, 32)
    worst = 0.0
    for ix in batches(X.shape[0], count, seed=1):
        a, b = fast.step(ix, lr).item(), ref.step(ix, lr).item()
        worst = max(worst, abs(a - b))
    assert worst < 1e-3, worst
    for k in params:
        torch.testing.assert_close(fast.params[k], ref.params[k].detach(), rtol=1e-3, atol=1e-3)


# --- whole runs ------------------------------------------------------------------------------

def test_check_grads_during_training_and_files(tmp_path, capsys):
    rc, out = train(tmp_path, "run", "--steps", "250", "--check-grads", "20", "--eval-every", "100",
                    "--diag-every", "50", "--checkpoint-every", "100")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"type": "mlp", "vocab_size": 27, "block_size": 3, "n_embd": 10,
                               "n_hidden": 32}
    assert config["train"]["steps"] == 250 and config["data"]["split_seed"] == 42
    assert config["data"]["input"] is None and len(config["data"]["vocab"]) == 26
    model = load_file(str(out / "model.safetensors"))
    assert set(model) == set(mlp.PARAM_NAMES) | {"bn_mean", "bn_var"}
    assert model["bn_mean"].shape == (1, 32) and (model["bn_var"] > 0).all()
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    assert set(ckpt) == set(mlp.PARAM_NAMES) | {"rng_state"}
    for k in mlp.PARAM_NAMES:
        assert torch.equal(ckpt[k], model[k])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(250))
    assert all(set(r) >= {"step", "loss", "lr"} for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [99, 199]
    assert [r["step"] for r in rows if "ud" in r] == [49, 99, 149, 199, 249]
    assert set(rows[49]["ud"]) == set(mlp.PARAM_NAMES)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval reproduces the losses that train printed, from the saved files
    printed = capsys.readouterr().out
    assert main(["eval", "-o", str(out), "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)
    assert set(losses) == {"train", "val", "test"}
    assert f"train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" in printed


def test_resume_equals_straight_and_runs_are_deterministic(tmp_path):
    assert train(tmp_path, "straight", "--steps", "300", "--eval-every", "0", "--device", "cpu")[0] == 0
    assert train(tmp_path, "again", "--steps", "300", "--eval-every", "0", "--device", "cpu")[0] == 0
    assert train(tmp_path, "cut", "--steps", "120", "--eval-every", "0", "--device", "cpu")[0] == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "300",
                 "--no-progress", "--num-samples", "0"]) == 0
    a, b, c = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("straight", "again", "cut"))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), (k, RUN_TO_RUN)
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("straight", "again", "cut")]
    assert metrics[0] == metrics[1] == metrics[2]


def test_interrupt_saves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "backprop_ninja", "train", "-o", str(out), *SMALL,
           "--steps", "1000000", "--eval-every", "0", "--checkpoint-every", "500", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # into the next stretch, between checkpoints
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    step = len((out / "metrics.jsonl").read_text().splitlines())
    assert 0 < step < 1000000
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    assert (out / "model.safetensors").exists()
    # resuming the interrupted run lands where a straight run lands
    total = str(step + 50)
    assert main(["train", "-o", str(out), "--resume", "--steps", total, "--no-progress",
                 "--num-samples", "0"]) == 0
    assert train(tmp_path, "straight", "--steps", total, "--eval-every", "0", "--device", "cpu")[0] == 0
    a = load_file(str(out / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), RUN_TO_RUN
    assert not torch.equal(ckpt["W1"], a["W1"])


# --- weight averaging (--ema) ---------------------------------------------------------------

def test_averaged_parameters_follow_the_formula_and_leave_training_alone():
    """avg = d_t avg + (1 - d_t) p after each step, d_t = min(decay, (1 + t) / (10 + t)); the
    trained parameters are those of the same run without averaging, bit for bit."""
    spec, params, X, Y = setup()
    plain = make_step("fast", spec, params, X, Y, 32, OptimConfig("adamw", 0.01))
    avg = make_step("fast", spec, params, X, Y, 32, OptimConfig("adamw", 0.01, ema=0.9))
    assert isinstance(avg.optimizer, Averaged)
    expected = avg.buffers.flat.clone().double()
    for t, ix in enumerate(batches(X.shape[0], 60)):
        plain.step(ix, 1e-3)
        avg.step(ix, 1e-3)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * avg.buffers.flat.double()
    assert torch.equal(plain.buffers.flat, avg.buffers.flat)
    torch.testing.assert_close(avg.optimizer.avg.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(avg.optimizer.avg, avg.buffers.flat)
    assert all(v.untyped_storage().data_ptr() == avg.optimizer.avg.untyped_storage().data_ptr()
               for v in avg.optimizer.averaged.values())


def test_ema_run_saves_the_average_and_resumes_bit_exact(tmp_path, capsys):
    args = ["--optimizer", "adamw", "--lr", "3e-3", "--ema", "0.99", "--eval-every", "100",
            "--device", "cpu"]
    a, c = straight_and_cut(tmp_path, 300, 120, *args)
    assert set(a) == set(c) and {"ema_params", "ema_t", "adamw_m"} <= set(a)
    assert all(torch.equal(a[k], c[k]) for k in a), RUN_TO_RUN
    assert int(a["ema_t"]) == 300
    # the model is the average, not the last step's parameters
    model = load_file(str(tmp_path / "straight" / "model.safetensors"))
    names = list(mlp.init(mlp.Config(27, n_hidden=32), torch.Generator()))
    flat = torch.cat([model[k].reshape(-1) for k in names])
    assert torch.equal(flat, a["ema_params"])
    assert not torch.equal(flat, torch.cat([a[k].reshape(-1) for k in names]))
    capsys.readouterr()
    assert main(["eval", "-o", str(tmp_path / "straight"), "--json"]) == 0
    assert 2.0 < json.loads(capsys.readouterr().out)["val"] < 3.0
    # the recorded config keeps the decay, and resuming with another one is refused
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["ema"] == 0.99
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "400", "--ema", "0.9",
               "--no-progress"])
    one_line_error(capsys, rc, "--ema 0.9 differs from the run being resumed (0.99)")


def test_ema_has_no_cuda_graph_update():
    spec, params, X, Y = setup()
    step = make_step("fast", spec, params, X, Y, 32, OptimConfig("sgd", ema=0.99))
    assert cuda_graph.not_capturable(step) == "--ema's averaging has no graph update"


# --- sharpness-aware minimisation (--sam) -----------------------------------------------------

def flatten(grads, like) -> torch.Tensor:
    return torch.cat([grads[k].reshape(-1) for k in like])


@pytest.mark.parametrize("name,route,dropout", [
    ("mlp", "fast", 0.0), ("mlp", "lecture", 0.0), ("transformer", "eager", 0.0),
    ("transformer", "eager", 0.3), ("transformer", "autograd", 0.3)])
def test_sam_updates_with_the_gradient_taken_rho_uphill(name, route, dropout):
    """With --sam the step's gradient is autograd's at p + rho g / |g| (g: the gradient at p,
    drawn with the step's first masks; the second pass draws the next ones), the loss returned
    is the one at p, and the update starts from p exactly (restored, not p + e - e)."""
    rho, lr = 0.5, 0.1
    tiny = {"n_layer": 1, "n_head": 2, "n_embd": 8} if name == "transformer" else {}
    spec, params, X, Y = setup(name, torch.float64, **tiny)
    masks = Dropout(dropout, torch.Generator().manual_seed(1)) if dropout else None
    step = make_step(route, spec, params, X, Y, 32, OptimConfig("sgd", sam=rho), masks)
    ix = batches(X.shape[0], 1)[0]
    p0 = step.buffers.flat.clone()
    twin = same_masks(masks)
    g = flatten(autograd_param_grads(spec, step.params, X[ix], Y[ix], twin), params)
    moved = views(p0 + rho * g / g.norm(), params)
    g_sam = flatten(autograd_param_grads(spec, moved, X[ix], Y[ix], twin), params)
    loss0 = spec.forward(step.params, X[ix], Y[ix], dropout=same_masks(masks)).loss
    loss = step.step(ix, lr)
    torch.testing.assert_close(step.buffers.grad, g_sam, rtol=1e-9, atol=1e-12)
    assert (step.buffers.grad - g).abs().max() > 1e-3 * g.abs().max()  # it is not g itself
    assert torch.equal(step.buffers.flat, p0.add(step.buffers.grad, alpha=-lr))
    torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=0)
    assert make_step(route, spec, params, X, Y, 32, OptimConfig("sgd"), masks).sam is None


def test_sam_runs_resume_bit_exact_and_check_both_passes(tmp_path, capsys, monkeypatch):
    args = ["--optimizer", "adamw", "--lr", "3e-3", "--sam", "0.05", "--eval-every", "0",
            "--device", "cpu"]
    a, c = straight_and_cut(tmp_path, 200, 80, *args)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), RUN_TO_RUN
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["train"]["sam"] == 0.05
    assert train(tmp_path, "plain", "--steps", "200", "--optimizer", "adamw", "--lr", "3e-3",
                 "--eval-every", "0", "--device", "cpu")[0] == 0
    plain = load_file(str(tmp_path / "plain" / "checkpoint.safetensors"))
    assert not torch.equal(plain["W1"], a["W1"])
    capsys.readouterr()
    rc = main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "300", "--sam", "0.1",
               "--no-progress"])
    one_line_error(capsys, rc, "--sam 0.1 differs from the run being resumed (0.05)")
    # --check-grads checks the first pass at p and the second at p + e, each against autograd
    assert train(tmp_path, "checked", "--steps", "20", "--sam", "0.05", "--check-grads", "5")[0] == 0
    monkeypatch.setattr(SharpnessAware, "__call__", lambda self, gradients, ix: None)  # one pass
    rc, out = train(tmp_path, "one_pass", "--steps", "20", "--sam", "0.05", "--check-grads", "5")
    one_line_error(capsys, rc, "gradient check failed at step 0")
    assert not (out / "checkpoint.safetensors").exists()
    spec, params, X, Y = setup()
    step = make_step("fast", spec, params, X, Y, 32, OptimConfig("sgd", sam=0.05))
    assert cuda_graph.not_capturable(step) == "--sam's second pass has no graph"


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_weight_decay_skips_the_no_decay_parameters(rule):
    """With a zero gradient a step is the decay alone: p *= 1 - lr*wd on the decayed parameters,
    the others unchanged, bit for bit."""
    spec, params, *_ = setup("transformer", n_layer=1, n_head=2, n_embd=8)
    names = {k for k in params if k.rsplit(".", 1)[-1] in spec.no_decay}
    assert names and {k.rsplit(".", 1)[-1] for k in names} == set(spec.no_decay)  # none misnamed
    buffers = FlatParams(params)
    before = {k: v.clone() for k, v in buffers.params.items()}
    make_optimizer(buffers, OptimConfig(rule, 0.1, no_decay=spec.no_decay)).step(0.5)
    for k, v in buffers.params.items():
        if k in names:
            assert torch.equal(v, before[k]), k
        else:
            torch.testing.assert_close(v, before[k] * (1 - 0.05), rtol=1e-6, atol=0, msg=k)
    step = make_step("fast", spec, params, *training_examples(16, "sequence"), 32,
                     OptimConfig(rule, 0.1, no_decay=spec.no_decay))
    assert cuda_graph.not_capturable(step) == "no fused step"
    spec, params, X, Y = setup()
    step = make_step("fast", spec, params, X, Y, 32, OptimConfig(rule, 0.1, no_decay=("b1",)))
    assert cuda_graph.not_capturable(step) == "weight decay on some parameters only has no graph update"


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"), (b"", "no items"), (b"\n \n", "no items"),
    (b"\x89PNG\x00\x00binary", "binary"), (b"\xff\xfe\xfa\n", "UTF-8"), (b"a\nb\nc\n", "empty"),
])
def test_bad_input_files(tmp_path, capsys, content, needle):
    f = tmp_path / "in.txt"
    if content is not None:
        f.write_bytes(content)
    rc, out = train(tmp_path, "run", "-i", str(f), "--steps", "10")
    one_line_error(capsys, rc, needle)
    assert not (out / "checkpoint.safetensors").exists()


def test_batch_size_one(tmp_path, capsys):
    rc, _ = train(tmp_path, "run", "--steps", "10", "--batch-size", "1")
    one_line_error(capsys, rc, "--batch-size 2")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--steps", "10", "--num-samples", "-3"], "--num-samples must be 0 or more"),
    (["train", "--steps", "10", "--lr-decay-step", "-5"], "--lr-decay-step must be 0 or more"),
    (["train", "--steps", "10", "--lr", "nan"], "--lr must be a positive number"),
    (["train", "--steps", "10", "--ema", "1"], "--ema must be at least 0 and below 1, got 1.0"),
    (["train", "--steps", "10", "--sam", "-0.05"], "--sam must be 0 (off) or more, got -0.05"),
    (["train", "--steps", "ten"], "invalid int value"),
    (["check", "--n-hidden", "0"], "--n-hidden must be at least 1"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_flags(tmp_path, capsys, argv, needle):
    rc = main(argv + (["-o", str(tmp_path / "run")] if argv[0] == "train" else []))
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    one_line_error(capsys, main(["train", "-o", str(f), "--steps", "10"]), "is a file")
    assert f.read_text() == "keep me"


@pytest.fixture
def good_run(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("\n".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(200)))
    rc, out = train(tmp_path, "run", "-i", str(f), "--steps", "60", "--eval-every", "0")
    assert rc == 0
    return f, out, (out / "checkpoint.safetensors").read_bytes()


def test_resume_refusals_leave_the_checkpoint_untouched(good_run, capsys, tmp_path):
    f, out, before = good_run
    capsys.readouterr()
    resume = ["train", "-o", str(out), "--resume", "--steps", "100", *SMALL[2:]]
    # retraining over an existing run without --resume
    one_line_error(capsys, train(tmp_path, "run", "-i", str(f), "--steps", "10")[0], "--resume")
    # an architecture flag that contradicts the run
    one_line_error(capsys, main(resume + ["--n-hidden", "64"]), "--n-hidden 64 differs")
    # the training file changed its alphabet
    f.write_text(f.read_text() + "\nzoë\n")
    one_line_error(capsys, main(resume), "has changed since this run was trained on it")
    assert (out / "checkpoint.safetensors").read_bytes() == before


def test_resume_below_the_checkpoint_and_bad_sampling(good_run, capsys):
    _, out, before = good_run
    capsys.readouterr()
    one_line_error(capsys, main(["train", "-o", str(out), "--resume", "--steps", "30"]), "below the checkpoint")
    one_line_error(capsys, main(["sample", "-o", str(out), "--temperature", "nan"]), "--temperature")
    one_line_error(capsys, main(["sample", "-o", str(out), "-n", "0"]), "-n must be between")
    assert (out / "checkpoint.safetensors").read_bytes() == before


def test_corrupted_config_and_metrics(good_run, capsys):
    _, out, _ = good_run
    capsys.readouterr()
    (out / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    one_line_error(capsys, main(["train", "-o", str(out), "--resume", "--steps", "100"]), "metrics.jsonl is corrupted")
    (out / "config.json").write_text("[1, 2]")
    one_line_error(capsys, main(["eval", "-o", str(out)]), "not a backprop-ninja config")
    one_line_error(capsys, main(["train", "-o", str(out), "--resume"]), "not a backprop-ninja config")


def test_missing_and_corrupted_checkpoint(good_run, capsys, tmp_path):
    _, out, _ = good_run
    capsys.readouterr()
    one_line_error(capsys, main(["train", "-o", str(tmp_path / "empty"), "--resume"]), "holds no run")
    (out / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    one_line_error(capsys, main(["train", "-o", str(out), "--resume", "--steps", "100"]), "corrupted")
    (out / "model.safetensors").write_bytes(b"not a model")
    one_line_error(capsys, main(["eval", "-o", str(out)]), "corrupted")
    one_line_error(capsys, main(["sample", "-o", str(tmp_path / "nothing")]), "holds no run")


@pytest.mark.parametrize("blow_up_at,kept", [(200, 200), (199, 100)])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, blow_up_at, kept):
    # blowing up at step 199 breaks the parameters that step 200's checkpoint would save, although
    # every loss up to step 199 was finite: that checkpoint must not be written
    rc, out = train(tmp_path, "run", "--steps", "400", "--eval-every", "0", "--checkpoint-every", "100",
                    "--lr-decay-step", str(blow_up_at), "--lr-decay-to", "1e30", "--device", "cpu")
    one_line_error(capsys, rc, "the loss became", f"checkpoint at step {kept} is kept", "--lr")
    assert checkpoint_step(out) == kept
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in ckpt.items() if k != "rng_state")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == kept
    # it is the state of step `kept`: what a straight run to that step saves, before the blow-up
    assert train(tmp_path, "straight", "--steps", str(kept), "--eval-every", "0", "--device", "cpu")[0] == 0
    straight = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    assert ckpt.keys() == straight.keys()
    for k in ckpt:
        assert torch.equal(ckpt[k], straight[k]), (k, RUN_TO_RUN)
    if kept + 50 < blow_up_at:  # the kept checkpoint is healthy: it trains on from where it was
        assert main(["train", "-o", str(out), "--resume", "--steps", str(kept + 50), *SMALL[2:]]) == 0
        assert checkpoint_step(out) == kept + 50
        assert not torch.equal(load_file(str(out / "checkpoint.safetensors"))["W1"], ckpt["W1"])


def test_dropout_masks_are_the_steps_own_and_autograd_agrees():
    """With the same seed, the hand-written step and autograd's draw the same masks: their
    losses agree; without the same seed, they differ (the masks matter)."""

    spec, params, X, Y = setup("transformer", n_layer=1, n_head=2, n_embd=16, block_size=16)
    opt = OptimConfig("adamw", 0.01)
    mine = make_step("fast", spec, params, X, Y, 8, opt, Dropout(0.3, torch.Generator().manual_seed(1)))
    ref = make_step("autograd", spec, params, X, Y, 8, opt, Dropout(0.3, torch.Generator().manual_seed(1)))
    other = make_step("autograd", spec, params, X, Y, 8, opt, Dropout(0.3, torch.Generator().manual_seed(2)))
    for ix in batches(X.shape[0], 20)[:20]:
        ix = ix[:8]
        a, b, c = mine.step(ix, 1e-3).item(), ref.step(ix, 1e-3).item(), other.step(ix, 1e-3).item()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a != pytest.approx(c, rel=1e-3)
    for k in params:
        got, want = mine.params[k], ref.params[k].detach()
        if k.endswith("b_qkv"):
            # the key bias has no gradient (softmax ignores a shift of a row of scores): both
            # sides' "gradient" is float noise, which AdamW scales up to steps of size lr
            assert (got[1] - want[1]).abs().max() <= 20 * 1e-3
            got, want = got[0::2], want[0::2]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=k)


def test_a_run_from_before_sam_and_distill_resumes_with_them_at_zero(tmp_path):
    """A config.json written before a training field existed takes the field's default, and
    passing that default on resume is no conflict."""
    rc, out = train(tmp_path, "old", "--steps", "20", "--checkpoint-every", "10")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    for key in ("sam", "distill"):
        del config["train"][key]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "-o", str(out), "--resume", "--steps", "30", "--sam", "0", "--distill",
                 "0", "--no-progress", "--num-samples", "0"]) == 0
    assert checkpoint_step(out) == 30


@pytest.mark.parametrize("argv", [
    ["--type", "mlp", "--n-hidden", "32"],                      # SGD: the lecture's lr * grad
    ["--type", "rnn", "--n-embd", "8", "--n-embd2", "16"],      # AdamW: the moments rescale it
    ["--type", "transformer", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--ema", "0.9",
     "--sam", "0.05"],                                          # AdamW, EMA, SAM, masked decay
])
def test_the_recorded_update_to_data_ratio_is_the_change_the_step_made(tmp_path, argv):
    """metrics.jsonl's ud at step 9 is log10 std(p10 - p9) / std(p9) per parameter, computed
    here from the checkpoints of a 9-step and a 10-step run (the same trajectory). For AdamW
    the old formula, std(lr * grad) / std(p), was decades off the real update."""
    quiet = ["--no-progress", "--num-samples", "0", "--diag-every", "10", "--eval-every", "0"]
    for steps in (9, 10):
        assert main(["train", "-o", str(tmp_path / str(steps)), "--steps", str(steps), *argv,
                     *quiet]) == 0
    before, after = (load_file(str(tmp_path / s / "checkpoint.safetensors")) for s in ("9", "10"))
    rows = [json.loads(line) for line in (tmp_path / "10" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ud" in r] == [9]
    recorded = rows[9]["ud"]
    names = [k for k in recorded]
    assert names and set(names) <= set(before)
    for name in names:
        p0, p1 = before[name].double(), after[name].double()
        expected = math.log10(max((p1 - p0).std().item() / max(p0.std().item(), 1e-12), 1e-30))
        assert recorded[name] == pytest.approx(expected, abs=2e-3), name


@pytest.mark.parametrize("name,weight_decay", [("sgd", 0.0), ("sgd", 0.1), ("adamw", 0.0),
                                               ("adamw", 0.2)])
def test_one_update_rule_whether_its_numbers_are_floats_or_tensors(name, weight_decay):
    """The eager step gives the rule its numbers as Python floats; a CUDA graph reads them from
    a device table. Both go through the same ``update``, and give the same bits (on the CPU
    here; the CUDA tests replay it as a graph)."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(300, 7, generator=g), "b": torch.randn(7, generator=g)}
    cfg = OptimConfig(name, weight_decay)
    floats, tensors = (make_optimizer(FlatParams(params), cfg) for _ in range(2))
    for t in range(1, 6):
        grad = torch.randn(floats.buffers.grad.shape, generator=g)
        floats.buffers.grad.copy_(grad)
        tensors.buffers.grad.copy_(grad)
        lr = 0.05 / t
        floats.step(lr)
        tensors.t += 1
        tensors.update([torch.tensor([x]) for x in tensors.numbers(lr, tensors.t)])
        assert torch.equal(floats.buffers.flat, tensors.buffers.flat), t
    for k, v in floats.state().items():
        assert torch.equal(v, tensors.state()[k]), k
    # the numbers matter: another learning rate moves the parameters elsewhere
    other = make_optimizer(FlatParams(params), cfg)
    other.buffers.grad.copy_(grad)
    other.step(0.5)
    assert not torch.equal(other.buffers.flat, FlatParams(params).flat)


def test_num_threads_is_honoured_by_evaluation_calibration_and_the_step(tmp_path, monkeypatch):
    """--num-threads 1 on a machine of 8 cores: no pass asks torch for more than 1 thread
    (evaluation and calibration once took every core); without the flag they take the 8."""
    from backprop_ninja.training import threads

    asked: list[int] = []
    real = torch.set_num_threads

    def record(n: int) -> None:
        asked.append(n)
        real(min(n, 2))  # record what was asked, without oversubscribing this machine

    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", record)
    saved = torch.get_num_threads()
    try:
        for argv, most in ((["--num-threads", "1"], 1), ([], 8)):
            asked.clear()
            code, _ = train(tmp_path, f"run{most}", "--steps", "20", "--eval-every", "10", *argv)
            assert code == 0
            assert asked and max(asked) == most, asked
    finally:
        threads.set_budget(None)
        real(saved)
