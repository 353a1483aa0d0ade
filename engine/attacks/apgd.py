"""APGD-Linf (Croce & Hein, ICML 2020): PGD with momentum and a step size that adapts per example.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks", Sec. 3:

* start: ``x + eps * t / ||t||_inf`` with ``t`` uniform in [-1, 1]^d (the published code's start: a point
  on the surface of the eps-ball), clipped to [0, 1]; step size ``eta = 2 eps``;
* step: ``z = P(x_k + eta sign(grad))``, ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
  with ``alpha = 0.75`` (``alpha = 1``, no momentum, in the first step), ``P`` the projection onto the
  eps-ball and [0, 1];
* checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``:
  at each one, an example's step is halved, and the example restarts from its best point, when (1) the loss
  increased in fewer than ``rho`` of the steps since the last checkpoint, or (2) its step was not halved at
  the last checkpoint and its best loss did not improve since.

Losses: cross-entropy, DLR (difference of logits ratio) and targeted DLR (APGD-T). Per example the best-loss
point is kept; an example some iterate misclassified gets the last such iterate (as the published code
does). Restarts, and APGD-T's target classes, run on the examples not fooled yet. The random starts are drawn
on the CPU from ``generator`` and moved to ``x``'s device (the same stream on a CPU and a GPU), for the
examples left, before the batch is split into chunks (see :func:`._split_run`).

Where the published code (auto-attack, and torchattacks' copy of it) and the paper differ, this follows the
paper: checkpoints from the ``p_j`` (the code's are the same for 100 steps, not for 50); condition 1 strict
(the code: at most ``rho``); the first window's first increase counted from the start's loss (the code: from
0); condition 2 possible at the first checkpoint; after going back to the best point, increases counted from
the best loss. With 100 steps and the same seed, robust accuracies equal torchattacks' (tests/test_apgd.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import eval_mode
from .fastpath import _split_run, attack_model

LOSSES = ("ce", "dlr")
ALPHA = 0.75  # momentum


def dlr_loss(logits: Tensor, y: Tensor, y_target: Tensor | None = None) -> Tensor:
    """Per example, DLR: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, or targeted DLR:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi1 >= z_pi2 >= ...`` the sorted logits."""
    zs, order = logits.sort(1, descending=True)
    zy = logits.gather(1, y[:, None]).squeeze(1)
    if y_target is None:
        other = torch.where(order[:, 0] == y, zs[:, 1], zs[:, 0])
        return -(zy - other) / (zs[:, 0] - zs[:, 2] + 1e-12)
    zt = logits.gather(1, y_target[:, None]).squeeze(1)
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def _loss(logits: Tensor, y: Tensor, y_target: Tensor, loss: str) -> Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return dlr_loss(logits, y, y_target if loss == "dlr-t" else None)


def _checkpoints(steps: int) -> set[int]:
    """The iterations ``w_j`` after which the step size is checked (``p_j`` in hundredths, exact)."""
    p_prev, p, out = 0, 22, set()
    while p <= 100:
        out.add(-(-p * steps // 100))
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def _apgd_chunk(net: nn.Module, x: Tensor, y: Tensor, y_target: Tensor, start: Tensor, *, eps: float,
                steps: int, rho: float, loss: str, eot: int = 1) -> Tensor:
    """One APGD run from ``start``: per example, the last misclassified iterate if any, else the best-loss one."""
    entry = getattr(net, "s2d_entry", None)
    finish = lambda t: t  # noqa: E731
    if entry is not None and entry.applies(x):  # iterate space-to-depth, as PGD does (see _S2DEntry)
        net, finish = entry.graph, entry.pool.shuffle
        x, start = entry.pool.unshuffle(x), entry.pool.unshuffle(start)
    lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    per_ex = lambda m: m.view(-1, *([1] * (x.dim() - 1)))  # noqa: E731 - a per-example flag over a batch

    def forward(x_adv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Misclassified, loss and input gradient at ``x_adv``; with ``eot`` > 1 the gradient is the mean over
        ``eot`` passes (expectation over transformation, for a model with randomness), the rest the last pass's."""
        x_adv = x_adv.detach().requires_grad_(True)
        g = None
        for _ in range(max(eot, 1)):
            logits = net(x_adv)
            value = _loss(logits, y, y_target, loss)
            (gi,) = torch.autograd.grad(value.sum(), x_adv)
            g = gi if g is None else g.add_(gi)
        if eot > 1:
            g = g.div_(eot)
        return logits.detach().argmax(1) != y, value.detach(), g

    checkpoints = _checkpoints(steps)
    with torch.enable_grad():
        wrong, value, g = forward(start)
        x_adv = x_old = x_fooled = x_best = start
        fooled, best, g_best = wrong, value, g
        eta = torch.full_like(value, 2 * eps)
        prev, best_at_check, reduced = value, best, torch.zeros_like(wrong)
        ups, last_check = torch.zeros_like(value), 0
        for k in range(steps):
            a = ALPHA if k > 0 else 1.0
            z = torch.clamp(x_adv + per_ex(eta) * g.sign(), lo, hi)
            x_adv, x_old = torch.clamp(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_old), lo, hi), x_adv
            wrong, value, g = forward(x_adv)
            x_fooled, fooled = torch.where(per_ex(wrong), x_adv, x_fooled), fooled | wrong
            ups += value > prev
            prev = value
            better = value > best
            x_best, g_best, best = (torch.where(per_ex(better), x_adv, x_best),
                                    torch.where(per_ex(better), g, g_best), torch.where(better, value, best))
            if k + 1 in checkpoints:  # halve the step and go back to the best point where it stalls
                reduce = (ups < rho * (k + 1 - last_check)) | (~reduced & (best <= best_at_check))
                eta = torch.where(reduce, eta / 2, eta)
                x_adv, g = torch.where(per_ex(reduce), x_best, x_adv), torch.where(per_ex(reduce), g_best, g)
                prev = torch.where(reduce, best, prev)
                reduced, best_at_check, ups, last_check = reduce, best, torch.zeros_like(ups), k + 1
    return finish(torch.where(per_ex(fooled), x_fooled, x_best).detach())


def _uniform_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    t = (2 * torch.rand(x.shape, generator=generator, device="cpu") - 1).to(x)
    return (x + eps * t / t.flatten(1).abs().amax(1).view(-1, *([1] * (x.dim() - 1)))).clamp(0.0, 1.0)


def _run(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, restarts: int, loss: str, rho: float,
         generator: torch.Generator | None, n_targets: int = 0, eot: int = 1) -> Tensor:
    """APGD with ``loss``, untargeted (``n_targets`` 0) or for each of ``n_targets`` target classes (the 2nd,
    3rd, ... largest clean logit), ``restarts`` runs each, on the examples not fooled yet; the points each
    example ends with (see the module docstring)."""
    with eval_mode(model):
        net = attack_model(model)
        with torch.no_grad():
            logits = net(x)
        adv, fooled = x.clone(), logits.argmax(1) != y
        best = torch.full_like(y, float("-inf"), dtype=logits.dtype)  # the loss of each example's point so far
        ranked = logits.argsort(1, descending=True)
        ranks = range(2, min(n_targets, logits.shape[1] - 1) + 2) if n_targets else [None]
        run = lambda m, *b: _apgd_chunk(m, *b, eps=eps, steps=steps, rho=rho, loss=loss, eot=eot)  # noqa: E731
        for rank in ranks:
            for _ in range(max(restarts, 1)):
                left = (~fooled).nonzero().squeeze(1)
                if len(left) == 0:
                    return adv
                xs, ys = x[left], y[left]
                yt = ranked[left, rank - 1] if rank is not None else ys
                out = _split_run(run, net, model, xs, ys, yt, _uniform_start(xs, eps, generator))
                with torch.no_grad():
                    logits = net(out)
                wrong, value = logits.argmax(1) != ys, _loss(logits, ys, yt, loss)
                keep = wrong | (value > best[left])  # fooled, or a higher loss than an earlier run's point
                adv[left[keep]] = out[keep]
                best[left] = torch.where(keep, value, best[left])
                fooled[left] = wrong
        return adv


def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 100, restarts: int = 1,
         loss: str = "ce", rho: float = 0.75, generator: torch.Generator | None = None, eot_iter: int = 1) -> Tensor:
    """Untargeted APGD-Linf on ``loss`` ("ce": cross-entropy, APGD-CE; "dlr": :func:`dlr_loss`, APGD-DLR):
    ``steps`` iterations, ``restarts`` runs on the examples not fooled yet; random starts from ``generator``
    (a CPU generator; None: torch's default one). ``eot_iter`` > 1 averages each step's gradient over that many
    passes (AutoAttack's rand version: 20)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown APGD loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return _run(model, x, y, eps=eps, steps=steps, restarts=restarts, loss=loss, rho=rho, generator=generator,
                eot=eot_iter)


def apgd_targeted(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 100, restarts: int = 1,
                  n_target_classes: int = 9, rho: float = 0.75,
                  generator: torch.Generator | None = None) -> Tensor:
    """APGD-T: APGD-Linf on the targeted DLR loss, with the target each of the classes with the 2nd, 3rd, ...,
    (``n_target_classes`` + 1)-th largest clean logit in turn, each with ``restarts`` runs, on the examples
    not fooled yet."""
    return _run(model, x, y, eps=eps, steps=steps, restarts=restarts, loss="dlr-t", rho=rho, generator=generator,
                n_targets=max(n_target_classes, 1))
