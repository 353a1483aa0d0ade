"""ADMM state: the penalty's gradient, the Z/U updates, rho handling and the residuals."""
from __future__ import annotations

import pytest
import torch

from robprune.engine.admm import ADMM
from robprune.engine.models import build_model, prunable_parameters
from robprune.engine.pruning import n_pruned, project


def _setup(rho=0.01, mult=1.3):
    torch.manual_seed(0)
    model = build_model("lenet", 1)
    params = prunable_parameters(model)
    ratios = {k: 0.75 for k in params}
    ratios["conv1.weight"] = 0.0  # not pruned: excluded from ADMM
    schemes = {k: "irregular" for k in params}
    schemes["conv2.weight"] = "filter"
    return model, params, ADMM(params, ratios, schemes, rho, mult)


def test_init_z_is_projection_and_u_is_zero():
    _, params, admm = _setup()
    assert admm.layers == ["conv2.weight", "fc1.weight", "fc2.weight"]
    for k in admm.layers:
        z_ref, mask = project(params[k].detach(), admm.schemes[k], 0.75)
        assert torch.equal(admm.Z[k], z_ref)
        assert torch.count_nonzero(admm.U[k]) == 0
    # filter scheme: exactly floor(0.75 * 2) = 1 of conv2's 2 filters is zero in Z
    z = admm.Z["conv2.weight"].reshape(2, -1)
    assert int((z.abs().sum(1) == 0).sum()) == n_pruned(2, 0.75) == 1
    assert int((admm.Z["fc1.weight"] == 0).sum()) == n_pruned(params["fc1.weight"].numel(), 0.75)


def test_penalty_gradient_matches_autograd():
    _, params, admm = _setup(rho=0.37)
    with torch.no_grad():  # make W - Z + U non-trivial
        for k in admm.layers:
            admm.U[k].normal_()
    for p in params.values():
        p.grad = None
    admm.penalty().backward()
    auto = {k: params[k].grad.clone() for k in admm.layers}
    for p in params.values():
        p.grad = None
    admm.add_penalty_grad()
    for k in admm.layers:
        assert torch.allclose(params[k].grad, auto[k], rtol=1e-5, atol=1e-7)
    assert params["conv1.weight"].grad is None  # unpruned layers get no penalty


def test_update_follows_the_formulas_and_multiplies_rho():
    _, params, admm = _setup(rho=0.01, mult=1.3)
    with torch.no_grad():
        for k in admm.layers:
            params[k].add_(0.05 * torch.randn_like(params[k]))
    U_old = {k: admm.U[k].clone() for k in admm.layers}
    Z_old = {k: admm.Z[k].clone() for k in admm.layers}
    res = admm.update()
    for k in admm.layers:
        W = params[k].detach()
        Z = project(W + U_old[k], admm.schemes[k], 0.75)[0]
        assert torch.equal(admm.Z[k], Z)
        assert torch.allclose(admm.U[k], U_old[k] + W - Z)
        assert res[k]["primal"] == pytest.approx(float((W - Z).norm() / W.norm()), rel=1e-5)
        assert res[k]["dual"] == pytest.approx(0.01 * float((Z - Z_old[k]).norm()), rel=1e-5)
        assert admm.rho[k] == pytest.approx(0.013)
        assert res[k]["rho"] == pytest.approx(0.013)  # the rho that applies from now on
    assert admm.updates == 1


def test_set_rho_all_one_and_multiply():
    _, _, admm = _setup(rho=0.01)
    admm.set_rho(0.5)
    assert set(admm.rho.values()) == {0.5}
    admm.set_rho(2.0, layer="fc1.weight", multiply=True)
    assert admm.rho["fc1.weight"] == 1.0 and admm.rho["fc2.weight"] == 0.5
    with pytest.raises(KeyError):
        admm.set_rho(1.0, layer="nope")


def test_state_dict_round_trip():
    _, params, admm = _setup()
    admm.update()
    sd = admm.state_dict()
    other = ADMM(params, {k: 0.75 for k in admm.layers}, admm.schemes, 1.0, 1.3)
    other.load_state_dict(sd)
    for k in admm.layers:
        assert torch.equal(other.Z[k], admm.Z[k]) and torch.equal(other.U[k], admm.U[k])
    assert other.rho == admm.rho and other.updates == 1


def test_residual_falls_when_w_follows_z():
    """With W pulled toward Z (what the penalty does), the primal residual collapses over the updates."""
    _, params, admm = _setup(rho=0.1, mult=1.3)
    primal = []
    for _ in range(5):
        for _ in range(5):  # a few gradient steps on the penalty alone between Z/U updates
            with torch.no_grad():
                for p in params.values():
                    p.grad = None
                admm.add_penalty_grad()
                for k in admm.layers:
                    params[k].sub_(params[k].grad, alpha=1.0)
        res = admm.update()
        primal.append(sum(r["primal"] for r in res.values()))
    # ADMM residuals need not fall monotonically, but they must collapse: W ends (almost) in its sparsity set
    assert primal[-1] < 0.1 * primal[0], primal
    assert min(primal[1:]) < 0.05 * primal[0], primal
