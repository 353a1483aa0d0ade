"""The plots' whole-run history: bounded memory, spikes kept at any zoom, the three x ranges."""
from __future__ import annotations

import math

from robprune.tui.history import History
from robprune.tui.state import RECENT_S, RunState


def test_short_series_are_kept_exactly():
    h = History(capacity=8, tail=100)
    for i in range(50):
        h.append(i, i * i, t=float(i))
    assert len(h) == 50
    assert h.view(160) == [(float(i), float(i * i)) for i in range(50)]


def test_memory_is_bounded_and_every_point_is_counted():
    h = History(capacity=64, tail=32)
    for i in range(100_000):
        h.append(i, math.sin(i / 100), t=float(i))
    assert len(h) == 100_000
    assert len(h.buckets) <= 64 and len(h.tail) == 32
    assert sum(b[7] for b in h.buckets) == 100_000  # every point is in exactly one bucket
    assert h.buckets[0][0] == 0 and h.buckets[-1][1] == 99_999


def test_a_single_spike_survives_merges_and_decimation():
    h = History(capacity=16, tail=8)
    for i in range(200_000):
        h.append(i, 1000.0 if i == 123_457 else (-50.0 if i == 7 else 1.0), t=float(i))
    v = h.view(20)
    assert len(v) <= 21
    assert (123_457.0, 1000.0) in v and (7.0, -50.0) in v
    xs = [x for x, _ in v]
    assert xs == sorted(xs)
    assert xs[-1] == 199_999.0  # the x range ends where the run is


def test_windows_by_step_and_by_time():
    h = History(capacity=32, tail=1000)
    for i in range(10_000):
        h.append(i, float(i), t=1000.0 + i)
    recent = h.view(2000, t_min=1000.0 + 9_500)
    assert recent[0] == (9_500.0, 9_500.0) and recent[-1] == (9_999.0, 9_999.0) and len(recent) == 500
    phase = h.view(40, x_min=5_000)  # older than the raw tail: from buckets
    assert phase[0][0] >= 4_000 and phase[-1][0] == 9_999.0
    assert min(y for _, y in phase) <= 5_400 and max(y for _, y in phase) == 9_999.0


def test_non_finite_values_are_not_plotted():
    h = History()
    for y in (1.0, math.nan, math.inf, -math.inf, 2.0, "x", None):
        h.append(1, y)
    assert len(h) == 2 and [y for _, y in h.view()] == [1.0, 2.0]


def test_run_state_windows_follow_the_phase_and_the_clock():
    rs = RunState()
    t = 1_000_000.0
    step = 0
    for phase, n in (("pretrain", 3000), ("admm", 3000)):
        rs.apply({"type": "phase", "t": t, "phase": phase, "index": 0, "epochs": 1, "step": step})
        for _ in range(n):
            step += 1
            t += 1.0
            rs.apply({"type": "step", "t": t, "phase": phase, "epoch": 0, "epochs": 1, "batch": 1, "batches": 9,
                      "step": step, "images_per_s": 1.0, "loss": 2.0, "lr": 0.1, "adv_acc": 0.5})
    assert rs.window("run") == {}
    assert rs.window("phase") == {"x_min": 3000}
    assert rs.window("recent") == {"t_min": t - RECENT_S}
    assert rs.train_acc.view(10_000, **rs.window("phase"))[0][0] >= 3000
    assert len(rs.train_acc.view(10_000, **rs.window("recent"))) == RECENT_S + 1
    assert len(rs.train_acc) == 6000


def test_history_benchmark_reports_every_plot_and_view():
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "robprune", "bench", "--history", "30000"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["step_records"] == 30000 and out["records"] == 30000 + 2 + 30 + (15000 // 50 + 1)  # steps, 2 phases, evals, residuals
    assert set(out["redraw_ms"]) == {"accuracy %", "ADMM residuals (log)", "loss / lr"}
    assert all(set(v) == {"run", "phase", "recent"} for v in out["redraw_ms"].values())
    assert out["points_kept_per_series"] <= 2048 + 4096 < 30000  # bounded, whatever the run's length
    assert 0 < out["state_memory_mb"] < 300


def test_a_record_missing_its_fields_is_skipped_with_a_warning():
    """A line of a followed run directory that parses but lacks what its type needs never ends the dashboard."""
    rs = RunState()
    for r in ({"type": "step", "t": 1.0}, {"type": "eval", "step": 3, "nat_acc": "x"},
              {"type": "residuals", "layers": [1, 2]}, {"type": ["step"]}):
        rs.apply(r)
    warnings = [text for _, level, text in rs.log if level == "warning"]
    assert len(warnings) == 3 and all("record was skipped" in w for w in warnings), warnings
    rs.apply({"type": "step", "t": 2.0, "phase": "admm", "epoch": 0, "epochs": 1, "batch": 1, "batches": 9,
              "step": 5, "images_per_s": 1.0, "loss": 2.0, "lr": 0.1, "adv_acc": 0.5})
    assert rs.step == 5 and len(rs.train_acc) == 1
