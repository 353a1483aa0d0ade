"""L-inf attacks with one call signature: ``attack(model, x, y, kind=..., eps=..., step_size=..., steps=..., restarts=...)``.

Inputs are pixels in [0, 1] (no normalisation, as in the paper's reference). Every adversarial example
stays inside the eps-ball around ``x`` and inside [0, 1].

Model mode: the attacks run the model in **eval mode** (BatchNorm uses its running statistics and the
attack's forward passes do not update them) and restore the mode the model had on entry. Only the input
gets a gradient (``torch.autograd.grad`` w.r.t. the perturbation), so no weight gradients are computed
or accumulated during the attack.

One module per attack (:mod:`.pgd`, :mod:`.fgsm`, :mod:`.apgd`, :mod:`.fab`, :mod:`.square`; the ensemble of the
last three is :mod:`.autoattack`), each a plain loop over the model; the CPU fast path they
run through (a folded eval-mode rewrite of the model, one chunk of the batch per core) is :mod:`.fastpath`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ATTACK_KINDS as KINDS
from .apgd import apgd, apgd_targeted, dlr_loss
from .fab import fab_targeted
from ..models import eval_mode
from .fastpath import attack_model, channels_last_strides, split_chunks
from .fgsm import fgsm_rs
from .pgd import cw_loss, pgd, skip_random_starts
from .square import square

__all__ = ["KINDS", "apgd", "apgd_targeted", "attack", "attack_model", "channels_last_strides", "cw_loss", "dlr_loss",
           "evaluate", "evaluate_counts", "fab_targeted", "fgsm_rs", "pgd", "split_chunks", "square"]


def attack(model: nn.Module, x: Tensor, y: Tensor, *, kind: str, eps: float, step_size: float, steps: int,
           restarts: int = 1, loss: str = "ce", generator: torch.Generator | None = None,
           rows: tuple[int, int, int] | None = None) -> Tensor:
    """Dispatch by ``kind`` (pgd | fgsm-rs | none); ``none`` returns ``x`` itself. ``loss`` (PGD): ``ce``
    (cross-entropy) or ``cw`` (Carlini-Wagner margin); ``generator``: a CPU generator for PGD's random starts
    (the same numbers on every device); ``rows = (start, stop, total)``: ``x`` is a data-parallel rank's share of
    a batch, whose random starts are drawn whole and sliced (see :func:`.pgd._random_start`)."""
    if kind == "pgd":
        return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, restarts=restarts, loss=loss,
                   generator=generator, rows=rows)
    if kind == "fgsm-rs":
        return fgsm_rs(model, x, y, eps=eps, step_size=step_size, generator=generator, rows=rows)
    if kind == "none" or eps == 0:
        return x
    raise ValueError(f"unknown attack kind {kind!r}; expected one of {', '.join(KINDS)}")


@torch.no_grad()
def _count_correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).argmax(1) == y).sum()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, kind: str, eps: float, step_size: float, steps: int,
             restarts: int = 1, batch_size: int = 500, to_float=None, loss: str = "ce",
             seed: int | None = None) -> tuple[float, float]:
    """Natural and adversarial accuracy of ``model`` (in eval mode) on ``(x, y)``, batch by batch.

    ``to_float`` converts a stored batch (e.g. uint8) to [0, 1] floats. Counts stay on the device and are
    read once at the end. ``seed``: PGD's random starts come from a CPU generator seeded with it, so a CPU and a
    GPU evaluation of the same weights start from the same points (None: the device's generator)."""
    nat, adv = evaluate_counts(model, x, y, kind=kind, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                               batch_size=batch_size, to_float=to_float, loss=loss, seed=seed)
    n = max(len(x), 1)
    return nat.item() / n, adv.item() / n


def evaluate_counts(model: nn.Module, x: Tensor, y: Tensor, *, kind: str, eps: float, step_size: float, steps: int,
                    restarts: int = 1, batch_size: int = 500, to_float=None, loss: str = "ce",
                    seed: int | None = None, shard: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The counts of :func:`evaluate` (device tensors). ``shard = (rank, world)``: only batches ``rank``,
    ``rank + world``, ... are attacked (a data-parallel rank's part); the generator skips the others' random
    starts, so the ranks' counts sum to exactly those of one process."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rank, world = shard if shard is not None else (0, 1)
    draws = {"pgd": max(restarts, 1), "fgsm-rs": 1}.get(kind, 0)
    with eval_mode(model):
        dev = x.device
        nat = torch.zeros((), dtype=torch.long, device=dev)
        adv = torch.zeros((), dtype=torch.long, device=dev)
        for b, i in enumerate(range(0, len(x), batch_size)):
            xb = x[i:i + batch_size]
            xb = to_float(xb) if to_float is not None else xb
            yb = y[i:i + batch_size]
            if b % world != rank:
                if generator is not None:
                    skip_random_starts(xb, eps, generator, draws)
                continue
            nat += _count_correct(attack_model(model), xb, yb)
            xa = attack(model, xb, yb, kind=kind, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                        loss=loss, generator=generator)
            adv += _count_correct(attack_model(model), xa, yb)
    return nat, adv
