"""PGD-Linf (Madry et al., 2018): a random start in the eps-ball, signed-gradient steps, projection.

The loss ascended is the cross-entropy (``loss="ce"``) or the Carlini-Wagner margin (``loss="cw"``, see
:func:`cw_loss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import eval_mode
from .fastpath import _split_run, attack_model

LOSSES = ("ce", "cw")


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The Carlini-Wagner margin summed over the batch: per example, the largest logit of a wrong class minus
    the logit of the true class (positive exactly when the example is misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (wrong - true).sum()


def _input_grad(model: nn.Module, x_adv: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    out = model(x_adv)
    value = F.cross_entropy(out, y, reduction="sum") if loss == "ce" else cw_loss(out, y)
    (grad,) = torch.autograd.grad(value, x_adv)
    return grad


def _random_start(x: Tensor, eps: float, generator: torch.Generator | None = None,
                  rows: tuple[int, int, int] | None = None) -> Tensor:
    """A uniform point of the eps-ball around ``x``, clipped to [0, 1]. With a (CPU) ``generator`` it is drawn on
    the CPU and moved to ``x``'s device: the same numbers on every device (evaluations); without one, from the
    device's own generator (training: no host round trip).

    ``rows = (start, stop, total)``: ``x`` is rows ``start:stop`` of a batch of ``total`` (a data-parallel rank's
    share): the noise is drawn for the whole batch and those rows taken, so each example starts where it would
    in one process and every rank's generator stays in the same state."""
    shape = x.shape if rows is None else (rows[2], *x.shape[1:])
    if generator is None:  # in x's memory format: the numbers land where they always have
        fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
               and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        delta = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt).uniform_(-eps, eps)
    else:
        delta = torch.empty(shape, dtype=x.dtype).uniform_(-eps, eps, generator=generator).to(x.device)
    if rows is not None:
        delta = delta[rows[0]:rows[1]]
    return (x + delta).clamp_(0.0, 1.0)


def skip_random_starts(x: Tensor, eps: float, generator: torch.Generator, count: int) -> None:
    """Advance ``generator`` past the ``count`` random starts an attack of ``x`` would draw (a batch another
    rank evaluates), so the next batch's starts are those of a single process."""
    for _ in range(count):
        _random_start(x, eps, generator)


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _pgd_chunk(net: nn.Module, x: Tensor, y: Tensor, lo: Tensor, hi: Tensor, *starts: Tensor, step_size: float,
               steps: int, loss: str = "ce") -> Tensor:
    """PGD from each start in ``starts`` (one per restart); per example, the first restart that fools ``net``."""
    entry = getattr(net, "s2d_entry", None)
    finish = lambda t: t  # noqa: E731
    if entry is not None and entry.applies(x):  # iterate space-to-depth (see _S2DEntry)
        net, finish = entry.graph, entry.pool.shuffle
        lo, hi = entry.pool.unshuffle(lo), entry.pool.unshuffle(hi)
        starts = tuple(entry.pool.unshuffle(s) for s in starts)
    best = None
    fooled = None
    with torch.enable_grad():
        for start in starts:
            x_adv = start.clone()
            for _ in range(steps):
                g = _input_grad(net, x_adv, y, loss)
                # x_adv + step * sign(g), projected onto the eps-ball and [0, 1], in place (x_adv is ours)
                x_adv = x_adv.detach().add_(g.sign_(), alpha=step_size)
                torch.maximum(x_adv, lo, out=x_adv)
                torch.minimum(x_adv, hi, out=x_adv)
                x_adv.clamp_(0.0, 1.0)
            x_adv = x_adv.detach()
            if len(starts) == 1:
                return finish(x_adv)
            with torch.no_grad():
                wrong = net(x_adv).argmax(1) != y
            if best is None:
                best, fooled = x_adv, wrong
            else:
                take = wrong & ~fooled
                best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                fooled = fooled | wrong
    return finish(best)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int,
        restarts: int = 1, random_start: bool = True, loss: str = "ce",
        generator: torch.Generator | None = None, rows: tuple[int, int, int] | None = None) -> Tensor:
    """Madry PGD-Linf: uniform random start in the eps-ball, ``steps`` signed-gradient ascent steps of
    ``step_size`` on ``loss`` ("ce": cross-entropy, "cw": :func:`cw_loss`), projection onto the eps-ball and
    [0, 1] after each step. With ``restarts`` > 1 the worst case per example is kept (the first restart that
    fools the model). The random starts are drawn for the whole batch, in order, before any chunk runs (see
    :func:`_split_run`), from ``generator`` when given, for the whole batch of a rank's ``rows`` (see
    :func:`_random_start`)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown PGD loss {loss!r}; expected one of {', '.join(LOSSES)}")
    with eval_mode(model):
        net = attack_model(model)
        starts = [_random_start(x, eps, generator, rows) if random_start else x for _ in range(max(restarts, 1))]
        run = lambda m, *b: _pgd_chunk(m, *b, step_size=step_size, steps=steps, loss=loss)  # noqa: E731
        return _split_run(run, net, model, x, y, x - eps, x + eps, *starts)


