"""Sparsity projections, per-layer pruning targets and masked retraining.

Everything runs on the tensor's own device with plain torch operations.

Schemes (on the ``(out, -1)`` view of a weight):
  * ``irregular`` -- zero the ``n_pruned(numel)`` entries with the smallest magnitude;
  * ``filter``    -- zero the ``n_pruned(out)`` rows (output filters) with the smallest L2 norm;
  * ``column``    -- zero the ``n_pruned(cols)`` columns with the smallest L2 norm;
  * ``N:M``       -- (e.g. ``2:4``) in every group of M consecutive entries of a row, keep the N of largest
    magnitude: the ``M - N`` smallest of each group are zeroed. For a convolution a row is one output filter,
    ``in_channels x kh x kw`` in memory order: the layout of torch's semi-structured (2:4) sparse kernels. The
    row length must be a multiple of M. The ratio is fixed at ``1 - N/M``.
Each is the Euclidean projection onto its sparsity set (for N:M: groups are independent and keeping a group's N
largest maximises the kept squared magnitude). Counts are exact whatever the ties: among equal magnitudes the
entries with the lowest flat index are removed first (stable sort) -- for N:M the lowest index within the group.

Per-layer budgets (``prune.allocation``, :func:`allocate_counts`): ``uniform`` prunes every layer at its own ratio;
``global`` ranks the magnitudes of all allocated layers together (:func:`global_counts`); ``erk`` sets densities by
Erdos-Renyi-Kernel scaling (:func:`erk_counts`). Both remove exactly ``n_pruned(total, ratio)`` weights overall.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction

import torch
from torch import Tensor

from robprune.engine.errors import ConfigError

SCHEMES = ("irregular", "filter", "column")  # the named schemes; "N:M" strings are the others (parse_nm)
ALLOCATIONS = ("uniform", "global", "erk")
NM_PATTERN = re.compile(r"([1-9][0-9]{0,5}):([1-9][0-9]{0,5})")
NM_EXPECTED = 'one of \'irregular\', \'filter\', \'column\' or "N:M" with integers 0 < N < M (e.g. \'2:4\')'
# an explicit ratio of an N:M layer must equal 1 - N/M to this (a profile cannot spell 2/3 exactly)
NM_RATIO_TOLERANCE = 1e-6

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


def parse_nm(scheme: object) -> tuple[int, int] | None:
    """``(N, M)`` for an ``"N:M"`` scheme (integers 0 < N < M, written without signs, spaces or leading zeros);
    None for a named scheme or anything else."""
    if not isinstance(scheme, str):
        return None
    m = NM_PATTERN.fullmatch(scheme)
    if m is None:
        return None
    n, size = int(m.group(1)), int(m.group(2))
    return (n, size) if n < size else None


def is_scheme(scheme: object) -> bool:
    """A named scheme (:data:`SCHEMES`) or an ``"N:M"`` one."""
    return scheme in SCHEMES or parse_nm(scheme) is not None


def nm_ratio(scheme: str) -> float | None:
    """The ratio an N:M scheme implies, ``1 - N/M`` (None for the named schemes)."""
    nm = parse_nm(scheme)
    return None if nm is None else float(Fraction(nm[1] - nm[0], nm[1]))


def _rows(weight: Tensor) -> tuple[int, int]:
    """(rows, row length) of the ``(out, -1)`` view."""
    if weight.dim() == 0:
        raise ValueError("pruning needs a weight with at least one dimension")
    out = weight.shape[0]
    return out, weight.numel() // out if out else 0


def _nm_keep(weight: Tensor, n: int, m: int) -> Tensor:
    """Kept flags of the N:M projection: the N largest magnitudes of every M consecutive entries of each row kept;
    among equal magnitudes the lowest index in the group is removed first (stable sort)."""
    out, cols = _rows(weight)
    if cols % m:
        raise ValueError(f"scheme {n}:{m} needs rows (numel / out) whose length is a multiple of {m}; "
                         f"this weight {tuple(weight.shape)} has rows of {cols}")
    mag = _magnitudes(weight).reshape(out, cols // m, m)
    order = torch.argsort(mag, dim=-1, stable=True)
    keep = torch.ones(mag.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(weight.shape)


def _check_nm_ratio(scheme: str, ratio: float) -> None:
    implied = nm_ratio(scheme)
    if abs(float(ratio) - implied) > NM_RATIO_TOLERANCE:
        raise ValueError(f"scheme {scheme} prunes at ratio {implied:g} (1 - N/M), got ratio {ratio}")


def _group_measure(weight: Tensor, scheme: str) -> Tensor:
    """The quantity a named scheme ranks: |w| flattened, row norms or column norms of the (out, -1) view."""
    if scheme == "irregular":
        return _magnitudes(weight).reshape(-1)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown pruning scheme {scheme!r}; expected {NM_EXPECTED}")
    if weight.dim() == 0:
        raise ValueError(f"scheme {scheme!r} needs a weight with at least one dimension")
    m = _magnitudes(weight).reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(m, dim=1 if scheme == "filter" else 0)


def project(weight: Tensor, scheme: str, ratio: float) -> tuple[Tensor, Tensor]:
    """Euclidean projection of ``weight`` onto the ``scheme`` sparsity set at ``ratio``.

    Returns ``(projected, mask)``: ``mask`` is a bool tensor of weight's shape (True = kept) and
    ``projected`` a new, detached tensor equal to ``weight * mask`` (same dtype and device).
    An N:M scheme takes ``ratio`` 0 (nothing removed) or its own ratio ``1 - N/M`` (anything else is a
    ValueError).
    """
    nm = parse_nm(scheme)
    if nm is not None:
        if float(ratio) == 0.0:
            mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        else:
            _check_nm_ratio(scheme, ratio)
            mask = _nm_keep(weight, *nm)
    else:
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


def target_count(shape: tuple[int, ...] | torch.Size, scheme: str, ratio: float) -> int:
    """How many entries of a weight of ``shape`` the projection removes (exact, for any scheme)."""
    numel = math.prod(shape)
    out = shape[0] if len(shape) else 1
    cols = numel // out if out else 0
    nm = parse_nm(scheme)
    if nm is not None:
        return 0 if float(ratio) == 0.0 else numel // nm[1] * (nm[1] - nm[0])
    if scheme == "irregular":
        return n_pruned(numel, ratio)
    if scheme == "filter":
        return n_pruned(out, ratio) * cols
    if scheme == "column":
        return n_pruned(cols, ratio) * out
    raise ValueError(f"unknown pruning scheme {scheme!r}; expected {NM_EXPECTED}")


def layer_scheme(weight: Tensor, scheme: str, linear_scheme: str) -> str:
    """The scheme for a layer: 2-D (linear) weights take ``linear_scheme``, all others ``scheme``."""
    return linear_scheme if weight.dim() == 2 else scheme


def matching_key(name: str, layers: Mapping[str, float]) -> str | None:
    """The ``prune.layers`` key that sets ``name``'s ratio: the exact name, else the first glob (in ``layers``
    order) that matches, else None."""
    if name in layers:
        return name
    return next((key for key in layers if fnmatch.fnmatchcase(name, key)), None)


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
        key = matching_key(name, layers)
        targets[name] = float(default) if key is None else float(layers[key])
    return targets


# --------------------------------------------------------------------------------------------- per-layer budgets


def ratio_for_count(n: int, k: int) -> float:
    """A ratio ``r`` (as close to ``k / n`` as floats allow) with ``n_pruned(n, r) == k`` exactly."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot remove {k} of {n} entries")
    if k == 0:
        return 0.0
    if k == n:
        return 1.0
    r = k / n
    for _ in range(1000):
        got = n_pruned(n, r)
        if got == k:
            return r
        r = math.nextafter(r, 1.0 if got < k else 0.0)
    raise AssertionError(f"no float ratio removes exactly {k} of {n}")  # pragma: no cover


def erk_densities(shapes: Mapping[str, tuple[int, ...]], keep: int) -> dict[str, Fraction]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020, RigL's ``get_sparsities`` with power 1), exact.

    Every layer's density is ``eps * (sum of dims) / (product of dims)``, ``eps`` chosen so that the layers keep
    ``keep`` entries together; a layer whose density would exceed 1 is made dense (all layers sharing the largest
    raw density at once, as RigL does) and ``eps`` recomputed for the others."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    if not 0 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} entries")
    raw = {k: Fraction(sum(s), numel[k]) for k, s in shapes.items() if numel[k] > 0}
    dense: set[str] = set()
    eps = Fraction(0)
    while True:
        rest = [k for k in raw if k not in dense]
        if not rest:
            break
        divisor = sum(raw[k] * numel[k] for k in rest)
        eps = (keep - sum(numel[k] for k in dense)) / divisor
        top = max(raw[k] for k in rest)
        if eps * top <= 1:
            break
        dense |= {k for k in rest if raw[k] == top}
    return {k: Fraction(1) if k in dense or k not in raw else eps * raw[k] for k in shapes}


def erk_counts(shapes: Mapping[str, tuple[int, ...]], budget: int) -> dict[str, int]:
    """Entries each layer removes under ERK so that together they remove exactly ``budget``: the kept counts
    ``density * numel`` (exact fractions, see :func:`erk_densities`) are floored and the remaining kept entries go
    to the layers with the largest fractional parts (equal parts: the earlier layer first)."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    keep_total = sum(numel.values()) - budget
    dens = erk_densities(shapes, keep_total)
    real = {k: dens[k] * numel[k] for k in shapes}
    kept = {k: math.floor(v) for k, v in real.items()}
    extra = keep_total - sum(kept.values())
    order = sorted(shapes, key=lambda k: -(real[k] - kept[k]))  # stable: earlier layers first among equals
    for k in order[:extra]:
        kept[k] += 1
    return {k: numel[k] - kept[k] for k in shapes}


def global_scores(weight: Tensor, normalize: bool = False) -> Tensor:
    """What a global allocation ranks: |w| flattened (float32 or wider), divided by the layer's RMS
    ``sqrt(mean(w^2))`` with ``normalize``."""
    m = _magnitudes(weight).reshape(-1)
    if normalize and m.numel():
        rms = m.pow(2).mean().sqrt()
        if rms > 0:
            m = m / rms
    return m


def global_counts(weights: Mapping[str, Tensor], budget: int, *, normalize: bool = False) -> dict[str, int]:
    """Entries each layer removes when the ``budget`` smallest scores (:func:`global_scores`) of all the layers
    together are removed. Ties at the threshold: the earlier layer (in ``weights`` order), then the lower flat
    index, goes first -- a stable sort of the concatenation, which is also the per-layer projection's order."""
    names = list(weights)
    total = sum(w.numel() for w in weights.values())
    if not 0 <= budget <= total:
        raise ValueError(f"cannot remove {budget} of {total} entries")
    if budget == 0:
        return {k: 0 for k in names}
    scores = [global_scores(weights[k], normalize) for k in names]
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in scores))
    scores = [s.to(dtype) for s in scores]
    v = torch.kthvalue(torch.cat(scores), budget).values
    below = torch.stack([(s < v).sum() for s in scores]).tolist()
    equal = torch.stack([(s == v).sum() for s in scores]).tolist()
    need = budget - sum(below)
    counts = {}
    for k, b, e in zip(names, below, equal):
        take = min(e, need)
        counts[k] = int(b + take)
        need -= take
    return counts


class PrunePlan:
    """The pruning target of every prunable layer under a profile's ``[prune]`` keys (see :func:`plan_layers`).

    ``ratios`` and ``schemes`` per layer; ``allocated``: the layers whose ratio the allocation sets (none for
    ``uniform``) and ``budget``: how many entries they remove together. ``final`` says whether the ratios are the
    run's own: a ``global`` allocation is made by :meth:`finalize` with the weights of that moment."""

    def __init__(self, *, ratios: dict[str, float], schemes: dict[str, str], shapes: dict[str, tuple[int, ...]],
                 set_by: dict[str, str], allocation: str, ratio: float, allocated: list[str], budget: int,
                 normalize: bool, notes: list[str]):
        self.ratios, self.schemes, self.shapes, self.set_by = ratios, schemes, shapes, set_by
        self.allocation, self.ratio, self.allocated, self.budget = allocation, ratio, allocated, budget
        self.normalize, self.notes = normalize, notes
        self.final = allocation != "global"

    def pending(self, name: str) -> bool:
        """Whether ``name``'s ratio is still to be chosen (a global allocation not made yet)."""
        return not self.final and name in self.allocated

    def finalize(self, weights: Mapping[str, Tensor]) -> dict[str, float]:
        """Make a global allocation from ``weights`` (no-op for the others, and when done); returns the ratios."""
        if not self.final:
            counts = global_counts({k: weights[k] for k in self.allocated}, self.budget, normalize=self.normalize)
            for k, c in counts.items():
                self.ratios[k] = ratio_for_count(math.prod(self.shapes[k]), c)
            self.final = True
        return dict(self.ratios)

    def record(self, ratios: Mapping[str, float] | None = None) -> dict:
        """The plan as plain data (for events.jsonl, the checkpoint and the summary): method, overall ``ratio``,
        ``prunable`` and ``pruned`` entry counts, and per layer its ``ratio``, ``numel``, ``pruned``, ``scheme`` and
        ``set_by`` (``prune.layers``, ``scheme`` for N:M, ``prune.ratio``, or the allocation's name)."""
        ratios = self.ratios if ratios is None else ratios
        layers = {k: {"ratio": float(ratios[k]), "numel": math.prod(s), "pruned": target_count(s, self.schemes[k],
                                                                                                ratios[k]),
                      "scheme": self.schemes[k], "set_by": self.set_by[k]} for k, s in self.shapes.items()}
        return {"method": self.allocation, "ratio": float(self.ratio),
                "normalize": self.normalize if self.allocation == "global" else None,
                "prunable": sum(L["numel"] for L in layers.values()),
                "pruned": sum(L["pruned"] for L in layers.values()), "layers": layers}


def plan_layers(
    params: Mapping[str, Tensor], *, scheme: str = "irregular", linear_scheme: str = "irregular",
    ratio: float = 0.9, layers: Mapping[str, float] | None = None, allocation: str = "uniform",
    normalize: bool = False, origin: Callable[[str], str] = lambda key: "profile",
) -> PrunePlan:
    """Per-layer schemes and ratios of ``params`` (only their shapes are read: meta tensors do), checked.

    * ``prune.layers``: an exact name, else the first matching glob, sets a layer's ratio (:func:`resolve_targets`).
    * N:M layers are pruned at ``1 - N/M`` whatever ``ratio`` says; a ``prune.layers`` key reaching one must say
      0 (the layer stays dense) or that ratio. Each N:M layer pruned must have rows (``numel / out``) whose length
      is a multiple of M.
    * ``allocation`` other than ``uniform`` needs irregular schemes. The layers no ``prune.layers`` key reaches
      share what ``ratio`` leaves after the others: all layers together remove exactly ``n_pruned(total, ratio)``.
      ``erk`` is set here; ``global`` by :meth:`PrunePlan.finalize`.

    Anything wrong is a one-line ConfigError naming the key (``origin(key)`` says where it was set) and the layer.
    """
    layers = dict(layers or {})
    names = list(params)
    ratios = resolve_targets(names, ratio, layers, source=lambda key: origin(f"prune.layers.{key}"))
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    schemes = {k: layer_scheme(p, scheme, linear_scheme) for k, p in params.items()}
    set_by = {k: "prune.layers" if matching_key(k, layers) is not None else "prune.ratio" for k in names}
    notes: list[str] = []
    for k in names:
        nm = parse_nm(schemes[k])
        if nm is None:
            continue
        implied = nm_ratio(schemes[k])
        key = matching_key(k, layers)
        if key is not None:
            r = float(layers[key])
            if r != 0.0 and abs(r - implied) > NM_RATIO_TOLERANCE:
                raise ConfigError(origin(f"prune.layers.{key}"), f'prune.layers."{key}"',
                                  f"0 (left dense) or {implied:g} (the ratio {schemes[k]} implies) for the "
                                  f"{schemes[k]} layer {k!r}", r)
            ratios[k] = 0.0 if r == 0.0 else implied
        else:
            ratios[k] = implied
            set_by[k] = "scheme"
        out, cols = _rows(params[k])
        if ratios[k] > 0 and cols % nm[1]:
            which = "prune.linear_scheme" if len(shapes[k]) == 2 else "prune.scheme"
            raise ConfigError(origin(which), which, "an N:M scheme whose M divides the row length (numel / out) of "
                              "every layer it prunes", schemes[k],
                              hint=f"layer {k!r} {'x'.join(map(str, shapes[k]))} has rows of {cols}, not a multiple "
                                   f"of {nm[1]}; leave it dense with prune.layers.\"{k}\" = 0")
    nm_used = sorted({schemes[k] for k in names if parse_nm(schemes[k]) and set_by[k] == "scheme"})
    others = any(parse_nm(schemes[k]) is None and set_by[k] == "prune.ratio" for k in names)
    for s in nm_used:
        if abs(nm_ratio(s) - float(ratio)) > NM_RATIO_TOLERANCE:
            notes.append(f"{s} layers are pruned at {100 * nm_ratio(s):g}% (1 - N/M); prune.ratio {ratio:g} "
                         + ("applies to the layers of the other schemes" if others else "is not used"))
    allocated: list[str] = []
    budget = 0
    if allocation not in ALLOCATIONS:
        raise ConfigError(origin("prune.allocation"), "prune.allocation",
                          "one of " + ", ".join(repr(a) for a in ALLOCATIONS), allocation)
    if allocation != "uniform":
        other = sorted({schemes[k] for k in names if schemes[k] != "irregular"})
        if other:
            raise ConfigError(origin("prune.allocation"), "prune.allocation",
                              f"'uniform' with the {', '.join(other)} scheme (global and erk rank single weights: "
                              "they need prune.scheme and prune.linear_scheme = 'irregular')", allocation)
        allocated = [k for k in names if set_by[k] == "prune.ratio"]
        numel = {k: math.prod(s) for k, s in shapes.items()}
        total = sum(numel.values())
        free = sum(numel[k] for k in allocated)
        fixed = sum(n_pruned(numel[k], ratios[k]) for k in names if k not in allocated)
        budget = n_pruned(total, ratio) - fixed
        if not allocated:
            raise ConfigError(origin("prune.allocation"), "prune.allocation",
                              "'uniform' when prune.layers sets the ratio of every layer (nothing is left to "
                              "allocate)", allocation)
        if not 0 <= budget < free:
            lo = Fraction(fixed, total) if total else 0
            hi = Fraction(fixed + free - 1, total) if total else 0
            why = (f"the layers prune.layers sets already remove {fixed} of the {total} weights, more than "
                   f"{n_pruned(total, ratio)}" if budget < 0 else
                   f"the {len(allocated)} other layers would have to remove {budget} of their {free} weights")
            raise ConfigError(origin("prune.ratio"), "prune.ratio", f"a ratio in [{float(lo):.4g}, {float(hi):.4g}] "
                              f"with allocation {allocation!r}: {why}", float(ratio))
        for k in allocated:
            set_by[k] = allocation
            ratios[k] = float(ratio)  # provisional for global (see PrunePlan.pending)
        if allocation == "erk":
            counts = erk_counts({k: shapes[k] for k in allocated}, budget)
            for k, c in counts.items():
                ratios[k] = ratio_for_count(numel[k], c)
    return PrunePlan(ratios=ratios, schemes=schemes, shapes=shapes, set_by=set_by, allocation=allocation,
                     ratio=float(ratio), allocated=allocated, budget=budget, normalize=bool(normalize), notes=notes)


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
    (groups the projection removes; entries for N:M), ``threshold`` (largest magnitude -- or row / column norm for
    filter / column -- that the projection would remove; 0.0 when it removes nothing),
    ``at_or_below`` (fraction of entries -- or groups -- whose magnitude / norm is <= threshold;
    above ``ratio`` means ties at the threshold, or for N:M, groups whose removed entries are larger than other
    groups' kept ones), ``near_zero`` (fraction with ``|w| <= 1e-3 * max|w|``). With a mask also ``masked``
    (entries the mask removes) and ``masked_nonzero`` (of those, how many are not exactly zero).
    """
    w = weight.detach()
    mag = _magnitudes(w)
    nm = parse_nm(scheme)
    if nm is not None:
        measure = mag.reshape(-1)
        removed_nm = ~_nm_keep(w, *nm) if float(ratio) > 0 else None
        k = int(removed_nm.sum().item()) if removed_nm is not None else 0
        threshold = mag[removed_nm].max().item() if k > 0 else 0.0
    else:
        measure = _group_measure(w, scheme)
        k = n_pruned(measure.numel(), ratio)
        threshold = torch.sort(measure).values[k - 1].item() if k > 0 else 0.0
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
