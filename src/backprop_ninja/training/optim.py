"""Parameters and gradients in flat buffers, and the update rules that work on them.

With every parameter a view into one flat tensor and every gradient a view into another, an
optimiser step is a handful of kernels whatever the number of parameters: at the lecture's size
a kernel launch costs about as much as the arithmetic it does. The optimisers are written by
hand too; their state (AdamW's moments) lives in the checkpoint, so a resumed run is bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.base import Params


def views(flat: Tensor, like: Params) -> Params:
    """Views into ``flat`` shaped and named like ``like``, in its order."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[start:start + p.numel()].view(p.shape)
        start += p.numel()
    return out


class FlatParams:
    """A copy of the parameters in one flat buffer (``flat``, viewed as ``params``) and a
    same-sized gradient buffer (``grad``, viewed as ``grads``).

    With ``shards`` > 1 (ZeRO-1, ``zero``) both live at the start of zeroed storage of
    ``shards`` equal parts (``flat_padded``, ``grad_padded``), which collectives of equal
    parts take whole; otherwise the storage is the buffer itself."""

    def __init__(self, params: Params, shards: int = 1):
        flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        P = flat.numel()
        if shards > 1:
            self.flat_padded = flat.new_zeros(-(-P // shards) * shards)
            self.flat_padded[:P].copy_(flat)
            self.grad_padded = torch.zeros_like(self.flat_padded)
            self.flat, self.grad = self.flat_padded[:P], self.grad_padded[:P]
        else:
            self.flat = self.flat_padded = flat
            self.grad = self.grad_padded = torch.zeros_like(flat)
        self.params = views(self.flat, params)
        self.grads = views(self.grad, params)


@dataclass(frozen=True)
class OptimConfig:
    """The update rule: plain SGD (the lecture's) or AdamW (makemore's)."""

    name: str = "sgd"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    ema: float = 0.0  # > 0: also keep an exponential moving average of the parameters (Averaged)
    no_decay: tuple[str, ...] = ()  # parameters weight decay skips, by the last part of the name
    sam: float = 0.0  # > 0: the update takes the gradient rho = sam away (SharpnessAware)
    shards: int = 1  # > 1: the flat buffers padded to this many equal parts (ZeRO-1's, ``zero``)


def decay_mask(buffers: FlatParams, cfg: OptimConfig) -> Tensor | None:
    """1 where weight decay applies and 0 where it does not (``cfg.no_decay``), flat like the
    parameters; None when it applies everywhere (or nowhere), which needs no mask."""
    decays = {name: name.rsplit(".", 1)[-1] not in cfg.no_decay for name in buffers.params}
    if not cfg.weight_decay or all(decays.values()):
        return None
    return torch.cat([torch.full((p.numel(),), float(decays[name]), dtype=p.dtype, device=p.device)
                      for name, p in buffers.params.items()])


def shrink(p: Tensor, mask: Tensor | None, factor, amount) -> None:
    """Decoupled weight decay, p *= 1 - lr*wd (``factor``), or on the entries that the mask
    selects p += -lr*wd * p (``amount``)."""
    if mask is None:
        p.mul_(factor)
    else:
        p.addcmul_(p, mask, value=amount)


class SGD:
    """p -= lr * dp, every parameter in one kernel (weight decay, if any, as AdamW's: p *= 1 - lr*wd).

    Each update rule is written once, in ``update``, which takes the step's numbers (from
    ``numbers``) either as Python floats (``step``: the eager route) or as one-element tensors
    in device memory (a CUDA graph's table, ``cuda_graph``, where a Python number would be
    frozen into the graph). Both give the same bits (tests/test_train.py checks it): a float
    goes in as a kernel's scalar, a tensor through the same arithmetic in the same order.
    """

    columns = 3  # the step's numbers: [1 - lr*wd, -lr*wd, -lr]

    def __init__(self, buffers: FlatParams, cfg: OptimConfig):
        self.buffers, self.cfg = buffers, cfg
        self.decay = decay_mask(buffers, cfg)
        self.t = 0  # steps taken (SGD's numbers do not depend on it)

    def numbers(self, lr: float, t: int) -> list[float]:
        wd = self.cfg.weight_decay
        return [1.0 - lr * wd, -lr * wd, -lr]

    def step(self, lr: float) -> None:
        self.t += 1
        self.update(self.numbers(lr, self.t))

    def update(self, numbers) -> None:
        factor, amount, scale = numbers
        flat, grad = self.buffers.flat, self.buffers.grad
        if self.cfg.weight_decay:
            shrink(flat, self.decay, factor, amount)
        if isinstance(scale, Tensor):
            flat.addcmul_(grad, scale)
        else:
            flat.add_(grad, alpha=scale)

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


class AdamW:
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW computes it:

        p *= 1 - lr * wd
        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    over the flat buffers: a few kernels per step whatever the number of parameters. Its
    numbers, as SGD's (written once in ``update``, given as floats or device tensors):
    [1 - lr*wd, -lr*wd, -lr / (1 - b1^t), sqrt(1 - b2^t)].
    """

    columns = 4

    def __init__(self, buffers: FlatParams, cfg: OptimConfig):
        self.buffers, self.cfg = buffers, cfg
        self.m = torch.zeros_like(buffers.flat)
        self.v = torch.zeros_like(buffers.flat)
        self.denom = torch.zeros_like(buffers.flat)
        self.scaled: Tensor | None = None  # m times a tensor's scale (device numbers only)
        self.decay = decay_mask(buffers, cfg)
        self.t = 0

    def numbers(self, lr: float, t: int) -> list[float]:
        c = self.cfg
        return [1.0 - lr * c.weight_decay, -lr * c.weight_decay, -lr / (1.0 - c.beta1 ** t),
                math.sqrt(1.0 - c.beta2 ** t)]

    def step(self, lr: float) -> None:
        self.t += 1
        self.update(self.numbers(lr, self.t))

    def update(self, numbers) -> None:
        factor, amount, scale, root2 = numbers
        c, p, g = self.cfg, self.buffers.flat, self.buffers.grad
        shrink(p, self.decay, factor, amount)
        self.m.lerp_(g, 1.0 - c.beta1)
        self.v.mul_(c.beta2).addcmul_(g, g, value=1.0 - c.beta2)
        torch.sqrt(self.v, out=self.denom).div_(root2).add_(c.eps)
        if isinstance(scale, Tensor):  # (scale m) / denom: the same bits as addcdiv's value=
            if self.scaled is None:
                self.scaled = torch.empty_like(self.m)
            p.addcdiv_(torch.mul(self.m, scale, out=self.scaled), self.denom)
        else:
            p.addcdiv_(self.m, self.denom, value=scale)

    def state(self) -> dict[str, Tensor]:
        return {"adamw_m": self.m, "adamw_v": self.v,
                "adamw_t": torch.tensor(self.t, dtype=torch.long)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.m.copy_(state["adamw_m"])
        self.v.copy_(state["adamw_v"])
        self.t = int(state["adamw_t"])


class Averaged:
    """An update rule followed by an exponential moving average of the parameters it updates
    (Polyak averaging, as in "EMA weights"): after each step

        avg = d_t avg + (1 - d_t) p,     d_t = min(ema, (1 + t) / (10 + t))

    for the t-th step averaged (from 0). The short warm-up of d_t lets the average forget the
    initialisation within a few steps at the start of a run instead of over ~1/(1-ema) steps.
    Training goes on from ``p``; the average is what the run evaluates, samples and saves as its
    model: it smooths out the last steps' noise, which a model that overfits (the transformer)
    pays for on held-out data. ``averaged`` views the average like the parameters. Its state
    (the average and t) goes into the checkpoint with the rule's own, so resume stays bit-exact.
    """

    def __init__(self, inner, ema: float):
        self.inner, self.ema, self.buffers = inner, ema, inner.buffers
        self.avg = inner.buffers.flat.clone()
        self.averaged = views(self.avg, inner.buffers.params)
        self.t = 0

    def step(self, lr: float) -> None:
        self.inner.step(lr)
        d = min(self.ema, (1.0 + self.t) / (10.0 + self.t))
        self.avg.lerp_(self.buffers.flat, 1.0 - d)
        self.t += 1

    def state(self) -> dict[str, Tensor]:
        return {**self.inner.state(), "ema_params": self.avg,
                "ema_t": torch.tensor(self.t, dtype=torch.long)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state(state)
        self.avg.copy_(state["ema_params"])
        self.t = int(state["ema_t"])


class SharpnessAware:
    """Sharpness-aware minimisation (SAM; Foret et al., 2021): the update rule is given the
    gradient taken rho away from the parameters, uphill, instead of the gradient at them:

        e = rho * g / |g|          g: the batch's gradient at p; |g| over every parameter at once
        g_sam = dL(p + e)/dp       a second forward and backward, on the same batch
        p <- rule(p, g_sam)        then the parameters go back to p before the rule moves them

    To first order p + e is where the batch's loss rises most within a ball of radius rho, so
    g_sam pushes towards parameters whose whole neighbourhood has a low loss: a flat minimum,
    which holds up better on data it was not trained on than a sharp one. Twice the forward and
    backward work per step; a model with dropout draws fresh masks for the second pass.

    ``__call__`` takes the step's gradient function (it fills ``buffers.grad`` for a batch) after
    it has run once at p. p is restored from a copy: p + e - e would round. After a step,
    ``saved`` holds p and ``e`` the move; ``first``, when given a buffer, the first gradient
    (what ``--check-grads`` compares).
    """

    def __init__(self, buffers: FlatParams, rho: float):
        self.buffers, self.rho = buffers, rho
        self.saved = torch.empty_like(buffers.flat)
        self.e = torch.empty_like(buffers.flat)
        self.first: Tensor | None = None

    def __call__(self, gradients, ix: Tensor) -> None:
        flat, grad = self.buffers.flat, self.buffers.grad
        if self.first is not None:
            self.first.copy_(grad)
        self.saved.copy_(flat)
        # on the device, no read-back; a zero gradient gives e = 0 (the tiny term keeps it finite)
        torch.mul(grad, self.rho / (torch.linalg.vector_norm(grad) + 1e-12), out=self.e)
        flat.add_(self.e)
        gradients(ix)
        flat.copy_(self.saved)


def sharpness_aware(buffers: FlatParams, cfg: OptimConfig) -> SharpnessAware | None:
    return SharpnessAware(buffers, cfg.sam) if cfg.sam else None


def descend(gradients, ix: Tensor, lr: float, optimizer, sam: SharpnessAware | None) -> Tensor:
    """One training step of any route: the batch's gradients (``gradients(ix)`` fills the flat
    gradient buffer and returns the loss), taken again uphill with --sam, then the update."""
    loss = gradients(ix)
    if sam is not None:
        sam(gradients, ix)
    optimizer.step(lr)
    return loss


OPTIMIZERS = {"sgd": SGD, "adamw": AdamW}


def make_optimizer(buffers: FlatParams, cfg: OptimConfig):
    rule = OPTIMIZERS[cfg.name](buffers, cfg)
    return Averaged(rule, cfg.ema) if cfg.ema else rule


def model_params(optimizer) -> Params:
    """The parameters a run evaluates and saves: the average if the optimiser keeps one."""
    return optimizer.averaged if isinstance(optimizer, Averaged) else optimizer.buffers.params
