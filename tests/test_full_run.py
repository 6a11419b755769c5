"""The default runs, end to end: each model's recipe reaches its target losses.

The MLP's 200,000 steps take about a minute on one core with the fast step, the bigram's a few
seconds: both run by default. The WaveNet's take a few minutes, so its run is marked slow
(``pytest -m slow``); its gradients, fused step and a few hundred steps against autograd are
covered by the default suite.
"""

import json

import pytest

from backprop_ninja.cli import main

TARGETS = {  # type: (train, val, test) upper bounds, and the published figures they stand for
    "mlp": (2.08, 2.12, 2.13),       # lecture: 2.0705 / 2.1099
    "bigram": (2.48, 2.48, 2.48),    # the smoothed count table: about 2.45
    "wavenet": (1.78, 2.00, 2.00),   # makemore part 5: 1.769 / 1.993
}


@pytest.mark.parametrize("name", [
    "mlp", "bigram", pytest.param("wavenet", marks=pytest.mark.slow)])
def test_default_run_reaches_its_target(name, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "-o", str(out), "--no-progress", "--num-samples", "5", "--device", "cpu"]
    assert main(argv + ([] if name == "mlp" else ["--type", name])) == 0
    samples = capsys.readouterr().out.strip().splitlines()[-5:]
    assert all(s and set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples), samples
    assert main(["eval", "-o", str(out), "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)
    train, val, test = TARGETS[name]
    assert losses["train"] <= train and losses["val"] <= val and losses["test"] <= test, losses
