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
