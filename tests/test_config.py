"""Profile schema: defaults, loading, every kind of bad input, --set overrides and the TOML writer."""

import dataclasses
import tempfile
import tomllib
from pathlib import Path

import pytest

from robprune.engine.config import (
    AttackSpec,
    Config,
    PhaseConfig,
    TomlSyntaxError,
    apply_overrides,
    dump_toml,
    from_dict,
    load_profile,
    schema_keys,
)
from robprune.engine.errors import ConfigError, UserError

FULL_PROFILE = """\
[run]
name = "full"
seed = 7
device = "cpu"
deterministic = true
threads = 2
log_interval_s = 0.5
checkpoint_every = 0
init = "runs/base"
bf16 = false
channels_last = true
compile = false

[data]
name = "cifar10"
root = "datasets"
download = true
batch_size = 128
test_batch_size = 1000
train_subset = 2000
augment = false
synthetic_train = 64
synthetic_test = 32

[model]
arch = "wrn"
width = 4
depth = 16

[attack.train]
kind = "fgsm-rs"
eps = 0.031
step_size = 0.0078
steps = 1
restarts = 1

[attack.eval]
kind = "pgd"
eps = 0.031
step_size = 0.0078
steps = 20
restarts = 2

[prune]
scheme = "filter"
linear_scheme = "column"
ratio = 0.8

[prune.layers]
"conv1.weight" = 0.0
"block*.conv*" = 0.95
"fc" = 0.5

[admm]
rho = 0.01
rho_multiplier = 1.5
update_every = 3

[phases.pretrain]
epochs = 5
optimizer = "adam"
lr = 1e-3
momentum = 0.0
nesterov = true
weight_decay = 0
schedule = "step"
milestones = [2, 4]
gamma = 0.5

[phases.admm]
epochs = 0

[phases.retrain]
epochs = 3
schedule = "constant"

[eval]
every = 2
subset = 0
final_subset = 5000
"""


def write(tmp_path, text, name="prof.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def err(d, source="p.toml"):
    with pytest.raises(ConfigError) as info:
        from_dict(d, source)
    return str(info.value)


def set_err(overrides):
    """The error load_profile raises for ``overrides`` on an empty profile."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.toml"
        path.write_text("")
        with pytest.raises(ConfigError) as info:
            load_profile(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_from_empty_dict():
    cfg = from_dict({}, "empty.toml")
    assert cfg == Config()
    assert cfg.run.seed == 0 and cfg.run.device == "auto" and cfg.run.log_interval_s == 1.0
    assert cfg.data.name == "mnist-5k" and cfg.data.batch_size == 64 and cfg.data.test_batch_size == 500
    assert cfg.model.arch == "lenet" and cfg.model.width == 16 and cfg.model.depth == 28
    assert cfg.attack.train == AttackSpec("pgd", 0.3, 0.01, 40, 1)
    assert cfg.attack.eval == AttackSpec("pgd", 0.3, 0.01, 40, 1)
    assert cfg.prune.ratio == 0.9 and cfg.prune.layers == {} and cfg.prune.scheme == "irregular"
    assert (cfg.admm.rho, cfg.admm.rho_multiplier, cfg.admm.update_every) == (1e-3, 1.3, 4)
    assert cfg.phases.pretrain.schedule == "cosine"
    assert cfg.phases.admm.schedule == "admm"
    assert cfg.phases.retrain == PhaseConfig()
    assert [cfg.phases.pretrain.epochs, cfg.phases.admm.epochs, cfg.phases.retrain.epochs] == [10, 10, 10]
    assert (cfg.eval.every, cfg.eval.subset, cfg.eval.final_subset) == (1, 1000, 0)
    assert cfg.name == "empty"


def test_partial_phase_table_keeps_its_own_defaults():
    cfg = from_dict({"phases": {"admm": {"epochs": 3}}}, "p.toml")
    assert cfg.phases.admm.epochs == 3 and cfg.phases.admm.schedule == "admm"
    assert cfg.phases.pretrain.epochs == 10


def test_full_profile_loads(tmp_path):
    cfg = load_profile(write(tmp_path, FULL_PROFILE))
    assert cfg.name == "full"
    assert cfg.source == str(tmp_path / "prof.toml")
    assert cfg.run.threads == 2 and cfg.run.deterministic is True and cfg.run.init == "runs/base"
    assert cfg.data.name == "cifar10" and cfg.data.train_subset == 2000 and cfg.data.augment is False
    assert (cfg.model.arch, cfg.model.width, cfg.model.depth) == ("wrn", 4, 16)
    assert cfg.attack.train == AttackSpec("fgsm-rs", 0.031, 0.0078, 1, 1)
    assert cfg.attack.eval.steps == 20 and cfg.attack.eval.restarts == 2
    assert list(cfg.prune.layers.items()) == [("conv1.weight", 0.0), ("block*.conv*", 0.95), ("fc", 0.5)]
    assert (cfg.prune.scheme, cfg.prune.linear_scheme, cfg.prune.ratio) == ("filter", "column", 0.8)
    p = cfg.phases.pretrain
    assert (p.optimizer, p.lr, p.milestones, p.gamma, p.nesterov) == ("adam", 1e-3, [2, 4], 0.5, True)
    assert isinstance(p.weight_decay, float) and p.weight_decay == 0.0  # ints are accepted for floats
    assert cfg.phases.admm.epochs == 0 and cfg.phases.admm.schedule == "admm"
    assert cfg.phases.retrain.schedule == "constant"
    assert (cfg.eval.every, cfg.eval.subset, cfg.eval.final_subset) == (2, 0, 5000)


def test_name_falls_back_to_file_stem(tmp_path):
    cfg = load_profile(write(tmp_path, "[run]\nseed = 1\n", name="mnist_small.toml"))
    assert cfg.name == "mnist_small"


# ------------------------------------------------------------------------------------------ file errors


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(UserError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: no such profile file"


def test_malformed_toml_gives_file_line_column(tmp_path):
    path = write(tmp_path, "[run]\nseed = 1\nname = = 2\n")
    with pytest.raises(TomlSyntaxError) as info:
        load_profile(path)
    e = info.value
    assert isinstance(e, UserError)
    assert (e.line, e.column) == (3, 8)
    assert str(e) == f"{path}:3:8: invalid TOML: Invalid value"
    assert "\n" not in str(e)


def test_malformed_toml_at_end_of_document(tmp_path):
    path = write(tmp_path, "[run]\nseed = [1,")
    with pytest.raises(TomlSyntaxError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:2:")
    assert ": invalid TOML: " in str(info.value)


def test_error_source_is_profile_path(tmp_path):
    path = write(tmp_path, "[data]\nbatch_size = 0\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: data.batch_size: expected an integer in [1, 65536], found 0"


# ------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_did_you_mean():
    assert err({"modle": {"arch": "lenet"}}) == (
        "p.toml: modle: expected a known table, found <an unknown key> (did you mean 'model'?)")


def test_unknown_nested_key_did_you_mean():
    msg = err({"attack": {"train": {"step": 3}}})
    assert msg.startswith("p.toml: attack.train.step: expected a known key of [attack.train]")
    assert msg.endswith("(did you mean 'steps'?)")


def test_unknown_key_without_close_match_lists_known_keys():
    msg = err({"admm": {"zzzz": 1}})
    assert msg == ("p.toml: admm.zzzz: expected a known key of [admm], found <an unknown key> "
                   "(known: rho, rho_multiplier, update_every)")


def test_non_table_where_table_expected():
    assert err({"attack": {"train": 3}}) == "p.toml: attack.train: expected a table, found 3"
    assert err({"run": "fast"}) == "p.toml: run: expected a table, found 'fast'"


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize("d, expected", [
    ({"run": {"seed": "abc"}}, "p.toml: run.seed: expected an integer, found 'abc'"),
    ({"data": {"batch_size": 1.5}}, "p.toml: data.batch_size: expected an integer, found 1.5"),
    ({"attack": {"train": {"steps": True}}}, "p.toml: attack.train.steps: expected an integer, found True"),
    ({"phases": {"pretrain": {"lr": "fast"}}}, "p.toml: phases.pretrain.lr: expected a number, found 'fast'"),
    ({"admm": {"rho": False}}, "p.toml: admm.rho: expected a number, found False"),
    ({"run": {"deterministic": 1}}, "p.toml: run.deterministic: expected a boolean, found 1"),
    ({"run": {"name": 5}}, "p.toml: run.name: expected a string, found 5"),
    ({"prune": {"layers": {"fc": "high"}}}, "p.toml: prune.layers.fc: expected a number, found 'high'"),
])
def test_wrong_types(d, expected):
    assert err(d) == expected


def test_float_key_accepts_int():
    cfg = from_dict({"attack": {"eval": {"eps": 0}}, "admm": {"rho_multiplier": 2}}, "p.toml")
    assert cfg.attack.eval.eps == 0.0 and isinstance(cfg.attack.eval.eps, float)
    assert cfg.admm.rho_multiplier == 2.0 and isinstance(cfg.admm.rho_multiplier, float)


# ------------------------------------------------------------------------------------------ out of range


@pytest.mark.parametrize("d, expected", [
    ({"attack": {"train": {"eps": -0.1}}}, "attack.train.eps: expected a number >= 0, found -0.1"),
    ({"attack": {"eval": {"step_size": 0}}}, "attack.eval.step_size: expected a number > 0, found 0.0"),
    ({"prune": {"ratio": 1.0}}, "prune.ratio: expected a number in [0, 1), found 1.0"),
    ({"prune": {"ratio": -0.1}}, "prune.ratio: expected a number in [0, 1), found -0.1"),
    ({"attack": {"train": {"steps": -1}}}, "attack.train.steps: expected an integer in [1, 10000], found -1"),
    ({"attack": {"eval": {"restarts": 0}}}, "attack.eval.restarts: expected an integer in [1, 1000], found 0"),
    ({"phases": {"retrain": {"epochs": -1}}}, "phases.retrain.epochs: expected an integer in [0, 100000], found -1"),
    ({"data": {"batch_size": 0}}, "data.batch_size: expected an integer in [1, 65536], found 0"),
    ({"admm": {"rho": 0}}, "admm.rho: expected a number in [1e-08, 1000000], found 0.0"),
    ({"admm": {"rho_multiplier": 0.5}}, "admm.rho_multiplier: expected a number in [1, 100], found 0.5"),
    ({"phases": {"admm": {"momentum": 1.0}}}, "phases.admm.momentum: expected a number in [0, 1), found 1.0"),
    ({"phases": {"admm": {"gamma": 1.5}}}, "phases.admm.gamma: expected a number in (0, 1], found 1.5"),
    ({"run": {"log_interval_s": 0}}, "run.log_interval_s: expected a number in (0, 86400], found 0.0"),
    ({"run": {"seed": -3}}, "run.seed: expected an integer in [0, 4294967295], found -3"),
    ({"eval": {"subset": -1}}, "eval.subset: expected an integer in [0, 100000000], found -1"),
    ({"phases": {"pretrain": {"lr": float("nan")}}}, "phases.pretrain.lr: expected a number in (0, 10], found nan"),
])
def test_out_of_range(d, expected):
    assert err(d) == "p.toml: " + expected


def test_eps_and_step_size_above_one():
    assert err({"attack": {"train": {"eps": 8}}}) == (
        "p.toml: attack.train.eps: expected a number <= 1, found 8.0 (inputs are in [0, 1])")
    assert err({"attack": {"eval": {"step_size": 2.0}}}) == (
        "p.toml: attack.eval.step_size: expected a number <= 1, found 2.0 (inputs are in [0, 1])")
    assert from_dict({"attack": {"train": {"eps": 1}}}, "p.toml").attack.train.eps == 1.0


def test_layer_ratio_out_of_range_names_pattern():
    assert err({"prune": {"layers": {"conv1.weight": 0.5, "fc*": 1.0}}}) == (
        "p.toml: prune.layers.fc*: expected a number in [0, 1), found 1.0")
    assert err({"prune": {"layers": {"fc": -0.1}}}) == (
        "p.toml: prune.layers.fc: expected a number in [0, 1), found -0.1")
    assert err({"prune": {"layers": 0.5}}) == (
        "p.toml: prune.layers: expected a table of layer name or glob = ratio, found 0.5")


def test_milestones_must_be_increasing_non_negative_ints():
    expected = "expected a list of increasing integers >= 0"
    assert err({"phases": {"pretrain": {"milestones": [5, 2]}}}) == (
        f"p.toml: phases.pretrain.milestones: {expected}, found [5, 2]")
    assert err({"phases": {"pretrain": {"milestones": [-1, 2]}}}) == (
        f"p.toml: phases.pretrain.milestones: {expected}, found [-1, 2]")
    assert err({"phases": {"pretrain": {"milestones": [1.5]}}}) == (
        f"p.toml: phases.pretrain.milestones: {expected}, found [1.5]")
    assert err({"phases": {"pretrain": {"milestones": 3}}}) == (
        f"p.toml: phases.pretrain.milestones: {expected}, found 3")


# ------------------------------------------------------------------------------------------ choices


@pytest.mark.parametrize("d, expected", [
    ({"model": {"arch": "resnet"}},
     "model.arch: expected one of 'lenet', 'vgg16', 'resnet18', 'wrn', found 'resnet' (did you mean 'resnet18'?)"),
    ({"data": {"name": "cifar"}},
     "data.name: expected one of 'mnist-5k', 'mnist', 'cifar10', 'synthetic', found 'cifar' "
     "(did you mean 'cifar10'?)"),
    ({"prune": {"scheme": "filters"}},
     "prune.scheme: expected one of 'irregular', 'filter', 'column' or \"N:M\" with integers 0 < N < M (e.g. "
     "'2:4'), found 'filters' (did you mean 'filter'?)"),
    ({"attack": {"train": {"kind": "pdg"}}},
     "attack.train.kind: expected one of 'pgd', 'fgsm-rs', 'none', found 'pdg' (did you mean 'pgd'?)"),
    ({"attack": {"eval": {"kind": "none"}}}, "attack.eval.kind: expected one of 'pgd', 'fgsm-rs', found 'none'"),
    ({"run": {"device": "mps"}}, "run.device: expected one of 'auto', 'cpu', 'cuda', found 'mps'"),
    ({"phases": {"retrain": {"schedule": 3}}},
     "phases.retrain.schedule: expected one of 'constant', 'cosine', 'step', 'admm', found 3"),
])
def test_bad_choices(d, expected):
    assert err(d) == "p.toml: " + expected


def test_wrn_depth_rule():
    assert err({"model": {"arch": "wrn", "depth": 20}}) == (
        "p.toml: model.depth: expected an integer >= 10 with (depth - 4) % 6 == 0 for wrn, found 20 "
        "(e.g. 16, 22, 28, 34, 40)")
    assert "found 4" in err({"model": {"arch": "wrn", "depth": 4}})
    assert from_dict({"model": {"arch": "wrn", "depth": 10}}, "p.toml").model.depth == 10
    assert from_dict({"model": {"arch": "lenet", "depth": 20}}, "p.toml").model.depth == 20


# ------------------------------------------------------------------------------------------ overrides


def test_overrides_take_effect(tmp_path):
    path = write(tmp_path, "[prune.layers]\n\"conv1.weight\" = 0.1\n")
    cfg = load_profile(path, [
        "run.seed=42", "attack.train.eps=0.1", "data.name=mnist", 'run.name="quoted"', "run.bf16=true",
        "phases.pretrain.milestones=[1, 3]", "prune.layers.fc1.weight=0.95", "prune.layers.conv1.weight=0.2",
        "admm.rho = 1e-4",
    ])
    assert cfg.run.seed == 42 and cfg.attack.train.eps == 0.1 and cfg.data.name == "mnist"
    assert cfg.run.name == "quoted" and cfg.run.bf16 is True and cfg.admm.rho == 1e-4
    assert cfg.phases.pretrain.milestones == [1, 3]
    assert list(cfg.prune.layers.items()) == [("conv1.weight", 0.2), ("fc1.weight", 0.95)]


def test_apply_overrides_returns_copy():
    d = {"run": {"seed": 1}}
    out = apply_overrides(d, ["run.seed=2", "prune.layers.layer*.conv1=0.5", "data.root=/x y"], "p.toml")
    assert d == {"run": {"seed": 1}}
    assert out == {"run": {"seed": 2}, "prune": {"layers": {"layer*.conv1": 0.5}}, "data": {"root": "/x y"}}


def test_override_unknown_key():
    assert set_err(["attack.train.setps=3"]) == (
        "--set: attack.train.setps: expected a known key, found <an unknown key> "
        "(did you mean 'attack.train.steps'?)")
    assert set_err(["attack.train=3"]).startswith(
        "--set: attack.train: expected a known key, found <an unknown key> ('attack.train' is a table")


def test_override_bad_value_names_set():
    assert set_err(["attack.train.eps=-0.1"]) == "--set: attack.train.eps: expected a number >= 0, found -0.1"
    assert set_err(["run.seed=abc"]) == "--set: run.seed: expected an integer, found 'abc'"
    assert set_err(["prune.layers.fc1.weight=1.5"]) == (
        "--set: prune.layers.fc1.weight: expected a number in [0, 1), found 1.5")


def test_file_error_keeps_file_source_next_to_override(tmp_path):
    path = write(tmp_path, "[run]\nseed = -1\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path, ["run.threads=2"])
    assert str(info.value) == f"{path}: run.seed: expected an integer in [0, 4294967295], found -1"


def test_override_without_equals_or_key():
    assert set_err(["run.seed"]) == "--set: run.seed: expected dotted.key=value, found 'run.seed'"
    assert set_err(["=3"]).startswith("--set: ")
    assert "expected dotted.key=value, found '=3'" in set_err(["=3"])


def test_override_into_non_table_names_file():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"attack": 3}, ["attack.train.eps=0.1"], "p.toml")
    assert str(info.value) == "p.toml: attack: expected a table, found 3"


# ------------------------------------------------------------------------------------------ writer


def test_dump_toml_round_trip(tmp_path):
    cfg = load_profile(write(tmp_path, FULL_PROFILE),
                       ["run.name=we\"ird name ü", "data.root=we\"ird \\ root\n\tü", "admm.rho=1e-05"])
    text = dump_toml(cfg.to_dict())
    back = from_dict(tomllib.loads(text), "resolved.toml")
    assert back == cfg
    assert back.run.name == 'we"ird name ü' and back.data.root == 'we"ird \\ root\n\tü'
    assert back.admm.rho == 1e-05
    assert '"block*.conv*" = 0.95' in text and '"fc" = 0.5' in text
    assert "\n[prune.layers]\n" in text and "\n[phases.admm]\n" in text


def test_dump_toml_defaults_round_trip_and_covers_every_key():
    d = Config().to_dict()
    assert from_dict(tomllib.loads(dump_toml(d)), "d.toml") == Config()
    flat = {f"{a}.{b}" for a, t in d.items() for b in t}
    assert {"attack.train", "attack.eval", "phases.admm", "prune.layers", "run.name"} <= flat
    assert len(schema_keys()) == 13 + 9 + 3 + 2 * 6 + 5 + 3 + 3 * 13 + 7 + 1


def test_to_dict_is_plain_and_detached():
    cfg = Config()
    d = cfg.to_dict()
    assert "source" not in d
    d["prune"]["layers"]["x"] = 0.5
    d["phases"]["admm"]["milestones"].append(1)
    assert cfg.prune.layers == {} and cfg.phases.admm.milestones == []
    assert dataclasses.replace(cfg, source="other.toml") == cfg


# ------------------------------------------------------------------------------------------ N:M schemes, allocation


def test_nm_schemes_accepted(tmp_path):
    cfg = from_dict({"prune": {"scheme": "2:4", "linear_scheme": "1:8"}}, "p.toml")
    assert (cfg.prune.scheme, cfg.prune.linear_scheme) == ("2:4", "1:8")
    cfg = load_profile(write(tmp_path, "[prune]\nratio = 0.5\n"), ["prune.scheme=2:4", 'prune.linear_scheme="2:4"'])
    assert (cfg.prune.scheme, cfg.prune.linear_scheme) == ("2:4", "2:4")
    assert cfg.prune.allocation == "uniform" and cfg.prune.global_normalize is False
    back = from_dict(tomllib.loads(dump_toml(cfg.to_dict())), "resolved.toml")
    assert back == cfg


@pytest.mark.parametrize("value", ["4:2", "2:2", "0:4", "2:4:8", "02:4", "2 : 4", "-1:4", "n:m", 24, "1:1234567"])
def test_bad_nm_schemes_one_line(value):
    for key in ("scheme", "linear_scheme"):
        msg = err({"prune": {key: value}})
        assert msg.startswith(f"p.toml: prune.{key}: expected one of 'irregular', 'filter', 'column' or \"N:M\" with "
                              "integers 0 < N < M (e.g. '2:4'), found ")
        assert len(msg.splitlines()) == 1


def test_allocation_values():
    for a in ("uniform", "global", "erk"):
        assert from_dict({"prune": {"allocation": a}}, "p.toml").prune.allocation == a
    assert err({"prune": {"allocation": "erdos"}}) == (
        "p.toml: prune.allocation: expected one of 'uniform', 'global', 'erk', found 'erdos'")
    assert from_dict({"prune": {"allocation": "global", "global_normalize": True}}, "p.toml").prune.global_normalize


def test_allocation_needs_irregular_schemes_and_normalize_needs_global(tmp_path):
    assert err({"prune": {"allocation": "global", "scheme": "filter"}}) == (
        "p.toml: prune.allocation: expected 'uniform' with prune.scheme = 'filter' (global and erk rank single "
        "weights: they need prune.scheme and prune.linear_scheme = 'irregular'), found 'global'")
    assert "prune.linear_scheme = '2:4'" in err({"prune": {"allocation": "erk", "linear_scheme": "2:4"}})
    assert err({"prune": {"allocation": "erk", "global_normalize": True}}) == (
        "p.toml: prune.global_normalize: expected false with prune.allocation = 'erk' (it applies to 'global' only), "
        "found True")
    with pytest.raises(ConfigError) as ei:  # set by --set: the error says so
        load_profile(write(tmp_path, '[prune]\nscheme = "column"\n'), ["prune.allocation=global"])
    assert str(ei.value).startswith("--set: prune.allocation: expected 'uniform' with prune.scheme = 'column'")


def test_every_builtin_profile_loads_and_names_itself():
    from robprune.engine.config import builtin_profiles, load_profile

    profiles = builtin_profiles()
    assert {"mnist_quick", "mnist_speedrun", "cifar_resnet18_speedrun", "wrn_irregular"} <= set(profiles)
    for name, path in profiles.items():
        cfg = load_profile(path)
        assert cfg.run.name == name, path
