"""The paper's experiments as commands: each is a list of runs, then a report a researcher can paste into a paper.

    from robprune.engine.experiments import Experiment
    exp = Experiment("lottery", "profiles/mnist_quick.toml", out="experiments/lottery", preset="cpu",
                     overrides=["run.seed=1", "exp.targets=[2]"], progress=print)
    results = exp.run()            # blocking; exp.stop() from another thread stops the current run with a checkpoint

Experiments (names as on the command line): ``weight-dist`` (Fig. 1), ``scratch-vs-pruned`` (Table 2),
``lottery`` (Table 5), ``transfer`` and ``schemes``.

Profiles. Every run starts from PROFILE (the base profile), then the preset's ``[profile]`` keys, then the preset's
``[<experiment>.profile]`` keys, then the user's ``--set`` keys, then the keys the experiment sets for that run
(model.width, prune.*, run.init, run.name, the phases' epochs, attack.train.kind = "none" for natural training).
``--set exp.<param>=<value>`` changes one of the experiment's parameters (widths, epochs, ...). Presets are TOML
files in ``profiles/experiments/`` (``cpu``, ``paper``, ``tiny``) or a path to such a file.

Runs. Run ``r`` lives in ``OUT/runs/r``. A finished run (summary.json with status "completed") is reused when the
experiment is run again with the same settings; an unfinished one is resumed from its checkpoint; a run whose
settings differ from what the experiment would use now is refused (one line naming the first differing key).
Runs execute one after the other, each on a background thread of this process (so that :meth:`Experiment.stop`
can stop it at a step boundary with a checkpoint).

Report. ``OUT/report.md`` (tables, nat/adv % as in the paper, one sentence per table saying whether the paper's
finding held on this run, computed from the numbers), ``OUT/results.json`` (everything, including the very dict
the tables are rendered from), ``OUT/results.csv`` (one line per table cell, raw fractions), ``OUT/runs.csv`` (one
line per run), PNG figures (matplotlib, Agg), ``OUT/profiles/<run>.toml`` (the resolved profile of every run), and
the seeds, attack settings and versions in report.md and results.json.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import platform
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data as data_mod
from .config import Config, SCHEMES, dump_toml, load_profile, presets_dir
from .errors import ConfigError, UserError
from .models import build_model, prunable_parameters
from .rundir import RunDir, atomic_torch_save, atomic_write_text, safe_torch_load

EXPERIMENTS = ("weight-dist", "scratch-vs-pruned", "lottery", "transfer", "schemes")
PRESETS = ("cpu", "paper", "tiny")
PARAM_PREFIX = "exp."
PHASE_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones", "gamma",
              "eps_warmup")

# profile keys every experiment sets per run (the user sets them through the experiment's parameters instead)
CONTROLLED = ("model.width", "prune.ratio", "prune.layers", "run.init", "run.name", "phases.pretrain.epochs",
              "phases.admm.epochs", "phases.retrain.epochs")
CONTROLLED_EXTRA = {"schemes": ("prune.scheme", "prune.linear_scheme")}

Progress = Callable[[dict], None]


class ExperimentStopped(Exception):
    """A run was stopped (Experiment.stop, Ctrl-C): its checkpoint is kept; running the experiment again resumes it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        super().__init__(f"{run_dir}: stopped with a checkpoint; run the same command again to resume")


# ============================================================================================ presets and parameters


def preset_path(preset: str | Path) -> Path:
    p = Path(preset)
    if str(preset) in PRESETS:
        return presets_dir() / f"{preset}.toml"
    if p.suffix == ".toml":
        return p
    raise UserError(f"--preset {preset}: expected one of {', '.join(PRESETS)} or a .toml file"
                    + _hint(str(preset), PRESETS))


def load_preset(preset: str | Path) -> dict:
    """A preset as a dict: ``description``, ``profile`` (dotted key -> value), one table per experiment."""
    path = preset_path(preset)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such preset file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    for name in d:
        if name not in ("description", "profile", *EXPERIMENTS):
            raise UserError(f"{path}: [{name}]: expected one of description, profile, {', '.join(EXPERIMENTS)}"
                            + _hint(name, EXPERIMENTS))
    return d


def _hint(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"]


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def toml_value(v: Any) -> str:
    """A value as TOML text, for ``dotted.key=value`` overrides."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict) and not v:
        return "{}"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


# ============================================================================================ runs


@dataclass
class RunSpec:
    """One training run of an experiment: its name, the profile keys it sets, what it is (for the tables) and,
    when it starts from weights made by the experiment, how to make them (called right before a new run)."""

    name: str
    overrides: list[str]
    role: dict
    make_init: Callable[[], None] | None = None


@dataclass
class RunResult:
    spec: RunSpec
    path: Path
    status: str  # trained | resumed | reused
    summary: dict
    wall_seconds: float


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
    return {"nat": pct(f["nat_acc"]), "adv": pct(f["adv_acc"]), "run": run.spec.name}


def cell_text(c: dict | None) -> str:
    if c is None:
        return ""
    if "nat" in c:
        return f"{c['nat']:.2f}/{c['adv']:.2f}"
    if "value" in c:
        s = f"{c['value']:.2f}"
        return f"**{s}**" if c.get("mark") else s
    return str(c.get("text", ""))


# ============================================================================================ the experiment


class Experiment:
    """One experiment: plan its runs, execute them (reusing and resuming), write the report. See the module doc."""

    def __init__(self, name: str, profile: str | Path, *, out: str | Path | None = None, preset: str = "cpu",
                 overrides: Sequence[str] = (), progress: Progress | None = None,
                 subscribers: Sequence[Callable] = (), figures: bool = True) -> None:
        if name not in EXPERIMENTS:
            raise UserError(f"unknown experiment {name!r}: expected one of {', '.join(EXPERIMENTS)}"
                            + _hint(name, EXPERIMENTS))
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
        self.params = self._params(param_sets)
        self.profile_overrides = self._profile_overrides()
        # validate the base profile with every common override now: bad input fails before anything is written
        self.cfg0 = load_profile(self.profile, self.profile_overrides)
        self.spec = data_mod.dataset_spec(self.cfg0.data.name)
        self.seed = self.cfg0.run.seed
        self._numels: dict[int, dict[str, int]] = {}
        self.runs: dict[str, RunResult] = {}
        self.plan = PLANS[name](self)
        names = [r.name for r in self.plan]
        assert len(names) == len(set(names)), names
        self._check_layer_names()

    # ------------------------------------------------------------------ settings
    def _params(self, sets: list[str]) -> dict:
        src = str(preset_path(self.preset_name))
        base = self.preset.get(self.name)
        if not isinstance(base, dict):
            raise UserError(f"{src}: no [{self.name}] table: this preset does not define the experiment")
        params = {k: v for k, v in base.items() if k != "profile"}
        for item in sets:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError("--set", PARAM_PREFIX + key, "exp.<parameter>=<value>", item)
            if key not in params:
                raise ConfigError("--set", PARAM_PREFIX + key, f"a parameter of {self.name} ("
                                  + ", ".join(params) + ")", "<an unknown key>",
                                  hint=_hint(key, list(params)).strip(" ()"))
            value = _parse(raw.strip())
            if not _same_type(params[key], value):
                raise ConfigError("--set", PARAM_PREFIX + key, f"a value like {toml_value(params[key])}", value)
            params[key] = float(value) if isinstance(params[key], float) else value
        user = {item.partition("=")[0].strip() for item in sets}
        _check_params(self.name, params, lambda key: "--set" if key in user else src)
        return params

    def _profile_overrides(self) -> list[str]:
        controlled = set(CONTROLLED) | set(CONTROLLED_EXTRA.get(self.name, ()))
        src = str(preset_path(self.preset_name))
        common = self.preset.get("profile", {}) or {}
        own = (self.preset.get(self.name) or {}).get("profile", {}) or {}
        out = []
        for table in (common, own):
            for key, value in table.items():
                if table is own and (key in controlled or key.startswith("prune.layers.")):
                    raise UserError(f"{src}: {key}: set by the experiment for each run; remove it from the preset")
                out.append(f"{key}={toml_value(value)}")
        for item in self.user_overrides:
            key = item.partition("=")[0].strip()
            if key in controlled or key.startswith("prune.layers."):
                raise ConfigError("--set", key, "a key the experiment does not set per run", "<a controlled key>",
                                  hint=f"{self.name} sets it for each run; change the experiment's parameters with "
                                       f"--set exp.<name>=<value> ({', '.join(self.params)})")
        # user keys are validated on their own first, so an error names --set and not the preset
        load_profile(self.profile, self.user_overrides)
        return out + list(self.user_overrides)

    def _check_layer_names(self) -> None:
        names = list(self.numels(1))
        if not names:
            raise UserError(f"{self.profile}: model {self.cfg0.model.arch} has no prunable layers")

    # ------------------------------------------------------------------ model facts
    def numels(self, width: int) -> dict[str, int]:
        """Entries of every prunable weight of the experiment's architecture at ``width``."""
        if width not in self._numels:
            m = self._build(width)
            self._numels[width] = {k: p.numel() for k, p in prunable_parameters(m).items()}
        return self._numels[width]

    def _build(self, width: int) -> torch.nn.Module:
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
                m = self._build(width)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, {k: v.detach().cpu() for k, v in m.state_dict().items()})

        return path, make

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    # ------------------------------------------------------------------ run specs
    def _epochs(self, pretrain: int, admm: int, retrain: int) -> list[str]:
        return [f"phases.pretrain.epochs={pretrain}", f"phases.admm.epochs={admm}", f"phases.retrain.epochs={retrain}"]

    def dense(self, name: str, width: int, epochs: int, *, natural: bool = False, init: Path | None = None,
              make_init: Callable[[], None] | None = None, role: dict | None = None) -> RunSpec:
        """A dense model trained for ``epochs`` in the pretrain phase (adversarially, or naturally), from the
        seeded initial weights of its width (or from ``init``)."""
        if init is None:
            init, make_init = self.seeded_init(width)
        ov = [f"run.name={toml_value(name)}", f"model.width={width}", "prune.ratio=0", "prune.layers={}",
              *self._epochs(epochs, 0, 0), f"run.init={toml_value(str(init))}"]
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
              *self._epochs(0, admm, retrain), f"run.init={toml_value(str(self.run_dir(source) / 'model.pt'))}"]
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
        results = REPORTS[self.name](self)
        results = self._write_report(results, time.time() - t0)
        self.progress({"type": "done", "out": str(self.out), "report": str(self.out / "report.md"),
                       "seconds": time.time() - t0})
        return results

    def _execute(self, index: int, spec: RunSpec) -> RunResult:
        from .session import Session

        path = self.run_dir(spec.name)
        cfg, text = self.resolved_profile(spec)
        rd = RunDir(path)
        info = {"index": index, "total": len(self.plan), "run": spec.name, "run_dir": str(path), "role": spec.role}
        summary_file = path / "summary.json"
        if rd.profile.is_file():
            _check_same_settings(rd, text)
            summary = _read_json(summary_file)
            if summary is not None and summary.get("status") == "completed" and rd.model.is_file():
                self.progress({"type": "run", "status": "reused", **info, "summary": summary})
                return RunResult(spec, path, "reused", summary, 0.0)
        t0 = time.time()
        if rd.checkpoint.is_file():
            status = "resumed"
            session = Session.resume(path)
        else:
            if path.exists():  # stopped before its first checkpoint: nothing worth keeping
                _remove_unstarted(rd)
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
        from . import api

        return api.load_model(self.run_dir(run))

    # ------------------------------------------------------------------ the report
    def _write_report(self, results: dict, seconds: float) -> dict:
        out = self.out
        (out / "profiles").mkdir(parents=True, exist_ok=True)
        runs = {}
        for name, r in self.runs.items():
            text = (r.path / "profile.toml").read_text(encoding="utf-8")
            atomic_write_text(out / "profiles" / f"{name}.toml", text)
            s = r.summary
            sp = s["sparsity"]
            runs[name] = {
                "role": r.spec.role, "status": r.status, "run_dir": str(r.path),
                "profile": f"profiles/{name}.toml",
                "profile_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "nat_acc": s["final"]["nat_acc"], "adv_acc": s["final"]["adv_acc"], "n": s["final"]["n"],
                "attack": s["final"]["attack"], "device": s.get("device"), "steps": s.get("steps"),
                "prunable_params": sp["prunable_params"], "prunable_nonzero": sp["prunable_nonzero"],
                "sparsity": sp["prunable"], "total_params": sp["total_params"], "nonzero_params": sp["nonzero_params"],
                "train_seconds": round(sum(s.get("phase_seconds", {}).values()), 3),
                "wall_seconds_this_call": round(r.wall_seconds, 3),
            }
        cfg = self.cfg0
        init_files = sorted(str(p.relative_to(out)) for p in (out / "init").glob("*.pt")) if (out / "init").is_dir() else []
        results = {
            "experiment": self.name, "title": TITLES[self.name], "preset": self.preset_name,
            "preset_file": str(preset_path(self.preset_name)), "preset_description": self.preset.get("description", ""),
            "base_profile": str(self.profile), "overrides": self.user_overrides, "param_overrides": self.param_sets,
            "params": self.params,
            "out": str(out), "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "wall_seconds": round(seconds, 3),
            "train_seconds": round(sum(r["train_seconds"] for r in runs.values()), 3),
            "trained_this_call": sorted(n for n, r in self.runs.items() if r.status != "reused"),
            "seeds": {"run.seed": self.seed, "init_files": init_files,
                      "init": f"build_model(...) after torch.manual_seed({self.seed}), saved as a state_dict"},
            "data": {"name": cfg.data.name, "batch_size": cfg.data.batch_size, "train_subset": cfg.data.train_subset,
                     "final_eval_examples": sorted({r["n"] for r in runs.values() if r["n"] is not None})},
            "model": {"arch": cfg.model.arch},
            "attack": {"train": _attack_dict(cfg.attack.train), "eval": _attack_dict(cfg.attack.eval)},
            "versions": versions(),
            "runs": runs,
            **results,
        }
        results["tables"] = [t.to_dict() if isinstance(t, Table) else t for t in results.get("tables", [])]
        figures = []
        if self.figures:
            for plot in results.get("plots", []):
                render_png(plot, out / plot["file"])
                figures.append(plot["file"])
        results["figures"] = figures
        atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
        atomic_write_text(out / "results.csv", results_csv(results))
        atomic_write_text(out / "runs.csv", runs_csv(results))
        atomic_write_text(out / "report.md", report_markdown(results))
        return results


def _attack_dict(a) -> dict:
    return {"kind": a.kind, "eps": a.eps, "step_size": a.step_size, "steps": a.steps, "restarts": a.restarts}


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


# keys that do not change a run's numbers: a finished run made with other values of these is still reused
NOT_COMPARED = ("run.threads", "run.log_interval_s", "run.checkpoint_every", "data.root")


def _check_same_settings(rd: RunDir, text: str) -> None:
    """An existing run directory must hold the run the experiment would start now."""
    current = rd.profile.read_text(encoding="utf-8")
    if current == text:
        return
    try:
        old, new = _flat(tomllib.loads(current)), _flat(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        old, new = {"profile.toml": "?"}, {}
    diff = [k for k in sorted(set(old) | set(new))
            if old.get(k, "<missing>") != new.get(k, "<missing>") and k not in NOT_COMPARED]
    if not diff:
        return
    k = diff[0]
    more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
    raise UserError(f"{rd.path}: made with other settings ({k}: {old.get(k, '<missing>')!r} now "
                    f"{new.get(k, '<missing>')!r}{more}): use another --out, or delete {rd.path} to train it again")


def _remove_unstarted(rd: RunDir) -> None:
    """Remove a run directory that never reached a checkpoint (after checking no process holds it)."""
    if rd.model.exists() or rd.checkpoint.exists():
        return
    rd.acquire()  # raises a one-line UserError when another process runs it
    rd.release()
    shutil.rmtree(rd.path)


def versions() -> dict:
    import torchvision

    from .rundir import _version

    v = {"robprune": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "python": platform.python_version(), "platform": platform.platform()}
    try:
        import numpy

        v["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version

        v["matplotlib"] = version("matplotlib")
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


# ============================================================================================ parameter checks


def _check_params(name: str, p: dict, origin: Callable[[str], str]) -> None:
    def bad(key: str, expected: str) -> UserError:
        return ConfigError(origin(key), f"{PARAM_PREFIX}{key}", expected, p.get(key))

    def widths(key: str, *, many: bool = True) -> list[int]:
        v = p[key]
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            raise bad(key, "a non-empty list of widths >= 1")
        if len(set(v)) != len(v):
            raise bad(key, "a list of distinct widths")
        if many and len(v) < 2 and name == "scratch-vs-pruned":
            raise bad(key, "at least two widths (pairs w_L > w_S are pruned)")
        return v

    for key, v in p.items():
        if key.endswith("epochs") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(key, "an integer >= 1")
    if name in ("weight-dist", "scratch-vs-pruned"):
        widths("widths")
    if name in ("lottery", "schemes"):
        w = p["width"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 2:
            raise bad("width", "an integer >= 2")
        t = widths("targets")
        if any(x >= w for x in t):
            raise bad("targets", f"widths below width = {w}")
    if name == "schemes":
        s = p["schemes"]
        if not isinstance(s, list) or not s or any(x not in SCHEMES for x in s) or len(set(s)) != len(s):
            raise bad("schemes", "a list of distinct schemes among " + ", ".join(SCHEMES))
        if p["linear"] not in ("irregular", "match"):
            raise bad("linear", "'irregular' or 'match'")
    if name == "transfer":
        dense = widths("dense")
        if not isinstance(p["natural"], list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                     for x in p["natural"]):
            raise bad("natural", "a list of widths >= 1")
        pr = p["pruned"]
        if not isinstance(pr, list) or any(not isinstance(x, list) or len(x) != 2 or not all(
                isinstance(y, int) and not isinstance(y, bool) for y in x) or not x[0] > x[1] >= 1 for x in pr):
            raise bad("pruned", "a list of [w_L, w_S] pairs with w_L > w_S >= 1")
        if any(x[0] not in dense for x in pr):
            raise bad("pruned", f"pairs whose w_L is one of the dense widths {dense}")
        if isinstance(p["subset"], bool) or not isinstance(p["subset"], int) or p["subset"] < 1:
            raise bad("subset", "an integer >= 1")
    if "near_zero" in p and not (isinstance(p["near_zero"], (int, float)) and 0 < p["near_zero"] < 1):
        raise bad("near_zero", "a number in (0, 1)")
    if "match_tolerance" in p and not (isinstance(p["match_tolerance"], (int, float)) and p["match_tolerance"] >= 0):
        raise bad("match_tolerance", "a number >= 0")


# ============================================================================================ weights


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


# ============================================================================================ plans


def plan_weight_dist(e: Experiment) -> list[RunSpec]:
    p = e.params
    runs = []
    for w in sorted(p["widths"]):
        runs.append(e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True))
        runs.append(e.dense(f"adv-w{w}", w, p["train_epochs"]))
    return runs


def plan_scratch_vs_pruned(e: Experiment) -> list[RunSpec]:
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
        sd = sliced_state(safe_torch_load(source), e._build(small))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, sd)

    return e.dense(f"inherit-w{big}-to-w{small}", small, epochs, init=path, make_init=make,
                   role={"case": "d", "kind": "inherited", "w_L": big, "w_S": small, "source": f"adv-w{big}"})


def plan_lottery(e: Experiment) -> list[RunSpec]:
    p = e.params
    big = p["width"]
    runs = [e.dense(f"adv-w{big}", big, p["train_epochs"])]
    init_file, _ = e.seeded_init(big)
    names = list(e.numels(big))
    pc = e.cfg0.phases.pretrain
    for small in sorted(p["targets"], reverse=True):
        admm = f"admm-w{big}-to-w{small}"
        runs.append(e.pruned(admm, big, small, f"adv-w{big}", admm=p["admm_epochs"], retrain=p["retrain_epochs"]))
        path = e.init_path(f"lottery-w{big}-to-w{small}")

        def make(path=path, admm=admm) -> None:
            sd = lottery_init(safe_torch_load(init_file), safe_torch_load(e.run_dir(admm) / "model.pt"), names)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(path, sd)

        ratios = e.ratios(big, small)
        # the lottery ticket trains as the dense model did: the pretrain phase's optimizer, schedule and epochs,
        # in the retrain phase (whose hard prune keeps exactly the ticket's zeros: they are the smallest magnitudes)
        ov = [f'run.name="lottery-w{big}-to-w{small}"', f"model.width={big}", "prune.ratio=0", "prune.layers={}",
              *e._epochs(0, 0, p["train_epochs"]), f"run.init={toml_value(str(path))}",
              *[f"phases.retrain.{k}={toml_value(getattr(pc, k))}" for k in PHASE_KEYS],
              *[f"prune.layers.{k}={r!r}" for k, r in ratios.items() if r > 0]]
        runs.append(RunSpec(f"lottery-w{big}-to-w{small}", ov,
                            {"kind": "lottery", "w_L": big, "w_S": small, "mask_of": admm, "init": str(init_file),
                             "ratios": ratios}, make))
    return runs


def plan_transfer(e: Experiment) -> list[RunSpec]:
    p = e.params
    runs = [e.dense(f"adv-w{w}", w, p["train_epochs"]) for w in sorted(p["dense"])]
    runs += [e.dense(f"natural-w{w}", w, p["natural_epochs"], natural=True) for w in sorted(p["natural"])]
    runs += [e.pruned(f"admm-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                      retrain=p["retrain_epochs"]) for big, small in p["pruned"]]
    return runs


def plan_schemes(e: Experiment) -> list[RunSpec]:
    p = e.params
    big = p["width"]
    runs = [e.dense(f"adv-w{big}", big, p["train_epochs"])]
    for small in sorted(p["targets"], reverse=True):
        for s in p["schemes"]:
            runs.append(e.pruned(f"admm-{s}-w{big}-to-w{small}", big, small, f"adv-w{big}", admm=p["admm_epochs"],
                                 retrain=p["retrain_epochs"], scheme=s, linear=p["linear"]))
    return runs


PLANS: dict[str, Callable[[Experiment], list[RunSpec]]] = {
    "weight-dist": plan_weight_dist, "scratch-vs-pruned": plan_scratch_vs_pruned, "lottery": plan_lottery,
    "transfer": plan_transfer, "schemes": plan_schemes,
}

TITLES = {
    "weight-dist": "Weight distributions of natural vs adversarial training (Fig. 1)",
    "scratch-vs-pruned": "Adversarial training from scratch vs concurrent ADMM pruning (Table 2)",
    "lottery": "Lottery ticket vs ADMM pruning (Table 5)",
    "transfer": "Transfer attacks between dense and pruned models",
    "schemes": "Pruning schemes: irregular vs column vs filter",
}


# ============================================================================================ reports


def _run(e: Experiment, name: str) -> RunResult:
    return e.runs[name]


def _adv(e: Experiment, name: str) -> float:
    return e.runs[name].summary["final"]["adv_acc"]


def _nat(e: Experiment, name: str) -> float:
    return e.runs[name].summary["final"]["nat_acc"]


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _p(x: float) -> str:
    return f"{100 * x:.2f}"


def _ratio_label(e: Experiment, big: int, small: int) -> str:
    r = e.ratios(big, small)
    inner = max(r.values())
    return f"{big}->{small} ({100 * inner:.2f}%)"


def _prune_note(e: Experiment, big: int, small: int, extra: str = "", ratios: dict | None = None) -> str:
    r = ratios if ratios is not None else e.ratios(big, small)
    parts = ", ".join(f"{k} {100 * v:.2f}%" if v > 0 else f"{k} not pruned" for k, v in r.items())
    return (f"Pruning w={big} to the parameter count of w={small} prunes every layer to exactly the size of the same "
            f"layer at w={small}: ratio 1 - n(w_S)/n(w_L) per layer ({parts}); the first conv and the last layer "
            f"scale with w, not w^2, so they get 1 - w_S/w_L.{extra}")


def weight_stats(sd: dict[str, torch.Tensor], names: Sequence[str], near_zero: float) -> dict:
    near = total = 0
    values = []
    for k in names:
        w = sd[k].detach().float().flatten()
        m = w.abs().max().item()
        near += int((w.abs() <= near_zero * m).sum().item()) if m > 0 else w.numel()
        total += w.numel()
        values.append(w)
    v = torch.cat(values)
    return {"near_zero": near / max(total, 1), "std": v.std().item(), "mean_abs": v.abs().mean().item(),
            "n": total, "values": v}


def report_weight_dist(e: Experiment) -> dict:
    p = e.params
    ws = sorted(p["widths"])
    stats = {}
    names = None
    for w in ws:
        names = list(e.numels(w))
        for kind in ("natural", "adv"):
            stats[f"{kind}-w{w}"] = weight_stats(e.state(f"{kind}-w{w}"), names, p["near_zero"])
    acc = Table("accuracy", "Natural / PGD accuracy (%) after natural and adversarial training", "width",
                ["natural training", "adversarial training"],
                [{"label": f"w={w}", "cells": [pair(_run(e, f"natural-w{w}")), pair(_run(e, f"adv-w{w}"))]} for w in ws])
    acc.claim = ("adversarial training buys PGD accuracy at the cost of natural accuracy: at every width the "
                 "adversarially trained model has the higher PGD accuracy and the naturally trained one the higher "
                 "natural accuracy")
    bad = [w for w in ws if not (_adv(e, f"adv-w{w}") > _adv(e, f"natural-w{w}")
                                 and _nat(e, f"natural-w{w}") >= _nat(e, f"adv-w{w}"))]
    acc.held = not bad
    acc.detail = (f"at every width ({', '.join(map(str, ws))}) adversarial training has the higher PGD accuracy and "
                  f"natural training the higher natural accuracy" if not bad else
                  "not at width " + ", ".join(f"{w} (PGD {_p(_adv(e, f'adv-w{w}'))} adversarial vs "
                                              f"{_p(_adv(e, f'natural-w{w}'))} natural; natural acc "
                                              f"{_p(_nat(e, f'natural-w{w}'))} vs {_p(_nat(e, f'adv-w{w}'))})"
                                              for w in bad))
    dist = Table("weights", f"Share of near-zero weights (%, |w| <= {p['near_zero']:g} x max |w| of the layer) and "
                            "standard deviation of the prunable weights", "width",
                 ["near-zero, natural", "near-zero, adversarial", "std, natural", "std, adversarial"], [])
    for w in ws:
        n, a = stats[f"natural-w{w}"], stats[f"adv-w{w}"]
        dist.rows.append({"label": f"w={w}", "cells": [
            {"value": pct(n["near_zero"]), "raw": n["near_zero"]}, {"value": pct(a["near_zero"]), "raw": a["near_zero"]},
            {"value": round(n["std"], 4), "raw": n["std"], "digits": 4},
            {"value": round(a["std"], 4), "raw": a["std"], "digits": 4}]})
    dist.claim = ("naturally trained weights pile up at zero while adversarially trained weights spread wider "
                  "(less sparse): the natural model has the larger share of near-zero weights at every width")
    bad = [w for w in ws if not stats[f"natural-w{w}"]["near_zero"] > stats[f"adv-w{w}"]["near_zero"]]
    dist.held = not bad
    dist.detail = ("the naturally trained model has more near-zero weights at every width ("
                   + ", ".join(f"w={w}: {100 * stats[f'natural-w{w}']['near_zero']:.2f}% vs "
                               f"{100 * stats[f'adv-w{w}']['near_zero']:.2f}%" for w in ws) + ")") if not bad else (
        "the adversarially trained model has as many or more near-zero weights at width "
        + ", ".join(f"{w} ({100 * stats[f'natural-w{w}']['near_zero']:.2f}% natural vs "
                    f"{100 * stats[f'adv-w{w}']['near_zero']:.2f}% adversarial)" for w in bad))
    # histograms: shared bins per width, density per bin
    plots = []
    for w in ws:
        n, a = stats[f"natural-w{w}"]["values"], stats[f"adv-w{w}"]["values"]
        both = torch.cat([n, a]).abs()
        lim = float(both.kthvalue(max(1, math.ceil(0.999 * both.numel()))).values) or 1.0
        bins = int(p["bins"])
        edges = torch.linspace(-lim, lim, bins + 1)
        centers = [round(float(x), 6) for x in (edges[:-1] + edges[1:]) / 2]
        series = {}
        for label, v in (("natural", n), ("adversarial", a)):
            h = torch.histc(v.clamp(-lim, lim), bins=bins, min=-lim, max=lim)
            series[label] = [round(float(x), 6) for x in (h / max(v.numel(), 1))]
        plots.append({"file": f"weights_w{w}.png", "kind": "hist", "title": f"prunable weights, width {w}",
                      "x": centers, "series": series, "xlabel": "weight value", "ylabel": "share of weights"})
    plots.append({"file": "accuracy.png", "kind": "line", "title": "accuracy vs width", "x": ws,
                  "series": {"natural training, PGD": [100 * _adv(e, f"natural-w{w}") for w in ws],
                             "adversarial training, PGD": [100 * _adv(e, f"adv-w{w}") for w in ws],
                             "natural training, natural": [100 * _nat(e, f"natural-w{w}") for w in ws],
                             "adversarial training, natural": [100 * _nat(e, f"adv-w{w}") for w in ws]},
                  "xlabel": "width w", "ylabel": "accuracy %"})
    weights = {k: {kk: vv for kk, vv in s.items() if kk != "values"} for k, s in stats.items()}
    return {"tables": [acc, dist], "plots": plots, "weights": weights,
            "notes": [f"Weights are all prunable weights (conv and linear) of each model; 'near zero' means |w| <= "
                      f"{p['near_zero']:g} times the largest |w| of its layer. The paper's Fig. 1 uses VGG-16 on "
                      f"CIFAR-10; this run uses {e.cfg0.model.arch} on {e.cfg0.data.name}."]}


def report_scratch_vs_pruned(e: Experiment) -> dict:
    ws = sorted(e.params["widths"])
    targets = ws[:-1]
    t2 = Table("table2", "Natural / PGD accuracy (%) in the layout of the paper's Table 2: rows = width w; natural and "
                         "adversarial training at that width from scratch; ->w_S = ADMM-pruned from w to the parameter "
                         "count of w_S with concurrent adversarial training", "w",
               ["natural training", "adv training", *[f"->{s}" for s in targets]], [])
    for w in ws:
        cells = [pair(_run(e, f"natural-w{w}")), pair(_run(e, f"adv-w{w}"))]
        cells += [pair(_run(e, f"admm-w{w}-to-w{s}")) if s < w else None for s in targets]
        t2.rows.append({"label": str(w), "cells": cells})
    pairs = [(big, small) for big in ws for small in ws if small < big]
    t2.claim = ("a small model trained adversarially from scratch is worse than the same parameter count reached by "
                "pruning a larger adversarially trained model with ADMM: (c) pruned w_L->w_S beats (b) adversarial "
                "training at w_S in PGD accuracy for every pair")
    bad = [(b, s) for b, s in pairs if not _adv(e, f"admm-w{b}-to-w{s}") > _adv(e, f"adv-w{s}")]
    t2.held = not bad
    t2.detail = (("pruned beats scratch in PGD accuracy for every pair: "
                  + ", ".join(f"{b}->{s} {_p(_adv(e, f'admm-w{b}-to-w{s}'))} vs {_p(_adv(e, f'adv-w{s}'))}"
                              for b, s in pairs)) if not bad else
                 "scratch training at w_S is as good or better for "
                 + ", ".join(f"{b}->{s} (pruned {_p(_adv(e, f'admm-w{b}-to-w{s}'))} vs scratch "
                             f"{_p(_adv(e, f'adv-w{s}'))} PGD)" for b, s in bad)
                 + (f"; pruned wins for {len(pairs) - len(bad)} of {len(pairs)} pairs" if len(bad) < len(pairs) else ""))
    t2.note = _prune_note(e, ws[-1], ws[0])
    cmp_ = Table("cases", "The four ways to get a w_S model, natural / PGD accuracy (%): (a) natural training at w_S, "
                          "(b) adversarial training at w_S from scratch, (c) ADMM-pruned from w_L with concurrent "
                          "adversarial training, (d) adversarial training at w_S from w_L's inherited weights",
                 "w_L->w_S", ["(a) natural", "(b) adv scratch", "(c) ADMM pruned", "(d) inherited"], [])
    for b, s in pairs:
        cmp_.rows.append({"label": f"{b}->{s}", "cells": [
            pair(_run(e, f"natural-w{s}")), pair(_run(e, f"adv-w{s}")), pair(_run(e, f"admm-w{b}-to-w{s}")),
            pair(_run(e, f"inherit-w{b}-to-w{s}"))]})
    cmp_.claim = ("concurrent ADMM pruning of the large model is the better way to a small robust model, also "
                  "against a small model that inherits the large model's weights: (c) >= (d) in PGD accuracy for "
                  "every pair (this comparison is the issue's, not a number PAPER.md gives)")
    bad = [(b, s) for b, s in pairs if not _adv(e, f"admm-w{b}-to-w{s}") >= _adv(e, f"inherit-w{b}-to-w{s}")]
    cmp_.held = not bad
    cmp_.detail = (("ADMM pruning is at least as robust as inherited-weight training for every pair: "
                    + ", ".join(f"{b}->{s} {_p(_adv(e, f'admm-w{b}-to-w{s}'))} vs "
                                f"{_p(_adv(e, f'inherit-w{b}-to-w{s}'))}" for b, s in pairs)) if not bad else
                   "inherited-weight training is more robust for "
                   + ", ".join(f"{b}->{s} ({_p(_adv(e, f'inherit-w{b}-to-w{s}'))} vs ADMM "
                               f"{_p(_adv(e, f'admm-w{b}-to-w{s}'))} PGD)" for b, s in bad))
    cmp_.note = ("(d) starts from the trained w_L model's weights sliced to w_S: the first output channels / units "
                 "and the first input channels of every layer (w_L[:n_out, :n_in, ...]), then adversarial training "
                 f"for {_n(e.params['inherit_epochs'], 'epoch')} with the settings of (b).")
    plots = [{"file": "pgd_by_pair.png", "kind": "bar", "title": "PGD accuracy of the w_S models",
              "x": [f"{b}->{s}" for b, s in pairs],
              "series": {"(b) scratch": [100 * _adv(e, f"adv-w{s}") for b, s in pairs],
                         "(c) ADMM pruned": [100 * _adv(e, f"admm-w{b}-to-w{s}") for b, s in pairs],
                         "(d) inherited": [100 * _adv(e, f"inherit-w{b}-to-w{s}") for b, s in pairs]},
              "xlabel": "w_L -> w_S", "ylabel": "PGD accuracy %"},
             {"file": "adv_training_by_width.png", "kind": "line", "title": "adversarial training from scratch",
              "x": ws, "series": {"natural": [100 * _nat(e, f"adv-w{w}") for w in ws],
                                  "PGD": [100 * _adv(e, f"adv-w{w}") for w in ws]},
              "xlabel": "width w", "ylabel": "accuracy %"}]
    return {"tables": [t2, cmp_], "plots": plots}


def report_lottery(e: Experiment) -> dict:
    p = e.params
    big = p["width"]
    smalls = sorted(p["targets"], reverse=True)
    names = list(e.numels(big))
    masks = {}
    for s in smalls:
        a, l_ = e.state(f"admm-w{big}-to-w{s}"), e.state(f"lottery-w{big}-to-w{s}")
        masks[s] = same_zero_pattern(a, l_, names)
    t = Table("lottery", f"Natural / PGD accuracy (%): ADMM pruning from w={big} vs the lottery ticket (the pruned "
                         f"structure reset to its original initialisation, trained adversarially); dense w={big}: "
                         f"{_p(_nat(e, f'adv-w{big}'))}/{_p(_adv(e, f'adv-w{big}'))}", "pruned to",
              ["ADMM pruned", "lottery ticket", "same mask"], [])
    for s in smalls:
        t.rows.append({"label": _ratio_label(e, big, s), "cells": [
            pair(_run(e, f"admm-w{big}-to-w{s}")), pair(_run(e, f"lottery-w{big}-to-w{s}")),
            {"text": "yes" if masks[s] else "NO"}]})
    tol = float(p["match_tolerance"])
    mild, hard = smalls[0], smalls[-1]
    gap = {s: 100 * (_adv(e, f"admm-w{big}-to-w{s}") - _adv(e, f"lottery-w{big}-to-w{s}")) for s in smalls}
    t.claim = ("the lottery ticket matches ADMM pruning only at mild ratios and falls behind at high ones: at most "
               f"{tol:g} PGD points behind at the mildest ratio ({big}->{mild})"
               + (f" and more than {tol:g} points behind at the highest ({big}->{hard})" if len(smalls) > 1 else
                  " (one ratio only: the high-ratio half of the finding is not tested)"))
    ok_mild = gap[mild] <= tol
    ok_hard = gap[hard] > tol
    t.held = ok_mild and ok_hard if len(smalls) > 1 else ok_mild
    parts = [f"{big}->{s}: ADMM {_p(_adv(e, f'admm-w{big}-to-w{s}'))} vs lottery "
             f"{_p(_adv(e, f'lottery-w{big}-to-w{s}'))} PGD ({gap[s]:+.2f} points)" for s in smalls]
    why = []
    if not ok_mild:
        why.append(f"the lottery ticket is {gap[mild]:.2f} PGD points behind at the mildest ratio")
    if len(smalls) > 1 and not ok_hard:
        why.append(f"it is {-gap[hard]:.2f} points ahead of ADMM pruning at the highest ratio" if gap[hard] < 0 else
                   f"it is only {gap[hard]:.2f} points behind at the highest ratio")
    t.detail = "; ".join(parts) + ("" if t.held else " — " + " and ".join(why))
    t.note = (_prune_note(e, big, hard) + f" The lottery ticket is the original initial weights of the dense w={big} "
              f"run times the ADMM-pruned model's mask (its zero pattern), trained for {_n(p['train_epochs'], 'epoch')} with "
              f"the dense model's optimizer and schedule; the hard prune at the start of its (retrain) phase keeps "
              f"exactly that mask ('same mask' checks the final zero patterns are identical).")
    x = [f"{big}->{s}" for s in smalls]
    plots = [{"file": "lottery.png", "kind": "bar", "title": "ADMM pruning vs lottery ticket (PGD)", "x": x,
              "series": {"ADMM pruned": [100 * _adv(e, f"admm-w{big}-to-w{s}") for s in smalls],
                         "lottery ticket": [100 * _adv(e, f"lottery-w{big}-to-w{s}") for s in smalls]},
              "xlabel": "w_L -> w_S", "ylabel": "PGD accuracy %"}]
    return {"tables": [t], "plots": plots, "mask_identical": {f"{big}->{s}": masks[s] for s in smalls}}


def report_transfer(e: Experiment) -> dict:
    from .attacks import pgd

    p = e.params
    models = [s.name for s in e.plan]
    cfg = e.cfg0
    ea = cfg.attack.eval
    from . import api

    dev = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
    x, y = api.load_test_set(e.run_dir(models[0]), dev)
    x, y = data_mod.eval_subset(x, y, int(p["subset"]))
    nets = {m: e.model(m).to(dev) for m in models}
    bs = cfg.data.test_batch_size
    acc = {}
    clean = {}
    for j, net in nets.items():
        with torch.no_grad():
            clean[j] = sum(int((net(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)
    with torch.random.fork_rng(devices=[0] if dev == "cuda" else []):
        torch.manual_seed(e.seed + 2)
        for i_name, src in nets.items():
            adv = torch.cat([pgd(src, x[i:i + bs], y[i:i + bs], eps=ea.eps, step_size=ea.step_size, steps=ea.steps,
                                 restarts=ea.restarts) for i in range(0, len(x), bs)])
            for j_name, tgt in nets.items():
                with torch.no_grad():
                    correct = sum(int((tgt(adv[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
                                  for i in range(0, len(adv), bs))
                acc[(i_name, j_name)] = correct / len(x)
    t = Table("transfer", f"PGD accuracy (%) of model j (columns) on adversarial examples crafted on model i (rows), "
                          f"{len(x)} test examples; the diagonal (white-box) in bold; last row: natural accuracy",
              "crafted on (row), evaluated on (column)", models, [])
    for i_name in models:
        t.rows.append({"label": i_name, "cells": [
            {"value": pct(acc[(i_name, j)]), "raw": acc[(i_name, j)], **({"mark": "white-box"} if i_name == j else {})}
            for j in models]})
    t.rows.append({"label": "natural (no attack)", "cells": [{"value": pct(clean[j]), "raw": clean[j]} for j in models]})
    t.claim = ("each model is most vulnerable to adversarial examples generated on itself, whatever its size: in "
               "every column the white-box (diagonal) accuracy is the lowest")
    bad = [j for j in models if any(acc[(i, j)] < acc[(j, j)] for i in models if i != j)]
    t.held = not bad
    t.detail = ("for every model the white-box attack is the strongest" if not bad else
                "examples crafted on another model are stronger for "
                + ", ".join(f"{j} (white-box {_p(acc[(j, j)])}, from "
                            f"{min((i for i in models if i != j), key=lambda i: acc[(i, j)])} "
                            f"{_p(min(acc[(i, j)] for i in models if i != j))})" for j in bad))
    pruned = [s.name for s in e.plan if s.role.get("kind") == "admm"]
    others = [m for m in models if m not in pruned]
    t.note = ("Adversarial examples: PGD with the evaluation settings (eps, step, steps, restarts), crafted on model i "
              f"with torch seed {e.seed + 2}. Mean transfer (off-diagonal) accuracy of the pruned models: "
              + (", ".join(f"{j} {_p(sum(acc[(i, j)] for i in models if i != j) / max(len(models) - 1, 1))}"
                           for j in pruned) or "none") + "; of the others: "
              + (", ".join(f"{j} {_p(sum(acc[(i, j)] for i in models if i != j) / max(len(models) - 1, 1))}"
                           for j in others) or "none") + ".")
    plots = [{"file": "transfer.png", "kind": "matrix", "title": "PGD accuracy: crafted on row, evaluated on column",
              "xlabels": models, "ylabels": models,
              "matrix": [[100 * acc[(i, j)] for j in models] for i in models]}]
    matrix = {"models": models, "adv_acc": [[acc[(i, j)] for j in models] for i in models],
              "nat_acc": [clean[j] for j in models], "n": len(x)}
    return {"tables": [t], "plots": plots, "transfer": matrix}


def report_schemes(e: Experiment) -> dict:
    p = e.params
    big = p["width"]
    smalls = sorted(p["targets"], reverse=True)
    schemes = list(p["schemes"])
    t = Table("schemes", f"Natural / PGD accuracy (%) of w={big} pruned with each scheme (dense w={big}: "
                         f"{_p(_nat(e, f'adv-w{big}'))}/{_p(_adv(e, f'adv-w{big}'))})", "pruned to", schemes, [])
    for s in smalls:
        t.rows.append({"label": _ratio_label(e, big, s),
                       "cells": [pair(_run(e, f"admm-{sc}-w{big}-to-w{s}")) for sc in schemes]})
    order = [sc for sc in ("irregular", "column", "filter") if sc in schemes]
    t.claim = ("finer-grained pruning keeps more robustness: " + " >= ".join(order) + " in PGD accuracy at every "
               "ratio, the gap widening at high ratios")
    bad = []
    for s in smalls:
        vals = [_adv(e, f"admm-{sc}-w{big}-to-w{s}") for sc in order]
        if any(a < b for a, b in zip(vals, vals[1:])):
            bad.append(s)
    t.held = not bad and len(order) > 1
    gaps = {s: 100 * (_adv(e, f"admm-{order[0]}-w{big}-to-w{s}") - _adv(e, f"admm-{order[-1]}-w{big}-to-w{s}"))
            for s in smalls}
    widen = (f"; the {order[0]}-{order[-1]} gap is " + ", ".join(f"{gaps[s]:+.2f} at {big}->{s}" for s in smalls)
             + (" (widening)" if len(smalls) > 1 and gaps[smalls[-1]] > gaps[smalls[0]] else
                " (not widening)" if len(smalls) > 1 else "")) if len(order) > 1 else ""
    if t.held:
        t.detail = f"{' >= '.join(order)} in PGD accuracy at every ratio" + widen
    else:
        t.detail = ("the order breaks at " + ", ".join(
            f"{big}->{s} (" + ", ".join(f"{sc} {_p(_adv(e, f'admm-{sc}-w{big}-to-w{s}'))}" for sc in order) + ")"
            for s in bad) + widen) if bad else "fewer than two schemes to compare"
    lin = ("its linear layers take the compared scheme too (LeNet's weights are mostly linear), except the last "
           "layer, which stays dense (filter pruning it would delete classes)" if p["linear"] == "match" else
           "linear layers are pruned irregularly in every scheme, as in the paper")
    used = e.runs[f"admm-{schemes[0]}-w{big}-to-w{smalls[-1]}"].spec.role["ratios"]
    t.note = (_prune_note(e, big, smalls[-1], ratios=used) + f" Convolutions take the scheme; {lin}. Filter = whole rows of the "
              "(out, -1) view, column = whole columns of it.")
    x = [f"{big}->{s}" for s in smalls]
    plots = [{"file": "schemes_pgd.png", "kind": "line", "title": "PGD accuracy by scheme", "x": x,
              "series": {sc: [100 * _adv(e, f"admm-{sc}-w{big}-to-w{s}") for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": "PGD accuracy %"},
             {"file": "schemes_natural.png", "kind": "line", "title": "natural accuracy by scheme", "x": x,
              "series": {sc: [100 * _nat(e, f"admm-{sc}-w{big}-to-w{s}") for s in smalls] for sc in schemes},
              "xlabel": "w_L -> w_S", "ylabel": "natural accuracy %"}]
    return {"tables": [t], "plots": plots}


REPORTS: dict[str, Callable[[Experiment], dict]] = {
    "weight-dist": report_weight_dist, "scratch-vs-pruned": report_scratch_vs_pruned, "lottery": report_lottery,
    "transfer": report_transfer, "schemes": report_schemes,
}


# ============================================================================================ writers


def table_markdown(t: dict) -> list[str]:
    lines = [f"<!-- table: {t['id']} -->", f"| {t['corner']} | " + " | ".join(t["columns"]) + " |",
             "|" + "---|" * (len(t["columns"]) + 1)]
    for r in t["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(_cell_md(c) for c in r["cells"]) + " |")
    return lines


def _cell_md(c: dict | None) -> str:
    if c is not None and "value" in c and c.get("digits"):
        s = f"{c['value']:.{c['digits']}f}"
        return f"**{s}**" if c.get("mark") else s
    return cell_text(c)


def report_markdown(r: dict) -> str:
    L = [f"# {r['title']}", "",
         f"`robprune experiment {r['experiment']} {r['base_profile']} --preset {r['preset']}"
         + "".join(f" --set {o}" for o in [*r["overrides"], *r["param_overrides"]])
         + f"` — {r['created']}", "",
         f"Preset: {r['preset']} ({r['preset_description']}). Data: {r['data']['name']}, model: {r['model']['arch']}. "
         f"Accuracies are natural/PGD % on {', '.join(map(str, r['data']['final_eval_examples']))} test examples "
         f"(PGD eps {r['attack']['eval']['eps']:g}, step {r['attack']['eval']['step_size']:g}, "
         f"{r['attack']['eval']['steps']} steps, {r['attack']['eval']['restarts']} restart(s)).", ""]
    for i, t in enumerate(r["tables"], 1):
        L += [f"## Table {i}: {t['title']}", ""]
        L += table_markdown(t)
        L += [""]
        f = t["finding"]
        if f["claim"]:
            L += [f"**The paper's finding:** {f['claim']}.", "", f"**On this run:** {f['sentence']}.", ""]
        if t.get("note"):
            L += [t["note"], ""]
    for note in r.get("notes", []):
        L += [note, ""]
    if r.get("figures"):
        L += ["## Figures", ""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    L += ["## How these numbers were made", "",
          f"- base profile: `{r['base_profile']}`; preset `{r['preset']}` (`{r['preset_file']}`); "
          f"--set: {', '.join(f'`{o}`' for o in r['overrides']) or 'none'}",
          "- experiment parameters: " + ", ".join(f"{k} = {toml_value(v)}" for k, v in r["params"].items()),
          f"- seed: run.seed = {r['seeds']['run.seed']} for every run; initial weights: {r['seeds']['init']} "
          f"({', '.join(r['seeds']['init_files']) or 'none'})",
          "- training attack: " + _attack_text(r["attack"]["train"]) + "; evaluation attack: "
          + _attack_text(r["attack"]["eval"]),
          "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
          f"- time: {r['wall_seconds']:.0f} s for this invocation; the runs' training phases took "
          f"{r['train_seconds']:.0f} s in all; trained (or resumed) in this invocation: "
          f"{', '.join(r['trained_this_call']) or 'none (all reused)'}",
          "- raw numbers: `results.json` (these tables are rendered from its `tables`), `results.csv` (one line per "
          "table cell), `runs.csv` (one line per run)", "",
          "| run | what | natural % | PGD % | sparsity % | nonzero / prunable | train s | profile |",
          "|---|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        role = run["role"]
        what = ", ".join(f"{k} {v}" for k, v in role.items() if k not in ("ratios", "init", "source", "mask_of"))
        L.append(f"| {name} | {what} | {_p(run['nat_acc'])} | {_p(run['adv_acc'])} | {100 * run['sparsity']:.2f} | "
                 f"{run['prunable_nonzero']} / {run['prunable_params']} | {run['train_seconds']:.0f} | "
                 f"[{run['profile']}]({run['profile']}) |")
    return "\n".join(L) + "\n"


def _attack_text(a: dict) -> str:
    if a["kind"] == "none":
        return "none"
    return f"{a['kind']} eps {a['eps']:g}, step {a['step_size']:g}, {a['steps']} steps, {a['restarts']} restart(s)"


def results_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "run", "nat_acc", "adv_acc", "value"])
    for t in r["tables"]:
        for row in t["rows"]:
            for col, c in zip(t["columns"], row["cells"]):
                if c is None:
                    continue
                if "nat" in c:
                    run = r["runs"][c["run"]]
                    w.writerow([t["id"], row["label"], col, c["run"], run["nat_acc"], run["adv_acc"], ""])
                elif "value" in c:
                    w.writerow([t["id"], row["label"], col, "", "", "", c.get("raw", c["value"])])
                else:
                    w.writerow([t["id"], row["label"], col, "", "", "", c.get("text", "")])
    return buf.getvalue()


def runs_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["run", "kind", "width", "w_L", "w_S", "scheme", "status", "nat_acc", "adv_acc", "n", "sparsity",
            "prunable_params", "prunable_nonzero", "total_params", "nonzero_params", "train_seconds", "device",
            "profile"]
    w.writerow(cols)
    for name, run in r["runs"].items():
        role = run["role"]
        w.writerow([name, role.get("kind"), role.get("width", role.get("w_L")), role.get("w_L"), role.get("w_S"),
                    role.get("scheme"), run["status"], *[run[c] for c in cols[7:]]])
    return buf.getvalue()


# ============================================================================================ figures


def render_png(plot: dict, path: Path) -> None:
    """Draw one plot spec (the same specs the CLI draws in the terminal with plotext) as a PNG with matplotlib's
    Agg canvas (imported here, not at module import; pyplot and its global backend are not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .rundir import atomic_write_bytes

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    kind = plot["kind"]
    if kind == "line":
        for label, ys in plot["series"].items():
            ax.plot([str(v) for v in plot["x"]], ys, marker="o", label=label)
    elif kind == "bar":
        n = len(plot["series"])
        width = 0.8 / max(n, 1)
        for k, (label, ys) in enumerate(plot["series"].items()):
            ax.bar([i + (k - (n - 1) / 2) * width for i in range(len(plot["x"]))], ys, width, label=label)
        ax.set_xticks(range(len(plot["x"])), [str(v) for v in plot["x"]])
    elif kind == "hist":
        xs = plot["x"]
        step = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
        for label, ys in plot["series"].items():
            ax.bar(xs, ys, width=step, alpha=0.5, label=label)
    elif kind == "matrix":
        m = plot["matrix"]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
        ax.set_xticks(range(len(plot["xlabels"])), plot["xlabels"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(plot["ylabels"])), plot["ylabels"], fontsize=7)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 50 else "black", fontweight="bold" if i == j else "normal")
        fig.colorbar(im, ax=ax, label="PGD accuracy %")
    else:
        raise ValueError(f"unknown plot kind {kind!r}")
    ax.set_title(plot["title"])
    if plot.get("xlabel"):
        ax.set_xlabel(plot["xlabel"])
    if plot.get("ylabel"):
        ax.set_ylabel(plot["ylabel"])
    if kind != "matrix":
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def run_experiment(name: str, profile: str | Path, **kw) -> dict:
    """Plan, run and report one experiment (see :class:`Experiment`); returns results.json's dict."""
    return Experiment(name, profile, **kw).run()
