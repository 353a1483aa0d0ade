"""The ``scratch-vs-pruned`` experiment (the paper's Table 2): at every pair of widths w_L > w_S, a w_S model trained
(a) naturally, (b) adversarially from scratch, (c) ADMM-pruned from w_L with concurrent adversarial training and (d)
adversarially from w_L's sliced weights; the Table 2 layout, the four cases side by side and the findings."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import toml_value
from ..errors import UserError
from ..rundir import atomic_torch_save, safe_torch_load
from .runs import RunSpec
from .specs import UNIFORM
from .stats import Comparison, cell, mean, robust, values
from .tables import Table, plural, prune_note

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Adversarial training from scratch vs concurrent ADMM pruning (Table 2)"


def plan(e: Experiment) -> list[RunSpec]:
    p = e.params
    ws = sorted(p["widths"])
    runs = []
    for w in ws:
        runs.append(e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True, role={"case": "a"},
                            compared=False))
        # (b) at the largest width is only pruned from, never compared: no AutoAttack for it
        runs.append(e.dense(f"adv-w{w}", w, p["train_epochs"], role={"case": "b"}, compared=w != ws[-1]))
    for big in ws:
        for small in [s for s in ws if s < big]:
            runs.append(e.pruned(f"admm-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                                 retrain=p["retrain_epochs"], role={"case": "c"}))
            runs.append(_inherit(e, big, small))
    return runs


def _inherit(e: Experiment, big: int, small: int) -> RunSpec:
    """(d): the trained w_L model's weights sliced to w_S, then the same training (c) gets after the dense model: the
    ADMM phase's settings for exp.admm_epochs (in the pretrain phase, without ADMM), then the retraining phase's for
    exp.retrain_epochs (nothing to mask)."""
    p = e.params
    base = f"inherit-w{big}-to-w{small}"
    path = e.init_path(e.run_name(base))
    source = e.run_dir(e.run_name(f"adv-w{big}")) / "model.pt"

    def make() -> None:
        sd = sliced_state(safe_torch_load(source), e.build(small))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, sd)

    ov = [f"model.width={small}", "prune.ratio=0", "prune.layers={}", *UNIFORM,
          *e.epochs(p["admm_epochs"], 0, p["retrain_epochs"]), f"run.init={toml_value(str(path))}",
          *e.same_phase("admm", "pretrain")]
    return e.run_spec(base, ov, {"case": "d", "kind": "inherited", "width": small, "w_L": big, "w_S": small,
                                 "source": f"adv-w{big}", "from": f"trained adv-w{big}, sliced"}, make)


def sliced_state(big: dict[str, torch.Tensor], small_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The small model's state_dict filled from a larger model of the same architecture: the first
    channels / units of every tensor (``big[k][:n0, :n1, ...]``); scalars (BatchNorm counters) are copied.

    For LeNet's fc1 the first inputs are the first conv2 channels (channel-major flattening), so the slices
    line up; for VGG / ResNet the linear head follows a global average pool."""
    out = {}
    for k, v in small_model.state_dict().items():
        b = big[k]
        if b.dim() != v.dim() or any(bs < s for bs, s in zip(b.shape, v.shape)):
            raise UserError(f"cannot inherit {k}: shape {tuple(b.shape)} does not contain {tuple(v.shape)}")
        out[k] = b[tuple(slice(0, n) for n in v.shape)].clone() if b.dim() else b.clone()
    return out


def report(e: Experiment) -> dict:
    ws = sorted(e.params["widths"])
    targets = ws[:-1]
    t2 = Table("table2", "Natural / PGD accuracy (%) in the layout of the paper's Table 2: rows = width w; natural and "
                         "adversarial training at that width from scratch; ->w_S = ADMM-pruned from w to the parameter "
                         "count of w_S with concurrent adversarial training", "w",
               ["natural training", "adv training", *[f"->{s}" for s in targets]], [])
    for w in ws:
        cells = [cell(e, f"natural-w{w}"), cell(e, f"adv-w{w}")]
        cells += [cell(e, f"admm-w{w}-to-w{s}") if s < w else None for s in targets]
        t2.rows.append({"label": str(w), "cells": cells})
    pairs = [(big, small) for big in ws for small in ws if small < big]
    bases = [f"adv-w{s}" for s in targets] + [f"{k}-w{b}-to-w{s}" for b, s in pairs for k in ("admm", "inherit")]
    metric, acc = robust(e, bases)
    t2.claim = ("a small model trained adversarially from scratch is worse than the same parameter count reached by "
                "pruning a larger adversarially trained model with ADMM: (c) pruned w_L->w_S beats (b) adversarial "
                f"training at w_S in {metric} accuracy for every pair")
    t2.decide([(Comparison(f"{b}->{s}", "pruned", acc[f"admm-w{b}-to-w{s}"], "scratch", acc[f"adv-w{s}"], metric), +1)
               for b, s in pairs])
    t2.note = (prune_note(e, ws[-1], ws[0]) + " Budgets (the paper's protocol): (b) trains w_S from its initial "
               "weights as long as the dense w_L model that (c) starts from was trained; (c) adds its ADMM and "
               "retraining epochs.")
    cmp_ = Table("cases", "The four ways to get a w_S model, natural / PGD accuracy (%): (a) natural training at w_S, "
                          "(b) adversarial training at w_S from scratch, (c) ADMM-pruned from w_L with concurrent "
                          "adversarial training, (d) adversarial training at w_S from w_L's inherited weights",
                 "w_L->w_S", ["(a) natural", "(b) adv scratch", "(c) ADMM pruned", "(d) inherited"], [])
    for b, s in pairs:
        cmp_.rows.append({"label": f"{b}->{s}", "cells": [
            cell(e, f"natural-w{s}"), cell(e, f"adv-w{s}"), cell(e, f"admm-w{b}-to-w{s}"),
            cell(e, f"inherit-w{b}-to-w{s}")]})
    cmp_.claim = ("concurrent ADMM pruning of the large model is the better way to a small robust model, also "
                  "against a small model that inherits the large model's weights: (c) beats (d) in "
                  f"{metric} accuracy for every pair (robprune's own comparison: the paper gives no number for it)")
    cmp_.decide([(Comparison(f"{b}->{s}", "ADMM", acc[f"admm-w{b}-to-w{s}"], "inherited",
                             acc[f"inherit-w{b}-to-w{s}"], metric), +1) for b, s in pairs])
    p = e.params
    cmp_.note = ("(d) starts from the trained w_L model's weights sliced to w_S: the first output channels / units "
                 "and the first input channels of every layer (w_L[:n_out, :n_in, ...]). Equal budgets: after the "
                 f"trained w_L model, (c) and (d) get the same training, {plural(p['admm_epochs'], 'epoch')} with the "
                 f"ADMM phase's settings (for (d) without ADMM) then {plural(p['retrain_epochs'], 'epoch')} with the "
                 "retraining phase's (for (d) without a mask).")
    x = [f"{b}->{s}" for b, s in pairs]
    plots = [{"file": "pgd_by_pair.png", "kind": "bar", "title": f"{metric} accuracy of the w_S models (mean over "
                                                                 f"{plural(len(e.seeds), 'seed')})", "x": x,
              "series": {"(b) scratch": [100 * mean(acc[f"adv-w{s}"]) for b, s in pairs],
                         "(c) ADMM pruned": [100 * mean(acc[f"admm-w{b}-to-w{s}"]) for b, s in pairs],
                         "(d) inherited": [100 * mean(acc[f"inherit-w{b}-to-w{s}"]) for b, s in pairs]},
              "xlabel": "w_L -> w_S", "ylabel": f"{metric} accuracy %"},
             {"file": "adv_training_by_width.png", "kind": "line", "title": "adversarial training from scratch",
              "x": ws, "series": {"natural": [100 * mean(values(e, f"adv-w{w}", "nat")) for w in ws],
                                  "PGD": [100 * mean(values(e, f"adv-w{w}", "adv")) for w in ws]},
              "xlabel": "width w", "ylabel": "accuracy %"}]
    return {"tables": [t2, cmp_], "plots": plots}
