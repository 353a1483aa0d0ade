"""The real dashboard driven by real key presses (App.run_test + Pilot) against a real engine."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from robprune.engine.control import send_to_run_dir
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY
from robprune.tui.app import RobpruneApp
from robprune.tui.backend import AttachBackend, SessionBackend
from robprune.tui.widgets.layer_table import LayerTable


async def until(pred, timeout=60.0, what=""):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "robprune-engine" and t.is_alive()]


def long_session(tmp_path: Path) -> Session:
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.pretrain.epochs=1", "phases.admm.epochs=500", "admm.update_every=1000"],
                    tmp_path / "run")
    s.prepare()
    return s


def types(run_dir: Path) -> list[str]:
    return [e["type"] for e in read_jsonl(run_dir / "events.jsonl")]


def test_keys_drive_the_engine(tmp_path):
    """p pauses (the step counter stands still for seconds) and resumes; r changes rho in the engine and in
    events.jsonl; e evaluates; c checkpoints; x exports; q asks, checkpoints, stops, leaves no thread."""
    s = long_session(tmp_path)
    rd = s.rundir.path
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: s.engine.admm is not None and s.engine.step > 12, what="ADMM phase")
            # --- pause / resume
            await pilot.press("p")
            await until(lambda: s.state == "paused", what="paused")
            await until(lambda: app.rs.state == "paused", what="dashboard shows paused")
            step = s.engine.step
            await asyncio.sleep(3.0)
            assert s.engine.step == step
            await pilot.press("p")
            await until(lambda: s.engine.step > step + 2, what="steps after resume")
            assert app.rs.state == "running"
            # --- rho for the selected layer (row 2 = fc1.weight), set to 0.125
            table = app.query_one(LayerTable)
            await until(lambda: table.row_count == 4, what="layer rows")
            table.focus()
            await pilot.press("down", "down")
            assert table.selected_layer == "fc1.weight"
            await pilot.press("r")
            await pilot.pause()
            await pilot.press(*"0.125")
            await pilot.click("#scope-one")
            await pilot.click("#apply")
            await until(lambda: s.engine.admm.rho["fc1.weight"] == 0.125, what="rho applied")
            assert s.engine.admm.rho["conv1.weight"] != 0.125
            # a bad value is refused in the dialog, nothing is sent
            await pilot.press("r")
            await pilot.pause()
            await pilot.press(*"-1", "enter")
            await pilot.pause()
            assert "expected a positive number" in str(app.screen.query_one("#rho-error").render())
            await pilot.press("escape")
            # --- evaluate, checkpoint, export
            await pilot.press("e")
            await until(lambda: sum(1 for r in read_jsonl(rd / "metrics.jsonl")
                                    if r["type"] == "eval" and r["reason"] == "now") == 1, what="eval now")
            (rd / "checkpoint.pt").unlink()
            await pilot.press("c")
            await until(lambda: (rd / "checkpoint.pt").exists(), what="checkpoint file")
            await pilot.press("x")
            await until(lambda: (rd / "metrics.csv").exists() and (rd / "summary.md").exists(), what="export")
            json.loads((rd / "summary.json").read_text())
            # --- quit: confirm, stop, exit
            await pilot.press("q")
            await pilot.pause()
            await pilot.press("y")
            await until(lambda: not s.alive, what="engine stopped")

    asyncio.run(scenario())
    assert not engine_threads()
    ev = read_jsonl(rd / "events.jsonl")
    rho = [e for e in ev if e["type"] == "set_rho"]
    assert len(rho) == 1 and rho[0]["layer"] == "fc1.weight" and rho[0]["value"] == 0.125 and not rho[0]["multiply"]
    t = [e["type"] for e in ev]
    for k in ("pause", "resume", "eval_now", "checkpoint_now", "export", "stop"):
        assert k in t, k
    assert t[-1] == "finished" and ev[-1]["status"] == "stopped"
    assert [e for e in ev if e["type"] == "checkpoint"][-1]["reason"] == "stop"


def test_engine_error_shows_in_dashboard_and_export_still_works(tmp_path, monkeypatch):
    s = long_session(tmp_path)
    import robprune.engine.pipeline as pipeline

    real = pipeline.adversarial_step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("simulated device failure")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "adversarial_step", flaky)
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(lambda: app.rs.state == "error", what="error state")
            assert "simulated device failure" in app.rs.error
            assert any("Traceback" in text for _, level, text in app.rs.log if level == "traceback")
            await pilot.press("x")  # a checkpoint from epoch 0's end exists: export still works
            await until(lambda: (s.rundir.path / "summary.json").exists(), what="export after error")
            await pilot.press("q")  # no confirmation: nothing is running any more

    asyncio.run(scenario())
    assert not engine_threads()
    err = [e for e in read_jsonl(s.rundir.path / "events.jsonl") if e["type"] == "error"]
    assert err and "simulated device failure" in err[0]["message"] and "Traceback" in err[0]["traceback"]


def test_attached_dashboard_follows_a_headless_run_and_pauses_it(tmp_path):
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    rd = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "robprune", "run", str(prof), "--run-dir", str(rd), "-q",
                             "--set", "phases.admm.epochs=500"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not any(r["type"] == "step" for r in read_jsonl(rd / "metrics.jsonl")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 120
            time.sleep(0.1)
        app = RobpruneApp(AttachBackend(rd, poll_s=0.1), refresh_hz=10)

        async def scenario():
            async with app.run_test(size=(120, 40)) as pilot:
                await until(lambda: app.rs.step > 0 and app.rs.state == "running", what="following")
                await pilot.press("p")
                await until(lambda: "pause" in types(rd), timeout=30, what="remote pause")
                await until(lambda: app.rs.state == "paused", what="attached shows paused")
                last = max(r["step"] for r in read_jsonl(rd / "metrics.jsonl") if r["type"] == "step")
                await asyncio.sleep(2.0)
                assert max(r["step"] for r in read_jsonl(rd / "metrics.jsonl") if r["type"] == "step") == last
                await pilot.press("p")
                await until(lambda: "resume" in types(rd), timeout=30, what="remote resume")
                await until(lambda: app.rs.step > last, what="attached follows new steps")
                await pilot.press("q")  # detaches only: the run goes on

        asyncio.run(scenario())
        time.sleep(0.5)
        assert proc.poll() is None  # quitting an attached dashboard never stops the run
        send_to_run_dir(rd, "stop")
        assert proc.wait(60) == 0
        assert types(rd)[-1] == "finished"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_finished_run_shows_summary_panel_export_and_quit(tmp_path):
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.pretrain.epochs=1", "phases.admm.epochs=1", "phases.retrain.epochs=1"],
                    tmp_path / "run")
    s.prepare()
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(lambda: type(app.screen).__name__ == "SummaryScreen", what="summary panel")
            assert app.rs.state == "finished"
            summary = app.rs.summary
            assert summary["sparsity"]["prunable_nonzero"] < summary["sparsity"]["prunable_params"]
            (s.rundir.path / "summary.md").unlink()
            await pilot.press("x")  # works from the summary panel
            await until(lambda: (s.rundir.path / "summary.md").exists(), what="export")
            await pilot.press("q")  # finished: no confirmation

    asyncio.run(scenario())
    assert not engine_threads()
    assert app.return_code in (0, None)


def test_resumed_run_shows_its_history(tmp_path):
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.admm.epochs=50"], tmp_path / "run")
    s.prepare()
    s.subscribe(lambda e: s.stop() if getattr(e, "type", "") == "eval" and e.phase == "admm" else None)
    s.run()
    assert s.state == "stopped"
    evals_before = sum(1 for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval")
    r = Session.resume(tmp_path / "run", on_nonfinite="pause")
    r.prepare()
    app = RobpruneApp(SessionBackend(r), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            # the history arrives before the engine's first new step: earlier evaluations and phases
            await until(lambda: len(app.rs.eval_adv) >= evals_before, what="history replayed")
            assert any("phase pretrain" in text for _, _, text in app.rs.log)
            await pilot.press("q")
            await pilot.pause()
            await pilot.press("y")
            await until(lambda: not r.alive, what="engine stopped")

    asyncio.run(scenario())
    assert not engine_threads()


def test_tui_bad_input_is_one_line_exit_2(tmp_path):
    for args, part in ((["nope.toml"], "nope.toml"), (["--attach", str(tmp_path)], "not a robprune run directory"),
                       ([], "exactly one of PROFILE")):
        r = subprocess.run([sys.executable, "-m", "robprune.tui.main", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and part in lines[0] and "Traceback" not in r.stderr, r.stderr
