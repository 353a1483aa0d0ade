"""Where the dashboard's records come from and where its commands go.

- :class:`SessionBackend`: an engine in this process (a :class:`robprune.engine.session.Session` on its thread);
  records are the engine's events as dicts, commands go through its thread-safe queue.
- :class:`AttachBackend`: a run started elsewhere (``robprune run`` under nohup or tmux). Records are read
  by following the run directory's ``metrics.jsonl`` and ``events.jsonl``; commands are appended to its
  ``commands.jsonl``, which the engine polls at step boundaries.

Both call ``post(record)`` from a background thread; the app turns that into a thread-safe message.
"""
from __future__ import annotations

import threading
import time
import tomllib
from pathlib import Path
from typing import Callable

from robprune.engine.config import PHASES
from robprune.engine.control import Command, send_to_run_dir
from robprune.engine.errors import UserError
from robprune.engine.rundir import JsonlTail, RunDir

Post = Callable[[dict], None]


def damaged_lines(tails: list[JsonlTail]) -> list[dict]:
    """A warning record for each damaged line the followers skipped since the last call."""
    out = []
    for f in tails:
        out += [{"type": "log", "t": time.time(), "level": "warning", "message": m} for m in f.skipped]
        f.skipped.clear()
    return out


class Backend:
    name = ""
    profile = ""
    device = ""
    run_dir: Path
    phase_epochs: dict[str, int] = {}
    owns_run = False  # quitting stops the run only when the run lives in this process
    layer_names: list[str] = []

    def start(self, post: Post) -> None:
        raise NotImplementedError

    def send(self, cmd: Command) -> None:
        raise NotImplementedError

    def shutdown(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError


class SessionBackend(Backend):
    owns_run = True

    def __init__(self, session) -> None:
        self.session = session
        cfg = session.cfg
        self.name, self.profile = cfg.name, cfg.source
        self.run_dir = session.rundir.path
        self.device = str(getattr(session.engine, "device", cfg.run.device))
        monitor = getattr(session.engine, "resources", None)
        if monitor is not None and self.device.startswith("cuda"):
            self.device += f" ({monitor.device_name()})"
        self.phase_epochs = {p: getattr(cfg.phases, p).epochs for p in PHASES}
        self.layer_names = list(getattr(session.engine, "params", {}) or [])
        self._unsub = None

    def start(self, post: Post) -> None:
        if self.session.thread is None and self.session.engine.resume_state is not None:
            # a resumed run: show its history first (the engine has not started, so nothing interleaves)
            tails = [JsonlTail(self.run_dir / name) for name in ("metrics.jsonl", "events.jsonl")]
            recs = [r for f in tails for r in f.read()]
            for r in sorted(recs, key=lambda r: r.get("t", 0.0)) + damaged_lines(tails):
                post(r)
        self._unsub = self.session.subscribe(lambda e: post(e.to_dict()))
        if not self.session.alive and self.session.thread is None:
            self.session.start()

    def send(self, cmd: Command) -> None:
        self.session.send(cmd)

    @property
    def alive(self) -> bool:
        return self.session.alive

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the engine (it checkpoints first) and wait for its thread; release a paused engine too."""
        if self.session.alive:
            self.session.stop()
            self.session.join(timeout)
        if self._unsub is not None:
            self._unsub()
            self._unsub = None


class AttachBackend(Backend):
    owns_run = False

    def __init__(self, run_dir: str | Path, poll_s: float = 0.25, liveness_s: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        prof = self.run_dir / "profile.toml"
        if not prof.is_file():
            raise UserError(f"{prof}: missing; {self.run_dir} is not a robprune run directory")
        try:
            cfg = tomllib.loads(prof.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{prof}: unreadable ({exc})") from None
        self.name = cfg.get("run", {}).get("name") or self.run_dir.name
        self.profile = str(prof)
        self.device = f"{cfg.get('run', {}).get('device', '?')} (attached)"
        phases = cfg.get("phases", {})
        self.phase_epochs = {p: int(phases.get(p, {}).get("epochs", 0)) for p in PHASES}
        self.poll_s = poll_s
        self.liveness_s = liveness_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files = [JsonlTail(self.run_dir / "metrics.jsonl"), JsonlTail(self.run_dir / "events.jsonl")]

    def start(self, post: Post) -> None:
        rundir = RunDir(self.run_dir)

        def loop() -> None:
            running, checked = None, 0.0
            while not self._stop.is_set():
                recs = [r for f in self._files for r in f.read()]
                recs.sort(key=lambda r: r.get("t", 0.0))
                recs += damaged_lines(self._files)
                for r in recs:
                    if r.get("type") == "layers" and not self.layer_names:
                        self.layer_names = [L["name"] for L in r["layers"]]
                    post(r)
                if time.monotonic() - checked >= self.liveness_s:  # is an engine still running this run?
                    checked = time.monotonic()
                    now = rundir.engine_running()
                    if now != running:
                        running = now
                        post({"type": "engine_status", "t": time.time(), "running": now})
                self._stop.wait(self.poll_s)

        self._thread = threading.Thread(target=loop, name="robprune-attach", daemon=True)
        self._thread.start()

    def send(self, cmd: Command) -> None:
        send_to_run_dir(self.run_dir, cmd)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop following; the run itself goes on."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
