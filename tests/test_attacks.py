"""PGD / FGSM-RS: inside the eps-ball and [0, 1], eval-mode semantics, and real strength on a trained model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robprune.engine.attacks import fastpath
from robprune.engine.attacks import attack, evaluate, fgsm_rs, pgd
from robprune.engine.models import build_model
from tests.conftest import trained_digits_lenet


@pytest.fixture(scope="module")
def trained_lenet():
    """LeNet w=2 trained naturally for 2 epochs on the embedded digits (a few seconds on the CPU)."""
    return trained_digits_lenet(epochs=2, lr=3e-3, n_test=300)


def test_pgd_stays_in_eps_ball_and_unit_range(trained_lenet):
    model, x, y = trained_lenet
    for eps in (0.05, 0.3):
        xa = pgd(model, x, y, eps=eps, step_size=0.05, steps=5)
        assert (xa - x).abs().max().item() <= eps + 1e-6
        assert xa.min().item() >= 0.0 and xa.max().item() <= 1.0
        assert (xa - x).abs().max().item() > 0.5 * eps  # it really moved


def test_fgsm_rs_stays_in_eps_ball_and_unit_range(trained_lenet):
    model, x, y = trained_lenet
    xa = fgsm_rs(model, x, y, eps=0.3, step_size=0.375)
    assert (xa - x).abs().max().item() <= 0.3 + 1e-6
    assert 0.0 <= xa.min().item() and xa.max().item() <= 1.0


def test_pgd_lowers_accuracy_of_a_trained_model(trained_lenet):
    model, x, y = trained_lenet
    torch.manual_seed(1)
    nat, adv = evaluate(model, x, y, kind="pgd", eps=0.3, step_size=0.01, steps=40)
    _, fgsm = evaluate(model, x, y, kind="fgsm-rs", eps=0.3, step_size=0.375, steps=1)
    assert nat >= 0.85, nat  # the natural model works...
    assert adv <= 0.05, adv  # ...and PGD-40 at eps 0.3 breaks a naturally trained net (paper Table 2: 0.00%)
    assert adv <= fgsm  # PGD is at least as strong as one FGSM step


def test_more_restarts_never_weaker(trained_lenet):
    model, x, y = trained_lenet
    torch.manual_seed(3)
    _, one = evaluate(model, x, y, kind="pgd", eps=0.1, step_size=0.02, steps=5, restarts=1)
    torch.manual_seed(3)  # the first restart repeats the single run, so the worst case can only be lower
    _, three = evaluate(model, x, y, kind="pgd", eps=0.1, step_size=0.02, steps=5, restarts=3)
    assert three <= one


def _reference_pgd(model, x, y, eps, step_size, steps):
    """An independent, plain PGD without random start (Madry et al.), written from the paper's formula."""
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        loss.backward()
        with torch.no_grad():
            xa = xa + step_size * xa.grad.sign()
            xa = torch.clamp(torch.clamp(xa, x - eps, x + eps), 0, 1)
        model.zero_grad()
    return xa.detach()


def test_pgd_matches_reference_without_random_start(trained_lenet, monkeypatch):
    """With the attack's model rewrite off, our PGD is the reference's, pixel for pixel. With it on, the
    space-to-depth first layer changes float rounding (logits within 1e-7); where two values of a pooling window
    are within rounding of each other the other one can win, which sends that window's gradient to other pixels
    (0.014% of the signs of the first step here), and the difference grows over the steps. Nearly every pixel is
    the same, and the attack's strength is."""
    model, x, y = trained_lenet
    ref = _reference_pgd(model, x[:64], y[:64], 0.2, 0.03, 7)
    fast = pgd(model, x[:64], y[:64], eps=0.2, step_size=0.03, steps=7, random_start=False)
    monkeypatch.setattr(fastpath, "FAST_ATTACK", False)
    plain = pgd(model, x[:64], y[:64], eps=0.2, step_size=0.03, steps=7, random_start=False)
    assert torch.allclose(plain, ref, atol=1e-6)
    same = (fast - ref).abs().le(1e-6).float().mean().item()
    assert same >= 0.95, same
    with torch.no_grad():
        l_fast, l_ref = (F.cross_entropy(model(a), y[:64]).item() for a in (fast, ref))
    assert l_fast == pytest.approx(l_ref, rel=0.02)


def test_attack_runs_model_in_eval_mode_and_restores_mode():
    """Documented behaviour: BatchNorm uses running stats during the attack, its stats are not updated,
    no weight gradients are produced, and the caller's train/eval mode is restored."""
    torch.manual_seed(0)
    model = build_model("vgg16", 1, in_channels=3, image_size=32)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    attack(model, x, y, kind="pgd", eps=8 / 255, step_size=2 / 255, steps=3)
    hook.remove()
    assert seen == [False, False, False]
    assert model.training is True
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    attack(model, x, y, kind="fgsm-rs", eps=8 / 255, step_size=10 / 255, steps=1)
    assert model.training is False


def test_none_returns_input():
    model = build_model("lenet", 1)
    x = torch.rand(4, 1, 28, 28)
    assert attack(model, x, torch.zeros(4, dtype=torch.long), kind="none", eps=0.3, step_size=0.1, steps=3) is x


def test_evaluation_random_starts_come_from_their_own_cpu_generator(trained_lenet):
    """With a seed, PGD's random starts are drawn on the CPU from a generator of their own (the same numbers a GPU
    evaluation draws, moved to it), so the global RNG stream is untouched and two evaluations agree exactly."""
    from robprune.engine.attacks.pgd import _random_start

    model, x, y = trained_lenet
    x, y = x[:64], y[:64]
    start = _random_start(x, 0.3, torch.Generator().manual_seed(5))
    delta = torch.empty(x.shape).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(start, (x + delta).clamp(0, 1))
    before = torch.get_rng_state()
    a = evaluate(model, x, y, kind="pgd", eps=0.3, step_size=0.05, steps=3, batch_size=32, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = evaluate(model, x, y, kind="pgd", eps=0.3, step_size=0.05, steps=3, batch_size=32, seed=7)
    assert a == b and a[1] <= a[0]


def test_bf16_only_where_the_gpu_has_native_bf16():
    from robprune.engine.pipeline import bf16_usable

    cuda = torch.device("cuda")
    assert bf16_usable(cuda, True, (8, 0)) == (True, "")
    assert bf16_usable(cuda, True, (9, 0)) == (True, "")
    on, why = bf16_usable(cuda, True, (7, 0))  # V100
    assert not on and "compute capability 7.0" in why and "float32" in why
    assert not bf16_usable(cuda, True, (7, 5))[0]  # T4
    assert bf16_usable(torch.device("cpu"), True) == (False, "")  # no effect on the CPU, nothing to warn about
    assert bf16_usable(cuda, False, (9, 0)) == (False, "")
