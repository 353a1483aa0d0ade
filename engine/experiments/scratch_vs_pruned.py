"""The ``scratch-vs-pruned`` experiment (the paper's Table 2): at every pair of widths w_L > w_S, a w_S model trained
(a) naturally, (b) adversarially from scratch, (c) ADMM-pruned from w_L with concurrent adversarial training and (d)
adversarially from w_L's sliced weights; the Table 2 layout, the four cases side by side and the findings."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..rundir import atomic_torch_save, safe_torch_load
from .runs import RunSpec
from .tables import Table, adv, nat, pair, plural, prune_note, pstr

if TYPE_CHECKING:
    from .runner import Experiment

TITLE = "Adversarial training from scratch vs concurrent ADMM pruning (Table 2)"


def plan(e: Experiment) -> list[RunSpec]:
    p = e.params
    ws = sorted(p["widths"])
    runs = []
    for w in ws:
        runs.append(e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True, role={"case": "a"}))
        runs.append(e.dense(f"adv-w{w}", w, p["train_epochs"], role={"case": "b"}))
    for big in ws:
        for small in [s for s in ws if s < big]:
            runs.append(e.pruned(f"admm-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                                 retrain=p["retrain_epochs"], role={"case": "c"}))
            runs.append(_inherit(e, big, small, p["inherit_epochs"]))
    return runs


def _inherit(e: Experiment, big: int, small: int, epochs: int) -> RunSpec:
    path = e.init_path(f"inherit-w{big}-to-w{small}")
    source = e.run_dir(f"adv-w{big}") / "model.pt"

    def make() -> None:
        sd = sliced_state(safe_torch_load(source), e.build(small))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, sd)

    return e.dense(f"inherit-w{big}-to-w{small}", small, epochs, init=path, make_init=make,
                   role={"case": "d", "kind": "inherited", "w_L": big, "w_S": small, "source": f"adv-w{big}"})


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
        cells = [pair(e.runs[f"natural-w{w}"]), pair(e.runs[f"adv-w{w}"])]
        cells += [pair(e.runs[f"admm-w{w}-to-w{s}"]) if s < w else None for s in targets]
        t2.rows.append({"label": str(w), "cells": cells})
    pairs = [(big, small) for big in ws for small in ws if small < big]
    t2.claim = ("a small model trained adversarially from scratch is worse than the same parameter count reached by "
                "pruning a larger adversarially trained model with ADMM: (c) pruned w_L->w_S beats (b) adversarial "
                "training at w_S in PGD accuracy for every pair")
    bad = [(b, s) for b, s in pairs if not adv(e, f"admm-w{b}-to-w{s}") > adv(e, f"adv-w{s}")]
    t2.held = not bad
    t2.detail = (("pruned beats scratch in PGD accuracy for every pair: "
                  + ", ".join(f"{b}->{s} {pstr(adv(e, f'admm-w{b}-to-w{s}'))} vs {pstr(adv(e, f'adv-w{s}'))}"
                              for b, s in pairs)) if not bad else
                 "scratch training at w_S is as good or better for "
                 + ", ".join(f"{b}->{s} (pruned {pstr(adv(e, f'admm-w{b}-to-w{s}'))} vs scratch "
                             f"{pstr(adv(e, f'adv-w{s}'))} PGD)" for b, s in bad)
                 + (f"; pruned wins for {len(pairs) - len(bad)} of {len(pairs)} pairs" if len(bad) < len(pairs) else ""))
    t2.note = prune_note(e, ws[-1], ws[0])
    cmp_ = Table("cases", "The four ways to get a w_S model, natural / PGD accuracy (%): (a) natural training at w_S, "
                          "(b) adversarial training at w_S from scratch, (c) ADMM-pruned from w_L with concurrent "
                          "adversarial training, (d) adversarial training at w_S from w_L's inherited weights",
                 "w_L->w_S", ["(a) natural", "(b) adv scratch", "(c) ADMM pruned", "(d) inherited"], [])
    for b, s in pairs:
        cmp_.rows.append({"label": f"{b}->{s}", "cells": [
            pair(e.runs[f"natural-w{s}"]), pair(e.runs[f"adv-w{s}"]), pair(e.runs[f"admm-w{b}-to-w{s}"]),
            pair(e.runs[f"inherit-w{b}-to-w{s}"])]})
    cmp_.claim = ("concurrent ADMM pruning of the large model is the better way to a small robust model, also "
                  "against a small model that inherits the large model's weights: (c) >= (d) in PGD accuracy for "
                  "every pair (robprune's own comparison: the paper gives no number for it)")
    bad = [(b, s) for b, s in pairs if not adv(e, f"admm-w{b}-to-w{s}") >= adv(e, f"inherit-w{b}-to-w{s}")]
    cmp_.held = not bad
    cmp_.detail = (("ADMM pruning is at least as robust as inherited-weight training for every pair: "
                    + ", ".join(f"{b}->{s} {pstr(adv(e, f'admm-w{b}-to-w{s}'))} vs "
                                f"{pstr(adv(e, f'inherit-w{b}-to-w{s}'))}" for b, s in pairs)) if not bad else
                   "inherited-weight training is more robust for "
                   + ", ".join(f"{b}->{s} ({pstr(adv(e, f'inherit-w{b}-to-w{s}'))} vs ADMM "
                               f"{pstr(adv(e, f'admm-w{b}-to-w{s}'))} PGD)" for b, s in bad))
    cmp_.note = ("(d) starts from the trained w_L model's weights sliced to w_S: the first output channels / units "
                 "and the first input channels of every layer (w_L[:n_out, :n_in, ...]), then adversarial training "
                 f"for {plural(e.params['inherit_epochs'], 'epoch')} with the settings of (b).")
    plots = [{"file": "pgd_by_pair.png", "kind": "bar", "title": "PGD accuracy of the w_S models",
              "x": [f"{b}->{s}" for b, s in pairs],
              "series": {"(b) scratch": [100 * adv(e, f"adv-w{s}") for b, s in pairs],
                         "(c) ADMM pruned": [100 * adv(e, f"admm-w{b}-to-w{s}") for b, s in pairs],
                         "(d) inherited": [100 * adv(e, f"inherit-w{b}-to-w{s}") for b, s in pairs]},
              "xlabel": "w_L -> w_S", "ylabel": "PGD accuracy %"},
             {"file": "adv_training_by_width.png", "kind": "line", "title": "adversarial training from scratch",
              "x": ws, "series": {"natural": [100 * nat(e, f"adv-w{w}") for w in ws],
                                  "PGD": [100 * adv(e, f"adv-w{w}") for w in ws]},
              "xlabel": "width w", "ylabel": "accuracy %"}]
    return {"tables": [t2, cmp_], "plots": plots}
