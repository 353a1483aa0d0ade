"""The report's figures: each plot spec of an experiment's report drawn as a PNG with matplotlib's Agg canvas (the
``plots`` extra); the CLI draws the same specs in the terminal with plotext."""
from __future__ import annotations

import importlib
import io
from pathlib import Path

from ..rundir import atomic_write_bytes


def write_figures(plots: list[dict], out: Path) -> list[str] | None:
    """Each plot spec as a PNG in ``out``; the files written, or None (nothing written) when matplotlib does not
    import."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return None
    for plot in plots:
        render_png(plot, out / plot["file"])
    return [plot["file"] for plot in plots]


def render_png(plot: dict, path: Path) -> None:
    """Draw one plot spec (the same specs the CLI draws in the terminal with plotext) as a PNG with matplotlib's
    Agg canvas (imported here, not at module import; pyplot and its global backend are not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    kind = plot["kind"]
    if kind == "line":
        for label, ys in plot["series"].items():
            ax.plot([str(v) for v in plot["x"]], ys, marker="o", label=label)
    elif kind == "bar":
        n = len(plot["series"])
        width = 0.8 / max(n, 1)
        for k, (label, ys) in enumerate(plot["series"].items()):
            ax.bar([i + (k - (n - 1) / 2) * width for i in range(len(plot["x"]))], ys, width, label=label)
        ax.set_xticks(range(len(plot["x"])), [str(v) for v in plot["x"]])
    elif kind == "hist":
        xs = plot["x"]
        step = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
        for label, ys in plot["series"].items():
            ax.bar(xs, ys, width=step, alpha=0.5, label=label)
    elif kind == "matrix":
        m = plot["matrix"]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
        ax.set_xticks(range(len(plot["xlabels"])), plot["xlabels"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(plot["ylabels"])), plot["ylabels"], fontsize=7)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 50 else "black", fontweight="bold" if i == j else "normal")
        fig.colorbar(im, ax=ax, label="PGD accuracy %")
    else:
        raise ValueError(f"unknown plot kind {kind!r}")
    ax.set_title(plot["title"])
    if plot.get("xlabel"):
        ax.set_xlabel(plot["xlabel"])
    if plot.get("ylabel"):
        ax.set_ylabel(plot["ylabel"])
    if kind != "matrix":
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


