"""The :class:`Experiment`: its settings (base profile, preset, parameters, seeds), its plan (each experiment's
runs once per seed of ``exp.seeds``, built with :class:`~.specs.Specs`), the execution of the plan one run after the
other (reusing finished runs, resuming an unfinished one, stoppable with a checkpoint), and the report's record of
how the numbers were made."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import data as data_mod
from ..config import Config, dump_toml, load_profile
from ..errors import UserError
from ..rundir import RunDir, ensure_dir, safe_torch_load
from . import budgets, convergence, lottery, schemes, scratch_vs_pruned, transfer, weight_dist
from .presets import EXPERIMENTS, PARAM_PREFIX, experiment_params, hint, load_preset, preset_path, profile_overrides
from .record import results_record
from .runs import ExperimentStopped, RunResult, RunSpec, check_same_settings, read_json, remove_unstarted
from .specs import Specs
from .writers import write_report

# each experiment's module: its TITLE, plan(e) -> [RunSpec] and report(e) -> tables, plots and extra results
MODULES = {"weight-dist": weight_dist, "scratch-vs-pruned": scratch_vs_pruned, "lottery": lottery,
           "transfer": transfer, "schemes": schemes, "budgets": budgets}
assert tuple(MODULES) == EXPERIMENTS

Progress = Callable[[dict], None]


class Experiment(Specs):
    """One experiment: plan its runs (per seed), execute them (reusing and resuming), write the report. See the package
    doc."""

    def __init__(self, name: str, profile: str | Path, *, out: str | Path | None = None, preset: str = "cpu",
                 overrides: Sequence[str] = (), progress: Progress | None = None,
                 subscribers: Sequence[Callable] = (), figures: bool = True) -> None:
        if name not in EXPERIMENTS:
            raise UserError(f"unknown experiment {name!r}: expected one of {', '.join(EXPERIMENTS)}"
                            + hint(name, EXPERIMENTS))
        self.name = name
        self.profile = Path(profile)
        # absolute, but not through symlinks: a link at --out is checked as the link (ensure_dir), not its target
        self.out = Path(os.path.abspath(out if out is not None else Path("experiments") / name))
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
        # validate the base profile with every common override now: bad input fails before anything is written.
        # Every run sets run.seed (one of exp.seeds) and eval.final_attack (exp.final_attack for the runs a finding
        # rests on, PGD for the others: an AutoAttack per run costs minutes on a CPU) itself.
        self.cfg0 = load_profile(self.profile, self.profile_overrides)
        self.data_spec = data_mod.dataset_spec(self.cfg0.data.name)
        self.seeds = list(self.params["seeds"])
        self._numels: dict[int, dict[str, int]] = {}
        self.runs: dict[str, RunResult] = {}
        self.convergence: dict[str, dict] = {}
        if not self.numels(1):
            raise UserError(f"{self.profile}: model {self.cfg0.model.arch} has no prunable layers")
        self.plan: list[RunSpec] = []
        for seed in self.seeds:  # all runs of the first seed, then the next: a longer seed list reuses the first ones
            self.seed = seed
            self.plan += MODULES[name].plan(self)
        self.seed = self.seeds[0]
        names = [r.name for r in self.plan]
        assert len(names) == len(set(names)), names

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
        ensure_dir(self.out, "report directory", "a directory for the report and its runs", "--out")
        self.progress({"type": "experiment", "name": self.name, "runs": len(self.plan), "out": str(self.out),
                       "preset": self.preset_name})
        for i, spec in enumerate(self.plan):
            if self._stop:
                raise ExperimentStopped(self.run_dir(spec.name))
            self.runs[spec.name] = self._execute(i, spec)
        self.progress({"type": "report", "out": str(self.out)})
        results = MODULES[self.name].report(self)
        self.convergence = convergence.annotate(self, results.get("tables", []))
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
