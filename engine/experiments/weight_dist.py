"""The ``weight-dist`` experiment (the paper's Fig. 1): natural and adversarial training at each width, then the
accuracy table, the share of near-zero weights and their spread, with the paper's finding checked on both, and the
weight histograms."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from .runs import RunSpec
from .stats import Comparison, cell, mean, robust, value_cell, values
from .tables import Table

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Weight distributions of natural vs adversarial training (Fig. 1)"


def plan(e: Experiment) -> list[RunSpec]:
    p = e.params
    runs = []
    for w in sorted(p["widths"]):  # equal budgets: both trainings get exp.train_epochs with the same settings
        runs.append(e.dense(f"natural-w{w}", w, p["train_epochs"], natural=True))
        runs.append(e.dense(f"adv-w{w}", w, p["train_epochs"]))
    return runs


def weight_stats(sd: dict[str, torch.Tensor], names: Sequence[str], near_zero: float) -> dict:
    near = total = 0
    values = []
    for k in names:
        w = sd[k].detach().float().flatten()
        m = w.abs().max().item()
        near += int((w.abs() <= near_zero * m).sum().item()) if m > 0 else w.numel()
        total += w.numel()
        values.append(w)
    v = torch.cat(values)
    return {"near_zero": near / max(total, 1), "std": v.std().item(), "mean_abs": v.abs().mean().item(),
            "n": total, "values": v}


def report(e: Experiment) -> dict:
    p = e.params
    ws = sorted(p["widths"])
    stats = {}
    for w in ws:
        names = list(e.numels(w))
        for kind in ("natural", "adv"):
            stats[f"{kind}-w{w}"] = [weight_stats(e.state(e.run_name(f"{kind}-w{w}", seed)), names, p["near_zero"])
                                     for seed in e.seeds]
    acc = Table("accuracy", "Natural / PGD accuracy (%) after natural and adversarial training", "width",
                ["natural training", "adversarial training"],
                [{"label": f"w={w}", "cells": [cell(e, f"natural-w{w}"), cell(e, f"adv-w{w}")]} for w in ws])
    metric, rob = robust(e, [f"{k}-w{w}" for w in ws for k in ("natural", "adv")])
    acc.claim = ("adversarial training buys robustness at the cost of natural accuracy: at every width the "
                 f"adversarially trained model has the higher {metric} accuracy and the naturally trained one the "
                 "higher natural accuracy")
    checks = []
    for w in ws:
        checks.append((Comparison(f"w={w}", "adversarial", rob[f"adv-w{w}"], "natural", rob[f"natural-w{w}"],
                                  metric), +1))
        checks.append((Comparison(f"w={w}", "natural", values(e, f"natural-w{w}", "nat"), "adversarial",
                                  values(e, f"adv-w{w}", "nat"), "natural accuracy"), +1))
    acc.decide(checks)
    dist = Table("weights", f"Share of near-zero weights (%, |w| <= {p['near_zero']:g} x max |w| of the layer) and "
                            "standard deviation of the prunable weights", "width",
                 ["near-zero, natural", "near-zero, adversarial", "std, natural", "std, adversarial"], [],
                 uses=[f"{k}-w{w}" for w in ws for k in ("natural", "adv")])

    def seeds_of(run: str, key: str) -> list[float]:
        return [s[key] for s in stats[run]]

    for w in ws:
        n, a = f"natural-w{w}", f"adv-w{w}"
        dist.rows.append({"label": f"w={w}", "cells": [
            value_cell(seeds_of(n, "near_zero")), value_cell(seeds_of(a, "near_zero")),
            value_cell(seeds_of(n, "std"), percent=False, digits=4),
            value_cell(seeds_of(a, "std"), percent=False, digits=4)]})
    dist.claim = ("naturally trained weights pile up at zero while adversarially trained weights spread wider "
                  "(less sparse): the natural model has the larger share of near-zero weights at every width")
    dist.decide([(Comparison(f"w={w}", "natural", seeds_of(f"natural-w{w}", "near_zero"), "adversarial",
                             seeds_of(f"adv-w{w}", "near_zero"), "near-zero share"), +1) for w in ws])
    # histograms: shared bins per width, density per bin, every seed's weights pooled
    plots = []
    for w in ws:
        n = torch.cat([s["values"] for s in stats[f"natural-w{w}"]])
        a = torch.cat([s["values"] for s in stats[f"adv-w{w}"]])
        both = torch.cat([n, a]).abs()
        lim = float(both.kthvalue(max(1, math.ceil(0.999 * both.numel()))).values) or 1.0
        bins = int(p["bins"])
        edges = torch.linspace(-lim, lim, bins + 1)
        centers = [round(float(x), 6) for x in (edges[:-1] + edges[1:]) / 2]
        series = {}
        for label, v in (("natural", n), ("adversarial", a)):
            h = torch.histc(v.clamp(-lim, lim), bins=bins, min=-lim, max=lim)
            series[label] = [round(float(x), 6) for x in (h / max(v.numel(), 1))]
        plots.append({"file": f"weights_w{w}.png", "kind": "hist", "title": f"prunable weights, width {w}",
                      "x": centers, "series": series, "xlabel": "weight value", "ylabel": "share of weights"})
    plots.append({"file": "accuracy.png", "kind": "line", "title": "accuracy vs width (mean over seeds)", "x": ws,
                  "series": {f"natural training, {metric}": [100 * mean(rob[f"natural-w{w}"]) for w in ws],
                             f"adversarial training, {metric}": [100 * mean(rob[f"adv-w{w}"]) for w in ws],
                             "natural training, natural": [100 * mean(values(e, f"natural-w{w}", "nat")) for w in ws],
                             "adversarial training, natural": [100 * mean(values(e, f"adv-w{w}", "nat"))
                                                               for w in ws]},
                  "xlabel": "width w", "ylabel": "accuracy %"})
    weights = {e.run_name(k, seed): {kk: vv for kk, vv in s.items() if kk != "values"}
               for k, per in stats.items() for seed, s in zip(e.seeds, per)}
    return {"tables": [acc, dist], "plots": plots, "weights": weights,
            "notes": [f"Weights are all prunable weights (conv and linear) of each model; 'near zero' means |w| <= "
                      f"{p['near_zero']:g} times the largest |w| of its layer; the histograms pool every seed's "
                      f"weights. Equal budgets: natural and adversarial training get the same epochs and settings "
                      f"(exp.train_epochs), but for the attack. The paper's Fig. 1 uses VGG-16 on CIFAR-10; this run "
                      f"uses {e.cfg0.model.arch} on {e.cfg0.data.name}."]}
