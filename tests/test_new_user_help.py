"""The help a new user reads: at once (no torch imported for --help or a usage error), with each
type's recipe, and with the command line's copy of the models' metadata kept true."""

import dataclasses
import subprocess
import sys

import pytest

from backprop_ninja import models
from backprop_ninja.cli import catalog, main
from backprop_ninja.learning.sandbox import TIME_LIMIT_S
from backprop_ninja.training import distributed
from backprop_ninja.training.config import TrainConfig
from backprop_ninja.training.distill import DEFAULT_WEIGHT

NO_TORCH = ("import sys; from backprop_ninja.cli import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"],
                                  ["plot", "diagnostics", "--help"], ["check", "--help"],
                                  ["exercise", "--help"], ["train", "--no-such-flag"],
                                  ["sample", "-n"]])
def test_help_and_usage_errors_do_not_import_torch(argv):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode in (0, 2), result.stderr
    assert "torch was imported" not in result.stderr and "Traceback" not in result.stderr


def test_the_catalog_matches_the_models():
    assert list(catalog.MODELS) == list(models.MODELS)
    assert catalog.DEFAULT == models.DEFAULT
    for name, spec in models.MODELS.items():
        flags, recipe = catalog.MODELS[name]
        assert flags == spec.defaults(), name
        assert recipe == spec.recipe, name
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    assert {k: defaults[k] for k in catalog.TRAIN_DEFAULTS} == catalog.TRAIN_DEFAULTS
    assert catalog.DISTILL_DEFAULT == DEFAULT_WEIGHT
    assert catalog.CHECK_TIME_LIMIT_S == TIME_LIMIT_S
    assert catalog.GROUP_TIMEOUT_S == distributed.DEFAULT_TIMEOUT
    assert set(catalog.SEQUENCE_MODELS) == {n for n, s in models.MODELS.items()
                                            if s.layout == "sequence"}


def test_train_help_shows_each_types_recipe_and_the_defaults(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in models.MODELS.items():
        r = spec.recipe
        assert f"{name} {r['steps']:,} {r.get('optimizer', 'sgd')} {r['batch_size']} {r['lr']:g}" \
            in text, name
    assert "SGD steps" not in text and "SGD or AdamW" in text
    assert "0 for rnn, gru, bow, transformer: automatic" in text
    for default in ("never; default 10000", "only at the end; default 10000",
                    "never; default 1000"):
        assert default in text
    for command in ("eval", "sample"):
        assert main([command, "--help"]) == 0
        assert "cuda when available" in capsys.readouterr().out
