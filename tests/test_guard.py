"""The NaN / inf guard: a diverging run never overwrites its last good checkpoint; headless it stops with one
line and exit code 3, with a dashboard attached (on_nonfinite="pause") it pauses and says so."""
from __future__ import annotations

import math
import time

import pytest
import torch

from robprune.engine.control import CheckpointNow
from robprune.engine.errors import NonFiniteError
from robprune.engine.events import CheckpointSaved, LayerStats, LogLine, NonFinite
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY
from tests.runproc import one_line_error, robprune

# pretrain is sane; the ADMM phase uses plain SGD with rho = 1e8: |1 - lr * rho| >> 1, so W - Z blows up within
# a few steps and the loss turns inf / NaN
DIVERGE = ["phases.pretrain.epochs=1", "phases.admm.optimizer=sgd", "phases.admm.lr=0.01",
           "phases.admm.momentum=0.0", "admm.rho=1e6", "admm.rho_multiplier=100"]


def _finite_checkpoint(path):
    ck = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    return ck


def test_headless_run_that_diverges_stops_with_one_line_and_exit_3(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    rd = tmp_path / "r"
    r = robprune("run", p, "--run-dir", rd, "-q", *[a for o in DIVERGE for a in ("--set", o)])
    line = one_line_error(r, str(rd), "non-finite loss", "phase admm", "training diverged",
                          f"the last good checkpoint {rd / 'checkpoint.pt'}", "lower phases.admm.lr or admm.rho",
                          code=3)
    assert line.startswith("robprune: error: ")
    ck = _finite_checkpoint(rd / "checkpoint.pt")  # intact, loadable: the pretrain phase's end
    assert ck["phase"] == "pretrain" and ck["epoch"] == 1
    ev = read_jsonl(rd / "events.jsonl")
    nf = [e for e in ev if e["type"] == "nonfinite"]
    assert len(nf) == 1 and nf[0]["what"] == "loss" and nf[0]["action"] == "stop" and nf[0]["checkpoint_step"] == 8
    saved = [e for e in ev if e["type"] == "checkpoint" and e["path"].endswith("checkpoint.pt")]
    assert saved[-1]["phase"] == "pretrain"  # nothing written after the divergence
    assert not (rd / "model.pt").exists()
    assert _finite_checkpoint(rd / "best.pt")["phase"] == "pretrain"


def test_dashboard_session_pauses_and_says_so(tmp_path, tiny_profile):
    s = Session.new(tiny_profile, DIVERGE, tmp_path / "r", on_nonfinite="pause")
    got = []
    s.subscribe(got.append)
    s.prepare()
    s.start()
    t0 = time.monotonic()
    while s.state != "paused" and s.alive and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    assert s.state == "paused", s.error
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    nf = [e for e in got if isinstance(e, NonFinite)]
    assert len(nf) == 1 and nf[0].action == "pause" and nf[0].phase == "admm"
    logs = [e.message for e in got if isinstance(e, LogLine) and e.level == "error"]
    assert any(m.startswith("paused: ") and "non-finite" in m and "no checkpoint will be written" in m for m in logs)
    s.send(CheckpointNow())  # asked for by the user: refused, the last good one stays
    s.stop()
    assert s.join(60) and s.error is None
    assert s.state == "stopped"
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
    ck = _finite_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ck["phase"] == "pretrain"
    refused = [e.message for e in got if isinstance(e, LogLine) and "not written" in e.message]
    assert len(refused) == 2  # the command's and the stop's
    # the run directory still resumes from the good checkpoint
    r = Session.resume(tmp_path / "r")
    assert r.engine.resume_state["step"] == ck["step"]
    r.rundir.close()


def test_non_finite_weights_are_caught_before_a_checkpoint(tmp_path, tiny_profile):
    """A weight goes NaN between the last step and the epoch's checkpoint: the checkpoint is refused."""
    s = Session.new(tiny_profile, ["phases.pretrain.epochs=3"], tmp_path / "r")
    got = []

    def poison(e):
        got.append(e)
        if isinstance(e, LayerStats) and e.phase == "pretrain" and e.epoch == 2:
            with torch.no_grad():
                s.engine.model.fc1.weight[0, 0] = math.inf

    s.subscribe(poison)
    s.prepare()
    with pytest.raises(NonFiniteError) as ei:
        s.run()
    msg = str(ei.value)
    assert "non-finite weights in fc1.weight at step 16 (phase pretrain)" in msg
    assert f"the last good checkpoint {tmp_path / 'r' / 'checkpoint.pt'} (step 8, phase pretrain) is kept" in msg
    ck = _finite_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ck["step"] == 8
    nf = [e for e in got if isinstance(e, NonFinite)]
    assert nf[0].what == "weights" and nf[0].layers == ["fc1.weight"]
    assert [e.step for e in got if isinstance(e, CheckpointSaved) and e.reason != "best"] == [8]


def test_the_loss_check_costs_no_host_sync_per_step(tmp_path, tiny_profile, monkeypatch):
    """The flag lives on the device and is read only where metrics are emitted: the engine's code makes no
    tensor-to-host read (tolist, item, bool) per training step."""
    import sys

    s = Session.new(tiny_profile, ["phases.pretrain.epochs=1", "phases.admm.epochs=0", "phases.retrain.epochs=0",
                                   "run.log_interval_s=1000"], tmp_path / "r")
    s.prepare()
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            if "/engine/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                reads.append((name, s.engine.step))
            return real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("tolist", "item", "__bool__"):
        spy(name)
    s.engine.phase, s.engine.phase_index = "pretrain", 0
    s.engine._begin_phase("pretrain", s.cfg.phases.pretrain)
    s.engine._run_epoch("pretrain", s.cfg.phases.pretrain)
    monkeypatch.undo()
    assert reads == [("tolist", 8)]  # one read of loss, accuracy and the flag together, at the epoch's end
    s.rundir.close()
