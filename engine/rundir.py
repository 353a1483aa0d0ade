"""The run directory: every file a run leaves on disk, written so that a crash never leaves a torn file.

Layout::

    profile.toml       the resolved profile (every key, overrides applied)
    meta.json          versions and creation time
    metrics.jsonl      step / eval / layers / residuals events, one JSON object a line, flushed as emitted
    events.jsonl       phase changes, applied commands, checkpoints, logs, finished, error
    checkpoint.pt      the last checkpoint (atomic: temp file, fsync, rename)
    model.pt           final weights, a plain state_dict (torch.load(..., weights_only=True))
    summary.json / summary.md / metrics.csv   the export
"""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .events import Event

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: Path, map_location="cpu") -> Any:
    """Load a checkpoint or model with ``weights_only=True``: a file from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    return path


class RunDir:
    """Owns the files of one run; also an event subscriber that appends each event to its JSONL file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._metrics = None
        self._events = None

    # --- paths
    @property
    def profile(self) -> Path:
        return self.path / "profile.toml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    # --- creation
    def create(self, profile_toml: str, *, exist_ok: bool = False) -> None:
        if self.path.exists() and any(self.path.iterdir()) and not exist_ok:
            raise UserError(f"{self.path}: run directory already exists and is not empty "
                            "(choose another --run-dir, or resume it)")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.profile, profile_toml)
        meta = {"format": FORMAT_VERSION, "created": time.time(), "torch": torch.__version__,
                "python": platform.python_version(), "robprune": _version()}
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2) + "\n")

    def open_logs(self) -> None:
        self._metrics = open(self.metrics, "a", encoding="utf-8")
        self._events = open(self.events, "a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            for f in (self._metrics, self._events):
                if f is not None:
                    f.close()
            self._metrics = self._events = None

    # --- subscriber
    def __call__(self, event: Event) -> None:
        self.write_event(event)

    def write_event(self, event: Event) -> None:
        line = json.dumps(event.to_dict(), default=_json_default) + "\n"
        with self._lock:
            f = self._metrics if event.metric else self._events
            if f is None:
                target = self.metrics if event.metric else self.events
                with open(target, "a", encoding="utf-8") as g:
                    g.write(line)
                return
            f.write(line)
            f.flush()

    def append_event(self, record: dict) -> None:
        """Append a record (with ``t`` and ``type``) to events.jsonl from outside the engine (e.g. export)."""
        record = {"t": time.time(), **record}
        line = json.dumps(record, default=_json_default) + "\n"
        with self._lock:
            with open(self.events, "a", encoding="utf-8") as g:
                g.write(line)

    def metrics_lines(self) -> int:
        with self._lock:
            if self._metrics is not None:
                self._metrics.flush()
        if not self.metrics.exists():
            return 0
        with open(self.metrics, "rb") as f:
            return sum(1 for _ in f)

    def truncate_metrics(self, lines: int) -> None:
        """Drop metrics lines written after a checkpoint, so a resumed run has no duplicated steps."""
        if not self.metrics.exists():
            return
        with open(self.metrics, "rb") as f:
            kept = [ln for _, ln in zip(range(lines), f)]
        atomic_write_bytes(self.metrics, b"".join(kept))


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line after a hard kill
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("robprune")
    except Exception:
        return "0+unknown"
