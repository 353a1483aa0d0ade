"""The real dashboard driven by real key presses (App.run_test + Pilot) against a real engine."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import textwrap
import time
from pathlib import Path

import pytest

from robprune.engine.control import Stop, send_to_run_dir
from robprune.engine.rundir import RunDir, read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY
from robprune.tui.app import RobpruneApp
from robprune.tui.backend import AttachBackend, SessionBackend
from robprune.tui.widgets.header import RunHeader
from robprune.tui.widgets.layer_table import LayerTable
from robprune.tui.widgets.plots import AccuracyPlot, LossPlot, ResidualPlot
from textual.events import Paste, Resize
from textual.geometry import Size


async def until(pred, timeout=60.0, what=""):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


async def quit_and_stop(pilot, s: Session) -> None:
    """q, confirm with y, and wait for the engine to stop (with its checkpoint)."""
    await pilot.press("q")
    await pilot.pause(0.05)
    await pilot.press("y")
    await until(lambda: not s.alive, what="engine stopped")


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
            assert "expected a number from 1e-08 to 1e+06, found -1" in str(app.screen.query_one("#rho-error").render())
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
            await quit_and_stop(pilot, s)

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
        send_to_run_dir(rd, Stop())
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
    bells = []
    app.bell = lambda: bells.append(app.rs.state)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await until(lambda: type(app.screen).__name__ == "SummaryScreen", what="summary panel")
            assert bells == ["finished"]  # one bell when the run finishes
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


SIZES = [(60, 20), (250, 80), (80, 24), (200, 60), (61, 21), (160, 50), (100, 30), (250, 79), (120, 40),
         (73, 27), (180, 45)]


def test_resizes_and_theme_changes_in_every_phase_never_stop_the_run(tmp_path):
    """Eleven terminal sizes from 60x20 to 250x80 in each phase, with data on every plot the phase has (the ADMM
    residual plot with primal and dual residuals), a theme change and every x range: no plot fails, the app keeps
    running and the step counter keeps rising. (plotext's own log scale failed on the second build of a figure.)"""
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["data.synthetic_train=1024", "phases.pretrain.epochs=6", "phases.admm.epochs=60",
                           "phases.retrain.epochs=300", "eval.every=1"], tmp_path / "run")
    s.prepare()
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)
    seen_phases = []

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            plots = [app.query_one(p) for p in (AccuracyPlot, ResidualPlot, LossPlot)]
            for phase, ready in (("pretrain", lambda: app.rs.eval_adv and app.rs.loss_series),
                                 ("admm", lambda: app.rs.primal_series and app.rs.dual_series),
                                 ("retrain", lambda: app.rs.phase == "retrain" and app.rs.train_acc)):
                await until(lambda: s.engine.phase == phase and ready(), timeout=120, what=f"{phase} with data")
                seen_phases.append(s.engine.phase)
                step = s.engine.step
                for i, (w, h) in enumerate(SIZES):
                    # as Pilot.resize_terminal, without its wait for an idle CPU (the engine keeps it busy)
                    app._driver._size = Size(w, h)
                    app.post_message(Resize(Size(w, h), Size(w, h)))
                    await until(lambda: app.size == Size(w, h), what=f"resized to {w}x{h}")
                    app._plot_t = 0.0  # draw the plots at this size now, not at their 1 Hz pace
                    app.redraw()
                    await pilot.pause(0.05)
                    for plot in plots:  # build each figure again at this size, as the compositor does
                        plot.render()
                        assert plot._failure is None, plot._failure
                    if i == 4:
                        app.theme = "textual-light" if app.theme != "textual-light" else "textual-dark"
                        await pilot.press("v")  # next x range
                        await pilot.pause(0.05)
                await until(lambda: s.engine.step > step, what=f"steps go on in {phase}")
                assert app.is_running and s.alive
            await quit_and_stop(pilot, s)

    asyncio.run(scenario())
    assert seen_phases == ["pretrain", "admm", "retrain"]
    assert app._exception is None
    failures = [text for _, level, text in app.rs.log if level == "warning" and "failed" in text]
    assert failures == []
    assert app.view == "run"  # three presses of v: run -> phase -> recent -> run
    ev = read_jsonl(s.rundir.path / "events.jsonl")
    assert ev[-1]["type"] == "finished" and ev[-1]["status"] == "stopped"


def test_a_failing_plot_shows_a_notice_and_the_run_goes_on(tmp_path, monkeypatch):
    """Any exception while a plot draws or renders: a notice in its place, one warning in the log, the app and
    the engine keep going, and the other plots still draw."""
    def boom(self, s, window):
        raise RuntimeError("plotting bug")

    monkeypatch.setattr(LossPlot, "draw", boom)
    s = long_session(tmp_path)
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.rs.loss_series and app.query_one(LossPlot)._failure, what="plot failure")
            step = s.engine.step
            for _ in range(3):
                app._plot_t = 0.0
                app.redraw()
                await pilot.pause(0.1)
            await until(lambda: s.engine.step > step + 5, what="steps go on")
            assert "plot unavailable (RuntimeError)" in str(app.query_one(LossPlot).render())
            assert app.query_one(AccuracyPlot)._failure is None
            assert app.is_running
            await quit_and_stop(pilot, s)

    asyncio.run(scenario())
    warnings = [text for _, level, text in app.rs.log if level == "warning" and "loss / lr plot" in text]
    assert len(warnings) == 1 and "RuntimeError: plotting bug" in warnings[0], warnings


DIALOG_HOSTILE = ["1e39", "inf", "-inf", "nan", "1e308", "0", "-1", "abc", "0x10", "1e-9", "", "9" * 400]


def test_hostile_rho_dialog_entries_are_refused_before_sending(tmp_path):
    """Each entry is refused in the dialog with the accepted range; nothing reaches the engine; the run goes on."""
    s = long_session(tmp_path)
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: s.engine.admm is not None and s.engine.step > 12, what="ADMM phase")
            await pilot.press("p")  # paused, the CPU is idle and Pilot's key presses do not wait for it
            await until(lambda: s.state == "paused", what="paused")
            before = dict(s.engine.admm.rho)
            for entry in DIALOG_HOSTILE:
                await pilot.press("r")
                await pilot.pause(0.05)
                if len(entry) > 12:  # pasted, as a person would a long string
                    app.screen.query_one("#rho-value").post_message(Paste(entry))
                    await until(lambda: app.screen.query_one("#rho-value").value == entry, what="pasted")
                elif entry:
                    await pilot.press(*entry)
                await pilot.press("enter")
                await until(lambda: str(app.screen.query_one("#rho-error").render()),
                            what=f"the dialog's answer to {entry[:12]!r}")
                msg = str(app.screen.query_one("#rho-error").render())
                assert "expected a number from 1e-08 to 1e+06" in msg, (entry, msg)
                await pilot.press("escape")
                await pilot.pause(0.05)
            # multiply mode states its own range
            await pilot.press("r")
            await pilot.pause(0.05)
            await pilot.press(*"5000")
            radio = lambda i: str(app.screen.query_one(i).render())  # noqa: E731
            assert "\u25cf" in radio("#mode-set") and "\u25cb" in radio("#mode-mul")  # told apart without colour
            await pilot.click("#mode-mul")
            await pilot.pause(0.05)
            assert "\u25cb" in radio("#mode-set") and "\u25cf" in radio("#mode-mul")
            await pilot.click("#apply")
            await pilot.pause(0.05)
            assert "factor: expected a number from 0.001 to 1000, found 5000" in str(
                app.screen.query_one("#rho-error").render())
            await pilot.press("escape")
            assert s.engine.admm.rho == before
            step = s.engine.step
            await pilot.press("p")
            await until(lambda: s.engine.step > step + 5, what="steps go on")
            await quit_and_stop(pilot, s)

    asyncio.run(scenario())
    assert not [e for e in read_jsonl(s.rundir.path / "events.jsonl") if e["type"] == "set_rho"]


def test_attach_to_a_dead_run_says_not_running_and_how_to_resume(tmp_path):
    """An engine killed with SIGKILL leaves its lock free: an attached dashboard shows NOT RUNNING and the resume
    command, and keys that need an engine say so instead of writing commands nobody reads."""
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    rd = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "robprune", "run", str(prof), "--run-dir", str(rd), "-q",
                             "--set", "phases.admm.epochs=500"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not any(r["type"] == "step" for r in read_jsonl(rd / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() - t0 < 120
            time.sleep(0.1)
        assert RunDir(rd).engine_running()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not RunDir(rd).engine_running()
    app = RobpruneApp(AttachBackend(rd, poll_s=0.1, liveness_s=0.2), refresh_hz=10)
    notes = []

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            app.notify = lambda msg, **kw: notes.append(msg)
            await until(lambda: app.rs.state == "not running", what="not running")
            await pilot.pause(0.3)
            assert "NOT RUNNING" in str(app.query_one(RunHeader).render())
            for key in "pec":
                await pilot.press(key)
            await pilot.pause(0.1)
            await pilot.press("q")

    asyncio.run(scenario())
    refused = [n for n in notes if n.startswith("no engine is running this run")]
    assert len(refused) == 3 and all(f"robprune-tui --resume {rd}" in n for n in refused), notes
    assert notes[-1] == "leaving; the run directory is untouched"
    assert not (rd / "commands.jsonl").exists()
    assert any(f"resume it with: robprune-tui --resume {rd}" in text for _, _, text in app.rs.log)


def test_step_records_carry_the_resources_and_the_header_shows_them(tmp_path):
    s = long_session(tmp_path)
    app = RobpruneApp(SessionBackend(s), refresh_hz=10)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.rs.resources.get("host_rss_mb"), what="resources")
            await pilot.pause(0.3)
            header = str(app.query_one(RunHeader).render())
            assert "host RSS" in header and "CPU" in header and "GPU" not in header  # a CPU-only machine
            # the run's actions are in the command palette too
            await pilot.press("ctrl+p")
            await pilot.pause(0.2)
            await pilot.press(*"Evaluate now")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await until(lambda: any(r["type"] == "eval" and r["reason"] == "now"
                                    for r in read_jsonl(s.rundir.metrics)), what="evaluation from the palette")
            await quit_and_stop(pilot, s)

    asyncio.run(scenario())
    steps = [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "step"]
    assert steps and all(50 < r["resources"]["host_rss_mb"] < 64_000 and r["resources"]["cpu_pct"] >= 0
                         for r in steps)


def test_detach_starts_a_run_that_outlives_the_dashboard(tmp_path):
    """--detach: the run starts in a session of its own (no terminal's hang-up reaches it), writes its output to
    RUN_DIR/output.log, and the dashboard attaches; quitting the dashboard leaves it running."""
    from robprune.tui.main import start_detached

    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    rd = start_detached(prof, ["phases.admm.epochs=500"], tmp_path / "run", None)
    assert rd == tmp_path / "run" and RunDir(rd).engine_running()
    pid = int((rd / ".lock").read_text().split()[0])
    try:
        assert os.getsid(pid) == pid != os.getsid(0)  # a session leader of its own
        assert (rd / "output.log").exists()
        app = RobpruneApp(AttachBackend(rd, poll_s=0.1), refresh_hz=10)

        async def scenario():
            async with app.run_test(size=(120, 40)) as pilot:
                await until(lambda: app.rs.step > 0 and app.rs.state == "running", what="following")
                await pilot.press("q")

        asyncio.run(scenario())
        time.sleep(0.5)
        assert RunDir(rd).engine_running()  # the dashboard is gone, the run is not
        send_to_run_dir(rd, Stop())
        t0 = time.monotonic()
        while RunDir(rd).engine_running():
            assert time.monotonic() - t0 < 120
            time.sleep(0.1)
        assert types(rd)[-1] == "finished"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_detach_with_bad_input_fails_in_the_foreground(tmp_path):
    from robprune.engine.errors import UserError
    from robprune.tui.main import start_detached

    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("a user's file")
    with pytest.raises(UserError, match="not empty.*the background run did not start"):
        start_detached(prof, [], tmp_path / "taken", None)
    assert (tmp_path / "taken" / "x").read_text() == "a user's file"


def test_a_dashboard_that_dies_leaves_the_run_training_headless(tmp_path):
    """The real robprune-tui, headless, with a failure injected into its record handler after a few records (an
    exception no panel catches): the app ends, the run goes on in the same process to the end, events.jsonl
    names the dashboard failure with its traceback, and the process says how to attach."""
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    rd = tmp_path / "run"
    launcher = textwrap.dedent(f"""
        import sys
        from robprune.tui.app import RobpruneApp
        seen = [0]
        real = RobpruneApp.on_engine_record
        def on_engine_record(self, message):
            seen[0] += 1
            if seen[0] == 20:
                raise RuntimeError("injected dashboard failure")
            return real(self, message)
        RobpruneApp.on_engine_record = on_engine_record
        real_run = RobpruneApp.run
        RobpruneApp.run = lambda self, **kw: real_run(self, headless=True)
        sys.argv = ["robprune-tui", {str(prof)!r}, "--run-dir", {str(rd)!r}, "--set", "phases.admm.epochs=2"]
        from robprune.tui.main import main
        main()
    """)
    r = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the dashboard failed (RuntimeError: injected dashboard failure); training goes on" in r.stderr
    assert f"robprune-tui --attach {rd}" in r.stderr
    ev = read_jsonl(rd / "events.jsonl")
    failed = [e for e in ev if e["type"] == "log" and e["message"].startswith("dashboard failed")]
    assert len(failed) == 1 and "injected dashboard failure" in failed[0]["traceback"]
    assert ev[-1]["type"] == "finished" and ev[-1]["status"] == "completed"
