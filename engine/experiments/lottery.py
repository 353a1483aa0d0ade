"""The ``lottery`` experiment (the paper's Table 5): ADMM pruning of a dense model to each target width against the
lottery ticket (the original initial weights times the pruned model's mask), both on the same masked training; the
table, the check that both keep the same mask, and the finding."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..config import toml_value
from ..rundir import atomic_torch_save, safe_torch_load
from .runs import RunSpec
from .specs import UNIFORM
from .stats import Comparison, cell, cell_text, mean, robust
from .tables import Table, plural, prune_note, ratio_label

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Lottery ticket vs ADMM pruning (Table 5)"


def plan(e: Experiment) -> list[RunSpec]:
    p, big = e.params, e.params["width"]
    runs = [e.dense_large()]
    init_file, _ = e.seeded_init(big)
    names = list(e.numels(big))
    for small in sorted(p["targets"], reverse=True):
        admm = f"admm-w{big}-to-w{small}"
        runs.append(e.pruned(admm, big, small, f"adv-w{big}", admm=p["admm_epochs"], retrain=p["retrain_epochs"]))
        ticket = f"lottery-w{big}-to-w{small}"
        path = e.init_path(e.run_name(ticket))
        admm_model = e.run_dir(e.run_name(admm)) / "model.pt"

        def make(path=path, admm_model=admm_model) -> None:
            sd = lottery_init(safe_torch_load(init_file), safe_torch_load(admm_model), names)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, sd)

        ratios = e.ratios(big, small)
        # equal budgets by construction: the ticket's masked training is the ADMM run's retraining, the same phase
        # (same optimizer, learning rate, schedule, eps warm-up and attack) for the same epochs; its hard prune keeps
        # exactly the ticket's zeros (they are the smallest magnitudes)
        ov = [f"model.width={big}", "prune.ratio=0", "prune.layers={}", *UNIFORM,
              *e.epochs(0, 0, p["retrain_epochs"]), f"run.init={toml_value(str(path))}", *e.layer_ratios(ratios)]
        runs.append(e.run_spec(ticket, ov, {"kind": "lottery", "w_L": big, "w_S": small, "mask_of": admm,
                                            "init": str(init_file), "ratios": ratios,
                                            "from": f"init of adv-w{big} x mask of {admm}"}, make))
    return runs


def lottery_init(original: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor], names: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
    """The lottery ticket: the original initial weights times the pruned model's mask (its zero pattern) on every
    prunable layer; other tensors (biases, BatchNorm) are the original ones."""
    out = {k: v.clone() for k, v in original.items()}
    for k in names:
        out[k] = original[k] * (pruned[k] != 0).to(original[k].dtype)
    return out


def same_zero_pattern(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: Sequence[str]) -> bool:
    return all(torch.equal(a[k] == 0, b[k] == 0) for k in names)


def report(e: Experiment) -> dict:
    p = e.params
    big = p["width"]
    smalls = sorted(p["targets"], reverse=True)
    names = list(e.numels(big))
    admm = {s: f"admm-w{big}-to-w{s}" for s in smalls}
    ticket = {s: f"lottery-w{big}-to-w{s}" for s in smalls}
    masks = {s: [same_zero_pattern(e.state(e.run_name(admm[s], seed)), e.state(e.run_name(ticket[s], seed)), names)
                 for seed in e.seeds] for s in smalls}
    t = Table("lottery", f"Natural / PGD accuracy (%): ADMM pruning from w={big} vs the lottery ticket (the pruned "
                         f"structure reset to its original initialisation), both on the same masked adversarial "
                         f"training; dense w={big}: {cell_text(cell(e, f'adv-w{big}'))}", "pruned to",
              ["ADMM pruned", "lottery ticket", "same mask"], [], uses=[f"adv-w{big}"])
    for s in smalls:
        bad = [seed for seed, ok in zip(e.seeds, masks[s]) if not ok]
        t.rows.append({"label": ratio_label(e, big, s), "cells": [
            cell(e, admm[s]), cell(e, ticket[s]),
            {"text": "yes" if not bad else "NO (seed " + ", ".join(map(str, bad)) + ")"}]})
    tol = float(p["match_tolerance"])
    mild, hard = smalls[0], smalls[-1]
    metric, acc = robust(e, [*admm.values(), *ticket.values()])
    cmp = {s: Comparison(f"{big}->{s}", "ADMM", acc[admm[s]], "lottery ticket", acc[ticket[s]], metric,
                         margin=tol / 100) for s in smalls}
    t.claim = (f"the lottery ticket matches ADMM pruning only at mild ratios and falls behind at high ones: at most "
               f"{tol:g} {metric} points behind at the mildest ratio ({big}->{mild})"
               + (f" and more than {tol:g} points behind at the highest ({big}->{hard})" if len(smalls) > 1 else
                  " (one ratio only: the high-ratio half of the finding is not tested)"))
    checks = [(cmp[mild], -1)] + ([(cmp[hard], +1)] if len(smalls) > 1 else [])
    t.decide(checks)
    t.note = (prune_note(e, big, hard) + f" The lottery ticket is the original initial weights of the dense w={big} "
              f"run (same seed) times the ADMM-pruned model's mask (its zero pattern). Equal budgets: the ticket's "
              f"masked training is the ADMM run's retraining phase, the same {plural(p['retrain_epochs'], 'epoch')} "
              f"with the same optimizer, learning rate, schedule, eps warm-up and attack; the ADMM run had in addition "
              f"the dense training and the {plural(p['admm_epochs'], 'ADMM epoch')} that made the mask. The hard "
              f"prune at the start of that phase keeps exactly the ticket's mask ('same mask' checks the final zero "
              f"patterns are identical on every seed).")
    x = [f"{big}->{s}" for s in smalls]
    plots = [{"file": "lottery.png", "kind": "bar", "title": f"ADMM pruning vs lottery ticket ({metric}, mean over "
                                                             f"{plural(len(e.seeds), 'seed')})", "x": x,
              "series": {"ADMM pruned": [100 * mean(cmp[s].a) for s in smalls],
                         "lottery ticket": [100 * mean(cmp[s].b) for s in smalls]},
              "xlabel": "w_L -> w_S", "ylabel": f"{metric} accuracy %"}]
    return {"tables": [t], "plots": plots, "mask_identical": {f"{big}->{s}": all(masks[s]) for s in smalls},
            "mask_identical_seeds": {f"{big}->{s}": dict(zip(map(str, e.seeds), masks[s])) for s in smalls}}
