"""The ``weight-dist`` experiment (the paper's Fig. 1): natural and adversarial training at each width, then the
accuracy table, the share of near-zero weights and their spread, with the paper's finding checked on both, and the
weight histograms."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from .runs import RunSpec
from .tables import Table, adv, nat, pair, pct, pstr

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Weight distributions of natural vs adversarial training (Fig. 1)"


def plan(e: Experiment) -> list[RunSpec]:
    p = e.params
    runs = []
    for w in sorted(p["widths"]):
        runs.append(e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True))
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
    names = None
    for w in ws:
        names = list(e.numels(w))
        for kind in ("natural", "adv"):
            stats[f"{kind}-w{w}"] = weight_stats(e.state(f"{kind}-w{w}"), names, p["near_zero"])
    acc = Table("accuracy", "Natural / PGD accuracy (%) after natural and adversarial training", "width",
                ["natural training", "adversarial training"],
                [{"label": f"w={w}", "cells": [pair(e.runs[f"natural-w{w}"]), pair(e.runs[f"adv-w{w}"])]} for w in ws])
    acc.claim = ("adversarial training buys PGD accuracy at the cost of natural accuracy: at every width the "
                 "adversarially trained model has the higher PGD accuracy and the naturally trained one the higher "
                 "natural accuracy")
    bad = [w for w in ws if not (adv(e, f"adv-w{w}") > adv(e, f"natural-w{w}")
                                 and nat(e, f"natural-w{w}") >= nat(e, f"adv-w{w}"))]
    acc.held = not bad
    acc.detail = (f"at every width ({', '.join(map(str, ws))}) adversarial training has the higher PGD accuracy and "
                  f"natural training the higher natural accuracy" if not bad else
                  "not at width " + ", ".join(f"{w} (PGD {pstr(adv(e, f'adv-w{w}'))} adversarial vs "
                                              f"{pstr(adv(e, f'natural-w{w}'))} natural; natural acc "
                                              f"{pstr(nat(e, f'natural-w{w}'))} vs {pstr(nat(e, f'adv-w{w}'))})"
                                              for w in bad))
    dist = Table("weights", f"Share of near-zero weights (%, |w| <= {p['near_zero']:g} x max |w| of the layer) and "
                            "standard deviation of the prunable weights", "width",
                 ["near-zero, natural", "near-zero, adversarial", "std, natural", "std, adversarial"], [])
    for w in ws:
        n, a = stats[f"natural-w{w}"], stats[f"adv-w{w}"]
        dist.rows.append({"label": f"w={w}", "cells": [
            {"value": pct(n["near_zero"]), "raw": n["near_zero"]}, {"value": pct(a["near_zero"]), "raw": a["near_zero"]},
            {"value": round(n["std"], 4), "raw": n["std"], "digits": 4},
            {"value": round(a["std"], 4), "raw": a["std"], "digits": 4}]})
    dist.claim = ("naturally trained weights pile up at zero while adversarially trained weights spread wider "
                  "(less sparse): the natural model has the larger share of near-zero weights at every width")
    bad = [w for w in ws if not stats[f"natural-w{w}"]["near_zero"] > stats[f"adv-w{w}"]["near_zero"]]
    dist.held = not bad
    dist.detail = ("the naturally trained model has more near-zero weights at every width ("
                   + ", ".join(f"w={w}: {100 * stats[f'natural-w{w}']['near_zero']:.2f}% vs "
                               f"{100 * stats[f'adv-w{w}']['near_zero']:.2f}%" for w in ws) + ")") if not bad else (
        "the adversarially trained model has as many or more near-zero weights at width "
        + ", ".join(f"{w} ({100 * stats[f'natural-w{w}']['near_zero']:.2f}% natural vs "
                    f"{100 * stats[f'adv-w{w}']['near_zero']:.2f}% adversarial)" for w in bad))
    # histograms: shared bins per width, density per bin
    plots = []
    for w in ws:
        n, a = stats[f"natural-w{w}"]["values"], stats[f"adv-w{w}"]["values"]
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
    plots.append({"file": "accuracy.png", "kind": "line", "title": "accuracy vs width", "x": ws,
                  "series": {"natural training, PGD": [100 * adv(e, f"natural-w{w}") for w in ws],
                             "adversarial training, PGD": [100 * adv(e, f"adv-w{w}") for w in ws],
                             "natural training, natural": [100 * nat(e, f"natural-w{w}") for w in ws],
                             "adversarial training, natural": [100 * nat(e, f"adv-w{w}") for w in ws]},
                  "xlabel": "width w", "ylabel": "accuracy %"})
    weights = {k: {kk: vv for kk, vv in s.items() if kk != "values"} for k, s in stats.items()}
    return {"tables": [acc, dist], "plots": plots, "weights": weights,
            "notes": [f"Weights are all prunable weights (conv and linear) of each model; 'near zero' means |w| <= "
                      f"{p['near_zero']:g} times the largest |w| of its layer. The paper's Fig. 1 uses VGG-16 on "
                      f"CIFAR-10; this run uses {e.cfg0.model.arch} on {e.cfg0.data.name}."]}
