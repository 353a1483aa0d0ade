"""The ``transfer`` experiment: dense (adversarial and natural) and ADMM-pruned models, then the matrix of PGD
accuracies of every model on adversarial examples crafted on every other, and the finding that the white-box attack
is the strongest."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import data as data_mod
from .runs import RunSpec
from .stats import Comparison, mean, value_cell
from .tables import Table

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Transfer attacks between dense and pruned models"


def plan(e: Experiment) -> list[RunSpec]:
    p = e.params
    runs = [e.dense(f"adv-w{w}", w, p["train_epochs"]) for w in sorted(p["dense"])]
    runs += [e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True) for w in sorted(p["natural"])]
    runs += [e.pruned(f"admm-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                      retrain=p["retrain_epochs"]) for big, small in p["pruned"]]
    return runs


def _matrix(e: Experiment, models: list[str], seed: int, x: torch.Tensor, y: torch.Tensor, dev: str
            ) -> tuple[dict, dict]:
    """One seed's matrix: PGD accuracy of model j on examples crafted on model i, and each model's clean accuracy."""
    from ..attacks import pgd

    ea = e.cfg0.attack.eval
    bs = e.cfg0.data.test_batch_size
    nets = {m: e.model(e.run_name(m, seed)).to(dev) for m in models}
    acc, clean = {}, {}

    def correct(net, xs) -> int:
        with torch.no_grad():
            return sum(int((net(xs[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(xs), bs))

    for j, net in nets.items():
        clean[j] = correct(net, x) / len(x)
    with torch.random.fork_rng(devices=[0] if dev == "cuda" else []):
        torch.manual_seed(seed + 2)
        for i_name, src in nets.items():
            adv = torch.cat([pgd(src, x[i:i + bs], y[i:i + bs], eps=ea.eps, step_size=ea.step_size, steps=ea.steps,
                                 restarts=ea.restarts) for i in range(0, len(x), bs)])
            for j_name, tgt in nets.items():
                acc[(i_name, j_name)] = correct(tgt, adv) / len(x)
    return acc, clean


def report(e: Experiment) -> dict:
    from .. import api

    p = e.params
    models = [s.role["base"] for s in e.plan if s.role["seed"] == e.seeds[0]]
    dev = "cuda" if torch.cuda.is_available() and e.cfg0.run.device != "cpu" else "cpu"
    x, y = api.load_test_set(e.run_dir(e.run_name(models[0])), dev)
    x, y = data_mod.eval_subset(x, y, int(p["subset"]))
    per_seed = [_matrix(e, models, seed, x, y, dev) for seed in e.seeds]
    acc = {k: [m[0][k] for m in per_seed] for k in per_seed[0][0]}
    clean = {j: [m[1][j] for m in per_seed] for j in models}
    t = Table("transfer", f"PGD accuracy (%) of model j (columns) on adversarial examples crafted on model i (rows) of "
                          f"the same seed, {len(x)} test examples; the diagonal (white-box) in bold; last row: natural "
                          "accuracy", "crafted on (row), evaluated on (column)", models, [], uses=list(models))
    for i_name in models:
        t.rows.append({"label": i_name, "cells": [
            value_cell(acc[(i_name, j)], **({"mark": "white-box"} if i_name == j else {})) for j in models]})
    t.rows.append({"label": "natural (no attack)", "cells": [value_cell(clean[j]) for j in models]})
    t.claim = ("each model is most vulnerable to adversarial examples generated on itself, whatever its size: in "
               "every column the white-box (diagonal) accuracy is the lowest")
    t.decide([(Comparison(f"column {j}", f"crafted on {i}", acc[(i, j)], "white-box", acc[(j, j)], "PGD"), +1)
              for j in models for i in models if i != j])
    pruned = [m for m in models if m.startswith("admm-")]
    others = [m for m in models if m not in pruned]

    def transfer_mean(j: str) -> str:
        return f"{j} {100 * mean([mean(acc[(i, j)]) for i in models if i != j]):.2f}" if len(models) > 1 else j

    t.note = ("Adversarial examples: PGD with the evaluation settings (eps, step, steps, restarts), crafted on model i "
              "of each seed with torch seed (seed + 2), evaluated on the models of the same seed; cells are means over "
              "seeds. The verdict compares every off-diagonal cell with the white-box cell of its column (a PGD "
              "matrix: the runs' final AutoAttack does not enter it). Mean transfer (off-diagonal) accuracy of the "
              "pruned models: " + (", ".join(transfer_mean(j) for j in pruned) or "none") + "; of the others: "
              + (", ".join(transfer_mean(j) for j in others) or "none") + ".")
    plots = [{"file": "transfer.png", "kind": "matrix", "title": "PGD accuracy: crafted on row, evaluated on column",
              "xlabels": models, "ylabels": models,
              "matrix": [[100 * mean(acc[(i, j)]) for j in models] for i in models]}]
    matrix = {"models": models, "seeds": e.seeds, "adv_acc": [[mean(acc[(i, j)]) for j in models] for i in models],
              "nat_acc": [mean(clean[j]) for j in models], "n": len(x),
              "per_seed": {str(seed): {"adv_acc": [[m[0][(i, j)] for j in models] for i in models],
                                       "nat_acc": [m[1][j] for j in models]} for seed, m in zip(e.seeds, per_seed)}}
    return {"tables": [t], "plots": plots, "transfer": matrix}
