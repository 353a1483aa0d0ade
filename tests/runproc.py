"""Helpers for tests that drive the real command line in a subprocess: run, spawn, wait, read records."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
ROOT = Path(__file__).resolve().parent.parent


def robprune(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m robprune ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "robprune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env or ENV, timeout=timeout)


def spawn(*args, **kw) -> subprocess.Popen:
    """Start ``python -m robprune ARGS`` in the background (stdout and stderr captured unless given)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "robprune", *map(str, args)], cwd=ROOT, env=ENV, text=True, **kw)


def records(path: Path) -> list[dict]:
    """The complete JSON lines of a file being written (a torn last line is ignored)."""
    out = []
    try:
        data = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in data.split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 120.0, poll: float = 0.02):
    """Poll ``pred()`` until it returns something truthy (returned); fail if ``proc`` exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before the condition held:\n{err[-3000:]}")
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def training(run_dir: Path, phase: str = "pretrain"):
    """A predicate: the run in ``run_dir`` has emitted a step record in ``phase``."""
    return lambda: any(r["type"] == "step" and r["phase"] == phase for r in records(Path(run_dir) / "metrics.jsonl"))


def one_line_error(r: subprocess.CompletedProcess, *parts: str, code: int = 2) -> str:
    """Assert exit ``code``, exactly one non-empty stderr line, no traceback, and each of ``parts`` in it."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]
