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


def run_session(directory: Path, overrides=(), *, text: str = TINY, events: list | None = None):
    """A real run of the ``text`` profile (default TINY) with ``overrides``, to its end: the profile is
    ``directory/p.toml``, the run directory ``directory/run``; every event is appended to ``events`` when given.
    Returns (session, summary)."""
    from robprune.engine.session import Session

    directory.mkdir(parents=True, exist_ok=True)
    s = Session.new(write_profile(directory, text), list(overrides), directory / "run")
    if events is not None:
        s.subscribe(events.append)
    s.prepare()
    return s, s.run()


ROBUST_EPS = 0.2  # the radius robust_lenet is trained at and the attack tests attack at


def trained_digits_lenet(*, epochs: int, lr: float, n_test: int, eps: float | None = None):
    """LeNet w=2 trained on the embedded digits with Adam (batches of 64, seed 0), in eval mode, and ``n_test`` test
    digits. ``eps``: adversarial training with PGD-5 at a radius rising 0 -> eps over the first 2 epochs; None:
    natural training."""
    import torch.nn.functional as F

    from robprune.engine import data as data_mod
    from robprune.engine.attacks import pgd
    from robprune.engine.models import build_model

    torch.manual_seed(0)
    ds = data_mod.load_dataset("mnist-5k", "data", False, torch.device("cpu"))
    model = build_model("lenet", 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = data_mod.BatchLoader(ds.train_x, ds.train_y, 64, shuffle=True, seed=0)
    for epoch in range(epochs):
        radius = None if eps is None else eps * min(1.0, epoch / 2)
        for x, y in loader.batches(epoch):
            if radius is not None:
                x = pgd(model, x, y, eps=radius, step_size=radius / 4, steps=5)
                model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = data_mod.eval_subset(ds.test_x, ds.test_y, n_test)
    return model, data_mod.to_float(x), y


@pytest.fixture(scope="session")
def robust_lenet():
    """LeNet w=2 trained adversarially (PGD-5, eps rising 0 -> 0.2) for 4 epochs on the embedded digits, in eval mode, with
    200 test digits: a model that resists some attacks and not others, so that attacks of different strength give
    different robust accuracies (about 9 s on 2 cores; clean 94%, PGD-20 56%, AutoAttack 49.5%)."""
    return trained_digits_lenet(epochs=4, lr=2e-3, n_test=200, eps=ROBUST_EPS)
