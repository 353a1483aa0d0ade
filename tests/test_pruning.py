import itertools
import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from robprune.engine.errors import ConfigError
from robprune.engine.models import build_model, prunable_parameters
from robprune.engine.pruning import (
    MaskedParams,
    apply_masks_,
    compute_masks,
    count_zeros,
    erk_densities,
    global_counts,
    layer_scheme,
    layer_stats,
    n_pruned,
    nm_ratio,
    parse_nm,
    plan_layers,
    project,
    ratio_for_count,
    resolve_targets,
    sparsity,
    target_count,
)

SHAPES = [(8, 3, 3, 3), (20, 12)]
RATIOS = [0.0, 0.29, 0.5, 0.9, 0.99]


class Holder(nn.Module):
    """A module with one ``weight`` parameter, for torch.nn.utils.prune."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w.clone())


def oracle_mask(w: torch.Tensor, scheme: str, k: int) -> torch.Tensor:
    """torch.nn.utils.prune's mask removing exactly k entries / rows / columns."""
    if scheme == "irregular":
        h = Holder(w)
        prune.l1_unstructured(h, "weight", amount=k)
        return h.weight_mask.bool()
    view = w.reshape(w.shape[0], -1)
    h = Holder(view)
    prune.ln_structured(h, "weight", amount=k, n=2, dim=0 if scheme == "filter" else 1)
    return h.weight_mask.bool().reshape(w.shape)


def groups(scheme: str, w: torch.Tensor) -> int:
    return {"irregular": w.numel(), "filter": w.shape[0], "column": w.numel() // w.shape[0]}[scheme]


def group_measure(scheme: str, w: torch.Tensor) -> torch.Tensor:
    if scheme == "irregular":
        return w.abs().reshape(-1)
    v = w.reshape(w.shape[0], -1)
    return v.norm(dim=1) if scheme == "filter" else v.norm(dim=0)


def group_mask(scheme: str, mask: torch.Tensor) -> torch.Tensor:
    """Kept flags per group (every entry of a group must agree)."""
    if scheme == "irregular":
        return mask.reshape(-1)
    v = mask.reshape(mask.shape[0], -1)
    dim = 1 if scheme == "filter" else 0
    assert (v.all(dim=dim) == v.any(dim=dim)).all(), "mask is not constant over groups"
    return v.all(dim=dim)


# ------------------------------------------------------------------------------------------ n_pruned


@pytest.mark.parametrize(
    "n,ratio,expected",
    [(100, 0.29, 29), (10, 0.7, 7), (10, 0.9, 9), (100, 0.0, 0), (0, 0.5, 0), (7, 0.5, 3), (1000, 0.999, 999),
     (3, 1 / 3, 1), (100, 0.57, 57), (10, 1.0, 10), (1, 0.99, 0)],
)
def test_n_pruned(n, ratio, expected):
    assert n_pruned(n, ratio) == expected


def test_n_pruned_float_products_would_be_wrong():
    # the naive rule fails on these; n_pruned must not
    assert int(0.29 * 100) == 28 and n_pruned(100, 0.29) == 29
    assert int(0.57 * 100) == 56 and n_pruned(100, 0.57) == 57


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_n_pruned_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        n_pruned(10, ratio)


# ------------------------------------------------------------------------------------------ projection vs oracle


@pytest.mark.parametrize("scheme", ["irregular", "filter", "column"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_projection_matches_torch_prune(scheme, shape, ratio):
    torch.manual_seed(sum(map(ord, f"{scheme}{shape}{ratio}")))
    w = torch.randn(shape)
    k = n_pruned(groups(scheme, w), ratio)
    projected, mask = project(w, scheme, ratio)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, oracle_mask(w, scheme, k))
    assert int((~group_mask(scheme, mask)).sum()) == k
    assert torch.equal(projected, w * mask)


def test_ratio_zero_keeps_everything():
    w = torch.randn(4, 5)
    for scheme in ("irregular", "filter", "column"):
        projected, mask = project(w, scheme, 0.0)
        assert mask.all() and torch.equal(projected, w)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="pattern"):
        project(torch.randn(3, 3), "pattern", 0.5)


# ------------------------------------------------------------------------------------------ ties

TIED = {
    "ones": lambda: torch.ones(6, 2, 3, 3),
    "ternary": lambda: torch.randint(-1, 2, (10, 14), generator=torch.Generator().manual_seed(1)).float(),
    "repeated_rows": lambda: torch.randn(1, 7).repeat(9, 1),
    "repeated_cols": lambda: torch.randn(5, 1).repeat(1, 11),
    "zeros": lambda: torch.zeros(4, 3, 2, 2),
}


@pytest.mark.parametrize("scheme", ["irregular", "filter", "column"])
@pytest.mark.parametrize("kind", list(TIED))
@pytest.mark.parametrize("ratio", [0.29, 0.5, 0.9])
def test_ties_exact_counts(scheme, kind, ratio):
    w = TIED[kind]()
    n = groups(scheme, w)
    k = n_pruned(n, ratio)
    projected, mask = project(w, scheme, ratio)
    kept = group_mask(scheme, mask)
    assert int((~kept).sum()) == k
    assert int((~group_mask(scheme, oracle_mask(w, scheme, k))).sum()) == k
    measure = group_measure(scheme, w)
    if 0 < k < n:
        assert measure[kept].min() >= measure[~kept].max()
    assert torch.equal(projected, w * mask)


def test_ties_removed_lowest_index_first():
    _, mask = project(torch.ones(10), "irregular", 0.3)
    assert mask.tolist() == [False] * 3 + [True] * 7


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("scheme", ["irregular", "filter", "column"])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_idempotent(scheme, shape):
    torch.manual_seed(3)
    w = torch.randn(shape)
    p1, m1 = project(w, scheme, 0.5)
    p2, m2 = project(p1, scheme, 0.5)
    assert torch.equal(p1, p2) and torch.equal(m1, m2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_device_preserved_and_input_untouched(dtype):
    w = torch.randn(6, 4, 3, 3).to(dtype)
    before = w.clone()
    w.requires_grad_(True)
    projected, mask = project(w, "irregular", 0.5)
    assert projected.dtype == dtype and projected.device == w.device and mask.device == w.device
    assert not projected.requires_grad
    assert torch.equal(w.detach(), before)
    assert count_zeros(projected) == n_pruned(w.numel(), 0.5)


@pytest.mark.parametrize("scheme", ["irregular", "filter", "column"])
def test_projection_is_closest_point(scheme):
    torch.manual_seed(4)
    w = torch.randn(12, 3, 3, 3)
    projected, mask = project(w, scheme, 0.6)
    best = (w - projected).norm()
    g = group_mask(scheme, mask)
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        perm = torch.randperm(g.numel(), generator=gen)
        other_g = g[perm]
        if scheme == "irregular":
            other = other_g.reshape(w.shape)
        elif scheme == "filter":
            other = other_g.reshape(-1, 1, 1, 1).expand_as(w)
        else:
            other = other_g.reshape(1, 3, 3, 3).expand_as(w)
        assert best <= (w - w * other).norm() + 1e-6


def test_layer_scheme():
    assert layer_scheme(torch.zeros(3, 4), "filter", "irregular") == "irregular"
    assert layer_scheme(torch.zeros(3, 4, 3, 3), "filter", "irregular") == "filter"


def test_sparsity_and_count_zeros():
    t = torch.tensor([0.0, -0.0, 1e-30, 2.0, 0.0])
    assert count_zeros(t) == 3
    assert sparsity(t) == pytest.approx(0.6)
    assert sparsity(torch.zeros(0)) == 0.0


def test_apply_masks_in_place():
    p = nn.Parameter(torch.arange(1.0, 7.0).reshape(2, 3))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    apply_masks_({"w": p}, {"w": mask})
    assert p.tolist() == [[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]]
    assert p.requires_grad


def test_compute_masks():
    model = build_model("lenet", 1)
    params = prunable_parameters(model)
    masks = compute_masks(params, {n: 0.5 for n in params}, "filter", "irregular")
    assert set(masks) == set(params)
    conv1 = masks["conv1.weight"].reshape(2, -1)
    assert int((~conv1.all(dim=1)).sum()) == 1
    assert int((~masks["fc1.weight"]).sum()) == n_pruned(params["fc1.weight"].numel(), 0.5)


def test_layer_stats():
    w = torch.tensor([[0.0, 0.5, -0.5, 2.0], [1.0, -3.0, 0.001, 4.0]])
    stats = layer_stats(w, None, 0.5, "irregular")
    assert stats["numel"] == 8 and stats["zeros"] == 1 and stats["sparsity"] == pytest.approx(1 / 8)
    assert stats["n_pruned"] == 4
    assert stats["threshold"] == pytest.approx(0.5)
    assert stats["at_or_below"] == pytest.approx(4 / 8)  # 0, 0.001, 0.5, -0.5
    assert stats["near_zero"] == pytest.approx(2 / 8)  # |w| <= 0.004: 0 and 0.001
    assert "masked" not in stats
    _, mask = project(w, "irregular", 0.5)
    stats = layer_stats(w, mask, 0.5, "irregular")
    assert stats["masked"] == 4 and stats["masked_nonzero"] == 3
    stats = layer_stats(torch.ones(4, 2), None, 0.5, "filter")
    assert stats["n_pruned"] == 2 and stats["at_or_below"] == 1.0  # all rows tie
    assert stats["threshold"] == pytest.approx(2**0.5)
    assert layer_stats(w, None, 0.0, "column")["threshold"] == 0.0


# ------------------------------------------------------------------------------------------ masked retraining


def _train(optimizer_factory, scheme):
    torch.manual_seed(0)
    model = build_model("lenet", 1)
    params = prunable_parameters(model)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = optimizer_factory(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):  # unmasked steps first so optimizer state (momentum / Adam moments) is non-zero
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    masks = compute_masks(params, {n: 0.6 for n in params}, scheme, "irregular")
    masked = MaskedParams(params, masks).attach()
    start = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(20):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for n, p in params.items():
            assert (p.grad[~masks[n]] == 0).all()
        opt.step()
        masked.after_step()
        for n, p in params.items():
            assert (p[~masks[n]] == 0).all()
            assert (p[masks[n]] != 0).all()
            assert count_zeros(p) == int((~masks[n]).sum())
    for n, p in params.items():
        changed = (p.detach() != start[n])[masks[n]]
        assert changed.float().mean() > 0.9, n
    masked.detach()
    assert not masked.attached
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    assert (params["fc1.weight"].grad[~masks["fc1.weight"]] != 0).any()


@pytest.mark.parametrize("scheme", ["irregular", "filter"])
def test_masked_retraining_sgd(scheme):
    _train(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4), scheme)


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=5e-4),
    ],
)
def test_masked_retraining_adam(factory):
    _train(factory, "irregular")


def test_masked_params_context_manager():
    p = nn.Parameter(torch.ones(2, 2))
    mask = torch.tensor([[True, False], [False, True]])
    with MaskedParams({"w": p}, {"w": mask}) as mp:
        assert mp.attached and p.tolist() == [[1.0, 0.0], [0.0, 1.0]]
        (p * torch.full((2, 2), 3.0)).sum().backward()
        assert p.grad.tolist() == [[3.0, 0.0], [0.0, 3.0]]
    assert not mp.attached
    with pytest.raises(KeyError):
        MaskedParams({"w": p}, {"v": mask})


# ------------------------------------------------------------------------------------------ resolve_targets

NAMES = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_resolve_default_only():
    assert resolve_targets(NAMES, 0.9, {}) == {n: 0.9 for n in NAMES}


def test_resolve_exact_and_glob():
    got = resolve_targets(NAMES, 0.9, {"conv*": 0.5, "fc2.weight": 0.1})
    assert got == {"conv1.weight": 0.5, "conv2.weight": 0.5, "fc1.weight": 0.9, "fc2.weight": 0.1}


def test_resolve_exact_beats_earlier_glob():
    got = resolve_targets(NAMES, 0.9, {"*": 0.3, "conv1.weight": 0.0})
    assert got == {"conv1.weight": 0.0, "conv2.weight": 0.3, "fc1.weight": 0.3, "fc2.weight": 0.3}


def test_resolve_first_glob_wins():
    got = resolve_targets(NAMES, 0.9, {"fc*": 0.2, "*.weight": 0.7, "fc1*": 0.4})
    assert got == {"conv1.weight": 0.7, "conv2.weight": 0.7, "fc1.weight": 0.2, "fc2.weight": 0.2}


def test_resolve_glob_matching_nothing():
    with pytest.raises(ConfigError) as info:
        resolve_targets(NAMES, 0.9, {"conv*": 0.5, "layer9.*": 0.5}, source="exp.toml")
    msg = str(info.value)
    assert msg.startswith('exp.toml: prune.layers."layer9.*": expected a layer name or glob')
    assert "layer9.*" in msg and "'conv1.weight', 'conv2.weight', 'fc1.weight'" in msg
    assert info.value.source == "exp.toml"


def test_resolve_exact_name_typo():
    with pytest.raises(ConfigError, match="fc3.weight"):
        resolve_targets(NAMES, 0.9, {"fc3.weight": 0.5})


def test_resolve_on_resnet_names():
    names = list(prunable_parameters(build_model("resnet18", 1)))
    got = resolve_targets(names, 0.8, {"conv1.weight": 0.0, "layer1.*": 0.5, "fc.weight": 0.0})
    assert got["conv1.weight"] == 0.0 and got["fc.weight"] == 0.0
    assert got["layer1.0.conv1.weight"] == 0.5 and got["layer4.1.conv2.weight"] == 0.8


# ------------------------------------------------------------------------------------------ N:M


def nm_oracle(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Brute force, group by group: of all N-subsets of a group of M consecutive entries of a row of the (out, -1)
    view, keep the one with the largest kept squared magnitude (exact, in fractions); among equal ones, the one whose
    removed indices are lowest (their sorted tuple lexicographically smallest): ties are removed lowest index first."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    for r in range(rows.shape[0]):
        for g in range(0, rows.shape[1], m):
            energy = [Fraction(v) ** 2 for v in rows[r, g:g + m].tolist()]
            subsets = [(kept, tuple(i for i in range(m) if i not in kept))
                       for kept in itertools.combinations(range(m), n)]
            best = max(sum(energy[i] for i in kept) for kept, _ in subsets)
            kept, _ = min((s for s in subsets if sum(energy[i] for i in s[0]) == best), key=lambda s: s[1])
            for i in kept:
                keep[r, g + i] = True
    return keep.reshape(w.shape)


NM_CASES = [("2:4", (8, 12)), ("2:4", (6, 4, 3, 3)), ("1:4", (5, 8)), ("3:4", (4, 2, 2, 2)), ("1:2", (3, 10)),
            ("2:8", (4, 16)), ("5:8", (2, 3, 4, 2)), ("1:3", (4, 9))]
NM_TIED = {
    "random": lambda shape: torch.randn(shape),
    "ternary": lambda shape: torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(2)).float(),
    "ones": lambda shape: torch.ones(shape),
    "zeros": lambda shape: torch.zeros(shape),
    "few_values": lambda shape: torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(3)).float() * 0.5,
}


@pytest.mark.parametrize("scheme,shape", NM_CASES)
@pytest.mark.parametrize("kind", list(NM_TIED))
def test_nm_projection_matches_brute_force(scheme, shape, kind):
    torch.manual_seed(sum(map(ord, f"{scheme}{shape}{kind}")))
    w = NM_TIED[kind](shape)
    n, m = parse_nm(scheme)
    projected, mask = project(w, scheme, nm_ratio(scheme))
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, nm_oracle(w, n, m))
    groups = (~mask).reshape(w.shape[0], -1, m).sum(-1)
    assert (groups == m - n).all()  # every group: exactly M - N zeros in the mask
    assert int((~mask).sum()) == w.numel() // m * (m - n) == target_count(w.shape, scheme, nm_ratio(scheme))
    assert torch.equal(projected, w * mask)


def test_nm_ties_remove_the_lowest_index_of_the_group():
    _, mask = project(torch.ones(2, 8), "2:4", 0.5)
    assert mask.tolist() == [[False, False, True, True] * 2] * 2
    w = torch.tensor([[3.0, 1.0, 1.0, 2.0, -1.0, 1.0, 1.0, 1.0]])
    assert project(w, "2:4", 0.5)[1].tolist() == [[True, False, False, True, False, False, True, True]]


def test_nm_groups_run_along_the_conv_input_in_memory_order():
    """A convolution's row is one filter, in_channels x kh x kw in memory order (torch's semi-structured layout)."""
    w = torch.arange(1.0, 1 + 2 * 2 * 2 * 2).reshape(2, 2, 2, 2)
    _, mask = project(w, "2:4", 0.5)
    assert mask.reshape(2, -1).tolist() == [[False, False, True, True] * 2] * 2
    w2 = torch.randn(3, 4, 3, 3)
    assert torch.equal(project(w2, "2:4", 0.5)[1].reshape(3, -1), project(w2.reshape(3, -1), "2:4", 0.5)[1])


@pytest.mark.parametrize("scheme,shape", NM_CASES[:4])
def test_nm_projection_is_closest_point_and_idempotent(scheme, shape):
    torch.manual_seed(6)
    w = torch.randn(shape)
    n, m = parse_nm(scheme)
    projected, mask = project(w, scheme, nm_ratio(scheme))
    best = (w - projected).norm()
    gen = torch.Generator().manual_seed(7)
    groups = mask.reshape(-1, m)
    for _ in range(30):
        other = torch.stack([g[torch.randperm(m, generator=gen)] for g in groups]).reshape(w.shape)
        assert best <= (w - w * other).norm() + 1e-6
    p2, m2 = project(projected, scheme, nm_ratio(scheme))
    assert torch.equal(p2, projected) and torch.equal(m2, mask)


def test_nm_ratio_zero_keeps_everything_and_other_ratios_are_refused():
    w = torch.randn(4, 8)
    projected, mask = project(w, "2:4", 0.0)
    assert mask.all() and torch.equal(projected, w)
    with pytest.raises(ValueError, match="2:4 prunes at ratio 0.5"):
        project(w, "2:4", 0.9)
    with pytest.raises(ValueError, match="multiple of 4"):
        project(torch.randn(4, 6), "2:4", 0.5)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("1:2", (1, 2)), ("15:16", (15, 16)), ("4:2", None),
                                           ("2:2", None), ("0:4", None), ("02:4", None), ("2: 4", None), ("-1:4", None),
                                           ("2:4:8", None), ("irregular", None), (24, None), ("", None)])
def test_parse_nm(text, expected):
    assert parse_nm(text) == expected


def test_nm_layer_stats():
    w = torch.tensor([[4.0, 1.0, -3.0, 0.5, 2.0, 0.1, -0.2, 8.0]])
    st = layer_stats(w, None, 0.5, "2:4")
    assert st["n_pruned"] == 4 and st["scheme"] == "2:4" and st["ratio"] == 0.5
    assert st["threshold"] == pytest.approx(1.0)  # the largest removed: 1.0 (group 1), 0.2 (group 2)
    assert st["at_or_below"] == pytest.approx(4 / 8)  # 1.0, 0.5, 0.1, 0.2
    _, mask = project(w, "2:4", 0.5)
    st = layer_stats(w, mask, 0.5, "2:4")
    assert st["masked"] == 4 and st["masked_nonzero"] == 4
    assert layer_stats(w, None, 0.0, "2:4")["n_pruned"] == 0


def test_nm_masks_survive_masked_retraining():
    torch.manual_seed(0)
    model = build_model("lenet", 2)
    params = prunable_parameters(model)
    targets = {k: 0.5 for k in params if k != "conv1.weight"}
    masks = {k: project(params[k], "2:4", 0.5)[1] for k in targets}
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with MaskedParams(params, masks) as mp:
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            mp.after_step()
    for k, mask in masks.items():
        w = params[k].detach().reshape(params[k].shape[0], -1, 4)
        assert ((w != 0).sum(-1) <= 2).all(), k


def test_admm_z_is_nm():
    from robprune.engine.admm import ADMM

    torch.manual_seed(1)
    params = {k: nn.Parameter(torch.randn(s)) for k, s in (("a", (8, 16)), ("b", (4, 2, 2, 2)))}
    admm = ADMM(params, {"a": 0.5, "b": 0.5}, {"a": "2:4", "b": "2:4"}, rho=0.1)
    for _ in range(2):
        for z in admm.Z.values():
            assert ((z.reshape(z.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p))
        admm.update()


# ------------------------------------------------------------------------------------------ plan_layers: N:M


def _lenet_params():
    return prunable_parameters(build_model("lenet", 2))


def _plan(**kw):
    return plan_layers(_lenet_params(), origin=lambda key: "p.toml", **kw)


def test_plan_nm_implied_ratio_and_dense_layers():
    plan = _plan(scheme="2:4", linear_scheme="2:4", ratio=0.9, layers={"conv1.weight": 0.0, "fc2.weight": 0.5})
    assert plan.ratios == {"conv1.weight": 0.0, "conv2.weight": 0.5, "fc1.weight": 0.5, "fc2.weight": 0.5}
    assert plan.set_by == {"conv1.weight": "prune.layers", "conv2.weight": "scheme", "fc1.weight": "scheme",
                           "fc2.weight": "prune.layers"}
    assert plan.notes == ["2:4 layers are pruned at 50% (1 - N/M); prune.ratio 0.9 is not used"]
    rec = plan.record()
    assert rec["layers"]["fc1.weight"]["pruned"] == 128 * 392 // 2
    assert rec["pruned"] == (800 + 128 * 392 + 10 * 128) // 2


def test_plan_nm_for_linear_layers_only():
    plan = _plan(scheme="irregular", linear_scheme="1:4", ratio=0.8, layers={"conv1.weight": 0.5})
    assert plan.schemes["fc1.weight"] == "1:4" and plan.ratios["fc1.weight"] == 0.75
    assert plan.ratios["conv2.weight"] == 0.8 and plan.ratios["conv1.weight"] == 0.5
    assert "applies to the layers of the other schemes" in plan.notes[0]


def test_plan_nm_refuses_a_row_length_that_is_not_a_multiple_of_m():
    with pytest.raises(ConfigError) as ei:
        _plan(scheme="2:4", linear_scheme="2:4")
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("p.toml: prune.scheme: expected an N:M scheme whose M divides the row length")
    assert "'conv1.weight' 4x1x5x5 has rows of 25, not a multiple of 4" in msg
    assert 'prune.layers."conv1.weight" = 0' in msg
    with pytest.raises(ConfigError, match="prune.linear_scheme: .*'fc1.weight' 128x392 has rows of 392, not a "
                                          "multiple of 16"):
        _plan(linear_scheme="8:16")


def test_plan_nm_refuses_another_explicit_ratio():
    with pytest.raises(ConfigError) as ei:
        _plan(scheme="2:4", linear_scheme="2:4", layers={"conv1.weight": 0.0, "fc*": 0.8})
    assert str(ei.value) == ('p.toml: prune.layers."fc*": expected 0 (left dense) or 0.5 (the ratio 2:4 implies) for '
                             "the 2:4 layer 'fc1.weight', found 0.8")
    params = {"a.weight": torch.randn(4, 9), "b.weight": torch.randn(2, 6)}
    plan = plan_layers(params, linear_scheme="1:3", layers={"a*": 0.666667})  # 2/3 as a profile spells it
    assert plan.ratios == {"a.weight": 2 / 3, "b.weight": 2 / 3}
    assert plan.set_by == {"a.weight": "prune.layers", "b.weight": "scheme"}
    assert int((~project(params["a.weight"], "1:3", plan.ratios["a.weight"])[1]).sum()) == 24


# ------------------------------------------------------------------------------------------ allocation


def _resnet_params():
    torch.manual_seed(11)
    return prunable_parameters(build_model("resnet18", 1, in_channels=3, image_size=32))


def erk_independent(shapes: dict, keep: float) -> dict:
    """RigL's sparse_utils.get_sparsities (erk_power_scale 1), in floats: densities of the layers that keep
    ``keep`` entries together."""
    import numpy as np

    dense: set = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = float(np.prod(shape))
            if name in dense:
                rhs -= n
            else:
                raw[name] = np.sum(shape) / np.prod(shape)
                divisor += raw[name] * n
        rhs += keep
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense |= {name for name, p in raw.items() if p == top}
        else:
            break
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


@pytest.mark.parametrize("which", ["lenet", "resnet"])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9, 0.97])
def test_erk_counts_are_exact_and_match_rigl(which, ratio):
    params = _lenet_params() if which == "lenet" else _resnet_params()
    plan = plan_layers(params, ratio=ratio, allocation="erk")
    total = sum(p.numel() for p in params.values())
    assert plan.final and plan.allocated == list(params)
    pruned = {k: n_pruned(p.numel(), plan.ratios[k]) for k, p in params.items()}
    assert sum(pruned.values()) == n_pruned(total, ratio) == plan.budget == plan.record()["pruned"]
    dens = erk_independent({k: tuple(p.shape) for k, p in params.items()}, total - n_pruned(total, ratio))
    for k, p in params.items():
        kept = p.numel() - pruned[k]
        assert abs(kept - dens[k] * p.numel()) < 1 + 1e-6, (k, kept, dens[k] * p.numel())
        _, mask = project(p, "irregular", plan.ratios[k])
        assert int((~mask).sum()) == pruned[k]
    clamped = [k for k, v in dens.items() if v == 1.0]  # would exceed density 1: dense, the rest rescaled
    assert all(pruned[k] == 0 for k in clamped)
    assert clamped or ratio > 0.5


def test_erk_densities_exact_fractions():
    shapes = {"a": (10, 20), "b": (4, 3, 3, 3), "c": (100, 50)}
    numel = {k: math.prod(s) for k, s in shapes.items()}
    d = erk_densities(shapes, 600)
    assert sum(d[k] * numel[k] for k in shapes) == 600  # exactly, in fractions
    assert d["a"] == Fraction(600, 30 + 13 + 150) * Fraction(30, 200)  # eps * (sum of dims) / (product of dims)
    assert d["b"] / d["c"] == Fraction(13, 108) / Fraction(150, 5000)
    d = erk_densities(shapes, 2000)  # "a" would be denser than 1: dense; rescaled, "b" would be too: dense
    assert d == {"a": 1, "b": 1, "c": Fraction(2000 - 200 - 108, 5000)}


@pytest.mark.parametrize("which", ["lenet", "resnet"])
@pytest.mark.parametrize("ratio", [0.3, 0.8, 0.95])
@pytest.mark.parametrize("normalize", [False, True])
def test_global_equals_a_flat_topk(which, ratio, normalize):
    params = _lenet_params() if which == "lenet" else _resnet_params()
    plan = plan_layers(params, ratio=ratio, allocation="global", normalize=normalize)
    assert not plan.final and all(plan.pending(k) for k in params)
    ratios = plan.finalize({k: p.detach() for k, p in params.items()})
    assert plan.final and not plan.pending("fc2.weight")
    total = sum(p.numel() for p in params.values())
    k_total = n_pruned(total, ratio)
    names = list(params)
    scores = []
    for k in names:
        a = params[k].detach().abs().reshape(-1)
        scores.append(a / a.pow(2).mean().sqrt() if normalize else a)
    flat = torch.cat(scores)
    idx = torch.topk(flat, k_total, largest=False).indices
    oracle = torch.ones(total, dtype=torch.bool)
    oracle[idx] = False
    masks = torch.cat([project(params[k], "irregular", ratios[k])[1].reshape(-1) for k in names])
    assert int((~masks).sum()) == k_total == plan.record()["pruned"]
    assert torch.equal(masks, oracle)


def test_global_ties_earlier_layer_and_lower_index_first():
    weights = {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.full((3,), 0.5)}
    assert global_counts(weights, 5) == {"a": 2, "b": 0, "c": 3}
    assert global_counts(weights, 10) == {"a": 6, "b": 1, "c": 3}
    assert global_counts(weights, 0) == {"a": 0, "b": 0, "c": 0}


def test_allocation_excludes_layers_named_in_prune_layers():
    params = _lenet_params()
    total = sum(p.numel() for p in params.values())
    for allocation in ("global", "erk"):
        plan = plan_layers(params, ratio=0.8, allocation=allocation, layers={"conv1.weight": 0.5, "fc2*": 0.1})
        ratios = plan.finalize({k: p.detach() for k, p in params.items()})
        assert ratios["conv1.weight"] == 0.5 and ratios["fc2.weight"] == 0.1
        assert plan.allocated == ["conv2.weight", "fc1.weight"]
        assert sum(n_pruned(p.numel(), ratios[k]) for k, p in params.items()) == n_pruned(total, 0.8)
        assert plan.set_by == {"conv1.weight": "prune.layers", "conv2.weight": allocation,
                               "fc1.weight": allocation, "fc2.weight": "prune.layers"}


def test_allocation_refusals_are_one_line():
    params = _lenet_params()
    cases = [
        (dict(allocation="global", scheme="filter"), "p.toml: prune.allocation: expected 'uniform' with the filter "
                                                     "scheme"),
        (dict(allocation="erk", layers={"*": 0.5}), "p.toml: prune.allocation: expected 'uniform' when prune.layers "
                                                   "sets the ratio of every layer"),
        (dict(allocation="erk", ratio=0.99, layers={"fc*": 0.0}), "p.toml: prune.ratio: expected a ratio in [0, "),
        (dict(allocation="global", ratio=0.1, layers={"fc1.weight": 0.9}), "p.toml: prune.ratio: expected a ratio in "),
    ]
    for kw, start in cases:
        with pytest.raises(ConfigError) as ei:
            plan_layers(params, origin=lambda key: "p.toml", **kw)
        assert str(ei.value).startswith(start), str(ei.value)
        assert len(str(ei.value).splitlines()) == 1


@pytest.mark.parametrize("n,k", [(3, 1), (7, 3), (3_000_001, 1_714_287), (50_176, 41_405), (10, 10), (10, 0),
                                 (999_983, 571_419)])
def test_ratio_for_count_is_exact(n, k):
    r = ratio_for_count(n, k)
    assert n_pruned(n, r) == k and abs(r - k / n) < 1e-12
    assert all(n_pruned(n, ratio_for_count(n, j)) == j for j in range(0, min(n, 200)))
