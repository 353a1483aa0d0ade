"""L-inf attacks with one call signature: ``attack(model, x, y, kind=..., eps=..., step_size=..., steps=..., restarts=...)``.

Inputs are pixels in [0, 1] (no normalisation, as in the paper's reference). Every adversarial example
stays inside the eps-ball around ``x`` and inside [0, 1].

Model mode: the attacks run the model in **eval mode** (BatchNorm uses its running statistics and the
attack's forward passes do not update them) and restore the mode the model had on entry. Only the input
gets a gradient (``torch.autograd.grad`` w.r.t. the perturbation), so no weight gradients are computed
or accumulated during the attack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("pgd", "fgsm-rs", "none")


def _input_grad(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def _random_start(x: Tensor, eps: float) -> Tensor:
    delta = torch.empty_like(x).uniform_(-eps, eps)
    return (x + delta).clamp_(0.0, 1.0)


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
        restarts: int = 1, random_start: bool = True) -> Tensor:
    """Madry PGD-Linf: uniform random start in the eps-ball, ``steps`` signed-gradient ascent steps of
    ``step_size``, projection onto the eps-ball and [0, 1] after each step. With ``restarts`` > 1 the
    worst case per example is kept (the first restart that fools the model)."""
    was_training = model.training
    model.eval()
    try:
        best = None
        fooled = None
        for r in range(restarts):
            x_adv = _random_start(x, eps) if random_start else x.clone()
            for _ in range(steps):
                g = _input_grad(model, x_adv, y)
                x_adv = _project(x_adv.detach() + step_size * g.sign(), x, eps)
            x_adv = x_adv.detach()
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                wrong = model(x_adv).argmax(1) != y
            if best is None:
                best, fooled = x_adv, wrong
            else:
                take = wrong & ~fooled
                best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                fooled = fooled | wrong
        return best
    finally:
        model.train(was_training)


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int = 1,
            restarts: int = 1) -> Tensor:
    """FGSM with a random start (Wong et al., 2020, "fast adversarial training"): one signed step of
    ``step_size`` (typically 1.25 eps) from a uniform random point of the eps-ball, then projection."""
    was_training = model.training
    model.eval()
    try:
        x_adv = _random_start(x, eps)
        g = _input_grad(model, x_adv, y)
        return _project(x_adv.detach() + step_size * g.sign(), x, eps).detach()
    finally:
        model.train(was_training)


def attack(model: nn.Module, x: Tensor, y: Tensor, *, kind: str, eps: float, step_size: float, steps: int,
           restarts: int = 1) -> Tensor:
    """Dispatch by ``kind`` (pgd | fgsm-rs | none); ``none`` returns ``x`` itself."""
    if kind == "pgd":
        return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, restarts=restarts)
    if kind == "fgsm-rs":
        return fgsm_rs(model, x, y, eps=eps, step_size=step_size)
    if kind == "none" or eps == 0:
        return x
    raise ValueError(f"unknown attack kind {kind!r}; expected one of {', '.join(KINDS)}")


@torch.no_grad()
def _count_correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).argmax(1) == y).sum()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, kind: str, eps: float, step_size: float, steps: int,
             restarts: int = 1, batch_size: int = 500, to_float=None) -> tuple[float, float]:
    """Natural and adversarial accuracy of ``model`` (in eval mode) on ``(x, y)``, batch by batch.

    ``to_float`` converts a stored batch (e.g. uint8) to [0, 1] floats. Counts stay on the device and are
    read once at the end."""
    was_training = model.training
    model.eval()
    dev = x.device
    nat = torch.zeros((), dtype=torch.long, device=dev)
    adv = torch.zeros((), dtype=torch.long, device=dev)
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            xb = to_float(xb) if to_float is not None else xb
            yb = y[i:i + batch_size]
            nat += _count_correct(model, xb, yb)
            xa = attack(model, xb, yb, kind=kind, eps=eps, step_size=step_size, steps=steps, restarts=restarts)
            adv += _count_correct(model, xa, yb)
    finally:
        model.train(was_training)
    n = max(len(x), 1)
    return nat.item() / n, adv.item() / n
