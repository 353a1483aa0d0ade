"""Data-parallel runs: one process per rank, started by torchrun (or ``robprune run --nproc N``, which starts the
same through ``torch.distributed.run``), with DistributedDataParallel averaging the gradients.

What a rank does, and why a run with N ranks is the run with one (docs/distributed.md):

* ``data.batch_size`` is the global batch. Batch k of an epoch is the one a single process would take (the order
  depends on (seed, phase, epoch) only); rank r trains on its r-th share (:func:`shard_rows`). Each rank's loss
  is its share's summed cross-entropy times ``N / batch``, so DDP's average is the global batch's mean.
* The random starts of the training attack are drawn for the whole global batch on every rank, from generators
  that every rank keeps in the same state, and each rank takes its rows: every example starts where it would in
  one process. The RNG state of every rank is in each checkpoint (they are equal; the checkpoint says so).
* The ADMM penalty gradient, the Z/U updates, the projections and masks are computed on every rank from weights
  that are bitwise identical (DDP gives every rank the same averaged gradient; buffers are broadcast from rank 0
  after each step). Every checkpoint compares the ranks' fingerprints and stops a run whose ranks disagree.
* Rank 0 owns the run directory (records, checkpoints, the lock, the command file); the others write nothing
  there. Commands are read by rank 0 and broadcast at every step boundary, so every rank applies them at the
  same step; a stop asked of any rank (a signal) stops all of them at the same step.
* Evaluations are split across ranks by batch and summed; AutoAttack runs its batches round-robin and gathers.
* A rank that dies makes the others fail their next collective (a closed connection is seen at once; a silent
  hang after ``run.dist_timeout_s``): they exit with :class:`RankLost`'s code and write no checkpoint; the last
  one resumes.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError

EXIT_RANK_LOST = 4


class RankLost(Exception):
    """Another rank stopped answering (it died, or its machine went away): this rank stops too, without a
    checkpoint (the last one resumes)."""

    exit_code = EXIT_RANK_LOST


class RanksDiverged(Exception):
    """The ranks' weights or ADMM state are no longer identical: a bug, never a state to checkpoint."""

    exit_code = 1


class AgreedExit(Exception):
    """Another rank reported the reason (bad input): this one leaves quietly with the same exit code."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"exit {exit_code}")
        self.exit_code = exit_code


def comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective whose peer is gone (gloo: a closed connection; NCCL: an abort or
    a timeout), as opposed to a bug in this rank."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc).lower()
    return any(w in msg for w in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                  "timed out", "socket"))


def short(exc: BaseException) -> str:
    """A communication error in one short line: gloo's and NCCL's messages open with their source file's place and
    go on with advice; the reason is in between."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:200]


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun sets them, or None outside torchrun (or with one rank)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK: expected integers, as torchrun sets them") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank}: expected 0 to {world - 1} (WORLD_SIZE={world})")
    return rank, world, local


def device_type(want: str) -> str:
    """``cuda`` or ``cpu`` for a device setting (``auto``: CUDA when this machine has it)."""
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def shard_rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a batch of ``total`` examples that ``rank`` of ``world`` takes: contiguous
    shares, the first ``total % world`` one example larger (as ``torch.tensor_split``)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class DistContext:
    """This process's place in a data-parallel run, and the collectives the engine needs, each turning a lost peer
    into :class:`RankLost`. Commands and small objects go over a gloo group (CPU), tensors over the default
    group (NCCL on GPUs, gloo on CPUs)."""

    rank: int
    world: int
    local_rank: int
    backend: str = ""
    timeout_s: float = 600.0
    control: Any = None  # the gloo group for objects and commands (None: the default group is gloo)
    info: list[dict] = field(default_factory=list)  # every rank's pid, host and device, once set up

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext | None":
        w = world_from_env()
        return None if w is None else cls(*w)

    def init(self, device_type: str, timeout_s: float) -> None:
        """Join the process group: NCCL with this rank's local GPU on CUDA, gloo on the CPU."""
        import torch.distributed as dist

        self.timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK={self.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                                "device(s): start at most that many ranks per machine (--nproc-per-node)")
            torch.cuda.set_device(self.local_rank)
            self.backend = "nccl"
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", self.local_rank))
            self.control = dist.new_group(backend="gloo", timeout=timeout)
        else:
            self.backend = "gloo"
            dist.init_process_group("gloo", timeout=timeout)
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise UserError(f"the process group has {dist.get_world_size()} ranks (this is {dist.get_rank()}), "
                            f"but WORLD_SIZE={self.world} and RANK={self.rank}")

    def device(self, device_type: str) -> torch.device:
        return torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a peer already gone: nothing left to tear down politely
                pass

    # ------------------------------------------------------------------ collectives
    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as exc:
            if comm_failure(exc):
                raise RankLost(f"rank {self.rank}: lost contact with the other ranks ({short(exc)})") from None
            raise

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel, which gives every rank rank 0's weights and buffers; buffers are
        never synced before a forward (the engine broadcasts them after each step, :meth:`broadcast_buffers`)."""
        import inspect
        import warnings

        from torch.nn.parallel import DistributedDataParallel as DDP

        # newer torch names the switch differently
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        # a 1-channel first convolution: its gradient's stride for the size-1 channel dimension differs from the
        # weight's, which DDP reports though the layouts are the same; the copy costs nothing
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return self._call(DDP, model, device_ids=[device.index] if device.type == "cuda" else None, **sync)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.writer else None]
        self._call(dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list = [None] * self.world
        self._call(dist.all_gather_object, out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        self._call(dist.barrier, group=self.control)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (on this rank's device) over the ranks, in place."""
        import torch.distributed as dist

        self._call(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's forward updated them with its own
        share of the batch."""
        import torch.distributed as dist

        for b in module.buffers():
            self._call(dist.broadcast, b, src=0)

    def agree(self, commands: list, *, stop: bool, emit: bool) -> tuple[list, bool, bool]:
        """At a step boundary: rank 0's commands, whether any rank was asked to stop, and whether rank 0 wants a
        progress record now, the same on every rank. One small all-reduce; a broadcast only when rank 0 has
        commands."""
        import torch.distributed as dist

        flags = torch.tensor([len(commands) if self.writer else 0, int(stop), int(emit and self.writer)],
                             dtype=torch.int64)
        self._call(dist.all_reduce, flags, op=dist.ReduceOp.MAX, group=self.control)
        n, any_stop, do_emit = flags.tolist()
        cmds = self.broadcast(commands if self.writer else None) if n else []
        return list(cmds), bool(any_stop), bool(do_emit)

    def describe(self) -> str:
        hosts = {r.get("host") for r in self.info}
        where = f" on {len(hosts)} machines" if len(hosts) > 1 else ""
        return f"{self.world} ranks ({self.backend}{where})"


def exit_rank(dist: DistContext, engine, code: int) -> None:
    """End this rank's process with ``code`` once its work is written: DDP released, the process group destroyed,
    output flushed, and no interpreter shutdown after that (gloo's threads may still hold tensors then, and a
    late signal takes its default action: either aborts a rank whose run has ended)."""
    import gc
    import sys

    if engine is not None:
        engine.release_parallel()
    gc.collect()
    dist.close()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def rank_info(device: torch.device) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(device)}


# ---------------------------------------------------------------------------------------------------------------
# robprune run --nproc N: torchrun's single-machine launch, from robprune's own process


def _children() -> list[int]:
    """Pids of this process's children (Linux /proc; elsewhere none)."""
    me, out = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(me):
            out.append(int(name))
    return out


def launch(nproc: int, worker_args: list[str], *, say, run_dir: str) -> int:
    """Run ``python WORKER_ARGS`` (``-m robprune run ...``) as ``nproc`` ranks on this machine through torch.distributed.run (its
    ``--standalone`` rendezvous, no restarts) and return the run's exit code.

    torchrun starts each rank in a session of its own, so no signal of the terminal reaches it: this process passes
    Ctrl-C (SIGINT), SIGHUP and SIGTERM on to the ranks, which then behave as one process does (the first Ctrl-C
    stops every rank at the same step with a checkpoint, a second at once). A SIGHUP ignored when we start
    (``nohup``) stays ignored. The agent runs off the main thread, so torch installs no handlers of its own. A
    rank that dies ends the others (see the module docstring); ``say`` gets one line naming it."""
    import logging
    import signal
    import threading
    import uuid

    from torch.distributed import run as trun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # their notes; ours are below
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = trun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", *worker_args])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, cmd, cmd_args = trun.config_from_args(args)
    result: dict = {}

    def agent() -> None:
        try:
            elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
        except ChildFailedError as exc:
            result["failures"] = exc.failures
        except BaseException as exc:  # noqa: BLE001 - reported below, in one line
            result["error"] = exc

    def forward(signum, frame) -> None:
        for pid in _children():
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if sig is not None and (sig != getattr(signal, "SIGHUP", None) or signal.getsignal(sig) != signal.SIG_IGN):
            signal.signal(sig, forward)
    thread = threading.Thread(target=agent, name="robprune-launch", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in result:
        exc = result["error"]
        say(f"robprune: error: the launch of {nproc} ranks failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}")
        return 1
    failures = result.get("failures") or {}
    if not failures:
        return 0
    codes = {int(r): f.exitcode for r, f in failures.items()}
    for wanted in (2, 3):  # bad input, a diverged run: the ranks said so
        if wanted in codes.values():
            return wanted
    if set(codes.values()) <= {130}:
        return 130
    resume = f"robprune run --resume {run_dir} --nproc {nproc}"
    # who went first: the others lost it (exit 4), or were ending when torchrun's clean-up SIGTERM came (a signal
    # that arrives while the interpreter shuts down takes its default action)
    consequence = {EXIT_RANK_LOST: 2, -signal.SIGTERM: 1}
    rank, code = min(codes.items(), key=lambda rc: (consequence.get(rc[1], 0), rc[0]))
    if code == EXIT_RANK_LOST:
        return EXIT_RANK_LOST
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        say(f"robprune: error: rank {rank} (pid {getattr(failures[rank], 'pid', '?')}) was killed ({name}); the "
            f"other ranks stopped without a checkpoint; the last one resumes: {resume}")
        return EXIT_RANK_LOST
    say(f"robprune: error: rank {rank} failed (exit code {code}; its message is above); the last checkpoint "
        f"resumes: {resume}")
    return code
