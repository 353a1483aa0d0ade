"""The command line as a user meets it: exit codes, one-line errors, run / eval / export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, write_profile

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def robprune(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "robprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


def assert_one_line_error(r, *parts):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])


BAD_PROFILES = [
    ("[run]\nseed = 'x'\n", ["p.toml", "run.seed", "expected an integer", "'x'"]),
    ("[run]\nsed = 1\n", ["p.toml", "run.sed", "did you mean 'seed'"]),
    ("[attack.train]\neps = -0.1\n", ["p.toml", "attack.train.eps", ">= 0", "-0.1"]),
    ("[prune]\nratio = 1.0\n", ["p.toml", "prune.ratio", "[0, 1)", "1.0"]),
    ("[data]\nbatch_size = 0\n", ["p.toml", "data.batch_size", "in [1, 65536]", "0"]),
    ("[model]\narch = 'resnet50'\n", ["p.toml", "model.arch", "one of", "'resnet50'"]),
    ("[run\nseed = 1\n", ["p.toml:1:", "invalid TOML"]),
    ("[phases.admm]\nepochs = -1\n", ["p.toml", "phases.admm.epochs", "in [0, 100000]", "-1"]),
]


@pytest.mark.parametrize("text,parts", BAD_PROFILES)
def test_bad_profiles_exit_2_with_one_line(tmp_path, text, parts):
    p = write_profile(tmp_path, text)
    assert_one_line_error(robprune("run", p, "--run-dir", tmp_path / "r"), *parts)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override,parts", [
    ("attack.eval.steps=-3", ["--set", "attack.eval.steps", "in [1, 10000]", "-3"]),
    ("attack.train.kind=pdg", ["--set", "attack.train.kind", "did you mean 'pgd'"]),
    ("run.sede=1", ["--set", "run.sede", "did you mean 'run.seed'"]),
    ("noequals", ["--set", "expected dotted.key=value"]),
    ("prune.layers.zzz*=0.5", ["prune.layers.\"zzz*\"", "matching at least one prunable layer"]),
])
def test_bad_overrides_exit_2_with_one_line(tmp_path, override, parts):
    p = write_profile(tmp_path)
    assert_one_line_error(robprune("run", p, "--run-dir", tmp_path / "r", "--set", override), *parts)


def test_missing_profile_and_missing_dataset(tmp_path):
    assert_one_line_error(robprune("run", tmp_path / "nope.toml"), "nope.toml")
    p = write_profile(tmp_path)
    r = robprune("run", p, "--run-dir", tmp_path / "r", "--set", "data.name=mnist",
                 "--set", f"data.root={tmp_path / 'data'}")
    assert_one_line_error(r, str(tmp_path / "data"), "MNIST not found", "download")
    assert not (tmp_path / "r").exists()


def test_run_eval_export(tmp_path):
    p = write_profile(tmp_path, TINY.replace("epochs = 2", "epochs = 1").replace("epochs = 3", "epochs = 1"))
    rd = tmp_path / "run"
    r = robprune("run", p, "--run-dir", rd)
    assert r.returncode == 0, r.stderr
    assert "conv1.weight" in r.stdout and "natural" in r.stdout
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["status"] == "completed"

    e = robprune("eval", rd, "--steps", "5", "--restarts", "2", "--json")
    assert e.returncode == 0, e.stderr
    res = json.loads(e.stdout)
    assert res["attack"]["steps"] == 5 and res["attack"]["restarts"] == 2 and res["n"] == 128
    assert res["nat_acc"] == pytest.approx(summary["final"]["nat_acc"])  # same model, same test set
    assert res["adv_acc"] <= res["nat_acc"]

    for f in ("summary.json", "summary.md", "metrics.csv"):
        (rd / f).unlink()
    x = robprune("export", rd)
    assert x.returncode == 0, x.stderr
    again = json.loads((rd / "summary.json").read_text())
    assert again["layers"] == summary["layers"] and again["final"] == summary["final"]
    assert (rd / "metrics.csv").read_text().startswith("t,type,step")
    assert any(json.loads(ln)["type"] == "export" for ln in (rd / "events.jsonl").read_text().splitlines())


def test_eval_and_export_on_a_non_run_directory(tmp_path):
    assert_one_line_error(robprune("eval", tmp_path), "profile.toml", "not a robprune run directory")
    assert_one_line_error(robprune("export", tmp_path), "profile.toml")
