"""The three-phase pipeline: adversarial pretraining -> ADMM -> hard prune + masked retraining.

:class:`Engine` runs on one thread (the session's background thread, or the main thread headless). It
reads commands from a :class:`~robprune.engine.control.Control` at every step boundary and emits events on an
:class:`~robprune.engine.events.EventBus`. Host syncs happen only at the emission interval (``run.log_interval_s``),
at epoch ends and when a command asks for one: per-step loss and accuracy accumulate on the device.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torchvision
    np = None

from . import data as data_mod
from . import evaluation as eval_mod
from . import overfit
from . import distributed as dist_mod
from .admm import ADMM
from .attacks import attack, channels_last_strides, evaluate, evaluate_counts
from .config import PHASES, Config, PhaseConfig, phase_attack
from .control import (CheckpointNow, Command, Control, EvalNow, Pause, Refused, Resume, SetRho, Stop)
from .errors import ConfigError, NonFiniteError, UserError
from .events import (AutoAttackResult, CheckpointSaved, CommandApplied, ErrorEvent, EvalResult, EventBus, Finished,
                     LayerStats, LogLine, NonFinite, OverfitCheck, PhaseChange, PruneAllocation, Residuals,
                     StepMetrics)
from .models import PerModel, build_model, cpu_channels_last_hazard, prunable_parameters
from .resources import ResourceMonitor
from .pruning import MaskedParams, layer_stats, plan_layers, project
from .rundir import RunDir, atomic_torch_save, safe_torch_load
from .summary import build_summary, write_summary

CHECKPOINT_FORMAT = 1
NONFINITE_ACTIONS = ("stop", "pause")
# evaluations that compete for best.pt: those on the live subset, during a training phase
BEST_REASONS = ("periodic", "phase_end", "now")


class StopRequested(Exception):
    pass


class _StopInFinal(StopRequested):
    """A stop during the final AutoAttack: the checkpoint of the last phase's end stands (resume finishes the run
    and continues the attack from its state file)."""


CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (CUDA's reproducibility notes)


def bf16_usable(device: torch.device, wanted: bool, capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Whether bf16 autocast runs for ``run.bf16 = wanted`` on ``device``, and a warning when it does not although
    asked: below compute capability 8.0 (V100, T4) cuDNN has no bf16 convolutions, and the emulated path is far
    slower than float32, so such a card runs float32."""
    if not wanted or device.type != "cuda":
        return False, ""
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, (f"run.bf16: this GPU (compute capability {major}.{minor}) has no native bf16 convolutions; "
                       "running float32 instead (bf16 needs 8.0 or newer: A100, RTX 30xx, H100 ...)")
    return True, ""


def resolve_device(cfg: Config, dist: dist_mod.DistContext | None = None) -> torch.device:
    """The run's device; in a data-parallel run on CUDA, the rank's local GPU."""
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(cfg.source, "run.device", "'cpu' or 'auto' (no CUDA device is available here)", "cuda")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return dist.device(want) if dist is not None else torch.device(want)


def phase_lr(pc: PhaseConfig, epoch: int, update_every: int) -> float:
    """Learning rate of a phase's epoch under its schedule (set at the start of every epoch)."""
    if pc.schedule == "constant":
        return pc.lr
    if pc.schedule == "cosine":
        return pc.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(pc.epochs, 1)))
    if pc.schedule == "step":
        return pc.lr * pc.gamma ** sum(1 for m in pc.milestones if epoch >= m)
    if pc.schedule == "admm":
        # reset to the base lr at each Z/U window, then times gamma every update_every/3 epochs
        sub = max(update_every / 3, 1.0)
        return pc.lr * pc.gamma ** math.floor((epoch % update_every) / sub)
    raise ValueError(f"unknown schedule {pc.schedule!r}")


def make_optimizer(pc: PhaseConfig, params, device: torch.device) -> torch.optim.Optimizer:
    kw = {"lr": pc.lr, "weight_decay": pc.weight_decay}
    if device.type == "cuda":
        kw["foreach"] = True
    if pc.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=pc.momentum, nesterov=pc.nesterov and pc.momentum > 0, **kw)
    if pc.optimizer == "adam":
        return torch.optim.Adam(params, **kw)
    raise ValueError(f"unknown optimizer {pc.optimizer!r}")


_CPU_CL_INPUT: PerModel[bool] = PerModel(lambda model: any(isinstance(m, nn.Conv2d) for m in model.modules())
                                          and cpu_channels_last_hazard(model) is None)


def train_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the training forward takes it. On the CPU, a batch of images goes in channels_last whatever the
    model's own format: oneDNN then runs every convolution in that layout, forward and both gradients, and
    skips its reorders (measured: docs/performance.md). Not for a model with
    :func:`~robprune.engine.models.cpu_channels_last_hazard` (oneDNN crashes there), nor one without convolutions.
    The weights keep their format; their gradients come back in it."""
    if x.device.type != "cpu" or x.dim() != 4:
        return x
    return channels_last_strides(x) if _CPU_CL_INPUT.get(model, False) else x


def adversarial_step(model, train_fn, optimizer, x, y, *, kind: str, eps: float, step_size: float, steps: int,
                     restarts: int = 1, admm: ADMM | None = None, masked: MaskedParams | None = None,
                     autocast=None, channels_last: bool = False, loss: str = "ce",
                     rows: tuple[int, int, int] | None = None, grad_scale: float | None = None):
    """One training step of every phase: craft adversarial examples (model in eval mode), train on them
    only (model in train mode; on the CPU with the batch in channels_last, see :func:`train_input`), add the
    ADMM penalty's gradient, step, re-apply the masks.

    Returns the (device) loss and logits; nothing here syncs with the host. ``train_fn`` is the model or
    its compiled version (or its DistributedDataParallel wrapper). The benchmark times this very function.

    A data-parallel rank passes its ``rows`` of the global batch (the attack's random starts, see
    :func:`~robprune.engine.attacks.attack`) and ``grad_scale = world / global batch``: its objective is its summed
    loss times that, so DDP's average over the ranks is the global batch's mean. The loss returned is the
    share's mean either way."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast if autocast is not None else contextlib.nullcontext():
        x_adv = attack(model, x, y, kind=kind, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                       loss=loss, rows=rows)
        model.train()
        out = train_fn(train_input(model, x_adv))
        if grad_scale is None:
            loss = objective = F.cross_entropy(out.float(), y)
        else:
            total = F.cross_entropy(out.float(), y, reduction="sum")
            objective, loss = total * grad_scale, total.detach() / len(y)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if admm is not None:
        admm.add_penalty_grad()
    optimizer.step()
    if masked is not None:
        masked.after_step()
    return loss, out


def _set_cuda_rng_state(saved, device: torch.device) -> None:
    """Restore the generator of the run's GPU from a checkpoint: one state (this format), or one per GPU that was
    visible when it was written (older checkpoints) -- then the run's GPU's own, where it was among them."""
    if isinstance(saved, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


class Engine:
    """One run of the pipeline. Build it, then call :meth:`run` (blocking).

    ``on_nonfinite``: what a non-finite loss or weight does -- ``"stop"`` (headless: the run ends with a
    :class:`~robprune.engine.errors.NonFiniteError`) or ``"pause"`` (a dashboard is attached: pause and say so).
    Either way no checkpoint is written from that state on, so the last good one is kept."""

    def __init__(self, cfg: Config, rundir: RunDir, bus: EventBus, control: Control,
                 *, resume_state: dict | None = None, on_nonfinite: str = "stop",
                 dist: dist_mod.DistContext | None = None) -> None:
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.dist = dist  # a data-parallel run (see robprune.engine.distributed); None: one process
        self.writer = dist is None or dist.writer  # rank 0 (or the only process) writes the run directory
        self.cfg = cfg
        self.rundir = rundir
        self.bus = bus
        self.control = control
        self.resume_state = resume_state
        self.state = "created"  # running | paused | finished | stopped | error
        self.phase = "setup"
        self.phase_index = 0
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.paused = False
        self.admm: ADMM | None = None
        self.masked: MaskedParams | None = None
        self.masks: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rho_history: list[dict] = []
        self.phase_times: dict[str, float] = {}
        self.pending_rho: list[dict] = []  # rho changes asked for before ADMM, applied in order when it starts
        self.last_eval: dict | None = None
        self.summary: dict | None = None
        self._acc = None
        self._nf: torch.Tensor | None = None  # device flag: a non-finite loss since the last emission
        self._bad: dict | None = None  # set at the first non-finite loss or weight: no checkpoint from then on
        self.best: dict | None = None  # the evaluation best.pt holds (see _consider_best)
        self.overfit = overfit.OverfitMonitor()  # catastrophic overfitting checks of single-step training
        self.last_checkpoint: dict | None = None  # the last good checkpoint.pt written (path, step, phase)
        self._last_emit = time.monotonic()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        if getattr(self, "_setup_done", False):
            return
        cfg = self.cfg
        self.device = resolve_device(cfg, self.dist)
        self.resources = ResourceMonitor(self.device)
        self.bf16, why = bf16_usable(self.device, cfg.run.bf16)
        if why:
            self.log("warning", why)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.run.deterministic:
            if self.device.type == "cuda":  # cuBLAS reads it at its first call: before the model reaches the GPU
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
            # on CUDA an operation without a deterministic kernel is an error, not a warning: a run that says it
            # is deterministic is (on the CPU the kernels robprune uses are)
            torch.use_deterministic_algorithms(True, warn_only=self.device.type != "cuda")
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        random.seed(cfg.run.seed)
        if np is not None:
            np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.data = data_mod.load_dataset(
            cfg.data.name, cfg.data.root, cfg.data.download, self.device, train_subset=cfg.data.train_subset,
            synthetic_train=cfg.data.synthetic_train, synthetic_test=cfg.data.synthetic_test, seed=cfg.run.seed)
        spec = self.data.spec
        self.model = build_model(cfg.model.arch, cfg.model.width, num_classes=spec.num_classes,
                                 in_channels=spec.in_channels, image_size=spec.image_size,
                                 depth=cfg.model.depth, source=cfg.source).to(self.device)
        if cfg.run.channels_last:
            hazard = cpu_channels_last_hazard(self.model) if self.device.type == "cpu" else None
            if hazard:
                raise ConfigError(cfg.origin("run.channels_last"), "run.channels_last",
                                  f"false for {cfg.model.arch} width {cfg.model.width} on the CPU", True,
                                  hint=hazard)
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist is not None and cfg.run.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError(cfg.origin("run.sync_bn"), "run.sync_bn", "false on the CPU (SyncBatchNorm "
                                  "runs on GPUs only)", True)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.run.init and self.resume_state is None and self.writer:  # DDP hands rank 0's weights to the others
            self._load_init(cfg.run.init)
        self.params = prunable_parameters(self.model)
        self.control.layers = self.params  # the layers a set_rho may name
        # per-layer schemes and ratios, checked (N:M row lengths, the allocation's budget); a bad key is reported
        # where it came from: the profile, or a --set override
        pr = cfg.prune
        self.plan = plan_layers(self.params, scheme=pr.scheme, linear_scheme=pr.linear_scheme, ratio=pr.ratio,
                                layers=pr.layers, allocation=pr.allocation, normalize=pr.global_normalize,
                                origin=cfg.origin)
        self.ratios, self.schemes = dict(self.plan.ratios), dict(self.plan.schemes)
        self.allocation: dict | None = None  # the per-layer ratios once fixed (see _fix_allocation)
        for note in self.plan.notes:
            self.log("info", note)
        # compiled: static shapes, so the last partial batch of an epoch is dropped (each epoch shuffles anew, so
        # every example is still seen) rather than compiled a second time, or for every size, as a dynamic graph
        n_train = self.data.train_x.shape[0]
        self.loader = data_mod.BatchLoader(self.data.train_x, self.data.train_y, cfg.data.batch_size, shuffle=True,
                                           seed=cfg.run.seed, augment=cfg.data.augment and cfg.data.name == "cifar10",
                                           drop_last=cfg.run.compile and n_train >= cfg.data.batch_size,
                                           shard=(self.dist.rank, self.dist.world) if self.dist else None)
        self.eval_x, self.eval_y = data_mod.eval_subset(self.data.test_x, self.data.test_y, cfg.eval.subset)
        self.train_fn = self.model
        if cfg.run.compile and self.dist is None:
            self.train_fn = torch.compile(self.model, dynamic=False)
        self._nf = torch.zeros((), dtype=torch.bool, device=self.device)
        self._setup_done = True

    def setup_parallel(self) -> None:
        """Data-parallel runs, once every rank's :meth:`setup` succeeded: wrap the model in
        DistributedDataParallel (which gives every rank rank 0's weights). Buffers (BatchNorm statistics) are
        broadcast from rank 0 after each step instead of before each forward, so the attack of the next step
        sees the same ones on every rank."""
        if self.dist is None or getattr(self, "ddp", None) is not None:
            return
        self.ddp = self.dist.wrap(self.model, self.device)
        self.train_fn = torch.compile(self.ddp, dynamic=False) if self.cfg.run.compile else self.ddp
        self._buffers = any(True for _ in self.model.buffers())

    def release_parallel(self) -> None:
        """Drop the DDP wrapper (it holds the process group) before the group is destroyed."""
        self.ddp = None
        self.train_fn = self.model

    def _load_init(self, path: str) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "model.pt" if (p / "model.pt").exists() else p / "checkpoint.pt"
        try:
            sd = safe_torch_load(p)
        except UserError as exc:  # name the key, and where it was set
            raise UserError(f"{self.cfg.origin('run.init')}: run.init: {exc}") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        try:
            self.model.load_state_dict(sd)
        except RuntimeError as exc:
            raise UserError(f"{p}: weights do not fit model {self.cfg.model.arch} (width {self.cfg.model.width}): "
                            f"{str(exc).splitlines()[0]}") from None
        self.log("info", f"initialised weights from {p}")

    # ------------------------------------------------------------------ events
    def log(self, level: str, message: str) -> None:
        self.bus.emit(LogLine(level=level, message=message))

    def _where(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "phase": self.phase}

    # ------------------------------------------------------------------ main
    def run(self) -> dict | None:
        """Run to the end (or a stop command). Errors are emitted as an error event, then re-raised."""
        try:
            try:
                self.state = "running"
                self.setup()
                start_phase, mid_phase = 0, False
                if self.resume_state is not None:
                    start_phase = self._restore(self.resume_state)
                    self.resume_state = None  # restored: the loaded checkpoint (GBs for a WRN) is not kept
                    mid_phase = start_phase == self.phase_index
                for i in range(start_phase, len(PHASES)):
                    self._run_phase(i, resumed=mid_phase and i == start_phase)
                self._finish("completed")
                return self.summary
            except StopRequested as stop:
                self.paused = False
                if not isinstance(stop, _StopInFinal):
                    self._save_checkpoint("stop")
                self.state = "stopped"
                self.log("info", "stopped on request; the run can be resumed from its checkpoint")
                self.bus.emit(Finished(status="stopped", summary={}))
                return None
        except BaseException as exc:
            self.state = "error"
            lost = None  # a collective inside a training step (DDP's backward) whose peer is gone
            if self.dist is not None and not isinstance(exc, dist_mod.RankLost) and dist_mod.comm_failure(exc):
                exc = lost = dist_mod.RankLost(f"rank {self.dist.rank}: lost contact with the other ranks during a "
                                               f"training step ({dist_mod.short(exc)})")
            if isinstance(exc, dist_mod.RankLost):
                ck = self.last_checkpoint
                self.log("error", f"{exc}: stopping without a checkpoint; "
                         + (f"the last one (step {ck['step']}) resumes: robprune run --resume {self.rundir.path} "
                            f"--nproc {self.dist.world}" if ck else "no checkpoint had been written yet"))
            self.bus.emit(ErrorEvent.from_exception(exc))
            if lost is not None:
                raise lost from None
            raise
        finally:
            if self.masked is not None:
                self.masked.detach()

    def _run_phase(self, index: int, *, resumed: bool) -> None:
        name = PHASES[index]
        pc: PhaseConfig = getattr(self.cfg.phases, name)
        self.phase_index, self.phase = index, name
        if not resumed:
            self.epoch, self.batch = 0, 0
        if name in ("admm", "retrain"):
            self._fix_allocation()
        if pc.epochs == 0:
            self.bus.emit(PhaseChange(phase=name, index=index, epochs=0, step=self.step, skipped=True))
            self.log("info", f"phase {name} skipped (0 epochs)")
            if name == "retrain" and any(r > 0 for r in self.ratios.values()):
                self._hard_prune()  # the exported model still meets its sparsity targets
            return
        self.bus.emit(PhaseChange(phase=name, index=index, epochs=pc.epochs, step=self.step))
        if not resumed:
            self._begin_phase(name, pc)
            self._emit_layers()  # the layer table is filled from the phase's first moment (after a hard prune too)
        t0 = time.monotonic()
        try:
            while self.epoch < pc.epochs:
                self._run_epoch(name, pc)
                self._overfit_check()
                self.epoch += 1
                self.batch = 0
                last = self.epoch == pc.epochs
                if self.cfg.eval.every and (self.epoch % self.cfg.eval.every == 0) and not last:
                    self._evaluate("periodic")
                self._emit_layers()
                if self.cfg.run.checkpoint_every and self.epoch % self.cfg.run.checkpoint_every == 0 and not last:
                    self._save_checkpoint("epoch")
        finally:
            self.phase_times[name] = self.phase_times.get(name, 0.0) + time.monotonic() - t0
        self._evaluate("phase_end")
        self.epoch = pc.epochs
        if name == "admm":
            self.bus.emit(Residuals(update=self.admm.updates, layers=self.admm.residuals(), **self._where()))
        self._save_checkpoint("phase_end")

    def _begin_phase(self, name: str, pc: PhaseConfig) -> None:
        if name == "admm":
            rho = self.cfg.admm.rho
            self.admm = ADMM(self.params, self.ratios, self.schemes, rho, self.cfg.admm.rho_multiplier)
            for change in self.pending_rho:
                try:
                    self.admm.set_rho(**change)
                except (KeyError, ValueError) as exc:
                    self.log("warning", f"stored set_rho refused: {exc.args[0]}")
            self.pending_rho = []
            self._record_rho("init")
            self.bus.emit(Residuals(update=0, layers=self.admm.residuals(), **self._where()))
            lo, hi = min(self.admm.rho.values(), default=rho), max(self.admm.rho.values(), default=rho)
            shown = f"rho {lo:g}" if lo == hi else f"rho {lo:g} to {hi:g} (per layer)"
            self.log("info", f"ADMM: Z = Proj(W), U = 0 for {len(self.admm.layers)} layers, {shown}")
        if name == "retrain":
            self._hard_prune()
            self.masked = MaskedParams(self.params, self.masks)
            self.masked.attach()
        self.optimizer = make_optimizer(pc, self.model.parameters(), self.device)

    def _fix_allocation(self) -> None:
        """Fix the per-layer ratios (a global allocation ranks this moment's weights), once per run: they go into
        every checkpoint from now on, and a resumed run takes them from there."""
        if self.allocation is not None:
            return
        self.ratios = self.plan.finalize({k: p.detach() for k, p in self.params.items()})
        self.allocation = {**self.plan.record(self.ratios), "step": self.step, "phase": self.phase}
        self.bus.emit(PruneAllocation(**self.allocation))
        a = self.allocation
        self.log("info", f"per-layer ratios fixed ({a['method']}): {a['pruned']} of {a['prunable']} prunable weights "
                         f"({100 * a['pruned'] / max(a['prunable'], 1):.2f}%) to remove")

    @torch.no_grad()
    def _hard_prune(self) -> None:
        self.masks = {}
        for k, p in self.params.items():
            if self.ratios[k] > 0:
                projected, mask = project(p.detach(), self.schemes[k], self.ratios[k])
                p.copy_(projected)
                self.masks[k] = mask
        self.admm = None
        self.log("info", f"hard prune: {len(self.masks)} layers projected onto their sparsity sets; masks fixed")

    def _run_epoch(self, name: str, pc: PhaseConfig) -> None:
        cfg = self.cfg
        # Z/U update at the start of every update_every-th epoch. Counting updates (not testing batch == 0)
        # makes it idempotent: a checkpoint taken after the update (a pause at the epoch's first step) resumes
        # without updating twice; one taken at the epoch end (before it) resumes by doing it.
        if name == "admm" and self.admm.updates < self.epoch // cfg.admm.update_every:
            res = self.admm.update()
            self._record_rho("update")
            self.bus.emit(Residuals(update=self.admm.updates, layers=res, **self._where()))
            mean_primal = sum(r["primal"] for r in res.values()) / max(len(res), 1)
            self.log("info", f"ADMM Z/U update {self.admm.updates}: mean primal residual {mean_primal:.4g}, "
                             f"rho x{cfg.admm.rho_multiplier:g}")
        lr = phase_lr(pc, self.epoch, cfg.admm.update_every)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.lr = lr
        ta = phase_attack(cfg.attack.train, pc)
        dev = self.device
        self._acc = [torch.zeros((), device=dev), torch.zeros((), dtype=torch.long, device=dev), 0]
        self._interval_t0 = time.monotonic()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        model = self.model
        nb = len(self.loader)
        for x, y in self.loader.batches(self._loader_epoch(), start_batch=self.batch):
            self._boundary()
            scale = min(1.0, (self.epoch * nb + self.batch + 1) / (pc.eps_warmup * nb)) if pc.eps_warmup else 1.0
            rows = self.loader.batch_rows(self.batch) if self.dist is not None else None
            loss, out = adversarial_step(
                model, self.train_fn, self.optimizer, x, y, kind=ta.kind, eps=ta.eps * scale,
                step_size=ta.step_size * scale, steps=ta.steps, restarts=ta.restarts, admm=self.admm,
                masked=self.masked, autocast=autocast, channels_last=cfg.run.channels_last, loss=ta.loss,
                rows=rows, grad_scale=self.dist.world / rows[2] if rows is not None else None)
            if self.dist is not None and self._buffers:
                self.dist.broadcast_buffers(self.model)
            acc = self._acc
            loss = loss.detach()
            acc[0] += loss * len(y)
            acc[1] += (out.detach().argmax(1) == y).sum()
            acc[2] += len(y)
            self._nf |= ~torch.isfinite(loss)  # on the device: read at the next emission, no sync here
            self.step += 1
            self.batch += 1
            if self.dist is None and time.monotonic() - self._last_emit >= cfg.run.log_interval_s:
                self._emit_step()  # (data-parallel: rank 0 decides at the next boundary, see _boundary)
        self._emit_step()

    def _loader_epoch(self) -> int:
        """A distinct shuffling epoch for every (phase, epoch), so resume reproduces the order exactly."""
        return self.phase_index * 100_000 + self.epoch

    def _emit_step(self) -> None:
        acc = self._acc
        if acc is None or acc[2] == 0:
            return
        now = time.monotonic()
        n = acc[2]
        sums = torch.stack([acc[0].float(), acc[1].float(), self._nf.float()])
        if self.dist is not None:  # the whole global batch's numbers, the same on every rank
            sums = self.dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([float(n)])]))
            loss_sum, correct, nonfinite, n = sums.tolist()
        else:
            loss_sum, correct, nonfinite = sums.tolist()
        penalty = float(self.admm.penalty().item()) if self.admm is not None else 0.0
        pc = getattr(self.cfg.phases, self.phase)
        self.bus.emit(StepMetrics(
            step=self.step, epoch=self.epoch, phase=self.phase, batch=self.batch, batches=len(self.loader),
            epochs=pc.epochs, loss=loss_sum / n, adv_acc=correct / n, penalty=penalty, lr=self.lr,
            images_per_s=n / max(now - self._interval_t0, 1e-9), resources=self.resources.sample()))
        self._acc = [torch.zeros_like(acc[0]), torch.zeros_like(acc[1]), 0]
        self._interval_t0 = now
        self._last_emit = now
        if nonfinite:
            self._nf.zero_()
            self._on_nonfinite("loss")

    # ------------------------------------------------------------------ non-finite guard
    def _nonfinite_tensors(self) -> list[str]:
        """Names of the model's floating-point tensors holding a NaN or an inf (one host sync for all)."""
        tensors = [(k, v) for k, v in self.model.state_dict().items() if v.is_floating_point()]
        if not tensors:
            return []
        finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).tolist()
        return [k for (k, _), ok in zip(tensors, finite) if not ok]

    def _on_nonfinite(self, what: str, layers: list[str] | None = None) -> None:
        """Report a non-finite loss or weight; from now on no checkpoint is written. Headless: raise
        NonFiniteError. With a dashboard (on_nonfinite="pause"): pause at the next step boundary."""
        layers = list(layers or [])
        if self._bad is None:
            self._bad = {"what": what, "step": self.step, "phase": self.phase}
        ck = self.last_checkpoint
        where = f" in {', '.join(layers[:3])}{' ...' if len(layers) > 3 else ''}" if layers else ""
        kept = (f"the last good checkpoint {ck['path']} (step {ck['step']}, phase {ck['phase']}) is kept"
                if ck else "no checkpoint had been written yet")
        knob = f"phases.{self.phase}.lr" + (" or admm.rho" if self.phase == "admm" else "")
        if self.phase not in PHASES:
            knob = "the learning rates or admm.rho"
        msg = (f"{self.rundir.path}: non-finite {what}{where} at step {self.step} (phase {self.phase}): training "
               f"diverged; {kept}: lower {knob} and start again")
        self.bus.emit(NonFinite(what=what, layers=layers, step=self.step, epoch=self.epoch, phase=self.phase,
                                checkpoint=ck["path"] if ck else "", checkpoint_step=ck["step"] if ck else -1,
                                action=self.on_nonfinite, message=msg))
        if self.on_nonfinite == "stop":
            raise NonFiniteError(msg)
        self.log("error", f"{'paused' if not self.paused else 'still paused'}: {msg}; no checkpoint will be "
                          "written from this state")
        self.paused, self.state = True, "paused"

    def _state_ok(self) -> bool:
        """True when the state may be written: no non-finite loss so far and every weight finite."""
        if self._bad is None:
            bad = self._nonfinite_tensors()
            if bad:
                self._on_nonfinite("weights", bad)
        return self._bad is None

    # ------------------------------------------------------------------ commands
    def _boundary(self) -> None:
        self._commands(self.control.drain())
        while self.paused:
            cmd = self.control.wait(0.05)
            self._commands([cmd] if cmd is not None else [])
        if self._acc is not None and self._acc[2] == 0:
            self._interval_t0 = time.monotonic()

    def _commands(self, cmds: list[Command]) -> None:
        """Apply ``cmds``. In a data-parallel run every rank applies rank 0's commands at the same boundary (a
        stop asked of any rank -- a signal -- stops all), and rank 0's decision to emit a progress record."""
        if self.dist is not None:
            stop = any(isinstance(c, Stop) for c in cmds)
            due = time.monotonic() - self._last_emit >= self.cfg.run.log_interval_s
            cmds, any_stop, emit = self.dist.agree(cmds if self.writer else [], stop=stop, emit=due)
            if emit:
                self._emit_step()
            if any_stop and not any(isinstance(c, Stop) for c in cmds):
                cmds.append(Stop())
        for cmd in cmds:
            self._apply(cmd)

    def _apply(self, cmd: Command) -> None:
        """Apply one checked command (see :mod:`robprune.engine.control`); each leaves an event of its name."""
        if isinstance(cmd, Refused):
            self.log("warning", f"command refused: {cmd.reason}")
            return
        args: dict = {}
        if isinstance(cmd, Pause):
            if self.paused:
                return
            self._emit_step()
            self.paused, self.state = True, "paused"
            self._applied(cmd.name, {})
            self._save_checkpoint("pause")
            return
        if isinstance(cmd, Resume):
            if not self.paused:
                return
            self.paused, self.state = False, "running"
            self._interval_t0 = time.monotonic()
        elif isinstance(cmd, SetRho):
            value, layer, multiply = cmd.value, cmd.layer, cmd.multiply
            if self.admm is not None:
                try:
                    args["rho"] = self.admm.set_rho(value, layer, multiply)
                except (KeyError, ValueError) as exc:
                    self.log("warning", f"set_rho refused: {exc.args[0]}")
                    return
                self._record_rho("set_rho")
            elif self.phase in ("setup", "pretrain"):
                if layer is not None and layer not in self.params:
                    self.log("warning", f"set_rho refused: no layer named {layer!r}")
                    return
                self.pending_rho.append({"value": value, "layer": layer, "multiply": multiply})
                args["pending"] = True
                self.log("info", "rho change stored; it applies when the ADMM phase starts")
            else:
                self.log("warning", f"set_rho refused: no ADMM state in phase {self.phase}")
                return
            args.update(value=value, layer=layer, multiply=multiply)
        elif isinstance(cmd, EvalNow):
            self._applied(cmd.name, {})
            self._evaluate("now")
            return
        elif isinstance(cmd, CheckpointNow):
            self._applied(cmd.name, {})
            self._save_checkpoint("command")
            return
        elif isinstance(cmd, Stop):
            self._applied(cmd.name, {})
            raise StopRequested()
        self._applied(cmd.name, args)

    def _applied(self, name: str, args: dict) -> None:
        """The event of an applied command. In a data-parallel run it says where every rank applied it (step,
        paused, rho): the same, or the run has a bug worth seeing."""
        if self.dist is not None:
            seen = {"step": self.step, "paused": self.paused}
            if self.admm is not None:
                seen["rho"] = dict(self.admm.rho)
            else:
                seen["pending_rho"] = len(self.pending_rho)
            args = {**args, "ranks": self.dist.all_gather(seen)}
        self.bus.emit(CommandApplied(command=name, args=args, step=self.step))

    def _record_rho(self, reason: str) -> None:
        if self.admm is None:
            return
        entry = {"step": self.step, "epoch": self.epoch, "phase": self.phase, "reason": reason,
                 "update": self.admm.updates, "rho": dict(self.admm.rho)}
        self.rho_history.append(entry)

    # ------------------------------------------------------------------ evaluation and stats
    def _overfit_check(self) -> None:
        """After an epoch of single-step training: APGD-CE (attack.eval's eps and steps) and the training attack at
        full eps on the first ``eval.overfit_check`` test examples; an ``overfit_check`` event, and a warning when
        the accuracies say catastrophic overfitting (see :mod:`robprune.engine.overfit`)."""
        cfg = self.cfg
        ta = phase_attack(cfg.attack.train, getattr(cfg.phases, self.phase))
        ea, n = cfg.attack.eval, cfg.eval.overfit_check
        if ta.kind not in overfit.SINGLE_STEP or n <= 0:
            return
        x, y = data_mod.eval_subset(self.data.test_x, self.data.test_y, n)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mod.float32():
            strong = overfit.apgd_accuracy(self.model, data_mod.to_float(x), y, eps=ea.eps, steps=ea.steps,
                                           batch_size=cfg.data.test_batch_size, seed=cfg.run.seed + 2)
            _, train_acc = evaluate(self.model, x, y, kind=ta.kind, eps=ta.eps, step_size=ta.step_size, steps=ta.steps,
                                    restarts=1, batch_size=cfg.data.test_batch_size, to_float=data_mod.to_float,
                                    seed=cfg.run.seed + 3)
        best = self.overfit.best if self.overfit.phase == self.phase else None
        rule = self.overfit.judge(self.phase, strong, train_acc)
        self.bus.emit(OverfitCheck(n=len(y), apgd_acc=strong, apgd_steps=ea.steps, train_attack_acc=train_acc,
                                   train_attack=ta.kind, detected=rule, **self._where()))
        if rule is not None:
            self.overfit.detections.append({"step": self.step, "phase": self.phase, "epoch": self.epoch, "rule": rule})
            self.log("warning", overfit.message(rule, n=len(y), apgd_acc=strong, train_attack_acc=train_acc,
                                                best=best, kind=ta.kind.upper()))

    def _evaluate(self, reason: str, *, final: bool = False) -> dict:
        cfg = self.cfg
        ea = cfg.attack.eval
        if final:
            x, y = data_mod.eval_subset(self.data.test_x, self.data.test_y, cfg.eval.final_subset)
        else:
            x, y = self.eval_x, self.eval_y
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # the random starts come from their own CPU generator (the same on every device); the fork keeps anything
        # else an evaluation might draw out of training's stream
        kw = dict(kind=ea.kind, eps=ea.eps, step_size=ea.step_size, steps=ea.steps, restarts=ea.restarts,
                  batch_size=cfg.data.test_batch_size, to_float=data_mod.to_float, loss=ea.loss, seed=cfg.run.seed + 1)
        with torch.random.fork_rng(devices=devices), eval_mod.float32():
            if self.dist is None:
                nat, adv = evaluate(self.model, x, y, **kw)
            else:  # each rank its batches; the counts summed are exactly one process's
                counts = torch.stack(evaluate_counts(self.model, x, y, shard=(self.dist.rank, self.dist.world), **kw))
                nat, adv = (c / max(len(x), 1) for c in self.dist.all_reduce_sum(counts).tolist())
        attack_info = {"kind": ea.kind, "eps": ea.eps, "step_size": ea.step_size, "steps": ea.steps,
                       "restarts": ea.restarts, **({"loss": ea.loss} if ea.kind == "pgd" else {})}
        ev = EvalResult(nat_acc=nat, adv_acc=adv, n=len(x), attack=attack_info, reason=reason, **self._where())
        self.bus.emit(ev)
        self.last_eval = ev.to_dict()
        if reason in BEST_REASONS and self.phase in PHASES:
            self._consider_best(self.last_eval)
        return self.last_eval

    def _final_autoattack(self) -> dict:
        """AutoAttack of the final model on the first ``eval.autoattack_n`` test examples, with its state in the
        run directory's ``eval/`` (a run killed here resumes the attack where it stopped). A stop or pause command
        is taken between batches: a stop ends the run here, resumable."""
        cfg = self.cfg
        ec, ea = cfg.eval, cfg.attack.eval
        x, y = data_mod.eval_subset(self.data.test_x, self.data.test_y, ec.autoattack_n)
        x = data_mod.to_float(x)
        where = {"pct": -1}

        def progress(part: str, done: int, total: int) -> None:
            pct = 100 * done // max(total, 1)
            if pct // 25 != where["pct"] // 25 or done == total:
                self.log("info", f"final AutoAttack: {part} {done}/{total}")
            where["pct"] = pct if done < total else -1
            try:
                self._boundary()  # commands between batches, as between training steps
            except StopRequested:
                raise _StopInFinal() from None

        self.log("info", f"final AutoAttack ({ec.autoattack_version}, eps {ea.eps:g}) on {len(y)} test examples")
        res = eval_mod.autoattack(self.model, x, y, self.rundir, eps=ea.eps, version=ec.autoattack_version,
                                  batch_size=cfg.data.test_batch_size, seed=cfg.run.seed, num_classes=self.data.spec.num_classes,
                                  progress=progress, dist=self.dist)
        self.log("info", f"final AutoAttack: clean {100 * res['clean_acc']:.2f}%, robust {100 * res['robust_acc']:.2f}%"
                         f" ({res['seconds']:.0f} s)")
        out = {k: res[k] for k in ("attack", "clean_acc", "robust_acc", "per_attack", "seconds", "path")}
        self.bus.emit(AutoAttackResult(n=len(y), **out, **self._where()))
        return out

    def _consider_best(self, ev: dict) -> None:
        """Keep best.pt: the checkpoint at the evaluation with the highest PGD accuracy on the live subset
        (ties: higher natural accuracy, then the earlier one) among the evaluations of the current phase.

        Phases do not compete: the first evaluation of a new phase replaces best.pt, so in the retrain phase
        it is always a pruned model that meets its sparsity targets (a dense pretrained model scores higher
        but is not what the run is for)."""
        b = self.best
        if b is not None and b["phase"] == self.phase and (b["adv_acc"], b["nat_acc"]) >= (ev["adv_acc"], ev["nat_acc"]):
            return
        if not self._state_ok():
            return
        self.best = {"phase": self.phase, "epoch": self.epoch, "step": self.step, "reason": ev["reason"],
                     "adv_acc": ev["adv_acc"], "nat_acc": ev["nat_acc"], "n": ev["n"]}
        state = self.checkpoint_state()
        if self.writer:
            atomic_torch_save(self.rundir.best, state, hint=self._resume_hint())
        self.bus.emit(CheckpointSaved(path=str(self.rundir.best), reason="best", **self._where()))

    def layer_records(self) -> list[dict]:
        recs = []
        res = self.admm.residuals() if self.admm is not None else {}
        for k, p in self.params.items():
            st = layer_stats(p.detach(), self.masks.get(k) if self.masks else None, self.ratios[k], self.schemes[k])
            recs.append({"name": k, "shape": list(p.shape), "target": self.ratios[k], "scheme": self.schemes[k],
                         "target_pending": self.allocation is None and self.plan.pending(k),
                         "primal": res.get(k, {}).get("primal"), "rho": res.get(k, {}).get("rho"), **st})
        return recs

    def _emit_layers(self) -> None:
        self.bus.emit(LayerStats(layers=self.layer_records(), **self._where()))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict | None:
        """What checkpoint.pt holds. In a data-parallel run every rank takes part (their RNG states and
        fingerprints are gathered, and ranks that disagree stop the run), and only rank 0 gets the state."""
        rng = self._rng_state()
        ranks = None
        if self.dist is not None:
            ranks = self.dist.all_gather({"rng": rng, "fingerprint": self._fingerprint()})
            prints = [r["fingerprint"] for r in ranks]
            if len(set(prints)) > 1:
                raise dist_mod.RanksDiverged(
                    f"the ranks' weights or ADMM state differ at step {self.step} (fingerprints "
                    f"{', '.join(p[:12] for p in prints)}): not checkpointed; the last checkpoint resumes")
            if not self.writer:
                return None
        state = self._state_dict(rng)
        if ranks is not None:
            state["dist"] = {"world_size": self.dist.world, "backend": self.dist.backend,
                             "rng": [r["rng"] for r in ranks], "fingerprint": ranks[0]["fingerprint"]}
        return state

    def _fingerprint(self) -> str:
        """sha256 of what every rank must hold alike: the model's state, the ADMM state (Z, U, rho), the masks."""
        import hashlib

        h = hashlib.sha256(eval_mod.weights_fingerprint(self.model).encode())
        if self.admm is not None:
            for k, v in sorted(self.admm.state_dict().items()):
                h.update(repr(k).encode())
                vals = v.values() if isinstance(v, dict) else [v]
                for t in vals:
                    h.update(t.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(t) else repr(t).encode())
        for k, m in sorted((self.masks or {}).items()):
            h.update(k.encode() + m.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _rng_state(self) -> dict:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if np is not None:  # as plain lists and numbers, so weights_only loading accepts them
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            rng["numpy"] = {"kind": str(kind), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                            "cached_gaussian": float(cached)}
        if self.device.type == "cuda":  # the run's own GPU only: a resume may see other or fewer GPUs
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _state_dict(self, rng: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "profile": self.rundir.profile.read_text(encoding="utf-8") if self.rundir.profile.exists() else "",
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "phase_index": self.phase_index, "phase": self.phase, "epoch": self.epoch, "batch": self.batch,
            "step": self.step,
            "admm": self.admm.state_dict() if self.admm is not None else None,
            "masks": self.masks,
            "pending_rho": self.pending_rho,
            "layers": {k: {"target": self.ratios[k], "scheme": self.schemes[k]} for k in self.params},
            "allocation": self.allocation,
            "rho_history": self.rho_history, "phase_times": dict(self.phase_times),
            "rng": rng, "metrics_lines": self.rundir.metrics_lines(), "last_eval": self.last_eval,
            "best": self.best, "overfit": self.overfit.state_dict(),
        }

    def _resume_hint(self) -> str:
        ranks = f" --nproc {self.dist.world}" if self.dist is not None else ""
        return f"resume the run (robprune run --resume {self.rundir.path}{ranks})"

    def _save_checkpoint(self, reason: str) -> bool:
        """Write checkpoint.pt, unless the state is not finite (then the last good one stays). Returns whether
        it was written. A metrics line that could not be written (a full disk) stops the run here, before a
        checkpoint could claim records that are not on disk."""
        if not hasattr(self, "model"):
            return False
        self._emit_step()  # flush the interval's metrics so the checkpoint's metrics position includes them
        if self.rundir.write_error is not None:
            raise self.rundir.write_error
        if not self._state_ok():
            ck = self.last_checkpoint
            self.log("warning", f"checkpoint ({reason}) not written: non-finite values since step {self._bad['step']}; "
                                + (f"keeping {ck['path']} (step {ck['step']})" if ck else "no good checkpoint exists"))
            return False
        state = self.checkpoint_state()
        if self.writer:
            atomic_torch_save(self.rundir.checkpoint, state, hint=self._resume_hint())
        self.last_checkpoint = {"path": str(self.rundir.checkpoint), "step": self.step, "phase": self.phase}
        self.bus.emit(CheckpointSaved(path=str(self.rundir.checkpoint), reason=reason, **self._where()))
        return True

    def _restore(self, st: dict) -> int:
        self.model.load_state_dict(st["model"])
        if st.get("allocation"):  # the ratios fixed before the checkpoint: never recomputed
            self.allocation = st["allocation"]
            self.ratios = {**self.ratios, **{k: float(v["ratio"]) for k, v in st["allocation"]["layers"].items()}}
            self.plan.final = True
        self.phase_index, self.epoch, self.batch, self.step = st["phase_index"], st["epoch"], st["batch"], st["step"]
        self.phase = PHASES[self.phase_index] if st["phase"] in PHASES else st["phase"]
        self.rho_history = list(st["rho_history"])
        self.phase_times = dict(st["phase_times"])
        pending = st.get("pending_rho") or []
        self.pending_rho = [pending] if isinstance(pending, dict) else list(pending)  # older checkpoints: one
        self.last_eval = st.get("last_eval")
        self.best = st.get("best")
        self.overfit.load_state_dict(st.get("overfit"))
        self.last_checkpoint = {"path": str(self.rundir.checkpoint), "step": self.step, "phase": st["phase"]}
        if st["phase"] == "done":
            return len(PHASES)
        name = PHASES[self.phase_index]
        pc = getattr(self.cfg.phases, name)
        if st["masks"] is not None:
            self.masks = {k: v.to(self.device) for k, v in st["masks"].items()}
        if name == "admm" and st["admm"] is not None:
            self.admm = ADMM(self.params, self.ratios, self.schemes, self.cfg.admm.rho, self.cfg.admm.rho_multiplier)
            self.admm.load_state_dict(st["admm"])
        if name == "retrain" and self.masks is not None:
            self.masked = MaskedParams(self.params, self.masks)
            self.masked.attach()
        self.optimizer = make_optimizer(pc, self.model.parameters(), self.device)
        if st["optimizer"] is not None:
            self.optimizer.load_state_dict(st["optimizer"])
        rng, saved = st["rng"], st.get("dist") or {"world_size": 1}
        world = self.dist.world if self.dist is not None else 1
        if world == saved["world_size"] and self.dist is not None:
            rng = saved["rng"][self.dist.rank]
        elif world != saved["world_size"]:  # the ranks' states are equal by construction: rank 0's serves all
            self.log("info", f"resumed with {world} rank(s) a checkpoint written by {saved['world_size']}: the batches "
                             "and random starts are the same; the gradient sums round differently")
        random.setstate(rng["python"])
        if np is not None and "numpy" in rng:
            n = rng["numpy"]
            np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            _set_cuda_rng_state(rng["cuda"], self.device)
        self.log("info", f"resumed at phase {name}, epoch {self.epoch}, batch {self.batch}, step {self.step}")
        if self.epoch >= pc.epochs:  # the checkpoint was taken at this phase's end
            return self.phase_index + 1
        return self.phase_index

    # ------------------------------------------------------------------ the end
    def _finish(self, status: str) -> None:
        if not self._state_ok():  # never write model.pt from a non-finite state
            self._boundary()  # paused (dashboard): wait for the user; a stop keeps the last good checkpoint
            raise NonFiniteError(f"{self.rundir.path}: the weights are not finite at the end of the run; "
                                 f"model.pt was not written: lower the learning rates or admm.rho and start again")
        self.phase = "final"
        final = self._evaluate("final", final=True)
        if self.cfg.eval.final_attack == "autoattack":
            final = {**final, "autoattack": self._final_autoattack()}
        self._emit_layers()
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.writer:
            atomic_torch_save(self.rundir.model, weights, hint=self._resume_hint())
        self.phase = "done"
        self._save_checkpoint("final")
        self.summary = build_summary(
            cfg=self.cfg, weights=weights, layers={k: {"target": self.ratios[k], "scheme": self.schemes[k]}
                                                   for k in self.params},
            allocation=self.allocation, final_eval=final, phase_times=self.phase_times, rho_history=self.rho_history,
            status=status,
            step=self.step, device=str(self.device), run_dir=str(self.rundir.path))
        if self.dist is not None:
            self.summary["distributed"] = {"world_size": self.dist.world, "backend": self.dist.backend,
                                           "ranks": self.dist.info}
        if self.writer:
            write_summary(self.rundir, self.summary)
        self.state = "finished"
        self.bus.emit(Finished(status=status, summary=self.summary))
