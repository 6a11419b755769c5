"""The benchmark's mechanics (its figures are machine-dependent and printed, never asserted)."""

import json

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
        assert r.ratio_vs_autograd == pytest.approx(by["autograd"].us_per_step / r.us_per_step, rel=0.02)
    data = json.loads(B.rows_to_json(rows))
    assert set(data[0]) >= {"impl", "batch", "n_hidden", "us_per_step", "ratio_vs_autograd", "peak_mem_bytes"}
    assert "vs autograd" in B.format_rows(rows)


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
