"""A run in a background thread: the object the dashboard and the headless command line both drive.

    s = Session.new("profiles/mnist_quick.toml", ["admm.rho=0.01"])
    s.subscribe(print)          # any number of subscribers, each gets every event
    s.start()
    s.pause(); s.set_rho(0.02); s.resume(); s.eval_now(); s.checkpoint(); s.stop()
    s.join()

Commands go through a thread-safe queue and are applied by the engine at the next step boundary; each
applied command comes back as an event (and a line in events.jsonl).
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Sequence

from .config import Config, dump_toml, load_profile
from .control import Control
from .errors import UserError
from .events import Event, EventBus, Subscriber
from .pipeline import CHECKPOINT_FORMAT, Engine
from .rundir import RunDir, default_run_dir, safe_torch_load


class Session:
    def __init__(self, cfg: Config, rundir: RunDir, *, resume_state: dict | None = None) -> None:
        self.cfg = cfg
        self.rundir = rundir
        self.bus = EventBus()
        self.control = Control()
        self.engine = Engine(cfg, rundir, self.bus, self.control, resume_state=resume_state)
        self.bus.subscribe(rundir)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._created = False

    def prepare(self) -> None:
        """Load data and build the model on the calling thread, so bad input fails before any thread starts.

        A new run directory that fails here is removed again (it holds nothing but the profile)."""
        try:
            self.engine.setup()
        except UserError:
            self.rundir.close()
            if self._created:
                shutil.rmtree(self.rundir.path, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, profile: str | Path, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> "Session":
        """Validate the profile and create the run directory (nothing is loaded yet: see :meth:`prepare`)."""
        cfg = load_profile(profile, overrides)
        rd = RunDir(run_dir if run_dir is not None else default_run_dir(cfg.name))
        rd.create(dump_toml(cfg.to_dict()))
        rd.open_logs()
        s = cls(cfg, rd)
        s._created = True
        return s

    @classmethod
    def resume(cls, run_dir: str | Path) -> "Session":
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise UserError(f"{rd.path}: no such run directory")
        if not rd.profile.is_file():
            raise UserError(f"{rd.profile}: missing; {rd.path} is not a robprune run directory")
        cfg = load_profile(rd.profile)
        state = safe_torch_load(rd.checkpoint) if rd.checkpoint.exists() else None
        if state is None:
            raise UserError(f"{rd.checkpoint}: no checkpoint to resume from")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{rd.checkpoint}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'}"
                            f" is not the supported format {CHECKPOINT_FORMAT}")
        if state.get("profile") and state["profile"] != rd.profile.read_text(encoding="utf-8"):
            raise UserError(f"{rd.checkpoint}: written by a different profile than {rd.profile}")
        rd.truncate_metrics(state["metrics_lines"])  # records after the checkpoint will be written again
        rd.open_logs()
        return cls(cfg, rd, resume_state=state)

    # ------------------------------------------------------------------ events and commands
    def subscribe(self, fn: Subscriber):
        return self.bus.subscribe(fn)

    def pause(self) -> None:
        self.control.pause()

    def resume_run(self) -> None:
        self.control.resume()

    def set_rho(self, value: float, layer: str | None = None, multiply: bool = False) -> None:
        self.control.set_rho(value, layer, multiply)

    def eval_now(self) -> None:
        self.control.eval_now()

    def checkpoint(self) -> None:
        self.control.checkpoint()

    def stop(self) -> None:
        self.control.stop()

    # ------------------------------------------------------------------ thread
    @property
    def state(self) -> str:
        return self.engine.state

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._main, name="robprune-engine", daemon=True)
        self.thread.start()
        return self.thread

    def _main(self) -> None:
        try:
            self.engine.run()
        except BaseException as exc:  # already emitted as an error event; keep it for the caller
            self.error = exc
        finally:
            self.rundir.close()

    def run(self) -> dict | None:
        """Run on the calling thread (blocking)."""
        try:
            return self.engine.run()
        finally:
            self.rundir.close()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine (if still running) and wait for its thread."""
        if self.alive:
            self.control.stop()
            self.join(timeout)
