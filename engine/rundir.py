"""The run directory: every file a run leaves on disk, written so that a crash never leaves a torn file.

Layout::

    profile.toml       the resolved profile (every key, overrides applied)
    meta.json          versions and creation time
    metrics.jsonl      step / eval / layers / residuals events, one JSON object a line, flushed as emitted
    events.jsonl       phase changes, applied commands, checkpoints, logs, finished, error
    checkpoint.pt      the last checkpoint (atomic: temp file, fsync, rename)
    best.pt            the checkpoint of the best live evaluation in the latest phase (see Engine._consider_best)
    model.pt           final weights, a plain state_dict (torch.load(..., weights_only=True))
    .lock              held (flock) by the process running the run; holds its pid
    summary.json / summary.md / metrics.csv   the export
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import platform
import re
import stat
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, overload

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

from .errors import UserError, file_kind
from .events import Event

FORMAT_VERSION = 1


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# One permission rule for a run directory and everything in it: what the user's umask allows, but never writable
# by group or others (only the run's user may change its records or steer it).
_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK & ~0o022
DIR_MODE = 0o777 & ~_UMASK & ~0o022
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_run_file(path: Path, flags: int = os.O_RDONLY, mode: int = FILE_MODE) -> int:
    """Open a file robprune keeps in a run directory (``flags`` as for os.open) without following a symlink and
    without blocking: a symlink, a FIFO, a device or a directory in its place is refused with a one-line
    :class:`UserError` (a FIFO would hold the open, or the first read, until another process opened its other
    end). A missing file raises FileNotFoundError, other failures OSError, as os.open does."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            verb = "writes" if flags & (os.O_WRONLY | os.O_RDWR) else "reads"
            raise UserError(f"{path}: is a symlink; robprune never {verb} through one: remove it") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO no one reads, opened to write; a directory
            kind = "a FIFO (named pipe)" if exc.errno == errno.ENXIO else "a directory"
            raise UserError(f"{path}: is {kind}, expected a file robprune writes: remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{path}: is {file_kind(st.st_mode)}, expected a file robprune writes: remove it")
    os.set_blocking(fd, True)
    return fd


def read_run_file(path: Path) -> bytes:
    """The bytes of a file robprune keeps in a run directory, opened by :func:`open_run_file`."""
    with os.fdopen(open_run_file(path), "rb") as f:
        return f.read()


def open_append(path: Path, mode: int = FILE_MODE) -> int:
    """Open ``path`` for appending (created with ``mode`` if missing) by :func:`open_run_file`: a symlink, a FIFO
    or a device planted where the engine writes is refused in one line."""
    return open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: Path, data: bytes, *, hint: str = "") -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, rename, fsync dir.

    On any OS error (a full disk, a read-only file system) the temp file is removed, ``path`` keeps its
    previous content, and a one-line :class:`WriteError` names the path, the reason and ``hint``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; the run directory's rule applies
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise WriteError(path, exc, hint) from None
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class WriteError(UserError):
    """A file of the run directory could not be written (full disk, permissions); the old file is intact."""

    def __init__(self, path: Path, exc: OSError, hint: str = "", *, atomic: bool = True) -> None:
        self.path, self.errno = Path(path), exc.errno
        reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {self.path.parent} writable"
        else:
            fix = "check the disk"
        kept = f"; the previous {self.path.name} is intact" if atomic and self.path.exists() else ""
        super().__init__(f"{self.path}: cannot write: {reason}{kept}: {fix}" + (f", then {hint}" if hint else ""))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: Path, obj: Any, *, hint: str = "") -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), hint=hint)


_ZIP_MAGIC = b"PK\x03\x04"


def safe_torch_load(path: Path, map_location="cpu", *, hint: str = "") -> Any:
    """Load a checkpoint or model with ``weights_only=True``: a file from elsewhere cannot run code.

    Every failure is a one-line :class:`UserError`: a missing file, a truncated or corrupt one, or one that
    holds Python objects other than tensors and plain containers (refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise UserError(f"{path}: is {file_kind(path.stat().st_mode)}, expected a model.pt or checkpoint written "
                            "by robprune" + (f": {hint}" if hint else ""))
        raise UserError(f"{path}: no such file" + (f": {hint}" if hint else ""))
    tail = f"; {hint}" if hint else ""
    try:
        with warnings.catch_warnings():  # torch warns about what it refuses; our one line says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if m:
            raise UserError(f"{path}: refused to load: it holds a Python object ({m.group(1)}) that could run code; "
                            f"expected tensors and plain containers only (a file written by robprune){tail}") from None
        what = _damage(path, exc)
    except Exception as exc:
        what = _damage(path, exc)
    raise UserError(f"{path}: {what}: expected a complete file written by robprune{tail}")


def read_json_state(path: Path, max_bytes: int = 64 << 20) -> Any:
    """A JSON file robprune wrote for itself (a resumable state), or None when it is not there or cannot be
    trusted: not a regular file (a FIFO would block, a symlink points elsewhere), larger than ``max_bytes``, not
    UTF-8 JSON. The caller starts over rather than failing: the state only saves time."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _damage(path: Path, exc: BaseException) -> str:
    """Say how a file torch.load could not read is damaged: empty, truncated or corrupt."""
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        return f"truncated ({size} bytes; the end of the archive is missing)"
    if head != _ZIP_MAGIC:
        return f"corrupt ({size} bytes; not a torch.save archive)"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"corrupt ({lines[0] if lines else type(exc).__name__})"


def ensure_dir(path: Path, what: str, expected: str, option: str) -> list[Path]:
    """Make the directory ``path`` (and its missing parents), or take it when it is one already; return the
    directories made, outermost first (none when it was there). What stands in the way (a file, a device or a
    dangling link at ``path``, a file above it, a place this user cannot write in) is one UserError naming the path,
    what it should have been (``what``: "run directory"; ``expected``: "a new or empty directory for the run") and
    the ``option`` to change. The one check for every directory a command writes into."""
    try:
        if path.is_symlink() or path.exists():
            if not path.is_dir():
                raise UserError(f"{path}: is not a directory (a file or a device is there): expected {expected} "
                                f"(choose another {option})")
            if not os.access(path, os.W_OK | os.X_OK):
                raise UserError(f"{path}: cannot write in the {what}: permission denied: expected a writable place "
                                f"(choose another {option})")
            return []
        missing = [q for q in (path, *path.parents) if not q.exists()][::-1]
        path.mkdir(mode=DIR_MODE, parents=True)
        return missing
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise UserError(f"{path}: cannot create the {what}: {reason}: expected a writable place "
                        f"(choose another {option})") from None


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    return path


class _RunFile:
    """A read-only attribute of :class:`RunDir`: the path of the file ``name`` in the run directory."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    @overload
    def __get__(self, rundir: None, owner: type | None = None) -> _RunFile: ...
    @overload
    def __get__(self, rundir: RunDir, owner: type | None = None) -> Path: ...

    def __get__(self, rundir: RunDir | None, owner: type | None = None) -> Path | _RunFile:
        return self if rundir is None else rundir.path / self.name

    def __set__(self, rundir: RunDir, value: object) -> None:
        raise AttributeError(f"{type(rundir).__name__}.{self.attr} is read-only")


class RunDir:
    """Owns the files of one run; also an event subscriber that appends each event to its JSONL file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._metrics = None
        self._events = None
        self._lock_fd: int | None = None
        self.write_error: WriteError | None = None  # the first failed metrics/events append, if any
        self.made_dirs: list[Path] = []  # directories create() made, outermost first
        self._made_files: list[str] = []

    # --- paths
    profile = _RunFile("profile.toml")
    checkpoint = _RunFile("checkpoint.pt")
    best = _RunFile("best.pt")
    meta = _RunFile("meta.json")
    lock_file = _RunFile(".lock")
    model = _RunFile("model.pt")
    metrics = _RunFile("metrics.jsonl")
    events = _RunFile("events.jsonl")
    eval_dir = _RunFile("eval")  # robprune eval's results (autoattack-*.json) and resumable state files

    WRITTEN = (profile.name, meta.name, metrics.name, events.name, "commands.jsonl", checkpoint.name, best.name,
               lock_file.name, model.name, "summary.json", "summary.md", "metrics.csv",
               # robprune export's model files (engine/export.py)
               "model.safetensors", "masks.safetensors", "model.pt2", "model_card.json", "model_compact.safetensors",
               "model_compact.pt2")

    def check_links(self) -> None:
        """Refuse a run directory where a file the engine writes or locks is a symlink (it would write through
        it, or replace it): one line naming the file."""
        for name in self.WRITTEN:
            if (self.path / name).is_symlink():
                raise UserError(f"{self.path / name}: is a symlink; robprune never writes through one: remove it")

    # --- creation
    def create(self, profile_toml: str, *, exist_ok: bool = False) -> None:
        """Make the run directory (or take an empty one) and write profile.toml and meta.json. Anything that
        stands in the way is one line naming the path; :meth:`remove_created` undoes exactly what this made."""
        p = self.path
        self.made_dirs = ensure_dir(p, "run directory", "a new or empty directory for the run", "--run-dir")
        try:
            if not self.made_dirs and any(p.iterdir()) and not exist_ok:
                raise UserError(f"{p}: run directory already exists and is not empty "
                                "(choose another --run-dir, or resume it)")
        except OSError as exc:
            raise UserError(f"{p}: cannot read the run directory: {(exc.strerror or str(exc)).lower()}: expected "
                            "a readable place (choose another --run-dir)") from None
        self.check_links()
        self._made_files = ["profile.toml", "meta.json"]
        atomic_write_text(self.profile, profile_toml)
        meta = {"format": FORMAT_VERSION, "created": time.time(), "torch": torch.__version__,
                "python": platform.python_version(), "robprune": _version()}
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2) + "\n")

    # --- exclusive use
    def acquire(self) -> None:
        """Lock the run directory for this process (``flock`` on ``.lock``, held until :meth:`close` or exit).

        A directory another live process holds raises a one-line UserError naming that process's pid; the
        lock dies with its process, so a run killed with SIGKILL never leaves a stale lock behind."""
        if self._lock_fd is not None:
            return
        self.check_links()
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{self.lock_file}: is a symlink; robprune never writes through one: remove it") from None
            raise UserError(f"{self.lock_file}: cannot create the lock file: {(exc.strerror or str(exc)).lower()}: "
                            f"make {self.path} writable") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise UserError(f"{self.path}: in use by another robprune process (pid {holder}): wait for it to "
                                f"finish, or stop it first (kill -TERM {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def engine_running(self) -> bool:
        """Whether a live process holds this run directory's lock (an engine is running it). Never creates or
        holds the lock: a shared, non-blocking probe, released at once."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False  # no lock file: no engine has run here (or it is unreadable: nobody we can see)
        try:
            if fcntl is None:  # pragma: no cover - not POSIX
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def remove_created(self) -> None:
        """Undo :meth:`create` after a setup error: remove the files this process wrote here, by exact name, and
        the directories it made if they are empty then; a user's own directory and files stay."""
        for name in (*self._made_files, "metrics.jsonl", "events.jsonl", ".lock"):
            f = self.path / name
            if f.is_symlink() or not f.is_file():
                continue
            try:  # the directory was new or empty when create() took it: these names are ours
                f.unlink()
            except OSError:
                pass
        for d in reversed(self.made_dirs):
            try:
                d.rmdir()  # only when empty
            except OSError:
                break

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temp files an interrupted atomic write of ours left behind (``.checkpoint.pt.XXXXXXXX.tmp``:
        the name of a file robprune writes, then mkstemp's 8 characters); a user's own ``.*.tmp`` stays."""
        gone = []
        for p in self.path.glob(".*.tmp"):
            base, _, rand = p.name[1:-len(".tmp")].rpartition(".")
            if base not in self.WRITTEN or len(rand) != 8 or p.is_symlink() or not p.is_file():
                continue
            try:
                p.unlink()
                gone.append(p)
            except OSError:
                pass
        return gone

    def open_logs(self) -> None:
        self._metrics = open_append(self.metrics)
        self._events = open_append(self.events)

    def close(self) -> None:
        with self._lock:
            for fd in (self._metrics, self._events):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._metrics = self._events = None
        self.release()

    # --- subscriber
    def __call__(self, event: Event) -> None:
        self.write_event(event)

    def write_event(self, event: Event) -> None:
        """Append the event's line to metrics.jsonl or events.jsonl with one unbuffered write. A write that fails
        (a full disk) is cut back to the last whole line, remembered in ``write_error`` (the engine stops at its
        next checkpoint, before one could claim records that are not on disk), and said once in events.jsonl
        when that file still takes it; nothing more goes to the failed file."""
        line = (json.dumps(event.to_dict(), default=_json_default) + "\n").encode("utf-8")
        target = self.metrics if event.metric else self.events
        with self._lock:
            if self.write_error is not None and self.write_error.path == target:
                return
            fd = self._metrics if event.metric else self._events
            own = fd is None
            try:
                if own:
                    fd = open_append(target)
                _append_line(fd, line)
            except OSError as exc:
                if self.write_error is None:
                    self.write_error = WriteError(target, exc, f"resume the run (robprune run --resume {self.path})",
                                                  atomic=False)
                    if target != self.events:  # best effort: the reason, where a reader looks for it
                        try:
                            fd2 = self._events if self._events is not None else open_append(self.events)
                            _append_line(fd2, (json.dumps({"t": time.time(), "type": "error", "message": str(
                                self.write_error)}) + "\n").encode())
                        except OSError:
                            pass
            finally:
                if own and fd is not None:
                    os.close(fd)

    def append_event(self, record: dict) -> None:
        """Append a record (with ``t`` and ``type``) to events.jsonl from outside the engine (e.g. export)."""
        record = {"t": time.time(), **record}
        line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
        with self._lock:
            fd = open_append(self.events)
            try:
                _append_line(fd, line)
            finally:
                os.close(fd)

    def metrics_lines(self) -> int:
        """Complete lines in metrics.jsonl (a line cut off at the end does not count)."""
        if not self.metrics.exists():
            return 0
        with os.fdopen(open_run_file(self.metrics), "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def truncate_metrics(self, lines: int) -> None:
        """Keep the first ``lines`` complete lines of metrics.jsonl: drop what was written after a checkpoint (so a
        resumed run has no duplicated steps) and a last line cut off by a kill or a full disk."""
        if not self.metrics.exists():
            return
        with os.fdopen(open_run_file(self.metrics), "rb") as f:
            kept = [ln for _, ln in zip(range(lines), f) if ln.endswith(b"\n")]
        atomic_write_bytes(self.metrics, b"".join(kept))


def _append_line(fd: int, line: bytes) -> None:
    """One O_APPEND write of a whole line; if the disk takes only part of it, the part is cut off again."""
    size = os.fstat(fd).st_size
    try:
        n = os.write(fd, line)
        if n != len(line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise


class JsonlTail:
    """Follows a JSONL file that another thread or process appends to: each :meth:`read` returns the
    complete new lines as dicts (a torn last line waits for its end). A damaged line is skipped and named in
    ``skipped`` (``FILE line N: why``; the reader takes and clears them). A file that shrank (rewritten, e.g.
    metrics.jsonl truncated by a resume) is read again from its start."""

    def __init__(self, path: str | Path, *, from_end: bool = False) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0
        self.partial = b""
        self.lineno = 0  # complete lines read so far (meaningful when reading from the start)
        self.skipped: list[str] = []

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset, self.partial, self.lineno = 0, b"", 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self.partial + f.read(size - self.offset)
        self.offset = size
        *lines, self.partial = data.split(b"\n")
        out = _parse_lines(self.path, lines, self.lineno, self.skipped)
        self.lineno += len(lines)
        return out


class Records(list):
    """The records of a JSONL file, with ``skipped``: one message per damaged line left out ("FILE line N: ...")."""

    def __init__(self, items=(), skipped: list[str] | None = None) -> None:
        super().__init__(items)
        self.skipped = skipped or []


def read_jsonl(path: str | Path) -> Records:
    """Every good record of a JSONL file. A damaged line (not UTF-8, not JSON, not an object; or a last line cut
    off by a kill) is skipped and named in ``.skipped``: nothing after it is lost."""
    p = Path(path)
    out = Records()
    try:
        data = read_run_file(p)
    except FileNotFoundError:
        return out
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""
    out.extend(_parse_lines(p, lines, 0, out.skipped))
    if torn.strip():
        out.skipped.append(f"{p} line {len(lines) + 1}: cut off (no newline: a write was interrupted); skipped")
    return out


def _parse_lines(path: Path, lines: list[bytes], before: int, skipped: list[str]) -> list[dict]:
    """The records of complete ``lines`` (numbered from ``before + 1``); damaged ones are named in ``skipped``."""
    out = []
    for no, raw in enumerate(lines, before + 1):
        if not raw.strip():
            continue
        rec, why = _parse_record(raw)
        if why:
            skipped.append(f"{path} line {no}: {why}; skipped")
        else:
            out.append(rec)
    return out


def _parse_record(raw: bytes) -> tuple[dict | None, str]:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "binary bytes, not UTF-8 text"
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object"
    return rec, ""


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
