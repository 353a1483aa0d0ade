"""The :class:`Experiment`: its settings (base profile, preset, parameters), the run specs the experiments build
their plans from, the execution of the plan one run after the other (reusing finished runs, resuming an unfinished
one, stoppable with a checkpoint), and the report's record of how the numbers were made."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import data as data_mod
from ..config import PHASES, Config, dump_toml, load_profile, toml_value
from ..errors import UserError
from ..models import build_model, prunable_parameters
from ..rundir import RunDir, atomic_torch_save, safe_torch_load
from . import lottery, schemes, scratch_vs_pruned, transfer, weight_dist
from .presets import EXPERIMENTS, PARAM_PREFIX, experiment_params, hint, load_preset, preset_path, profile_overrides
from .record import results_record
from .runs import ExperimentStopped, RunResult, RunSpec, check_same_settings, read_json, remove_unstarted
from .writers import write_report

# each experiment's module: its TITLE, plan(e) -> [RunSpec] and report(e) -> tables, plots and extra results
MODULES = {"weight-dist": weight_dist, "scratch-vs-pruned": scratch_vs_pruned, "lottery": lottery,
           "transfer": transfer, "schemes": schemes}
assert tuple(MODULES) == EXPERIMENTS

Progress = Callable[[dict], None]


class Experiment:
    """One experiment: plan its runs, execute them (reusing and resuming), write the report. See the package doc."""

    def __init__(self, name: str, profile: str | Path, *, out: str | Path | None = None, preset: str = "cpu",
                 overrides: Sequence[str] = (), progress: Progress | None = None,
                 subscribers: Sequence[Callable] = (), figures: bool = True) -> None:
        if name not in EXPERIMENTS:
            raise UserError(f"unknown experiment {name!r}: expected one of {', '.join(EXPERIMENTS)}"
                            + hint(name, EXPERIMENTS))
        self.name = name
        self.profile = Path(profile)
        self.out = Path(out if out is not None else Path("experiments") / name).resolve()
        self.preset_name = str(preset)
        self.preset = load_preset(preset)
        self.progress = progress or (lambda e: None)
        self.subscribers = list(subscribers)
        self.figures = figures
        self._session = None
        self._stop = False
        self.user_overrides = [o for o in overrides if not o.strip().startswith(PARAM_PREFIX)]
        param_sets = [o.strip()[len(PARAM_PREFIX):] for o in overrides if o.strip().startswith(PARAM_PREFIX)]
        self.param_sets = [PARAM_PREFIX + o for o in param_sets]
        source = str(preset_path(self.preset_name))
        self.params = experiment_params(name, self.preset, source, param_sets)
        self.profile_overrides = profile_overrides(name, self.preset, source, self.profile, self.user_overrides,
                                                   self.params)
        # validate the base profile with every common override now: bad input fails before anything is written
        # exp.final_attack decides, whatever the base profile says (an AutoAttack per run costs minutes on a CPU)
        self.profile_overrides.append(f'eval.final_attack="{self.params["final_attack"]}"')
        self.cfg0 = load_profile(self.profile, self.profile_overrides)
        self.spec = data_mod.dataset_spec(self.cfg0.data.name)
        self.seed = self.cfg0.run.seed
        self._numels: dict[int, dict[str, int]] = {}
        self.runs: dict[str, RunResult] = {}
        self.plan = MODULES[name].plan(self)
        names = [r.name for r in self.plan]
        assert len(names) == len(set(names)), names
        if not self.numels(1):
            raise UserError(f"{self.profile}: model {self.cfg0.model.arch} has no prunable layers")

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
        return build_model(c.model.arch, width, num_classes=self.spec.num_classes, in_channels=self.spec.in_channels,
                           image_size=self.spec.image_size, depth=c.model.depth, source=str(self.profile))

    def ratios(self, w_large: int, w_small: int) -> dict[str, float]:
        """Per-layer ratios that prune the w_L model to exactly the parameter count of each layer at w_S:
        1 - n_l(w_S) / n_l(w_L) (= 1 - (w_S/w_L)^2 for the inner layers, 1 - w_S/w_L for the first conv and the
        last layer, whose input / output sizes do not scale with the width)."""
        big, small = self.numels(w_large), self.numels(w_small)
        return {k: 1.0 - small[k] / big[k] for k in big}

    def last_layer(self) -> str:
        return list(self.numels(1))[-1]

    # ------------------------------------------------------------------ init files
    def init_path(self, label: str) -> Path:
        return self.out / "init" / f"{label}.pt"

    def seeded_init(self, width: int) -> tuple[Path, Callable[[], None]]:
        """The initial weights of a width: build_model under torch.manual_seed(run.seed), saved as a state_dict."""
        path = self.init_path(f"{self.cfg0.model.arch}-w{width}-seed{self.seed}")

        def make() -> None:
            if path.exists():
                return
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                m = self.build(width)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, {k: v.detach().cpu() for k, v in m.state_dict().items()})

        return path, make

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    # ------------------------------------------------------------------ run specs
    def epochs(self, pretrain: int, admm: int, retrain: int) -> list[str]:
        """The overrides that set the epochs of the three phases."""
        return [f"phases.{phase}.epochs={n}" for phase, n in zip(PHASES, (pretrain, admm, retrain))]

    def dense_large(self) -> RunSpec:
        """The adversarially trained dense model at ``exp.width``, the one that experiments prune from."""
        big = self.params["width"]
        return self.dense(f"adv-w{big}", big, self.params["train_epochs"])

    def dense(self, name: str, width: int, epochs: int, *, natural: bool = False, init: Path | None = None,
              make_init: Callable[[], None] | None = None, role: dict | None = None) -> RunSpec:
        """A dense model trained for ``epochs`` in the pretrain phase (adversarially, or naturally), from the
        seeded initial weights of its width (or from ``init``)."""
        if init is None:
            init, make_init = self.seeded_init(width)
        ov = [f"run.name={toml_value(name)}", f"model.width={width}", "prune.ratio=0", "prune.layers={}",
              *self.epochs(epochs, 0, 0), f"run.init={toml_value(str(init))}"]
        if natural:
            ov.append('attack.train.kind="none"')
        return RunSpec(name, ov, {"kind": "natural" if natural else "adversarial", "width": width, **(role or {})},
                       make_init)

    def pruned(self, name: str, w_large: int, w_small: int, source: str, *, admm: int, retrain: int,
               scheme: str | None = None, linear: str = "irregular", role: dict | None = None) -> RunSpec:
        """ADMM pruning with concurrent adversarial training from the trained dense w_L model ``source``, to the
        parameter count of w_S, then hard prune and masked adversarial retraining."""
        ratios = self.ratios(w_large, w_small)
        ov = [f"run.name={toml_value(name)}", f"model.width={w_large}", "prune.ratio=0", "prune.layers={}",
              *self.epochs(0, admm, retrain), f"run.init={toml_value(str(self.run_dir(source) / 'model.pt'))}"]
        if scheme is not None:
            ov += [f"prune.scheme={toml_value(scheme)}",
                   f"prune.linear_scheme={toml_value(scheme if linear == 'match' else 'irregular')}"]
            if linear == "match":  # filter-pruning the classifier would delete classes: it stays dense
                ratios[self.last_layer()] = 0.0
        ov += [f"prune.layers.{k}={r!r}" for k, r in ratios.items() if r > 0]
        return RunSpec(name, ov, {"kind": "admm", "w_L": w_large, "w_S": w_small, "source": source,
                                  "ratios": ratios, "scheme": scheme or self.cfg0.prune.scheme, **(role or {})})

    # ------------------------------------------------------------------ execution
    def stop(self) -> None:
        """Stop the current run at its next step boundary (with a checkpoint) and the experiment after it."""
        self._stop = True
        s = self._session
        if s is not None:
            s.stop()

    def overrides_of(self, spec: RunSpec) -> list[str]:
        return [*self.profile_overrides, *spec.overrides]

    def resolved_profile(self, spec: RunSpec) -> tuple[Config, str]:
        cfg = load_profile(self.profile, self.overrides_of(spec))
        return cfg, dump_toml(cfg.to_dict())

    def run(self) -> dict:
        """Execute every run (reusing finished ones), then write the report. Returns results.json's dict."""
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress({"type": "experiment", "name": self.name, "runs": len(self.plan), "out": str(self.out),
                       "preset": self.preset_name})
        for i, spec in enumerate(self.plan):
            if self._stop:
                raise ExperimentStopped(self.run_dir(spec.name))
            self.runs[spec.name] = self._execute(i, spec)
        self.progress({"type": "report", "out": str(self.out)})
        results = MODULES[self.name].report(self)
        record = results_record(self, MODULES[self.name].TITLE, results, time.time() - t0)
        results = write_report(self.out, record, figures=self.figures)
        self.progress({"type": "done", "out": str(self.out), "report": str(self.out / "report.md"),
                       "seconds": time.time() - t0})
        return results

    def _execute(self, index: int, spec: RunSpec) -> RunResult:
        from ..session import Session

        path = self.run_dir(spec.name)
        cfg, text = self.resolved_profile(spec)
        rd = RunDir(path)
        info = {"index": index, "total": len(self.plan), "run": spec.name, "run_dir": str(path), "role": spec.role}
        if rd.profile.is_file():
            check_same_settings(rd, text)
            summary = read_json(path / "summary.json")
            if summary is not None and summary.get("status") == "completed" and rd.model.is_file():
                self.progress({"type": "run", "status": "reused", **info, "summary": summary})
                return RunResult(spec, path, "reused", summary, 0.0)
        t0 = time.time()
        if rd.checkpoint.is_file():
            status = "resumed"
            session = Session.resume(path)
        else:
            if path.exists():  # stopped before its first checkpoint: nothing worth keeping
                remove_unstarted(rd)
            if spec.make_init is not None:
                spec.make_init()
            status = "trained"
            session = Session.new(self.profile, self.overrides_of(spec), path)
        for fn in self.subscribers:
            session.subscribe(fn)
        self.progress({"type": "run", "status": "resumed" if status == "resumed" else "started", **info})
        session.prepare()
        self._session = session
        try:
            if self._stop:
                session.stop()
            session.start()
            while session.alive:
                session.join(0.2)
        finally:
            self._session = None
        if session.error is not None:
            raise session.error
        if session.engine.state == "stopped":
            raise ExperimentStopped(path)
        summary = session.engine.summary
        wall = time.time() - t0
        self.progress({"type": "run", "status": "finished", **info, "summary": summary, "seconds": wall})
        return RunResult(spec, path, status, summary, wall)

    # ------------------------------------------------------------------ model access for reports
    def state(self, run: str) -> dict[str, torch.Tensor]:
        return safe_torch_load(self.run_dir(run) / "model.pt")

    def model(self, run: str) -> torch.nn.Module:
        from .. import api

        return api.load_model(self.run_dir(run))


def run_experiment(name: str, profile: str | Path, **kw) -> dict:
    """Plan, run and report one experiment (see :class:`Experiment`); returns results.json's dict."""
    return Experiment(name, profile, **kw).run()
