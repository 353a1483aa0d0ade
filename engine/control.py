"""The commands a run accepts, checked in one place, and the ways they reach the engine.

One typed vocabulary (:class:`Pause`, :class:`Resume`, :class:`SetRho`, :class:`EvalNow`, :class:`CheckpointNow`,
:class:`Stop`) serves the dashboard's dialog, the in-process :class:`~robprune.engine.session.Session` and the
``commands.jsonl`` file of a run directory alike. A command is valid once constructed: :func:`make_command` and
:func:`parse_command_line` raise a one-line :class:`CommandError` for anything else (unknown names or arguments,
wrong types, NaN/inf, values outside the stated ranges, huge numbers, deep nesting, binary bytes, over-long
lines). The engine applies commands at step boundaries; a refused line of the command file becomes a
:class:`Refused` entry, which the engine logs as a warning (log pane and events.jsonl) and the run goes on.

Who may steer a run: the engine reads ``commands.jsonl`` only when it is a regular file (not a symlink) owned by
the run's user and not writable by group or others, in a run directory that others cannot write; otherwise it
warns once and ignores the file until that changes.
"""
from __future__ import annotations

import json
import math
import os
import queue
import stat
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import UserError

RHO_RANGE = (1e-8, 1e6)  # rho of any layer, before and after a change
FACTOR_RANGE = (1e-3, 1e3)  # a multiply factor
MAX_LINE_BYTES = 4096  # one line of commands.jsonl
MAX_LAYER_NAME = 256
COMMAND_FILE = "commands.jsonl"


class CommandError(UserError):
    """A command that is not one the engine accepts; the message says why, in one line."""


def _number(what: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError(f"{what}: expected a number from {lo:g} to {hi:g}, found {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        raise CommandError(f"{what}: expected a number from {lo:g} to {hi:g}, found an integer too large for a "
                           "float") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise CommandError(f"{what}: expected a number from {lo:g} to {hi:g}, found {v:g}")
    return v


@dataclass(frozen=True)
class Command:
    """Base of the commands; ``name`` is the word in commands.jsonl and the type of the event it leaves."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str = "", **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.name = name

    @property
    def args(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps({"t": time.time(), "command": self.name, "args": self.args})


class Pause(Command, name="pause"):
    """Take no training step until :class:`Resume` (a checkpoint is written at once)."""


class Resume(Command, name="resume"):
    """Continue after :class:`Pause`."""


class EvalNow(Command, name="eval_now"):
    """Evaluate (natural and attacked accuracy on the live subset) at the next step boundary."""


class CheckpointNow(Command, name="checkpoint_now"):
    """Write a checkpoint at the next step boundary."""


class Stop(Command, name="stop"):
    """Stop at the next step boundary with a checkpoint (the run can be resumed)."""


@dataclass(frozen=True)
class SetRho(Command, name="set_rho"):
    """Set rho to ``value`` (or multiply it by ``value``) for one ADMM layer, or for all with ``layer`` None."""

    value: float
    layer: str | None = None
    multiply: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.multiply, bool):
            raise CommandError(f"set_rho: multiply: expected true or false, found {type(self.multiply).__name__}")
        what, (lo, hi) = ("set_rho: factor", FACTOR_RANGE) if self.multiply else ("set_rho: rho", RHO_RANGE)
        object.__setattr__(self, "value", _number(what, self.value, lo, hi))
        if self.layer is not None:
            if not isinstance(self.layer, str):
                raise CommandError(f"set_rho: layer: expected a layer name or null, found {type(self.layer).__name__}")
            if not 0 < len(self.layer) <= MAX_LAYER_NAME or not self.layer.isprintable():
                raise CommandError(f"set_rho: layer: expected a layer name of 1 to {MAX_LAYER_NAME} printable "
                                   "characters")


@dataclass(frozen=True)
class Refused(Command, name="refused"):
    """A line of commands.jsonl that was not a valid command (never parsed from outside: made by the reader)."""

    reason: str


COMMANDS: dict[str, type[Command]] = {c.name: c for c in (Pause, Resume, SetRho, EvalNow, CheckpointNow, Stop)}


def make_command(name: Any, args: Any = None, *, layers: set[str] | None = None) -> Command:
    """A command from its name and arguments (as in commands.jsonl), checked; ``layers``, when given, are the
    run's ADMM layers that ``set_rho`` may name."""
    if not isinstance(name, str) or name not in COMMANDS:
        shown = repr(name)[:40] if isinstance(name, str) else f"a JSON {type(name).__name__}"
        raise CommandError(f"command: expected one of {', '.join(COMMANDS)}, found {shown}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError(f"{name}: args: expected an object, found {type(args).__name__}")
    cls = COMMANDS[name]
    allowed = [f.name for f in fields(cls)]
    extra = [k for k in args if k not in allowed]
    if extra:
        raise CommandError(f"{name}: unknown argument {str(extra[0])[:40]!r}; expected "
                           + (", ".join(allowed) if allowed else "none"))
    try:
        cmd = cls(**args)
    except TypeError:
        raise CommandError(f"{name}: expected the arguments {', '.join(allowed)}") from None
    if layers is not None and isinstance(cmd, SetRho) and cmd.layer is not None and cmd.layer not in layers:
        raise CommandError(f"set_rho: layer: no ADMM layer named {cmd.layer[:60]!r}; expected one of "
                           f"{', '.join(sorted(layers))}")
    return cmd


def _no_constants(word: str) -> Any:
    raise CommandError(f"{word} is not a number a command takes")


def parse_command_line(raw: bytes, *, layers: set[str] | None = None) -> Command:
    """One line of commands.jsonl (without its newline) as a checked command, or :class:`CommandError`."""
    if len(raw) > MAX_LINE_BYTES:
        raise CommandError(f"a line of {len(raw)} bytes; expected at most {MAX_LINE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"binary bytes (not UTF-8 at byte {exc.start}); expected one JSON object") from None
    try:
        rec = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise CommandError("JSON nested too deeply; expected one flat JSON object") from None
    except CommandError:
        raise
    except ValueError as exc:
        raise CommandError(f"not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(rec, dict):
        raise CommandError(f"expected a JSON object, found a JSON {type(rec).__name__}")
    extra = [k for k in rec if k not in ("t", "command", "args")]
    if extra:
        raise CommandError(f"unknown key {str(extra[0])[:40]!r}; expected command, args and t")
    return make_command(rec.get("command"), rec.get("args"), layers=layers)


# ------------------------------------------------------------------------------------------ the command file


def steering_problem(run_dir: Path, path: Path) -> str | None:
    """Why commands in ``path`` must not be obeyed (None when they may): see the module docstring."""
    try:
        d = os.stat(run_dir)
    except OSError as exc:
        return f"{run_dir}: cannot stat ({exc.strerror})"
    if d.st_mode & stat.S_IWOTH:
        return f"{run_dir} is writable by others (mode {stat.S_IMODE(d.st_mode):o}): anyone could plant commands"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot stat ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink; expected a regular file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to the run's user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def send_to_run_dir(run_dir: str | Path, cmd: Command) -> None:
    """Ask the engine running in ``run_dir`` (in another process) to apply ``cmd``: one JSON line appended to
    ``RUN_DIR/commands.jsonl`` (created for the user alone; a symlink there is refused), which the engine polls
    at step boundaries."""
    from .rundir import open_append

    path = Path(run_dir) / COMMAND_FILE
    fd = open_append(path, mode=0o600)
    try:
        os.write(fd, (cmd.to_json() + "\n").encode())  # one O_APPEND write: senders' lines never interleave
    finally:
        os.close(fd)


class CommandFile:
    """Reads the commands other processes append to a run directory's ``commands.jsonl``.

    Only lines appended after the file was opened count (old commands from an earlier run are skipped). Each
    line becomes a command or a :class:`Refused` entry; a file that may not steer the run yields one
    :class:`Refused` entry and is ignored until that changes."""

    def __init__(self, path: str | Path, poll_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        try:
            self.offset = self.path.stat().st_size if self.path.is_file() else 0
        except OSError:
            self.offset = 0
        self.partial = b""
        self._skipping = False  # inside an over-long line: drop bytes up to its end
        self._next = 0.0
        self._problem: str | None = None
        self.layers: set[str] | None = None

    def poll(self, force: bool = False) -> list[Command]:
        now = time.monotonic()
        if not force and now < self._next:
            return []
        self._next = now + self.poll_interval_s
        problem = steering_problem(self.path.parent, self.path)
        if problem is not None:
            if problem != self._problem:
                self._problem = problem
                return [Refused(f"{COMMAND_FILE} ignored: {problem}")]
            return []
        self._problem = None
        return [self._parse(line) for line in self._new_lines()]

    def _new_lines(self) -> list[bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return []
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:  # truncated by someone: start again
                self.offset, self.partial, self._skipping = 0, b"", False
            if size == self.offset:
                return []
            data = os.pread(fd, min(size - self.offset, 1 << 20), self.offset)
        finally:
            os.close(fd)
        self.offset += len(data)
        out = []
        *lines, rest = (self.partial + data).split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            out.append(line)
        if len(rest) > MAX_LINE_BYTES:
            if not self._skipping:
                out.append(rest)  # reported as too long once; the rest of it is dropped
            self._skipping, rest = True, b""
        self.partial = rest
        return [ln for ln in out if ln.strip()]

    def _parse(self, line: bytes) -> Command:
        try:
            return parse_command_line(line, layers=self.layers)
        except CommandError as exc:
            return Refused(f"{COMMAND_FILE}: line refused: {exc}")


class Control:
    """A thread-safe command queue. ``send`` never blocks; the engine drains it at each step boundary.

    With :meth:`watch_file`, commands appended to a run directory's command file by another process (an
    attached dashboard) join the queue too. ``layers`` (set by the engine) are the ADMM layers a ``set_rho``
    may name."""

    def __init__(self) -> None:
        self._q: queue.Queue[Command] = queue.Queue()
        self._file: CommandFile | None = None
        self._layers: set[str] | None = None

    @property
    def layers(self) -> set[str] | None:
        return self._layers

    @layers.setter
    def layers(self, names) -> None:
        self._layers = set(names)
        if self._file is not None:
            self._file.layers = self._layers

    def watch_file(self, path: str | Path) -> None:
        self._file = CommandFile(path)
        self._file.layers = self._layers

    def _poll_file(self, force: bool = False) -> None:
        if self._file is not None:
            for cmd in self._file.poll(force):
                self._q.put(cmd)

    def send(self, cmd: Command) -> None:
        """Queue ``cmd``; a ``set_rho`` naming a layer the run does not have raises :class:`CommandError`."""
        if not isinstance(cmd, Command) or isinstance(cmd, Refused):
            raise CommandError(f"expected a command ({', '.join(COMMANDS)}), found {type(cmd).__name__}")
        if self._layers is not None and isinstance(cmd, SetRho):
            make_command(cmd.name, cmd.args, layers=self._layers)
        self._q.put(cmd)

    def stop(self) -> None:
        self.send(Stop())

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
