"""The ``schemes`` experiment: one dense model ADMM-pruned to each target width with each pruning scheme (irregular,
column, filter); the accuracy table, the finding on which scheme keeps the most robustness, and the plots."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .runs import RunSpec
from .stats import Comparison, cell, cell_text, mean, robust, values
from .tables import Table, plural, prune_note, ratio_label

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Pruning schemes: irregular vs column vs filter"


def plan(e: Experiment) -> list[RunSpec]:
    p, big = e.params, e.params["width"]
    runs = [e.dense_large()]
    for small in sorted(p["targets"], reverse=True):
        for s in p["schemes"]:
            runs.append(e.pruned(f"admm-{s}-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                                 retrain=p["retrain_epochs"], scheme=s, linear=p["linear"]))
    return runs


def report(e: Experiment) -> dict:
    p = e.params
    big = p["width"]
    smalls = sorted(p["targets"], reverse=True)
    schemes = list(p["schemes"])
    run = {(sc, s): f"admm-{sc}-w{big}-to-w{s}" for sc in schemes for s in smalls}
    t = Table("schemes", f"Natural / PGD accuracy (%) of w={big} pruned with each scheme (dense w={big}: "
                         f"{cell_text(cell(e, f'adv-w{big}'))})", "pruned to", schemes, [], uses=[f"adv-w{big}"])
    for s in smalls:
        t.rows.append({"label": ratio_label(e, big, s), "cells": [cell(e, run[(sc, s)]) for sc in schemes]})
    order = [sc for sc in ("irregular", "column", "filter") if sc in schemes]
    metric, acc = robust(e, list(run.values()))
    t.claim = ("finer-grained pruning keeps more robustness: " + " > ".join(order) + f" in {metric} accuracy at every "
               "ratio, the gap widening at high ratios")
    checks = [(Comparison(f"{big}->{s}", a, acc[run[(a, s)]], b, acc[run[(b, s)]], metric), +1)
              for s in smalls for a, b in zip(order, order[1:])]
    gaps = {s: 100 * (mean(acc[run[(order[0], s)]]) - mean(acc[run[(order[-1], s)]])) for s in smalls} \
        if len(order) > 1 else {}
    widen = (f"the {order[0]}-{order[-1]} gap of the means is " + ", ".join(f"{gaps[s]:+.2f} at {big}->{s}"
                                                                             for s in smalls)
             + (" (widening)" if len(smalls) > 1 and gaps[smalls[-1]] > gaps[smalls[0]] else
                " (not widening)" if len(smalls) > 1 else "")) if len(order) > 1 else ""
    t.decide(checks, widen)
    if len(order) < 2:
        t.detail = "fewer than two schemes to compare"
    lin = ("its linear layers take the compared scheme too (LeNet's weights are mostly linear), except the last "
           "layer, which stays dense (filter pruning it would delete classes)" if p["linear"] == "match" else
           "linear layers are pruned irregularly in every scheme, as in the paper")
    used = e.seed_runs(run[(schemes[0], smalls[-1])])[0].spec.role["ratios"]
    t.note = (prune_note(e, big, smalls[-1], ratios=used) + f" Convolutions take the scheme; {lin}. Filter = whole "
              "rows of the (out, -1) view, column = whole columns of it. Equal budgets: every scheme gets the same "
              "ADMM and retraining epochs and settings from the same dense model (of its seed).")
    x = [f"{big}->{s}" for s in smalls]
    plots = [{"file": "schemes_pgd.png", "kind": "line", "title": f"{metric} accuracy by scheme (mean over "
                                                                 f"{plural(len(e.seeds), 'seed')})", "x": x,
              "series": {sc: [100 * mean(acc[run[(sc, s)]]) for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": f"{metric} accuracy %"},
             {"file": "schemes_natural.png", "kind": "line", "title": "natural accuracy by scheme", "x": x,
              "series": {sc: [100 * mean(values(e, run[(sc, s)], "nat")) for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": "natural accuracy %"}]
    return {"tables": [t], "plots": plots}
