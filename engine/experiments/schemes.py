"""The ``schemes`` experiment: one dense model ADMM-pruned to each target width with each pruning scheme (irregular,
column, filter); the accuracy table, the finding on which scheme keeps the most robustness, and the plots. With
``exp.nm`` (e.g. "2:4", the pattern GPUs accelerate) also the dense model pruned N:M and, for comparison, pruned
irregularly to exactly the same per-layer ratios."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import toml_value
from ..models import prunable_parameters
from ..pruning import nm_ratio, parse_nm
from .runs import RunSpec
from .specs import UNIFORM
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
    if p["nm"]:
        runs += _nm_runs(e, big, p["nm"])
    return runs


def nm_names(big: int, nm: str) -> tuple[str, str]:
    n, m = parse_nm(nm)
    return f"admm-{n}of{m}-w{big}", f"admm-irregular-as-{n}of{m}-w{big}"


def nm_layer_ratios(e: Experiment, big: int, nm: str) -> dict[str, float]:
    """Each prunable layer's ratio under ``nm``: 1 - N/M where its rows (the (out, -1) view) split into groups of M,
    0 (dense) where they do not (LeNet's first conv: rows of 25)."""
    _, m = parse_nm(nm)
    return {k: nm_ratio(nm) if w[0].numel() % m == 0 else 0.0 for k, w in prunable_parameters(e.build(big)).items()}


def _nm_runs(e: Experiment, big: int, nm: str) -> list[RunSpec]:
    """The dense model pruned N:M, and pruned irregularly to the same per-layer ratios: the same ADMM and retraining
    epochs and settings (equal budgets)."""
    p, ratios = e.params, nm_layer_ratios(e, big, nm)
    src = e.run_name(f"adv-w{big}")
    common = [f"model.width={big}", "prune.ratio=0", "prune.layers={}", *UNIFORM,
              *e.epochs(0, p["admm_epochs"], p["retrain_epochs"]), f"run.init={toml_value(str(e.run_dir(src) / 'model.pt'))}"]
    layers = [f"prune.layers.{k}={r!r}" for k, r in ratios.items()]
    role = {"kind": "admm", "w_L": big, "source": f"adv-w{big}", "from": f"trained adv-w{big}", "ratios": ratios}
    name_nm, name_irr = nm_names(big, nm)
    return [e.run_spec(name_nm, [*common, f"prune.scheme={toml_value(nm)}", f"prune.linear_scheme={toml_value(nm)}",
                                 *layers], {**role, "scheme": nm}),
            e.run_spec(name_irr, [*common, 'prune.scheme="irregular"', 'prune.linear_scheme="irregular"',
                                  *[x for x, r in zip(layers, ratios.values()) if r > 0]], {**role, "scheme": "irregular"})]


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
    tables = [t]
    if p["nm"]:
        tables.append(_nm_table(e, big, p["nm"]))
    return {"tables": tables, "plots": plots}


def _nm_table(e: Experiment, big: int, nm: str) -> Table:
    name_nm, name_irr = nm_names(big, nm)
    ratios = e.seed_runs(name_nm)[0].spec.role["ratios"]
    pruned = [k for k, r in ratios.items() if r > 0]
    t = Table("nm", f"Natural / PGD accuracy (%) of w={big} pruned {nm} against irregular pruning at the same "
                    "per-layer ratios", "pruning", [nm, "irregular, same ratios"],
              [{"label": f"{100 * nm_ratio(nm):.0f}% of {len(pruned)} of {len(ratios)} layers",
                "cells": [cell(e, name_nm), cell(e, name_irr)]}], uses=[f"adv-w{big}"])
    metric, acc = robust(e, [name_nm, name_irr])
    diff = 100 * (mean(acc[name_irr]) - mean(acc[name_nm]))
    dense = [k for k, r in ratios.items() if r == 0]
    n, m = parse_nm(nm)
    t.note = (f"Not one of the paper's findings, so no verdict: irregular minus {nm} is {diff:+.2f} {metric} points "
              f"(means over seeds). {nm}: in every group of {m} consecutive weights of a row the {n} largest stay, the "
              "same count per layer as irregular pruning under a stricter pattern, which GPUs with sparse tensor cores "
              "run faster (robprune bench --semi-structured)."
              + (f" Left dense (rows not a multiple of {m}): {', '.join(dense)}." if dense else "")
              + " Equal budgets: both runs get the same ADMM and retraining epochs and settings from the same dense "
              "model (of its seed).")
    return t
