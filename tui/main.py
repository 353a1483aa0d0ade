"""``robprune-tui``: open the dashboard on a new run, a resumed run, or a run started elsewhere."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from robprune.engine.errors import UserError
from robprune.tui.cli import fail, version_option

app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def tui(
    profile: Optional[Path] = typer.Argument(None, help="Profile to start a run with: a TOML file, or a built-in "
                                                        "profile's name (`robprune profiles` lists them)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME-TIMESTAMP)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a profile key: --set admm.rho=0.01."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue RUN_DIR from its last checkpoint."),
    attach: Optional[Path] = typer.Option(None, "--attach", help="Follow a run started elsewhere in RUN_DIR."),
    refresh_hz: float = typer.Option(4.0, "--refresh-hz", min=0.2, max=30.0, help="Redraws per second."),
    low_refresh: bool = typer.Option(False, "--low-refresh", help="1 redraw per second, for slow links."),
    ansi: bool = typer.Option(False, "--ansi", help="Use the terminal's 16 ANSI colours."),
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
    result = RobpruneApp(backend, refresh_hz=1.0 if low_refresh else refresh_hz, ansi=ansi).run()
    backend.shutdown()
    typer.echo(f"run directory: {backend.run_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
