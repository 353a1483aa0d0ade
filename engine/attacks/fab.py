"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), Linf, as AutoAttack's
standard version runs it ("fab-t": 9 target classes, one run each, 100 steps, starting at the clean point).

FAB looks for the smallest Linf perturbation that changes the class. In every step it linearises the
difference of the target and the true logit at the current iterate, projects both the iterate and the
original point onto that hyperplane (inside the box [0, 1], :func:`project_linf_hyperplane`), and steps to a
convex combination of the two projections (biased toward the original point, weight ``alpha`` from the ratio
of their distances, at most ``alpha_max``), overshooting by ``eta``. Once an iterate is adversarial it is kept
if it is the closest one so far, and the iterate moves back toward the original point by the factor ``beta``.
The attack succeeds for an example when its closest adversarial lies within ``eps``.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..models import eval_mode
from .fastpath import _split_run, attack_model
from .pgd import _project


def project_linf_hyperplane(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The step ``d`` (rows independent, ``x`` and ``w`` of shape (n, d), ``b`` of shape (n,)) from ``x`` to its
    Linf projection onto ``{z : w.z + b = 0}`` intersected with the box ``[0, 1]^d``, solved exactly as in FAB:
    with ``r = -(w.x + b)`` the change ``w.d`` has to make (flipped to ``r >= 0``), each coordinate can move
    ``room_i`` in the direction ``sign(w_i)`` (``1 - x_i`` up, ``x_i`` down) and the largest change reachable
    within ``||d||_inf <= t`` is ``g(t) = sum_i |w_i| min(t, room_i)``, piecewise linear and increasing. The
    smallest ``t`` with ``g(t) = r`` is found on the sorted rooms (one sort, cumulative sums), and
    ``d_i = sign(w_i) min(t, room_i)``. When the box does not reach the hyperplane (``g(inf) < r``), ``d`` is the
    full move to the box's corner nearest to it along ``w`` (``t = inf``), as in the published code."""
    r = -(b + (w * x).sum(1))
    flip = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    w, r = w * flip[:, None], (r * flip)[:, None]
    room = torch.where(w > 0, 1.0 - x, torch.where(w < 0, x, torch.zeros_like(x)))
    u, order = room.sort(1)  # breakpoints of g
    aw = w.abs().gather(1, order)
    below = torch.cumsum(aw * u, 1) - aw * u  # sum over j < k of |w_j| u_j
    above = aw.sum(1, keepdim=True) - torch.cumsum(aw, 1) + aw  # sum over j >= k of |w_j|
    g = below + u * above  # g(u_k)
    k = (g < r).sum(1, keepdim=True)  # the first breakpoint where g reaches r: t lies in (u_{k-1}, u_k]
    feasible = k < w.shape[1]
    k = k.clamp(max=w.shape[1] - 1)
    t = (r - below.gather(1, k)) / above.gather(1, k).clamp_min(1e-30)
    t = torch.where(feasible, t.clamp_min(0.0), torch.full_like(t, float("inf")))
    return w.sign() * torch.minimum(room, t)


def _layout(net: nn.Module, x: Tensor):
    """The module to differentiate, and how a chunk maps to flat rows (one per example), rows to the module's
    input, and rows back to ``x``'s layout. FAB's steps treat the coordinates alike (box, norms, dot products),
    so on an MNIST LeNet it iterates space-to-depth, like PGD (see :class:`~.fastpath._S2DEntry`): the rows
    hold each example in the rearranged layout, which saves the rearrangement in every forward and backward
    (about 10% of FAB-T's time on LeNet w=2)."""
    n = len(x)
    entry = getattr(net, "s2d_entry", None)
    if entry is not None and entry.applies(x):
        unshuffle, shuffle = entry.pool.unshuffle, entry.pool.shuffle
        _, c4, h2, w2 = unshuffle(x[:1]).shape
        to_input = lambda f: f.view(n, h2, w2, c4).permute(0, 3, 1, 2)  # noqa: E731 - channels_last strides
        to_flat = lambda t: unshuffle(t).permute(0, 2, 3, 1).reshape(n, -1)  # noqa: E731 - a view of the copy
        return entry.graph, to_flat, to_input, lambda f: shuffle(to_input(f))
    to_input = lambda f: f.view(x.shape)  # noqa: E731
    return net, (lambda t: t.reshape(n, -1)), to_input, lambda f: f.view(x.shape)


def _fab_chunk(net: nn.Module, x: Tensor, y: Tensor, target: Tensor, start: Tensor, *, steps: int, alpha_max: float,
               eta: float, beta: float) -> Tensor:
    """One FAB-T run toward ``target`` from ``start``: per example, the closest adversarial found, else ``x``."""
    n = len(x)
    net, to_flat, to_input, from_flat = _layout(net, x)
    x0, x1 = to_flat(x), to_flat(start)  # never written to: every step makes a new x1
    best_x, best = x0.clone(), x0.new_full((n,), float("inf"))
    rows = torch.arange(n, device=x.device)
    for _ in range(steps):
        with torch.enable_grad():
            xf = x1.detach().requires_grad_(True)
            logits = net(to_input(xf))
            diff = logits[rows, target] - logits[rows, y]  # < 0 while the target does not beat the true class
            (w,) = torch.autograd.grad(diff.sum(), xf)
        with torch.no_grad():
            # the linearised boundary {z : w.(z - x1) + diff = 0}, projected on from x1 and from x0 at once
            b = diff - (w * x1).sum(1)
            d = project_linf_hyperplane(torch.cat([x1, x0]), torch.cat([w, w]), torch.cat([b, b]))
            a = d.abs().amax(1, keepdim=True).clamp_min(1e-8)
            alpha = (a[:n] / (a[:n] + a[n:])).clamp(0.0, alpha_max)  # biased toward x0 when x1 is far
            x1 = ((x1 + eta * d[:n]) * (1 - alpha) + (x0 + eta * d[n:]) * alpha).clamp_(0.0, 1.0)
            fooled = net(to_input(x1)).argmax(1) != y
            dist = (x1 - x0).abs().amax(1)
            closer = fooled & (dist < best)
            best_x = torch.where(closer[:, None], x1, best_x)
            best = torch.where(closer, dist, best)
            x1 = torch.where(fooled[:, None], x0 + (x1 - x0) * beta, x1)  # back toward x0
    return from_flat(best_x)


def _random_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """FAB's restart point: a uniform direction scaled to Linf norm ``eps / 2``, drawn on the CPU."""
    t = torch.rand(x.shape, generator=generator, device="cpu").mul_(2).sub_(1).to(x.device)
    t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return (x + 0.5 * eps * t).clamp_(0.0, 1.0)


def fab_targeted(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 generator: torch.Generator | None = None) -> Tensor:
    """FAB-T (Linf). For each target class, the 2nd to the ``(n_target_classes + 1)``-th class by the clean
    logits, in turn, and for each of ``restarts`` runs (the first from ``x``, the others from a random point at
    Linf distance ``eps / 2``), a run of ``steps`` steps on the examples that are classified correctly and not
    fooled yet. An example is fooled when the closest adversarial a run finds lies within ``eps`` and still
    fools ``model`` itself (not only its fast rewrite) after projection onto the eps-ball and [0, 1]; that point
    is returned for it, ``x`` itself for the others (and for the misclassified ones, which are not attacked).
    Random numbers come from ``generator`` (CPU; None: torch's default CPU generator). With
    ``restarts=1`` (AutoAttack's standard version) nothing random is drawn."""
    with eval_mode(model):
        net = attack_model(model)
        with torch.no_grad():
            logits = model(x)
        robust = logits.argmax(1) == y
        ranked = logits.argsort(1, descending=True)
        out = x.clone()
        run = partial(_fab_chunk, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
        for k in range(1, min(n_target_classes, logits.shape[1] - 1) + 1):
            for r in range(max(restarts, 1)):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return out
                xs, ys = x[idx], y[idx]
                start = xs if r == 0 else _random_start(xs, eps, generator)
                adv = _split_run(run, net, model, xs, ys, ranked[idx, k], start)
                with torch.no_grad():
                    adv_p = _project(adv, xs, eps)
                    within = (adv - xs).flatten(1).abs().amax(1) <= eps
                    fooled = within & (model(adv_p).argmax(1) != ys)  # the model itself has the last word
                out[idx[fooled]] = adv_p[fooled]
                robust[idx[fooled]] = False
        return out
