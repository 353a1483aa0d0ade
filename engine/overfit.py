"""Catastrophic overfitting of single-step adversarial training, detected and reported, never hidden.

Single-step training (FGSM with a random start) can collapse within an epoch: the model learns to defeat the one
step it is trained against while a multi-step attack breaks it completely (Wong et al., 2020; de Jorge et al.,
2022). When the training attack is single-step and ``eval.overfit_check`` is above 0, the engine checks after
every epoch, on a fixed held-out batch (the first ``eval.overfit_check`` test examples), the accuracy under
APGD-CE (attack.eval's eps and number of steps) and under the training attack at full eps, and reports
overfitting when either

* **gap**: the training attack's accuracy exceeds APGD-CE's by more than ``GAP`` (a model that only resists the
  single step), or
* **drop**: APGD-CE's accuracy falls more than ``DROP`` below the best of the current phase.

APGD-CE, not the evaluation's PGD: on a LeNet trained with FGSM-RS at eps 0.3 on the embedded digits, PGD-20 left
33% of 128 held-out digits robust, APGD-CE with the same 20 steps 15% and AutoAttack (on 200) 4.5%, while FGSM
left 59%: PGD's gap (26 points) would have hidden what APGD-CE's (45 points) shows.

Each check is an ``overfit_check`` event (both accuracies, the rule that fired or none); a detection is also a
warning in the log. The check draws its random starts from its own CPU generator, so it never changes training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attacks.apgd import apgd
from .models import eval_mode

GAP = 0.4  # training-attack accuracy above APGD-CE accuracy by more than this: overfitting
DROP = 0.25  # APGD-CE accuracy below the best of the phase by more than this: overfitting
SINGLE_STEP = ("fgsm-rs",)


@dataclass
class OverfitMonitor:
    """The best APGD-CE accuracy of the current phase, and the detections so far (checkpointed with the run)."""

    phase: str = ""
    best: float | None = None
    detections: list = field(default_factory=list)

    def judge(self, phase: str, apgd_acc: float, train_attack_acc: float) -> str | None:
        """Record one check; the rule that fired ("gap", "drop") or None."""
        if phase != self.phase:
            self.phase, self.best = phase, None
        fired = None
        if train_attack_acc - apgd_acc > GAP:
            fired = "gap"
        elif self.best is not None and self.best - apgd_acc > DROP:
            fired = "drop"
        self.best = apgd_acc if self.best is None else max(self.best, apgd_acc)
        return fired

    def state_dict(self) -> dict:
        return {"phase": self.phase, "best": self.best, "detections": list(self.detections)}

    def load_state_dict(self, st: dict | None) -> None:
        st = st or {}
        self.phase, self.best = str(st.get("phase", "")), st.get("best")
        self.detections = list(st.get("detections") or [])


def apgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, batch_size: int,
                  seed: int) -> float:
    """Accuracy of ``model`` (in eval mode for the attack and the count) under APGD-CE with ``steps`` steps, its
    random starts from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    correct = 0
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            xa = apgd(model, xb, yb, eps=eps, steps=steps, generator=g)
            with torch.no_grad():
                correct += int((model(xa).argmax(1) == yb).sum())
    return correct / max(len(y), 1)


def message(rule: str, *, n: int, apgd_acc: float, train_attack_acc: float, best: float | None, kind: str) -> str:
    """The warning of a detection, with the numbers it rests on."""
    what = (f"{kind} accuracy {100 * train_attack_acc:.1f}% against APGD-CE {100 * apgd_acc:.1f}% "
            f"(a gap above {100 * GAP:.0f} points)" if rule == "gap" else
            f"APGD-CE accuracy {100 * apgd_acc:.1f}%, down from {100 * (best or 0):.1f}% in this phase "
            f"(a drop above {100 * DROP:.0f} points)")
    return (f"catastrophic overfitting suspected on the {n} held-out examples: {what}; single-step training "
            "may have collapsed: use PGD training (attack.train.kind = \"pgd\") or a smaller step")
