"""Modal screens: help, the rho dialog, quit confirmation and the final summary."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Static

from robprune.engine.control import FACTOR_RANGE, RHO_RANGE, CommandError, SetRho
from robprune.engine.summary import accuracy_lines, target_label

HELP = """\
[b]robprune dashboard[/b]

  [b]p[/b]  pause / resume (while paused no step runs; a checkpoint
     is written)
  [b]r[/b]  change rho: set or multiply, all layers or the layer
     selected in the table (applied at the next step; before the
     ADMM phase it applies when ADMM starts)
  [b]e[/b]  evaluate now: natural + PGD on the evaluation subset
  [b]c[/b]  checkpoint now
  [b]x[/b]  export summary.json, summary.md, metrics.csv
  [b]v[/b]  plots' x range: whole run, this phase, last 10 minutes
  [b]q[/b]  quit: asks while the run is active, then checkpoints and
     stops the engine (an attached dashboard just detaches)
  [b]?[/b]  this help            [b]up/down[/b]  select a layer

Table: sparsity = exact zeros; <thr = share at or below the
projection threshold; primal = ||W - Z|| / ||W||.
Plots: accuracy (train adversarial, eval natural and PGD),
ADMM residuals (mean over layers, log), loss and lr.

escape or ? closes this help.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Static(HELP)


class MarkedRadio(RadioButton):
    """A radio button whose state shows without colour (``--ansi``, monochrome terminals): ● on, ○ off."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 - the name Textual's ToggleButton reads
        return "\u25cf" if self.value else "\u25cb"


class RhoDialog(ModalScreen[SetRho | None]):
    """Returns the checked :class:`~robprune.engine.control.SetRho` command, or None when cancelled. Values
    outside the engine's ranges are refused here, with the range, before anything is sent."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, layer: str | None, current: float | None) -> None:
        super().__init__()
        self.target_layer = layer
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="rho-box", classes="dialog"):
            cur = "--" if self.current is None else f"{self.current:.4g}"
            yield Label(f"Change rho (selected layer: {self.target_layer or 'none'}, its rho {cur})")
            yield Input(placeholder=f"rho {RHO_RANGE[0]:g} to {RHO_RANGE[1]:g}, or a factor {FACTOR_RANGE[0]:g} to "
                                    f"{FACTOR_RANGE[1]:g} to multiply", id="rho-value")
            with Horizontal(classes="row"):
                with RadioSet(id="rho-mode"):
                    yield MarkedRadio("set", value=True, id="mode-set")
                    yield MarkedRadio("multiply", id="mode-mul")
                with RadioSet(id="rho-scope"):
                    yield MarkedRadio("all layers", value=True, id="scope-all")
                    yield MarkedRadio("selected layer", id="scope-one", disabled=self.target_layer is None)
            yield Label("", id="rho-error")
            with Horizontal(classes="row buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#rho-value", Input).focus()

    def _submit(self) -> None:
        raw = self.query_one("#rho-value", Input).value.strip()
        multiply = self.query_one("#mode-mul", RadioButton).value
        one = self.query_one("#scope-one", RadioButton).value
        try:
            try:
                value = float(raw)
            except ValueError:
                lo, hi = FACTOR_RANGE if multiply else RHO_RANGE
                raise CommandError(f"expected a number from {lo:g} to {hi:g}, found {raw[:30]!r}") from None
            cmd = SetRho(value, self.target_layer if one else None, multiply)
        except CommandError as exc:
            self.query_one("#rho-error", Label).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(cmd)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmQuit(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "yes"), Binding("n,escape", "no", "no")]

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="dialog"):
            yield Label("The run is active. Quit? It is checkpointed and stopped;\n"
                        "resume later with: robprune-tui --resume RUN_DIR")
            with Horizontal(classes="row buttons"):
                yield Button("Quit (y)", variant="error", id="yes")
                yield Button("Stay (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


def summary_renderable(s: dict) -> Table:
    f = s["final"]
    sp, cr = s["sparsity"], s["compression_rate"]
    t = Table(title=f"{s['run']}: {s['status']}", expand=True)
    for col in ("layer", "params", "nonzero", "sparsity", "target"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for L in s["layers"]:
        t.add_row(L["name"], f"{L['params']:,}", f"{L['nonzero']:,}", f"{100 * L['sparsity']:.2f}%",
                  target_label(L['target'], L.get('scheme')))
    t.add_section()
    t.add_row("overall (prunable)", f"{sp['prunable_params']:,}", f"{sp['prunable_nonzero']:,}",
              f"{100 * sp['prunable']:.2f}%", f"{cr['prunable']:.1f}x")
    t.caption = "\n".join(accuracy_lines(f) + [f"compression {cr['prunable']:.1f}x"])
    return t


class SummaryScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter", "dismiss", "close"), Binding("x", "app.export", "export"),
                Binding("q", "app.quit_app", "quit")]

    def __init__(self, summary: dict) -> None:
        super().__init__()
        self.summary = summary

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="summary-box", classes="dialog"):
            yield Static(summary_renderable(self.summary), id="summary-table")
            yield Label("escape: close   x: export   q: quit")
