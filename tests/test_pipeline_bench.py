"""`robprune bench --pipeline A B`: two profiles run whole, alternately, in fresh processes; medians and the ratio."""
from __future__ import annotations

import json
import statistics

from robprune.engine.pruning import n_pruned
from tests.conftest import TINY
from tests.runproc import robprune

# two epochs in all, the final evaluation of the profile (PGD unless it says otherwise): seconds per run
FAST = ["--set", "phases.pretrain.epochs=1", "--set", "phases.admm.epochs=1", "--set", "phases.retrain.epochs=0",
        "--set", "eval.every=0"]


def test_pipeline_comparison_runs_both_alternately_and_reports_medians(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(TINY)
    single = TINY.replace('[attack.train]\nkind = "pgd"\neps = 0.1\nstep_size = 0.05\nsteps = 3',
                          '[attack.train]\nkind = "fgsm-rs"\neps = 0.1\nstep_size = 0.125\nsteps = 1')
    assert single != TINY
    # B ends with AutoAttack on 8 examples, A with PGD alone
    b.write_text(single.replace("final_subset = 0", 'final_subset = 0\nfinal_attack = "autoattack"\nautoattack_n = 8'))
    out = tmp_path / "runs"
    p = robprune("bench", "--pipeline", a, b, "--repeats", 2, "--out", out, *FAST, timeout=900)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["a"]["profile"] == str(a) and res["b"]["profile"] == str(b)
    # the order is a, b, a, b: every run directory exists and was written in that order
    dirs = [out / "a-1", out / "b-1", out / "a-2", out / "b-2"]
    mtimes = [(d / "summary.json").stat().st_mtime for d in dirs]
    assert mtimes == sorted(mtimes)
    # the tiny profile prunes conv1 to 50% and every other layer to 80%, exactly
    numels = {"conv1.weight": 1 * 2 * 5 * 5}
    for key in ("a", "b"):
        runs = res[key]["runs"]
        assert len(runs) == 2
        for r in runs:
            assert r["wall_s"] > 0 and 0 <= r["nat_acc"] <= 1 and 0 <= r["pgd_acc"] <= 1
            summary = json.loads((tmp_path / "runs" / f"{key}-{runs.index(r) + 1}" / "summary.json").read_text())
            aa = summary["final"]["autoattack"]
            if key == "a":
                assert r["autoattack_acc"] is None and aa is None and r["autoattack_s"] is None
                assert r["evaluation"].startswith("PGD-")
            else:
                assert r["autoattack_acc"] == aa["robust_acc"] and r["evaluation"].startswith("AutoAttack")
                assert r["autoattack_s"] == round(aa["seconds"], 2) > 0
            layers = summary["layers"]
            assert sum(L["zeros"] for L in layers) == sum(
                n_pruned(L["params"], 0.5 if L["name"] in numels else 0.8) for L in layers)
            assert r["sparsity"] == summary["sparsity"]["prunable"]
            # the wall time split: the phases as summary.json times them, B's final AutoAttack, the rest
            assert r["train_s"] == round(sum(summary["phase_seconds"].values()), 2) > 0
            assert 0 < r["other_s"]
            assert abs(r["train_s"] + (r["autoattack_s"] or 0) + r["other_s"] - r["wall_s"]) <= 0.02
        med = res[key]["median"]
        for field in ("wall_s", "train_s", "other_s", "nat_acc", "pgd_acc", "sparsity"):
            assert med[field] == statistics.median(r[field] for r in runs)
    assert res["time_ratio"] == round(res["b"]["median"]["wall_s"] / res["a"]["median"]["wall_s"], 3)
    assert res["b"]["median"]["autoattack_s"] == statistics.median(r["autoattack_s"] for r in res["b"]["runs"])
    assert res["train_time_ratio"] == round(res["b"]["median"]["train_s"] / res["a"]["median"]["train_s"], 3)
    assert res["settings"]["repeats"] == 2 and res["settings"]["order"] == "a, b alternately"
    assert "repeat 2/2" in p.stderr  # progress goes to stderr, the JSON alone to stdout


def test_pipeline_comparison_refuses_bad_input_in_one_line(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text(TINY)
    p = robprune("bench", "--pipeline", a, a, "--repeats", 0, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--repeats" in p.stderr
    p = robprune("bench", "--pipeline", a, tmp_path / "missing.toml", "--repeats", 1, "--out", tmp_path / "o", *FAST,
                 timeout=600)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "missing.toml" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o" / "a-1").exists()  # refused before anything ran
