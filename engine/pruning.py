"""Sparsity projections, per-layer pruning targets and masked retraining.

Everything runs on the tensor's own device with plain torch operations.

Schemes (on the ``(out, -1)`` view of a weight):
  * ``irregular`` -- zero the ``n_pruned(numel)`` entries with the smallest magnitude;
  * ``filter``    -- zero the ``n_pruned(out)`` rows (output filters) with the smallest L2 norm;
  * ``column``    -- zero the ``n_pruned(cols)`` columns with the smallest L2 norm.
Each is the Euclidean projection onto its sparsity set. Counts are exact whatever the ties: among
equal magnitudes the entries with the lowest flat index are removed first (stable sort).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from fractions import Fraction

import torch
from torch import Tensor

from robprune.engine.errors import ConfigError

SCHEMES = ("irregular", "filter", "column")

# Added to ratio * n before flooring, so ratios computed in floating point (1/3 * 3) count as exact.
_COUNT_TOLERANCE = Fraction(1, 10**12)


def n_pruned(n: int, ratio: float) -> int:
    """How many of ``n`` items a ``ratio`` removes: ``floor(ratio * n)``, computed exactly.

    The ratio is taken as the decimal number it prints as (``Fraction(str(ratio))``), so
    ``0.29 * 100`` gives 29 although the float product is 28.999...; a tolerance of 1e-12 is
    added before flooring. The result is clamped to ``[0, n]``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1], got {ratio}")
    k = math.floor(Fraction(str(ratio)) * n + _COUNT_TOLERANCE)
    return max(0, min(n, k))


def _magnitudes(weight: Tensor) -> Tensor:
    """|weight| in at least float32 precision, detached."""
    w = weight.detach()
    if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    return w.abs()


def _group_measure(weight: Tensor, scheme: str) -> Tensor:
    """The quantity a scheme ranks: |w| flattened, row norms or column norms of the (out, -1) view."""
    if scheme == "irregular":
        return _magnitudes(weight).reshape(-1)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown pruning scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if weight.dim() == 0:
        raise ValueError(f"scheme {scheme!r} needs a weight with at least one dimension")
    m = _magnitudes(weight).reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(m, dim=1 if scheme == "filter" else 0)


def project(weight: Tensor, scheme: str, ratio: float) -> tuple[Tensor, Tensor]:
    """Euclidean projection of ``weight`` onto the ``scheme`` sparsity set at ``ratio``.

    Returns ``(projected, mask)``: ``mask`` is a bool tensor of weight's shape (True = kept) and
    ``projected`` a new, detached tensor equal to ``weight * mask`` (same dtype and device).
    """
    measure = _group_measure(weight, scheme)
    k = n_pruned(measure.numel(), ratio)
    keep = torch.ones(measure.numel(), dtype=torch.bool, device=weight.device)
    if k > 0:
        order = torch.argsort(measure, stable=True)
        keep[order[:k]] = False
    if scheme == "irregular":
        mask = keep.reshape(weight.shape)
    else:
        out = weight.shape[0]
        view = keep.reshape(-1, 1) if scheme == "filter" else keep.reshape(1, -1)
        mask = view.expand(out, weight.numel() // max(out, 1)).reshape(weight.shape)
    w = weight.detach()
    projected = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return projected, mask


def layer_scheme(weight: Tensor, scheme: str, linear_scheme: str) -> str:
    """The scheme for a layer: 2-D (linear) weights take ``linear_scheme``, all others ``scheme``."""
    return linear_scheme if weight.dim() == 2 else scheme


def resolve_targets(
    names: list[str], default: float, layers: Mapping[str, float], *,
    source: str | Callable[[str], str] = "profile",
) -> dict[str, float]:
    """Per-layer pruning ratios for ``names``.

    An exact name key wins; otherwise the first ``fnmatch`` glob (in ``layers`` order) that matches;
    otherwise ``default``. A key matching no layer raises ConfigError naming ``source`` (or ``source(key)``:
    where that key came from).
    """
    names = list(names)
    for key in layers:
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            examples = ", ".join(repr(n) for n in names[:3]) or "no prunable layers"
            raise ConfigError(
                source(key) if callable(source) else source,
                f'prune.layers."{key}"',
                f"a layer name or glob matching at least one prunable layer (e.g. {examples})",
                key,
            )
    targets: dict[str, float] = {}
    for name in names:
        if name in layers:
            targets[name] = float(layers[name])
            continue
        targets[name] = float(default)
        for key, ratio in layers.items():
            if fnmatch.fnmatchcase(name, key):
                targets[name] = float(ratio)
                break
    return targets


def compute_masks(
    params: Mapping[str, Tensor], targets: Mapping[str, float], scheme: str, linear_scheme: str
) -> dict[str, Tensor]:
    """Projection masks for every parameter named in ``targets`` (scheme chosen by ``layer_scheme``)."""
    return {
        name: project(params[name], layer_scheme(params[name], scheme, linear_scheme), ratio)[1]
        for name, ratio in targets.items()
    }


def count_zeros(t: Tensor) -> int:
    """Number of entries exactly equal to zero."""
    return int((t.detach() == 0).sum().item())


def sparsity(t: Tensor) -> float:
    """Fraction of entries exactly equal to zero (0.0 for an empty tensor)."""
    n = t.numel()
    return count_zeros(t) / n if n else 0.0


@torch.no_grad()
def apply_masks_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, the entries of ``params[name]`` where ``masks[name]`` is False."""
    for name, mask in masks.items():
        p = params[name]
        p.masked_fill_(~mask.to(device=p.device, dtype=torch.bool), 0)


class MaskedParams:
    """Keeps pruned weights at exactly zero during masked retraining.

    ``attach()`` registers gradient hooks multiplying each gradient by its mask; ``after_step()``
    (call it after every ``optimizer.step()``) re-applies the masks, which also cancels any drift
    from momentum or Adam state accumulated before masking; ``detach()`` removes the hooks.
    Usable as a context manager (attach on enter, detach on exit).
    """

    def __init__(self, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]):
        missing = [name for name in masks if name not in params]
        if missing:
            raise KeyError(f"masks for unknown parameters: {', '.join(missing)}")
        self.params = dict(params)
        self.masks = {
            name: mask.to(device=self.params[name].device, dtype=torch.bool) for name, mask in masks.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "MaskedParams":
        """Register the gradient hooks (idempotent) and zero the pruned weights."""
        if self._handles:
            return self
        for name, mask in self.masks.items():
            p = self.params[name]
            factor = mask.to(p.dtype)
            self._handles.append(p.register_hook(lambda g, f=factor: g * f))
        self.after_step()
        return self

    def after_step(self) -> None:
        """Re-apply the masks to the weights."""
        apply_masks_(self.params, self.masks)

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "MaskedParams":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


def layer_stats(weight: Tensor, mask: Tensor | None, ratio: float, scheme: str) -> dict:
    """Diagnostics for one layer.

    Keys: ``numel``, ``zeros`` (exact zeros), ``sparsity``, ``scheme``, ``ratio``, ``n_pruned``
    (groups the projection removes), ``threshold`` (largest magnitude -- or row / column norm for
    filter / column -- that the projection would remove; 0.0 when it removes nothing),
    ``at_or_below`` (fraction of entries -- or groups -- whose magnitude / norm is <= threshold;
    above ``ratio`` means ties at the threshold), ``near_zero`` (fraction with
    ``|w| <= 1e-3 * max|w|``). With a mask also ``masked`` (entries the mask removes) and
    ``masked_nonzero`` (of those, how many are not exactly zero).
    """
    w = weight.detach()
    measure = _group_measure(w, scheme)
    k = n_pruned(measure.numel(), ratio)
    threshold = torch.sort(measure).values[k - 1].item() if k > 0 else 0.0
    mag = _magnitudes(w)
    numel = w.numel()
    zeros = count_zeros(w)
    stats = {
        "numel": numel,
        "zeros": zeros,
        "sparsity": zeros / numel if numel else 0.0,
        "scheme": scheme,
        "ratio": float(ratio),
        "n_pruned": k,
        "threshold": float(threshold),
        "at_or_below": (measure <= threshold).float().mean().item() if measure.numel() else 0.0,
        "near_zero": (mag <= 1e-3 * mag.max()).float().mean().item() if numel else 0.0,
    }
    if mask is not None:
        removed = ~mask.to(device=w.device, dtype=torch.bool)
        stats["masked"] = int(removed.sum().item())
        stats["masked_nonzero"] = int((w[removed] != 0).sum().item())
    return stats

