"""The fast paths compute what a plain loop computes (within float tolerance), and the benchmark runs.

* the attack's fx rewrite of the model (conv+BN folding, ReLU/max-pool swap, channels_last and space-to-depth
  conv + max-pool on the CPU, in-place ReLUs) gives the model's logits and input gradients, and PGD through it
  gives the adversarial examples of a plain eval-mode PGD;
* the attack split into chunks on worker threads (CPU) gives the adversarial examples of the whole batch;
* the ADMM penalty added as a gradient equals autograd through the penalty in the loss;
* a masked step equals a plain step followed by masking;
* the engine's projections equal numpy-based ones;
* the benchmark's reference loop trains like ours (same loss, same update) when nothing differs but its habits;
* ``robprune bench`` prints one JSON object with the expected keys.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robprune.engine.attacks.fastpath as attacks

from robprune.engine.admm import ADMM
from robprune.engine.attacks import attack
from robprune.engine.bench import ReferenceLoop, numpy_project, run_bench
from robprune.engine.config import PhaseConfig
from robprune.engine.models import build_model, prunable_parameters
from robprune.engine.pipeline import adversarial_step, make_optimizer, train_input
from robprune.engine.pruning import MaskedParams, apply_masks_, layer_scheme, project

# the package's attribute `pgd` is the function; the module is reached by its full name
pgd_mod = importlib.import_module("robprune.engine.attacks.pgd")

ARCHS = [("lenet", 2, 1, 28), ("vgg16", 1, 3, 32), ("resnet18", 2, 3, 32), ("wrn", 1, 3, 32)]


def _model(arch, width, ch, side, seed=0):
    torch.manual_seed(seed)
    m = build_model(arch, width, in_channels=ch, image_size=side, depth=10)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            m(torch.rand(16, ch, side, side))
    return m


def _data(n, ch, side, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, ch, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def _logits_and_grad(f, x, y):
    xa = x.clone().requires_grad_(True)
    out = f(xa)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xa)
    return out.detach(), g


def plain_pgd(model, x, y, *, eps, step_size, steps):
    """Madry PGD written plainly: model in eval mode, random start, signed steps, projection."""
    was = model.training
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        xa = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xa)
        x_adv = torch.min(torch.max(xa.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train(was)
    return x_adv.detach()


# ------------------------------------------------------------------------------------------------ the attack's model

@pytest.mark.parametrize("arch,width,ch,side", ARCHS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_attack_model_same_logits_and_input_gradients(arch, width, ch, side, channels_last):
    m = _model(arch, width, ch, side)
    x, y = _data(16, ch, side)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    m.eval()
    fast = attacks.attack_model(m)
    assert fast is not m  # every model of the registry is rewritten
    o0, g0 = _logits_and_grad(m, x, y)
    o1, g1 = _logits_and_grad(fast, x, y)
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * g0.abs().max().item())
    assert fast(x).shape == m(x).shape


def test_attack_model_follows_the_weights():
    """The folded weights are read again at every call: training between attacks is seen."""
    m = _model("resnet18", 1, 3, 32)
    x, y = _data(8, 3, 32)
    m.eval()
    attacks.attack_model(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.add_(0.1)
                mod.running_var.mul_(1.5)
    o0, _ = _logits_and_grad(m, x, y)
    o1, _ = _logits_and_grad(attacks.attack_model(m), x, y)
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)


def test_attack_model_only_in_eval_mode_and_switchable(monkeypatch):
    m = _model("vgg16", 1, 3, 32)
    m.train()
    assert attacks.attack_model(m) is m  # folding BN is only valid with running statistics
    m.eval()
    monkeypatch.setattr(attacks, "FAST_ATTACK", False)
    assert attacks.attack_model(m) is m


def test_relu_maxpool_swap_is_exact(monkeypatch):
    """LeNet has no BatchNorm: with the same memory format and space-to-depth off, the rewrite's logits and input
    gradients are bit-for-bit those of the model (max-pool then ReLU equals ReLU then max-pool, ties included)."""
    monkeypatch.setattr(attacks, "S2D_MAX_IN_CHANNELS", 0)
    m = _model("lenet", 2, 1, 28).to(memory_format=torch.channels_last).eval()
    x, y = _data(16, 1, 28)
    x = torch.where(x < 0.3, torch.zeros_like(x), x)  # ties: many exact zeros
    fast = attacks.attack_model(m)
    names = [str(n.target) for n in fast.graph.nodes]
    assert names.count("pool") == 2 and not any("conv_pool" in t for t in names)
    assert names.index("pool") < names.index(next(t for t in names[names.index("pool"):] if "relu" in t))
    o0, g0 = _logits_and_grad(m, x, y)
    o1, g1 = _logits_and_grad(fast, x, y)
    assert torch.equal(o0, o1)
    assert torch.equal(g0, g1)


def _assert_same_logits_and_grads(model, fast, x, y):
    o0, g0 = _logits_and_grad(model, x, y)
    o1, g1 = _logits_and_grad(fast, x, y)
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6 * g0.abs().max().item())
    return g0


def _conv_pool_modules(fast):
    return [m for m in fast.modules() if type(m) is attacks._AttackConvPool]


@pytest.mark.parametrize("side", [28, 27])
def test_space_to_depth_conv_pool(side):
    """An MNIST LeNet's first conv + 2x2 max-pool runs space-to-depth on the CPU: the same logits and input
    gradients as the model, with ties (runs of exact zeros) and on odd sizes (where it falls back)."""
    m = _model("lenet", 2, 1, side).eval()
    x, y = _data(16, 1, side)
    x = torch.where(x < 0.4, torch.zeros_like(x), x)
    fast = attacks.attack_model(m)
    (cp,) = _conv_pool_modules(fast)  # conv1 only: conv2 has 4 input channels
    assert cp.conv.pair[0] is m.conv1 and cp.weight is not None and cp.weight.shape == (4 * 4, 4, 3, 3)
    _assert_same_logits_and_grads(m, fast, x, y)


def test_space_to_depth_keeps_max_pools_rule_for_ties():
    """All-zero images: every output of the first conv equals its bias exactly, so every pooling window is a
    four-way tie. max_pool2d gives the gradient to the window's first (top-left) position; so must the
    space-to-depth path, or the input gradient would land on other pixels."""
    m = _model("lenet", 2, 1, 28).eval()
    with torch.no_grad():
        m.conv1.bias.copy_(torch.linspace(0.1, 0.4, m.conv1.out_channels))  # > 0: the ReLU passes gradients
    x = torch.zeros(8, 1, 28, 28)
    y = torch.arange(8) % 10
    fast = attacks.attack_model(m)
    assert len(_conv_pool_modules(fast)) == 1
    g0 = _assert_same_logits_and_grads(m, fast, x, y)
    assert g0.abs().sum() > 0


def test_space_to_depth_only_where_it_pays(monkeypatch):
    """Three input channels (CIFAR) keep the plain conv; with the switch at 0 no layer is rearranged; with it at
    8 both of LeNet's conv + pool pairs are, and the result is still the model's."""
    assert _conv_pool_modules(attacks.attack_model(_model("lenet", 2, 3, 32).eval())) == []
    monkeypatch.setattr(attacks, "S2D_MAX_IN_CHANNELS", 0)
    assert _conv_pool_modules(attacks.attack_model(_model("lenet", 2, 1, 28).eval())) == []
    monkeypatch.setattr(attacks, "S2D_MAX_IN_CHANNELS", 8)
    m = _model("lenet", 2, 1, 28).eval()
    fast = attacks.attack_model(m)
    assert [cp.conv.pair[0] for cp in _conv_pool_modules(fast)] == [m.conv1, m.conv2]
    x, y = _data(16, 1, 28)
    _assert_same_logits_and_grads(m, fast, x, y)


@pytest.mark.parametrize("side", [28, 27])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_iterating_space_to_depth_gives_the_same_examples(side, restarts, monkeypatch):
    """An MNIST LeNet's input feeds its space-to-depth layer only, so PGD rearranges the batch once and iterates
    in that layout (S2D_INPUT). Its adversarial examples are bit for bit those of rearranging in every iteration,
    ties included; on an odd size (no space-to-depth) nothing changes either."""
    m = _model("lenet", 2, 1, side).eval()
    x, y = _data(24, 1, side)
    x = torch.where(x < 0.4, torch.zeros_like(x), x)
    entry = attacks.attack_model(m).s2d_entry
    assert entry is not None and entry.applies(x) == (side == 28)
    calls = []
    real = attacks._S2DInput.forward
    monkeypatch.setattr(attacks._S2DInput, "forward", lambda self, xs: calls.append(xs.shape) or real(self, xs))
    pgd_mod.pgd(m, x, y, eps=0.3, step_size=0.05, steps=1)  # both graphs made and used with these weights ...
    with torch.no_grad():  # ... then training moves them: the second graph shares the first one's layers
        m.conv1.weight.mul_(1.5)
        m.fc1.bias.add_(0.1)
    calls.clear()
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(attacks, "S2D_INPUT", flag)
        torch.manual_seed(3)
        out[flag] = pgd_mod.pgd(m, x, y, eps=0.3, step_size=0.05, steps=4, restarts=restarts)
        n_calls, calls[:] = len(calls), []
        # 4 steps per restart, and with restarts one forward per restart to see which examples it fooled
        assert n_calls == ((4 + (restarts > 1)) * restarts if flag and side == 28 else 0)
    assert out[True].shape == x.shape and out[True].is_contiguous()
    assert torch.equal(out[True], out[False])
    assert (out[True] - x).abs().max() <= 0.3 + 1e-6


def test_space_to_depth_entry_only_where_the_input_feeds_that_layer_alone():
    """CIFAR-shaped models have no space-to-depth layer, so no entry; an MNIST LeNet has one."""
    assert attacks.attack_model(_model("lenet", 2, 3, 32).eval()).s2d_entry is None
    assert attacks.attack_model(_model("resnet18", 1, 3, 32).eval()).s2d_entry is None
    assert attacks.attack_model(_model("resnet18", 1, 1, 28).eval()).s2d_entry is None  # its stem has no pool
    assert attacks.attack_model(_model("lenet", 2, 1, 28).eval()).s2d_entry is not None


def test_inplace_relus_leave_the_model_alone():
    """The rewrite's in-place ReLUs act on its own fresh tensors: ResNet's block outputs use relu_, the
    model's parameters and buffers are untouched by an attack, and two calls give the same result."""
    m = _model("resnet18", 2, 3, 32).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = attacks.attack_model(m)
    assert sum(1 for n in fast.graph.nodes if n.target is torch.relu_) >= 9  # stem + 2 per block
    x, y = _data(8, 3, 32)
    o1, g1 = _logits_and_grad(fast, x, y)
    o2, g2 = _logits_and_grad(fast, x, y)
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def _ours_and_plain_pgd(m, x, y, seed):
    """The engine's PGD and :func:`plain_pgd`, each from RNG seed ``seed``, with the same settings."""
    torch.manual_seed(seed)
    ours = pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=5)
    torch.manual_seed(seed)
    return ours, plain_pgd(m, x, y, eps=0.1, step_size=0.02, steps=5)


def test_pgd_plain_path_is_the_plain_loop(monkeypatch):
    """With the rewrite off, the engine's PGD (in-place projection) is bit-for-bit a plain PGD loop."""
    monkeypatch.setattr(attacks, "FAST_ATTACK", False)
    for arch, width, ch, side in ARCHS[:3]:
        m = _model(arch, width, ch, side)
        x, y = _data(16, ch, side)
        ours, ref = _ours_and_plain_pgd(m, x, y, seed=5)
        assert torch.equal(ours, ref), arch
        assert m.training  # mode restored


@pytest.mark.parametrize("arch,width,ch,side", ARCHS)
def test_pgd_fast_path_same_adversarial_examples(arch, width, ch, side):
    """Same RNG seed, ours (fast path) vs a plain eval-mode PGD: the same adversarial examples. Folding BN
    changes float rounding, and sign() turns a rounding-level change of a near-zero gradient entry into a
    different step for that pixel, so a few pixels may differ; the attack's strength does not."""
    m = _model(arch, width, ch, side)
    x, y = _data(32, ch, side)
    ours, ref = _ours_and_plain_pgd(m, x, y, seed=7)
    same = (ours == ref).float().mean().item()
    assert same >= 0.98, same
    assert (ours - x).abs().max() <= 0.1 + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    m.eval()
    with torch.no_grad():
        l_ours = F.cross_entropy(m(ours), y).item()
        l_ref = F.cross_entropy(m(ref), y).item()
    assert l_ours == pytest.approx(l_ref, rel=0.02, abs=1e-4)


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def _spy_chunks(monkeypatch, name):
    """Record the thread each call of ``pgd.<name>`` runs on."""
    seen = []
    real = getattr(pgd_mod, name)

    def spy(*a, **k):
        seen.append((threading.current_thread().name, threading.get_ident()))
        return real(*a, **k)

    monkeypatch.setattr(pgd_mod, name, spy)
    return seen


@pytest.mark.parametrize("arch,width,ch,side", ARCHS)
def test_split_attack_equals_whole_batch(arch, width, ch, side, two_threads, monkeypatch):
    """On the CPU with 2 threads the attacks run the batch as 2 chunks on worker threads; the adversarial
    examples are those of the whole batch (PGD with one and with three restarts, FGSM-RS). Bit for bit where
    oneDNN computes each example the same way whatever the batch size (so far everywhere); the bound allows
    rounding-level differences, while pairing a chunk with the wrong labels or starts would change most pixels."""
    m = _model(arch, width, ch, side)
    x, y = _data(40, ch, side)
    seen = _spy_chunks(monkeypatch, "_pgd_chunk")
    for kind, restarts in (("pgd", 1), ("pgd", 3), ("fgsm-rs", 1)):
        outs = []
        for split in (False, True):
            monkeypatch.setattr(attacks, "SPLIT_ATTACK", split)
            torch.manual_seed(11)
            outs.append(attack(m, x, y, kind=kind, eps=0.1, step_size=0.02, steps=4, restarts=restarts))
            assert m.training  # mode restored
        whole, split_ = outs
        assert (whole == split_).float().mean().item() >= 0.999, (kind, restarts)
        assert (split_ - x).abs().max() <= 0.1 + 1e-6 and split_.min() >= 0 and split_.max() <= 1
    # per PGD run, whole batch: one call on this thread; split: one call on each of two worker threads
    here = (threading.current_thread().name, threading.get_ident())
    assert len(seen) == 6 and seen[0] == seen[3] == here
    for workers in (seen[1:3], seen[4:6]):
        assert len(set(workers)) == 2 and all(name == "robprune-attack" for name, _ in workers)
    assert torch.get_num_threads() == 2


def test_workers_run_chunks_in_pieces_that_fit_the_byte_budget(two_threads, monkeypatch):
    """A worker cuts its chunk into the fewest pieces whose forward activations fit WORKER_PIECE_BYTES (no piece
    under SPLIT_MIN_CHUNK // 2 rows); the adversarial examples stay those of the whole batch. The estimate
    per example is checked against the activations counted by hand for a ResNet-18 w=1 rewrite."""
    m = _model("resnet18", 1, 3, 32)
    x, y = _data(64, 3, 32)
    net = attacks.attack_model(m.eval())
    per_example = attacks._example_bytes(net, x)
    # by hand: every node output of the rewrite, one example, float32
    with torch.no_grad():
        sizes = []
        hooks = [mod.register_forward_hook(lambda mod, a, o: sizes.append(o.numel() * 4))
                 for mod in net.modules() if mod is not net and not list(mod.children())]
        net(x[:1])
        for h in hooks:
            h.remove()
    assert per_example >= sum(sizes) > 0
    m.train()
    monkeypatch.setattr(attacks, "WORKER_PIECE_BYTES", 5 * per_example)  # 32-row chunks -> 7 pieces of 4-5 rows
    monkeypatch.setattr(attacks, "SPLIT_MIN_CHUNK", 8)
    assert attacks._pieces(net, x, 32) == 7 and attacks._pieces(net, x, 3) == 1
    monkeypatch.setattr(attacks, "WORKER_PIECE_BYTES", 8 * per_example)  # 4 pieces of 8 rows
    assert attacks._pieces(net, x, 32) == 4
    outs = []
    for split in (False, True):
        monkeypatch.setattr(attacks, "SPLIT_ATTACK", split)
        seen = _spy_chunks(monkeypatch, "_pgd_chunk")
        torch.manual_seed(5)
        outs.append(pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=3))
        assert len(seen) == (8 if split else 1)
        if split:
            assert {name for name, _ in seen} == {"robprune-attack"} and len({t for _, t in seen}) == 2
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setattr(attacks, "WORKER_PIECE_BYTES", 0)
    assert attacks._pieces(net, x, 32) == 1


def test_split_attack_keeps_thread_counts_and_small_batches_whole(two_threads, monkeypatch):
    """Workers run on one intra-op thread each; the caller, and threads started later, keep theirs. Batches
    under two chunks of SPLIT_MIN_CHUNK, and any batch when the caller has one intra-op thread, run whole on
    the caller's thread."""
    m = _model("lenet", 2, 1, 28)
    counts = []
    real = pgd_mod._pgd_chunk

    def spy(*a, **k):
        counts.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*a, **k)

    monkeypatch.setattr(pgd_mod, "_pgd_chunk", spy)
    x, y = _data(2 * attacks.SPLIT_MIN_CHUNK, 1, 28)
    assert attacks.split_chunks(len(x), "cpu") == 2 and attacks.split_chunks(len(x) - 1, "cpu") == 1
    assert attacks.split_chunks(len(x), "cuda") == 1 and attacks.split_chunks(1000, "cpu") == 2
    pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=1)
    assert sorted(c for _, c in counts) == [1, 1] and all(n == "robprune-attack" for n, _ in counts)
    assert torch.get_num_threads() == 2
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]
    counts.clear()
    pgd_mod.pgd(m, x[:-1], y[:-1], eps=0.1, step_size=0.02, steps=1)  # one example short of two chunks
    torch.set_num_threads(1)
    pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=1)
    assert counts == [(threading.current_thread().name, 2), (threading.current_thread().name, 1)]


def test_split_attack_error_reaches_the_caller_and_workers_stay_usable(two_threads, monkeypatch):
    m = _model("lenet", 2, 1, 28)
    x, y = _data(40, 1, 28)
    real = pgd_mod._pgd_chunk

    def fail_on_workers(*a, **k):
        if threading.current_thread().name == "robprune-attack":
            raise RuntimeError("chunk failed")
        return real(*a, **k)

    monkeypatch.setattr(pgd_mod, "_pgd_chunk", fail_on_workers)
    with pytest.raises(RuntimeError, match="chunk failed"):
        pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=2)
    assert m.training
    monkeypatch.setattr(pgd_mod, "_pgd_chunk", real)
    torch.manual_seed(3)
    split_ = pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=2)
    # while another caller holds the workers, a batch runs whole on its own thread, with the same result
    workers = attacks._WORKERS[2]
    seen = _spy_chunks(monkeypatch, "_pgd_chunk")
    with workers.lock:
        torch.manual_seed(3)
        whole = pgd_mod.pgd(m, x, y, eps=0.1, step_size=0.02, steps=2)
    assert seen == [(threading.current_thread().name, threading.get_ident())]
    assert (whole == split_).float().mean().item() >= 0.999


# ------------------------------------------------------------------------------------------------ ADMM and masks

def _admm_setup(m, rho=0.5):
    params = prunable_parameters(m)
    ratios = {k: 0.8 for k in params}
    schemes = {k: layer_scheme(p, "irregular", "irregular") for k, p in params.items()}
    admm = ADMM(params, ratios, schemes, rho)
    with torch.no_grad():  # a non-zero U and a rho per layer, as after some updates
        for i, k in enumerate(admm.U):
            admm.U[k].normal_(0, 0.01)
            admm.rho[k] = rho * (i + 1)
    return params, admm


def test_penalty_gradient_equals_autograd_of_penalty():
    m = _model("resnet18", 1, 3, 32)
    params, admm = _admm_setup(m)
    x, y = _data(8, 3, 32)
    F.cross_entropy(m(x), y).backward()
    base = {k: p.grad.clone() for k, p in params.items()}
    admm.add_penalty_grad()
    fast = {k: p.grad.clone() for k, p in params.items()}
    grads = torch.autograd.grad(admm.penalty(), list(admm.params.values()))
    for (k, g) in zip(admm.params, grads):
        torch.testing.assert_close(fast[k], base[k] + g, rtol=1e-5, atol=1e-7)


def test_adversarial_step_with_admm_equals_plain_loop():
    """adversarial_step (penalty as a gradient, fast attack) against a plain loop (plain PGD in eval mode, the
    penalty in the loss): same loss, same weights after the update."""
    m = _model("lenet", 2, 1, 28)
    ref = copy.deepcopy(m)
    _, admm = _admm_setup(m)
    rparams = prunable_parameters(ref)
    x, y = _data(16, 1, 28)
    pc = PhaseConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = make_optimizer(pc, m.parameters(), torch.device("cpu"))
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        torch.manual_seed(100 + step)
        loss, _ = adversarial_step(m, m, opt, x, y, kind="pgd", eps=0.2, step_size=0.05, steps=4, admm=admm)
        torch.manual_seed(100 + step)
        xa = plain_pgd(ref, x, y, eps=0.2, step_size=0.05, steps=4)
        ref.train()
        rloss = F.cross_entropy(ref(xa), y)
        total = rloss + sum(admm.rho[k] / 2 * (rparams[k] - admm.Z[k] + admm.U[k]).pow(2).sum() for k in admm.Z)
        ropt.zero_grad()
        total.backward()
        ropt.step()
        assert loss.item() == pytest.approx(rloss.item(), rel=1e-5)
        for (k, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("arch,width,ch,side,expect_cl", [
    ("resnet18", 2, 3, 32, True), ("lenet", 2, 1, 28, True), ("vgg16", 2, 3, 32, True),
    ("resnet18", 1, 3, 32, False)])
def test_training_forward_takes_channels_last_on_the_cpu_and_trains_like_nchw(arch, width, ch, side, expect_cl):
    """On the CPU the training forward gets its batch in channels_last (also a 1-channel one, whose plain
    strides would pass for it), except for a model oneDNN crashes on there (ResNet-18 w=1's 1x1 stride-2
    shortcuts with 4 input channels), which gets it as it is. Oracle: a plain step of the same model in
    float64. The loss and BatchNorm's running statistics match to float32 rounding. Gradients are compared by
    direction and by their largest error against the layer's largest gradient: a ReLU whose input lies within
    rounding of zero can go either way in any float32 summation order (at ResNet-18 w=2's initial weights one
    does, in layer3.0's first BatchNorm, |x| = 1.4e-6, and moves that layer's gradient by 0.3% of its
    largest entry); a wrong layout would move every gradient by its own size."""
    m = _model(arch, width, ch, side)
    ref = copy.deepcopy(m).double()
    seen = []
    first = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    hook = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
    x, y = _data(16, ch, side)
    if not expect_cl:  # checked before any step: channels_last here would corrupt the heap, not fail a test
        assert train_input(m, x) is x
    opt = make_optimizer(PhaseConfig(optimizer="sgd", lr=0.05), m.parameters(), torch.device("cpu"))
    try:
        loss, _ = adversarial_step(m, m, opt, x, y, kind="none", eps=0.0, step_size=0.0, steps=0)
    finally:
        hook.remove()
    ref.train()
    rloss = F.cross_entropy(ref(x.double()), y)
    rloss.backward()
    assert loss.item() == pytest.approx(rloss.item(), rel=1e-5)
    for (k, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        g, rg = p.grad.double().flatten(), q.grad.flatten()
        assert torch.cosine_similarity(g, rg, dim=0).item() > 0.999, k
        assert ((g - rg).abs().max() / rg.abs().max()).item() < 0.02, k
        assert p.is_contiguous(), k  # the weights keep their own format
    for (k, b), (_, rb) in zip(m.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b.double(), rb.double(), rtol=1e-5, atol=1e-6, msg=k)
    cl_strides = (ch * side * side, 1, side * ch, ch)
    plain = (ch * side * side, side * side, side, 1)
    assert seen == [cl_strides if expect_cl else plain]


def test_masked_step_equals_plain_step_then_masking():
    m = _model("resnet18", 2, 3, 32)
    ref = copy.deepcopy(m)
    params, rparams = prunable_parameters(m), prunable_parameters(ref)
    masks = {}
    with torch.no_grad():
        for k, p in params.items():
            projected, masks[k] = project(p, "irregular", 0.7)
            p.copy_(projected)
            rparams[k].copy_(projected)
    masked = MaskedParams(params, masks).attach()
    x, y = _data(8, 3, 32)
    pc = PhaseConfig(optimizer="adam", lr=1e-2, weight_decay=1e-4)
    opt = make_optimizer(pc, m.parameters(), torch.device("cpu"))
    ropt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=1e-4)
    try:
        for step in range(3):
            torch.manual_seed(step)
            xa = pgd_mod.pgd(m, x, y, eps=0.05, step_size=0.02, steps=2)
            # ours: hooks mask the gradients, after_step re-applies the masks
            adversarial_step(m, m, opt, xa, y, kind="none", eps=0.0, step_size=0.0, steps=0, masked=masked)
            # plain: an unmasked step, then masking (the batch in the layout ours trains on: Adam's first steps
            # are about lr * sign(grad), so float32 rounding in another summation order moves single weights
            # by 2 lr; that the layouts train alike is test_training_forward_takes_channels_last_on_the_cpu...)
            ref.train()
            ropt.zero_grad()
            F.cross_entropy(ref(train_input(ref, xa)), y).backward()
            ropt.step()
            apply_masks_(rparams, masks)
            for (k, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
                if k in masks:  # the kept weights move alike; the pruned ones are exactly zero in both
                    torch.testing.assert_close(p[masks[k]], q[masks[k]], rtol=1e-5, atol=1e-6, msg=k)
                    assert not p[~masks[k]].any() and not q[~masks[k]].any()
                else:
                    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    finally:
        masked.detach()


@pytest.mark.parametrize("scheme", ["irregular", "filter", "column"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9])
def test_projection_equals_numpy_projection(scheme, ratio):
    g = torch.Generator().manual_seed(3)
    for shape in [(16, 8, 3, 3), (10, 40), (8, 1, 5, 5)]:
        w = torch.randn(shape, generator=g)
        w[0] = 0.0  # ties at zero
        w.view(-1)[5:25] = 0.125  # ties away from zero
        projected, mask = project(w, scheme, ratio)
        np_projected, np_mask = numpy_project(w, scheme, ratio)
        assert torch.equal(projected, np_projected), (shape, scheme, ratio)
        assert torch.equal(mask, np_mask.bool()), (shape, scheme, ratio)


# ------------------------------------------------------------------------------------------------ the benchmark

def test_reference_loop_trains_like_ours_without_its_habits():
    """On LeNet (no BatchNorm, so train-mode PGD is eval-mode PGD) the reference loop's step -- extra natural
    forward, penalty in the loss, .item() -- reaches the same loss and weights as adversarial_step."""
    m = _model("lenet", 1, 1, 28)
    ref = copy.deepcopy(m)
    _, admm = _admm_setup(m, rho=0.3)
    radmm = {"rho": dict(admm.rho), "Z": {k: z.clone() for k, z in admm.Z.items()},
             "U": {k: u.clone() for k, u in admm.U.items()}}
    opt = make_optimizer(PhaseConfig(optimizer="sgd", lr=0.05), m.parameters(), torch.device("cpu"))
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loop = ReferenceLoop(ref, ropt, kind="pgd", eps=0.2, step_size=0.05, steps=3, admm=radmm)
    x, y = _data(16, 1, 28)
    for step in range(2):
        torch.manual_seed(step)
        loss, _ = adversarial_step(m, m, opt, x, y, kind="pgd", eps=0.2, step_size=0.05, steps=3, admm=admm)
        torch.manual_seed(step)
        loop.step(x, y)
        assert loss.item() == pytest.approx(loop.log[-1][1], rel=1e-5)
        for (k, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


RESULT_KEYS = {"train_images_per_s", "train_images_per_s_runs", "eval_images_per_s", "peak_memory_bytes",
               "device", "device_name", "torch", "settings"}


@pytest.mark.parametrize("phase", ["pretrain", "admm", "retrain"])
def test_run_bench_phases(phase):
    r = run_bench(model="resnet18", width=1, batch=4, steps=1, phase=phase, device="cpu", repeats=2, warmup=1,
                  iters=1, baseline=True, eval_batches=1)
    assert RESULT_KEYS <= set(r)
    assert len(r["train_images_per_s_runs"]) == 2 and len(r["baseline_images_per_s_runs"]) == 2
    assert r["speedup"] == pytest.approx(r["train_images_per_s"] / r["baseline_images_per_s"])
    assert r["settings"]["phase"] == phase and r["settings"]["input_shape"] == [3, 32, 32]
    assert r["settings"]["attack_chunks"] == 1  # 4 examples: under two chunks of SPLIT_MIN_CHUNK
    assert r["page_faults_per_step"] >= 0 and r["baseline_page_faults_per_step"] >= 0


def test_run_bench_counts_the_flops_of_split_attacks_and_of_the_reference(two_threads):
    """FLOPs per step, counted through a dispatch mode that sees its own thread's ops only: with two threads the
    attack runs as two chunks on worker threads, and the count must still include them. Oracle: the reference
    loop does the same convolutions and matmuls as ours (its attack in train mode, ours through the folded
    rewrite; CIFAR input, so no space-to-depth) plus one natural forward per step, counted here apart with
    torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 32  # two chunks of SPLIT_MIN_CHUNK
    r = run_bench(model="resnet18", width=1, batch=batch, steps=2, phase="admm", device="cpu", repeats=1,
                  warmup=1, iters=1, baseline=True, eval_batches=0, threads=2)
    assert r["settings"]["attack_chunks"] == 2
    net = build_model("resnet18", 1, in_channels=3, image_size=32)
    with FlopCounterMode(display=False) as fc:
        net(torch.rand(batch, 3, 32, 32))
    forward = fc.get_total_flops()
    assert forward > 0
    assert r["baseline_flop_per_step"] - r["train_flop_per_step"] == forward
    # ours: 2 attack iterations (forward + input gradient) and a training forward and backward: well over
    # three forwards' worth; without the worker threads' ops it would be the training step's alone
    assert r["train_flop_per_step"] > 5 * forward
    assert r["train_tflop_per_s"] == pytest.approx(r["train_flop_per_step"] * r["train_images_per_s"] / batch / 1e12)
    assert r["baseline_tflop_per_s"] == pytest.approx(
        r["baseline_flop_per_step"] * r["baseline_images_per_s"] / batch / 1e12)
    assert r["matmul_dtype"] == "float32" and r["matmul_tflop_per_s"] > 0
    assert r["train_fraction_of_matmul"] == pytest.approx(r["train_tflop_per_s"] / r["matmul_tflop_per_s"])
    assert r["baseline_fraction_of_matmul"] == pytest.approx(r["baseline_tflop_per_s"] / r["matmul_tflop_per_s"])
    assert attacks.SPLIT_ATTACK is True  # counting turned the split off for its own pass only


def test_minor_faults_count_fresh_pages():
    from robprune.engine.bench import _minor_faults

    before = _minor_faults()
    buf = np.empty(64 << 20, dtype=np.uint8)  # above glibc's largest mmap threshold: fresh pages from the OS
    buf[::4096] = 1  # touch every 4 KiB page
    after = _minor_faults()
    # 16384 faults with 4 KiB pages; 32 if the kernel backs the buffer with 2 MiB transparent huge pages
    assert after - before >= 32


def test_run_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="model"):
        run_bench(model="resnet50")
    with pytest.raises(ValueError, match="channels_last"):
        run_bench(model="resnet18", width=1, device="cpu", channels_last=True)


def test_run_bench_refuses_a_model_that_cannot_fit_before_allocating_it(monkeypatch):
    """The estimate counts parameters on the meta device: a LeNet of width 512 (3.3 billion parameters) is refused
    in one line naming --width and --batch, the count and the memory, instead of a failed allocation."""
    from robprune.engine import bench
    from robprune.engine.resources import model_memory

    # the count against a real model's: LeNet w=4 has 206,954 parameters (every profile's summary says so)
    assert model_memory("lenet", 4, num_classes=10, in_channels=1, image_size=28) == (206_954, 206_954 * 29)
    n, need = model_memory("lenet", 512, num_classes=10, in_channels=1, image_size=28)
    assert 3.3e9 < n < 3.4e9 and need == n * 29
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("built a model that cannot fit"))
    monkeypatch.setattr(bench, "memory_available", lambda dev: (64 << 30, "the test's memory"))  # any machine
    with pytest.raises(ValueError) as e:
        run_bench(model="lenet", width=512, batch=16, device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"--width 512, --batch 16: lenet has {n:,} parameters") and "GiB" in msg, msg
    assert "\n" not in msg and msg.endswith("expected a model and batch that fit in the test's memory (64.0 GiB)")


def test_channels_last_hazard_names_the_conv_and_its_stride():
    from robprune.engine.models import cpu_channels_last_hazard

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 8, 1, stride=3))
    msg = cpu_channels_last_hazard(net)
    assert msg is not None and "1x1 stride-3 conv 1 " in msg
    assert "stride-2x3 conv 0" in cpu_channels_last_hazard(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1, stride=(2, 3))))
    assert cpu_channels_last_hazard(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1, stride=2))) is None  # 8 channels


def test_cli_bench_prints_one_json_object():
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "robprune", "bench", "--model", "lenet", "--width", "1", "--batch", "8",
                        "--steps", "2", "--repeats", "1", "--warmup", "1", "--iters", "1", "--baseline"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert RESULT_KEYS | {"baseline_images_per_s", "speedup"} <= set(out)
    s = out["settings"]
    assert (s["model"], s["width"], s["batch"], s["steps"], s["phase"], s["attack"]) == ("lenet", 1, 8, 2, "admm", "pgd")
    assert out["train_images_per_s"] > 0 and out["baseline_images_per_s"] > 0 and out["peak_memory_bytes"] > 0


def test_datasheet_peak_matches_cards_by_whole_name():
    """The bench reads the achieved TFLOP/s against the card's dense datasheet peak; the card is found by its
    CUDA device name, a variant before its family, whole words only."""
    from robprune.engine.bench import datasheet_peak

    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4  # SXM5
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert datasheet_peak("NVIDIA H100 PCIe", "tf32") == 378.0  # not the SXM5's numbers
    assert datasheet_peak("NVIDIA H100 NVL", "tf32") is None
    assert datasheet_peak("NVIDIA H200", "bfloat16") == 989.4
    assert datasheet_peak("NVIDIA H200 NVL", "bfloat16") == 835.5
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "float32") == 19.5
    assert datasheet_peak("NVIDIA A100 80GB PCIe", "tf32") == 156.0
    assert datasheet_peak("NVIDIA L40S", "tf32") == 183.0
    assert datasheet_peak("NVIDIA L4", "bfloat16") == 121.0
    assert datasheet_peak("NVIDIA A10", "bfloat16") == 125.0
    assert datasheet_peak("NVIDIA A10G", "bfloat16") is None  # not an A10
    assert datasheet_peak("NVIDIA RTX A1000", "tf32") is None  # not an A100
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "float16") is None  # a dtype not listed
    assert datasheet_peak("AMD EPYC (2 threads)", "float32") is None


def test_run_bench_on_the_cpu_reports_no_datasheet_peak():
    r = run_bench(model="lenet", width=1, batch=4, steps=1, phase="pretrain", device="cpu", repeats=1, warmup=0,
                  iters=1, baseline=True, eval_batches=0)
    assert r["device_peak_tflop_per_s"] is None
    assert "train_fraction_of_peak" not in r and "baseline_fraction_of_peak" not in r
    assert r["train_fraction_of_matmul"] > 0  # the measured matmul rate is still there to read against


def test_rate_fractions_read_each_loop_against_its_own_precision():
    """With --bf16 on CUDA ours computes in bfloat16 and the reference loop in float32 (TF32): each loop's TFLOP/s
    is divided by the matmul rate and the datasheet peak of its own dtype. Made-up rates on an H100 SXM5
    (datasheet: TF32 494.7, bfloat16 989.4)."""
    from robprune.engine.bench import rate_fractions

    r = rate_fractions({"train": 300.0, "baseline": 100.0}, {"train": (600.0, "bfloat16"), "baseline": (400.0, "tf32")},
                       "NVIDIA H100 80GB HBM3")
    assert (r["matmul_tflop_per_s"], r["matmul_dtype"], r["device_peak_tflop_per_s"]) == (600.0, "bfloat16", 989.4)
    assert (r["baseline_matmul_tflop_per_s"], r["baseline_matmul_dtype"],
            r["baseline_device_peak_tflop_per_s"]) == (400.0, "tf32", 494.7)
    assert r["train_fraction_of_matmul"] == pytest.approx(0.5)
    assert r["train_fraction_of_peak"] == pytest.approx(300.0 / 989.4)
    assert r["baseline_fraction_of_matmul"] == pytest.approx(0.25)  # not 100 / 600: the bf16 rate
    assert r["baseline_fraction_of_peak"] == pytest.approx(100.0 / 494.7)  # not 100 / 989.4

    # without --bf16 both loops share one rate and one peak
    same = (400.0, "tf32")
    r = rate_fractions({"train": 200.0, "baseline": 100.0}, {"train": same, "baseline": same}, "NVIDIA H100 80GB HBM3")
    assert r["train_fraction_of_matmul"] == pytest.approx(0.5)
    assert r["baseline_fraction_of_matmul"] == pytest.approx(0.25)
    assert r["train_fraction_of_peak"] == pytest.approx(200.0 / 494.7)

    # the CPU: no device name, no peak; a failed matmul (None) or an uncounted loop: no fraction, no error
    r = rate_fractions({"train": 0.1, "baseline": None}, {"train": (0.2, "float32"), "baseline": (None, "float32")},
                       None)
    assert r["device_peak_tflop_per_s"] is None and r["baseline_device_peak_tflop_per_s"] is None
    assert r["train_fraction_of_matmul"] == pytest.approx(0.5)
    assert not {"train_fraction_of_peak", "baseline_fraction_of_matmul", "baseline_fraction_of_peak"} & set(r)
    # no baseline timed: no baseline keys at all
    alone = rate_fractions({"train": 1.0}, {"train": (2.0, "tf32")}, "NVIDIA A100")
    assert not any(k.startswith("baseline") for k in alone)


def test_run_bench_bf16_on_the_cpu_is_not_used_and_both_loops_share_the_float32_rate():
    r = run_bench(model="lenet", width=1, batch=4, steps=1, phase="pretrain", device="cpu", repeats=1, warmup=0,
                  iters=1, baseline=True, eval_batches=0, bf16=True)
    assert r["settings"]["bf16"] is False and r["settings"]["bf16_requested"] is True
    assert r["matmul_dtype"] == r["baseline_matmul_dtype"] == "float32"
    assert r["baseline_matmul_tflop_per_s"] == r["matmul_tflop_per_s"] > 0  # one measurement serves both
    assert r["baseline_fraction_of_matmul"] == pytest.approx(r["baseline_tflop_per_s"] / r["matmul_tflop_per_s"])
