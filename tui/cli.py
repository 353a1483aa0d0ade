"""The ``robprune`` command line (typer): run, eval, export.

Bad input (a profile, a --set value, a run directory, a missing data set) prints one line naming the file,
the key and what was expected, and exits with code 2 — no traceback.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from engine.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Concurrent adversarial training and ADMM pruning (Ye et al., ICCV 2019).")
err = Console(stderr=True)
out = Console()


def fail(exc: BaseException) -> None:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    err.print(f"robprune: error: {msg}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    profile: Optional[Path] = typer.Argument(None, help="Profile TOML (e.g. profiles/mnist_quick.toml)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME-TIMESTAMP)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a profile key: --set attack.train.steps=10."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue RUN_DIR from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the three-phase pipeline headless, with a progress bar and a final table."""
    from engine.session import Session
    from tui.headless import HeadlessPrinter, summary_table

    try:
        if resume is not None:
            if profile is not None or overrides:
                raise UserError("--resume takes the profile from the run directory; give no PROFILE or --set")
            session = Session.resume(resume)
        elif profile is None:
            raise UserError("missing PROFILE (e.g. robprune run profiles/mnist_quick.toml)")
        else:
            session = Session.new(profile, overrides, run_dir)
        session.prepare()
    except UserError as exc:
        fail(exc)
    err.print(f"run directory: {session.rundir.path}", highlight=False)
    printer = HeadlessPrinter(err, quiet=quiet)
    session.subscribe(printer)
    interrupts = 0

    def on_signal(signum, frame):  # SIGTERM / SIGHUP: stop at the next step boundary with a checkpoint
        session.stop()

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, on_signal)
    with printer:
        session.start()
        while session.alive:
            try:
                session.join(0.2)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    err.print("stopping at the next step with a checkpoint (Ctrl-C again to stop at once)")
                    session.stop()
                else:
                    raise SystemExit(130)
    if session.error is not None:
        if isinstance(session.error, UserError):
            fail(session.error)
        err.print(f"robprune: error: {type(session.error).__name__}: {session.error} "
                  f"(traceback in {session.rundir.events})", markup=False, highlight=False)
        raise typer.Exit(1)
    if session.engine.state == "stopped":
        err.print(f"stopped; resume with: robprune run --resume {session.rundir.path}")
        raise typer.Exit(130 if interrupts else 0)
    out.print(summary_table(session.engine.summary))
    out.print(f"summary: {session.rundir.path / 'summary.md'}")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="PGD steps (default: the profile's)."),
    restarts: Optional[int] = typer.Option(None, "--restarts", min=1, help="PGD restarts (default: the profile's)."),
    eps: Optional[float] = typer.Option(None, "--eps", min=0.0, max=1.0, help="L-inf radius (default: the profile's)."),
    subset: int = typer.Option(0, "--subset", min=0, help="Evaluate the first N test examples (0 = all)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Evaluate a finished run: natural and PGD accuracy, printed as JSON and appended to events.jsonl."""
    import torch

    from engine import api, data
    from engine.attacks import evaluate
    from engine.rundir import RunDir

    try:
        cfg = api.load_config(run_dir)
        model = api.load_model(run_dir, device)
        x, y = api.load_test_set(run_dir, device)
    except UserError as exc:
        fail(exc)
    x, y = data.eval_subset(x, y, subset)
    ea = cfg.attack.eval
    settings = {"kind": ea.kind, "eps": eps if eps is not None else ea.eps, "step_size": ea.step_size,
                "steps": steps or ea.steps, "restarts": restarts or ea.restarts}
    torch.manual_seed(cfg.run.seed + 1)
    nat, adv = evaluate(model, x, y, batch_size=cfg.data.test_batch_size, **settings)
    result = {"type": "eval_cli", "nat_acc": nat, "adv_acc": adv, "n": len(x), "attack": settings}
    RunDir(run_dir).append_event(result)
    out.print_json(json.dumps(result))


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A run directory (finished, or with a checkpoint).")) -> None:
    """Write summary.json, summary.md and metrics.csv into the run directory."""
    from engine.summary import export_run

    try:
        paths = export_run(run_dir)
    except UserError as exc:
        fail(exc)
    for p in paths:
        out.print(str(p), highlight=False)


def main() -> None:
    try:
        app()
    except UserError as exc:  # pragma: no cover - commands catch their own; this is the last net
        err.print(f"robprune: error: {exc}", markup=False, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
