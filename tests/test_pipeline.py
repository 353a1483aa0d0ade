"""The whole engine on a tiny profile: three phases, exact sparsity, files on disk, commands, checkpoints."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from robprune.engine.control import CheckpointNow, EvalNow, Pause, Resume, SetRho
from robprune.engine import api
from robprune.engine.errors import ConfigError
from robprune.engine.events import CommandApplied, EvalResult, Finished, StepMetrics
from robprune.engine.models import prunable_parameters
from robprune.engine.pruning import n_pruned
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run of the tiny profile, shared by the read-only tests below."""
    from tests.conftest import TINY

    d = tmp_path_factory.mktemp("run")
    prof = d / "tiny.toml"
    prof.write_text(TINY)
    events = []
    s = Session.new(prof, [], d / "run")
    s.subscribe(events.append)
    s.prepare()
    summary = s.run()
    return s, summary, events


def test_three_phases_run_and_sparsity_is_exact(finished_run):
    s, summary, events = finished_run
    phases = [e["phase"] for e in read_jsonl(s.rundir.events) if e["type"] == "phase"]
    assert phases == ["pretrain", "admm", "retrain"]
    sd = torch.load(s.rundir.model, weights_only=True)
    model = api.load_model(s.rundir.path)
    params = prunable_parameters(model)
    expected = {"conv1.weight": 0.5, "conv2.weight": 0.8, "fc1.weight": 0.8, "fc2.weight": 0.8}
    for name, ratio in expected.items():
        w = sd[name]
        assert int((w == 0).sum()) == n_pruned(w.numel(), ratio), name
        assert torch.equal(params[name].detach(), w)
    for L in summary["layers"]:
        assert L["zeros"] == n_pruned(L["params"], expected[L["name"]])
        assert L["target"] == expected[L["name"]]
    assert summary["sparsity"]["prunable_nonzero"] == sum(L["nonzero"] for L in summary["layers"])
    assert summary["compression_rate"]["prunable"] == pytest.approx(
        summary["sparsity"]["prunable_params"] / summary["sparsity"]["prunable_nonzero"])
    assert not model.training


def test_final_accuracy_is_real_and_reproducible_independently(finished_run):
    s, summary, _ = finished_run
    nat, adv = summary["final"]["nat_acc"], summary["final"]["adv_acc"]
    assert summary["final"]["attack"] == {"kind": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 3, "restarts": 1,
                                       "loss": "ce"}
    assert summary["final"]["n"] == 128
    assert nat >= 0.5, nat  # learnable synthetic data, pruned to 80%: well above chance (0.1)
    assert adv <= nat
    # an independent natural evaluation through the public API gives the same number
    model = api.load_model(s.rundir.path)
    x, y = api.load_test_set(s.rundir.path)
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(nat, abs=1e-9)


def test_run_directory_files(finished_run):
    s, summary, _ = finished_run
    p = s.rundir.path
    metrics = read_jsonl(p / "metrics.jsonl")
    assert metrics and all({"step", "epoch", "phase", "t", "type"} <= set(m) for m in metrics)
    steps = [m["step"] for m in metrics if m["type"] == "step"]
    assert steps == sorted(steps) and steps[-1] == 8 * 7  # 512/64 batches x 7 epochs
    evs = read_jsonl(p / "events.jsonl")
    assert all("t" in e and "type" in e for e in evs)
    assert {"phase", "checkpoint", "finished", "log"} <= {e["type"] for e in evs}
    js = json.loads((p / "summary.json").read_text())
    assert js["final"] == summary["final"]
    assert set(js["phase_seconds"]) == {"pretrain", "admm", "retrain"}
    assert js["rho_history"][0]["reason"] == "init"
    md = (p / "summary.md").read_text()
    assert f"{100 * summary['final']['nat_acc']:.2f}%" in md and "conv1.weight" in md
    csv_lines = (p / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("t,type,step,epoch,phase")
    assert len(csv_lines) - 1 == sum(1 for m in metrics if m["type"] in ("step", "eval"))
    prof = (p / "profile.toml").read_text()
    assert 'name = "tiny"' in prof and "[phases.retrain]" in prof


def test_residuals_fall_over_the_admm_phase(finished_run):
    s, _, _ = finished_run
    res = [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "residuals"]
    assert [r["update"] for r in res] == [0, 1, 2, 2]  # start, Z/U at epochs 1 and 2, the phase-end reading
    first, last = res[0]["layers"], res[-1]["layers"]
    for k in first:
        assert last[k]["primal"] < first[k]["primal"], k
    # rho grew by the multiplier at each update: 2 -> 3 -> 4.5
    assert res[-1]["layers"]["fc1.weight"]["rho"] == pytest.approx(2.0 * 1.5 ** 2)


def test_zeros_survive_masked_retraining(finished_run):
    s, _, _ = finished_run
    ck = torch.load(s.rundir.checkpoint, weights_only=True)
    sd = torch.load(s.rundir.model, weights_only=True)
    for k, mask in ck["masks"].items():
        assert torch.count_nonzero(sd[k][~mask]) == 0  # pruned positions are exactly zero
        assert torch.count_nonzero(sd[k][mask]) == int(mask.sum())  # and the kept ones were trained


def _until(pred, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_commands_pause_rho_eval_checkpoint_stop_and_resume(tmp_path, tiny_profile):
    s = Session.new(tiny_profile, ["phases.admm.epochs=40"], tmp_path / "run")
    got = []
    s.subscribe(got.append)
    s.prepare()
    s.start()
    assert _until(lambda: s.engine.admm is not None and s.engine.step > 20)
    s.send(Pause())
    assert _until(lambda: s.state == "paused")
    step = s.engine.step
    time.sleep(1.5)
    assert s.engine.step == step  # no training step while paused
    s.send(SetRho(0.25, layer="fc1.weight"))
    s.send(SetRho(2.0, multiply=True))
    s.send(EvalNow())
    s.send(CheckpointNow())
    assert _until(lambda: sum(isinstance(e, CommandApplied) for e in got) >= 5)  # applied while paused
    assert s.engine.admm.rho["fc1.weight"] == pytest.approx(0.5)  # set to 0.25, then all layers x2
    s.send(Resume())
    assert _until(lambda: s.engine.step > step + 2)
    s.stop()
    assert s.join(60)
    assert s.state == "stopped"
    ev = read_jsonl(s.rundir.events)
    types = [e["type"] for e in ev]
    for t in ("pause", "set_rho", "eval_now", "checkpoint_now", "resume", "stop", "checkpoint", "finished"):
        assert t in types, t
    rho_ev = [e for e in ev if e["type"] == "set_rho"]
    assert rho_ev[0]["layer"] == "fc1.weight" and rho_ev[0]["rho"] == {"fc1.weight": 0.25}
    assert rho_ev[1]["multiply"] is True
    assert any(isinstance(e, EvalResult) and e.reason == "now" for e in got)
    assert isinstance(got[-1], Finished) and got[-1].status == "stopped"
    stopped_at = s.engine.step

    # resume the stopped run from its checkpoint and let it finish
    r = Session.resume(tmp_path / "run")
    r.cfg.phases.admm.epochs  # the profile comes from the run directory
    r.prepare()
    assert r.engine.resume_state["step"] == stopped_at
    r.engine.cfg.phases.admm.epochs = 40
    r.control.stop()  # stop again right away: a resumed run reads commands like a fresh one
    r.run()
    assert r.state == "stopped" and r.engine.step == stopped_at
    assert r.engine.resume_state is None  # restored, then released: the loaded checkpoint is not kept for the run


def test_checkpoint_round_trip(tmp_path, tiny_profile):
    s = Session.new(tiny_profile, ["phases.pretrain.epochs=1", "phases.admm.epochs=2", "phases.retrain.epochs=0"],
                    tmp_path / "a")
    s.prepare()
    s.run()
    ck = torch.load(s.rundir.checkpoint, weights_only=True)  # safe loading works: plain tensors and containers
    assert ck["phase"] == "done" and ck["step"] == 8 * 3
    # resume from the final checkpoint: the engine restores everything and only re-runs the final evaluation
    r = Session.resume(tmp_path / "a")
    r.prepare()
    r.run()
    for k, v in s.engine.model.state_dict().items():
        assert torch.equal(v, r.engine.model.state_dict()[k]), k
    assert r.engine.step == s.engine.step
    assert r.engine.rho_history == s.engine.rho_history


def test_mid_phase_resume_continues_where_it_stopped(tmp_path, tiny_profile):
    """A run stopped in the ADMM phase and resumed reaches the same step count and exact sparsity."""
    s = Session.new(tiny_profile, [], tmp_path / "r")
    s.prepare()
    s.subscribe(lambda e: s.stop() if isinstance(e, StepMetrics) and e.phase == "admm" and e.step >= 20 else None)
    s.run()
    assert s.state == "stopped" and s.engine.phase == "admm"
    lines_at_stop = s.rundir.metrics_lines()
    r = Session.resume(tmp_path / "r")
    r.prepare()
    summary = r.run()
    assert r.state == "finished" and r.engine.step == 8 * 7
    metrics = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    steps = [m["step"] for m in metrics if m["type"] == "step"]
    assert steps == sorted(set(steps))  # no duplicated step records across the resume
    assert len(metrics) > lines_at_stop
    for L in summary["layers"]:
        assert L["zeros"] == n_pruned(L["params"], L["target"])


def test_glob_matching_nothing_is_an_error(tmp_path, tiny_profile):
    s = Session.new(tiny_profile, ["prune.layers.nothing*=0.5"], tmp_path / "g")
    with pytest.raises(ConfigError) as ei:
        s.prepare()
    assert 'prune.layers."nothing*"' in str(ei.value)
    assert not (tmp_path / "g").exists()  # nothing half-made is left behind


def test_stop_during_the_final_autoattack_then_resume_finishes_it(tmp_path, tiny_profile):
    """A stop command taken between batches of the final AutoAttack ends the run as stopped without a new
    checkpoint (the last phase's end stands); resuming finishes the run and reports the attack."""
    from robprune.engine.events import LogLine

    sets = ["phases.pretrain.epochs=1", "phases.admm.epochs=1", "phases.retrain.epochs=1",
            'eval.final_attack="autoattack"', "eval.autoattack_n=64", "data.test_batch_size=16"]
    s = Session.new(tiny_profile, sets, tmp_path / "r")
    s.prepare()
    s.subscribe(lambda e: s.control.stop() if isinstance(e, LogLine) and "final AutoAttack: " in e.message
                and "/" in e.message else None)
    s.run()
    assert s.state == "stopped"
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["phase"] == "retrain" and ck["epoch"] == 1
    assert not (tmp_path / "r" / "model.pt").exists()
    r = Session.resume(tmp_path / "r")
    r.prepare()
    r.run()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["autoattack"]["attack"]["n"] == 64


def test_compiled_run_has_static_shapes_and_drops_the_partial_batch(tmp_path):
    """run.compile: one static graph for training; the last partial batch of each epoch (500 = 7 x 64 + 52) is
    dropped instead of compiled again (docs/performance.md measures the recompilation it saves)."""
    from torch._dynamo.utils import counters

    from tests.conftest import run_session

    torch._dynamo.reset()
    counters.clear()
    overrides = ["data.synthetic_train=500", "run.compile=true", "phases.pretrain.epochs=2", "phases.admm.epochs=0",
                 "phases.retrain.epochs=0", "eval.final_attack=\"pgd\""]
    s, summary = run_session(tmp_path, overrides)
    try:
        assert s.engine.state == "finished" and summary["final"]["nat_acc"] is not None
        eng = s.engine
        assert len(eng.loader) == 7 and eng.loader.drop_last
        assert eng.step == 2 * 7
        assert counters["stats"]["unique_graphs"] == 1  # one shape, one graph: no recompilation
    finally:
        torch._dynamo.reset()
