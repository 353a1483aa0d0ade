"""Layout snapshots of the dashboard at 80x24 and 120x40, attached to a run directory whose records are fixed.

The screen is compared as text (characters, not colours), so the snapshot is readable in a diff. To
accept a deliberate layout change, run with ROBPRUNE_UPDATE_SNAPSHOTS=1 and review the new files.
"""
from __future__ import annotations

import asyncio
import difflib
import io
import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from textual.widgets import RichLog

from robprune.engine.rundir import RunDir
from robprune.tui.app import RobpruneApp
from robprune.tui.backend import AttachBackend

SNAPSHOTS = Path(__file__).parent / "snapshots"
T0 = 1_800_000_000.0
LAYERS = [("conv1.weight", [8, 1, 5, 5], 0.5), ("conv2.weight", [16, 8, 5, 5], 0.9),
          ("fc1.weight", [256, 784], 0.95), ("fc2.weight", [10, 256], 0.9)]


def fixed_records() -> tuple[list[dict], list[dict]]:
    """A run 2 epochs into pretraining and 3 into ADMM (63 batches an epoch), as the engine would write it."""
    metrics, events = [], []
    t = T0
    step = 0
    events.append({"t": t, "type": "phase", "phase": "pretrain", "index": 0, "epochs": 2, "step": 0, "skipped": False})
    for phase, epochs in (("pretrain", 2), ("admm", 3)):
        if phase == "admm":
            events.append({"t": t, "type": "phase", "phase": "admm", "index": 1, "epochs": 6, "step": step,
                           "skipped": False})
            events.append({"t": t, "type": "log", "level": "info",
                           "message": "ADMM: Z = Proj(W), U = 0 for 4 layers, rho 0.1"})
        for epoch in range(epochs):
            for b in range(7, 64, 7):
                step += 7
                t += 1.0
                metrics.append({"t": t, "type": "step", "step": step, "epoch": epoch, "phase": phase, "batch": b,
                                "batches": 63, "epochs": 2 if phase == "pretrain" else 6,
                                "loss": 2.3 - 0.01 * step / 7, "adv_acc": min(0.9, 0.1 + step / 1000),
                                "penalty": 0.0, "lr": 0.002 if phase == "pretrain" else 0.001,
                                "images_per_s": 400.0})
            metrics.append({"t": t, "type": "eval", "step": step, "epoch": epoch + 1, "phase": phase,
                            "nat_acc": 0.9 + 0.01 * epoch, "adv_acc": 0.4 + 0.05 * epoch, "n": 500,
                            "attack": {"kind": "pgd", "eps": 0.3, "step_size": 0.025, "steps": 20, "restarts": 1},
                            "reason": "periodic"})
            layers = [{"name": n, "shape": s, "numel": _numel(s), "target": r, "scheme": "irregular",
                       "zeros": 0, "sparsity": 0.0, "at_or_below": r, "near_zero": 0.01 * (epoch + 1),
                       "primal": 0.5 / (epoch + 1) if phase == "admm" else None,
                       "rho": 0.1 if phase == "admm" else None} for n, s, r in LAYERS]
            metrics.append({"t": t, "type": "layers", "step": step, "epoch": epoch + 1, "phase": phase,
                            "layers": layers})
            if phase == "admm":
                metrics.append({"t": t, "type": "residuals", "step": step, "epoch": epoch + 1, "phase": phase,
                                "update": epoch, "layers": {n: {"primal": 0.5 / (epoch + 1), "dual": 0.05 * epoch,
                                                                "rho": 0.1 * 1.5 ** epoch} for n, _, _ in LAYERS}})
            events.append({"t": t, "type": "checkpoint", "path": "runs/demo/checkpoint.pt", "step": step,
                           "epoch": epoch + 1, "phase": phase, "reason": "epoch"})
    return metrics, events


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def make_run_dir(root: Path) -> Path:
    rd = root / "demo"
    rd.mkdir()
    (rd / "profile.toml").write_text('[run]\nname = "demo"\ndevice = "cpu"\n\n[phases.pretrain]\nepochs = 2\n\n'
                                     '[phases.admm]\nepochs = 6\n\n[phases.retrain]\nepochs = 4\n')
    metrics, events = fixed_records()
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (rd / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in events))
    return rd


def screen_text(app) -> str:
    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size,resizes", [((80, 24), []), ((120, 40), []),
                                          ((100, 30), [(250, 80), (60, 20), (100, 30)])],
                         ids=["80x24", "120x40", "100x30-after-resizes"])
def test_layout_snapshot(tmp_path, utc, size, resizes):
    rd = make_run_dir(tmp_path)
    lock = RunDir(rd)
    lock.acquire()  # as a live engine holds it: the dashboard shows the run as running
    app = RobpruneApp(AttachBackend(rd, poll_s=0.05), refresh_hz=20)
    metrics, events = fixed_records()
    n_checkpoints = sum(1 for e in events if e["type"] == "checkpoint")

    def settled() -> bool:  # layer records may be merged (latest value wins); the others all arrive
        rs = app.rs
        return (rs.step == 315 and len(rs.eval_adv) == 5 and len(rs.primal_series) == 3
                and sum(1 for _, lvl, _ in rs.log if lvl == "checkpoint") == n_checkpoints
                and rs.engine_running is True and app._drawn == rs.version and app._plotted == rs.version)

    async def scenario():
        async with app.run_test(size=size if not resizes else (120, 40)) as pilot:
            t0 = time.monotonic()
            while not settled():
                assert time.monotonic() - t0 < 60, "the dashboard never caught up with the run directory"
                await asyncio.sleep(0.05)
            # nothing more arrives: stop following, draw once more, and put the log at its end (no animation),
            # so the capture depends on the records alone, not on how busy the machine is
            app.backend.shutdown()
            for w, h in resizes:
                await pilot.resize_terminal(w, h)
            app._plotted, app._plot_t = -1, 0.0
            app.redraw()
            app.query_one(RichLog).scroll_end(animate=False, immediate=True)
            # then until the screen holds still: three captures in a row, 0.1 s apart, the same
            last, same, t1 = None, 0, time.monotonic()
            while same < 3:
                assert time.monotonic() - t1 < 30, "the dashboard never held still"
                await pilot.pause()
                await asyncio.sleep(0.1)
                text = screen_text(app)
                same = same + 1 if text == last else 1
                last = text
            return last

    try:
        text = asyncio.run(scenario())
    finally:
        lock.release()
    # the content is right whatever the layout: every layer, the state, the last evaluation
    assert "RUNNING" in text and "NOT RUNNING" not in text
    assert "admm" in text and "epoch 3/6" in text and "step 315" in text
    assert "nat 92.00%" in text and "PGD-20 50.00%" in text
    for name, _, _ in LAYERS:
        assert name.split(".")[0] in text
    name = f"dashboard_{size[0]}x{size[1]}" + ("_after_resizes" if resizes else "")
    path = SNAPSHOTS / f"{name}.txt"
    text = text.replace(str(rd), "RUN_DIR")
    if os.environ.get("ROBPRUNE_UPDATE_SNAPSHOTS") == "1" or not path.exists():
        path.write_text(text)
        if os.environ.get("ROBPRUNE_UPDATE_SNAPSHOTS") != "1":
            pytest.fail(f"snapshot {path.name} was missing and has been written; review it and run again")
    want = path.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "snapshot", "screen"))
    assert text == want, f"layout changed; see {path} (ROBPRUNE_UPDATE_SNAPSHOTS=1 to accept):\n{diff}"
