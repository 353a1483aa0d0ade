"""``robprune-tui``: open the dashboard on a new run, a resumed run, or a run started elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from robprune.engine.errors import UserError
from robprune.tui.cli import (fail, profile_argument, resume_option, run_dir_option, set_option,
                              version_option)

app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def tui(
    profile: Optional[Path] = profile_argument(),
    run_dir: Optional[Path] = run_dir_option(),
    overrides: List[str] = set_option(),
    resume: Optional[Path] = resume_option(),
    attach: Optional[Path] = typer.Option(None, "--attach", help="Follow a run started elsewhere in RUN_DIR."),
    detach: bool = typer.Option(False, "--detach", help="Start the run (PROFILE or --resume) as a background "
                                "process that outlives this terminal, its output in RUN_DIR/output.log, and attach "
                                "to it: quitting or losing the dashboard leaves it running."),
    refresh_hz: float = typer.Option(4.0, "--refresh-hz", min=0.2, max=30.0, help="Redraws per second."),
    low_refresh: bool = typer.Option(False, "--low-refresh", help="1 redraw per second, for slow links."),
    ansi: bool = typer.Option(False, "--ansi", help="Use the terminal's 16 ANSI colours."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=4096,
                              help="Start the run (PROFILE or --resume) as NPROC data-parallel ranks in the "
                                   "background (as --detach) and show it; q leaves it running."),
    version: bool = version_option("robprune-tui"),
) -> None:
    """Watch, steer and export a robprune run: p pause, r rho, e eval, c checkpoint, x export, q quit, ? help."""
    from robprune.engine.session import Session
    from robprune.tui.app import RobpruneApp
    from robprune.tui.backend import AttachBackend, SessionBackend

    try:
        chosen = sum(x is not None for x in (profile, resume, attach))
        if chosen != 1:
            raise UserError("give exactly one of PROFILE, --resume RUN_DIR or --attach RUN_DIR")
        if (resume or attach) and (overrides or run_dir):
            raise UserError("--set and --run-dir only go with a PROFILE (a resumed or attached run keeps its own)")
        if (detach or nproc > 1) and attach is not None:
            raise UserError("--detach and --nproc start a run (PROFILE or --resume); --attach follows one that is "
                            "running")
        detach = detach or nproc > 1  # the ranks are processes of their own: the dashboard attaches to rank 0's
        if detach:
            attach = start_detached(profile, overrides, run_dir, resume, nproc=nproc)
        if attach is not None:
            backend = AttachBackend(attach)
        else:
            # with a person watching, a diverging loss pauses the run (and says so) instead of ending it
            session = (Session.resume(resume, on_nonfinite="pause") if resume is not None
                       else Session.new(profile, overrides, run_dir, on_nonfinite="pause"))
            session.prepare()
            backend = SessionBackend(session)
    except UserError as exc:
        fail(exc)
    app_ = RobpruneApp(backend, refresh_hz=1.0 if low_refresh else refresh_hz, ansi=ansi)
    app_.run()
    if app_.crashed and not app_.user_quit and backend.owns_run and backend.alive:
        _continue_headless(backend, app_._exception)
    backend.shutdown()
    typer.echo(f"run directory: {backend.run_dir}")
    if detach:
        from robprune.engine.rundir import RunDir

        if RunDir(backend.run_dir).engine_running():
            typer.echo(f"the run goes on in the background; attach again: robprune-tui --attach {backend.run_dir}; "
                       f"stop it with a checkpoint: kill -TERM $(head -1 {backend.run_dir / '.lock'})")


def start_detached(profile, overrides, run_dir, resume, timeout_s: float = 600.0, *, nproc: int = 1) -> Path:
    """Start ``robprune run`` (with ``--nproc`` ranks) in a session of its own (no terminal: a hang-up never
    reaches it), its output going to RUN_DIR/output.log once the run directory exists; return the run directory
    when its engine (rank 0's) holds the lock. Bad input fails here, with the run's own one-line error."""
    import subprocess
    import sys
    import time

    from robprune.engine.config import load_profile
    from robprune.engine.rundir import RunDir, default_run_dir
    from robprune.tui.cli import OUTPUT_LOG

    if resume is not None:
        rd, args = Path(resume), ["--resume", str(resume)]
    else:
        cfg = load_profile(profile, overrides)
        rd = Path(run_dir) if run_dir is not None else default_run_dir(cfg.name)
        args = [str(profile), "--run-dir", str(rd), *[a for o in overrides for a in ("--set", o)]]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    proc = subprocess.Popen([sys.executable, "-m", "robprune", "run", *args, "-q", "--output-log"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.monotonic()
    while not ((rd / OUTPUT_LOG).exists() and RunDir(rd).engine_running()):
        if proc.poll() is not None:
            lines = [ln for ln in proc.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"exit code {proc.returncode}"
            raise UserError(msg.removeprefix("robprune: error: ") + f" (the background run did not start)")
        if time.monotonic() - t0 > timeout_s:
            raise UserError(f"{rd}: the background run (pid {proc.pid}) did not start within {timeout_s:.0f} s")
        time.sleep(0.1)
    proc.stderr.close()  # its output goes to the run directory from here on
    return rd


def _continue_headless(backend, exc: BaseException) -> None:
    """The dashboard failed while its engine was training: the run goes on in this process without a screen.
    The failure goes to events.jsonl (with its traceback); Ctrl-C, SIGTERM and SIGHUP stop the run with a
    checkpoint as in ``robprune run``; the exit code is that of the run (1 if the engine failed)."""
    import traceback

    from robprune.tui.cli import _detach_from_terminal, _install_signal_handlers, _say

    session = backend.session
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        session.rundir.append_event({"type": "log", "level": "error", "message": f"dashboard failed: "
                                     f"{type(exc).__name__}: {exc}; training goes on headless", "traceback": tb})
    except OSError:
        pass
    _say(f"robprune-tui: the dashboard failed ({type(exc).__name__}: {exc}); training goes on without it.\n"
         f"  run directory: {backend.run_dir}\n"
         f"  watch it from another terminal: robprune-tui --attach {backend.run_dir}\n"
         "  Ctrl-C stops the run with a checkpoint.")
    _install_signal_handlers(session.stop, lambda signum, frame: session.stop())
    try:
        while session.alive:
            session.join(0.5)
    except OSError:
        _detach_from_terminal(always=True)
        session.join()
    if session.error is not None:
        _say(f"robprune-tui: the run failed: {type(session.error).__name__}: {session.error}")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
