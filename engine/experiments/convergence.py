"""Whether ADMM had converged before the hard prune, read from each ADMM run's own records (metrics.jsonl): the
primal residuals ||W - Z|| / ||W|| of the last ``residuals`` record of the ADMM phase (emitted at its end), and the
natural / PGD accuracy of the ADMM phase's ``phase_end`` evaluation, the last one before the hard prune that starts
retraining. A table whose numbers rest on an ADMM run whose mean primal residual is above :data:`PRIMAL_CONVERGED`
(on any seed) gets a warning."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..rundir import RunDir, read_jsonl
from .stats import mean

if TYPE_CHECKING:
    from .runner import Experiment
    from .tables import Table

# ADMM counts as converged when the mean over the pruned layers of ||W - Z|| / ||W|| at the end of the ADMM phase is
# at most this: the hard prune then moves the weights by about 5% of their norm or less
PRIMAL_CONVERGED = 0.05
RULE = (f"ADMM counts as converged when the mean over the pruned layers of the primal residual ||W - Z|| / ||W|| at "
        f"the end of the ADMM phase is at most {PRIMAL_CONVERGED:g}")


def admm_end(run_dir: str | Path) -> dict | None:
    """The end of a run's ADMM phase: mean and largest primal residual over the layers, mean dual residual, the Z/U
    updates done, and the natural / PGD accuracy just before the hard prune (``before_hard_prune``: the ADMM phase's
    ``phase_end`` evaluation, on ``eval.subset`` examples). None when the run had no ADMM phase."""
    records = read_jsonl(RunDir(run_dir).metrics)
    res = [r for r in records if r.get("type") == "residuals" and r.get("phase") == "admm" and r.get("layers")]
    if not res:
        return None
    layers = res[-1]["layers"]
    primal = [float(v["primal"]) for v in layers.values()]
    out = {"primal_mean": mean(primal), "primal_max": max(primal),
           "dual_mean": mean([float(v["dual"]) for v in layers.values()]), "updates": res[-1].get("update"),
           "converged": mean(primal) <= PRIMAL_CONVERGED, "before_hard_prune": None}
    ev = [r for r in records if r.get("type") == "eval" and r.get("phase") == "admm" and r.get("reason") == "phase_end"]
    if ev:
        out["before_hard_prune"] = {k: ev[-1].get(k) for k in ("nat_acc", "adv_acc", "n")}
    return out


def collect(e: Experiment) -> dict[str, dict]:
    """:func:`admm_end` of every ADMM run of the experiment, by run name."""
    out = {}
    for name, r in e.runs.items():
        if r.spec.role.get("kind") == "admm":
            end = admm_end(r.path)
            if end is not None:
                out[name] = end
    return out


def _table_runs(e: Experiment, t: Table) -> list[str]:
    """The bases of the runs a table rests on: its cells' runs and the ones it names in ``uses``."""
    bases = list(t.uses)
    for row in t.rows:
        for c in row["cells"]:
            for name in (c or {}).get("runs", []):
                base = e.runs[name].spec.role["base"]
                if base not in bases:
                    bases.append(base)
    return bases


def warnings_for(e: Experiment, t: Table, ends: dict[str, dict]) -> list[str]:
    """One warning per ADMM run (base) of the table that had not converged on some seed."""
    out = []
    for base in _table_runs(e, t):
        names = [e.run_name(base, s) for s in e.seeds]
        got = [ends.get(n) for n in names]
        if not any(g is not None and not g["converged"] for g in got):
            continue
        per_seed = ", ".join(f"seed {s}: {g['primal_mean']:.3f}" + _before(g)
                             for s, g in zip(e.seeds, got) if g is not None)
        out.append(f"Warning: ADMM had not converged in {base} (mean primal residual at the end of the ADMM phase "
                   f"above {PRIMAL_CONVERGED:g}; {per_seed}): its hard prune moved the weights a long way, and the "
                   f"comparison may reflect that rather than the method.")
    return out


def _before(g: dict) -> str:
    b = g.get("before_hard_prune")
    if not b or b.get("nat_acc") is None:
        return ""
    return f" (natural/PGD {100 * b['nat_acc']:.1f}/{100 * b['adv_acc']:.1f}% just before the hard prune)"


def annotate(e: Experiment, tables: Sequence) -> dict[str, dict]:
    """Add the convergence warnings to every table; returns :func:`collect`'s dict."""
    ends = collect(e)
    for t in tables:
        if hasattr(t, "warnings"):
            t.warnings += warnings_for(e, t, ends)
    return ends
