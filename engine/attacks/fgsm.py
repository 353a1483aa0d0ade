"""FGSM with a random start (Wong et al., 2020): one signed step from a random point of the eps-ball."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import eval_mode
from .fastpath import _split_run, attack_model
from .pgd import _input_grad, _project, _random_start


def _fgsm_chunk(net: nn.Module, x: Tensor, y: Tensor, start: Tensor, *, eps: float, step_size: float) -> Tensor:
    with torch.enable_grad():
        g = _input_grad(net, start, y)
    return _project(start.detach() + step_size * g.sign(), x, eps).detach()


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int = 1,
            restarts: int = 1, generator: torch.Generator | None = None,
            rows: tuple[int, int, int] | None = None) -> Tensor:
    """FGSM with a random start (Wong et al., 2020, "fast adversarial training"): one signed step of
    ``step_size`` (typically 1.25 eps) from a uniform random point of the eps-ball (from ``generator`` when
    given; ``rows``: see :func:`.pgd._random_start`), then projection."""
    with eval_mode(model):
        start = _random_start(x, eps, generator, rows)
        run = lambda m, *b: _fgsm_chunk(m, *b, eps=eps, step_size=step_size)  # noqa: E731
        return _split_run(run, attack_model(model), model, x, y, start)


