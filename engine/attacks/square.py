"""Square Attack, Linf (Andriushchenko et al., ECCV 2020): a score-based random search, as AutoAttack runs it.

No gradients: the attack only reads the logits, through the margin loss ``z_y - max_{k != y} z_k`` (an example
is fooled once it is negative). It starts from vertical stripes of +-eps (one random sign per column and
channel), then at each iteration proposes, for every example not yet fooled, a random square window (its own
position per example) set per channel to +-eps, and keeps the proposal when the margin goes down. The window
side follows the published schedule of ``p`` (the fraction of the pixels it covers, :func:`p_schedule`).

Random numbers are drawn on the CPU from ``generator`` and moved to ``x``'s device, so that a CPU and a GPU
run draw the same stream; one row per example and iteration, so that an example's draws depend neither on the
others nor on how the CPU fast path cuts the batch into chunks (:func:`_square_run`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models import eval_mode
from .fastpath import _split_run, attack_model

BLOCK = 100  # iterations per draw of uniforms and per run of the chunks side by side
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # on the iteration rescaled to 10000 queries


def p_schedule(it: int, queries: int, p_init: float = 0.8) -> float:
    """The fraction of the pixels the window covers at iteration ``it`` (0-based) of ``queries``: ``p_init``,
    halved at each threshold of :data:`P_HALVINGS` that ``it * 10000 // queries`` has passed (``> 10``: p/2,
    ..., ``> 8000``: p/512). AutoAttack rescales with floats (``int(it / queries * 10000)``); integer
    arithmetic gives the same value without its rounding at the thresholds."""
    t = it * 10000 // max(queries, 1)
    return p_init / 2 ** sum(t > b for b in P_HALVINGS)


@torch.no_grad()  # (grad mode is per thread: the chunks run on worker threads)
def _margin(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per example, the true class's logit minus the largest other logit (< 0: misclassified)."""
    z = net(x).float()
    true = z.gather(1, y[:, None])
    return (true - z.scatter(1, y[:, None], float("-inf")).amax(1, keepdim=True)).squeeze(1)


def _signs(pos: Tensor, eps: float, like: Tensor) -> Tensor:
    """+eps where ``pos``, else -eps, on ``like``'s device and dtype, broadcast over the pixels."""
    signs = (pos.to(like.device, like.dtype) * 2 - 1) * eps
    return signs.view(*signs.shape, *[1] * (like.dim() - signs.dim()))


@torch.no_grad()
def _iterate(net: nn.Module, x: Tensor, y: Tensor, x_best: Tensor, m_best: Tensor, u: Tensor, *, eps: float,
             it0: int, queries: int, p_init: float) -> Tensor:
    """Iterations ``it0, it0 + 1, ...`` of one run (one per column of ``u``, the uniforms ``(n, iterations, c + 3)``)
    on the examples not yet fooled: ``x_best`` and ``m_best`` (the last accepted points and their margins) are
    updated in place, ``m_best`` is returned. Row i of everything depends on row i of the inputs only."""
    n, c, h, w = x.shape
    dev = x.device
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    flip_bits = 2 ** torch.arange(c, device=dev)
    for j in range(u.shape[1]):
        act = (m_best >= 0).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        uj, xa, xb = u[act, j], x[act], x_best[act]
        s = min(max(round(math.sqrt(p_schedule(it0 + j, queries, p_init) * h * w)), 1), h, w)
        # top-left corner per example, uniform in [0, h - s) x [0, w - s) as in AutoAttack; a (k, 1, h, w) mask
        corner = (uj[:, :2] * torch.tensor([h - s, w - s], device=dev)).long()
        in_h = (rows >= corner[:, :1]) & (rows < corner[:, :1] + s)
        in_w = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + s)
        window = (in_h[:, :, None] & in_w[:, None, :])[:, None]
        pos = uj[:, 2:2 + c] < 0.5  # the sign per example and channel
        x_new = torch.where(window, (xa + _signs(pos, eps, xa)).clamp(0.0, 1.0), xb)
        # A window that would stay as it is (each of its channels already at the drawn sign) gets a sign vector
        # uniform among the 2^c - 1 others: the distribution of the reference's redraw-until-different loop.
        same = (x_new == xb).flatten(1).all(1)
        if same.any():
            flip = (((uj[:, -1:] * (2 ** c - 1)).long() + 1) & flip_bits) > 0
            pos = pos ^ (flip & same[:, None])
            x_new = torch.where(window, (xa + _signs(pos, eps, xa)).clamp(0.0, 1.0), xb)
        m_new = _margin(net, x_new, y[act])
        better = m_new < m_best[act]
        x_best[act[better]] = x_new[better]
        m_best[act[better]] = m_new[better]
    return m_best


def _square_run(net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, queries: int,
                p_init: float, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One run on ``(x, y)``: the last accepted point of each example and its margin; at most ``1 + queries``
    forward passes per example (the stripes, then one per iteration until it is fooled). The uniforms are drawn
    in the calling thread, ``BLOCK`` iterations at a time, one row per example whether it is still active or not,
    and the iterations run on chunks of the batch side by side (see :func:`.fastpath._split_run`): an example's
    random numbers, and so its result, depend neither on the chunks nor on which other examples are active."""
    n, c, h, w = x.shape
    x_best = (x + _signs(torch.rand(n, c, 1, w, generator=gen) >= 0.5, eps, x)).clamp(0.0, 1.0)
    m_best = _split_run(_margin, net, model, x_best, y)
    for it0 in range(0, queries, BLOCK):
        if not (m_best >= 0).any():
            break
        u = torch.rand(min(BLOCK, queries - it0), n, c + 3, generator=gen).to(x.device).transpose(0, 1)
        run = lambda m, *b: _iterate(m, *b, eps=eps, it0=it0, queries=queries, p_init=p_init)  # noqa: B023, E731
        m_best = _split_run(run, net, model, x, y, x_best, m_best, u)
    return x_best, m_best


@torch.no_grad()
def square(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, queries: int = 5000, p_init: float = 0.8,
           restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Square Attack, Linf, untargeted, margin loss (AutoAttack's standard version): ``queries`` iterations
    after the stripe start, ``p_init`` the initial fraction of the pixels a window covers, ``restarts`` runs
    from fresh starts for the examples no run has fooled yet.

    Returns, per example, a point that fools the model (``x`` itself when ``x`` is already misclassified), else
    the last accepted point of the run with the lowest margin; all inside the eps-ball and [0, 1]. Forward
    passes per example: one on ``x``, then at most ``1 + queries`` per run, none after it is fooled (a model
    never fooled: exactly ``1 + restarts * (1 + queries)``). ``generator``: a CPU torch.Generator (None: torch's
    default one); the random numbers are drawn on the CPU and moved to ``x``'s device."""
    with eval_mode(model):
        net = attack_model(model)
        x = x.detach()
        x_adv = x.clone()
        m = _split_run(_margin, net, model, x, y)
        best = torch.where(m < 0, m, torch.full_like(m, float("inf")))  # +inf: no point found yet
        for _ in range(restarts if eps > 0 else 0):
            todo = (best >= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xr, mr = _square_run(net, model, x[todo], y[todo], eps=eps, queries=queries, p_init=p_init,
                                 gen=generator)
            take = mr < best[todo]
            x_adv[todo[take]] = xr[take]
            best[todo[take]] = mr[take]
        return x_adv
