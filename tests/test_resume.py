"""Runs survive: exact resume after SIGKILL, best.pt, RNG state in checkpoints, idempotent Z/U updates."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from robprune.engine.events import CheckpointSaved, EvalResult
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY
from tests.runproc import records, robprune, spawn, wait_for

# deterministic, one thread (bitwise reproducible on the CPU), an ADMM phase long enough to be killed in
EXACT = (TINY.replace('log_interval_s = 0.05', 'log_interval_s = 0.05\ndeterministic = true\nthreads = 1')
         .replace("[phases.admm]\nepochs = 3", "[phases.admm]\nepochs = 4"))


def _deterministic(recs: list[dict]) -> dict:
    """What of metrics.jsonl must not depend on timing: eval, layers and residuals records (all but their
    time stamps), and where each epoch's training ended. Step records between epoch ends are time-based."""
    out: dict = {"eval": [], "layers": [], "residuals": [], "epoch_ends": []}
    for r in recs:
        r = {k: v for k, v in r.items() if k != "t"}
        if r["type"] == "step":
            if r["batch"] == r["batches"]:
                out["epoch_ends"].append((r["phase"], r["epoch"], r["step"]))
        else:
            out[r["type"]].append(r)
    return out


def test_sigkill_during_admm_then_resume_is_bitwise_identical(tmp_path):
    prof = tmp_path / "exact.toml"
    prof.write_text(EXACT)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    a = spawn("run", prof, "--run-dir", whole, "-q")  # the uninterrupted run, alongside
    b = spawn("run", prof, "--run-dir", killed, "-q")

    def admm_checkpoint_then_steps():
        cks = [e for e in records(killed / "events.jsonl") if e["type"] == "checkpoint" and e["phase"] == "admm"
               and e["reason"] == "epoch"]
        if not cks:
            return None
        later = [m for m in records(killed / "metrics.jsonl")
                 if m["type"] == "step" and m["phase"] == "admm" and m["step"] > cks[-1]["step"]]
        return cks[-1] if later else None

    wait_for(admm_checkpoint_then_steps, b, poll=0.01)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert b.returncode == -signal.SIGKILL
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ck["phase"] == "admm" and 0 < ck["epoch"] < 4  # killed in the middle of the ADMM phase
    assert len((killed / "metrics.jsonl").read_text().splitlines()) > ck["metrics_lines"]  # records to drop

    r = robprune("run", "--resume", killed, "-q")
    assert r.returncode == 0, r.stderr
    a.communicate(timeout=300)
    assert a.returncode == 0

    wa = torch.load(whole / "model.pt", weights_only=True)
    wb = torch.load(killed / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    ma, mb = records(whole / "metrics.jsonl"), records(killed / "metrics.jsonl")
    da, db = _deterministic(ma), _deterministic(mb)
    assert db == da  # same evaluations (values included), layer stats, residuals and epoch ends
    steps = [m["step"] for m in mb if m["type"] == "step"]
    assert steps == sorted(set(steps)), "duplicated step records"
    assert steps[-1] == max(m["step"] for m in ma if m["type"] == "step") == 8 * 8
    resumed = [e for e in records(killed / "events.jsonl") if e["type"] == "log" and "resumed at" in e["message"]]
    assert len(resumed) == 1 and "phase admm" in resumed[0]["message"]


def _tiny(tmp_path, text=TINY, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_checkpoint_holds_every_rng_state_weights_only(tmp_path):
    s = Session.new(_tiny(tmp_path), ["phases.pretrain.epochs=1", "phases.admm.epochs=0", "phases.retrain.epochs=0"],
                    tmp_path / "r")
    s.prepare()
    s.engine.setup()
    np.random.seed(123)
    np.random.standard_normal()  # leaves a cached gaussian in the state
    random.seed(7)
    st = s.engine.checkpoint_state()
    torch.save(st, tmp_path / "ck.pt")
    back = torch.load(tmp_path / "ck.pt", weights_only=True)  # plain lists and numbers: safe loading accepts it
    n = back["rng"]["numpy"]
    assert isinstance(n["keys"], list) and len(n["keys"]) == 624
    want_np = np.random.standard_normal(3)
    want_py = random.random()
    np.random.seed(0)
    random.seed(0)
    s.engine._restore(back)
    assert np.array_equal(np.random.standard_normal(3), want_np)
    assert random.random() == want_py
    s.rundir.close()


def test_best_checkpoint_is_the_best_live_eval_of_the_latest_phase(tmp_path):
    s = Session.new(_tiny(tmp_path), ["phases.pretrain.epochs=1", "phases.admm.epochs=1"], tmp_path / "r")
    got = []
    s.subscribe(got.append)
    s.prepare()
    s.run()
    evals = [e for e in got if isinstance(e, EvalResult) and e.reason in ("periodic", "phase_end")]
    retrain = [e for e in evals if e.phase == "retrain"]
    best = max(retrain, key=lambda e: (e.adv_acc, e.nat_acc))  # max keeps the first of equals
    ck = torch.load(s.rundir.best, weights_only=True)
    assert ck["best"]["phase"] == "retrain"
    assert (ck["best"]["step"], ck["best"]["adv_acc"]) == (best.step, best.adv_acc)
    assert ck["step"] == best.step and ck["phase"] == "retrain"
    for k, mask in ck["masks"].items():  # a pruned model that meets its targets
        assert torch.count_nonzero(ck["model"][k][~mask]) == 0
    saves = [e for e in got if isinstance(e, CheckpointSaved) and e.reason == "best"]
    assert {e.phase for e in saves} == {"pretrain", "admm", "retrain"}  # each phase starts afresh
    final = torch.load(s.rundir.checkpoint, weights_only=True)
    assert final["best"] == ck["best"]  # the last checkpoint knows the best, so a resume keeps competing


def test_pause_at_an_epochs_first_step_does_not_update_zu_twice_on_resume(tmp_path):
    """A checkpoint taken after the Z/U update of an epoch's start (batch 0) must not update again on resume."""
    s = Session.new(_tiny(tmp_path), ["phases.pretrain.epochs=1", "phases.retrain.epochs=0"], tmp_path / "r")
    s.prepare()
    eng = s.engine
    real_boundary = eng._boundary

    def boundary():
        if eng.phase == "admm" and eng.epoch == 2 and eng.batch == 0 and not getattr(eng, "_done", False):
            eng._done = True
            eng._save_checkpoint("command")
            s.control.stop()
        real_boundary()

    eng._boundary = boundary
    s.run()
    assert s.state == "stopped"
    ck = torch.load(s.rundir.checkpoint, weights_only=True)
    assert ck["epoch"] == 2 and ck["batch"] == 0 and ck["admm"]["updates"] == 2
    r = Session.resume(tmp_path / "r")
    r.prepare()
    r.run()
    assert r.state == "finished"
    res = [m for m in read_jsonl(tmp_path / "r" / "metrics.jsonl") if m["type"] == "residuals"]
    assert [m["update"] for m in res] == [0, 1, 2, 2]  # no third update


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """os.write fails with ENOSPC half-way through the temp file of the second checkpoint: the run stops with a
    one-line error naming the path, the previous checkpoint is intact and loadable, no temp file is left."""
    import errno

    s = Session.new(_tiny(tmp_path), ["phases.pretrain.epochs=3"], tmp_path / "r")
    s.prepare()
    saved = []
    real_write = os.write

    def full_disk_write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".checkpoint.pt." in target and saved:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def on_event(e):
        if isinstance(e, CheckpointSaved) and e.reason == "epoch" and not saved:
            saved.append((e.step, (tmp_path / "r" / "checkpoint.pt").read_bytes()))
            monkeypatch.setattr(os, "write", full_disk_write)

    s.subscribe(on_event)
    with pytest.raises(Exception) as ei:
        s.run()
    monkeypatch.undo()
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1
    assert str(tmp_path / "r" / "checkpoint.pt") in msg and "no space left on device" in msg
    assert "previous checkpoint.pt is intact" in msg and "free some space" in msg
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == saved[0][1]
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == saved[0][0]
    assert not list((tmp_path / "r").glob(".*.tmp"))
    # and the run resumes from it
    r = Session.resume(tmp_path / "r")
    assert r.engine.resume_state["step"] == saved[0][0]
    r.rundir.close()


def test_lock_is_released_when_a_session_ends(tmp_path):
    s = Session.new(_tiny(tmp_path), ["phases.pretrain.epochs=1", "phases.admm.epochs=0", "phases.retrain.epochs=0"],
                    tmp_path / "r")
    from robprune.engine.errors import UserError

    with pytest.raises(UserError, match=f"in use by another robprune process \\(pid {os.getpid()}\\)"):
        Session.resume(tmp_path / "r")
    s.prepare()
    s.run()
    Session.resume(tmp_path / "r").rundir.close()  # free again


def test_cuda_rng_restore_uses_the_runs_own_gpu(monkeypatch):
    """A checkpoint holds the generator state of the run's GPU; older ones held one per visible GPU. A resume
    that sees fewer GPUs (CUDA_VISIBLE_DEVICES) restores what it can instead of failing. (Device-free: the
    restore call is recorded, not made.)"""
    from robprune.engine.pipeline import _set_cuda_rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, str(device))))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _set_cuda_rng_state("own", torch.device("cuda"))
    _set_cuda_rng_state(["gpu0", "gpu1"], torch.device("cuda", 1))
    _set_cuda_rng_state(["gpu0", "gpu1"], torch.device("cuda"))
    _set_cuda_rng_state(["gpu0"], torch.device("cuda", 1))  # written with 1 GPU visible, resumed on cuda:1
    assert calls == [("own", "cuda"), ("gpu1", "cuda:1"), ("gpu0", "cuda")]


def test_resume_mid_admm_keeps_the_global_allocation(tmp_path, monkeypatch):
    """prune.allocation = "global" ranks the weights of the ADMM phase's start; a run stopped mid-ADMM resumes with
    the checkpoint's per-layer ratios (never ranking the resumed weights again) and ends with exactly the overall
    count; the ratios are in events.jsonl once, in the summary and in the layer records."""
    from robprune.engine import pruning
    from robprune.engine.events import StepMetrics
    from robprune.engine.pruning import n_pruned

    sets = ['prune.allocation="global"', "prune.global_normalize=true", "phases.pretrain.epochs=1",
            "phases.admm.epochs=3", "phases.retrain.epochs=1"]
    s = Session.new(_tiny(tmp_path), sets, tmp_path / "r")
    s.prepare()
    layers_seen = []
    s.subscribe(lambda e: layers_seen.append(e.layers) if e.type == "layers" else None)
    s.subscribe(lambda e: s.stop() if isinstance(e, StepMetrics) and e.phase == "admm" and e.step >= 8 + 12 else None)
    s.run()
    assert s.state == "stopped" and s.engine.phase == "admm"
    chosen = dict(s.engine.ratios)
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["phase"] == "admm" and ck["allocation"]["method"] == "global" and ck["allocation"]["step"] == 8
    assert {k: v["ratio"] for k, v in ck["allocation"]["layers"].items()} == chosen
    assert {k: v["target"] for k, v in ck["layers"].items()} == chosen
    assert chosen["conv1.weight"] == 0.5  # named in prune.layers: kept out of the allocation
    assert len({round(r, 3) for r in chosen.values()}) > 2  # global: the layers got different ratios
    pre = [L for L in layers_seen if L[1]["target_pending"]]  # [0] is conv1, never pending
    assert pre and all(L["target"] == 0.8 for L in pre[0] if L["name"] != "conv1.weight")
    assert not layers_seen[-1][1]["target_pending"] and layers_seen[-1][1]["target"] == chosen["conv2.weight"]

    def no_ranking(*a, **kw):
        raise AssertionError("a resumed run ranked the weights again")

    monkeypatch.setattr(pruning, "global_counts", no_ranking)
    r = Session.resume(tmp_path / "r")
    r.prepare()
    summary = r.run()
    assert r.state == "finished" and r.engine.ratios == chosen
    allocations = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["type"] == "allocation"]
    assert len(allocations) == 1 and allocations[0]["normalize"] is True
    assert {k: v["ratio"] for k, v in allocations[0]["layers"].items()} == chosen
    total = sum(L["params"] for L in summary["layers"])
    assert sum(L["zeros"] for L in summary["layers"]) == n_pruned(total, 0.8) == allocations[0]["pruned"]
    assert {L["name"]: L["target"] for L in summary["layers"]} == chosen
    assert summary["prune"]["allocated"]["method"] == "global" and summary["prune"]["allocated"]["step"] == 8
