"""Whole-run history of a plotted quantity at bounded memory.

A run of several days emits hundreds of thousands of step records; the dashboard must still show all of it. A
:class:`History` keeps

- every point of the recent past, raw (the last ``tail`` points), and
- the whole run as at most ``capacity`` buckets of consecutive points, each with its first and last x, the time
  of its last point, its minimum and maximum (and where they are) and its count. When the buckets are full,
  neighbours merge in pairs and each new bucket takes twice as many points, so memory stays bounded however long
  the run is, and a spike survives every merge as some bucket's minimum or maximum.

:meth:`History.view` answers "the points to draw for this x range": the raw points when they cover the range
and fit the plot, otherwise min/max decimation of the buckets (each drawn bucket contributes its minimum and its
maximum in x order, so spikes stay visible at any zoom).
"""
from __future__ import annotations

import math
from collections import deque

# one bucket: [x_first, x_last, t_last, y_min, x_at_min, y_max, x_at_max, count]
_X0, _X1, _T, _MIN, _XMIN, _MAX, _XMAX, _N = range(8)


class History:
    __slots__ = ("capacity", "per_bucket", "buckets", "tail", "count", "last")

    def __init__(self, capacity: int = 2048, tail: int = 4096) -> None:
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.capacity = capacity
        self.per_bucket = 1  # points per bucket; doubles at each merge
        self.buckets: list[list[float]] = []
        self.tail: deque[tuple[float, float, float]] = deque(maxlen=tail)  # (x, t, y)
        self.count = 0  # finite points ever added
        self.last: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def append(self, x: float, y: float, t: float = 0.0) -> None:
        """Add one point (x = global step, t = unix time). Non-finite values are not plotted and not kept."""
        try:
            x, y, t = float(x), float(y), float(t)
        except (TypeError, ValueError):
            return
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        self.count += 1
        self.last = (x, t, y)
        self.tail.append((x, t, y))
        b = self.buckets[-1] if self.buckets else None
        if b is not None and b[_N] < self.per_bucket:
            b[_X1], b[_T] = x, t
            if y < b[_MIN]:
                b[_MIN], b[_XMIN] = y, x
            if y > b[_MAX]:
                b[_MAX], b[_XMAX] = y, x
            b[_N] += 1
            return
        self.buckets.append([x, x, t, y, x, y, x, 1])
        if len(self.buckets) > self.capacity:
            self._merge()

    def _merge(self) -> None:
        """Halve the number of buckets: each pair of neighbours becomes one (an odd last one stays alone)."""
        merged = []
        bs = self.buckets
        for i in range(0, len(bs) - 1, 2):
            merged.append(_combine(bs[i], bs[i + 1]))
        if len(bs) % 2:
            merged.append(bs[-1])
        self.buckets = merged
        self.per_bucket *= 2

    # ------------------------------------------------------------------ reading
    def view(self, n: int = 160, x_min: float | None = None, t_min: float | None = None) -> list[tuple[float, float]]:
        """At most about ``n`` (x, y) points covering the points with x >= ``x_min`` and t >= ``t_min`` (both
        optional), in x order."""
        if not self.count:
            return []
        tail = self.tail
        covered = len(tail) == self.count or (tail and ((x_min is not None and tail[0][0] <= x_min)
                                                        or (t_min is not None and tail[0][1] <= t_min)))
        if covered:
            pts = [(x, t, y) for x, t, y in tail
                   if (x_min is None or x >= x_min) and (t_min is None or t >= t_min)]
            if len(pts) <= n:
                return [(x, y) for x, _, y in pts]
            groups = _group([[x, x, t, y, x, y, x, 1] for x, t, y in pts], max(n // 2, 1))
        else:
            sel = [b for b in self.buckets
                   if (x_min is None or b[_X1] >= x_min) and (t_min is None or b[_T] >= t_min)]
            groups = _group(sel, max(n // 2, 1))
        out: list[tuple[float, float]] = []
        for g in groups:
            a, b = (g[_XMIN], g[_MIN]), (g[_XMAX], g[_MAX])
            if a == b:
                out.append(a)
            else:
                out.extend(sorted((a, b)))
        if self.last is not None and out and self.last[0] > out[-1][0]:
            out.append((self.last[0], self.last[2]))  # the plot's x range ends where the run is
        return out


def _combine(a: list[float], b: list[float]) -> list[float]:
    lo = a if a[_MIN] <= b[_MIN] else b
    hi = a if a[_MAX] >= b[_MAX] else b
    return [a[_X0], b[_X1], b[_T], lo[_MIN], lo[_XMIN], hi[_MAX], hi[_XMAX], a[_N] + b[_N]]


def _group(buckets: list[list[float]], k: int) -> list[list[float]]:
    """``buckets`` combined into at most ``k`` groups of neighbours of (nearly) equal size."""
    if len(buckets) <= k:
        return buckets
    out = []
    size = len(buckets) / k
    for i in range(k):
        part = buckets[int(i * size):int((i + 1) * size)]
        if not part:
            continue
        g = part[0]
        for b in part[1:]:
            g = _combine(g, b)
        out.append(g)
    return out
