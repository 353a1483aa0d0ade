"""Shared fixtures: tiny profiles on synthetic or embedded data, so a whole pipeline runs in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = """
[run]
name = "tiny"
seed = 0
device = "cpu"
log_interval_s = 0.05

[data]
name = "synthetic"
batch_size = 64
test_batch_size = 128
synthetic_train = 512
synthetic_test = 128

[model]
arch = "lenet"
width = 2

[attack.train]
kind = "pgd"
eps = 0.1
step_size = 0.05
steps = 3

[attack.eval]
kind = "pgd"
eps = 0.1
step_size = 0.05
steps = 3

[prune]
scheme = "irregular"
ratio = 0.8

[prune.layers]
"conv1.weight" = 0.5

[admm]
rho = 2.0
rho_multiplier = 1.5
update_every = 1

[phases.pretrain]
epochs = 2
optimizer = "adam"
lr = 0.003
weight_decay = 0.0

[phases.admm]
epochs = 3
optimizer = "adam"
lr = 0.003
weight_decay = 0.0
schedule = "constant"

[phases.retrain]
epochs = 2
optimizer = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 0.0005

[eval]
every = 1
subset = 64
final_subset = 0
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_profile(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def write_profile(tmp_path: Path, text: str = TINY, name: str = "p.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


ROBUST_EPS = 0.2  # the radius robust_lenet is trained at and the attack tests attack at


@pytest.fixture(scope="session")
def robust_lenet():
    """LeNet w=2 trained adversarially (PGD-5, eps rising 0 -> 0.2) for 4 epochs on the embedded digits, in eval mode, with
    200 test digits: a model that resists some attacks and not others, so that attacks of different strength give
    different robust accuracies (about 9 s on 2 cores; clean 94%, PGD-20 56%, AutoAttack 49.5%)."""
    import torch.nn.functional as F

    from robprune.engine import data as data_mod
    from robprune.engine.attacks import pgd
    from robprune.engine.models import build_model

    torch.manual_seed(0)
    ds = data_mod.load_dataset("mnist-5k", "data", False, torch.device("cpu"))
    model = build_model("lenet", 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = data_mod.BatchLoader(ds.train_x, ds.train_y, 64, shuffle=True, seed=0)
    for epoch in range(4):
        eps = ROBUST_EPS * min(1.0, epoch / 2)
        for x, y in loader.batches(epoch):
            xa = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5)
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(xa), y).backward()
            opt.step()
    model.eval()
    x, y = data_mod.eval_subset(ds.test_x, ds.test_y, 200)
    return model, data_mod.to_float(x), y
