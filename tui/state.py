"""What the dashboard knows about a run, built only from event records (dicts, as in the JSONL files).

The same records arrive from an in-process engine (``Event.to_dict()``) or from following a run
directory's ``metrics.jsonl`` / ``events.jsonl``, so a live run, an attached run and a finished run all
render through this one class. It holds no widgets and is tested on its own.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from robprune.engine.config import PHASES
from robprune.tui.history import History

MAX_LOG = 500
# the x ranges the plots can show: the whole run, the current phase, the last RECENT_S seconds
VIEWS = ("run", "phase", "recent")
RECENT_S = 600.0
VIEW_LABELS = {"run": "whole run", "phase": "this phase", "recent": "last 10 min"}


def _history():
    return field(default_factory=History)


@dataclass
class RunState:
    name: str = ""
    profile: str = ""
    device: str = ""
    run_dir: str = ""
    world_size: int = 1  # a data-parallel run's ranks (its "distributed" event)
    phase_epochs: dict[str, int] = field(default_factory=dict)  # from the profile, for the run's ETA
    state: str = "starting"  # starting | running | paused | finished | stopped | error | not running
    engine_running: bool | None = None  # attached: does a process hold the run's lock (None: not known)
    resources: dict = field(default_factory=dict)  # the newest step record's host / GPU figures
    phase: str = "-"
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    step: int = 0
    images_per_s: float = 0.0
    loss: float | None = None
    lr: float | None = None
    train_adv_acc: float | None = None
    last_eval: dict | None = None
    layers: list[dict] = field(default_factory=list)
    residuals: dict = field(default_factory=dict)  # layer -> {primal, dual, rho}
    rho: dict[str, float] = field(default_factory=dict)
    summary: dict | None = None
    error: str | None = None
    version: int = 0  # bumped on every change; widgets redraw when it moved
    log_count: int = 0  # log lines ever noted (the log deque keeps the last MAX_LOG)
    # series for the plots, x = global step: the whole run at bounded memory (see tui/history.py)
    train_acc: History = _history()
    eval_nat: History = _history()
    eval_adv: History = _history()
    loss_series: History = _history()
    lr_series: History = _history()
    primal_series: History = _history()
    dual_series: History = _history()
    phase_start: dict[str, int] = field(default_factory=dict)  # phase -> global step where it began
    t_last: float = 0.0  # time of the newest record (the "last 10 min" window ends there)
    log: deque = field(default_factory=lambda: deque(maxlen=MAX_LOG))
    _rate: deque = field(default_factory=lambda: deque(maxlen=30))  # (t, step) for the ETA

    # ------------------------------------------------------------------ ingest
    def apply(self, r: dict) -> None:
        kind = r.get("type")
        t = r.get("t")
        if isinstance(t, (int, float)) and t > self.t_last:
            self.t_last = float(t)
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is not None:
            try:
                handler(r)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                # a record that parses but lacks what its type needs (an edited or foreign file, when
                # following a run directory): skipped with a warning, never the end of the dashboard
                self._note("warning", f"a {kind!r} record was skipped: {type(exc).__name__}: {exc}")
        self.version += 1

    def _note(self, level: str, text: str, t: float | None = None) -> None:
        self.log.append((t or time.time(), level, text))
        self.log_count += 1

    def _on_step(self, r: dict) -> None:
        if self.state in ("starting",):
            self.state = "running"
        self.phase, self.epoch, self.epochs = r["phase"], r["epoch"], r["epochs"]
        self.batch, self.batches, self.step = r["batch"], r["batches"], r["step"]
        self.images_per_s, self.loss, self.lr, self.train_adv_acc = r["images_per_s"], r["loss"], r["lr"], r["adv_acc"]
        t = r["t"]
        if isinstance(r.get("resources"), dict):
            self.resources = r["resources"]
        self.train_acc.append(self.step, 100 * r["adv_acc"], t)
        self.loss_series.append(self.step, r["loss"], t)
        self.lr_series.append(self.step, r["lr"], t)
        self._rate.append((r["t"], self.step))

    def _on_eval(self, r: dict) -> None:
        self.last_eval = r
        self.eval_nat.append(r["step"], 100 * r["nat_acc"], r["t"])
        self.eval_adv.append(r["step"], 100 * r["adv_acc"], r["t"])
        a = r["attack"]
        self._note("eval", f"eval ({r['reason']}) {r['phase']} epoch {r['epoch']}: natural {100 * r['nat_acc']:.2f}%, "
                           f"{a['kind'].upper()}-{a['steps']} {100 * r['adv_acc']:.2f}% (n={r['n']})", r["t"])

    def _on_overfit_check(self, r: dict) -> None:
        verdict = f": overfitting ({r['detected']})" if r.get("detected") else ""
        self._note("warning" if r.get("detected") else "eval",
                   f"overfit check {r['phase']} epoch {r['epoch']}: APGD-CE {100 * r['apgd_acc']:.1f}%, "
                   f"{str(r['train_attack']).upper()} {100 * r['train_attack_acc']:.1f}% (n={r['n']}){verdict}", r["t"])

    def _on_layers(self, r: dict) -> None:
        self.layers = r["layers"]
        for L in self.layers:
            if L.get("rho") is not None:
                self.rho[L["name"]] = L["rho"]

    def _on_residuals(self, r: dict) -> None:
        self.residuals = r["layers"]
        if not self.residuals:
            return
        n = len(self.residuals)
        primal = sum(v["primal"] for v in self.residuals.values()) / n
        dual = sum(v["dual"] for v in self.residuals.values()) / n
        self.primal_series.append(r["step"], primal, r["t"])
        if r["update"] > 0:
            self.dual_series.append(r["step"], dual, r["t"])
        self.rho.update({k: v["rho"] for k, v in self.residuals.items()})

    def _on_phase(self, r: dict) -> None:
        if r["phase"] != "admm" and not r.get("skipped"):
            self.residuals, self.rho = {}, {}  # no ADMM state outside its phase: columns show "--"
        self.phase = r["phase"]
        self.phase_start[r["phase"]] = r["step"]
        self.epochs = r["epochs"]
        self.epoch = 0
        self.batch = 0
        if self.state == "starting":
            self.state = "running"
        self._note("phase", f"phase {r['phase']}" + (" skipped (0 epochs)" if r.get("skipped") else
                                                     f": {r['epochs']} epochs"), r["t"])

    def _on_log(self, r: dict) -> None:
        self._note(r["level"], r["message"], r["t"])

    def _on_allocation(self, r: dict) -> None:
        """The per-layer ratios the run fixed (at the ADMM phase's start): the layer table shows them at once."""
        chosen = r["layers"]
        self.layers = [{**L, "target": chosen[L["name"]]["ratio"], "target_pending": False} if L.get("name") in chosen
                       else L for L in self.layers]
        share = r["pruned"] / r["prunable"] if r["prunable"] else 0.0
        self._note("info", f"per-layer ratios fixed ({r['method']}): {r['pruned']:,} of {r['prunable']:,} prunable "
                           f"weights ({100 * share:.2f}%)", r["t"])

    def _on_pause(self, r: dict) -> None:
        self.state = "paused"
        self._note("command", f"paused at step {r['step']}", r["t"])

    def _on_resume(self, r: dict) -> None:
        self.state = "running"
        self._rate.clear()
        self._note("command", f"resumed at step {r['step']}", r["t"])

    def _on_set_rho(self, r: dict) -> None:
        if r.get("rho"):
            self.rho.update(r["rho"])
        what = f"x{r['value']:g}" if r.get("multiply") else f"= {r['value']:g}"
        where = r.get("layer") or "all layers"
        self._note("command", f"rho {what} for {where}" + (" (applies when ADMM starts)" if r.get("pending") else ""),
                   r["t"])

    def _on_eval_now(self, r: dict) -> None:
        self._note("command", f"evaluation requested at step {r['step']}", r["t"])

    def _on_checkpoint_now(self, r: dict) -> None:
        self._note("command", f"checkpoint requested at step {r['step']}", r["t"])

    def _on_stop(self, r: dict) -> None:
        self._note("command", f"stop requested at step {r['step']}", r["t"])

    def _on_checkpoint(self, r: dict) -> None:
        self._note("checkpoint", f"checkpoint ({r['reason']}) at step {r['step']}: {r['path']}", r["t"])

    def _on_export(self, r: dict) -> None:
        self._note("export", "exported: " + ", ".join(r.get("paths", [])), r["t"])

    def _on_finished(self, r: dict) -> None:
        self.state = "finished" if r["status"] == "completed" else "stopped"
        if r.get("summary"):
            self.summary = r["summary"]
        self._note("finished", f"run {r['status']}", r["t"])

    def _on_engine_status(self, r: dict) -> None:
        """From an attached dashboard: whether a process still holds the run's lock."""
        self.engine_running = bool(r.get("running"))
        if not self.engine_running and self.active:
            self.state = "not running"
            self._note("warning", f"no engine is running this run (its lock is free); resume it with: "
                                  f"{self.resume_command()}", r.get("t"))
        elif self.engine_running and self.state == "not running":
            self.state = "running"
            self._note("info", "an engine is running this run again", r.get("t"))

    def resume_command(self) -> str:
        ranks = f" --nproc {self.world_size}" if self.world_size > 1 else ""
        return f"robprune-tui --resume {self.run_dir or 'RUN_DIR'}{ranks}"

    def _on_distributed(self, r: dict) -> None:
        self.world_size = int(r["world_size"])

    def _on_error(self, r: dict) -> None:
        self.state = "error"
        self.error = r["message"]
        self._note("error", r["message"], r["t"])
        for line in r.get("traceback", "").rstrip().splitlines():
            self._note("traceback", line, r["t"])

    # ------------------------------------------------------------------ derived
    def window(self, view: str) -> dict:
        """The :meth:`History.view` bounds of an x range: ``run``, ``phase`` or ``recent``."""
        if view == "phase" and self.phase in self.phase_start:
            return {"x_min": self.phase_start[self.phase]}
        if view == "recent" and self.t_last:
            return {"t_min": self.t_last - RECENT_S}
        return {}

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "paused")

    def steps_per_s(self) -> float | None:
        if len(self._rate) < 2:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta(self) -> tuple[float | None, float | None]:
        """Seconds left in this phase and in the whole run (training steps only), at the recent step rate."""
        rate = self.steps_per_s()
        if rate is None or not self.batches or self.state not in ("running", "paused"):
            return None, None
        left_phase = max(self.epochs * self.batches - (self.epoch * self.batches + self.batch), 0)
        later = 0
        if self.phase in PHASES:
            for p in PHASES[PHASES.index(self.phase) + 1:]:
                later += self.phase_epochs.get(p, 0) * self.batches
        return left_phase / rate, (left_phase + later) / rate

    def sparsity(self) -> float | None:
        tot = sum(L["numel"] for L in self.layers)
        return sum(L["zeros"] for L in self.layers) / tot if tot else None


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "--"
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"
