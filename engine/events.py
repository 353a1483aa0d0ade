"""Typed records the engine emits, and the bus that hands them to subscribers.

Every event is a small dataclass that serialises to one JSON object with ``t`` (unix time) and ``type``.
Metric events (step, eval, layers, residuals) also carry ``step``, ``epoch`` and ``phase`` and go to
``metrics.jsonl``; the others go to ``events.jsonl``. Subscribers are plain callables run on the engine
thread: they must be quick (the dashboard posts a message, the run-dir writer appends a line).
"""
from __future__ import annotations

import threading
import time
import traceback as _tb
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar


@dataclass
class Event:
    type: ClassVar[str] = "event"
    metric: ClassVar[bool] = False
    t: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"t": d.pop("t"), "type": self.type, **d}


@dataclass
class MetricEvent(Event):
    """A record for metrics.jsonl: where in the run it was taken (global step, epoch, phase)."""

    metric: ClassVar[bool] = True
    step: int
    epoch: int
    phase: str


@dataclass
class StepMetrics(MetricEvent):
    """Training progress, emitted at most every ``run.log_interval_s`` seconds (and at epoch ends)."""

    type: ClassVar[str] = "step"
    batch: int  # batches done in this epoch
    batches: int  # batches per epoch
    epochs: int  # epochs of this phase
    loss: float  # mean adversarial cross-entropy over the interval
    adv_acc: float  # training accuracy on the adversarial batches over the interval
    penalty: float  # ADMM penalty sum_l rho_l/2 ||W_l - Z_l + U_l||^2 at the emission (0 outside ADMM)
    lr: float
    images_per_s: float
    resources: dict = field(default_factory=dict)  # host RSS and CPU %, GPU memory (engine/resources.py)


@dataclass
class EvalResult(MetricEvent):
    type: ClassVar[str] = "eval"
    nat_acc: float
    adv_acc: float
    n: int
    attack: dict
    reason: str = "periodic"  # periodic | now | phase_end | final


@dataclass
class AutoAttackResult(MetricEvent):
    """The final AutoAttack of a run (``eval.final_attack = "autoattack"``): per-example worst case over the
    ensemble, on the first ``n`` test examples; ``attack`` names it exactly (version, eps, each attack's settings)."""

    type: ClassVar[str] = "autoattack"
    clean_acc: float
    robust_acc: float
    n: int
    attack: dict
    per_attack: list
    seconds: float
    path: str = ""


@dataclass
class OverfitCheck(MetricEvent):
    """After an epoch of single-step training: accuracy under APGD-CE (``apgd_steps`` steps at attack.eval's eps)
    and under the training attack on ``n`` held-out test examples; ``detected``: the rule that says catastrophic
    overfitting ("gap", "drop"), or None (engine/overfit.py)."""

    type: ClassVar[str] = "overfit_check"
    n: int
    apgd_acc: float
    apgd_steps: int
    train_attack_acc: float
    train_attack: str
    detected: str | None = None


@dataclass
class LayerStats(MetricEvent):
    """Per-layer sparsity and ADMM state: one dict per prunable layer."""

    type: ClassVar[str] = "layers"
    layers: list


@dataclass
class Residuals(MetricEvent):
    """ADMM residuals per layer: primal ||W-Z||/||W||, dual rho*||Z_k - Z_(k-1)||, and rho."""

    type: ClassVar[str] = "residuals"
    update: int  # number of Z/U updates so far
    layers: dict


@dataclass
class PhaseChange(Event):
    type: ClassVar[str] = "phase"
    phase: str
    index: int
    epochs: int
    step: int
    skipped: bool = False


@dataclass
class PruneAllocation(Event):
    """The per-layer pruning ratios of the run, fixed when the ADMM phase starts (or at the hard prune when it has
    no epochs): ``method`` (prune.allocation), the overall ``ratio`` (prune.ratio), ``prunable`` / ``pruned`` entry
    counts over all prunable layers, and per layer ``ratio``, ``numel``, ``pruned``, ``scheme`` and ``set_by``
    (see :meth:`robprune.engine.pruning.PrunePlan.record`). Once per run: a resumed run keeps the checkpoint's."""

    type: ClassVar[str] = "allocation"
    method: str
    ratio: float
    normalize: bool | None
    prunable: int
    pruned: int
    layers: dict
    step: int
    phase: str


@dataclass
class LogLine(Event):
    type: ClassVar[str] = "log"
    level: str
    message: str


@dataclass
class CommandApplied(Event):
    """A command applied at a step boundary; serialises with the command's name as its type."""

    command: str
    args: dict
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "type": self.command, "step": self.step, **self.args}


@dataclass
class DistributedStart(Event):
    """A data-parallel run's ranks, once every one is set up: rank order, with each one's pid, host and device."""

    type: ClassVar[str] = "distributed"
    world_size: int
    backend: str
    ranks: list


@dataclass
class CheckpointSaved(Event):
    type: ClassVar[str] = "checkpoint"
    path: str
    step: int
    epoch: int
    phase: str
    reason: str


@dataclass
class Finished(Event):
    type: ClassVar[str] = "finished"
    status: str  # completed | stopped
    summary: dict


@dataclass
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> "ErrorEvent":
        return cls(message=f"{type(exc).__name__}: {exc}", traceback="".join(_tb.format_exception(exc)))


@dataclass
class NonFinite(Event):
    """A non-finite loss (checked at each metrics emission) or weight (checked before each checkpoint).

    The engine never writes a checkpoint from such a state; ``action`` says what it did: ``stop`` (headless:
    the run ends with an error) or ``pause`` (a session with a dashboard attached)."""

    type: ClassVar[str] = "nonfinite"
    what: str  # "loss" | "weights"
    layers: list  # tensors of the model with non-finite values (for "weights")
    step: int
    epoch: int
    phase: str
    checkpoint: str  # the last good checkpoint, kept ("" if none was written yet)
    checkpoint_step: int  # its step (-1 if none)
    action: str  # "stop" | "pause"
    message: str


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers; a failing subscriber is reported once and dropped, never kills the run."""

    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subs.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)

        return unsubscribe

    def emit(self, event: Event) -> None:
        with self._lock:
            subs = list(self._subs)
        for fn in subs:
            try:
                fn(event)
            except Exception as exc:  # a broken subscriber must not stop training
                with self._lock:
                    if fn in self._subs:
                        self._subs.remove(fn)
                if not isinstance(event, LogLine):
                    self.emit(LogLine(level="warning", message=f"subscriber {fn!r} failed and was removed: {exc}"))
