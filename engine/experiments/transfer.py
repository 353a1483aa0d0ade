"""The ``transfer`` experiment: dense (adversarial and natural) and ADMM-pruned models, then the matrix of PGD
accuracies of every model on adversarial examples crafted on every other, and the finding that the white-box attack
is the strongest."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import data as data_mod
from .runs import RunSpec
from .tables import Table, pct, pstr

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


def report(e: Experiment) -> dict:
    from ..attacks import pgd

    p = e.params
    models = [s.name for s in e.plan]
    cfg = e.cfg0
    ea = cfg.attack.eval
    from .. import api

    dev = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
    x, y = api.load_test_set(e.run_dir(models[0]), dev)
    x, y = data_mod.eval_subset(x, y, int(p["subset"]))
    nets = {m: e.model(m).to(dev) for m in models}
    bs = cfg.data.test_batch_size
    acc = {}
    clean = {}
    for j, net in nets.items():
        with torch.no_grad():
            clean[j] = sum(int((net(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)
    with torch.random.fork_rng(devices=[0] if dev == "cuda" else []):
        torch.manual_seed(e.seed + 2)
        for i_name, src in nets.items():
            adv = torch.cat([pgd(src, x[i:i + bs], y[i:i + bs], eps=ea.eps, step_size=ea.step_size, steps=ea.steps,
                                 restarts=ea.restarts) for i in range(0, len(x), bs)])
            for j_name, tgt in nets.items():
                with torch.no_grad():
                    correct = sum(int((tgt(adv[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
                                  for i in range(0, len(adv), bs))
                acc[(i_name, j_name)] = correct / len(x)
    t = Table("transfer", f"PGD accuracy (%) of model j (columns) on adversarial examples crafted on model i (rows), "
                          f"{len(x)} test examples; the diagonal (white-box) in bold; last row: natural accuracy",
              "crafted on (row), evaluated on (column)", models, [])
    for i_name in models:
        t.rows.append({"label": i_name, "cells": [
            {"value": pct(acc[(i_name, j)]), "raw": acc[(i_name, j)], **({"mark": "white-box"} if i_name == j else {})}
            for j in models]})
    t.rows.append({"label": "natural (no attack)", "cells": [{"value": pct(clean[j]), "raw": clean[j]} for j in models]})
    t.claim = ("each model is most vulnerable to adversarial examples generated on itself, whatever its size: in "
               "every column the white-box (diagonal) accuracy is the lowest")
    bad = [j for j in models if any(acc[(i, j)] < acc[(j, j)] for i in models if i != j)]
    t.held = not bad
    t.detail = ("for every model the white-box attack is the strongest" if not bad else
                "examples crafted on another model are stronger for "
                + ", ".join(f"{j} (white-box {pstr(acc[(j, j)])}, from "
                            f"{min((i for i in models if i != j), key=lambda i: acc[(i, j)])} "
                            f"{pstr(min(acc[(i, j)] for i in models if i != j))})" for j in bad))
    pruned = [s.name for s in e.plan if s.role.get("kind") == "admm"]
    others = [m for m in models if m not in pruned]
    t.note = ("Adversarial examples: PGD with the evaluation settings (eps, step, steps, restarts), crafted on model i "
              f"with torch seed {e.seed + 2}. Mean transfer (off-diagonal) accuracy of the pruned models: "
              + (", ".join(f"{j} {pstr(sum(acc[(i, j)] for i in models if i != j) / max(len(models) - 1, 1))}"
                           for j in pruned) or "none") + "; of the others: "
              + (", ".join(f"{j} {pstr(sum(acc[(i, j)] for i in models if i != j) / max(len(models) - 1, 1))}"
                           for j in others) or "none") + ".")
    plots = [{"file": "transfer.png", "kind": "matrix", "title": "PGD accuracy: crafted on row, evaluated on column",
              "xlabels": models, "ylabels": models,
              "matrix": [[100 * acc[(i, j)] for j in models] for i in models]}]
    matrix = {"models": models, "adv_acc": [[acc[(i, j)] for j in models] for i in models],
              "nat_acc": [clean[j] for j in models], "n": len(x)}
    return {"tables": [t], "plots": plots, "transfer": matrix}
