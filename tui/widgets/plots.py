"""Plots (textual-plotext): accuracy, ADMM residuals (log scale), loss and learning rate.

Each plot shows the whole run, the current phase or the last 10 minutes (``RunState.window``) from the
bounded-memory histories of :mod:`robprune.tui.history`. A plot never takes the dashboard down: an exception
while one is built or rendered shows a one-line notice in its place and one warning in the log, and the next
redraw tries again.

The residual plot's log scale is drawn by hand: the values are plotted as log10 on a linear axis with tick labels
``1e-3`` and so on. plotext's own log scale takes the log of values it has already logged when a figure is built
a second time (a terminal resize or a theme change does that) and fails with a math domain error.
"""
from __future__ import annotations

import math
import re

from rich.style import Style
from rich.text import Span, Text
from textual_plotext import PlotextPlot

from robprune.tui.history import History
from robprune.tui.state import VIEW_LABELS, RunState

POINTS = 160  # points drawn per series: plotext's cost grows with them, the terminal shows no more


_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_STYLES: dict[str, Style] = {}


def _sgr_style(code: str) -> Style:
    style = _STYLES.get(code)
    if style is None:
        decoded = Text.from_ansi(f"\x1b[{code}mx")
        style = _STYLES[code] = decoded.spans[0].style if decoded.spans else Style()
    return style


def ansi_to_text(s: str) -> Text:
    """plotext's ANSI output as a rich Text: the same characters and styles as ``Text.from_ansi``, built as one
    string and a list of spans (``Text.from_ansi`` decodes character by character: several times slower on a
    wide, colourful plot, where it was most of a redraw's time)."""
    plain: list[str] = []
    spans: list[Span] = []
    pos = 0
    style: Style | None = None
    last = 0
    for m in _SGR.finditer(s):
        piece = s[last:m.start()]
        if piece:
            if style is not None:
                spans.append(Span(pos, pos + len(piece), style))
            plain.append(piece)
            pos += len(piece)
        last = m.end()
        code = m.group(1)
        if code in ("", "0"):
            style = None
        else:
            style = _sgr_style(code) if style is None else style + _sgr_style(code)
    piece = s[last:]
    if piece:
        if style is not None:
            spans.append(Span(pos, pos + len(piece), style))
        plain.append(piece)
    return Text("".join(plain), spans=spans)


def _xy(pts: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in pts], [p[1] for p in pts]


def log_ticks(lo: float, hi: float) -> tuple[tuple[float, float], list[float], list[str]]:
    """For log10 values spanning lo..hi: the y limits (a little wider than the data) and tick positions with
    labels such as ``5e-2``: 1, 2 and 5 of each decade, or the decades alone when there would be too many."""
    span = max(hi - lo, 0.2)
    ylim = (lo - 0.05 * span, hi + 0.05 * span)
    for mantissas in ((1, 2, 5), (1,)):
        ticks = [(d + math.log10(m), f"{m}e{d}") for d in range(math.floor(ylim[0]), math.ceil(ylim[1]) + 1)
                 for m in mantissas if ylim[0] <= d + math.log10(m) <= ylim[1]]
        if len(ticks) <= 6:
            break
    if len(ticks) > 6:  # many decades: every k-th one
        ticks = ticks[::math.ceil(len(ticks) / 6)]
    if len(ticks) < 2:  # less than a factor of 2 between the values: label the data's own ends
        ticks = [(v, f"{10 ** v:.3g}") for v in (lo, hi)] if hi > lo else [(lo, f"{10 ** lo:.3g}")]
    return ylim, [t for t, _ in ticks], [label for _, label in ticks]


class _Plot(PlotextPlot):
    title = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.view = "run"
        self._failure: str | None = None  # the last failure, shown in place of the plot
        self._reported: set[str] = set()  # failures already written to the log

    def on_mount(self) -> None:
        self.plt.title(self.title)

    def render_state(self, s: RunState, view: str | None = None) -> None:
        if view is not None:
            self.view = view
        self.plt.clear_data()
        self.plt.clear_figure()
        label = VIEW_LABELS.get(self.view, self.view)
        self.plt.title(self.title if self.view == "run" else f"{self.title} ({label})")
        self._failure = None
        if self.size.width >= 16 and self.size.height >= 6:  # plotext fails on smaller canvases
            try:
                self.draw(s, s.window(self.view))
            except Exception as exc:  # a plot must never take the dashboard down
                self.plt.clear_data()
                self._fail("drawing", exc)
        self.refresh()

    def render(self):
        if self._failure is not None:
            return Text(self._failure, style="yellow")
        try:  # what PlotextPlot.render does, with a faster ANSI decoder
            w, h = self.size.width, self.size.height
            self._plot.plotsize(w, h)
            self._plot._set_size(w, h)
            self._plot.theme(self._get_plotext_theme_name(self.app.theme))
            return ansi_to_text(self._plot.build())
        except Exception as exc:  # plotext's build failed (at this size, with these values): say so, keep going
            self._fail("rendering", exc)
            return Text(self._failure or "", style="yellow")

    def _fail(self, what: str, exc: Exception) -> None:
        self._failure = f"{self.title}: plot unavailable ({type(exc).__name__}); training goes on"
        key = f"{what}:{type(exc).__name__}:{exc}"
        if key not in self._reported:
            self._reported.add(key)
            note = getattr(self.app, "note", None)
            if note is not None:
                note("warning", f"{self.title} plot: {what} failed: {type(exc).__name__}: {exc} (the run goes on)")

    def series(self, h: History, window: dict) -> tuple[list[float], list[float]]:
        return _xy(h.view(POINTS, **window))

    def draw(self, s: RunState, window: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class AccuracyPlot(_Plot):
    title = "accuracy %"

    def draw(self, s: RunState, window: dict) -> None:
        for h, label, marker in ((s.train_acc, "train adv", "dot"), (s.eval_nat, "eval nat", "hd"),
                                 (s.eval_adv, "eval PGD", "hd")):
            x, y = self.series(h, window)
            if x:
                self.plt.plot(x, y, label=label, marker=marker)
        self.plt.ylim(0, 100)


class ResidualPlot(_Plot):
    title = "ADMM residuals (log)"

    def draw(self, s: RunState, window: dict) -> None:
        lo, hi = math.inf, -math.inf
        for h, label in ((s.primal_series, "primal"), (s.dual_series, "dual")):
            pts = [(x, math.log10(y)) for x, y in h.view(POINTS, **window) if y > 0]
            if pts:
                x, y = _xy(pts)
                lo, hi = min(lo, min(y)), max(hi, max(y))
                self.plt.plot(x, y, label=label, marker="hd")
        if lo <= hi:
            ylim, ticks, labels = log_ticks(lo, hi)
            self.plt.ylim(*ylim)
            self.plt.yticks(ticks, labels)


class LossPlot(_Plot):
    title = "loss / lr"

    def draw(self, s: RunState, window: dict) -> None:
        x, y = self.series(s.loss_series, window)
        if x:
            self.plt.plot(x, y, label="loss", marker="dot")
        x, y = self.series(s.lr_series, window)
        if x:
            self.plt.plot(x, y, label="lr", marker="dot", yside="right")
