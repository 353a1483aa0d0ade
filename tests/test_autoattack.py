"""AutoAttack: the ensemble against an independent implementation (torchattacks), its per-example worst case, the
state file that lets a killed evaluation continue, and `robprune eval --attack autoattack` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robprune.engine.attacks import pgd
from robprune.engine.attacks import autoattack as aa_mod
from robprune.engine.attacks.autoattack import AutoAttack, ensemble, fools
from robprune.engine.evaluation import autoattack_name, pick_device, weights_fingerprint
from robprune.engine.errors import UserError

from .conftest import ROBUST_EPS, write_profile

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(scope="module")
def ours(robust_lenet):
    """Our standard AutoAttack on robust_lenet's 200 digits, seed 0 (about 20 s on 2 cores)."""
    model, x, y = robust_lenet
    return AutoAttack(model, eps=ROBUST_EPS, batch_size=200, seed=0).run(x, y)


def test_standard_ensemble_is_the_published_one():
    names = [(p.name, p.settings) for p in ensemble("standard")]
    assert names == [("apgd-ce", {"steps": 100, "restarts": 1, "loss": "ce"}),
                     ("apgd-t", {"steps": 100, "restarts": 1, "target_classes": 9}),
                     ("fab-t", {"steps": 100, "restarts": 1, "target_classes": 9}),
                     ("square", {"queries": 5000, "restarts": 1, "p_init": 0.8})]
    assert [p.name for p in ensemble("rand")] == ["apgd-ce", "apgd-dlr"]
    assert [p.settings["target_classes"] for p in ensemble("standard", num_classes=4)[1:3]] == [3, 3]


def test_robust_accuracy_matches_torchattacks(robust_lenet, ours):
    """Same model, same 200 digits. torchattacks' standard AutoAttack leaves 99 of 200 (49.5%) robust with seed 0;
    ours leaves 97 (48.5%): APGD-CE and APGD-T fool the same digits as torchattacks' (tests/test_apgd.py), and
    torchattacks runs FAB-T with 10 steps where the published AutoAttack (and ours) runs 100. Within 1 point
    (2 examples) of each other, as the issue asks. PGD-20 leaves 56%: AutoAttack must be below it."""
    model, x, y = robust_lenet
    ref = torchattacks.AutoAttack(model, norm="Linf", eps=ROBUST_EPS, version="standard", n_classes=10, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchattacks' many small operations crawl on 2 threads of a busy machine
    try:
        x_ref = ref(x, y)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ref_robust = int((model(x_ref).argmax(1) == y).sum())
    ours_robust = int(ours["robust"].sum())
    assert abs(ours_robust - ref_robust) <= 2, (ours_robust, ref_robust)
    torch.manual_seed(0)
    xa = pgd(model, x, y, eps=ROBUST_EPS, step_size=ROBUST_EPS / 8, steps=20)
    with torch.no_grad():
        pgd_acc = (model(xa).argmax(1) == y).float().mean().item()
    assert ours["robust_acc"] < pgd_acc


def test_worst_case_per_example_and_bookkeeping(robust_lenet, ours):
    """Each attack runs on the examples every earlier one left: robust accuracy never rises from one attack to the
    next, the examples fooled add up to clean - robust, and every number is a count over the same n."""
    model, x, y = robust_lenet
    n = len(y)
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    assert ours["clean_acc"] == clean / n
    after = [p["robust_acc_after"] for p in ours["per_attack"]]
    assert after == sorted(after, reverse=True) and after[-1] == ours["robust_acc"]
    assert sum(p["fooled"] for p in ours["per_attack"]) == clean - int(ours["robust"].sum())
    assert int(ours["robust"].sum()) == round(ours["robust_acc"] * n)
    assert ours["attack"]["n"] == n and ours["attack"]["eps"] == ROBUST_EPS
    assert ours["per_attack"][0]["fooled"] > 0  # APGD-CE does most of the work on this model


def test_fools_checks_the_ball_and_the_label(robust_lenet):
    model, x, y = robust_lenet
    x, y = x[:8], y[:8]
    far = (x + 0.5).clamp(0, 1)  # outside the eps-ball: never counted, whatever the model says
    assert not fools(model, far, x, y, ROBUST_EPS).any()
    shifted = (y + 1) % 10  # with other labels every example the model gets "wrong" counts
    with torch.no_grad():
        wrong = model(x).argmax(1) != shifted
    assert torch.equal(fools(model, x, x, shifted, ROBUST_EPS), wrong) and wrong.sum() >= 6


@pytest.fixture
def short_ensemble(monkeypatch):
    """The standard ensemble with 10 steps and 100 queries: the bookkeeping tests need its structure, not its
    strength."""
    monkeypatch.setattr(aa_mod, "STEPS", 10)
    monkeypatch.setattr(aa_mod, "QUERIES", 100)


def test_a_killed_evaluation_continues_where_it_stopped(robust_lenet, tmp_path, short_ensemble):
    """Interrupted in the middle of APGD-T (after its first batch of 25), then run again: it continues from the
    state file and ends with exactly the numbers of an evaluation that was never interrupted."""
    model, x, y = robust_lenet
    x, y = x[:60], y[:60]
    kw = dict(eps=ROBUST_EPS, batch_size=25, seed=3, fingerprint=weights_fingerprint(model))
    whole = AutoAttack(model, **kw).run(x, y)
    state = tmp_path / "aa.state.json"
    calls = []

    def stop_in_apgd_t(part, done, total):
        calls.append((part, done))
        if part == "apgd-t":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        AutoAttack(model, state_path=state, progress=stop_in_apgd_t, **kw).run(x, y)
    st = json.loads(state.read_text())
    assert st["part"] == 1 and st["batch"] == 1 and calls[-1][0] == "apgd-t"
    again = AutoAttack(model, state_path=state, **kw)
    res = again.run(x, y)
    assert again.resumed
    assert res["robust_acc"] == whole["robust_acc"] and torch.equal(res["robust"], whole["robust"])
    assert [p["fooled"] for p in res["per_attack"]] == [p["fooled"] for p in whole["per_attack"]]
    # a state made for other weights (or eps, or n) is not used
    other = AutoAttack(model, state_path=state, **{**kw, "fingerprint": "other"})
    other.run(x[:10], y[:10])
    assert not other.resumed


def test_damaged_or_foreign_state_starts_over(robust_lenet, tmp_path, short_ensemble):
    model, x, y = robust_lenet
    x, y = x[:10], y[:10]
    state = tmp_path / "s.json"
    for data in (b"{not json", json.dumps({"key": 1}).encode(), b"\x00\xff", b"[" * 100_000):
        state.write_bytes(data)
        aa = AutoAttack(model, eps=ROBUST_EPS, batch_size=10, state_path=state)
        res = aa.run(x, y)
        assert not aa.resumed and 0 <= res["robust_acc"] <= res["clean_acc"]
    state.unlink()
    os.mkfifo(state)  # a FIFO where the state was: not opened (it would block), replaced by the new state
    aa = AutoAttack(model, eps=ROBUST_EPS, batch_size=10, state_path=state)
    aa.run(x, y)
    assert not aa.resumed and state.is_file()


def test_device_names():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cpu:0", "", "auto:1"):
        with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available here"):
            pick_device("cuda")


def _robprune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "robprune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


AA_PROFILE = """
[run]
name = "aa"
seed = 0
device = "cpu"
log_interval_s = 0.05

[data]
name = "mnist-5k"
batch_size = 128
test_batch_size = 100

[model]
arch = "lenet"
width = 1

[attack.train]
kind = "pgd"
eps = 0.1
step_size = 0.05
steps = 2

[attack.eval]
kind = "pgd"
eps = 0.1
step_size = 0.025
steps = 5

[prune]
ratio = 0.5

[eval]
every = 0
final_subset = 100
final_attack = "autoattack"
autoattack_n = 40

[phases.pretrain]
epochs = 1
optimizer = "adam"
lr = 0.003
[phases.admm]
epochs = 1
optimizer = "adam"
lr = 0.001
[phases.retrain]
epochs = 1
optimizer = "adam"
lr = 0.001
"""


@pytest.fixture(scope="module")
def aa_run(tmp_path_factory):
    """A short run on the embedded digits whose final evaluation is AutoAttack on 40 digits."""
    tmp = tmp_path_factory.mktemp("aa")
    prof = write_profile(tmp, AA_PROFILE)
    run_dir = tmp / "run"
    r = _robprune("run", str(prof), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def test_a_run_reports_its_final_autoattack(aa_run):
    s = json.loads((aa_run / "summary.json").read_text())
    aa = s["final"]["autoattack"]
    assert aa["attack"]["name"] == "autoattack" and aa["attack"]["n"] == 40 and aa["attack"]["eps"] == 0.1
    assert 0 <= aa["robust_acc"] <= aa["clean_acc"] <= 1
    assert s["final"]["robust"]["acc"] == aa["robust_acc"]
    assert s["final"]["robust"]["attack"] == ("AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; 100 steps, 9 target "
                                              "classes, 5000 queries, 1 restart each), Linf eps 0.1, n 40")
    md = (aa_run / "summary.md").read_text()
    assert "Reported robustness" in md and "AutoAttack standard" in md and "PGD-5 (CE loss)" in md
    written = json.loads((aa_run / "eval" / f"{autoattack_name('standard', 0.1, 40)}.json").read_text())
    assert written["robust_acc"] == aa["robust_acc"]
    assert not list((aa_run / "eval").glob("*.state.json"))
    # export rebuilds the same summary from the records
    r = _robprune("export", str(aa_run))
    assert r.returncode == 0, r.stderr
    again = json.loads((aa_run / "summary.json").read_text())
    assert again["final"]["autoattack"]["robust_acc"] == aa["robust_acc"]
    assert again["final"]["robust"] == s["final"]["robust"]


def test_eval_cli_autoattack_matches_the_run_and_names_the_attack(aa_run):
    """`robprune eval --attack autoattack` on the run's own settings reproduces the run's final AutoAttack (same
    weights, examples, seed: same random numbers), prints a table and writes JSON."""
    s = json.loads((aa_run / "summary.json").read_text())
    r = _robprune("eval", str(aa_run), "--attack", "autoattack", "--n", "40", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "apgd-ce" in r.stdout and "square" in r.stdout and "robust accuracy" in r.stdout
    res = json.loads((aa_run / "eval" / "autoattack-0.1-n40.json").read_text())
    assert res["robust_acc"] == s["final"]["autoattack"]["robust_acc"]
    assert res["clean_acc"] == s["final"]["autoattack"]["clean_acc"]
    assert res["precision"] == "float32 (TF32 off)" and res["device"] == "cpu"
    r = _robprune("eval", str(aa_run), "--attack", "pgd", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["adv_acc"] == s["final"]["adv_acc"] and res["attack"]["loss"] == "ce"


@pytest.mark.parametrize("args, message", [
    (["--attack", "cw"], "--attack: 'cw': expected one of pgd, autoattack"),
    (["--version", "plus"], "--version: 'plus': expected one of standard, rand"),
    (["--loss", "dlr"], "--loss: 'dlr': expected one of ce, cw"),
    (["--device", "tpu"], "--device: 'tpu' is not a device: expected auto, cpu, cuda or cuda:N"),
])
def test_eval_cli_bad_options_are_one_line(aa_run, args, message):
    r = _robprune("eval", str(aa_run), *args)
    assert r.returncode == 2 and r.stderr.strip() == f"robprune: error: {message}", r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_eval_cli_cuda_without_cuda_is_one_line(aa_run):
    r = _robprune("eval", str(aa_run), "--device", "cuda")
    assert r.returncode == 2 and "no CUDA device is available here" in r.stderr and "Traceback" not in r.stderr


def test_weights_fingerprint_covers_batchnorm_buffers():
    """Every state tensor counts, 0-dimensional ones (BatchNorm's num_batches_tracked) too: a ResNet with
    BatchNorm is fingerprinted, and any change of a weight or a buffer changes the fingerprint."""
    from robprune.engine.models import build_model

    torch.manual_seed(0)
    m = build_model("resnet18", 1, in_channels=3, image_size=32)
    a = weights_fingerprint(m)
    assert len(a) == 64 and a == weights_fingerprint(m)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-3
    b = weights_fingerprint(m)
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    bn.num_batches_tracked += 1
    assert len({a, b, weights_fingerprint(m)}) == 3


def test_eval_cli_ctrl_c_then_the_same_command_continues(aa_run):
    """Ctrl-C during `robprune eval --attack autoattack`: one line saying how to continue, exit 130, the state kept;
    the same command then continues (resumed) and ends with the run's own numbers."""
    import signal
    import time

    state = aa_run / "eval" / "autoattack-0.1-n40.state.json"
    state.unlink(missing_ok=True)  # only this command's own state may end the wait below
    p = subprocess.Popen([sys.executable, "-m", "robprune", "eval", str(aa_run), "--attack", "autoattack", "--n",
                          "40", "--fresh", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.exists(), p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "the same command continues where it stopped" in err and "Traceback" not in err
    assert state.exists()
    r = _robprune("eval", str(aa_run), "--attack", "autoattack", "--n", "40", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    s = json.loads((aa_run / "summary.json").read_text())
    assert res["resumed"] is True and res["robust_acc"] == s["final"]["autoattack"]["robust_acc"]
    assert not state.exists()
