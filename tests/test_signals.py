"""Signals on a real `robprune run` process: SIGTERM and SIGHUP (a dropped SSH session) checkpoint and exit 0,
the first Ctrl-C checkpoints and exits 130, a second Ctrl-C exits 130 at once; each stopped run resumes."""
from __future__ import annotations

import json
import os
import pty
import signal
import threading
import time

import pytest
import torch

from tests.conftest import TINY
from tests.runproc import records, robprune, spawn, training, wait_for, one_line_error

SHORT = TINY.replace("epochs = 2", "epochs = 1").replace("epochs = 3", "epochs = 1")
TOTAL_STEPS = 8 * 3


@pytest.fixture
def short_profile(tmp_path):
    p = tmp_path / "short.toml"
    p.write_text(SHORT)
    return p


def _stopped_with_checkpoint(rd):
    ev = records(rd / "events.jsonl")
    stops = [e for e in ev if e["type"] == "checkpoint" and e["reason"] == "stop"]
    assert len(stops) == 1, [e["type"] for e in ev]
    assert not any(e["type"] == "error" for e in ev)
    assert [e["status"] for e in ev if e["type"] == "finished"] == ["stopped"]
    ck = torch.load(rd / "checkpoint.pt", weights_only=True)
    assert ck["step"] == stops[0]["step"] and 0 < ck["step"] < TOTAL_STEPS
    return ck


def _resumes_to_completion(rd):
    r = robprune("run", "--resume", rd, "-q")
    assert r.returncode == 0, r.stderr
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == TOTAL_STEPS
    steps = [m["step"] for m in records(rd / "metrics.jsonl") if m["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS


def _signal_stops_with_checkpoint_and_resumes(tmp_path, profile, sig, returncode) -> str:
    """A run sent ``sig`` once it trains exits with ``returncode`` and the resume hint, without a traceback; its
    stop checkpoint resumes to completion. Returns the stopped run's stderr."""
    rd = tmp_path / "r"
    p = spawn("run", profile, "--run-dir", rd)
    wait_for(training(rd), p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == returncode, err
    assert f"stopped; resume with: robprune run --resume {rd}" in err
    assert "Traceback" not in err
    _stopped_with_checkpoint(rd)
    _resumes_to_completion(rd)
    return err


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, short_profile):
    _signal_stops_with_checkpoint_and_resumes(tmp_path, short_profile, signal.SIGTERM, 0)


def test_sighup_after_the_terminal_is_gone_checkpoints_exits_0_and_resumes(tmp_path, short_profile):
    """The process prints to a pseudo-terminal (progress bar on); the terminal goes away (its master side
    closes, as when sshd drops the connection) and SIGHUP follows."""
    rd = tmp_path / "r"
    master, slave = pty.openpty()
    p = spawn("run", short_profile, "--run-dir", rd, stdout=slave, stderr=slave)
    os.close(slave)
    seen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    wait_for(training(rd), p)
    wait_for(lambda: b"run directory" in seen, p)
    os.close(master)  # hang up: from now on writes to the terminal fail
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=120) == 0
    _stopped_with_checkpoint(rd)
    _resumes_to_completion(rd)


def test_first_ctrl_c_stops_with_a_checkpoint_exit_130(tmp_path, short_profile):
    err = _signal_stops_with_checkpoint_and_resumes(tmp_path, short_profile, signal.SIGINT, 130)
    assert "stopping at the next step with a checkpoint (Ctrl-C again to stop at once)" in err
    assert "KeyboardInterrupt" not in err


def test_second_ctrl_c_stops_at_once_and_the_run_directory_is_locked_meanwhile(tmp_path, short_profile):
    """Steps take seconds here (3000 PGD steps each): the second Ctrl-C does not wait for the step to end.

    The steps must be long against the refused second process's start-up (a few seconds of importing torch on
    loaded cores) and the 0.3 s between the two signals: were the first signal's graceful stop to end the run
    before the second arrives, the second would meet an exiting interpreter."""
    rd = tmp_path / "r"
    p = spawn("run", short_profile, "--run-dir", rd, "--set", "attack.train.steps=3000")
    wait_for(training(rd), p, timeout=300)
    # a second process on the same run directory is refused, naming the holder
    other = robprune("run", "--resume", rd)
    one_line_error(other, str(rd), "in use by another robprune process", f"(pid {p.pid})", "kill -TERM")
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)  # let the first be handled (two signals sent at once may arrive as one)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert time.monotonic() - t0 < 5
    assert f"robprune: stopped at once; resume from the last checkpoint with: robprune run --resume {rd}" in err
    assert "Traceback" not in err
    ev = records(rd / "events.jsonl")
    assert not any(e["type"] == "finished" for e in ev)  # it did not wait for the graceful stop


def test_sigterm_stops_an_experiment_with_a_checkpoint_and_a_rerun_resumes(tmp_path, short_profile):
    out = tmp_path / "exp"
    first = out / "runs" / "adv-w2-s0"  # the tiny preset's one seed
    p = spawn("experiment", "lottery", short_profile, "--out", out, "--preset", "tiny", "--no-plots")
    wait_for(training(first), p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert f"stopped: {first} keeps its checkpoint; run the same command again to resume" in err
    assert "Traceback" not in err
    assert (first / "checkpoint.pt").is_file() and not (first / "model.pt").exists()
    r = robprune("experiment", "lottery", short_profile, "--out", out, "--preset", "tiny", "--no-plots")
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert {n: x["status"] for n, x in results["runs"].items()} == {
        "adv-w2-s0": "resumed", "lottery-w2-to-w1-s0": "trained", "admm-w2-to-w1-s0": "trained"}


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path, short_profile):
    """`nohup robprune run ...`: SIGHUP is ignored when the process starts, and stays ignored, so the run goes on
    to completion after the terminal is gone."""
    rd = tmp_path / "r"
    p = spawn("run", short_profile, "--run-dir", rd, "-q",
              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for(training(rd), p)
    p.send_signal(signal.SIGHUP)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    ev = records(rd / "events.jsonl")
    assert [e["status"] for e in ev if e["type"] == "finished"] == ["completed"]
    assert not [e for e in ev if e["type"] == "checkpoint" and e["reason"] == "stop"]
