"""The robprune dashboard: watch, steer and export a run.

The app gets a backend (an in-process engine session, or a run directory to follow) injected. Records
arrive from a background thread through ``post_message`` (thread-safe, non-blocking); handlers only
update a :class:`~robprune.tui.state.RunState`; a timer redraws what changed a few times a second.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, RichLog

from robprune.engine.control import CheckpointNow, Command, EvalNow, Pause, Resume, SetRho
from robprune.engine.errors import UserError
from robprune.tui.backend import Backend
from robprune.tui.screens.dialogs import ConfirmQuit, HelpScreen, RhoDialog, SummaryScreen
from robprune.tui.state import VIEW_LABELS, VIEWS, RunState
from robprune.tui.widgets.header import RunHeader
from robprune.tui.widgets.layer_table import LayerTable
from robprune.tui.widgets.plots import AccuracyPlot, LossPlot, ResidualPlot

LOG_STYLE = {"error": "bold red", "traceback": "red", "warning": "yellow", "eval": "cyan", "command": "magenta",
             "checkpoint": "blue", "phase": "bold", "admm": "green", "finished": "bold cyan", "export": "blue"}

# Only the layer table is a pure latest-value panel. Step records also feed the plots, and the engine bounds
# their rate by time (run.log_interval_s), so each one is kept: the plots do not depend on the UI's speed.
LATEST_VALUE_TYPES = frozenset({"layers"})


class EngineRecord(Message):
    """One record from the engine (an event as a dict)."""

    def __init__(self, record: dict) -> None:
        super().__init__()
        self.record = record


class LatestRecord(EngineRecord):
    """A latest-value record (progress, layer table): a newer one replaces a queued older one of its type."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LatestRecord) and message.record.get("type") == self.record.get("type")


class RobpruneApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "robprune"
    BINDINGS = [
        Binding("p", "toggle_pause", "pause/resume"),
        Binding("r", "rho", "rho"),
        Binding("e", "evaluate", "eval"),
        Binding("c", "checkpoint", "ckpt"),
        Binding("x", "export", "export"),
        Binding("v", "cycle_view", "x range"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_app", "quit"),
    ]

    PLOT_INTERVAL_S = 1.0  # plots are the costly part of a redraw (plotext is pure Python): at most 1 Hz

    def __init__(self, backend: Backend, *, refresh_hz: float = 4.0, ansi: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.refresh_hz = refresh_hz
        self.rs = RunState(name=backend.name, profile=backend.profile, device=backend.device,
                           run_dir=str(backend.run_dir), phase_epochs=dict(backend.phase_epochs))
        self._drawn = -1
        self._plotted = -1
        self._plot_t = 0.0
        self._logged = 0
        self._summary_shown = False
        self._stopping = False
        self.exported: list[Path] = []
        self.ansi = ansi
        self.view = VIEWS[0]  # the plots' x range: whole run, this phase, last 10 minutes
        self._panel_failures: set[str] = set()
        self.user_quit = False  # set when the user quits; any other end of the app leaves the engine running

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield LayerTable(id="layers")
        with Horizontal(id="plots"):
            yield AccuracyPlot(id="acc-plot")
            yield ResidualPlot(id="res-plot")
            yield LossPlot(id="loss-plot")
        yield RichLog(id="log", wrap=False, max_lines=1000, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.ansi:
            self.theme = "textual-ansi"  # the terminal's own 16 colours (e.g. over SSH without COLORTERM)
        self.title = f"robprune: {self.backend.name}"
        self.sub_title = str(self.backend.run_dir)
        self.set_interval(1.0 / self.refresh_hz, self.redraw)
        self.backend.start(self._post)
        self.redraw()

    def _post(self, record: dict) -> None:
        """Called on the engine's (or the follower's) thread: hand over without blocking it."""
        if self._stopping:
            return
        cls = LatestRecord if record.get("type") in LATEST_VALUE_TYPES else EngineRecord
        self.post_message(cls(record))

    # ------------------------------------------------------------------ records -> state
    def on_engine_record(self, message: EngineRecord) -> None:
        before = self.rs.state
        self.rs.apply(message.record)
        self._ring_on_outcome(before, message.record)

    def _ring_on_outcome(self, before: str, record: dict) -> None:
        """A terminal bell, with a notification, when the run finishes, fails or diverges (not on a stop the
        user asked for): whoever watches from another window hears it."""
        kind = record.get("type")
        now = self.rs.state
        if kind == "nonfinite":
            what = "the run diverged (a non-finite loss or weight)"
        elif now != before and now in ("finished", "error", "not running"):
            what = {"finished": "the run finished", "error": "the run failed",
                    "not running": "the run's engine is gone"}[now]
        else:
            return
        self.bell()
        self.notify(what, severity="information" if now == "finished" else "error", timeout=15)

    def get_system_commands(self, screen):
        """The run's actions in the command palette (ctrl+p), next to Textual's own."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Pause or resume the run", "p: no training step runs while paused",
                            self.action_toggle_pause)
        yield SystemCommand("Change rho", "r: set or multiply, all layers or the selected one", self.action_rho)
        yield SystemCommand("Evaluate now", "e: natural and attacked accuracy on the live subset",
                            self.action_evaluate)
        yield SystemCommand("Checkpoint now", "c: write checkpoint.pt", self.action_checkpoint)
        yield SystemCommand("Export the run summary", "x: summary.json, summary.md, metrics.csv",
                            self.action_export)
        yield SystemCommand("Switch the plots' x range", "v: whole run, this phase, last 10 minutes",
                            self.action_cycle_view)

    def on_latest_record(self, message: LatestRecord) -> None:
        self.rs.apply(message.record)

    # ------------------------------------------------------------------ drawing
    def redraw(self) -> None:
        rs = self.rs
        if self._stopping or (rs.version == self._drawn and self._plotted == rs.version):
            return
        self._drawn = rs.version
        self._safely(RunHeader, lambda w: w.render_state(rs))
        self._safely(LayerTable, lambda w: w.render_state(rs))
        now = time.monotonic()
        if rs.version != self._plotted and (now - self._plot_t >= self.PLOT_INTERVAL_S or not rs.active):
            self._plotted, self._plot_t = rs.version, now
            for plot in (AccuracyPlot, ResidualPlot, LossPlot):
                self._safely(plot, lambda w: w.render_state(rs, self.view))
        log = self.query_one(RichLog)
        new = rs.log_count - self._logged
        if new > 0:
            for t, level, text in list(rs.log)[-min(new, len(rs.log)):]:
                stamp = time.strftime("%H:%M:%S", time.localtime(t))
                log.write(Text(f"{stamp} {level:<10} {text}", style=LOG_STYLE.get(level, "")))
            self._logged = rs.log_count
        if rs.summary is not None and not self._summary_shown:
            self._summary_shown = True
            self.push_screen(SummaryScreen(rs.summary))

    def _safely(self, widget_type, update) -> None:
        """Update one panel; if that fails, the panel says so, the log gets one warning, the app goes on."""
        try:
            update(self.query_one(widget_type))
        except Exception as exc:  # no panel's failure may end the dashboard (and with it the run)
            key = f"{widget_type.__name__}:{type(exc).__name__}:{exc}"
            if key not in self._panel_failures:
                self._panel_failures.add(key)
                self.note("warning", f"{widget_type.__name__}: update failed: {type(exc).__name__}: {exc} "
                                     "(the run goes on)")
            try:
                self.query_one(widget_type).border_subtitle = "display error: see the log"
            except Exception:
                pass

    def note(self, level: str, text: str) -> None:
        self.rs._note(level, text)
        self.rs.version += 1

    def action_cycle_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self._plotted = -1  # redraw the plots now
        self._plot_t = 0.0
        self.notify(f"plots: {VIEW_LABELS[self.view]}")
        self.redraw()

    # ------------------------------------------------------------------ actions
    def _can_command(self) -> bool:
        if self.rs.state == "not running":
            self.notify(f"no engine is running this run; resume it with: {self.rs.resume_command()}",
                        severity="warning", timeout=10)
            return False
        if not self.rs.active:
            self.notify(f"the run is {self.rs.state}; no engine to command", severity="warning")
            return False
        return True

    def _send(self, cmd: Command) -> bool:
        """Hand a command to the engine; a refusal (or a run directory we may not write) is a warning, never fatal."""
        try:
            self.backend.send(cmd)
        except (UserError, OSError) as exc:
            self.notify(f"{cmd.name} not sent: {exc}", severity="warning", timeout=8)
            self.note("warning", f"{cmd.name} not sent: {exc}")
            return False
        return True

    def action_toggle_pause(self) -> None:
        if self._can_command():
            self._send(Resume() if self.rs.state == "paused" else Pause())

    def action_rho(self) -> None:
        if not self._can_command():
            return
        layer = self.query_one(LayerTable).selected_layer
        if layer is None and self.backend.layer_names:
            layer = self.backend.layer_names[0]

        def done(cmd: SetRho | None) -> None:
            if cmd is not None and self._send(cmd):
                self.notify(f"rho {'x' if cmd.multiply else '='} {cmd.value:g} for {cmd.layer or 'all layers'}: sent")

        self.push_screen(RhoDialog(layer, self.rs.rho.get(layer) if layer else None), done)

    def action_evaluate(self) -> None:
        if self._can_command() and self._send(EvalNow()):
            self.notify("evaluation requested")

    def action_checkpoint(self) -> None:
        if self._can_command() and self._send(CheckpointNow()):
            self.notify("checkpoint requested")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_export(self) -> None:
        self._export()

    @work(thread=True, exclusive=True, group="export")
    def _export(self) -> None:
        from robprune.engine.summary import export_run

        try:
            skipped: list[str] = []
            paths = export_run(self.backend.run_dir, skipped)
        except UserError as exc:
            self.call_from_thread(self.notify, f"export failed: {exc}", severity="error", timeout=8)
            return
        except Exception as exc:  # never let an export kill the dashboard
            self.call_from_thread(self.notify, f"export failed: {type(exc).__name__}: {exc}", severity="error")
            return
        self.exported = paths
        where = Path(paths[0]).parent
        self.call_from_thread(self.notify, f"exported to {where}: " + ", ".join(p.name for p in paths), timeout=10)
        for line in skipped:  # damaged record lines were left out: say which, in the log
            self.call_from_thread(self.note, "warning", line)

    def action_quit_app(self) -> None:
        if self.backend.owns_run and self.rs.active and self.backend.alive:
            self.push_screen(ConfirmQuit(), lambda yes: self._stop_and_exit() if yes else None)
        else:
            self._stop_and_exit()

    @work(thread=True, exclusive=True, group="quit")
    def _stop_and_exit(self) -> None:
        self.user_quit = True
        self.call_from_thread(self.notify, "stopping: checkpoint, then exit ..." if self.backend.owns_run
                              else "leaving; the run directory is untouched")
        self.backend.shutdown()
        self._stopping = True
        self.call_from_thread(self.exit)

    @property
    def crashed(self) -> bool:
        """The app ended on an exception of its own, not because the user quit."""
        return self._exception is not None

    def on_unmount(self) -> None:
        self._stopping = True
        if self.crashed and not self.user_quit:
            return  # the dashboard failed: the engine keeps training; robprune-tui goes on headless
        self.backend.shutdown()
