"""The benchmark's mechanics (its figures are machine-dependent and printed, never asserted)."""

import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from backprop_ninja import models
from backprop_ninja.cli import main
from backprop_ninja.checking.models import TINY
from backprop_ninja.training import bench

MLP = models.get("mlp")
MLP_ROUTES = ["autograd", "lecture", "eager", "fast"]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_bench_rows_and_json(name):
    spec = models.get(name)
    overrides = dict(TINY[name])  # a small instance: the mechanics, not the figures
    rows = bench.bench(spec, "cpu", sizes=((8, overrides),), repeats=1, memory=False, log=lambda s: None)
    assert [r.impl for r in rows] == (MLP_ROUTES if name == "mlp" else ["autograd", "eager", "fast"])
    # the mechanics only (the figures are checked on a fake clock below): one row per route,
    # each at the size asked for, each timed, and the JSON holding exactly the rows
    for r in rows:
        assert (r.batch, r.config, r.model, r.device) == (8, overrides, name, "cpu")
        assert math.isfinite(r.us_per_step) and math.isfinite(r.ratio_vs_autograd)
    data = json.loads(bench.rows_to_json(rows))
    assert data == [json.loads(json.dumps(asdict(r))) for r in rows]
    table = bench.format_rows(rows)
    assert all(any(line.split()[:1] == [r.impl] for line in table.splitlines()) for r in rows)
    assert "vs autograd" in bench.format_rows(rows)


class FakeClock:
    """perf_counter for bench: each step of a fake route advances it by that route's known time."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t

    def route(self, us_per_step):
        def step(ix, lr):
            self.t += us_per_step * 1e-6
        return SimpleNamespace(step=step)


def test_bench_figures_from_known_step_times(monkeypatch):
    # routes that take known times on a fake clock: the rows must report those times and their
    # quotients (the routes run different numbers of steps per round: 40 for lecture, 400 others)
    us = {"autograd": 400.0, "lecture": 8000.0, "eager": 200.0, "fast": 125.0}
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "make_route", lambda spec, name, *a: clock.route(us[name]))
    rows = bench.bench(MLP, "cpu", sizes=((8, {"n_hidden": 16}),), repeats=3, memory=False,
                   log=lambda s: None)
    got = {r.impl: (r.us_per_step, r.steps_per_s, r.ratio_vs_autograd) for r in rows}
    assert got == {"autograd": (400.0, 2500.0, 1.0), "lecture": (8000.0, 125.0, 0.05),
                   "eager": (200.0, 5000.0, 2.0), "fast": (125.0, 8000.0, 3.2)}


def test_peak_memory_is_measured_in_a_fresh_process():
    small = bench.peak_memory(MLP, "fast", 64, {"n_hidden": 64}, "cpu")
    large = bench.peak_memory(MLP, "autograd", 2048, {"n_hidden": 512}, "cpu")
    if small is None:
        pytest.skip("peak RSS cannot be reset on this system")
    assert 0 <= small < large
    assert large > 2048 * 512 * 4  # at least one n x H activation


def test_bench_command_json(capsys, monkeypatch):
    monkeypatch.setattr(bench, "steps_for", lambda work, name: 5)
    assert main(["bench", "--type", "wavenet", "--quick", "--json", "--repeats", "1",
                 "--no-memory", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["autograd", "eager", "fast"]
    assert {r["model"] for r in rows} == {"wavenet"} and {r["batch"] for r in rows} == {32}


def test_the_routes_by_device():
    assert bench.route_names(MLP, "cpu", False) == MLP_ROUTES
    assert bench.route_names(MLP, "cpu", True) == MLP_ROUTES + ["compiled"]
    assert bench.route_names(MLP, "cuda", False) == ["autograd", "eager", "fast", "compiled-ro"]
    assert bench.route_names(models.get("rnn"), "cuda", False) == ["autograd", "eager", "fast", "compiled-ro"]


def test_the_graph_route_runs_the_given_batches_in_order():
    """The CUDA route's mechanics, its steps run eagerly (on the CPU nothing is captured): the
    given batches, whole chunks and a remainder, match the fused step's own steps."""
    import torch

    from backprop_ninja.training.steps import make_step

    params, X, Y = bench.make_problem(MLP, 8, {"n_hidden": 16}, "cpu")
    route = bench.GraphRoute(make_step("fast", MLP, params, X, Y, 8), X.shape[0], 8)
    assert not route.runner.capture and route.next == bench.CHUNK  # built: one chunk run
    ref = make_step("fast", MLP, dict(route.runner.step.params), X, Y, 8)
    g = torch.Generator().manual_seed(4)
    for count in (250, 120):  # two chunks and a half, then a chunk and a fifth
        batches = [torch.randint(0, X.shape[0], (8,), generator=g) for _ in range(count)]
        bench.run_batches(route, batches, 0.05)
        for b in batches:
            ref.step(b, 0.05)
    assert route.next == 600
    torch.testing.assert_close(route.runner.step.flat, ref.flat, rtol=1e-5, atol=1e-6)
    assert bench.round_steps(route, 10) == bench.CHUNK and bench.round_steps(ref, 10) == 10


def test_every_model_has_its_sizes_and_its_tiny_configuration():
    """bench's sizes and the finite differences' tiny configurations are tables beside their
    users, not fields of the model spec: a model added without an entry fails here."""
    assert set(bench.SIZES) == set(models.MODELS) == set(TINY)
    for name, sizes in bench.SIZES.items():
        spec = models.get(name)
        for batch, overrides in sizes:
            assert batch >= 1 and set(overrides) <= set(spec.flags()), name
        assert set(TINY[name]) <= set(spec.flags()), name
