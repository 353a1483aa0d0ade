"""The ``schemes`` experiment: one dense model ADMM-pruned to each target width with each pruning scheme (irregular,
column, filter); the accuracy table, the finding on which scheme keeps the most robustness, and the plots."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .runs import RunSpec
from .tables import Table, adv, nat, pair, prune_note, pstr, ratio_label

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
    t = Table("schemes", f"Natural / PGD accuracy (%) of w={big} pruned with each scheme (dense w={big}: "
                         f"{pstr(nat(e, f'adv-w{big}'))}/{pstr(adv(e, f'adv-w{big}'))})", "pruned to", schemes, [])
    for s in smalls:
        t.rows.append({"label": ratio_label(e, big, s),
                       "cells": [pair(e.runs[f"admm-{sc}-w{big}-to-w{s}"]) for sc in schemes]})
    order = [sc for sc in ("irregular", "column", "filter") if sc in schemes]
    t.claim = ("finer-grained pruning keeps more robustness: " + " >= ".join(order) + " in PGD accuracy at every "
               "ratio, the gap widening at high ratios")
    bad = []
    for s in smalls:
        vals = [adv(e, f"admm-{sc}-w{big}-to-w{s}") for sc in order]
        if any(a < b for a, b in zip(vals, vals[1:])):
            bad.append(s)
    t.held = not bad and len(order) > 1
    gaps = {s: 100 * (adv(e, f"admm-{order[0]}-w{big}-to-w{s}") - adv(e, f"admm-{order[-1]}-w{big}-to-w{s}"))
            for s in smalls}
    widen = (f"; the {order[0]}-{order[-1]} gap is " + ", ".join(f"{gaps[s]:+.2f} at {big}->{s}" for s in smalls)
             + (" (widening)" if len(smalls) > 1 and gaps[smalls[-1]] > gaps[smalls[0]] else
                " (not widening)" if len(smalls) > 1 else "")) if len(order) > 1 else ""
    if t.held:
        t.detail = f"{' >= '.join(order)} in PGD accuracy at every ratio" + widen
    else:
        t.detail = ("the order breaks at " + ", ".join(
            f"{big}->{s} (" + ", ".join(f"{sc} {pstr(adv(e, f'admm-{sc}-w{big}-to-w{s}'))}" for sc in order) + ")"
            for s in bad) + widen) if bad else "fewer than two schemes to compare"
    lin = ("its linear layers take the compared scheme too (LeNet's weights are mostly linear), except the last "
           "layer, which stays dense (filter pruning it would delete classes)" if p["linear"] == "match" else
           "linear layers are pruned irregularly in every scheme, as in the paper")
    used = e.runs[f"admm-{schemes[0]}-w{big}-to-w{smalls[-1]}"].spec.role["ratios"]
    t.note = (prune_note(e, big, smalls[-1], ratios=used) + f" Convolutions take the scheme; {lin}. Filter = whole "
              "rows of the (out, -1) view, column = whole columns of it.")
    x = [f"{big}->{s}" for s in smalls]
    plots = [{"file": "schemes_pgd.png", "kind": "line", "title": "PGD accuracy by scheme", "x": x,
              "series": {sc: [100 * adv(e, f"admm-{sc}-w{big}-to-w{s}") for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": "PGD accuracy %"},
             {"file": "schemes_natural.png", "kind": "line", "title": "natural accuracy by scheme", "x": x,
              "series": {sc: [100 * nat(e, f"admm-{sc}-w{big}-to-w{s}") for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": "natural accuracy %"}]
    return {"tables": [t], "plots": plots}
