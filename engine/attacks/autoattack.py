"""AutoAttack (Croce & Hein, ICML 2020): a fixed ensemble of parameter-free attacks, each run on the examples
every earlier one failed on; an example counts as robust only if no attack of the ensemble fools it.

``standard``: APGD-CE (100 steps), APGD-T (targeted DLR loss, 9 target classes, 100 steps each), FAB-T (9 target
classes, 100 steps each) and Square (5000 queries), one restart each, as the published standard version and
RobustBench run them. ``rand`` (for models with randomness in their forward pass): APGD-CE and APGD-DLR, each with
20 expectation-over-transformation samples per step.

:class:`AutoAttack` evaluates a batch list with a state file: after every batch the examples still robust, the
attack reached and the time spent are written (atomically), so an evaluation killed after an hour continues where
it stopped. Random numbers come from CPU generators seeded from (seed, attack, batch), so an interrupted and an
uninterrupted evaluation, on the CPU or on a GPU, draw the same random numbers.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import AUTOATTACK_VERSIONS as VERSIONS  # noqa: E402
from ..models import eval_mode  # noqa: E402
STEPS = 100
TARGET_CLASSES = 9
QUERIES = 5000
EOT_RAND = 20
STATE_FORMAT = 1


@dataclass(frozen=True)
class Part:
    """One attack of the ensemble, with the settings that name it exactly."""

    name: str
    settings: dict = field(default_factory=dict)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator) -> Tensor:
        from .apgd import apgd, apgd_targeted
        from .fab import fab_targeted
        from .square import square

        s = self.settings
        if self.name in ("apgd-ce", "apgd-dlr"):
            return apgd(model, x, y, eps=eps, steps=s["steps"], restarts=s["restarts"], loss=s["loss"],
                        generator=generator, **({"eot_iter": s["eot"]} if s.get("eot", 1) > 1 else {}))
        if self.name == "apgd-t":
            return apgd_targeted(model, x, y, eps=eps, steps=s["steps"], restarts=s["restarts"],
                                 n_target_classes=s["target_classes"], generator=generator)
        if self.name == "fab-t":
            return fab_targeted(model, x, y, eps=eps, steps=s["steps"], restarts=s["restarts"],
                                n_target_classes=s["target_classes"], generator=generator)
        if self.name == "square":
            return square(model, x, y, eps=eps, queries=s["queries"], p_init=s["p_init"], restarts=s["restarts"],
                          generator=generator)
        raise ValueError(f"unknown attack {self.name!r}")


def ensemble(version: str, num_classes: int = 10) -> tuple[Part, ...]:
    """The attacks of AutoAttack's ``version``, in the order they run. With fewer than 10 classes the targeted
    attacks take every other class as a target (num_classes - 1)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; expected one of {', '.join(VERSIONS)}")
    targets = max(1, min(TARGET_CLASSES, num_classes - 1))
    if version == "rand":
        return (Part("apgd-ce", {"steps": STEPS, "restarts": 1, "loss": "ce", "eot": EOT_RAND}),
                Part("apgd-dlr", {"steps": STEPS, "restarts": 1, "loss": "dlr", "eot": EOT_RAND}))
    return (Part("apgd-ce", {"steps": STEPS, "restarts": 1, "loss": "ce"}),
            Part("apgd-t", {"steps": STEPS, "restarts": 1, "target_classes": targets}),
            Part("fab-t", {"steps": STEPS, "restarts": 1, "target_classes": targets}),
            Part("square", {"queries": QUERIES, "restarts": 1, "p_init": 0.8}))


def describe(version: str, eps: float, n: int, seed: int, num_classes: int = 10) -> dict:
    """The exact name of the evaluation: what a summary, a model card and a report print next to the number."""
    return {"name": "autoattack", "version": version, "norm": "Linf", "eps": eps, "n": n, "seed": seed,
            "attacks": [{"name": p.name, **p.settings} for p in ensemble(version, num_classes)]}


def label(attack: dict) -> str:
    """One line naming an AutoAttack evaluation exactly: ``AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; 100
    steps, 9 target classes, 5000 queries, 1 restart each), Linf eps 0.3, n 200``."""
    parts = attack.get("attacks", [])
    names = ", ".join(p["name"].upper().replace("SQUARE", "Square") for p in parts)
    facts = []
    for key, unit in (("steps", "steps"), ("target_classes", "target classes"), ("queries", "queries"),
                      ("eot", "EOT samples")):
        values = sorted({p[key] for p in parts if key in p})
        if values:
            facts.append(f"{'/'.join(map(str, values))} {unit}")
    restarts = sorted({p.get("restarts", 1) for p in parts})
    facts.append(f"{'/'.join(map(str, restarts))} restart{'' if restarts == [1] else 's'} each")
    return (f"AutoAttack {attack.get('version')} ({names}; {', '.join(facts)}), Linf eps {attack.get('eps'):g}, "
            f"n {attack.get('n')}")


def _generator(seed: int, part: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + part * 10_007 + batch) % (2**63 - 1))


def fools(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Which rows of ``x_adv`` are genuine adversarial examples: inside the eps-ball (with float slack) and
    [0, 1], and misclassified, checked here in float32 whatever the attack did."""
    with torch.no_grad():
        inside = ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6) & (x_adv.flatten(1).amin(1) >= 0) & \
                 (x_adv.flatten(1).amax(1) <= 1)
        wrong = model(x_adv.float()).argmax(1) != y
    return inside & wrong


class AutoAttack:
    """Run AutoAttack on ``(x, y)`` (floats in [0, 1]) in batches of ``batch_size``, keeping its state in
    ``state_path`` (when given) after every batch.

    ``progress(part_name, done, total)`` is called after each batch (examples of the current attack).

    With ``dist`` (a data-parallel run), rank r attacks batches ``b + r`` of each round of ``world`` batches and
    the ranks' results are gathered after the round: every batch keeps the generator of its index, so the result
    is exactly one process's. Rank 0 alone keeps the state (``state_path`` None elsewhere) and hands it to the
    others when it resumes."""

    def __init__(self, model: nn.Module, *, eps: float, version: str = "standard", batch_size: int = 500,
                 seed: int = 0, state_path: Path | None = None, fingerprint: str = "",
                 progress: Callable[[str, int, int], None] | None = None, num_classes: int = 10, dist=None):
        self.model = model
        self.dist = dist  # a data-parallel run's DistContext: batches go round-robin to the ranks
        self.eps = float(eps)
        self.version = version
        self.parts = ensemble(version, num_classes)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.state_path = state_path
        self.fingerprint = fingerprint
        self.progress = progress
        self.num_classes = num_classes
        self.resumed = False

    # -------------------------------------------------------------- state
    def _key(self, n: int) -> dict:
        return {"format": STATE_FORMAT, "version": self.version, "eps": self.eps, "n": n, "seed": self.seed,
                "batch_size": self.batch_size, "fingerprint": self.fingerprint}

    def _load(self, n: int) -> dict | None:
        from ..rundir import read_json_state

        if self.state_path is None or not self.state_path.exists():
            return None
        st = read_json_state(self.state_path)
        if not isinstance(st, dict) or st.get("key") != self._key(n):
            return None  # another evaluation's state (other eps, n, weights ...): start over
        robust = st.get("robust")
        if not (isinstance(robust, str) and len(robust) == n and set(robust) <= {"0", "1"}):
            return None
        return st

    def _save(self, st: dict) -> None:
        from ..rundir import atomic_write_text

        if self.state_path is not None:
            atomic_write_text(self.state_path, json.dumps(st) + "\n")

    # -------------------------------------------------------------- the evaluation
    def run(self, x: Tensor, y: Tensor) -> dict:
        """Clean accuracy, robust accuracy after each attack and in the end, the time of each attack."""
        with eval_mode(self.model):
            return self._run(x, y)

    def _run(self, x: Tensor, y: Tensor) -> dict:
        n = len(y)
        st = self._load(n)
        if self.dist is not None:
            st = self.dist.broadcast(st)
        self.resumed = st is not None
        if st is None:
            t0 = time.perf_counter()
            robust = torch.zeros(n, dtype=torch.bool)
            with torch.no_grad():
                for i in range(0, n, self.batch_size):
                    robust[i:i + self.batch_size] = (self.model(x[i:i + self.batch_size]).argmax(1)
                                                     == y[i:i + self.batch_size]).cpu()
            st = {"key": self._key(n), "clean": int(robust.sum()), "part": 0, "pending": None, "batch": 0,
                  "parts": [], "clean_seconds": time.perf_counter() - t0}
        else:
            robust = torch.tensor([c == "1" for c in st["robust"]], dtype=torch.bool)
        while st["part"] < len(self.parts):
            part = self.parts[st["part"]]
            if st["pending"] is None:  # the examples this attack runs on: those every earlier one failed on
                st["pending"] = robust.nonzero().flatten().tolist()
                st["batch"] = 0
                st["parts"].append({"name": part.name, **part.settings, "seconds": 0.0, "fooled": 0})
            pending = st["pending"]
            record = st["parts"][-1]
            batches = [pending[i:i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
            rank, world = (self.dist.rank, self.dist.world) if self.dist is not None else (0, 1)
            while st["batch"] < len(batches):
                t0 = time.perf_counter()
                mine, fooled_idx = st["batch"] + rank, []
                if mine < len(batches):
                    idx = torch.tensor(batches[mine], dtype=torch.long)
                    xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
                    x_adv = part.run(self.model, xb, yb, self.eps, _generator(self.seed, st["part"], mine))
                    fooled_idx = idx[fools(self.model, x_adv, xb, yb, self.eps).cpu()].tolist()
                if self.dist is not None:
                    fooled_idx = [i for got in self.dist.all_gather(fooled_idx) for i in got]
                robust[torch.tensor(fooled_idx, dtype=torch.long)] = False
                record["fooled"] += len(fooled_idx)
                record["seconds"] += time.perf_counter() - t0
                st["batch"] = min(st["batch"] + world, len(batches))
                st["robust"] = "".join("1" if r else "0" for r in robust.tolist())
                self._save(st)
                if self.progress is not None:
                    self.progress(part.name, min(st["batch"] * self.batch_size, len(pending)), len(pending))
            record["robust_after"] = int(robust.sum())
            st["part"] += 1
            st["pending"] = None
            st["robust"] = "".join("1" if r else "0" for r in robust.tolist())
            self._save(st)
        per_attack = [{"name": r["name"], "settings": {k: v for k, v in r.items()
                                                       if k not in ("name", "seconds", "fooled", "robust_after")},
                       "robust_acc_after": r["robust_after"] / max(n, 1), "fooled": r["fooled"],
                       "seconds": round(r["seconds"], 3)} for r in st["parts"]]
        return {"attack": describe(self.version, self.eps, n, self.seed, self.num_classes),
                "clean_acc": st["clean"] / max(n, 1), "robust_acc": int(robust.sum()) / max(n, 1),
                "per_attack": per_attack, "clean_seconds": round(st.get("clean_seconds", 0.0), 3),
                "seconds": round(st.get("clean_seconds", 0.0) + sum(r["seconds"] for r in st["parts"]), 3),
                "robust": robust}
