"""What every experiment's report is made of: the :class:`Table` (with the paper's finding and whether it held), its
cells ("nat/adv %" pairs, "nat/adv/AutoAttack %" triples with exp.final_attack = "autoattack", values, text) and the
small helpers the experiments' reports share (accuracies of a run, percent text, pruning-ratio labels and notes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Experiment
    from .runs import RunResult


@dataclass
class Table:
    id: str
    title: str
    corner: str
    columns: list[str]
    rows: list[dict]  # {"label": str, "cells": [cell | None]}
    claim: str = ""
    held: bool | None = None
    detail: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "corner": self.corner, "columns": self.columns, "rows": self.rows,
                "finding": {"claim": self.claim, "held": self.held, "detail": self.detail,
                            "sentence": finding_sentence(self)}, "note": self.note}


def finding_sentence(t: Table) -> str:
    if t.held is None:
        return f"Not checked: {t.detail}" if t.detail else ""
    return f"{'Held' if t.held else 'Did not hold'}: {t.detail}"


def pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * float(x), 2)


def pair(run: RunResult | None) -> dict | None:
    """A table cell "nat/adv %" from a run's final evaluation (the raw fractions stay in results.json's runs)."""
    if run is None:
        return None
    f = run.summary["final"]
    aa = f.get("autoattack")
    return {"nat": pct(f["nat_acc"]), "adv": pct(f["adv_acc"]), **({"aa": pct(aa["robust_acc"])} if aa else {}),
            "run": run.spec.name}


def cell_text(c: dict | None) -> str:
    if c is None:
        return ""
    if "nat" in c:
        return f"{c['nat']:.2f}/{c['adv']:.2f}" + (f"/{c['aa']:.2f}" if c.get("aa") is not None else "")
    if "value" in c:
        s = f"{c['value']:.2f}"
        return f"**{s}**" if c.get("mark") else s
    return str(c.get("text", ""))


def adv(e: Experiment, name: str) -> float:
    """The PGD accuracy (a fraction) of run ``name``'s final evaluation."""
    return e.runs[name].summary["final"]["adv_acc"]


def autoattack(e: Experiment, name: str) -> float | None:
    """The AutoAttack robust accuracy (a fraction) of run ``name``'s final evaluation, when it ran one."""
    aa = e.runs[name].summary["final"].get("autoattack")
    return None if not aa else aa["robust_acc"]


def nat(e: Experiment, name: str) -> float:
    """The natural accuracy (a fraction) of run ``name``'s final evaluation."""
    return e.runs[name].summary["final"]["nat_acc"]


def plural(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def pstr(x: float) -> str:
    """A fraction as percent text with two decimals."""
    return f"{100 * x:.2f}"


def ratio_label(e: Experiment, big: int, small: int) -> str:
    r = e.ratios(big, small)
    inner = max(r.values())
    return f"{big}->{small} ({100 * inner:.2f}%)"


def prune_note(e: Experiment, big: int, small: int, extra: str = "", ratios: dict | None = None) -> str:
    r = ratios if ratios is not None else e.ratios(big, small)
    parts = ", ".join(f"{k} {100 * v:.2f}%" if v > 0 else f"{k} not pruned" for k, v in r.items())
    return (f"Pruning w={big} to the parameter count of w={small} prunes every layer to exactly the size of the same "
            f"layer at w={small}: ratio 1 - n(w_S)/n(w_L) per layer ({parts}); the first conv and the last layer "
            f"scale with w, not w^2, so they get 1 - w_S/w_L.{extra}")
