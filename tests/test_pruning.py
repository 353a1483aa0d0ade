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
    layer_scheme,
    layer_stats,
    n_pruned,
    project,
    resolve_targets,
    sparsity,
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
