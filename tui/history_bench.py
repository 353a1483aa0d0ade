"""``robprune bench --history N``: a long run's records through the dashboard's state and plots.

N step records (with an ADMM residual record every 50 steps and an evaluation every 1000, as a multi-day run
emits them) go through :class:`~robprune.tui.state.RunState`; then each plot is redrawn (data selection, plotext
build, conversion to rich text) in a headless Textual app, for each x range. Prints one JSON object: the ingest
rate, the memory the state holds afterwards (tracemalloc, a second pass), and the median redraw time per plot and
x range.
"""
from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc

from robprune.tui.state import VIEWS, RunState


def _records(n: int):
    t0 = 1.7e9
    yield {"type": "phase", "t": t0, "phase": "pretrain", "index": 0, "epochs": 10, "step": 0}
    for i in range(1, n + 1):
        t = t0 + i * 0.5
        if i == n // 2:
            yield {"type": "phase", "t": t, "phase": "admm", "index": 1, "epochs": 10, "step": i}
        yield {"type": "step", "t": t, "phase": "admm" if i >= n // 2 else "pretrain", "epoch": i // 1000,
               "epochs": 10, "batch": i % 1000, "batches": 1000, "step": i, "images_per_s": 900.0,
               "loss": 2.0 / (1 + i / 1e5) + 0.05 * ((i * 7919) % 13) / 13, "lr": 0.01, "adv_acc": 0.5,
               "penalty": 0.0}
        if i >= n // 2 and i % 50 == 0:
            yield {"type": "residuals", "t": t, "step": i, "epoch": i // 1000, "phase": "admm",
                   "update": (i - n // 2) // 5000,
                   "layers": {"a": {"primal": 1.0 / (1 + (i - n // 2) / 1e3), "dual": 0.01, "rho": 0.1}}}
        if i % 1000 == 0:
            yield {"type": "eval", "t": t, "step": i, "epoch": i // 1000, "phase": "pretrain", "nat_acc": 0.9,
                   "adv_acc": 0.4 + 0.1 * ((i // 1000) % 3), "n": 500, "attack": {"kind": "pgd", "steps": 20},
                   "reason": "periodic"}


def _ingest(n: int) -> tuple[RunState, float, int]:
    rs = RunState()
    count = 0
    t = time.perf_counter()
    for r in _records(n):
        rs.apply(r)
        count += 1
    return rs, time.perf_counter() - t, count


def run_history_bench(n: int = 500_000, width: int = 250, height: int = 80, repeats: int = 7) -> dict:
    rs, seconds, count = _ingest(n)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    held, _, _ = _ingest(n)
    gc.collect()
    added = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del held
    redraw = asyncio.run(_redraw_times(rs, width, height, repeats))
    worst = max(v for per in redraw.values() for v in per.values())
    return {"records": count, "step_records": n, "ingest_s": round(seconds, 3),
            "ingest_records_per_s": round(count / seconds), "state_memory_mb": round(added / 2**20, 2),
            "terminal": [width, height], "redraw_ms": redraw, "worst_redraw_ms": worst,
            "points_kept_per_series": len(rs.loss_series.buckets) + len(rs.loss_series.tail)}


async def _redraw_times(rs: RunState, width: int, height: int, repeats: int) -> dict:
    from textual.app import App

    from robprune.tui.widgets.plots import AccuracyPlot, LossPlot, ResidualPlot

    class Plots(App):
        CSS = "Screen { layout: horizontal; } * { width: 1fr; height: 1fr; }"

        def compose(self):
            yield AccuracyPlot()
            yield ResidualPlot()
            yield LossPlot()

    out: dict = {}
    app = Plots()
    async with app.run_test(size=(width, height)):
        for cls in (AccuracyPlot, ResidualPlot, LossPlot):
            w = app.query_one(cls)
            out[w.title] = {}
            for view in VIEWS:
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    w.render_state(rs, view)
                    w.render()
                    times.append(time.perf_counter() - t)
                    if w._failure is not None:
                        raise RuntimeError(w._failure)
                out[w.title][view] = round(statistics.median(times) * 1000, 2)
    return out
