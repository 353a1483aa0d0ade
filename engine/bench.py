"""Throughput benchmark: the engine's adversarial training step against a reference-style loop.

:func:`run_bench` times, in one process, on the same model, batch and attack:

* **ours** -- :func:`robprune.engine.pipeline.adversarial_step`, the very function the engine's loop calls, with the
  engine's setup for the phase (an :class:`~robprune.engine.admm.ADMM` object for ``admm``, :class:`~robprune.engine.pruning.MaskedParams`
  for ``retrain``), the engine's optimizer (:func:`robprune.engine.pipeline.make_optimizer`), data as float tensors already
  on the device, and channels_last / bf16 autocast / torch.compile when asked;
* **baseline** (``baseline=True``) -- :class:`ReferenceLoop`, written here to follow the habits of the published code
  (Ye et al. 2019, which builds on the Madry PGD port): an extra natural forward pass every step (for logging natural
  accuracy), PGD run with the model in train mode, the ADMM penalty ``sum rho/2 ||W - Z + U||^2`` put into the loss
  over every pruned layer every step, a host sync (``.item()``) every step for logging, projections through numpy,
  gradients of pruned weights multiplied by float masks every step in retrain, default memory format, default
  optimizer.

Blocks of ``iters`` steps are timed after ``warmup`` steps, baseline and ours alternating (A B A B ...) so that
drift of a shared machine hits both alike; the medians are reported. Nothing is printed: the result is a dict.
"""
from __future__ import annotations

import copy
import platform
import re
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import fastpath
from .admm import ADMM
from .attacks import evaluate, split_chunks
from .config import ATTACK_KINDS, PHASES, PhaseConfig
from .models import build_model, cpu_channels_last_hazard, prunable_parameters
from .pipeline import adversarial_step, bf16_usable, make_optimizer
from .pruning import MaskedParams, layer_scheme, n_pruned, project
from .resources import memory_available, model_memory

MODELS = ("lenet", "resnet18", "vgg16", "wrn")

# The papers' attack settings per data shape: MNIST eps 0.3, step 0.01; CIFAR-10 eps 8/255, step 2/255.
MNIST_ATTACK = (0.3, 0.01)
CIFAR_ATTACK = (8 / 255, 2 / 255)


# ------------------------------------------------------------------------------------------------ numpy projections

def numpy_project(weight: torch.Tensor, scheme: str, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's way of projecting: copy the weight to the host, rank with numpy, copy back.

    Same sets as :func:`robprune.engine.pruning.project` (exact counts, stable order among ties), so the two can be
    checked against each other; returns ``(projected, float mask)`` on the weight's device."""
    w = weight.detach().cpu().numpy().copy()
    shape = w.shape
    if scheme == "irregular":
        measure = np.abs(w).reshape(-1)
    else:
        w2 = w.reshape(shape[0], -1)
        measure = np.linalg.norm(w2, 2, axis=1 if scheme == "filter" else 0)
    k = n_pruned(measure.size, ratio)
    keep = np.ones(measure.size, dtype=bool)
    keep[np.argsort(measure, kind="stable")[:k]] = False
    if scheme == "irregular":
        mask = keep.reshape(shape)
    elif scheme == "filter":
        mask = np.broadcast_to(keep.reshape(-1, 1), (shape[0], w.size // max(shape[0], 1))).reshape(shape)
    else:
        mask = np.broadcast_to(keep.reshape(1, -1), (shape[0], w.size // max(shape[0], 1))).reshape(shape)
    w[~mask] = 0
    dev = weight.device
    return torch.from_numpy(w).to(dev), torch.from_numpy(mask.astype(np.float32)).to(dev)


# ------------------------------------------------------------------------------------------------ reference loop

class ReferenceLoop:
    """A training step as the published code writes it (see the module docstring)."""

    def __init__(self, model, optimizer, *, kind: str, eps: float, step_size: float, steps: int,
                 admm: dict | None = None, masks: dict | None = None):
        self.model, self.optimizer = model, optimizer
        self.kind, self.eps, self.step_size, self.steps = kind, eps, step_size, steps
        self.admm = admm      # {"rho": {name: rho}, "Z": {...}, "U": {...}}
        self.masks = masks    # {name: float mask}
        self.named = dict(model.named_parameters())
        self.log: list[tuple[float, float]] = []

    def perturb(self, x, y):
        """PGD / FGSM-RS with the model as it is (train mode: BatchNorm uses and updates batch statistics)."""
        if self.kind == "none" or self.eps == 0:
            return x
        x_adv = (x + torch.zeros_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps if self.kind == "pgd" else 1):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(self.model(x_adv), y, reduction="sum")
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + self.step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
            x_adv = torch.clamp(x_adv, 0, 1)
        return x_adv.detach()

    def step(self, x, y):
        model = self.model
        model.train()
        nat_out = model(x)                      # natural forward, for the natural accuracy in the log
        x_adv = self.perturb(x, y)
        adv_out = model(x_adv)
        nat_loss = F.cross_entropy(nat_out, y)
        adv_loss = F.cross_entropy(adv_out, y)
        loss = adv_loss
        if self.admm is not None:               # the penalty in the loss, every pruned layer, every step
            for name, z in self.admm["Z"].items():
                w = self.named[name]
                loss = loss + 0.5 * self.admm["rho"][name] * torch.norm(w - z + self.admm["U"][name], p=2) ** 2
        self.optimizer.zero_grad()
        loss.backward()
        if self.masks is not None:
            with torch.no_grad():
                for name, m in self.masks.items():
                    self.named[name].grad *= m
        self.optimizer.step()
        self.log.append((nat_loss.item(), adv_loss.item()))  # a host sync every step
        if len(self.log) > 1000:
            del self.log[:500]
        return loss, adv_out


# ------------------------------------------------------------------------------------------------ setup helpers

def _input_shape(model: str) -> tuple[int, int]:
    """(channels, side): MNIST for LeNet, CIFAR-10 for the others."""
    return (1, 28) if model == "lenet" else (3, 32)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but no CUDA device is available here")
    return torch.device(device)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_memory(dev: torch.device, peaks: dict) -> dict:
    """CUDA: the peak allocated memory of one step of ours (and of the baseline, where timed), measured apart.
    CPU: the peak resident set of the whole process (both loops, the evaluation and torch itself)."""
    if dev.type == "cuda":
        out = {"peak_memory_bytes": peaks["ours"], "peak_memory_kind": "cuda_allocated_one_step"}
        if "baseline" in peaks:
            out["baseline_peak_memory_bytes"] = peaks["baseline"]
        return out
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if platform.system() == "Darwin" else rss * 1024  # Linux reports KiB, macOS bytes
        return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process_max_rss"}
    except ImportError:  # pragma: no cover - not on POSIX
        return {"peak_memory_bytes": None, "peak_memory_kind": "unavailable"}


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (all threads), or None where getrusage is not available. A
    fresh activation the allocator takes from the OS costs one fault per 4 KiB page touched."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _pruned_setup(net, ratio: float):
    params = prunable_parameters(net)
    ratios = {k: float(ratio) for k in params}
    schemes = {k: layer_scheme(p, "irregular", "irregular") for k, p in params.items()}
    return params, ratios, schemes


def _step_flops(step) -> int | None:
    """Floating-point operations of one step: matmuls and convolutions, forward and backward, counted with
    torch.utils.flop_counter's per-op formulas (its FlopCounterMode's module tracking does not support
    autograd.grad w.r.t. a leaf, which the attacks use). None where that is not available.

    A dispatch mode sees the ops of its own thread only, so the attacks' split into chunks on worker threads
    (:func:`robprune.engine.attacks.fastpath._split_run`) is off while counting: the chunks' FLOPs add up to the whole batch's."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
    except ImportError:  # pragma: no cover - another torch
        return None

    class Count(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            fn = flop_registry.get(func._overloadpacket)
            if fn is not None:
                Count.flops += int(fn(*args, **kwargs, out_val=out))
            return out

    split = fastpath.SPLIT_ATTACK
    fastpath.SPLIT_ATTACK = False
    try:
        with Count():
            step()
    except Exception:  # pragma: no cover - counting is a nicety, never a failure
        return None
    finally:
        fastpath.SPLIT_ATTACK = split
    return Count.flops


def _matmul_rate(dev: torch.device, bf16: bool, repeats: int = 5) -> tuple[float | None, str]:
    """(TFLOP/s, dtype name) of a large square matmul on ``dev``, the median of ``repeats`` after a warm-up: the
    rate a dense kernel attains on this device and thread count, to read the training step's TFLOP/s against.
    The dtype is the one the step's convolutions compute in: bfloat16 under bf16 autocast; on CUDA float32 as
    TF32 where cuDNN may use it for float32 convolutions (its default); else float32. The rate is None where the
    matmul fails (out of memory): the timings already taken are not lost for it."""
    if dev.type == "cuda":
        n = 8192
        if bf16:
            dtype, name = torch.bfloat16, "bfloat16"
        else:
            dtype, name = torch.float32, "tf32" if torch.backends.cudnn.allow_tf32 else "float32"
    else:
        n, dtype, name = 2048, torch.float32, "float32"
    gen = torch.Generator().manual_seed(0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    try:
        a = torch.randn(n, n, generator=gen).to(dev, dtype)
        b = torch.randn(n, n, generator=gen).to(dev, dtype)
        times = []
        for r in range(repeats + 2):
            _sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(dev)
            if r >= 2:  # two warm-ups
                times.append(time.perf_counter() - t0)
    except RuntimeError:  # torch.OutOfMemoryError is one
        return None, name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / statistics.median(times) / 1e12, name


# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets, per dtype the convolutions compute in
# (see _matmul_rate): float32 on the CUDA cores, TF32 and bfloat16 (FP32 accumulate) on the tensor cores. Matched
# as whole words against torch.cuda.get_device_name() in order, first hit wins: a variant comes before its family.
DATASHEET_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIE", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100 NVL", {}),  # its datasheets have given the numbers per pair of cards and per card: left out
    ("H100", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5}),
    ("H200", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),  # SXM: the H100 SXM5's compute
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
    ("L40S", {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.05}),
    ("L40", {"float32": 90.5, "tf32": 90.5, "bfloat16": 181.05}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0}),
    ("A10", {"float32": 31.2, "tf32": 62.5, "bfloat16": 125.0}),
)


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """The card's dense datasheet peak in TFLOP/s for ``dtype`` ("float32", "tf32", "bfloat16"), or None for a
    card or dtype not in :data:`DATASHEET_PEAKS` (and for CPUs, whose clocks a VM does not tell). Names match as
    whole words, so an A10G is not an A10 and an RTX A1000 not an A100."""
    name = device_name.upper().replace("-", " ")
    for key, peaks in DATASHEET_PEAKS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(key)}(?![A-Z0-9])", name):
            return peaks.get(dtype)
    return None


def rate_fractions(tflop_per_s: dict[str, float | None], matmul: dict[str, tuple[float | None, str]],
                   device_name: str | None) -> dict:
    """Each loop's TFLOP/s read against the matmul rate and the datasheet peak *of its own precision*.

    ``tflop_per_s`` and ``matmul`` are keyed by loop, ``"train"`` (ours) and ``"baseline"`` (the reference, where
    timed): the loop's achieved TFLOP/s (None where not counted) and ``(matmul TFLOP/s or None, dtype)`` measured
    in the dtype that loop computes in (see :func:`_matmul_rate`). With ``--bf16`` on CUDA ours computes in
    bfloat16 and the reference loop, which never autocasts, in float32 (TF32): each is divided by its own.
    ``device_name`` is the CUDA card's name, None on the CPU (no datasheet peak there).

    Returns ``matmul_tflop_per_s``, ``matmul_dtype``, ``device_peak_tflop_per_s`` (ours' dtype) and, for the
    baseline, the same keys prefixed ``baseline_``; ``{who}_fraction_of_matmul`` / ``{who}_fraction_of_peak``
    where both numbers are known. Pure arithmetic: no device is touched."""
    out: dict = {}
    for who, (rate, dtype) in matmul.items():
        pre = "" if who == "train" else f"{who}_"
        peak = datasheet_peak(device_name, dtype) if device_name else None
        out.update({f"{pre}matmul_tflop_per_s": rate, f"{pre}matmul_dtype": dtype,
                    f"{pre}device_peak_tflop_per_s": peak})
        tflops = tflop_per_s.get(who)
        if tflops and rate:
            out[f"{who}_fraction_of_matmul"] = tflops / rate
        if tflops and peak:
            out[f"{who}_fraction_of_peak"] = tflops / peak
    return out


# ------------------------------------------------------------------------------------------------ the benchmark

def run_bench(model: str = "lenet", width: int = 4, batch: int = 128, attack: str = "pgd", steps: int = 40,
              phase: str = "admm", device: str = "auto", repeats: int = 5, warmup: int = 3, iters: int = 10,
              baseline: bool = False, ratio: float = 0.9, bf16: bool = False, channels_last: bool = False,
              compile: bool = False, depth: int = 28, eps: float | None = None, step_size: float | None = None,
              optimizer: str = "sgd", rho: float = 1e-3, threads: int = 0, eval_batches: int = 1,
              seed: int = 0) -> dict:
    """Time adversarial training steps of ``phase`` (and PGD evaluation); see the module docstring.

    Returns a dict: ``train_images_per_s`` (median), ``train_images_per_s_runs``, ``eval_images_per_s``,
    with ``baseline`` also ``baseline_images_per_s``, ``baseline_images_per_s_runs`` and ``speedup``
    (ours / baseline), plus ``peak_memory_bytes`` (on CUDA one step of ours, with ``baseline`` also
    ``baseline_peak_memory_bytes``; on the CPU the process's peak RSS), ``page_faults_per_step`` (the process's
    minor page faults per timed step, with ``baseline`` also ``baseline_page_faults_per_step``; CPU on POSIX),
    ``train_flop_per_step`` / ``train_tflop_per_s`` (convolutions and matmuls counted, forward and backward; with
    ``baseline`` also ``baseline_flop_per_step`` / ``baseline_tflop_per_s``), ``matmul_tflop_per_s`` and
    ``matmul_dtype`` (see :func:`_matmul_rate`) with ``train_fraction_of_matmul``, ``device_peak_tflop_per_s``
    (the card's datasheet peak in that dtype, :func:`datasheet_peak`; None on the CPU or for a card not listed)
    with ``train_fraction_of_peak``; with ``baseline`` the same for the reference loop in *its* precision
    (``baseline_matmul_tflop_per_s``, ``baseline_matmul_dtype``, ``baseline_device_peak_tflop_per_s``,
    ``baseline_fraction_of_matmul``, ``baseline_fraction_of_peak``: float32/TF32 even under ``bf16``, see
    :func:`rate_fractions`); ``device``, ``device_name``, ``torch`` and ``settings``. ``bf16`` on the CPU is
    not used: ``settings["bf16"]`` is false (``bf16_requested`` true) and both loops run float32."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if attack not in ATTACK_KINDS:
        raise ValueError(f"attack must be one of {', '.join(ATTACK_KINDS)}, got {attack!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    for name, v, lo in (("width", width, 1), ("batch", batch, 1), ("steps", steps, 0), ("repeats", repeats, 1),
                        ("warmup", warmup, 0), ("iters", iters, 1), ("threads", threads, 0),
                        ("eval_batches", eval_batches, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.empty(0, device=dev)  # initialise CUDA: the memory statistics of "cuda:N" need it
    in_ch, side = _input_shape(model)
    d_eps, d_step = MNIST_ATTACK if model == "lenet" else CIFAR_ATTACK
    eps = d_eps if eps is None else float(eps)
    step_size = d_step if step_size is None else float(step_size)
    # as in the engine: bf16 autocast only on a GPU with native bf16 (compute capability 8.0 or newer)
    use_bf16, bf16_note = bf16_usable(dev, bool(bf16))

    n_params, need = model_memory(model, width, num_classes=10, in_channels=in_ch, image_size=side, depth=depth)
    need = (2 if baseline else 1) * need + 4 * batch * in_ch * side * side * 4  # each loop's model, 4 input batches
    have, what = memory_available(dev)
    if need > have:
        raise ValueError(f"--width {width}, --batch {batch}: {model} has {n_params:,} parameters; with its state "
                         f"and the inputs about {need / 2**30:.1f} GiB, expected a model and batch that fit "
                         f"in {what} ({have / 2**30:.1f} GiB)")
    torch.manual_seed(seed)
    base_net = build_model(model, width, num_classes=10, in_channels=in_ch, image_size=side, depth=depth)
    hazard = cpu_channels_last_hazard(base_net) if channels_last and dev.type == "cpu" else None
    if hazard:
        raise ValueError(f"channels_last on the CPU for {model} width {width}: {hazard}; use a width >= 2 or leave "
                         "channels_last off")
    gen = torch.Generator().manual_seed(seed)
    n_pool = 4  # distinct batches, cycled
    xs = [torch.rand(batch, in_ch, side, side, generator=gen).to(dev) for _ in range(n_pool)]
    ys = [torch.randint(0, 10, (batch,), generator=gen).to(dev) for _ in range(n_pool)]
    pc = PhaseConfig(optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3, momentum=0.9, weight_decay=1e-4)

    # ---- ours: the engine's own setup
    net = copy.deepcopy(base_net).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    params, ratios, schemes = _pruned_setup(net, ratio)
    admm_state = masked = None
    if phase == "admm":
        admm_state = ADMM(params, ratios, schemes, rho)
    elif phase == "retrain":
        with torch.no_grad():
            masks = {}
            for k, p in params.items():
                projected, masks[k] = project(p.detach(), schemes[k], ratios[k])
                p.copy_(projected)
        masked = MaskedParams(params, masks).attach()
    opt = make_optimizer(pc, net.parameters(), dev)
    train_fn = torch.compile(net, dynamic=False) if compile else net  # static shapes, as the engine
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else None

    def ours_step(i: int):
        return adversarial_step(net, train_fn, opt, xs[i % n_pool], ys[i % n_pool], kind=attack, eps=eps,
                                step_size=step_size, steps=steps, admm=admm_state, masked=masked,
                                autocast=autocast, channels_last=channels_last)

    # ---- the reference loop: a second copy of the same initial weights, default format, default optimizer
    ref_step = None
    if baseline:
        rnet = copy.deepcopy(base_net).to(dev)
        rparams, rratios, rschemes = _pruned_setup(rnet, ratio)
        radmm = rmasks = None
        if phase == "admm":
            radmm = {"rho": {k: rho for k in rparams}, "U": {k: torch.zeros_like(p) for k, p in rparams.items()},
                     "Z": {k: numpy_project(p, rschemes[k], rratios[k])[0] for k, p in rparams.items()}}
        elif phase == "retrain":
            rmasks = {}
            with torch.no_grad():
                for k, p in rparams.items():
                    projected, rmasks[k] = numpy_project(p, rschemes[k], rratios[k])
                    p.copy_(projected)
        if optimizer == "sgd":
            ropt = torch.optim.SGD(rnet.parameters(), pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay)
        else:
            ropt = torch.optim.Adam(rnet.parameters(), pc.lr, weight_decay=pc.weight_decay)
        ref = ReferenceLoop(rnet, ropt, kind=attack, eps=eps, step_size=step_size, steps=steps, admm=radmm,
                            masks=rmasks)

        def ref_step(i: int):
            return ref.step(xs[i % n_pool], ys[i % n_pool])

    faults = {"ours": 0, "baseline": 0}

    def timed_block(step_fn, start: int, who: str) -> float:
        _sync(dev)
        f0 = _minor_faults()
        t0 = time.perf_counter()
        for i in range(iters):
            step_fn(start + i)
        _sync(dev)
        dt = time.perf_counter() - t0
        if f0 is not None:
            faults[who] += _minor_faults() - f0
        return batch * iters / dt

    try:
        # warm-up (compilation, allocator, oneDNN primitive caches), not timed
        for i in range(warmup):
            if ref_step is not None:
                ref_step(i)
            ours_step(i)
        _sync(dev)
        ours_runs, ref_runs = [], []
        for r in range(repeats):  # A B A B ...: drift of the machine hits both alike
            if ref_step is not None:
                ref_runs.append(timed_block(ref_step, r * iters, "baseline"))
            ours_runs.append(timed_block(ours_step, r * iters, "ours"))

        # ---- peak device memory of one step of each loop (CUDA; on the CPU the process's peak RSS is all we have)
        peaks = {}
        if dev.type == "cuda":
            for who, fn in (("ours", ours_step), ("baseline", ref_step)):
                if fn is not None:
                    _sync(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    fn(0)
                    _sync(dev)
                    peaks[who] = int(torch.cuda.max_memory_allocated(dev))

        # ---- PGD evaluation throughput (robprune.engine.attacks.evaluate), the model in eval mode, as the engine
        # evaluates: in float32 (no bf16 autocast: reported accuracies are float32 ones), inputs as stored
        eval_runs = []
        if eval_batches:
            ex = torch.cat([xs[i % n_pool] for i in range(eval_batches)])
            ey = torch.cat([ys[i % n_pool] for i in range(eval_batches)])
            for r in range(max(1, repeats) + 1):
                _sync(dev)
                t0 = time.perf_counter()
                evaluate(net, ex, ey, kind=attack, eps=eps, step_size=step_size, steps=steps, batch_size=batch)
                _sync(dev)
                if r:  # the first is a warm-up
                    eval_runs.append(len(ex) / (time.perf_counter() - t0))
        flops = _step_flops(lambda: adversarial_step(
            net, net, opt, xs[0], ys[0], kind=attack, eps=eps, step_size=step_size, steps=steps, admm=admm_state,
            masked=masked, autocast=autocast, channels_last=channels_last))
        ref_flops = _step_flops(lambda: ref_step(0)) if ref_step is not None else None
        # the matmul rate of each loop's own precision: ours in bf16 under --bf16 (CUDA), the reference loop in
        # float32 (TF32) always; on the CPU --bf16 is not used (settings.bf16 false), so one float32 rate serves both
        matmul = {"train": _matmul_rate(dev, use_bf16)}
        if baseline:
            matmul["baseline"] = _matmul_rate(dev, False) if use_bf16 else matmul["train"]
    finally:
        if masked is not None:
            masked.detach()

    settings = {"model": model, "width": width, "depth": depth if model == "wrn" else None, "batch": batch,
                "input_shape": [in_ch, side, side], "attack": attack, "steps": steps, "eps": eps,
                "step_size": step_size, "phase": phase, "prune_ratio": ratio, "rho": rho, "optimizer": optimizer,
                "repeats": repeats, "warmup": warmup, "iters": iters, "baseline": baseline, "bf16": use_bf16,
                "bf16_requested": bool(bf16), **({"bf16_note": bf16_note} if bf16_note else {}),
                "channels_last": channels_last, "compile": compile,
                "threads": torch.get_num_threads(), "seed": seed, "eval_batches": eval_batches,
                "attack_chunks": split_chunks(batch, dev)}
    result = {
        "train_images_per_s": statistics.median(ours_runs),
        "train_images_per_s_runs": ours_runs,
        "eval_images_per_s": statistics.median(eval_runs) if eval_runs else None,
        "eval_images_per_s_runs": eval_runs,
    }
    timed_steps = repeats * iters
    if dev.type == "cpu" and _minor_faults() is not None:  # host page faults say nothing about CUDA memory
        result["page_faults_per_step"] = faults["ours"] / timed_steps
    if flops:
        result["train_flop_per_step"] = flops
        result["train_tflop_per_s"] = flops * result["train_images_per_s"] / batch / 1e12
    if baseline:
        base = statistics.median(ref_runs)
        result.update(baseline_images_per_s=base, baseline_images_per_s_runs=ref_runs,
                      speedup=result["train_images_per_s"] / base,
                      speedup_runs=[o / b for o, b in zip(ours_runs, ref_runs)])
        if "page_faults_per_step" in result:
            result["baseline_page_faults_per_step"] = faults["baseline"] / timed_steps
        if ref_flops:
            result["baseline_flop_per_step"] = ref_flops
            result["baseline_tflop_per_s"] = ref_flops * base / batch / 1e12
    device_name = _device_name(dev)
    result.update(rate_fractions({who: result.get(f"{who}_tflop_per_s") for who in matmul}, matmul,
                                 device_name if dev.type == "cuda" else None))
    result.update(_peak_memory(dev, peaks))
    result.update(device=str(dev), device_name=device_name, torch=torch.__version__, settings=settings)
    return result


# ------------------------------------------------------------------------------------------------ 2:4 semi-structured

SEMI_DTYPES = ("float16", "bfloat16")


def run_semi_structured_bench(*, device: str = "auto", batch: int = 4096, hidden: int = 4096, layers: int = 4,
                              dtype: str = "float16", repeats: int = 5, warmup: int = 3, iters: int = 10,
                              threads: int = 0, seed: int = 0) -> dict:
    """Inference of a linear-heavy model -- ``layers`` x (Linear(hidden, hidden) + ReLU), then Linear(hidden, 10) --
    whose hidden weights are pruned 2:4 (:func:`robprune.engine.pruning.project`), dense against the same weights
    converted with ``torch.sparse.to_sparse_semi_structured`` (:func:`robprune.engine.export.to_semi_structured`):
    blocks of ``iters`` forward passes on one random batch, dense and sparse alternating, medians in ms per batch
    and their ratio ``speedup`` (dense / sparse). The outputs of the two are compared (``max_abs_diff``).

    Where the kernels cannot run (the CPU, a GPU older than compute capability 8.0) nothing is timed: the result
    says ``"supported": false`` and why (``reason``)."""
    from torch import nn

    from .export import semi_structured_support, to_semi_structured

    for name, v, lo in (("batch", batch, 1), ("hidden", hidden, 64), ("layers", layers, 1), ("repeats", repeats, 1),
                        ("warmup", warmup, 0), ("iters", iters, 1), ("threads", threads, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64 (the sparse kernels' tile), got {hidden}")
    if dtype not in SEMI_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SEMI_DTYPES)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = _device(device)
    settings = {"batch": batch, "hidden": hidden, "layers": layers, "dtype": dtype, "scheme": "2:4",
                "repeats": repeats, "warmup": warmup, "iters": iters, "seed": seed}
    result = {"bench": "semi_structured", "device": str(dev), "device_name": _device_name(dev),
              "torch": torch.__version__, "settings": settings}
    ok, why = semi_structured_support(dev)
    if not ok:
        return {**result, "supported": False, "reason": why}
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    mods = [m for _ in range(layers) for m in (nn.Linear(hidden, hidden), nn.ReLU())] + [nn.Linear(hidden, 10)]
    net = nn.Sequential(*mods)
    names = [f"{2 * i}.weight" for i in range(layers)]
    with torch.no_grad():
        for i in range(layers):
            w = net[2 * i].weight
            w.copy_(project(w, "2:4", 0.5)[0])
    dense = net.to(device=dev, dtype=dt).eval()
    sparse, report = to_semi_structured(dense, names, dtype=dt, device=dev)
    x = torch.rand(batch, hidden, generator=torch.Generator().manual_seed(seed)).to(device=dev, dtype=dt)
    models = {"dense": dense, "sparse": sparse}
    runs: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.inference_mode():
        diff = float((dense(x).float() - sparse(x).float()).abs().max())
        for mod in models.values():
            for _ in range(warmup):
                mod(x)
        for r in range(repeats):
            for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    models[name](x)
                _sync(dev)
                runs[name].append(1000 * (time.perf_counter() - t0) / iters)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {**result, "supported": True, "dense_ms_per_batch": med["dense"], "sparse_ms_per_batch": med["sparse"],
            "speedup": med["dense"] / med["sparse"] if med["sparse"] > 0 else None,
            "dense_ms_per_batch_runs": runs["dense"], "sparse_ms_per_batch_runs": runs["sparse"],
            "max_abs_diff": diff, "converted": report["converted"], "skipped": report["skipped"]}
