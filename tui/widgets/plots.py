"""Plots (textual-plotext): accuracy, ADMM residuals (log scale), loss and learning rate."""
from __future__ import annotations

import math

from textual_plotext import PlotextPlot

from robprune.tui.state import RunState


def thin(series, n: int) -> list:
    """At most about ``n`` points, evenly spaced, always keeping the last: plotext's cost grows with points."""
    pts = list(series)
    if len(pts) <= n:
        return pts
    stride = len(pts) / n
    out = [pts[int(i * stride)] for i in range(n)]
    if out[-1] is not pts[-1]:
        out.append(pts[-1])
    return out


def _xy(series, n: int = 160):
    pts = thin(series, n)
    return [p[0] for p in pts], [p[1] for p in pts]


class _Plot(PlotextPlot):
    title = ""

    def on_mount(self) -> None:
        self.plt.title(self.title)

    def render_state(self, s: RunState) -> None:
        self.plt.clear_data()
        self.plt.clear_figure()
        self.plt.title(self.title)
        if self.size.width >= 16 and self.size.height >= 6:  # plotext fails on smaller canvases
            try:
                self.draw(s)
            except (ValueError, ZeroDivisionError, IndexError):  # a plot must never take the dashboard down
                self.plt.clear_data()
        self.refresh()

    def draw(self, s: RunState) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class AccuracyPlot(_Plot):
    title = "accuracy %"

    def draw(self, s: RunState) -> None:
        for series, label, marker in ((s.train_acc, "train adv", "dot"), (s.eval_nat, "eval nat", "hd"),
                                      (s.eval_adv, "eval PGD", "hd")):
            if series:
                x, y = _xy(series)
                self.plt.plot(x, y, label=label, marker=marker)
        self.plt.ylim(0, 100)


class ResidualPlot(_Plot):
    title = "ADMM residuals (log)"

    def draw(self, s: RunState) -> None:
        any_data = False
        for series, label in ((s.primal_series, "primal"), (s.dual_series, "dual")):
            pts = [(x, y) for x, y in thin(series, 160) if y and y > 0 and math.isfinite(y)]
            if pts:
                any_data = True
                self.plt.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="hd")
        if any_data:
            self.plt.yscale("log")


class LossPlot(_Plot):
    title = "loss / lr"

    def draw(self, s: RunState) -> None:
        if s.loss_series:
            x, y = _xy(s.loss_series)
            self.plt.plot(x, y, label="loss", marker="dot")
        if s.lr_series:
            x, y = _xy(s.lr_series)
            self.plt.plot(x, y, label="lr", marker="dot", yside="right")
