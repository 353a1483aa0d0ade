"""The built wheel, installed into a fresh virtual environment, works from a directory that holds a user's own
``engine.py`` and ``tui.py``: nothing generic is imported, the profiles and presets ship inside the package.

The fresh environment gets no dependencies from the registry: a ``.pth`` line puts the test environment's
site-packages (torch, textual, ...) after its own, so only robprune comes from the wheel.
"""
from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER_MODULE = "raise SystemExit('the user\\'s own {name}.py was imported by robprune')\n"


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(bin dir of a fresh venv with the wheel installed, an empty work dir with engine.py and tui.py, wheel)."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("robprune-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    Path(purelib, "_test_env_site.pth").write_text("\n".join(ours) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = base / "work"
    work.mkdir()
    for name in ("engine", "tui"):
        (work / f"{name}.py").write_text(USER_MODULE.format(name=name))
    return venv / "bin", work, wheel


def _run(bindir: Path, work: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(COLUMNS="200", NO_COLOR="1", PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    r = subprocess.run(list(args), capture_output=True, text=True, cwd=work, env=env, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_wheel_holds_one_namespace_and_the_profiles(wheel_env):
    _, _, wheel = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"robprune"}, tops
    for need in ("robprune/profiles/mnist_quick.toml", "robprune/profiles/wrn_irregular.toml",
                 "robprune/profiles/experiments/tiny.toml", "robprune/profiles/experiments/cpu.toml",
                 "robprune/engine/assets/mnist5k-images-idx3-ubyte.gz", "robprune/tui/app.tcss",
                 "robprune/__main__.py"):
        assert need in names, need
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [ln for ln in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if ln.startswith("Requires-Dist")]
    assert any(r.startswith("Requires-Dist: torch") for r in requires), requires
    assert not [r for r in requires if re.search(r"===?\s*\d", r)], requires  # ranges, never pins


def test_wheel_commands_from_a_directory_with_engine_py(wheel_env):
    bindir, work, _ = wheel_env
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _run(bindir, work, str(bindir / "robprune"), "--version").stdout.strip() == f"robprune {version}"
    assert _run(bindir, work, str(bindir / "robprune-tui"), "--version").stdout.strip() == f"robprune-tui {version}"
    # python -m from the work dir: its engine.py and tui.py are first on sys.path, and must not be picked up
    listed = _run(bindir, work, str(bindir / "python"), "-m", "robprune", "profiles").stdout.splitlines()
    assert [ln.split()[0] for ln in listed] == sorted(ln.split()[0] for ln in listed)
    assert {"mnist_quick", "wrn_irregular", "mnist_lenet_paper"} <= {ln.split()[0] for ln in listed}
    where = _run(bindir, work, str(bindir / "python"), "-c",
                 "import robprune.engine.config as c; print(c.__file__)").stdout.strip()
    assert str(ROOT) not in where and "site-packages" in where, where


def test_wheel_runs_the_demo_profile_by_name(wheel_env):
    bindir, work, _ = wheel_env
    run_dir = work / "runs" / "quick"
    _run(bindir, work, str(bindir / "python"), "-m", "robprune", "run", "mnist_quick", "--run-dir", str(run_dir),
         "-q", "--set", "phases.pretrain.epochs=1", "--set", "phases.admm.epochs=1", "--set",
         "phases.retrain.epochs=1", "--set", "data.train_subset=1000", "--set", "eval.final_subset=200",
         "--set", "attack.train.steps=2", "--set", "attack.eval.steps=2", "--set", "eval.autoattack_n=50")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("status")
    assert 0.0 <= summary["final"]["nat_acc"] <= 1.0
    aa = summary["final"]["autoattack"]  # the demo profile's final evaluation is AutoAttack
    assert aa["attack"]["n"] == 50 and 0.0 <= aa["robust_acc"] <= aa["clean_acc"] <= 1.0


def test_wheel_runs_an_experiment_with_a_packaged_preset(wheel_env):
    bindir, work, _ = wheel_env
    out = work / "exp"
    _run(bindir, work, str(bindir / "robprune"), "experiment", "schemes", "mnist_quick", "--preset", "tiny",
         "--out", str(out), "-q", "--no-plots")
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "schemes" and results["preset"] == "tiny"
    assert (out / "report.md").stat().st_size > 0
    # every experiment is listed by --help, and every packaged preset defines it
    from robprune.engine.experiments.presets import EXPERIMENTS

    assert "budgets" in EXPERIMENTS
    helptext = _run(bindir, work, str(bindir / "robprune"), "experiment", "--help").stdout
    assert " | ".join(EXPERIMENTS) in " ".join(helptext.replace("│", " ").split()), helptext
    code = ("import tomllib; from robprune.engine.config import presets_dir; "
            "print([sorted(k for k in tomllib.loads((presets_dir() / f'{p}.toml').read_text()) "
            "if k not in ('description', 'profile')) for p in ('cpu', 'paper', 'tiny')])")
    listed = _run(bindir, work, str(bindir / "python"), "-c", code).stdout.strip()
    assert listed == str([sorted(EXPERIMENTS)] * 3), listed
