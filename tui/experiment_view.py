"""The headless view of ``robprune experiment``: rich progress (runs done, the current run's phase and epoch), one
line per finished or reused run, the findings at the end, and the report's plots drawn in the terminal (plotext)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robprune.engine import events as ev
from robprune.tui.headless import ProgressPrinter


class ExperimentPrinter(ProgressPrinter):
    """Two callables: :meth:`progress` for the experiment's own events and :meth:`engine_event` for every run's
    engine events (a session subscriber). Both may be called from the engine thread."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        super().__init__(
            console, quiet,
            TextColumn("{task.description:<28}"), BarColumn(bar_width=None),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self._runs = None
        self._run = None

    def progress(self, e: dict) -> None:
        with self._lock:
            kind = e.get("type")
            if kind == "experiment":
                self._print(f"[bold]{e['name']}[/]: {e['runs']} runs, preset {e['preset']}, report in {e['out']}")
                self._runs = self.bar.add_task("runs", total=e["runs"], info="")
            elif kind == "run":
                status = e["status"]
                label = f"[{e['index'] + 1}/{e['total']}] {e['run']}"
                if status in ("started", "resumed"):
                    if self._run is not None:
                        self.bar.remove_task(self._run)
                    self._run = self.bar.add_task(e["run"], total=None, info=status)
                    if status == "resumed":
                        self._print(f"{label}: resuming from its checkpoint")
                elif status in ("finished", "reused"):
                    f = e["summary"]["final"]
                    took = f" in {e['seconds']:.0f} s" if "seconds" in e else ""
                    self._print(f"{label}: {'reused' if status == 'reused' else 'trained' + took}: natural "
                                f"{100 * f['nat_acc']:.2f}%  PGD {100 * f['adv_acc']:.2f}%")
                    if self._run is not None:
                        self.bar.remove_task(self._run)
                        self._run = None
                    if self._runs is not None:
                        self.bar.advance(self._runs)
            elif kind == "report":
                self._print("writing the report")

    def engine_event(self, e: ev.Event) -> None:
        with self._lock:
            if isinstance(e, ev.StepMetrics) and self._run is not None:
                self.bar.update(self._run, total=e.epochs * e.batches,
                                completed=e.epoch * e.batches + e.batch,
                                info=f"{e.phase} epoch {min(e.epoch + 1, e.epochs)}/{e.epochs}")
            elif isinstance(e, ev.LogLine) and e.level in ("warning", "error"):
                self._print(f"[yellow]{e.level}[/] {e.message}")
            elif isinstance(e, ev.ErrorEvent):
                self._print(f"[red]error[/] {e.message}")


def print_findings(console: Console, results: dict) -> None:
    for i, t in enumerate(results["tables"], 1):
        f = t["finding"]
        if not f.get("sentence"):
            continue
        color = {True: "green", False: "red"}.get(f.get("held"), "yellow")
        console.print(f"Table {i} ({t['id']}): [{color}]{f['sentence']}[/]", highlight=False, soft_wrap=True)


def draw_plots(results: dict, width: int | None = None) -> None:
    """Draw the report's plot specs in the terminal with plotext (the PNGs hold the same plots)."""
    import plotext as plt

    for spec in results.get("plots", []):
        plt.clf()
        plt.plotsize(min(width or 100, 120), 22)
        kind = spec["kind"]
        if kind == "line":
            xs = list(range(1, len(spec["x"]) + 1))
            for label, ys in spec["series"].items():
                plt.plot(xs, ys, label=label, marker="dot")
            plt.xticks(xs, [str(v) for v in spec["x"]])
        elif kind == "bar":
            plt.multiple_bar([str(v) for v in spec["x"]], list(spec["series"].values()),
                             labels=list(spec["series"].keys()))
        elif kind == "hist":
            for label, ys in spec["series"].items():
                plt.plot(spec["x"], ys, label=label)
        elif kind == "matrix":
            plt.matrix_plot(spec["matrix"])
            n = len(spec["xlabels"])
            plt.xticks(list(range(1, n + 1)), spec["xlabels"])
            plt.yticks(list(range(1, n + 1)), spec["ylabels"])
        else:
            continue
        plt.title(f"{spec['title']} ({spec['file']})")
        if spec.get("xlabel"):
            plt.xlabel(spec["xlabel"])
        if spec.get("ylabel") and kind != "matrix":
            plt.ylabel(spec["ylabel"])
        plt.show()
