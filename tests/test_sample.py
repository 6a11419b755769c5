"""Sampling: valid items, batched, seeded; and the whole loop on a non-a-z alphabet."""

import pytest
import torch

from backprop_ninja.cli import main
from backprop_ninja.models import mlp
from backprop_ninja.nn.normalisation import BatchNormStats
from backprop_ninja.training.sampling import sample_indices


def random_model(V=7, T=3, H=8):
    params = mlp.init(mlp.Config(V, T, 4, H), torch.Generator().manual_seed(5))
    stats = {"bn": BatchNormStats(torch.zeros(1, H), torch.ones(1, H))}
    return params, stats


def sample(params, stats, *args, **kwargs):
    return sample_indices(mlp.SPEC, params, stats, *args, **kwargs)


def test_samples_are_valid_and_stop_at_the_boundary():
    params, stats = random_model()
    g = torch.Generator().manual_seed(0)
    items = sample(params, stats, 3, 200, g, max_len=12)
    assert len(items) == 200
    assert all(0 < ix < 7 for item in items for ix in item)  # the boundary never inside an item
    assert all(len(item) <= 12 for item in items)
    assert len({tuple(i) for i in items}) > 50  # many distinct items


def test_seeded_top_k_and_temperature():
    params, stats = random_model()
    run = lambda seed, **kw: sample(params, stats, 3, 30, torch.Generator().manual_seed(seed),
                                            max_len=10, **kw)
    assert run(1) == run(1) and run(1) != run(2)
    greedy = run(3, top_k=1)
    assert all(item == greedy[0] for item in greedy)  # top-1 is deterministic: one item 30 times
    cold, warm = run(4, temperature=0.001), run(4, temperature=2.0)
    distinct = lambda items: len({tuple(i) for i in items})
    assert greedy[0] in cold and distinct(cold) < distinct(warm)
    from backprop_ninja.errors import UserError
    with pytest.raises(UserError, match="temperature"):
        run(5, temperature=0)
    with pytest.raises(UserError, match="top-k"):
        run(5, top_k=0)


def test_train_and_sample_any_alphabet(tmp_path, capsys):
    words = ["Zoë", "José", "北京", "a.b", "x-y!", "Ñandú", "東京", "O'Neil", "ÅSA", "straße",
             "Ångström", "naïve", "façade", "日本語", "São Paulo"] * 4
    f = tmp_path / "words.txt"
    f.write_text("\n".join(words) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "-i", str(f), "-o", str(out), "--steps", "300", "--n-hidden", "32",
                 "--batch-size", "8", "--no-progress", "--num-samples", "0", "--eval-every", "100"]) == 0
    capsys.readouterr()
    assert main(["sample", "-o", str(out), "-n", "40", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 40
    alphabet = set("".join(words))
    assert all(set(line) <= alphabet for line in lines)
    assert "of 40 samples" in captured.err and "new (not in the training file)" in captured.err
    assert main(["sample", "-o", str(out), "-n", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
