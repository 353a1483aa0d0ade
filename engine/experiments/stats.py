"""Seeds and verdicts: every run of an experiment is trained once per seed of ``exp.seeds``; a table cell shows the
mean over seeds and its spread (min-max), and a finding is "held" or "did not hold" only when the differences it
rests on exceed that spread (:data:`RULE`), otherwise it is "inconclusive at this budget".

:func:`compare` decides one difference, :func:`verdict` combines the differences a finding rests on, :func:`cell` and
:func:`value_cell` build the table cells, :func:`values` and :func:`robust` read the per-seed numbers of a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .runner import Experiment

SPREAD = "min-max"  # what a cell's bracket shows: the lowest and the highest value over seeds
MIN_SEEDS = 2  # with fewer seeds there is no spread, and nothing is decided
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
RULE = ("a difference between two means over seeds counts only when it exceeds the spread, the larger of the two "
        "min-max ranges over seeds (for a finding with a tolerance: when the difference minus the tolerance does); "
        "a finding did not hold as soon as one difference it rests on counts against it, it held when every one "
        "counts for it, and otherwise it is inconclusive at this budget; with a single seed there is no spread and "
        "every finding is inconclusive")


def mean(xs: Sequence[float]) -> float:
    """The mean as the report computes it: the sum in seed order over the count."""
    return sum(xs) / len(xs)


def pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * float(x), 2)


@dataclass
class Comparison:
    """One difference a finding rests on: ``a`` against ``b`` (per-seed fractions), decided when
    ``|mean(a) - mean(b) - margin| > spread``. ``outcome`` is +1 when ``a - b > margin`` beyond the spread, -1 when
    ``a - b < margin`` beyond it, 0 when it is within the spread (or there are fewer than :data:`MIN_SEEDS` seeds)."""

    what: str
    a_label: str
    a: list[float]
    b_label: str
    b: list[float]
    metric: str = "PGD"
    margin: float = 0.0

    @property
    def diff(self) -> float:
        return mean(self.a) - mean(self.b)

    @property
    def spread(self) -> float:
        return max(max(self.a) - min(self.a), max(self.b) - min(self.b))

    @property
    def seeds(self) -> int:
        return min(len(self.a), len(self.b))

    @property
    def outcome(self) -> int:
        if self.seeds < MIN_SEEDS:
            return 0
        d = self.diff - self.margin
        return 1 if d > self.spread else -1 if -d > self.spread else 0

    def text(self) -> str:
        """The numbers the comparison rests on, in percentage points."""
        tol = f" against a tolerance of {100 * self.margin:.2f}" if self.margin else ""
        state = ("one seed, no spread" if self.seeds < MIN_SEEDS else
                 f"spread {100 * self.spread:.2f}: " + ("within the spread" if self.outcome == 0 else "counts"))
        return (f"{self.what}: {self.a_label} {100 * mean(self.a):.2f} vs {self.b_label} {100 * mean(self.b):.2f} "
                f"{self.metric} ({100 * self.diff:+.2f} points{tol}; {state})")

    def to_dict(self) -> dict:
        return {"what": self.what, "metric": self.metric, "a": self.a_label, "b": self.b_label, "a_seeds": self.a,
                "b_seeds": self.b, "mean_a": mean(self.a), "mean_b": mean(self.b), "diff": self.diff,
                "margin": self.margin, "spread": self.spread, "outcome": self.outcome}


def verdict(checks: Sequence[tuple[Comparison, int]]) -> str:
    """:data:`HELD` when every comparison is decided in the direction the finding expects (``want``, +1 or -1),
    :data:`NOT_HELD` when any is decided against it, :data:`INCONCLUSIVE` otherwise (and for no comparisons)."""
    outcomes = [c.outcome * want for c, want in checks]
    if any(o < 0 for o in outcomes):
        return NOT_HELD
    if outcomes and all(o > 0 for o in outcomes):
        return HELD
    return INCONCLUSIVE


MAX_LISTED = 8  # comparisons a sentence lists per group; results.json's finding.comparisons holds them all


def explain(checks: Sequence[tuple[Comparison, int]], extra: str = "") -> str:
    """The sentence after "Held: " / "Did not hold: " / "Inconclusive at this budget: ": the comparisons that decide
    it first, each with its numbers (the closest calls first when there are many), then ``extra``."""
    v = verdict(checks)
    against = [c for c, w in checks if c.outcome * w < 0]
    open_ = [c for c, w in checks if c.outcome == 0]
    rest = [c for c, _ in checks if c not in against and c not in open_]
    if v == HELD:
        body = _listed([c for c, _ in checks], weakest=True)
    elif v == NOT_HELD:
        body = "against the finding: " + _listed(against)
        others = [c for c, _ in checks if c not in against]
        if others:
            body += "; the others: " + _listed(others)
    else:
        body = (f"{len(open_)} of {len(checks)} differences within the spread: " + _listed(open_)
                if checks else "nothing to compare")
        if rest:
            body += "; for the finding: " + _listed(rest, weakest=True)
    return body + (f"; {extra}" if extra else "")


def _listed(cs: Sequence[Comparison], weakest: bool = False) -> str:
    """The comparisons' texts; past :data:`MAX_LISTED`, the first ones by how far the difference is from the spread
    (the nearest first when ``weakest``, else the farthest) and a count of the rest."""
    if len(cs) <= MAX_LISTED:
        return "; ".join(c.text() for c in cs)
    shown = sorted(cs, key=lambda c: abs(c.diff - c.margin) - c.spread, reverse=not weakest)[:MAX_LISTED]
    return "; ".join(c.text() for c in shown) + f"; and {len(cs) - MAX_LISTED} more (results.json: finding.comparisons)"


# ============================================================================================ per-seed numbers


def values(e: Experiment, base: str, what: str) -> list[float]:
    """Per-seed fractions of run ``base``'s final evaluation: ``nat``, ``adv`` (PGD) or ``aa`` (AutoAttack; None
    entries where a seed's run had none)."""
    out = []
    for r in e.seed_runs(base):
        f = r.summary["final"]
        if what == "nat":
            out.append(f["nat_acc"])
        elif what == "adv":
            out.append(f["adv_acc"])
        else:
            aa = f.get("autoattack")
            out.append(None if not aa else aa["robust_acc"])
    return out


def robust(e: Experiment, bases: Sequence[str]) -> tuple[str, dict[str, list[float]]]:
    """The stronger robust accuracy that the runs ``bases`` all have, per seed: AutoAttack's when every seed of every
    one ran it, else PGD's (one metric for all, so that like is compared with like); its name and, per base, the
    per-seed fractions."""
    aa = {b: values(e, b, "aa") for b in bases}
    if all(v is not None for vs in aa.values() for v in vs):
        return "AutoAttack", aa
    return "PGD", {b: values(e, b, "adv") for b in bases}


def cell(e: Experiment, base: str | None) -> dict | None:
    """A "nat/PGD(/AutoAttack) %" table cell: the means over seeds of run ``base`` and, with more than one seed, their
    min-max range (``range``); ``runs`` and ``seeds`` name the runs it rests on."""
    if base is None:
        return None
    runs = e.seed_runs(base)
    c: dict = {"runs": [r.spec.name for r in runs], "seeds": [r.spec.role["seed"] for r in runs]}
    rng: dict = {}
    for key, what in (("nat", "nat"), ("adv", "adv"), ("aa", "aa")):
        xs = values(e, base, what)
        if any(x is None for x in xs):
            continue
        c[key] = pct(mean(xs))
        rng[key] = [pct(min(xs)), pct(max(xs))]
    if len(runs) > 1:
        c["range"] = rng
    return c


def value_cell(xs: Sequence[float], *, percent: bool = True, digits: int = 2, **extra) -> dict:
    """A number cell: the mean over seeds of ``xs`` (fractions shown as percent, or plain with ``digits``), the raw
    per-seed values (``raw_seeds``) and, with more than one seed, the min-max range in the shown unit."""
    scale = 100.0 if percent else 1.0
    m = mean(xs)
    c = {"value": round(scale * m, digits), "raw": m, "raw_seeds": list(xs), **extra}
    if not percent:
        c["digits"] = digits
    if len(xs) > 1:
        c["range"] = [round(scale * min(xs), digits), round(scale * max(xs), digits)]
    return c


def cell_text(c: dict | None) -> str:
    """A cell as report.md prints it: ``nat/adv(/aa)`` with one seed; ``mean [min-max]`` for each number with more."""
    if c is None:
        return ""
    if "nat" in c:
        keys = [k for k in ("nat", "adv", "aa") if c.get(k) is not None]
        rng = c.get("range")
        if not rng:
            return "/".join(f"{c[k]:.2f}" for k in keys)
        return " / ".join(f"{c[k]:.2f} [{rng[k][0]:.2f}-{rng[k][1]:.2f}]" for k in keys)
    if "value" in c:
        d = c.get("digits", 2)
        s = f"{c['value']:.{d}f}"
        if c.get("range"):
            s += f" [{c['range'][0]:.{d}f}-{c['range'][1]:.{d}f}]"
        return f"**{s}**" if c.get("mark") else s
    return str(c.get("text", ""))
