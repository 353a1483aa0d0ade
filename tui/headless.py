"""The headless view of a run: a rich progress bar (phase, epoch, step, images/s, ETA), log lines and a final table."""
from __future__ import annotations

import threading
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from robprune.engine import events as ev
from robprune.engine.summary import accuracy_lines, target_label


class ProgressPrinter:
    """Base of the headless printers: a rich progress display ``bar`` made of ``columns`` on ``console`` (stderr
    by default), shown from ``__enter__`` to ``__exit__``, nothing at all when ``quiet``. Subclasses hold ``_lock``
    while they handle a call, which may come from the engine thread."""

    def __init__(self, console: Console | None, quiet: bool, *columns: str | ProgressColumn) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.bar = Progress(*columns, console=self.console, transient=False, disable=quiet)
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def _print(self, msg: str) -> None:
        if not self.quiet:
            self.bar.console.print(msg, highlight=False)


class HeadlessPrinter(ProgressPrinter):
    """An event subscriber that draws progress with rich; safe to call from the engine thread."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        super().__init__(
            console, quiet,
            TextColumn("[bold]{task.fields[phase]:<8}"),
            BarColumn(bar_width=None),
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            TextColumn("step {task.fields[step]}"),
            TextColumn("{task.fields[ips]:>7.0f} img/s"),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self._task = None

    def __call__(self, e: ev.Event) -> None:
        with self._lock:
            self._handle(e)

    def _handle(self, e: ev.Event) -> None:
        if isinstance(e, ev.PhaseChange):
            if self._task is not None:
                self.bar.stop_task(self._task)
            if e.skipped:
                self._task = None
                return
            self._task = self.bar.add_task(e.phase, total=None, phase=e.phase, epoch=0, epochs=e.epochs,
                                           step=e.step, ips=0.0, loss=float("nan"))
        elif isinstance(e, ev.StepMetrics) and self._task is not None:
            total = e.epochs * e.batches
            self.bar.update(self._task, total=total, completed=e.epoch * e.batches + e.batch,
                            epoch=min(e.epoch + 1, e.epochs), epochs=e.epochs, step=e.step,
                            ips=e.images_per_s, loss=e.loss)
        elif isinstance(e, ev.EvalResult):
            a = e.attack
            self._print(f"[cyan]eval[/] {e.phase} epoch {e.epoch} ({e.reason}): natural {100 * e.nat_acc:.2f}%  "
                        f"{a['kind'].upper()}-{a['steps']} eps {a['eps']:g}: {100 * e.adv_acc:.2f}%  (n={e.n})")
        elif isinstance(e, ev.LogLine):
            color = {"warning": "yellow", "error": "red"}.get(e.level, "dim")
            self._print(f"[{color}]{e.level}[/] {e.message}")
        elif isinstance(e, ev.CommandApplied):
            args = {k: v for k, v in e.args.items() if k != "ranks"}  # a data-parallel run's per-rank record
            steps = sorted({r.get("step") for r in e.args.get("ranks") or ()})
            ranks = (f" (all {len(e.args['ranks'])} ranks at step {steps[0]})" if len(steps) == 1 else
                     f" (the ranks at steps {steps})" if steps else "")
            self._print(f"[magenta]{e.command}[/]" + (f" {args}" if args else "") + ranks)
        elif isinstance(e, ev.ErrorEvent):
            self._print(f"[red]error[/] {e.message}")


def summary_table(s: dict) -> Table:
    f = s["final"]
    t = Table(title=f"{s['run']}: {s['status']}", show_lines=False)
    for col in ("layer", "shape", "params", "nonzero", "sparsity", "target"):
        t.add_column(col, justify="right" if col != "layer" else "left")
    for L in s["layers"]:
        t.add_row(L["name"], "x".join(map(str, L["shape"])), str(L["params"]), str(L["nonzero"]),
                  f"{100 * L['sparsity']:.2f}%", target_label(L['target'], L.get('scheme')))
    sp, cr = s["sparsity"], s["compression_rate"]
    t.add_section()
    t.add_row("prunable", "", str(sp["prunable_params"]), str(sp["prunable_nonzero"]), f"{100 * sp['prunable']:.2f}%",
              f"{cr['prunable']:.1f}x")
    t.add_row("all params", "", str(sp["total_params"]), str(sp["nonzero_params"]), f"{100 * sp['overall']:.2f}%",
              f"{cr['overall']:.1f}x")
    t.caption = "\n".join(accuracy_lines(f))
    return t
