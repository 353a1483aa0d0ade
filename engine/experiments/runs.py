"""An experiment's runs: what a run is (:class:`RunSpec`) and what it gave (:class:`RunResult`), and the rules for an existing ``OUT/runs/<run>``: a finished run made with the same settings is
reused, one made with other settings is refused, one that never reached a checkpoint is removed."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import profile_change
from ..errors import UserError
from ..rundir import RunDir, read_json_state

# keys that do not change a run's numbers: a finished run made with other values of these is still reused
NOT_COMPARED = ("run.threads", "run.log_interval_s", "run.checkpoint_every", "data.root")


class ExperimentStopped(Exception):
    """A run was stopped (Experiment.stop, Ctrl-C): its checkpoint is kept; running the experiment again resumes it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        super().__init__(f"{run_dir}: stopped with a checkpoint; run the same command again to resume")


@dataclass
class RunSpec:
    """One training run of an experiment: its name, the profile keys it sets, what it is (for the tables) and,
    when it starts from weights made by the experiment, how to make them (called right before a new run)."""

    name: str
    overrides: list[str]
    role: dict
    make_init: Callable[[], None] | None = None


@dataclass
class RunResult:
    spec: RunSpec
    path: Path
    status: str  # trained | resumed | reused
    summary: dict
    wall_seconds: float


def read_json(p: Path) -> dict | None:
    """A run's summary.json as a dict; None when it is missing, damaged, not a JSON object or not a regular file
    (a FIFO there is not waited on: :func:`~..rundir.read_json_state`)."""
    d = read_json_state(p)
    return d if isinstance(d, dict) else None


def check_same_settings(rd: RunDir, text: str) -> None:
    """An existing run directory must hold the run the experiment would start now."""
    change = profile_change(rd.profile.read_text(encoding="utf-8"), text, ignore=NOT_COMPARED, arrow="now",
                            unreadable="profile.toml")
    if change is not None:
        raise UserError(f"{rd.path}: made with other settings ({change}): use another --out, or delete {rd.path} "
                        f"to train it again")


def remove_unstarted(rd: RunDir) -> None:
    """Remove a run directory that never reached a checkpoint (after checking no process holds it)."""
    if rd.model.exists() or rd.checkpoint.exists():
        return
    rd.acquire()  # raises a one-line UserError when another process runs it
    rd.release()
    shutil.rmtree(rd.path)
