"""The benchmark's mechanics (its figures are machine-dependent and printed, never asserted)."""

import json
from types import SimpleNamespace

import pytest

from backprop_ninja import bench as B
from backprop_ninja.cli import main


def test_bench_rows_and_json(capsys):
    rows = B.bench("cpu", sizes=((8, 16),), repeats=1, memory=False, log=lambda s: None)
    assert [r.impl for r in rows] == list(B.ROUTES)
    by = {r.impl: r for r in rows}
    assert by["autograd"].ratio_vs_autograd == 1.0
    for r in rows:
        assert r.batch == 8 and r.n_hidden == 16 and r.us_per_step > 0
        assert r.steps_per_s == pytest.approx(1e6 / r.us_per_step, rel=0.01)
    data = json.loads(B.rows_to_json(rows))
    assert set(data[0]) >= {"impl", "batch", "n_hidden", "us_per_step", "ratio_vs_autograd", "peak_mem_bytes"}
    assert "vs autograd" in B.format_rows(rows)


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
    monkeypatch.setattr(B, "time", clock)
    monkeypatch.setattr(B, "make_route", lambda name, *a: clock.route(us[name]))
    rows = B.bench("cpu", sizes=((8, 16),), repeats=3, memory=False, log=lambda s: None)
    got = {r.impl: (r.us_per_step, r.steps_per_s, r.ratio_vs_autograd) for r in rows}
    assert got == {"autograd": (400.0, 2500.0, 1.0), "lecture": (8000.0, 125.0, 0.05),
                   "eager": (200.0, 5000.0, 2.0), "fast": (125.0, 8000.0, 3.2)}


def test_peak_memory_is_measured_in_a_fresh_process():
    small = B.peak_memory("fast", 64, 64, "cpu")
    large = B.peak_memory("autograd", 2048, 512, "cpu")
    if small is None:
        pytest.skip("peak RSS cannot be reset on this system")
    assert 0 <= small < large
    assert large > 2048 * 512 * 4  # at least one n x H activation


def test_bench_command_json(capsys, monkeypatch):
    monkeypatch.setattr(B, "SIZES", ((8, 16),))
    monkeypatch.setattr(B, "steps_for", lambda batch, n_hidden, name: 5)
    assert main(["bench", "--json", "--repeats", "1", "--no-memory"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == list(B.ROUTES)
