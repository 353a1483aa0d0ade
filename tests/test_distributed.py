"""Data-parallel runs on the CPU: 2 gloo ranks started by ``robprune run --nproc 2`` (torch.distributed.run), against
one process of the same profile; steering from the real dashboard; a rank killed mid-run; resume."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robprune.engine import distributed as dist_mod
from robprune.engine.attacks import evaluate_counts
from robprune.engine.attacks.pgd import _random_start
from robprune.engine.data import BatchLoader, to_float
from robprune.engine.pipeline import adversarial_step
from robprune.engine.rundir import RunDir, read_jsonl
from robprune.tui.app import RobpruneApp
from robprune.tui.backend import AttachBackend
from tests.conftest import TINY, run_session, write_profile
from tests.runproc import ENV, records, robprune, spawn, wait_for
from tests.test_tui import until

# SGD everywhere: Adam divides by the root of tiny second moments, which turns the rounding of a near-zero
# gradient (a sum taken in another order by two ranks) into a step of the learning rate's size. PGD with 2 steps:
# each sign of a near-zero input gradient is a place where rounding can become a visible difference.
DIST = ["run.seed=1", "attack.train.steps=2", "attack.eval.eps=0.3", "admm.rho=0.1",
        "phases.pretrain.optimizer=sgd", "phases.admm.optimizer=sgd", "phases.pretrain.lr=0.05", "phases.admm.lr=0.05",
        "phases.pretrain.epochs=2",
        "phases.admm.epochs=2", "phases.retrain.epochs=1", "data.test_batch_size=8", "eval.final_attack=autoattack",
        "eval.autoattack_n=16", "eval.autoattack_version=rand"]
LOST_WITHIN_S = 30.0  # the bound docs/distributed.md states for one machine (torchrun's kill comes after that)


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------ pieces, in-process


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_rows_partition_every_batch(world):
    for total in range(world, 70):
        spans = [dist_mod.shard_rows(total, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert sizes == [len(t) for t in torch.arange(total).tensor_split(world)]


def test_sharded_loader_is_the_global_batch_split():
    x = torch.randint(0, 255, (203, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(203) % 10
    whole = BatchLoader(x, y, 64, shuffle=True, seed=3)
    parts = [BatchLoader(x, y, 64, shuffle=True, seed=3, shard=(r, 2)) for r in range(2)]
    assert len(whole) == 4 and [len(p) for p in parts] == [4, 4]  # the last batch has 11 examples: 6 + 5
    for k, (xb, yb) in enumerate(whole.batches(5)):
        got = [next(iter(p.batches(5, start_batch=k))) for p in parts]
        assert torch.equal(torch.cat([g[0] for g in got]), xb) and torch.equal(torch.cat([g[1] for g in got]), yb)
        rows = [p.batch_rows(k) for p in parts]
        assert rows[0][2] == rows[1][2] == len(yb) and rows[0][1] == rows[1][0]
    # a last batch smaller than the number of ranks would leave a rank nothing: it is left out
    tiny_tail = [BatchLoader(x[:129], y[:129], 64, shuffle=False, shard=(r, 2)) for r in range(2)]
    assert [len(p) for p in tiny_tail] == [2, 2] and len(BatchLoader(x[:129], y[:129], 64, shuffle=False)) == 3


def test_random_starts_of_a_share_are_the_whole_batch_rows():
    x = torch.rand(10, 1, 6, 6)
    torch.manual_seed(4)
    whole = _random_start(x, 0.2)
    for start, stop in ((0, 5), (5, 10), (3, 7)):
        torch.manual_seed(4)
        assert torch.equal(_random_start(x[start:stop], 0.2, rows=(start, stop, 10)), whole[start:stop])
    g = torch.Generator().manual_seed(9)
    ref = _random_start(x, 0.2, g)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(_random_start(x[2:4], 0.2, g, rows=(2, 4, 10)), ref[2:4])


def test_gradient_of_the_shares_is_the_global_batch_mean():
    """adversarial_step's grad_scale: the average of the ranks' gradients (what DDP computes) is the gradient of
    the global batch's mean loss, to float rounding -- checked here by hand, without a process group."""
    from robprune.engine.models import build_model

    torch.manual_seed(0)
    base = build_model("lenet", 2)
    x, y = torch.rand(24, 1, 28, 28), torch.randint(0, 10, (24,))

    def grads(net, xb, yb, **kw):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        adversarial_step(net, net, opt, xb, yb, kind="none", eps=0.0, step_size=0.0, steps=0, **kw)
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    import copy

    full = grads(copy.deepcopy(base), x, y)
    shares = [grads(copy.deepcopy(base), x[a:b], y[a:b], rows=(a, b, 24), grad_scale=3 / 24)
              for a, b in (dist_mod.shard_rows(24, r, 3) for r in range(3))]
    for k, g in full.items():
        avg = sum(s[k] for s in shares) / 3
        assert torch.allclose(avg, g, atol=1e-6, rtol=1e-5), k


def test_sharded_evaluation_counts_sum_to_one_process(tiny_profile):
    from robprune.engine.models import build_model

    torch.manual_seed(0)
    net = build_model("lenet", 2).eval()
    x = (torch.rand(70, 1, 28, 28) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (70,))
    kw = dict(kind="pgd", eps=0.3, step_size=0.1, steps=3, restarts=2, batch_size=16, to_float=to_float, seed=5)
    nat, adv = evaluate_counts(net, x, y, **kw)
    for world in (2, 3):
        parts = [evaluate_counts(net, x, y, shard=(r, world), **kw) for r in range(world)]
        assert sum(int(p[0]) for p in parts) == int(nat) and sum(int(p[1]) for p in parts) == int(adv)
    assert int(adv) < int(nat)  # the attack does something, so the sums are a real check


def test_comm_failure_messages_in_one_short_line():
    exc = RuntimeError("[/build/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: "
                       "Connection reset by peer. This is typically caused by a remote worker hanging.")
    assert dist_mod.comm_failure(exc)
    assert dist_mod.short(exc) == "Read error [127.0.0.1]:1: Connection reset by peer"
    assert not dist_mod.comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not dist_mod.comm_failure(ValueError("gloo"))


# ------------------------------------------------------------------------------------------------ 2 ranks against 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The DIST profile run to its end in one process (in-process) and in 2 ranks (robprune run --nproc 2)."""
    d = tmp_path_factory.mktemp("dist")
    s, _ = run_session(d / "one", DIST)
    prof = write_profile(d, TINY)
    p = robprune("run", prof, "--run-dir", d / "two", "--nproc", "2", *sets(DIST), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "one" / "run", d / "two", p


def test_two_ranks_train_the_weights_of_one_process(pair):
    one, two, proc = pair
    diff = max_diff(weights(one), weights(two))
    assert diff < 1e-5, diff
    ck = torch.load(two / "checkpoint.pt", weights_only=False)
    d = ck["dist"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and len(d["rng"]) == 2
    # the ranks keep the same generators (the random starts are drawn for the whole batch on every rank)
    assert torch.equal(d["rng"][0]["torch"], d["rng"][1]["torch"]) and d["rng"][0]["python"] == d["rng"][1]["python"]
    assert "1 (torchrun's default" in proc.stderr  # the threads per rank are said


def test_two_ranks_are_bitwise_identical_at_every_checkpoint(pair):
    _, two, _ = pair
    ev = read_jsonl(two / "events.jsonl")
    dist = [r for r in ev if r["type"] == "distributed"]
    assert len(dist) == 1 and dist[0]["world_size"] == 2
    pids = [r["pid"] for r in dist[0]["ranks"]]
    assert len(set(pids)) == 2
    # the fingerprints of both ranks are compared at every checkpoint (a difference stops the run); rank 0 writes
    # each record once: no doubled checkpoints, evaluations or steps
    cks = [(r["reason"], r["step"]) for r in ev if r["type"] == "checkpoint"]
    assert len(cks) == len(set(cks)) >= 5
    assert sum(1 for r in ev if r["type"] == "finished") == 1
    steps = [r["step"] for r in read_jsonl(two / "metrics.jsonl") if r["type"] == "step"]
    assert steps == sorted(set(steps))


def test_two_ranks_evaluate_and_autoattack_like_one_process(pair):
    one, two, _ = pair
    a, b = (json.loads((r / "summary.json").read_text())["final"] for r in (one, two))
    assert a["n"] == b["n"] == 128
    assert abs(a["nat_acc"] - b["nat_acc"]) <= 1 / 128 and abs(a["adv_acc"] - b["adv_acc"]) <= 1 / 128
    assert a["adv_acc"] < a["nat_acc"]  # eps 0.3 breaks some: the counts compared are not all trivial
    aa, bb = a["autoattack"], b["autoattack"]
    assert aa["attack"] == bb["attack"]
    assert [p["fooled"] for p in aa["per_attack"]] == [p["fooled"] for p in bb["per_attack"]]
    assert aa["robust_acc"] == bb["robust_acc"] < aa["clean_acc"]
    assert sorted(p.name for p in (two / "eval").iterdir()) == [Path(aa["path"]).name]  # rank 0's file, once
    s = json.loads((two / "summary.json").read_text())
    assert s["distributed"]["world_size"] == 2


# ------------------------------------------------------------------------------------------------ failure and resume

def with_(overrides, *more):
    """``overrides`` with the keys of ``more`` replaced."""
    keys = {m.split("=")[0] for m in more}
    return [o for o in overrides if o.split("=")[0] not in keys] + list(more)


LONG = with_(DIST[:-3], "phases.admm.epochs=40", "eval.every=0", "admm.rho_multiplier=1.0", "admm.update_every=4")


def test_a_killed_rank_ends_the_run_and_the_checkpoint_resumes_exactly(tmp_path):
    prof = write_profile(tmp_path, TINY)
    ref = robprune("run", prof, "--run-dir", tmp_path / "ref", "--nproc", "2", "-q", *sets(LONG), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    rd = tmp_path / "run"
    proc = spawn("run", prof, "--run-dir", rd, "--nproc", "2", "-q", *sets(LONG))
    ranks = wait_for(lambda: next((r["ranks"] for r in records(rd / "events.jsonl") if r["type"] == "distributed"),
                                  None), proc)
    wait_for(lambda: any(r["type"] == "checkpoint" and r["phase"] == "admm" and r["epoch"] >= 2
                         for r in records(rd / "events.jsonl")), proc)
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == dist_mod.EXIT_RANK_LOST, err[-3000:]
    assert took < LOST_WITHIN_S, took
    assert f"rank 1 (pid {ranks[1]['pid']}) was killed (SIGKILL)" in err, err
    assert "rank 0: lost contact with the other ranks" in err
    assert "Traceback" not in err
    ev = records(rd / "events.jsonl")
    last = [i for i, r in enumerate(ev) if r["type"] == "checkpoint"][-1]
    lost = [i for i, r in enumerate(ev) if r["type"] == "error" and "RankLost" in r["message"]]
    assert lost and last < lost[0]  # nothing was checkpointed once a rank was gone
    step = torch.load(rd / "checkpoint.pt", weights_only=False)["step"]
    assert step == ev[last]["step"] and step < 8 * (2 + 40)

    # a stop asked of one rank only (SIGTERM to rank 1) stops both at the same step, with a checkpoint
    sd = tmp_path / "stopped"
    proc = spawn("run", prof, "--run-dir", sd, "--nproc", "2", "-q", *sets(LONG))
    ranks = wait_for(lambda: next((r["ranks"] for r in records(sd / "events.jsonl") if r["type"] == "distributed"),
                                  None), proc)
    wait_for(lambda: any(r["type"] == "checkpoint" and r["phase"] == "admm" for r in records(sd / "events.jsonl")), proc)
    os.kill(ranks[1]["pid"], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stop = [r for r in records(sd / "events.jsonl") if r["type"] == "stop"]
    assert len(stop) == 1 and [r["step"] for r in stop[0]["ranks"]] == [stop[0]["step"]] * 2
    assert torch.load(sd / "checkpoint.pt", weights_only=False)["step"] == stop[0]["step"] < 8 * (2 + 40)
    assert f"resume with: robprune run --resume {sd} --nproc 2" in err
    again = robprune("run", "--resume", sd, "--nproc", "2", "-q", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_diff(weights(sd), weights(tmp_path / "ref")) == 0.0

    other = tmp_path / "one-rank"
    shutil.copytree(rd, other)
    back = robprune("run", "--resume", rd, "--nproc", "2", "-q", timeout=600)
    assert back.returncode == 0, back.stderr[-3000:]
    assert max_diff(weights(rd), weights(tmp_path / "ref")) == 0.0  # the same ranks: bit for bit
    # another number of ranks resumes too: the same batches and random starts, other rounding
    single = robprune("run", "--resume", other, "-q", timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert any("resumed with 1 rank(s) a checkpoint written by 2" in r.get("message", "")
               for r in read_jsonl(other / "events.jsonl"))
    assert json.loads((other / "summary.json").read_text())["status"] == "completed"


def test_ctrl_c_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path):
    """torchrun puts each rank in a session of its own: robprune run --nproc passes the terminal's Ctrl-C on, so
    the ranks stop as one process does (at one step, with a checkpoint, exit 130)."""
    rd = tmp_path / "run"
    proc = spawn("run", write_profile(tmp_path, TINY), "--run-dir", rd, "--nproc", "2",
                 *sets(with_(LONG, "phases.admm.epochs=400")))
    wait_for(lambda: any(r["type"] == "checkpoint" and r["phase"] == "admm" for r in records(rd / "events.jsonl")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"stopped; resume with: robprune run --resume {rd} --nproc 2" in err
    assert "stop (all 2 ranks at step" in err, err[-2000:]
    stop = [r for r in records(rd / "events.jsonl") if r["type"] == "stop"]
    assert len(stop) == 1 and [r["step"] for r in stop[0]["ranks"]] == [stop[0]["step"]] * 2
    assert torch.load(rd / "checkpoint.pt", weights_only=False)["step"] == stop[0]["step"] < 8 * 402


def test_bad_input_under_nproc_is_one_line(tmp_path):
    prof = write_profile(tmp_path, TINY)
    p = robprune("run", prof, "--nproc", "2", "--set", "admm.rho=nan", timeout=120)
    assert p.returncode == 2 and p.stderr.count("robprune: error:") == 1 and "admm.rho" in p.stderr
    # found on the ranks, after the rendezvous: rank 0 says it once, every rank exits 2, nothing is left behind
    p = robprune("run", prof, "--run-dir", tmp_path / "r", "--nproc", "2", "--set", "run.sync_bn=true", timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("robprune: error:") == 1 and "run.sync_bn: expected false on the CPU" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()
    # started by torchrun itself: the same, rank 0 says it once
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "robprune", "run", str(prof), "--set", "data.batch_size=0"],
                        capture_output=True, text=True, env=ENV, timeout=300)
    assert tr.returncode != 0 and tr.stderr.count("robprune: error:") == 1, tr.stderr[-3000:]
    assert "--set: data.batch_size: expected an integer in [1, 65536], found 0" in tr.stderr
    if torch.cuda.device_count() < 2:  # a rank per GPU: more ranks than GPUs is refused before any starts
        gpus = robprune("run", prof, "--nproc", "2", "--set", 'run.device="cuda"', timeout=120)
        assert gpus.returncode == 2 and gpus.stderr.count("robprune: error:") == 1, gpus.stderr
        assert f"--nproc 2: this machine has {torch.cuda.device_count()} CUDA device(s)" in gpus.stderr
    inside = robprune("run", prof, "--nproc", "2", env={**ENV, "WORLD_SIZE": "2", "RANK": "0"})
    assert inside.returncode == 2 and "give --nproc or use torchrun, not both" in inside.stderr


# ------------------------------------------------------------------------------------------------ the dashboard


def test_dashboard_starts_two_ranks_and_steers_them(tmp_path):
    """robprune-tui PROFILE --nproc 2: the ranks start in the background and the dashboard attaches to rank 0's run
    directory; a pause and a rho change made with key presses are applied at the same step on both ranks; SIGTERM
    to rank 0 (the lock's pid) stops both at one step with a checkpoint."""
    from robprune.tui.main import start_detached

    prof = write_profile(tmp_path, TINY)
    rd = start_detached(prof, with_(LONG, "phases.admm.epochs=400"), tmp_path / "run", None, nproc=2)
    assert RunDir(rd).engine_running()
    app = RobpruneApp(AttachBackend(rd, poll_s=0.1), refresh_hz=10)
    applied = lambda kind: [r for r in records(rd / "events.jsonl") if r["type"] == kind]  # noqa: E731

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.rs.phase == "admm" and app.rs.state == "running", what="ADMM running")
            await pilot.press("p")
            await until(lambda: applied("pause"), what="pause applied")
            await pilot.press("r")
            await pilot.pause()
            await pilot.press(*"0.375", "enter")
            await until(lambda: applied("set_rho"), what="rho applied")
            await pilot.press("p")
            await until(lambda: applied("resume"), what="resumed")
            await pilot.press("q")

    try:
        asyncio.run(scenario())
        pause, rho, resume = applied("pause")[0], applied("set_rho")[0], applied("resume")[0]
        for r in (pause, rho, resume):
            assert len(r["ranks"]) == 2 and r["ranks"][0] == r["ranks"][1], r
            assert r["ranks"][0]["step"] == r["step"]
        assert pause["step"] == rho["step"] == resume["step"]  # paused: no step between them
        assert set(rho["ranks"][0]["rho"].values()) == {0.375}
        assert app.rs.resume_command() == f"robprune-tui --resume {rd} --nproc 2"  # what it says if the run dies
        time.sleep(0.5)
        assert RunDir(rd).engine_running()  # the dashboard is gone, the run is not
    finally:
        pid = int((rd / ".lock").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while RunDir(rd).engine_running():
            assert time.monotonic() - t0 < 120
            time.sleep(0.1)
    stop = applied("stop")
    assert len(stop) == 1 and stop[0]["ranks"][0]["step"] == stop[0]["ranks"][1]["step"] == stop[0]["step"]
    ck = torch.load(rd / "checkpoint.pt", weights_only=False)
    assert ck["step"] == stop[0]["step"] and ck["dist"]["world_size"] == 2
    out = (rd / "output.log").read_text()
    assert f"robprune run --resume {rd} --nproc 2" in out


def test_bench_nproc_reports_scaling():
    p = robprune("bench", "--nproc", "2", "--batch", "32", "--steps", "1", "--warmup", "1", "--iters", "2",
                 "--repeats", "2", "--width", "2", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["nproc"] == 2 and r["backend"] == "gloo" and r["global_batch"] == 64
    assert [x["rank"] for x in r["ranks"]] == [0, 1] and all(x["images_per_s"] > 0 for x in r["ranks"])
    assert r["images_per_s_total"] == pytest.approx(sum(r["images_per_s_per_rank"]))
    assert r["scaling_efficiency"] == pytest.approx(r["images_per_s_total"] / (2 * r["one_process"]["images_per_s"]))
    assert 0 < r["scaling_efficiency"] < 2
    bad = robprune("bench", "--nproc", "2", "--model", "alexnet")
    assert bad.returncode == 2 and bad.stderr.count("robprune: error:") == 1 and "--model" in bad.stderr


DIVERGE = r"""
import os
import sys
import torch
from robprune.engine import distributed as dist_mod
from robprune.engine.session import Session

dist = dist_mod.DistContext.from_env()
s = Session.for_rank(dist, sys.argv[1], [], sys.argv[2], None)
s.engine.checkpoint_state()  # equal: passes
if dist.rank == 1:
    with torch.no_grad():
        next(iter(s.engine.params.values())).view(-1)[0] += 1e-3
try:
    s.engine.checkpoint_state()
except dist_mod.RanksDiverged as exc:
    os.write(1, f"rank {dist.rank}: {exc}\n".encode())  # one write: the two ranks' lines never interleave
s.rundir.close()
dist_mod.exit_rank(dist, s.engine, 0)
"""


def test_ranks_that_differ_are_caught_at_the_checkpoint(tmp_path):
    """The fingerprint check is not decoration: a rank whose weights differ (here by 1e-3 in one entry) makes
    both ranks refuse the checkpoint."""
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(write_profile(tmp_path, TINY)), str(tmp_path / "run")],
                       capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(Path(__file__).parent.parent)},
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = sorted(ln for ln in p.stdout.splitlines() if "differ" in ln)
    assert len(lines) == 2 and lines[0].startswith("rank 0: the ranks' weights or ADMM state differ at step 0")
    assert lines[1].startswith("rank 1: ")
