"""Time to quality: two profiles run whole, alternately, in fresh processes (``robprune bench --pipeline A B``).

Each run is ``python -m robprune run PROFILE --run-dir DIR -q`` in a new process (no warm caches or threads carried
from one run to the next), timed by this process from start to exit: setup, the three phases and the final
evaluation, everything a user waits for. Its accuracies and sparsity are read back from the run's summary.json.
Running A, B, A, B, ... side by side spreads a machine's drift (other jobs, thermal state) over both profiles
alike; the medians and the ratio of median wall times are the numbers to quote.

Each run's wall time is also split in three: ``train_s`` (the three phases, as the run's summary.json times them),
``autoattack_s`` (the final AutoAttack, whose cost grows with the number of examples it cannot fool, so a more
robust model pays more) and ``other_s`` (the rest: start-up, setup, the phase-end and final PGD evaluations).
``train_time_ratio`` is the ratio of the median training times: the time to a model of the measured quality,
where ``time_ratio`` is the time to a model and its final evaluation.
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import load_profile, resolve_profile
from .errors import UserError
from .rundir import ensure_dir, read_json_state

_FIELDS = ("wall_s", "train_s", "autoattack_s", "other_s", "nat_acc", "pgd_acc", "autoattack_acc", "sparsity")


def _seconds(value: object) -> float | None:
    """A duration read back from summary.json: a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _one_run(profile: str, run_dir: Path, overrides: Sequence[str]) -> dict:
    cmd = [sys.executable, "-m", "robprune", "run", profile, "--run-dir", str(run_dir), "-q"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"robprune bench --pipeline: {profile} exited with {proc.returncode}: {last}")
    s = read_json_state(run_dir / "summary.json")
    if not isinstance(s, dict):
        raise UserError(f"robprune bench --pipeline: {run_dir / 'summary.json'}: missing or not a JSON object")
    final = s.get("final") or {}
    aa = final.get("autoattack") or {}
    phases = s.get("phase_seconds")
    parts = [_seconds(v) for v in phases.values()] if isinstance(phases, dict) and phases else [None]
    train = None if None in parts else sum(parts)
    aa_s = _seconds(aa.get("seconds"))
    other = wall - (train or 0.0) - (aa_s or 0.0)
    return {"wall_s": round(wall, 2), "train_s": None if train is None else round(train, 2),
            "autoattack_s": None if aa_s is None else round(aa_s, 2), "other_s": round(other, 2),
            "nat_acc": final.get("nat_acc"), "pgd_acc": final.get("adv_acc"),
            "autoattack_acc": aa.get("robust_acc"), "sparsity": (s.get("sparsity") or {}).get("prunable"),
            "evaluation": (final.get("robust") or {}).get("attack"), "run_dir": str(run_dir)}


def _medians(runs: list[dict]) -> dict:
    out = {}
    for k in _FIELDS:
        values = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(values) if values else None
    return out


def run_pipeline_bench(profile_a: str, profile_b: str, *, repeats: int = 3, out: str | Path | None = None,
                       overrides: Sequence[str] = (), progress: Callable[[str], None] | None = None) -> dict:
    """Run ``profile_a`` and ``profile_b`` alternately ``repeats`` times each; return medians, every run,
    ``time_ratio`` = median wall time of B / median wall time of A, and ``train_time_ratio`` = the same for the
    time in the three phases. Run directories go under ``out`` (default: a temporary directory, removed
    afterwards). ``overrides`` (``key=value``) apply to both profiles."""
    if not 1 <= repeats <= 100:
        raise UserError(f"robprune bench --pipeline: --repeats must be between 1 and 100, got {repeats}")
    for profile in (profile_a, profile_b):  # bad input fails before anything runs
        load_profile(resolve_profile(profile), list(overrides))
    say = progress or (lambda line: None)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="robprune-pipeline-")
        root = Path(tmp.name)
    else:
        root = Path(out)
        ensure_dir(root, "directory for the runs", "a directory for the runs", "--out")
    names = {"a": profile_a, "b": profile_b}
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    try:
        for r in range(repeats):
            for key, profile in names.items():
                say(f"repeat {r + 1}/{repeats}: {profile}")
                run_dir = root / f"{key}-{r + 1}"
                if run_dir.exists():
                    raise UserError(f"robprune bench --pipeline: {run_dir} exists: use another --out")
                runs[key].append(_one_run(profile, run_dir, overrides))
                say(f"  {runs[key][-1]['wall_s']:.1f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    med = {k: _medians(v) for k, v in runs.items()}
    ratio = med["b"]["wall_s"] / med["a"]["wall_s"] if med["a"]["wall_s"] else None
    train_ratio = med["b"]["train_s"] / med["a"]["train_s"] if med["a"]["train_s"] and med["b"]["train_s"] else None
    if tmp is not None:
        for v in runs.values():
            for run in v:
                run.pop("run_dir")
    return {
        "a": {"profile": profile_a, "median": med["a"], "runs": runs["a"]},
        "b": {"profile": profile_b, "median": med["b"], "runs": runs["b"]},
        "time_ratio": None if ratio is None else round(ratio, 3),
        "train_time_ratio": None if train_ratio is None else round(train_ratio, 3),
        "settings": {"repeats": repeats, "order": "a, b alternately", "overrides": list(overrides),
                     "timed": "each run's process from start to exit: setup, phases, final evaluation",
                     "cpus": os.cpu_count(), "torch": torch.__version__},
    }
