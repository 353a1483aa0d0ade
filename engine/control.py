"""Commands the engine accepts from any thread; applied by the engine at step boundaries."""
from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMMANDS = ("pause", "resume", "set_rho", "eval_now", "checkpoint", "stop")


@dataclass
class Command:
    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in COMMANDS:
            raise ValueError(f"unknown command {self.name!r}; expected one of {', '.join(COMMANDS)}")
        if self.name == "set_rho":
            value = self.args.get("value")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"set_rho needs a positive number, got {value!r}")


COMMAND_FILE = "commands.jsonl"


def send_to_run_dir(run_dir: str | Path, name: str, **args: Any) -> None:
    """Ask the engine running in ``run_dir`` (in another process) to apply a command.

    Appends one JSON line to ``RUN_DIR/commands.jsonl``; the engine polls that file at step boundaries
    (at most a few times a second) and applies new lines in order, as if sent in-process."""
    Command(name, args)  # validate here, so a bad command fails in the sender, not in the run
    line = json.dumps({"t": time.time(), "command": name, "args": args}) + "\n"
    fd = os.open(Path(run_dir) / COMMAND_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines from several senders never interleave
    finally:
        os.close(fd)


class CommandFile:
    """Reads the commands other processes append to a run directory's ``commands.jsonl``.

    Only lines appended after the file was opened count (old commands from an earlier run are skipped)."""

    def __init__(self, path: str | Path, poll_interval_s: float = 0.2) -> None:
        from .rundir import JsonlTail

        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self._tail = JsonlTail(self.path, from_end=True)
        self._next = 0.0

    def poll(self, force: bool = False) -> list[Command]:
        now = time.monotonic()
        if not force and now < self._next:
            return []
        self._next = now + self.poll_interval_s
        out = []
        for rec in self._tail.read():
            try:
                out.append(Command(rec["command"], dict(rec.get("args") or {})))
            except (ValueError, KeyError, TypeError):
                continue  # a malformed line from outside never stops the run
        return out


class Control:
    """A thread-safe command queue. ``send`` never blocks; the engine drains it at each step boundary.

    With :meth:`watch_file`, commands appended to a run directory's command file by another process (an
    attached dashboard) join the queue too."""

    def __init__(self) -> None:
        self._q: queue.Queue[Command] = queue.Queue()
        self._file: CommandFile | None = None

    def watch_file(self, path: str | Path) -> None:
        self._file = CommandFile(path)

    def _poll_file(self, force: bool = False) -> None:
        if self._file is not None:
            for cmd in self._file.poll(force):
                self._q.put(cmd)

    def send(self, name: str, **args: Any) -> None:
        self._q.put(Command(name, args))

    def pause(self) -> None:
        self.send("pause")

    def resume(self) -> None:
        self.send("resume")

    def set_rho(self, value: float, layer: str | None = None, multiply: bool = False) -> None:
        """Set rho (or multiply it by ``value`` when ``multiply``) for one layer or, with layer None, all layers."""
        self.send("set_rho", value=value, layer=layer, multiply=multiply)

    def eval_now(self) -> None:
        self.send("eval_now")

    def checkpoint(self) -> None:
        self.send("checkpoint")

    def stop(self) -> None:
        self.send("stop")

    def drain(self) -> list[Command]:
        self._poll_file()
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> Command | None:
        """Block up to ``timeout`` seconds for the next command (used while paused)."""
        self._poll_file(force=True)
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None
