"""What every experiment's report is made of: the :class:`Table` (with the paper's finding and whether it held on
this run's seeds, decided by :mod:`.stats`' rule) and the small text helpers the experiments' reports share
(percent text, pruning-ratio labels and notes). The cells themselves are built in :mod:`.stats`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .stats import HELD, INCONCLUSIVE, NOT_HELD, RULE, Comparison, cell_text, explain, pct, verdict

if TYPE_CHECKING:
    from .runner import Experiment

__all__ = ["Table", "cell_text", "finding_sentence", "pct", "plural", "prune_note", "pstr", "ratio_label"]

SENTENCE_START = {HELD: "Held", NOT_HELD: "Did not hold", INCONCLUSIVE: "Inconclusive at this budget"}


@dataclass
class Table:
    id: str
    title: str
    corner: str
    columns: list[str]
    rows: list[dict]  # {"label": str, "cells": [cell | None]}
    claim: str = ""
    held: bool | None = None  # True: held, False: did not hold, None: inconclusive (or not checked)
    detail: str = ""
    note: str = ""
    verdict: str = ""  # stats.HELD / NOT_HELD / INCONCLUSIVE; "" when not checked
    checks: list = field(default_factory=list)  # [(Comparison, wanted outcome)]
    warnings: list[str] = field(default_factory=list)
    uses: list[str] = field(default_factory=list)  # runs (base names) the table rests on besides its cells'

    def decide(self, checks: Sequence[tuple[Comparison, int]], extra: str = "") -> None:
        """Set the verdict from the comparisons the finding rests on (each with the outcome it wants, +1 or -1);
        ``extra`` ends the sentence."""
        self.checks = list(checks)
        self.verdict = verdict(self.checks)
        self.held = {HELD: True, NOT_HELD: False}.get(self.verdict)
        self.detail = explain(self.checks, extra)

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "corner": self.corner, "columns": self.columns, "rows": self.rows,
                "finding": {"claim": self.claim, "held": self.held, "verdict": self.verdict,
                            "rule": RULE if self.verdict else "", "detail": self.detail,
                            "sentence": finding_sentence(self),
                            "comparisons": [{**c.to_dict(), "wanted": w} for c, w in self.checks]},
                "note": self.note, "warnings": self.warnings}


def finding_sentence(t: Table) -> str:
    if not t.verdict:
        return f"Not checked: {t.detail}" if t.detail else ""
    return f"{SENTENCE_START[t.verdict]}: {t.detail}"


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
