"""The CPU fast path every attack runs through: an eval-mode rewrite of the model, and one chunk per core.

Speed: the attacks differentiate an eval-mode rewrite of the model (:func:`attack_model`, made once per model
with torch.fx) that computes the same function with fewer passes over the activations: each Conv2d followed by
an eval-mode BatchNorm2d becomes one convolution with folded weight and bias (equal up to float rounding), a
ReLU followed by a max-pool becomes the max-pool followed by the ReLU (bit-for-bit the same values and input
gradients, on a quarter of the elements), and on the CPU the convolutions run in channels_last whatever the
model's own memory format. On the CPU a convolution with one input channel (an MNIST model's first layer)
followed by a 2x2 max-pool runs space-to-depth (:class:`_AttackConvPool`): oneDNN computes the input gradient
of a convolution with one input channel at a fraction of its usual speed, and the rearranged convolution has
four. When the model's input feeds that layer and nothing else, PGD rearranges its batch once and iterates
in the rearranged layout (:class:`_S2DEntry`, ``S2D_INPUT``). A ReLU of a value nothing else reads runs in place.
``FAST_ATTACK = False`` turns the rewrite off.

On the CPU with several intra-op threads, the attacks also split the batch into one chunk per thread and run
the chunks side by side, each on a worker thread of its own with one intra-op thread (:func:`_split_run`).
In eval mode an example's adversarial perturbation depends on that example only, and the random starts are
drawn for the whole batch before the split, so the result is the one of the whole batch (bit for bit, on the
models tested). A small model's layers are too small for oneDNN to keep two threads busy inside one
operation; one chunk per core is. ``SPLIT_ATTACK = False`` turns it off. A worker runs a chunk whose
activations would outgrow one heap of its malloc arena in pieces (``WORKER_PIECE_BYTES``, :func:`_pieces`).
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from concurrent.futures import Future
from queue import SimpleQueue

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import PerModel, StemConv2d, float32_stem

FAST_ATTACK = True  # differentiate the folded eval-mode rewrite of the model (see attack_model)
# conv + 2x2 max-pool pairs with at most this many input channels run space-to-depth on the CPU: it pays with
# one input channel (MNIST), not with three (CIFAR); see docs/performance.md.
S2D_MAX_IN_CHANNELS = 1
INPLACE_RELU = True  # the rewrite's ReLUs of values nothing else reads run in place (one allocation fewer)
# PGD keeps its iterate space-to-depth when the model's input goes straight into a space-to-depth layer
# (see _S2DEntry): the batch is rearranged once per attack, not forward and back in every iteration
S2D_INPUT = True
SPLIT_ATTACK = True  # on the CPU, one chunk of the batch per intra-op thread, run side by side (see _split_run)
SPLIT_MIN_CHUNK = 16  # no chunk smaller than this many examples: below it the split costs more than it gains
# A worker runs its chunk in pieces of at most this many bytes of forward activations (the rewrite's node
# outputs; see _pieces). glibc gives each worker thread an arena of 64 MiB heaps and unmaps a heap as soon
# as it is empty: a chunk whose activations outgrow one heap gets fresh pages, and page faults, in every
# iteration. 0 turns it off.
WORKER_PIECE_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------- the attack's model

class _AttackConv(nn.Module):
    """A Conv2d as the attack runs it, optionally with the eval-mode BatchNorm2d right after it folded in:
    ``w' = w * g / sqrt(var + eps)``, ``b' = beta + (b - mean) * g / sqrt(var + eps)`` (the same affine map).

    On the CPU it computes in channels_last (oneDNN's fast layout there), whatever the model's own format.
    The modules are held as a plain attribute, not as submodules; :meth:`refresh` reads their current
    parameters and statistics (once per attack call, as training changes them between calls)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None):
        super().__init__()
        self.pair = (conv, bn)
        self.stem = type(conv) is StemConv2d  # float32 under autocast, as the model's own stem
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.channels_last = False

    @torch.no_grad()
    def refresh(self) -> None:
        conv, bn = self.pair
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else None
        if bn is not None:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias.detach()
            if b is not None:
                shift = shift + b * scale
            w = w * scale.to(w.dtype).reshape(-1, 1, 1, 1)
            b = shift.to(w.dtype)
        self.channels_last = w.device.type == "cpu"
        if self.channels_last:
            w = channels_last_strides(w)
        self.weight, self.bias = w, b

    def forward(self, x: Tensor) -> Tensor:
        if self.stem and torch.is_autocast_enabled(x.device.type):
            with float32_stem(x):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            return self.pair[0]._conv_forward(x, self.weight, self.bias).contiguous(memory_format=torch.channels_last)
        return self.pair[0]._conv_forward(x, self.weight, self.bias)


def channels_last_strides(t: Tensor) -> Tensor:
    """``t`` with channels_last strides. ``contiguous(memory_format=channels_last)`` is not enough: with one
    input channel (the first conv of an MNIST model) the plain strides pass for channels_last too, and oneDNN
    then takes its slow NCHW path."""
    n, c, h, w = t.shape
    if t.stride() == (c * h * w, 1, w * c, c):
        return t
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


class _AttackConvPool(nn.Module):
    """An :class:`_AttackConv` followed by a 2x2, stride-2 max-pool, computed space-to-depth on the CPU.

    The input is rearranged into 2x2 blocks (``pixel_unshuffle``: ``4 * C`` channels at half the height and
    width) and convolved with a rearranged kernel (zeros where a block offset falls outside the original
    kernel) whose ``4 * O`` output channels are the four positions of each pooling window, ordered
    (row, column, channel). A k x k "same" convolution becomes a (2r+1) x (2r+1) one with ``r = (k // 2 + 1) // 2``
    (3 x 3 for k = 3 or 5) over four times the channels: more multiply-adds (1.44x for k = 5), but oneDNN runs
    the input gradient of a convolution with one input channel much slower than that of one with four (see
    docs/performance.md). The max-pool then reduces the four window positions of each channel; seen as a
    channels_last tensor ``(N, O, H/2 * W/2, 4)`` that is a ``(1, 4)`` max-pool over the positions in row-major
    order, which keeps max_pool2d's rule for ties (the first position gets the gradient), and runs max_pool2d's
    channels_last kernels, forward and backward, on the convolution's output as it lies in memory. The values
    equal conv + max-pool up to float rounding. Elsewhere (not the CPU, odd height or width) it is the plain conv and max-pool."""

    def __init__(self, conv: _AttackConv):
        super().__init__()
        self.conv = conv
        w = conv.pair[0].weight
        o, c, kh, kw = w.shape
        self.out_channels = o
        self.r = ((kh // 2 + 1) // 2, (kw // 2 + 1) // 2)
        # index of each rearranged weight into the flat original weight followed by one zero
        khp, kwp = 2 * self.r[0] + 1, 2 * self.r[1] + 1
        zero = o * c * kh * kw
        idx = torch.full((2, 2, o, c, 2, 2, khp, kwp), zero, dtype=torch.long)
        base = (torch.arange(o).view(o, 1) * (c * kh * kw) + torch.arange(c).view(1, c) * (kh * kw))
        for a in range(2):
            for s in range(2):
                for dr in range(khp):
                    u = 2 * (dr - self.r[0]) + s - a + kh // 2
                    if not 0 <= u < kh:
                        continue
                    for b in range(2):
                        for t in range(2):
                            for dc in range(kwp):
                                v = 2 * (dc - self.r[1]) + t - b + kw // 2
                                if 0 <= v < kw:
                                    idx[a, b, :, :, s, t, dr, dc] = base + u * kw + v
        self.index = idx.reshape(4 * o, 4 * c, khp, kwp)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    @staticmethod
    def applies(conv: nn.Conv2d) -> bool:
        kh, kw = conv.kernel_size
        return (conv.in_channels <= S2D_MAX_IN_CHANNELS and conv.groups == 1 and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and kh % 2 == 1 and kw % 2 == 1
                and conv.padding == (kh // 2, kw // 2))

    @torch.no_grad()
    def refresh(self) -> None:
        self.conv.refresh()
        w, b = self.conv.weight, self.conv.bias
        if not self.conv.channels_last:  # not the CPU: the plain path
            self.weight = self.bias = None
            return
        flat = torch.cat([w.reshape(-1), w.new_zeros(1)])
        self.index = self.index.to(w.device)
        self.weight = channels_last_strides(flat[self.index])
        self.bias = b.repeat(4) if b is not None else None

    def rearranges(self, x: Tensor) -> bool:
        """Whether :meth:`forward` takes the space-to-depth path for ``x``."""
        return self.weight is not None and x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0

    @staticmethod
    def unshuffle(x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, 4C, H/2, W/2)`` in channels_last memory, channel ``c*4 + row*2 + col`` (a copy)."""
        n, c, h, w = x.shape
        xs = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h // 2, w // 2, 4 * c)
        return xs.permute(0, 3, 1, 2)

    @staticmethod
    def shuffle(xs: Tensor) -> Tensor:
        """The inverse of :meth:`unshuffle`, as a contiguous ``(N, C, H, W)`` tensor."""
        n, c4, h2, w2 = xs.shape
        c = c4 // 4
        x = xs.permute(0, 2, 3, 1).reshape(n, h2, w2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, 2 * h2, 2 * w2).contiguous()

    def forward_unshuffled(self, xs: Tensor) -> Tensor:
        """The layer's output for an input already rearranged by :meth:`unshuffle`."""
        n, _, h2, w2 = xs.shape
        if self.conv.stem and torch.is_autocast_enabled(xs.device.type):
            with float32_stem(xs):
                y = F.conv2d(xs.float(), self.weight, self.bias, padding=self.r)
        else:
            y = F.conv2d(xs, self.weight, self.bias, padding=self.r)
        o = self.out_channels
        # (N, O, H/2 * W/2, 4): the four positions of each window side by side, channels_last strides
        y = y.permute(0, 2, 3, 1).reshape(n, h2 * w2, 4, o).permute(0, 3, 1, 2)
        return F.max_pool2d(y, (1, 4)).reshape(n, o, h2, w2)

    def forward(self, x: Tensor) -> Tensor:
        if not self.rearranges(x):
            return F.max_pool2d(self.conv(x), 2)
        return self.forward_unshuffled(self.unshuffle(x))


class _S2DInput(nn.Module):
    """The entry of a second attack graph (:class:`_S2DEntry`) whose input is already space-to-depth: the
    :class:`_AttackConvPool` the model's input goes straight into, minus the rearrangement. The pool is held as
    a plain attribute: it belongs to the first graph."""

    def __init__(self, pool: _AttackConvPool):
        super().__init__()
        self.pool = (pool,)

    def forward(self, xs: Tensor) -> Tensor:
        return self.pool[0].forward_unshuffled(xs)


class _S2DEntry:
    """The attack graph for inputs already rearranged by :meth:`_AttackConvPool.unshuffle`, for a model whose
    input feeds one space-to-depth layer and nothing else (an MNIST LeNet). PGD then rearranges its bounds and
    starts once, iterates in that layout (its steps are elementwise, so every value is the same, only placed
    elsewhere) and rearranges the result back once: in each iteration the forward's rearrangement of the input
    and the backward's of its gradient are saved."""

    def __init__(self, graph: nn.Module, pool: _AttackConvPool):
        self.graph, self.pool = graph, pool

    def applies(self, x: Tensor) -> bool:
        return S2D_INPUT and self.pool.rearranges(x) and x.shape[1] == self.pool.conv.pair[0].in_channels


def _is_pool2x2(node, mods) -> bool:
    """A max-pool with kernel 2, stride 2, no padding, dilation or ceil_mode, given as a module."""
    if node.op != "call_module" or type(mods.get(node.target)) is not nn.MaxPool2d:
        return False
    p = mods[node.target]
    two = lambda v: v == 2 or v == (2, 2)  # noqa: E731
    zero = lambda v: v == 0 or v == (0, 0)  # noqa: E731
    one = lambda v: v == 1 or v == (1, 1)  # noqa: E731
    return (two(p.kernel_size) and (p.stride is None or two(p.stride)) and zero(p.padding) and one(p.dilation)
            and not p.ceil_mode and not p.return_indices and len(node.args) == 1 and not node.kwargs)


_RELUS = (torch.relu, F.relu)
_MAXPOOLS = (F.max_pool2d, torch.max_pool2d)


def _is_relu(node, mods) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu" and len(node.args) == 1 and not node.kwargs
    return node.op == "call_module" and type(mods.get(node.target)) is nn.ReLU


def _is_maxpool(node, mods) -> bool:
    if node.op == "call_function":
        return node.target in _MAXPOOLS and not node.kwargs.get("return_indices", False)
    return (node.op == "call_module" and type(mods.get(node.target)) is nn.MaxPool2d
            and not mods[node.target].return_indices)


def _makes_fresh_tensor(node, mods) -> bool:
    """Whether ``node`` computes a new tensor (not a view of, or the same tensor as, an input)."""
    import operator  # noqa: PLC0415

    if node.op == "call_module":
        return type(mods.get(node.target)) in (_AttackConv, _AttackConvPool, nn.MaxPool2d)
    if node.op == "call_function":
        return node.target in (operator.add, torch.add, F.max_pool2d)
    return False


def _build_attack_graph(model: nn.Module):
    """(GraphModule, its _AttackConvs and _AttackConvPools) for ``model``, or None when fx cannot trace it."""
    from torch import fx  # noqa: PLC0415 - only the attacks need it

    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "parametrizations") for m in model.modules()):
        return None  # tracing would drop them
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # the stem is a Conv2d to the rewrite
            return type(m) is StemConv2d or super().is_leaf_module(m, qualname)

    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception:  # noqa: BLE001 - any model fx cannot trace is attacked as it is
        return None
    graph = gm.graph
    mods = dict(gm.named_modules())
    convs: list[_AttackConv] = []
    for node in list(graph.nodes):
        # Conv2d [-> eval-mode BatchNorm2d]: one _AttackConv
        conv = mods.get(node.target) if node.op == "call_module" else None
        if type(conv) in (nn.Conv2d, StemConv2d) and len(node.args) == 1 and not node.kwargs:
            user = next(iter(node.users)) if len(node.users) == 1 else None
            bn = mods.get(user.target) if user is not None and user.op == "call_module" else None
            if not (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
                    and len(user.args) == 1 and not user.kwargs):
                bn = None
            module = _AttackConv(conv, bn)
            name = f"_attack_conv_{len(convs)}"
            gm.add_submodule(name, module)
            convs.append(module)
            with graph.inserting_before(node):
                new = graph.call_module(name, node.args)
            (user if bn is not None else node).replace_all_uses_with(new)
            if bn is not None:
                graph.erase_node(user)
            graph.erase_node(node)
            continue
        # ReLU -> max-pool: max-pool -> ReLU (max commutes with a non-decreasing function, ties included)
        if _is_relu(node, mods) and len(node.users) == 1:
            pool = next(iter(node.users))
            if _is_maxpool(pool, mods) and pool.args and pool.args[0] is node:
                pool.replace_input_with(node, node.args[0])
                with graph.inserting_after(pool):
                    relu = graph.call_function(torch.relu, (pool,))
                pool.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
                graph.erase_node(node)
    # _AttackConv -> 2x2 max-pool with few input channels: one _AttackConvPool (space-to-depth on the CPU)
    mods = dict(gm.named_modules())
    n_pairs = 0
    for node in list(graph.nodes):
        conv = mods.get(node.target) if node.op == "call_module" else None
        if type(conv) is not _AttackConv or len(node.users) != 1 or not _AttackConvPool.applies(conv.pair[0]):
            continue
        pool = next(iter(node.users))
        if not _is_pool2x2(pool, mods):
            continue
        module = _AttackConvPool(conv)
        name = f"_attack_conv_pool_{n_pairs}"
        n_pairs += 1
        gm.add_submodule(name, module)
        convs[convs.index(conv)] = module
        with graph.inserting_before(pool):
            new = graph.call_module(name, node.args)
        pool.replace_all_uses_with(new)
        graph.erase_node(pool)
        graph.erase_node(node)
    # ReLU of a value nothing else reads (a convolution's output, a residual sum, a pooled map): in place. The
    # attack's backward needs none of these values (a convolution saves its input, an addition nothing, a
    # max-pool its input and indices), so the saved allocation is all that changes.
    if INPLACE_RELU:
        mods = dict(gm.named_modules())
        for node in list(graph.nodes):
            if not _is_relu(node, mods) or len(node.args) != 1:
                continue
            src = node.args[0]
            if not (isinstance(src, fx.Node) and len(src.users) == 1 and _makes_fresh_tensor(src, mods)):
                continue
            with graph.inserting_before(node):
                new = graph.call_function(torch.relu_, (src,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.s2d_entry = _s2d_entry(gm)
    return gm, convs


def _s2d_entry(gm) -> _S2DEntry | None:
    """An :class:`_S2DEntry` for the rewrite ``gm`` when its one input feeds one space-to-depth layer only."""
    from torch import fx  # noqa: PLC0415

    mods = dict(gm.named_modules())
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    first = next(iter(inputs[0].users))
    if not (first.op == "call_module" and type(mods.get(first.target)) is _AttackConvPool
            and first.args == (inputs[0],) and not first.kwargs):
        return None
    pool = mods[first.target]
    graph = copy.deepcopy(gm.graph)
    inner = fx.GraphModule(gm, graph)
    inner.add_submodule("_attack_s2d_input", _S2DInput(pool))
    for node in graph.nodes:
        if node.op == "call_module" and node.target == first.target:
            node.target = "_attack_s2d_input"
    graph.lint()
    inner.recompile()
    return _S2DEntry(inner, pool)


_ATTACK_GRAPHS: PerModel[object] = PerModel(lambda model: _build_attack_graph(model) or False)


def attack_model(model: nn.Module) -> nn.Module:
    """The module the attacks differentiate: for a model in eval mode, its cached fx rewrite (see the module
    docstring) with the folded weights refreshed from the live parameters; otherwise ``model`` itself (a model
    in train mode, ``FAST_ATTACK`` off, or a model fx cannot trace). The rewrite shares the model's modules
    and parameters."""
    if not FAST_ATTACK or model.training:
        return model
    entry = _ATTACK_GRAPHS.get(model, False)  # False: fx cannot trace it, or it is not weak-referenceable
    if entry is False:
        return model
    gm, convs = entry
    for c in convs:
        c.refresh()
    return gm


# --------------------------------------------------------------------------------------------- chunks side by side

class _Workers:
    """``n`` daemon threads that run torch code on one intra-op thread each, one queue per thread."""

    def __init__(self, n: int):
        self.lock = threading.Lock()  # one split at a time; a second caller runs its batch whole
        self.queues: list[SimpleQueue] = [SimpleQueue() for _ in range(n)]
        ready = threading.Barrier(n + 1)
        outer = torch.get_num_threads()
        for q in self.queues:
            threading.Thread(target=self._loop, args=(q, ready), name="robprune-attack", daemon=True).start()
        ready.wait()
        # torch.set_num_threads also sets the count that threads started later begin with: put it back
        torch.set_num_threads(outer)

    @staticmethod
    def _loop(q: SimpleQueue, ready: threading.Barrier) -> None:
        # A thread takes torch's process-wide count at its first parallel region (get_num_threads triggers
        # that); only then does setting its own count to 1 stick.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while True:
            fut, fn, args = q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                fut.set_exception(e)

    def map(self, fn, chunks: list[tuple]) -> list:
        """``[fn(*c) for c in chunks]``, chunk i on thread i; waits for all before returning or raising."""
        futs = []
        for q, args in zip(self.queues, chunks):
            fut: Future = Future()
            q.put((fut, fn, args))
            futs.append(fut)
        errors = [f.exception() for f in futs]  # waits for every chunk, so none still runs after we return
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futs]


_WORKERS: dict[int, _Workers] = {}
_WORKERS_LOCK = threading.Lock()


def _forget_workers() -> None:
    """In a forked child: the workers' threads did not come along; the next split starts new ones."""
    global _WORKERS_LOCK
    _WORKERS.clear()
    _WORKERS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def split_chunks(n_examples: int, device: torch.device | str) -> int:
    """How many chunks the attacks cut a batch of ``n_examples`` on ``device`` into, called from this thread:
    one per intra-op thread on the CPU, with CPU autocast off (its state is per thread) and no chunk under
    ``SPLIT_MIN_CHUNK`` examples; else 1 (also for a model the fx rewrite does not cover, see :func:`_n_chunks`)."""
    if not SPLIT_ATTACK or torch.device(device).type != "cpu" or torch.is_autocast_enabled("cpu"):
        return 1
    return max(1, min(torch.get_num_threads(), n_examples // max(SPLIT_MIN_CHUNK, 1)))


def _n_chunks(net: nn.Module, model: nn.Module, x: Tensor) -> int:
    """:func:`split_chunks` for the fx rewrite ``net`` of ``model``; 1 for a model attacked as it is (it may
    hold hooks or state that are not safe across threads)."""
    return 1 if net is model else split_chunks(len(x), x.device)


def _split_run(fn, net: nn.Module, model: nn.Module, *batch: Tensor) -> Tensor:
    """``fn(net, *batch)`` for a per-example ``fn`` (row i of the result depends on row i of each batch
    tensor only): on the CPU cut into :func:`_n_chunks` chunks along the first dimension, each run on a worker
    thread with one intra-op thread, the results concatenated. Small layers on many threads leave oneDNN's
    parallel loops short of work; independent chunks keep every core busy, with the same results (see
    docs/performance.md). A worker runs its chunk in :func:`_pieces`, one after another."""
    n = _n_chunks(net, model, batch[0])
    if n == 1:
        return fn(net, *batch)
    with _WORKERS_LOCK:
        workers = _WORKERS.get(n)
        if workers is None:
            workers = _WORKERS[n] = _Workers(n)
    if not workers.lock.acquire(blocking=False):  # another thread is splitting a batch now
        return fn(net, *batch)
    try:
        chunks = list(zip(*(torch.tensor_split(t, n) for t in batch)))
        pieces = _pieces(net, batch[0], len(chunks[0][0]))

        def run(*chunk: Tensor) -> Tensor:
            if pieces == 1:
                return fn(net, *chunk)
            return torch.cat([fn(net, *piece) for piece in zip(*(torch.tensor_split(t, pieces) for t in chunk))])

        return torch.cat(workers.map(run, chunks))
    finally:
        workers.lock.release()


_EXAMPLE_BYTES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _example_bytes(net: nn.Module, x: Tensor) -> int:
    """Bytes of all node outputs of the fx rewrite ``net`` for one example shaped like ``x``'s rows (views
    and in-place results counted as well: an upper bound of what one forward keeps for its backward), found
    once per input shape by running the graph on one example; 0 if that fails."""
    key = (tuple(x.shape[1:]), x.dtype)
    cache = _EXAMPLE_BYTES.setdefault(net, {})
    if key not in cache:
        from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

        total = 0
        try:
            with torch.no_grad():
                ShapeProp(net).propagate(x[:1])
        except Exception:  # noqa: BLE001 - no estimate, no pieces: the attack itself reports real errors
            cache[key] = 0
            return 0
        for node in net.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if node.op.startswith("call") and isinstance(meta, TensorMetadata):
                total += meta.shape.numel() * meta.dtype.itemsize
        cache[key] = total
    return cache[key]


def _pieces(net: nn.Module, x: Tensor, chunk: int) -> int:
    """Into how many pieces a worker cuts a chunk of ``chunk`` rows of ``x``: the fewest whose forward
    activations stay within ``WORKER_PIECE_BYTES``, with no piece under ``SPLIT_MIN_CHUNK // 2`` rows.
    ResNet-18 w=4 (CIFAR, 1.4 MB per example): a 64-example chunk in 3 pieces. LeNet w=4 (MNIST, 36 KB per
    example): one piece. Timings and page faults: docs/performance.md."""
    if not WORKER_PIECE_BYTES or getattr(net, "graph", None) is None:
        return 1
    need = -(-chunk * _example_bytes(net, x) // WORKER_PIECE_BYTES)
    return max(1, min(need, chunk // max(SPLIT_MIN_CHUNK // 2, 1)))


