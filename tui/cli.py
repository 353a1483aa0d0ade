"""The ``robprune`` command line (typer): run, eval, export.

Bad input (a profile, a --set value, a run directory, a missing data set) prints one line naming the file,
the key and what was expected, and exits with code 2 — no traceback.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console

from robprune.engine.errors import UserError

# rich_markup_mode=None: click's formatter, which joins a docstring's lines into paragraphs and wraps them to the
# terminal (rich's keeps the docstring's hard line breaks); completion: `robprune --install-completion`
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Concurrent adversarial training and ADMM pruning (Ye et al., ICCV 2019).")
err = Console(stderr=True)
out = Console()


def version_option(prog: str):
    """A ``--version`` option for ``prog`` (eager: it prints and exits before anything else is checked)."""
    def show(value: bool) -> None:
        if value:
            from robprune import __version__

            typer.echo(f"{prog} {__version__}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Print the version and exit.")


@app.callback()
def _root(version: bool = version_option("robprune")) -> None:
    """Concurrent adversarial training and ADMM pruning (Ye et al., ICCV 2019)."""


def fail(exc: BaseException) -> None:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    err.print(f"robprune: error: {msg}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)


# the options robprune run and robprune-tui share
def profile_argument():
    return typer.Argument(None, help="Profile: a TOML file, or a built-in profile's name (mnist_quick; "
                                     "`robprune profiles` lists them).")


def run_dir_option():
    return typer.Option(None, "--run-dir", help="Run directory (default runs/NAME-TIMESTAMP).")


def set_option():
    return typer.Option([], "--set", help="Override a profile key: --set admm.rho=0.01 (repeatable).")


def resume_option():
    return typer.Option(None, "--resume", help="Continue RUN_DIR from its last checkpoint.")


OUTPUT_LOG = "output.log"


@app.command()
def run(
    profile: Optional[Path] = profile_argument(),
    run_dir: Optional[Path] = run_dir_option(),
    overrides: List[str] = set_option(),
    resume: Optional[Path] = resume_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines: stderr gets errors only."),
    output_log: bool = typer.Option(False, "--output-log", hidden=True,
                                    help="Once the run directory exists, send stdout and stderr to its output.log "
                                         "(robprune-tui --detach starts runs so)."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=4096,
                              help="Data-parallel ranks on this machine (one per GPU; gloo processes on a CPU), "
                                   "started through torch.distributed.run; data.batch_size stays the global batch. "
                                   "Several machines: torchrun ... -m robprune run (docs/distributed.md)."),
) -> None:
    """Run the three-phase pipeline headless, with a progress bar and a final table.

    Exit codes: 0 completed, or stopped by SIGTERM / SIGHUP (with a checkpoint: resume it); 130 stopped by
    Ctrl-C (the first with a checkpoint, a second at once); 2 bad input; 3 the run diverged (a non-finite loss
    or weight: the last good checkpoint is kept); 4 a data-parallel rank was lost (the others stop without a
    checkpoint: resume from the last one); 1 any other error (traceback in events.jsonl).
    """
    from robprune.engine import distributed as dist_mod
    from robprune.tui.headless import HeadlessPrinter

    dist = None
    try:
        if resume is not None:
            if profile is not None or overrides:
                raise UserError(f"--resume {resume}: the profile comes from the run directory: give no PROFILE or --set")
        elif profile is None:
            raise UserError("missing PROFILE (e.g. robprune run profiles/mnist_quick.toml)")
        dist = dist_mod.DistContext.from_env()
        if profile is not None and dist is None:  # (a rank: rank 0 checks it, see Session.for_rank)
            from robprune.engine.config import load_profile

            cfg = load_profile(profile, overrides)  # a bad profile fails at once, before a run directory is made
        if nproc > 1:
            if dist is not None:
                raise UserError(f"--nproc {nproc}: this process is already rank {dist.rank} of {dist.world} "
                                "(torchrun starts the ranks): give --nproc or use torchrun, not both")
            _launch(nproc, profile, overrides, run_dir, resume, quiet, output_log,
                    cfg if resume is None else None)
        from robprune.engine.session import Session

        if dist is not None:
            session = Session.for_rank(dist, profile, overrides, run_dir, resume)
            quiet = quiet or not dist.writer
        else:
            session = Session.resume(resume) if resume is not None else Session.new(profile, overrides, run_dir)
            session.prepare()
        if output_log:
            _output_to(session.rundir.path / OUTPUT_LOG if dist is None or dist.writer else None)
    except UserError as exc:
        if dist is not None:
            _say(f"robprune: error: {str(exc).splitlines()[0]}")
            dist_mod.exit_rank(dist, None, 2)
        fail(exc)
    except (dist_mod.AgreedExit, dist_mod.RankLost) as exc:  # rank 0 reported the reason (or it is gone)
        if isinstance(exc, dist_mod.RankLost):
            _say(f"robprune: error: {exc}")
        dist_mod.exit_rank(dist, None, exc.exit_code)
    if not quiet:
        err.print(f"run directory: {session.rundir.path}", highlight=False)
    printer = HeadlessPrinter(err, quiet=quiet)
    session.subscribe(printer)
    interrupts = 0

    def on_interrupt(signum, frame):  # Ctrl-C: the first stops with a checkpoint, a second at once
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            session.stop()
            _say("stopping at the next step with a checkpoint (Ctrl-C again to stop at once)")
        else:
            _stop_at_once(session.rundir.path)

    _install_signal_handlers(session.stop, on_interrupt)
    try:
        with printer:
            session.start()
            while session.alive:
                session.join(0.2)
    except OSError:  # the terminal or the pipe we print to went away: the run goes on, its records are on disk
        _detach_from_terminal(always=True)
        session.join()
    if dist is None:
        _end_of_run(session, None, interrupts)
        return
    if not isinstance(session.error, dist_mod.RankLost):
        try:  # wait for the others (rank 0 may still be writing); nothing to wait for when a rank is gone
            dist.barrier()
        except dist_mod.RankLost:
            pass
    try:
        _end_of_run(session, dist, interrupts)
        code = 0
    except typer.Exit as ex:
        code = ex.exit_code
    dist_mod.exit_rank(dist, session.engine, code)


def _end_of_run(session, dist, interrupts: int) -> None:
    """What ``robprune run`` says when its run has ended, and its exit code (typer.Exit)."""
    from robprune.engine import distributed as dist_mod
    from robprune.engine.errors import NonFiniteError
    from robprune.tui.headless import summary_table

    e = session.error
    if e is not None:
        if isinstance(e, UserError):
            fail(e)
        if isinstance(e, (NonFiniteError, dist_mod.RankLost, dist_mod.RanksDiverged)):
            _say(f"robprune: error: {e}")
            raise typer.Exit(e.exit_code)
        _say(f"robprune: error: {type(e).__name__}: {e} (traceback in {session.rundir.events})")
        raise typer.Exit(1)
    if session.engine.state == "stopped":
        if dist is None or dist.writer:
            _say(f"stopped; resume with: robprune run --resume {session.rundir.path}"
                 + (f" --nproc {dist.world}" if dist is not None else ""))
        raise typer.Exit(130 if interrupts else 0)
    if dist is not None and not dist.writer:
        return
    out.print(summary_table(session.engine.summary))
    out.print(f"summary: {session.rundir.path / 'summary.md'}")


def _launch(nproc, profile, overrides, run_dir, resume, quiet, output_log, cfg) -> None:
    """``robprune run --nproc N``: start the ranks (each ``robprune run`` with the same arguments) and exit with
    the run's code. The run directory is chosen here, so every rank, and SIGTERM's forwarding, know it."""
    import torch

    from robprune.engine.config import load_profile
    from robprune.engine.distributed import device_type, launch
    from robprune.engine.rundir import default_run_dir
    from robprune.engine.session import rd_profile

    if cfg is None:
        cfg = load_profile(rd_profile(resume))
    gpus = torch.cuda.device_count()
    if device_type(cfg.run.device) == "cuda" and nproc > gpus:
        raise UserError(f"--nproc {nproc}: this machine has {gpus} CUDA device(s), and each rank needs its own: "
                        f"give --nproc {gpus} or less (several machines: torchrun, docs/distributed.md)")
    if resume is not None:
        rd, args = Path(resume), ["--resume", str(resume)]
    else:
        rd = Path(run_dir) if run_dir is not None else default_run_dir(cfg.name)
        args = [str(profile), "--run-dir", str(rd), *[a for o in overrides for a in ("--set", o)]]
    args = ["-m", "robprune", "run", *args, *(["-q"] if quiet else []), *(["--output-log"] if output_log else [])]
    if not quiet:
        threads = os.environ.get("OMP_NUM_THREADS")
        _say(f"starting {nproc} ranks through torch.distributed.run; CPU threads per rank: "
             + (f"{threads} (OMP_NUM_THREADS)" if threads else "1 (torchrun's default; set OMP_NUM_THREADS or "
                                                             "run.threads for more)"))
    raise typer.Exit(launch(nproc, args, say=_say, run_dir=str(rd)))


def _output_to(path: Path | None) -> None:
    """Send this process's stdout and stderr to ``path`` (the run directory's output.log: appended, by
    open_append's rules), or to the null device when None (the ranks that do not write)."""
    from robprune.engine.rundir import open_append

    fd = open_append(path) if path is not None else os.open(os.devnull, os.O_WRONLY)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def _say(msg: str) -> None:
    """One plain line on stderr; never fails (the terminal may be gone after SIGHUP)."""
    try:
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
    except OSError:
        pass


def _install_signal_handlers(stop, on_interrupt) -> None:
    """SIGINT calls ``on_interrupt``; SIGTERM and SIGHUP call ``stop`` (the run stops at the next step boundary
    with a checkpoint), a hang-up after detaching from the terminal that went away. A SIGHUP that is ignored
    when we start (``nohup robprune run ...``) stays ignored: the run outlives the terminal."""
    def on_stop_signal(signum, frame):
        if signum == getattr(signal, "SIGHUP", None):
            _detach_from_terminal()
        stop()

    signal.signal(signal.SIGINT, on_interrupt)
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        if sig != signal.SIGTERM and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under nohup: a hang-up must not stop the run
        signal.signal(sig, on_stop_signal)


def _detach_from_terminal(always: bool = False) -> None:
    """After SIGHUP (a dropped SSH session) the terminal is gone and writing to it fails: point stdout and
    stderr at /dev/null (terminals only, unless ``always``), so the run can still checkpoint and exit cleanly."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            if always or stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _stop_at_once(run_dir: Path) -> None:
    """The second Ctrl-C: exit now. Checkpoints are written atomically, so the last one is intact."""
    msg = f"\nrobprune: stopped at once; resume from the last checkpoint with: robprune run --resume {run_dir}\n"
    try:
        if os.isatty(2):
            os.write(2, b"\x1b[?25h")  # show the cursor the progress bar hid
        os.write(2, msg.encode())
    except OSError:
        pass
    os._exit(130)


@app.command("profiles")
def profiles_cmd() -> None:
    """List the built-in profiles, one a line: name and description. Give the name wherever a PROFILE goes
    (robprune run mnist_quick); a file path is read instead when one exists."""
    from robprune.engine.config import builtin_profiles, profile_description

    found = builtin_profiles()
    pad = max(map(len, found), default=0)
    for name, path in found.items():
        out.print(f"{name:<{pad}}  {profile_description(path)}", highlight=False, markup=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    attack: str = typer.Option("pgd", "--attack", help="pgd (the profile's attack.eval settings) or autoattack "
                                                      "(Croce & Hein 2020: the evaluation papers report)."),
    version: str = typer.Option("standard", "--version", help="AutoAttack version: standard (APGD-CE, APGD-T, "
                                                              "FAB-T, Square) or rand (APGD-CE, APGD-DLR with EOT)."),
    eps: Optional[float] = typer.Option(None, "--eps", min=0.0, max=1.0, help="L-inf radius (default: the profile's)."),
    n: Optional[int] = typer.Option(None, "--n", min=0, help="Evaluate the first N test examples (default: the "
                                                             "run's final evaluation's, eval.final_subset for pgd "
                                                             "and eval.autoattack_n for autoattack; 0 = all)."),
    subset: Optional[int] = typer.Option(None, "--subset", min=0, hidden=True),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, max=1_000_000,
                                        help="Examples per batch (default: the profile's data.test_batch_size)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=10_000, help="PGD steps (default: the profile's)."),
    restarts: Optional[int] = typer.Option(None, "--restarts", min=1, max=1000,
                                           help="PGD restarts (default: the profile's)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="PGD loss: ce (cross-entropy) or cw (Carlini-Wagner "
                                                            "margin); default: the profile's."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**31 - 1,
                                       help="Seed of the attacks' random starts (default: the run's)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the run's "
                                                                "run.device)."),
    fresh: bool = typer.Option(False, "--fresh", help="AutoAttack: start over, ignoring a saved state."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
) -> None:
    """Evaluate a finished run's model: PGD, or AutoAttack with a table per attack. AutoAttack's result is written
    to eval/autoattack-EPS-nN.json in the run directory; a killed AutoAttack continues where it stopped."""
    from robprune.engine import api, data, evaluation
    from robprune.engine.config import ATTACK_LOSSES, AUTOATTACK_VERSIONS
    from robprune.engine.rundir import RunDir

    try:
        if attack not in evaluation.ATTACKS:
            raise UserError(f"--attack: {attack!r}: expected one of {', '.join(evaluation.ATTACKS)}")
        if version not in AUTOATTACK_VERSIONS:
            raise UserError(f"--version: {version!r}: expected one of {', '.join(AUTOATTACK_VERSIONS)}")
        if loss is not None and loss not in ATTACK_LOSSES:
            raise UserError(f"--loss: {loss!r}: expected one of {', '.join(ATTACK_LOSSES)}")
        cfg = api.load_config(run_dir)
        dev = evaluation.pick_device(device or cfg.run.device,
                                     where="--device" if device else f"{RunDir(run_dir).profile}: run.device")
        model = api.load_model(run_dir, dev)
        x, y = api.load_test_set(run_dir, dev)
    except UserError as exc:
        fail(exc)
    ea = cfg.attack.eval
    count = n if n is not None else subset if subset is not None else (
        cfg.eval.autoattack_n if attack == "autoattack" else cfg.eval.final_subset)
    x, y = data.eval_subset(x, y, count)
    eps_ = eps if eps is not None else ea.eps
    batch_ = batch or cfg.data.test_batch_size
    seed_ = seed if seed is not None else cfg.run.seed
    rd = RunDir(run_dir)
    if attack == "pgd":
        res = evaluation.pgd(model, x, y, eps=eps_, step_size=ea.step_size, steps=steps or ea.steps,
                             restarts=restarts or ea.restarts, loss=loss or ea.loss, batch_size=batch_,
                             seed=seed_ + 1 if seed is None else seed_)
        res = {"type": "eval_cli", **res, "device": str(dev)}
        rd.append_event(res)
        if as_json:
            out.print_json(json.dumps(res))
        else:
            from robprune.engine.summary import attack_label

            out.print(f"{attack_label(res['attack'], res['n'])}: natural {100 * res['nat_acc']:.2f}%, robust "
                      f"{100 * res['adv_acc']:.2f}%", highlight=False, markup=False, soft_wrap=True)
        return
    res = _autoattack_with_progress(model, x, y, rd, eps=eps_, version=version, batch_size=batch_, seed=seed_,
                                    num_classes=data.dataset_spec(cfg.data.name).num_classes, fresh=fresh)
    rd.append_event({"type": "eval_cli", "attack": res["attack"], "clean_acc": res["clean_acc"],
                     "robust_acc": res["robust_acc"], "n": len(y), "path": res["path"], "device": res["device"]})
    if as_json:
        out.print_json(json.dumps(res))
    else:
        _autoattack_table(res)


def _autoattack_with_progress(model, x, y, rd, **kw) -> dict:
    """AutoAttack with a progress bar on stderr (one task per attack of the ensemble)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from robprune.engine import evaluation

    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False, disable=not err.is_terminal) as bar:
        def progress(part: str, done: int, total: int) -> None:
            if part not in tasks:
                tasks[part] = bar.add_task(part, total=total)
            bar.update(tasks[part], completed=done, total=total)

        try:
            return evaluation.autoattack(model, x, y, rd, progress=progress, **kw)
        except UserError as exc:
            fail(exc)
        except KeyboardInterrupt:
            bar.stop()
            _say("robprune: interrupted; the same command continues where it stopped (its state is in "
                 f"{rd.eval_dir})")
            raise typer.Exit(130) from None


def _autoattack_table(res: dict) -> None:
    from rich.table import Table

    from robprune.engine.summary import attack_label

    t = Table(title=attack_label(res["attack"]), title_justify="left")
    for col in ("attack", "settings", "robust accuracy after", "fooled", "seconds"):
        t.add_column(col, justify="left" if col in ("attack", "settings") else "right")
    t.add_row("clean", "", f"{100 * res['clean_acc']:.2f}%", "", f"{res['clean_seconds']:.1f}")
    for p in res["per_attack"]:
        settings = ", ".join(f"{k} {v}" for k, v in p["settings"].items())
        t.add_row(p["name"], settings, f"{100 * p['robust_acc_after']:.2f}%", str(p["fooled"]), f"{p['seconds']:.1f}")
    out.print(t)
    out.print(f"robust accuracy {100 * res['robust_acc']:.2f}% ({res['robust_examples']} of {res['attack']['n']}) on "
              f"{res['device']}, {res['precision']}; written to {res['path']}", highlight=False, markup=False,
              soft_wrap=True)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory (finished, or with a checkpoint)."),
    compact: bool = typer.Option(False, "--compact", help="Also write model_compact.safetensors / .pt2: the pruned "
                                                           "filters and channels removed (filter or column pruning)."),
    semi_structured: bool = typer.Option(False, "--semi-structured",
                                         help="Also convert the 2:4-pruned linear weights to torch's semi-structured "
                                              "sparse format and check the logits (prune.linear_scheme = \"2:4\"; "
                                              "a CUDA GPU of compute capability 8.0 or newer); the result goes into "
                                              "model_card.json."),
) -> None:
    """Write summary.json, summary.md, metrics.csv and the model (model.safetensors, masks.safetensors, model.pt2,
    model_card.json: they load without robprune) into the run directory."""
    from robprune.engine.export import compact_lines, export_all, semi_structured_lines

    skipped: list[str] = []
    try:
        paths, card = export_all(run_dir, skipped, compact=compact, semi_structured=semi_structured)
    except UserError as exc:
        fail(exc)
    for line in skipped:
        _say(f"robprune: warning: {line}")
    if skipped:
        _say(f"robprune: warning: {len(skipped)} damaged line{'s' if len(skipped) != 1 else ''} skipped; every "
             "other record is in the export")
    for p in paths:
        out.print(str(p), highlight=False)
    for note in card.get("notes", []) + ([card["program"]["note"]] if card["program"].get("note") else []):
        _say(f"robprune: warning: {note}")
    if card.get("compact"):
        for line in compact_lines(card["compact"]):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
    if card.get("semi_structured"):
        for line in semi_structured_lines(card["semi_structured"]):
            out.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command("experiment")
def experiment_cmd(
    name: str = typer.Argument(..., help="weight-dist | scratch-vs-pruned | lottery | transfer | schemes | budgets."),
    profile: Path = typer.Argument(..., help="Base profile every run starts from; the preset's keys go on top of it."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Report directory (default experiments/NAME); the "
                                                                 "runs live in OUT/runs/<run>."),
    overrides: List[str] = typer.Option([], "--set", help="A profile key for every run (--set admm.rho=0.01), or an "
                                                          "experiment parameter (--set exp.widths=[1,2,4], --set "
                                                          "exp.seeds=[0,1])."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (mnist-5k, CPU minutes) | paper (GPU) | tiny "
                                                       "(tests), or a preset TOML file."),
    plots: Optional[bool] = typer.Option(None, "--plots/--no-plots", help="Draw the plots in the terminal "
                                                                         "(default: when stdout is a terminal)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress: stderr gets errors only."),
) -> None:
    """Run one of the paper's experiments (or `budgets`: uniform, global and ERK per-layer budgets at 90-99%
    sparsity), its trainings one after the other, and write a report: report.md,
    results.json / results.csv, PNG figures and the resolved profile of every run, in OUT.

    PROFILE is the base profile: each run is PROFILE + the preset's keys + your --set keys + the keys the
    experiment sets for that run (width, pruning ratios, initial weights, epochs). Re-running the same command
    reuses the finished runs and resumes an interrupted one from its checkpoint. Exit codes as for `run`.
    """
    from robprune.engine.errors import NonFiniteError
    from robprune.engine.experiments import Experiment, ExperimentStopped
    from robprune.tui.experiment_view import ExperimentPrinter, draw_plots, print_findings

    printer = ExperimentPrinter(err, quiet=quiet)
    try:
        exp = Experiment(name, profile, out=out_dir, preset=preset, overrides=overrides, progress=printer.progress,
                         subscribers=[printer.engine_event])
    except UserError as exc:
        fail(exc)
    interrupts = 0

    def on_interrupt(signum, frame):  # the first stops the current run with a checkpoint, a second at once
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and exp._session is not None:
            exp.stop()
            _say("stopping the current run at the next step with a checkpoint (Ctrl-C again to stop at once)")
            return
        try:  # between runs or while the report is written: nothing to checkpoint (every write is atomic)
            if os.isatty(2):
                os.write(2, b"\x1b[?25h")
            os.write(2, b"\nrobprune: stopped; run the same command again to resume (finished runs are reused, an "
                        b"unfinished one resumes from its last checkpoint)\n")
        except OSError:
            pass
        os._exit(130)

    _install_signal_handlers(exp.stop, on_interrupt)
    try:
        with printer:
            results = exp.run()
    except UserError as exc:
        fail(exc)
    except ExperimentStopped as exc:
        _say(f"stopped: {exc.run_dir} keeps its checkpoint; run the same command again to resume")
        raise typer.Exit(130 if interrupts else 0)
    except NonFiniteError as exc:
        _say(f"robprune: error: {exc}")
        raise typer.Exit(exc.exit_code)
    except OSError as exc:
        _say(f"robprune: error: {type(exc).__name__}: {exc}")
        raise typer.Exit(1)
    if not quiet:
        print_findings(err, results)
    if plots if plots is not None else sys.stdout.isatty():
        try:
            draw_plots(results, out.width)
        except Exception as exc:  # the terminal plots are a courtesy: the PNGs are written already
            _say(f"(terminal plots skipped: {type(exc).__name__}: {exc})")
    out.print(f"report: {exp.out / 'report.md'}", highlight=False)


def _bound(key: str, which: int) -> int:
    """The profile's lowest (0) or highest (1) value for ``key``: bench's options that set the same thing."""
    from robprune.engine.config import int_bounds

    return int_bounds(key)[which]


@app.command("bench")
def bench_cmd(
    model: str = typer.Option("lenet", "--model", help="lenet (MNIST shape) | resnet18 | vgg16 | wrn (CIFAR shape)."),
    width: int = typer.Option(4, "--width", min=_bound("model.width", 0), max=_bound("model.width", 1),
                              help="Width (16 = standard size; the widen factor k for wrn)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, max=_bound("data.batch_size", 1),
                                         help="Batch size (default 128; 4096 with --semi-structured)."),
    attack: str = typer.Option("pgd", "--attack", help="pgd | fgsm-rs | none."),
    steps: int = typer.Option(40, "--steps", min=0, max=_bound("attack.train.steps", 1), help="Attack steps."),
    phase: str = typer.Option("admm", "--phase", help="pretrain | admm (with the penalty) | retrain (with masks)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed blocks per path (the median is reported; "
                                                                    "default 5); with --pipeline, runs of each "
                                                                    "profile (default 3)."),
    warmup: int = typer.Option(3, "--warmup", min=0, max=100_000, help="Untimed steps per path first."),
    iters: int = typer.Option(10, "--iters", min=1, max=100_000, help="Steps per timed block."),
    baseline: bool = typer.Option(False, "--baseline", help="Also time the reference-style loop, interleaved."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for ours (CUDA only, as in the engine; on the "
                                                    "CPU not used: settings.bf16 is false). The reference loop "
                                                    "stays float32, read against float32's matmul rate and peak."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last model and data."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the training forward."),
    depth: int = typer.Option(28, "--depth", min=_bound("model.depth", 0), max=_bound("model.depth", 1),
                              help="WRN depth."),
    threads: int = typer.Option(0, "--threads", min=0, max=_bound("run.threads", 1),
                                help="torch threads (0 = torch's default)."),
    ratio: float = typer.Option(0.9, "--ratio", help="Pruning ratio of every prunable layer."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd | adam."),
    eval_batches: int = typer.Option(1, "--eval-batches", min=0, max=100_000,
                                     help="Batches in the PGD evaluation timing (0 = skip)."),
    history: int = typer.Option(0, "--history", min=0, max=10_000_000,
                                help="Instead: push this many step records through the dashboard's state and "
                                     "time each plot's redraw (and the memory the history holds)."),
    compact: Optional[Path] = typer.Option(None, "--compact", metavar="RUN_DIR",
                                           help="Instead: time inference of RUN_DIR's masked model against its "
                                                "compact one (what robprune export --compact writes), batch = the "
                                                "run's test batch size."),
    semi_structured: bool = typer.Option(False, "--semi-structured",
                                         help="Instead: time inference of a linear-heavy model pruned 2:4, dense "
                                              "against torch's semi-structured sparse kernels (a CUDA GPU of compute "
                                              "capability 8.0 or newer; elsewhere the JSON says why it cannot)."),
    hidden: int = typer.Option(4096, "--hidden", help="Hidden size of the --semi-structured model (a multiple of 64)."),
    pipeline: Optional[Tuple[str, str]] = typer.Option(
        None, "--pipeline", metavar="PROFILE_A PROFILE_B",
        help="Instead: run two profiles whole, alternately (A, B, A, B, ...), each in a fresh process, and report "
             "wall time (and its training, final AutoAttack and other parts), natural / PGD / AutoAttack accuracy "
             "and sparsity of every run, their medians and the time ratios B / A (whole runs, training)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --pipeline: keep the run directories here "
                                                           "(default: a temporary directory, removed)."),
    overrides: List[str] = typer.Option([], "--set", help="With --pipeline: a profile key for both profiles "
                                                          "(repeatable)."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=4096,
                              help="Instead: data-parallel scaling: the training step in one process, then in NPROC "
                                   "ranks (torch.distributed.run, DDP), BATCH examples per rank; images/s per rank "
                                   "and in total, and the scaling efficiency."),
) -> None:
    """Time adversarial training steps (and PGD evaluation); print one JSON object."""
    if nproc > 1:
        from robprune.engine.bench import MODELS
        from robprune.engine.config import ATTACK_KINDS
        from robprune.engine.dist_bench import run_dist_bench

        try:
            if model not in MODELS:
                raise UserError(f"--model: expected one of {', '.join(MODELS)}, found {model!r}")
            if attack not in ATTACK_KINDS:
                raise UserError(f"--attack: expected one of {', '.join(ATTACK_KINDS)}, found {attack!r}")
            result = run_dist_bench(nproc, model=model, width=width, batch=batch or 128, attack=attack, steps=steps,
                                    device=device, warmup=warmup, iters=iters, repeats=3 if repeats is None else repeats,
                                    threads=threads, depth=depth, say=_say)
        except UserError as exc:
            fail(exc)
        except RuntimeError as exc:
            _say(f"robprune: error: {exc}")
            raise typer.Exit(1)
        print(json.dumps(result), flush=True)
        return
    if pipeline is not None:
        from robprune.engine.pipeline_bench import run_pipeline_bench

        try:
            result = run_pipeline_bench(pipeline[0], pipeline[1], repeats=3 if repeats is None else repeats, out=out,
                                        overrides=overrides, progress=lambda line: err.print(line, highlight=False,
                                                                                             markup=False))
        except UserError as exc:
            fail(exc)
        print(json.dumps(result), flush=True)
        return
    repeats = 5 if repeats is None else repeats
    if semi_structured:
        from robprune.engine.bench import run_semi_structured_bench

        try:
            result = run_semi_structured_bench(device=device, batch=batch or 4096, hidden=hidden, repeats=repeats,
                                               warmup=warmup, iters=iters, threads=threads)
        except (ValueError, UserError) as exc:
            fail(exc)
        print(json.dumps(result), flush=True)
        return
    if compact is not None:
        from robprune.engine.export import run_compact_bench

        try:
            result = run_compact_bench(compact, device=device, repeats=repeats, warmup=warmup, iters=iters,
                                       threads=threads)
        except UserError as exc:
            fail(exc)
        print(json.dumps(result), flush=True)
        return
    if history:
        from robprune.tui.history_bench import run_history_bench

        print(json.dumps(run_history_bench(history)), flush=True)
        return
    from robprune.engine.bench import run_bench

    try:
        result = run_bench(model=model, width=width, batch=batch or 128, attack=attack, steps=steps, phase=phase,
                           device=device, repeats=repeats, warmup=warmup, iters=iters, baseline=baseline,
                           ratio=ratio, bf16=bf16, channels_last=channels_last, compile=compile_, depth=depth,
                           threads=threads, optimizer=optimizer, eval_batches=eval_batches)
    except (ValueError, UserError) as exc:
        fail(exc)
    print(json.dumps(result), flush=True)


def main() -> None:
    try:
        app()
    except UserError as exc:  # pragma: no cover - commands catch their own; this is the last net
        err.print(f"robprune: error: {exc}", markup=False, highlight=False, soft_wrap=True)  # one line, any width
        sys.exit(2)


if __name__ == "__main__":
    main()
