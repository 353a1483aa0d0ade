"""The ``budgets`` experiment (issue #19): one dense model ADMM-pruned to each overall sparsity with each per-layer
budget (``prune.allocation``: uniform, global, erk); the accuracy table, the per-layer ratios each allocation chose
(read from every run's summary.json), and HARP's lesson checked: non-uniform budgets beat uniform most at the highest
sparsity."""
from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

from ..config import toml_value
from ..pruning import n_pruned
from .runs import RunSpec
from .stats import Comparison, cell, cell_text, mean, robust, value_cell, values
from .tables import Table, plural

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Per-layer budgets: uniform vs global vs ERK at high sparsity"


def ratio_text(r: float) -> str:
    """An overall sparsity as the report names it: 0.9 -> ``90``, 0.995 -> ``99.5`` (exact decimal, no float
    noise)."""
    return format((Decimal(repr(float(r))) * 100).normalize(), "f")


def run_base(e: Experiment, allocation: str, r: float) -> str:
    return f"admm-w{e.params['width']}-{allocation}-{ratio_text(r)}pct"


def plan(e: Experiment) -> list[RunSpec]:
    p, w = e.params, e.params["width"]
    runs = [e.dense_large()]
    src = e.run_dir(e.run_name(f"adv-w{w}")) / "model.pt"
    for r in sorted(p["ratios"]):
        for a in p["allocations"]:
            # equal budgets by construction: every allocation at every ratio gets the same ADMM and retraining
            # (epochs, optimizer, learning rate, schedule, eps warm-up, attack) from the same dense model (of its
            # seed); only prune.allocation and prune.ratio differ. prune.layers is empty: the allocation covers every
            # layer (whatever the base profile's [prune.layers] says), irregular pruning (global and erk count single
            # weights)
            ov = [f"model.width={w}", f"prune.ratio={r!r}", "prune.layers={}", f"prune.allocation={toml_value(a)}",
                  f"prune.global_normalize={toml_value(a == 'global' and p['global_normalize'])}",
                  'prune.scheme="irregular"', 'prune.linear_scheme="irregular"',
                  *e.epochs(0, p["admm_epochs"], p["retrain_epochs"]), f"run.init={toml_value(str(src))}"]
            runs.append(e.run_spec(run_base(e, a, r), ov, {
                "kind": "admm", "width": w, "allocation": a, "ratio": r, "scheme": "irregular",
                "source": f"adv-w{w}", "from": f"trained adv-w{w}"}))
    return runs


def allocated(e: Experiment, base: str) -> dict:
    """The per-layer ratios a run chose, per seed, from its summary.json: ``layers`` (name -> [target per seed]),
    ``numel`` (name -> entries), ``pruned`` / ``prunable`` (per seed: the entries the allocation removes over all
    prunable layers, and their total)."""
    runs = e.seed_runs(base)
    layers: dict[str, list[float]] = {}
    numel: dict[str, int] = {}
    pruned, prunable = [], []
    for r in runs:
        for L in r.summary["layers"]:
            layers.setdefault(L["name"], []).append(float(L["target"]))
            numel[L["name"]] = int(L["params"])
        a = r.summary["prune"].get("allocated") or {}
        pruned.append(a.get("pruned"))
        prunable.append(a.get("prunable"))
    return {"layers": layers, "numel": numel, "pruned": pruned, "prunable": prunable}


def _target_cell(xs: list[float]) -> dict:
    """A per-layer target in %: one number when every seed chose the same (uniform, erk), else the mean over seeds
    and its min-max range (global ranks each seed's own weights)."""
    c = value_cell(xs)
    if min(xs) == max(xs):
        c.pop("range", None)
    if min(xs) == 1.0:  # every weight of the layer removed, on every seed: bold
        c["mark"] = "removed"
    return c


def _count_cell(info: dict) -> dict:
    pairs = sorted({(a, b) for a, b in zip(info["pruned"], info["prunable"])}, key=str)
    return {"text": "; ".join(f"{a} / {b}" for a, b in pairs)}


def report(e: Experiment) -> dict:
    p = e.params
    w = p["width"]
    ratios = sorted(p["ratios"])
    allocs = list(p["allocations"])
    others = [a for a in allocs if a != "uniform"]
    label = {r: f"{ratio_text(r)}%" for r in ratios}
    run = {(a, r): run_base(e, a, r) for r in ratios for a in allocs}
    dense = f"adv-w{w}"

    # ---------------------------------------------------------------- (1) accuracy, and the finding
    t = Table("budgets", f"Natural / PGD accuracy (%) of w={w} ADMM-pruned to each overall sparsity with each "
                         f"per-layer budget (dense w={w}: {cell_text(cell(e, dense))})", "allocation",
              [label[r] for r in ratios], [], uses=[dense])
    for a in allocs:
        t.rows.append({"label": a, "cells": [cell(e, run[(a, r)]) for r in ratios]})
    metric, acc = robust(e, list(run.values()))
    best = {r: max(others, key=lambda a, r=r: mean(acc[run[(a, r)]])) for r in ratios}
    margin = {r: [x - u for x, u in zip(acc[run[(best[r], r)]], acc[run[("uniform", r)]])] for r in ratios}
    lo, hi = ratios[0], ratios[-1]
    t.claim = ("HARP's lesson (Zhao et al. 2023; not the paper's): non-uniform per-layer budgets "
               f"({', '.join(others)}) beat uniform most at the highest sparsity: at {label[hi]} the best of them "
               f"beats uniform in {metric} accuracy"
               + (f", by a larger margin than at {label[lo]} (the margin: the best non-uniform allocation's accuracy "
                  "minus uniform's, per seed)" if len(ratios) > 1 else
                  " (one ratio only: the 'most at the highest' half of the finding is not tested)"))
    checks = [(Comparison(f"at {label[hi]}", best[hi], acc[run[(best[hi], hi)]], "uniform",
                          acc[run[("uniform", hi)]], metric), +1)]
    if len(ratios) > 1:
        checks.append((Comparison("margin over uniform", f"at {label[hi]} ({best[hi]})", margin[hi],
                                  f"at {label[lo]} ({best[lo]})", margin[lo], metric), +1))
    t.decide(checks, "best non-uniform minus uniform (means): "
             + ", ".join(f"{100 * mean(margin[r]):+.2f} at {label[r]} ({best[r]})" for r in ratios))
    chance = 1.0 / e.data_spec.num_classes
    dead = [f"{a} {label[r]} (seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))})" for r in ratios
            for a in allocs if (bad := [s for s, x in zip(e.seeds, values(e, run[(a, r)], "nat")) if x <= 2 * chance])]
    exact = {r: _uniform_shortfall(e, run[("uniform", r)]) for r in ratios}
    short = [f"{label[r]}: {n}" for r, n in exact.items() if n]
    t.note = (f"Every allocation prunes all {plural(len(e.numels(w)), 'prunable layer')} of the same trained dense "
              f"w={w} model (of its seed), irregularly, to the overall sparsity of the column: global and erk remove "
              "exactly floor(ratio x total) weights; uniform removes floor(ratio x n) of each layer, which can be a "
              "few weights fewer in all" + (f" (here {', '.join(short)} fewer)" if short else " (here exactly as "
                                           "many)") + ". Global ranks |w|"
              + (" / RMS of its layer" if p["global_normalize"] else "") + " over all layers together at the start "
              "of the ADMM phase (the trained dense weights); erk sets densities by Erdos-Renyi-Kernel scaling "
              "(Evci et al. 2020). Equal budgets: every allocation at every ratio gets the same "
              f"{plural(p['admm_epochs'], 'ADMM epoch')} and {plural(p['retrain_epochs'], 'retraining epoch')} with "
              f"the same settings and attack. The finding compares the best non-uniform allocation at each ratio "
              f"(the highest mean {metric} accuracy) with uniform; the margin comparison applies the verdict rule to "
              "the per-seed margins."
              + (f" Collapsed (natural accuracy at most {100 * 2 * chance:.0f}%, twice chance: the model predicts "
                 "(nearly) one class, and its robust accuracy is about that class's share of the test examples, which "
                 "a weak but working model can fall below under a strong attack): " + "; ".join(dead) + "."
                 if dead else ""))

    # ---------------------------------------------------------------- (2) the per-layer ratios chosen
    info = {(a, r): allocated(e, run[(a, r)]) for r in ratios for a in allocs}
    first = info[(allocs[0], lo)]
    cols = [(a, r) for r in ratios for a in allocs]
    lt = Table("ratios", "Per-layer pruning ratio (%) each allocation chose at each overall sparsity (the runs' "
                         "summary.json targets)", "layer (weights)", [f"{a} {label[r]}" for a, r in cols], [])
    for name, n in first["numel"].items():
        lt.rows.append({"label": f"{name} ({n})", "cells": [_target_cell(info[c]["layers"][name]) for c in cols]})
    lt.rows.append({"label": "pruned / prunable", "cells": [_count_cell(info[c]) for c in cols]})
    varies = sorted({a for (a, r), i in info.items() for xs in i["layers"].values() if min(xs) != max(xs)})
    lt.note = ("uniform and erk do not depend on the weights, so not on the seed; global ranks each seed's own "
               "trained weights" + (f": where its seeds chose differently ({', '.join(varies)}), the cell is the mean "
                                    "over seeds and its min-max range" if varies else
                                    (", and chose the same ratios on every seed here" if len(e.seeds) > 1 else
                                     " (one seed here)"))
               + ". 'pruned / prunable': the weights the allocation removes over all prunable layers (the run's "
               "`prune.allocated`), the same on every seed. Bold: the layer is removed entirely (on every seed), and "
               "the model predicts one class whatever its input.")

    x = [label[r] for r in ratios]
    plots = [{"file": "budgets_robust.png", "kind": "line", "title": f"{metric} accuracy by per-layer budget (mean "
                                                                      f"over {plural(len(e.seeds), 'seed')})",
              "x": x, "series": {a: [100 * mean(acc[run[(a, r)]]) for r in ratios] for a in allocs},
              "xlabel": "overall sparsity", "ylabel": f"{metric} accuracy %"},
             {"file": "budgets_natural.png", "kind": "line", "title": "natural accuracy by per-layer budget", "x": x,
              "series": {a: [100 * mean(values(e, run[(a, r)], "nat")) for r in ratios] for a in allocs},
              "xlabel": "overall sparsity", "ylabel": "natural accuracy %"}]
    chosen = {a: {label[r]: {"layers": info[(a, r)]["layers"], "pruned": info[(a, r)]["pruned"],
                             "prunable": info[(a, r)]["prunable"]} for r in ratios} for a in allocs}
    return {"tables": [t, lt], "plots": plots, "allocations": chosen,
            "best_non_uniform": {label[r]: best[r] for r in ratios},
            "margin_over_uniform": {label[r]: {"allocation": best[r], "seeds": margin[r]} for r in ratios}}


def _uniform_shortfall(e: Experiment, base: str) -> int:
    """How many weights fewer than floor(ratio x total) a uniform run removes (the per-layer floors), on its first
    seed (the counts do not depend on the seed)."""
    r = e.seed_runs(base)[0]
    a = r.summary["prune"].get("allocated") or {}
    if a.get("pruned") is None:
        return 0
    return n_pruned(int(a["prunable"]), float(a["ratio"])) - int(a["pruned"])
