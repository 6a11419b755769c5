"""What several test files share."""

import random
import threading
from pathlib import Path
from types import SimpleNamespace

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


class ThreadGroup:
    """N ranks as threads, their collectives barriers: each rank's tensor put in its slot, and
    sums taken in rank order. The same hand-written code as a gloo group runs, without starting
    processes."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def exchange(self, rank: int, t: torch.Tensor) -> list:
        """Every rank's ``t``, in rank order."""
        self.slots[rank] = t.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def total(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        got = self.exchange(rank, t)
        total = got[0].clone()
        for s in got[1:]:
            total += s
        return total

    def reduce_for(self, rank: int):
        """Rank ``rank``'s all-reduce: sums a tensor in place."""
        return lambda t: t.copy_(self.total(rank, t))

    def collectives_for(self, rank: int) -> SimpleNamespace:
        """Rank ``rank``'s group, as ``training.distributed.Group`` offers it to the ZeRO-1 rule:
        all_reduce, reduce_scatter and all_gather_into."""
        def reduce_scatter(out: torch.Tensor, t: torch.Tensor) -> None:
            out.copy_(self.total(rank, t).view(self.world, -1)[rank])

        def all_gather_into(out: torch.Tensor, t: torch.Tensor) -> None:
            out.copy_(torch.cat(self.exchange(rank, t)))

        return SimpleNamespace(rank=rank, world=self.world, all_reduce=self.reduce_for(rank),
                               reduce_scatter=reduce_scatter, all_gather_into=all_gather_into)

    def run(self, fn) -> list:
        """fn(rank, reduce) in one thread per rank; their results in rank order."""
        out, errors = [None] * self.world, []

        def body(r):
            try:
                out[r] = fn(r, self.reduce_for(r))
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out
