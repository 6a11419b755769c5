"""What several test files share."""

import random
from pathlib import Path

import torch
from torch.nn import functional


def one_line_error(capsys, rc: int, *needles: str) -> str:
    """The command failed with exit code 2 and one line on stderr holding every needle."""
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def lecture_loss_with_plain_torch() -> float:
    """The lecture's setup written out again with torch alone (none of this project's code): the
    names split 80/10/10 by random.seed(42), contexts of 3, every tensor from the generator seeded
    2147483647 in the lecture's order (C, W1, b1, W2, b2, then the batch of 32), bngain and bnbias
    drawn after the batch (the lecture took them from the unseeded global RNG), batchnorm with
    Bessel's n-1, and torch.nn.functional's cross_entropy."""
    path = Path(__file__).resolve().parents[1] / "src" / "backprop_ninja" / "data" / "names.txt"
    words = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    stoi = {ch: i + 1 for i, ch in enumerate(sorted(set("".join(words))))}
    random.Random(42).shuffle(words)
    xs, ys = [], []
    for w in words[:int(0.8 * len(words))]:
        context = [0, 0, 0]
        for ch in w + ".":
            ix = stoi.get(ch, 0)
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    Xtr, Ytr = torch.tensor(xs), torch.tensor(ys)
    V, g = len(stoi) + 1, torch.Generator().manual_seed(2147483647)
    C = torch.randn((V, 10), generator=g)
    W1 = torch.randn((30, 64), generator=g) * (5 / 3) / 30 ** 0.5
    b1 = torch.randn(64, generator=g) * 0.1
    W2 = torch.randn((64, V), generator=g) * 0.1
    b2 = torch.randn(V, generator=g) * 0.1
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    bngain = torch.randn((1, 64), generator=g) * 0.1 + 1.0
    bnbias = torch.randn((1, 64), generator=g) * 0.1
    hprebn = C[Xtr[ix]].view(32, -1) @ W1 + b1
    hpreact = bngain * (hprebn - hprebn.mean(0, keepdim=True)) / \
        (hprebn.var(0, keepdim=True, unbiased=True) + 1e-5).sqrt() + bnbias
    return functional.cross_entropy(torch.tanh(hpreact) @ W2 + b2, Ytr[ix]).item()
