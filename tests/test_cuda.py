"""The fused step as a CUDA graph (``training.cuda_graph``): deterministic, resumable, equal to
the step it captures.

The first part runs everywhere: the graph runner's bookkeeping (batches drawn a chunk at a time,
the per-step numbers, the loss slots, a resume mid-chunk) with every step run eagerly, which is
what a replay runs; and the deterministic embedding gradient. The second part needs a GPU and is
skipped without one (``needs_cuda``): the graph against its eager steps, no host sync while it
replays, bit-exact runs and resumes, and train, eval, sample and bench on CUDA.

Graph against eager: asserted bit for bit. A replay launches the kernels that the eager step
launches, with the same arguments on the same buffers, and every kernel of the fused step is
deterministic on CUDA (the embedding gradient is a one-hot GEMM there, not atomic adds). Against
``FastStep.step`` with a Python learning rate, to float noise only: its update is another kernel
(``add_(grad, alpha=-lr)`` against ``addcmul_(grad, -lr as a tensor)``).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from backprop_ninja import models
from backprop_ninja.cli import main
from backprop_ninja.training import bench
from backprop_ninja.training import cuda_graph
from backprop_ninja.training import loop
from backprop_ninja.training.fused import EmbeddingGrad
from backprop_ninja.training.config import TrainConfig
from backprop_ninja.training.loop import next_stop
from backprop_ninja.training.optim import OptimConfig
from backprop_ninja.training.steps import make_step, routes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIZES = {"mlp": {"n_hidden": 32}, "wavenet": {"n_hidden": 16, "n_embd": 4}}
OPTIMIZERS = {  # (optimiser, schedule): SGD with the lecture's step decay; AdamW with warm-up and cosine
    "sgd": (OptimConfig(), TrainConfig(400, 32, 0.1, 130, 0.01, 1)),
    "sgd-wd": (OptimConfig("sgd", 0.01), TrainConfig(400, 32, 0.1, 130, 0.01, 1)),
    "adamw": (OptimConfig("adamw", 0.01), TrainConfig(400, 32, 3e-3, 300, 3e-4, 1, "adamw", 0.01, 30,
                                                      "cosine")),
}
PERIODS = (100, 150)  # a flush every 100 steps and an evaluation every 150: chunks and single steps


def fast_step(name, device, opt=OptimConfig(), **kw):
    spec = models.get(name)
    params, X, Y = bench.make_problem(spec, 32, SIZES[name], device)
    return routes(spec)["fast"](spec, params, X, Y, 32, opt, **kw)


def runner(step, tcfg, capture=None, seed=1):
    batches = cuda_graph.ChunkedBatches(step.X.shape[0], 32, seed, step.flat.device)
    return cuda_graph.GraphRunner(step, batches, tcfg.lr_at, capture=capture)


def advance(run, start: int, stop: int, periods=PERIODS) -> list[float]:
    """Advance as the training loop does (whole chunks where nothing stops them); the losses."""
    i = start
    while i < stop:
        i += run.advance(i, next_stop(i, stop, periods))
    return run.take_losses()


def copy_of(step, name, opt):
    """A new fused step with ``step``'s parameters and optimiser state (a resumed run's)."""
    spec = models.get(name)
    params = {k: v.clone() for k, v in step.params.items()}
    other = make_step("fast", spec, params, step.X, step.Y, 32, opt)
    other.optimizer.load_state(step.optimizer.state())
    return other


# --- everywhere: the bookkeeping, steps run eagerly -------------------------------------------

def test_chunked_batches_are_a_function_of_the_seed_and_the_step():
    a, b = cuda_graph.ChunkedBatches(1000, 8, 5, "cpu"), cuda_graph.ChunkedBatches(1000, 8, 5, "cpu")
    in_order = [a.indices(s).clone() for s in range(250)]
    shuffled = list(range(137, 250)) + list(range(137))  # a resume at 137, then the rest
    rows = {s: b.indices(s).clone() for s in shuffled}
    assert all(torch.equal(in_order[s], rows[s]) for s in range(250))
    assert not torch.equal(in_order[0], in_order[1]) and not torch.equal(in_order[0], in_order[100])
    other = cuda_graph.ChunkedBatches(1000, 8, 6, "cpu")
    assert not torch.equal(other.indices(0), in_order[0])
    seeds = {cuda_graph.chunk_seed(5, c) for c in range(1000)}
    assert len(seeds) == 1000 and 5 not in seeds and all(0 <= s < 2**64 for s in seeds)
    assert 0 <= cuda_graph.chunk_seed(-3, 0) < 2**64  # argparse takes negative seeds too


def test_next_stop():
    assert next_stop(0, 1000, (100, 150)) == 100
    assert next_stop(100, 1000, (100, 150)) == 150
    assert next_stop(150, 1000, (100, 0)) == 200
    assert next_stop(990, 1000, (100,)) == 1000


def test_the_one_hot_embedding_gradient_equals_index_add():
    g = torch.Generator().manual_seed(0)
    xb = torch.randint(0, 7, (96,), generator=g)  # repeats: rows that sum several gradients
    demb = torch.randn(96, 5, generator=g, dtype=torch.float64)
    by_index, by_matmul = torch.empty(7, 5, dtype=torch.float64), torch.empty(7, 5, dtype=torch.float64)
    EmbeddingGrad(xb, demb, by_index, deterministic=False)()
    EmbeddingGrad(xb, demb, by_matmul, deterministic=True)()
    torch.testing.assert_close(by_matmul, by_index, rtol=1e-12, atol=1e-12)
    assert (by_matmul[torch.bincount(xb, minlength=7) == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(SIZES))
def test_a_fused_step_with_the_one_hot_gradient_trains_alike(name):
    index, onehot = fast_step(name, "cpu"), fast_step(name, "cpu", deterministic=True)
    assert onehot.embedding_grad.onehot is not None and index.embedding_grad.onehot is None
    ix = cuda_graph.ChunkedBatches(index.X.shape[0], 32, 1, "cpu")
    for s in range(50):
        a, b = index.step(ix.indices(s), 0.1), onehot.step(ix.indices(s), 0.1)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(onehot.flat, index.flat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(SIZES))
def test_the_runner_equals_the_fused_step_with_a_python_lr(name, opt_name):
    opt, tcfg = OPTIMIZERS[opt_name]
    ref, mine = fast_step(name, "cpu", opt), fast_step(name, "cpu", opt)
    run = runner(mine, tcfg, capture=False)
    losses = advance(run, 0, 330)
    batches = cuda_graph.ChunkedBatches(ref.X.shape[0], 32, 1, "cpu")
    expected = [ref.step(batches.indices(s), tcfg.lr_at(s)).item() for s in range(330)]
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the MLP's b1 feeds a batchnorm, so its gradient is float noise, which AdamW scales up to
    # steps of size lr: with AdamW it is left out
    noise = {"b1"} if opt_name == "adamw" else set()
    for k in ref.params.keys() - noise:
        torch.testing.assert_close(mine.params[k], ref.params[k], rtol=1e-4, atol=1e-5, msg=k)
    if opt_name == "adamw":
        assert mine.optimizer.t == ref.optimizer.t == 330


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_a_runner_resumed_mid_chunk_is_the_straight_one(name, opt_name):
    opt, tcfg = OPTIMIZERS[opt_name]
    straight, cut = fast_step(name, "cpu", opt), fast_step(name, "cpu", opt)
    whole = advance(runner(straight, tcfg, capture=False), 0, 350)
    first = advance(runner(cut, tcfg, capture=False), 0, 137)
    resumed = copy_of(cut, name, opt)
    rest = advance(runner(resumed, tcfg, capture=False), 137, 350)
    assert whole == first + rest
    assert torch.equal(straight.flat, resumed.flat)
    for k, v in straight.optimizer.state().items():
        assert torch.equal(v, resumed.optimizer.state()[k]), k


def test_losses_come_back_in_order_however_they_are_read():
    tcfg = OPTIMIZERS["sgd"][1]
    each, seldom = runner(fast_step("mlp", "cpu"), tcfg, False), runner(fast_step("mlp", "cpu"), tcfg, False)
    every_step = []
    for i in range(260):
        each.advance(i, i + 1)
        every_step += each.take_losses()
    read, i = [], 0
    for stop in (40, 100, 230, 260):  # reads in mid-chunk, after whole chunks, across two chunks
        while i < stop:
            i += seldom.advance(i, stop)
        if stop != 100:
            read += seldom.take_losses()
    assert len(every_step) == 260 and read == every_step


def test_the_runner_copies_the_table_only_when_it_changes():
    run = runner(fast_step("mlp", "cpu"), OPTIMIZERS["sgd"][1], capture=False)
    tables, i = [], 0
    while i < 400:
        i += run.advance(i, next_stop(i, 400, (100,)))
        if not tables or run.numbers is not tables[-1]:
            tables.append(run.numbers)
    # lr 0.1 until step 130, then 0.01: chunk 0 all 0.1, chunk 1 both, chunks 2 and 3 all 0.01
    assert len(tables) == 3
    assert run.table[:, -1].tolist() == pytest.approx([-0.01] * 100)  # SGD's last number: -lr


def checkpoints_equal(a, b) -> None:
    x, y = load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_the_cuda_loop_on_the_cpu_is_bit_exact_when_resumed(tmp_path, monkeypatch):
    """The training loop as it runs on CUDA (batches a chunk at a time, the fused step through
    the graph runner in whole chunks and single steps), on the CPU with its steps run eagerly."""
    def make_runner(stepper, state, N, device):
        batches = cuda_graph.ChunkedBatches(N, state.tcfg.batch_size, state.tcfg.seed, device)
        return cuda_graph.GraphRunner(stepper, batches, state.tcfg.lr_at, capture=False)

    argv = ["train", "--device", "cpu", "--n-hidden", "32", "--no-progress", "--num-samples", "0",
            "--eval-every", "150", "--diag-every", "50"]
    assert main(argv + ["-o", str(tmp_path / "lecture"), "--steps", "350"]) == 0
    monkeypatch.setattr(loop, "make_runner", make_runner)
    for name, steps in (("straight", 350), ("cut", 137)):
        assert main(argv + ["-o", str(tmp_path / name), "--steps", str(steps), "--check-grads", "3"]) == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "350", "--no-progress",
                 "--num-samples", "0", "--eval-every", "150", "--diag-every", "50"]) == 0
    checkpoints_equal(tmp_path / "straight", tmp_path / "cut")
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(350))
    assert [r["step"] for r in rows if "val_loss" in r] == [149, 299]
    assert [r["step"] for r in rows if "ud" in r] == list(range(49, 350, 50))
    lecture = load_file(str(tmp_path / "lecture" / "checkpoint.safetensors"))
    assert not torch.equal(lecture["W1"], load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))["W1"])


# --- on a GPU ---------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_the_graph_replays_its_eager_steps_bit_for_bit(name, opt_name):
    opt, tcfg = OPTIMIZERS[opt_name]
    graphed, eager = fast_step(name, "cuda", opt), fast_step(name, "cuda", opt)
    assert graphed.embedding_grad.onehot is not None  # deterministic on CUDA
    run = runner(graphed, tcfg)
    assert run.capture
    # chunk 0 is the warm-up, then captured; chunks 2 and 3 replay; 1, 4 and 5 run step by step
    # (evaluations at 150 and 450 cut 1 and 4, the run ends inside 5)
    a = advance(run, 0, 575)
    b = advance(runner(eager, tcfg, capture=False), 0, 575)
    assert run.graph is not None and a == b
    assert torch.equal(graphed.flat, eager.flat)
    for k, v in graphed.optimizer.state().items():
        assert torch.equal(v, eager.optimizer.state()[k]), k


@needs_cuda
@pytest.mark.parametrize("name", sorted(SIZES))
def test_the_graph_equals_the_fused_step_with_a_python_lr(name):
    opt, tcfg = OPTIMIZERS["sgd"]
    ref, graphed = fast_step(name, "cuda", opt), fast_step(name, "cuda", opt)
    losses = advance(runner(graphed, tcfg), 0, 300, (100,))
    batches = cuda_graph.ChunkedBatches(ref.X.shape[0], 32, 1, ref.flat.device)
    expected = [ref.step(batches.indices(s), tcfg.lr_at(s)).item() for s in range(300)]
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(graphed.flat, ref.flat, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_no_host_sync_while_the_graph_replays():
    step = fast_step("mlp", "cuda")
    run = runner(step, TrainConfig(1000, 32, 0.1, 1000, 0.01, 1))
    advance(run, 0, 100, (100,))  # warm-up and capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(100, 400, 100):
            assert run.advance(i, i + 100) == 100
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(run.take_losses()) == 300


@needs_cuda
@pytest.mark.parametrize("extra", [
    [], ["--optimizer", "adamw", "--lr", "0.01", "--lr-schedule", "cosine", "--warmup-steps", "30",
         "--lr-decay-step", "300", "--lr-decay-to", "0.001"], ["--type", "wavenet", "--n-embd", "4"]])
def test_cuda_runs_are_deterministic_and_resume_bit_exact(tmp_path, extra):
    argv = ["train", "--device", "cuda", "--n-hidden", "32", "--no-progress", "--num-samples", "0",
            "--eval-every", "150", *extra]
    for name, steps in (("straight", 350), ("again", 350), ("cut", 137)):
        assert main(argv + ["-o", str(tmp_path / name), "--steps", str(steps)]) == 0
    assert main(["train", "-o", str(tmp_path / "cut"), "--resume", "--steps", "350", "--no-progress",
                 "--num-samples", "0", "--eval-every", "150"]) == 0
    checkpoints_equal(tmp_path / "straight", tmp_path / "again")
    checkpoints_equal(tmp_path / "straight", tmp_path / "cut")


@needs_cuda
@pytest.mark.parametrize("name,flags,how", [
    ("mlp", ["--n-hidden", "32"], "CUDA graph"), ("wavenet", ["--n-hidden", "16"], "CUDA graph"),
    ("transformer", ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--dropout", "0.1"],
     "eagerly")])
def test_train_eval_and_sample_on_cuda(tmp_path, capsys, name, flags, how):
    out = tmp_path / name
    assert main(["train", "--type", name, *flags, "--device", "cuda", "-o", str(out), "--steps", "250",
                 "--eval-every", "100", "--no-progress", "--num-samples", "0"]) == 0
    assert how in capsys.readouterr().out
    assert main(["eval", "-o", str(out), "--device", "cuda", "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)
    # the same saved model evaluated on the CPU gives the same figures, and 250 steps learned
    # something: every split below the uniform guess's log(27) by a margin no untrained model has
    assert main(["eval", "-o", str(out), "--device", "cpu", "--json"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    for split, loss in losses.items():
        assert loss == pytest.approx(on_cpu[split], abs=1e-4), split
        assert loss < math.log(27) - 0.4, (split, loss)
    samples = []
    for _ in range(2):
        assert main(["sample", "-o", str(out), "--device", "cuda", "-n", "5", "--seed", "1"]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 5


@needs_cuda
def test_bench_on_cuda(capsys, monkeypatch):
    monkeypatch.setattr(bench, "steps_for", lambda work, name: 5)
    assert main(["bench", "--device", "cuda", "--quick", "--json", "--repeats", "1", "--no-memory"]) == 0
    rows = {r["impl"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["autograd", "eager", "fast", "compiled-ro"]
    assert "CUDA graph" in rows["fast"]["note"] and "compile" in rows["compiled-ro"]["note"]
    assert all(r["us_per_step"] > 0 and r["device"] == "cuda" for r in rows.values())
    spec = models.get("rnn")  # a model without a fused step says so, and runs eagerly
    params, X, Y = bench.make_problem(spec, 8, {}, "cuda")
    route = bench.make_route(spec, "fast", params, X, Y, 8)
    assert bench.route_note("fast", route, "cuda") == "eager: no fused step, not captured"


@needs_cuda
def test_the_graph_peaks_below_autograd_at_4096_x_1024():
    spec, size = models.get("mlp"), {"n_hidden": 1024}
    fast = bench.peak_memory(spec, "fast", 4096, size, "cuda")
    assert fast <= bench.peak_memory(spec, "autograd", 4096, size, "cuda")
