"""A run in a background thread: the object the dashboard and the headless command line both drive.

    s = Session.new("profiles/mnist_quick.toml", ["admm.rho=0.01"])
    s.subscribe(print)          # any number of subscribers, each gets every event
    s.start()
    s.send(Pause()); s.send(SetRho(0.02)); s.send(Resume()); s.send(EvalNow()); s.send(CheckpointNow())
    s.stop()
    s.join()

Commands go through a thread-safe queue and are applied by the engine at the next step boundary; each
applied command comes back as an event (and a line in events.jsonl).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

from . import distributed as dist_mod
from .config import Config, dump_toml, load_profile, load_profile_text, profile_change
from .control import COMMAND_FILE, Command, Control
from .errors import UserError
from .events import DistributedStart, Event, EventBus, Subscriber
from .pipeline import CHECKPOINT_FORMAT, Engine
from .resources import check_fits
from .rundir import FORMAT_VERSION, RunDir, default_run_dir, read_run_file, safe_torch_load


class Session:
    def __init__(self, cfg: Config, rundir: RunDir, *, resume_state: dict | None = None,
                 on_nonfinite: str = "stop", dist: dist_mod.DistContext | None = None) -> None:
        """``on_nonfinite``: "stop" (headless) or "pause" (a dashboard is attached): see :class:`Engine`.
        ``dist``: this process's rank in a data-parallel run; only rank 0 records to the run directory and reads
        its command file (see :meth:`for_rank`)."""
        self.cfg = cfg
        self.rundir = rundir
        self.dist = dist
        self.bus = EventBus()
        self.control = Control()
        self.engine = Engine(cfg, rundir, self.bus, self.control, resume_state=resume_state,
                             on_nonfinite=on_nonfinite, dist=dist)
        if dist is None or dist.writer:
            self.bus.subscribe(rundir)
            self.control.watch_file(rundir.path / COMMAND_FILE)  # commands from an attached dashboard
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
                self.rundir.remove_created()
            raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_rank(cls, dist: dist_mod.DistContext, profile: str | Path | None, overrides: Sequence[str] = (),
                 run_dir: str | Path | None = None, resume: str | Path | None = None) -> "Session":
        """This rank's session of a data-parallel run, set up on every rank (the process group is joined here).

        Rank 0 checks the input and makes (or opens, locks and reads) the run directory exactly as one process
        would, and hands the others the profile and the checkpoint: they need no access to the run directory
        (another machine's disk). Every rank then loads its data and builds its model; a failure on any rank
        (bad input) ends every rank, rank 0 reporting it. Then DDP wraps the model."""
        # the device and the timeout of the process group come from the profile; only rank 0's copy must exist
        # (the others may be on machines without the run directory) and rank 0 reports a bad one, once joined
        cfg, early = None, None
        try:
            cfg = load_profile(rd_profile(resume)) if resume is not None else load_profile(profile, overrides)
        except UserError as exc:
            early = exc
        dist.init(dist_mod.device_type(cfg.run.device if cfg is not None else "auto"),
                  cfg.run.dist_timeout_s if cfg is not None else 600.0)
        outcome: dict = {"ok": False, "error": ""}
        session = None
        if dist.writer:
            try:
                if early is not None:
                    raise early
                session = (cls.resume(resume, dist=dist) if resume is not None
                           else cls.new(profile, overrides, run_dir, dist=dist))
                outcome = {"ok": True, "profile": session.rundir.profile.read_text(encoding="utf-8"),
                           "source": str(session.rundir.profile), "run_dir": str(session.rundir.path),
                           "state": session.engine.resume_state}
            except UserError as exc:
                outcome = {"ok": False, "error": str(exc)}
                dist.broadcast(outcome)
                raise
        outcome = dist.broadcast(outcome)
        if not outcome["ok"]:
            raise dist_mod.AgreedExit(2)
        if session is None:
            cfg = load_profile_text(outcome["profile"], outcome["source"])
            session = cls(cfg, RunDir(outcome["run_dir"]), resume_state=outcome["state"], dist=dist)
        # every rank loads its data (the first rank of each machine first when it may download) and its model
        first = dist.local_rank == 0 or not session.cfg.data.download
        error = None
        for turn in (True, False):
            if turn == first:
                try:
                    session.engine.setup()
                except UserError as exc:
                    error = str(exc)
            if session.cfg.data.download:
                dist.barrier()
        errors = dist.all_gather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            if dist.writer:
                session.rundir.close()
                if session._created:
                    session.rundir.remove_created()
                rank, msg = failed[0]
                raise UserError(msg if rank == 0 else f"rank {rank}: {msg}")
            raise dist_mod.AgreedExit(2)
        session.engine.setup_parallel()
        dist.info = dist.all_gather(dist_mod.rank_info(session.engine.device))
        session.engine.log("info", f"data-parallel run: {dist.describe()}, global batch {session.cfg.data.batch_size}: "
                                   + "; ".join(f"rank {r} pid {i['pid']} on {i['host']} {i['device']}"
                                               for r, i in enumerate(dist.info)))
        session.bus.emit(DistributedStart(world_size=dist.world, backend=dist.backend, ranks=dist.info))
        return session

    @classmethod
    def new(cls, profile: str | Path, overrides: Sequence[str] = (), run_dir: str | Path | None = None,
            *, on_nonfinite: str = "stop", dist: dist_mod.DistContext | None = None) -> "Session":
        """Validate the profile and create the run directory (nothing is loaded yet: see :meth:`prepare`).

        The run directory is locked for this process until the run ends (see :meth:`RunDir.acquire`)."""
        cfg = load_profile(profile, overrides)
        check_fits(cfg)  # a model or data set that cannot fit is refused before anything is made
        rd = RunDir(run_dir if run_dir is not None else default_run_dir(cfg.name))
        rd.create(dump_toml(cfg.to_dict()))
        rd.acquire()
        rd.open_logs()
        s = cls(cfg, rd, on_nonfinite=on_nonfinite, dist=dist)
        s._created = True
        return s

    @classmethod
    def resume(cls, run_dir: str | Path, *, on_nonfinite: str = "stop",
               dist: dist_mod.DistContext | None = None) -> "Session":
        """Continue a run from its last checkpoint. Everything is checked before anything is changed: a run
        directory that is not one, is in use, has another format, an edited profile or a damaged checkpoint
        raises a one-line UserError and is left as it was."""
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise UserError(f"{rd.path}: no such run directory: expected a directory made by robprune run")
        if not rd.profile.is_file():
            raise UserError(f"{rd.profile}: missing; {rd.path} is not a robprune run directory")
        _check_meta(rd)
        cfg = load_profile(rd.profile)
        rd.acquire()
        try:
            if not rd.checkpoint.exists():
                if rd.best.is_file():
                    raise UserError(f"{rd.checkpoint}: missing, but {rd.best.name} holds a checkpoint of an earlier "
                                    f"evaluation: copy it to {rd.checkpoint.name} and resume again")
                raise UserError(f"{rd.checkpoint}: no checkpoint to resume from: the run stopped before its first "
                                f"checkpoint; start it again with another --run-dir (or --run-dir {rd.path} once "
                                "you have emptied it: it holds only the profile and the first records)")
            hint = (f"{rd.best.name} holds an earlier state (copy it over {rd.checkpoint.name} to resume from it)"
                    if rd.best.is_file() else "")
            state = safe_torch_load(rd.checkpoint, hint=hint)
            fmt = state.get("format") if isinstance(state, dict) else None
            if fmt is None:
                raise UserError(f"{rd.checkpoint}: not a robprune checkpoint (no format field): expected the "
                                "checkpoint.pt robprune writes")
            if fmt != CHECKPOINT_FORMAT:
                raise UserError(f"{rd.checkpoint}: checkpoint format {fmt!r}, expected {CHECKPOINT_FORMAT}: written by "
                                f"another version of robprune; resume it with that version")
            _check_same_profile(rd, state.get("profile") or "")
            rd.remove_stale_temp_files()  # left by an atomic write a kill interrupted
            rd.truncate_metrics(state["metrics_lines"])  # records after the checkpoint will be written again
            rd.open_logs()
        except BaseException:
            rd.release()
            raise
        return cls(cfg, rd, resume_state=state, on_nonfinite=on_nonfinite, dist=dist)

    # ------------------------------------------------------------------ events and commands
    def subscribe(self, fn: Subscriber):
        return self.bus.subscribe(fn)

    def send(self, cmd: Command) -> None:
        """Queue a command (:mod:`robprune.engine.control`); the engine applies it at the next step boundary."""
        self.control.send(cmd)

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


def _check_meta(rd: RunDir) -> None:
    """A run directory written by another format version of robprune is refused before anything is read."""
    if not rd.meta.exists():
        return
    try:
        meta = json.loads(read_run_file(rd.meta).decode("utf-8"))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{rd.meta}: not readable JSON ({type(exc).__name__}): expected the meta.json robprune "
                        f"writes; {rd.path} is damaged") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT_VERSION:
        by = meta.get("robprune", "?") if isinstance(meta, dict) else "?"
        raise UserError(f"{rd.meta}: run directory format {fmt!r} (written by robprune {by}), expected format "
                        f"{FORMAT_VERSION}: use the robprune version that wrote it")


def _check_same_profile(rd: RunDir, saved: str) -> None:
    """The profile.toml of a run directory must still say what the checkpoint was trained with."""
    if not saved:
        return
    change = profile_change(saved, rd.profile.read_text(encoding="utf-8"))
    if change is None:
        return  # the same text, or reformatted with the same values
    raise UserError(f"{rd.profile}: changed after the checkpoint was written ({change}): a run resumes with the "
                    f"profile it started with; undo the edit, or start a new run (--set run.init={rd.checkpoint} "
                    f"starts from its weights)")


def rd_profile(run_dir: str | Path) -> Path:
    """The profile of a run directory to resume (checked in full by :meth:`Session.resume`)."""
    p = RunDir(run_dir).profile
    if not p.is_file():
        raise UserError(f"{p}: missing; {run_dir} is not a robprune run directory")
    return p
