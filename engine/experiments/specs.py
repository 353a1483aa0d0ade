"""The run specs an experiment's plan is made of, per seed: a run named ``<base>-s<seed>`` (``adv-w8-s0``) sets
``run.name``, ``run.seed`` and its final attack, and starts from weights of its own seed (its width's seeded initial
weights, or a model of the same seed). :class:`Specs` is the part of :class:`~.runner.Experiment` that builds them,
with the model facts they need (parameter counts, pruning ratios)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..config import PHASES, toml_value
from ..models import build_model, prunable_parameters
from ..rundir import atomic_torch_save
from .runs import RunResult, RunSpec

# every layer at its own ratio (prune.layers, or prune.ratio): the per-layer budget of every run but those of
# `budgets`, whatever the base profile says
UNIFORM = ('prune.allocation="uniform"', "prune.global_normalize=false")


class Specs:
    """Mixed into :class:`~.runner.Experiment`: ``self.seed`` is the seed whose runs are being planned."""

    seed: int
    seeds: list[int]
    params: dict
    runs: dict[str, RunResult]
    out: Path

    # ------------------------------------------------------------------ model facts
    def numels(self, width: int) -> dict[str, int]:
        """Entries of every prunable weight of the experiment's architecture at ``width``."""
        if width not in self._numels:
            m = self.build(width)
            self._numels[width] = {k: p.numel() for k, p in prunable_parameters(m).items()}
        return self._numels[width]

    def build(self, width: int) -> torch.nn.Module:
        """A fresh model of the experiment's architecture at ``width``."""
        c = self.cfg0
        d = self.data_spec
        return build_model(c.model.arch, width, num_classes=d.num_classes, in_channels=d.in_channels,
                           image_size=d.image_size, depth=c.model.depth, source=str(self.profile))

    def ratios(self, w_large: int, w_small: int) -> dict[str, float]:
        """Per-layer ratios that prune the w_L model to exactly the parameter count of each layer at w_S:
        1 - n_l(w_S) / n_l(w_L) (= 1 - (w_S/w_L)^2 for the inner layers, 1 - w_S/w_L for the first conv and the
        last layer, whose input / output sizes do not scale with the width)."""
        big, small = self.numels(w_large), self.numels(w_small)
        return {k: 1.0 - small[k] / big[k] for k in big}

    def last_layer(self) -> str:
        return list(self.numels(1))[-1]

    # ------------------------------------------------------------------ names, files
    def run_name(self, base: str, seed: int | None = None) -> str:
        """The run of ``base`` (``adv-w8``) for ``seed`` (default: the seed being planned): ``adv-w8-s0``."""
        return f"{base}-s{self.seed if seed is None else seed}"

    def seed_runs(self, base: str) -> list[RunResult]:
        """The finished runs of ``base``, one per seed of ``exp.seeds``, in that order."""
        return [self.runs[self.run_name(base, s)] for s in self.seeds]

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def init_path(self, label: str) -> Path:
        return self.out / "init" / f"{label}.pt"

    def seeded_init(self, width: int) -> tuple[Path, Callable[[], None]]:
        """The initial weights of a width for the seed being planned: build_model under torch.manual_seed(seed),
        saved as a state_dict."""
        seed = self.seed
        path = self.init_path(f"{self.cfg0.model.arch}-w{width}-seed{seed}")

        def make() -> None:
            if path.exists():
                return
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                m = self.build(width)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, {k: v.detach().cpu() for k, v in m.state_dict().items()})

        return path, make

    # ------------------------------------------------------------------ run specs
    def epochs(self, pretrain: int, admm: int, retrain: int) -> list[str]:
        """The overrides that set the epochs of the three phases."""
        return [f"phases.{phase}.epochs={n}" for phase, n in zip(PHASES, (pretrain, admm, retrain))]

    def run_spec(self, base: str, overrides: list[str], role: dict, make_init: Callable[[], None] | None = None, *,
             compared: bool = True) -> RunSpec:
        """The run of ``base`` for the seed being planned. ``compared``: its numbers enter a finding, so it ends with
        the experiment's final attack (``exp.final_attack``); a run that only feeds others (a dense model that is
        pruned) ends with PGD."""
        name = self.run_name(base)
        final = self.params["final_attack"] if compared else "pgd"
        ov = [f"run.name={toml_value(name)}", f"run.seed={self.seed}", f"eval.final_attack={toml_value(final)}",
              *overrides]
        return RunSpec(name, ov, {"base": base, "seed": self.seed, "compared": compared, **role}, make_init)

    def dense_large(self, *, compared: bool = False) -> RunSpec:
        """The adversarially trained dense model at ``exp.width``, the one that experiments prune from."""
        big = self.params["width"]
        return self.dense(f"adv-w{big}", big, self.params["train_epochs"], compared=compared)

    def dense(self, base: str, width: int, epochs: int, *, natural: bool = False, init: Path | None = None,
              make_init: Callable[[], None] | None = None, role: dict | None = None, phase: str = "pretrain",
              compared: bool = True) -> RunSpec:
        """A dense model trained for ``epochs`` in ``phase`` (adversarially, or naturally), from the seeded initial
        weights of its width (or from ``init``)."""
        if init is None:
            init, make_init = self.seeded_init(width)
            start = f"its seed's initial weights (init/{self.cfg0.model.arch}-w{width}-seed<seed>.pt)"
        else:
            start = (role or {}).get("from", init.name)
        n = {p: epochs if p == phase else 0 for p in PHASES}
        ov = [f"model.width={width}", "prune.ratio=0", "prune.layers={}", *UNIFORM, *self.epochs(*n.values()),
              f"run.init={toml_value(str(init))}"]
        if natural:
            ov.append('attack.train.kind="none"')
        return self.run_spec(base, ov, {"kind": "natural" if natural else "adversarial", "width": width, "from": start,
                                    **(role or {})}, make_init, compared=compared)

    def pruned(self, base: str, w_large: int, w_small: int, source: str, *, admm: int, retrain: int,
               scheme: str | None = None, linear: str = "irregular", role: dict | None = None,
               compared: bool = True) -> RunSpec:
        """ADMM pruning with concurrent adversarial training from the trained dense w_L model ``source`` (a base name,
        of the same seed), to the parameter count of w_S, then hard prune and masked adversarial retraining."""
        ratios = self.ratios(w_large, w_small)
        src = self.run_name(source)
        ov = [f"model.width={w_large}", "prune.ratio=0", "prune.layers={}", *UNIFORM, *self.epochs(0, admm, retrain),
              f"run.init={toml_value(str(self.run_dir(src) / 'model.pt'))}"]
        if scheme is not None:
            ov += [f"prune.scheme={toml_value(scheme)}",
                   f"prune.linear_scheme={toml_value(scheme if linear == 'match' else 'irregular')}"]
            if linear == "match":  # filter-pruning the classifier would delete classes: it stays dense
                ratios[self.last_layer()] = 0.0
        ov += self.layer_ratios(ratios)
        return self.run_spec(base, ov, {"kind": "admm", "w_L": w_large, "w_S": w_small, "source": source,
                                    "from": f"trained {source}", "ratios": ratios,
                                    "scheme": scheme or self.cfg0.prune.scheme, **(role or {})}, compared=compared)

    def same_phase(self, src: str, dst: str) -> list[str]:
        """Overrides that give phase ``dst`` every setting of phase ``src`` but its epochs (optimizer, learning rate,
        schedule, eps warm-up, ...): how a run trains exactly as another run's phase does."""
        pc = getattr(self.cfg0.phases, src)
        return [f"phases.{dst}.{k}={toml_value(v)}" for k, v in dataclasses.asdict(pc).items() if k != "epochs"]

    @staticmethod
    def layer_ratios(ratios: dict[str, float]) -> list[str]:
        return [f"prune.layers.{k}={r!r}" for k, r in ratios.items() if r > 0]
