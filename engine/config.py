"""Run profiles: the typed schema, TOML loading with validation, ``--set`` overrides, the TOML writer and the
comparison of two resolved profiles.

A profile is a TOML file whose tables mirror the dataclasses below. ``load_profile`` reads one, applies
``dotted.key=value`` overrides and validates everything; any problem raises a one-line ``UserError``
(``ConfigError`` for a bad key or value, ``TomlSyntaxError`` for a file that is not valid TOML).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import stat
import tomllib
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import tomli_w

from robprune.engine.errors import ConfigError, UserError, file_kind

OVERRIDE_SOURCE = "--set"
LAYERS_KEY = "prune.layers"

PHASES = ("pretrain", "admm", "retrain")  # the pipeline's training phases, in order
ATTACK_KINDS = ("pgd", "fgsm-rs", "none")
EVAL_ATTACK_KINDS = ("pgd", "fgsm-rs")
ATTACK_LOSSES = ("ce", "cw")  # PGD's loss: cross-entropy, Carlini-Wagner margin
FINAL_ATTACKS = ("pgd", "autoattack")
AUTOATTACK_VERSIONS = ("standard", "rand")
SCHEMES = ("irregular", "filter", "column")  # the named schemes; prune.scheme also takes "N:M" (e.g. "2:4")
ALLOCATIONS = ("uniform", "global", "erk")
SCHEDULES = ("constant", "cosine", "step", "admm")


# --------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = ""
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    threads: int = 0
    log_interval_s: float = 1.0
    checkpoint_every: int = 1
    init: str = ""
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    dist_timeout_s: float = 600.0


@dataclass
class DataConfig:
    name: str = "mnist-5k"
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    test_batch_size: int = 500
    train_subset: int = 0
    augment: bool = True
    synthetic_train: int = 512
    synthetic_test: int = 256


@dataclass
class ModelConfig:
    arch: str = "lenet"
    width: int = 16
    depth: int = 28


@dataclass
class AttackSpec:
    kind: str = "pgd"
    eps: float = 0.3
    step_size: float = 0.01
    steps: int = 40
    restarts: int = 1
    loss: str = "ce"  # PGD's loss: "ce" (cross-entropy) or "cw" (Carlini-Wagner margin)


@dataclass
class AttackConfig:
    train: AttackSpec = field(default_factory=AttackSpec)
    eval: AttackSpec = field(default_factory=AttackSpec)


@dataclass
class PruneConfig:
    scheme: str = "irregular"
    linear_scheme: str = "irregular"
    ratio: float = 0.9
    layers: dict[str, float] = field(default_factory=dict)  # pattern -> ratio, in file order
    # how prune.ratio becomes per-layer ratios: "uniform" (each layer at prune.ratio), "global" (one magnitude
    # ranking over all layers, made when the ADMM phase starts) or "erk" (Erdos-Renyi-Kernel densities)
    allocation: str = "uniform"
    global_normalize: bool = False  # global: rank |w| / RMS of its layer instead of |w|


@dataclass
class AdmmConfig:
    rho: float = 1e-3
    rho_multiplier: float = 1.3
    update_every: int = 4


@dataclass
class PhaseConfig:
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    eps_warmup: int = 0  # epochs over which the training attack's eps (and step) ramp up linearly from 0
    # this phase's training attack, where it differs from attack.train ("" / 0: attack.train's): e.g. single-step
    # training while the model is dense, PGD for the final retraining
    attack_kind: str = ""
    attack_steps: int = 0
    attack_step_size: float = 0.0


def phase_attack(train: AttackSpec, pc: PhaseConfig) -> AttackSpec:
    """The training attack of a phase: ``attack.train`` with the phase's ``attack_kind`` / ``attack_steps`` /
    ``attack_step_size`` where they are set."""
    return dataclasses.replace(train, kind=pc.attack_kind or train.kind, steps=pc.attack_steps or train.steps,
                               step_size=pc.attack_step_size or train.step_size)


@dataclass
class PhasesConfig:
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    admm: PhaseConfig = field(default_factory=lambda: PhaseConfig(schedule="admm"))
    retrain: PhaseConfig = field(default_factory=PhaseConfig)


@dataclass
class EvalConfig:
    every: int = 1
    subset: int = 1000
    final_subset: int = 0
    # the run's final robustness number: "pgd" (attack.eval on final_subset) or "autoattack" (also AutoAttack of
    # autoattack_version on the first autoattack_n test examples, the number the summary reports)
    final_attack: str = "pgd"
    autoattack_n: int = 1000
    autoattack_version: str = "standard"
    # single-step training (attack.train.kind = "fgsm-rs"): after every epoch, PGD and the training attack on the
    # first overfit_check test examples, to detect catastrophic overfitting (engine/overfit.py); 0: off
    overfit_check: int = 256


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = field(default="", compare=False)  # profile path (or a label); not part of equality
    overridden: frozenset = field(default=frozenset(), compare=False)  # dotted keys set by --set overrides

    def origin(self, dotted: str) -> str:
        """Where a key's value came from, for error messages: ``--set`` (the key or a table above it was set
        there) or the profile file."""
        parts = dotted.split(".")
        if any(".".join(parts[:i]) in self.overridden for i in range(len(parts), 0, -1)):
            return OVERRIDE_SOURCE
        return self.source

    @property
    def name(self) -> str:
        """The run name: ``run.name``, else the profile file's stem."""
        return self.run.name or Path(self.source).stem or "run"

    def to_dict(self) -> dict[str, Any]:
        """Every schema key with its resolved value, as plain nested dicts (no ``source``)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("overridden")
        return d


# --------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class _Rule:
    """How one leaf value is checked: its type, bounds and allowed choices."""

    kind: str  # "int" | "float" | "bool" | "name" | "path" | "choice" | "int_list" | "scheme"
    lo: float | None = None
    lo_open: bool = False  # True: value must be > lo
    hi: float | None = None
    hi_open: bool = False  # True: value must be < hi
    split_hi: str = ""  # when set, the upper bound is reported on its own with this note
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        if self.lo is not None and self.hi is not None and not self.split_hi:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f" in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        if self.lo is not None:
            return f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _int(lo: int | None = None, hi: int | None = None) -> _Rule:
    return _Rule("int", lo=lo, hi=hi)


def _float(lo=None, lo_open=False, hi=None, hi_open=False, split_hi="") -> _Rule:
    return _Rule("float", lo=lo, lo_open=lo_open, hi=hi, hi_open=hi_open, split_hi=split_hi)


def _choice(*choices: str) -> _Rule:
    return _Rule("choice", choices=choices)


_BOOL = _Rule("bool")
_NAME = _Rule("name")  # a run's name: one path component, never a path (--run-dir chooses a place)
_PATH = _Rule("path")
_UNIT = "inputs are in [0, 1]"
_RATIO = _float(0, hi=1, hi_open=True)

# Every number has a stated range: what passes here cannot overflow or crash later (sizes that fit the range but
# not the machine are refused by the memory estimate in engine/models.py, before a run directory is made).
_BIG = 10**8  # examples, subsets
_MANY = 100_000  # epochs, intervals
_RULES: dict[str, _Rule] = {
    "run.name": _NAME,
    "run.seed": _int(0, 2**32 - 1),
    "run.device": _choice("auto", "cpu", "cuda"),
    "run.deterministic": _BOOL,
    "run.threads": _int(0, 1024),
    "run.log_interval_s": _float(0, lo_open=True, hi=86400),
    "run.checkpoint_every": _int(0, _MANY),
    "run.init": _PATH,
    "run.bf16": _BOOL,
    "run.channels_last": _BOOL,
    "run.compile": _BOOL,
    "run.sync_bn": _BOOL,
    "run.dist_timeout_s": _float(10, hi=86400),
    "data.name": _choice("mnist-5k", "mnist", "cifar10", "synthetic"),
    "data.root": _PATH,
    "data.download": _BOOL,
    "data.batch_size": _int(1, 65536),
    "data.test_batch_size": _int(1, 65536),
    "data.train_subset": _int(0, _BIG),
    "data.augment": _BOOL,
    "data.synthetic_train": _int(1, _BIG),
    "data.synthetic_test": _int(1, _BIG),
    "model.arch": _choice("lenet", "vgg16", "resnet18", "wrn"),
    "model.width": _int(1, 1024),
    "model.depth": _int(1, 1000),
    "prune.scheme": _Rule("scheme", choices=SCHEMES),
    "prune.linear_scheme": _Rule("scheme", choices=SCHEMES),
    "prune.ratio": _RATIO,
    "prune.allocation": _choice(*ALLOCATIONS),
    "prune.global_normalize": _BOOL,
    "admm.rho": _float(1e-8, hi=1e6),
    "admm.rho_multiplier": _float(1, hi=100),
    "admm.update_every": _int(1, _MANY),
    "eval.every": _int(0, _MANY),
    "eval.subset": _int(0, _BIG),
    "eval.final_subset": _int(0, _BIG),
    "eval.final_attack": _choice(*FINAL_ATTACKS),
    "eval.autoattack_n": _int(1, _BIG),
    "eval.autoattack_version": _choice(*AUTOATTACK_VERSIONS),
    "eval.overfit_check": _int(0, _BIG),
}
for _which, _kinds in (("train", ATTACK_KINDS), ("eval", EVAL_ATTACK_KINDS)):
    _RULES.update({
        f"attack.{_which}.kind": _choice(*_kinds),
        f"attack.{_which}.eps": _float(0, hi=1, split_hi=_UNIT),
        f"attack.{_which}.step_size": _float(0, lo_open=True, hi=1, split_hi=_UNIT),
        f"attack.{_which}.steps": _int(1, 10_000),
        f"attack.{_which}.restarts": _int(1, 1000),
        f"attack.{_which}.loss": _choice(*ATTACK_LOSSES),
    })
for _phase in PHASES:
    _RULES.update({
        f"phases.{_phase}.epochs": _int(0, _MANY),
        f"phases.{_phase}.optimizer": _choice("sgd", "adam"),
        f"phases.{_phase}.lr": _float(0, lo_open=True, hi=10),
        f"phases.{_phase}.momentum": _float(0, hi=1, hi_open=True),
        f"phases.{_phase}.nesterov": _BOOL,
        f"phases.{_phase}.weight_decay": _float(0, hi=1),
        f"phases.{_phase}.schedule": _choice(*SCHEDULES),
        f"phases.{_phase}.milestones": _Rule("int_list", lo=0),
        f"phases.{_phase}.gamma": _float(0, lo_open=True, hi=1),
        f"phases.{_phase}.eps_warmup": _int(0, _MANY),
        f"phases.{_phase}.attack_kind": _choice("", *ATTACK_KINDS),
        f"phases.{_phase}.attack_steps": _int(0, 10_000),
        f"phases.{_phase}.attack_step_size": _float(0, hi=1, split_hi=_UNIT),
    })


def int_bounds(key: str) -> tuple[int, int]:
    """The (lowest, highest) value a profile allows for the integer ``key``: the command line's options that set
    the same thing (robprune bench --width, --batch, ...) take their bounds from here."""
    rule = _RULES[key]
    assert rule.kind == "int" and rule.lo is not None and rule.hi is not None, key
    return int(rule.lo), int(rule.hi)


def schema_keys() -> list[str]:
    """Every settable dotted key (``prune.layers`` stands for its whole table)."""
    return [*_RULES, LAYERS_KEY]


# --------------------------------------------------------------------------------------------- errors


class TomlSyntaxError(UserError):
    """A profile is not valid TOML; the message is ``<file>:<line>:<column>: invalid TOML: <reason>``."""

    def __init__(self, path: str, line: int, column: int, reason: str):
        self.path, self.line, self.column, self.reason = path, line, column, reason
        super().__init__(f"{path}:{line}:{column}: invalid TOML: {reason}")


def _toml_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> TomlSyntaxError:
    message = str(exc).splitlines()[0] if str(exc) else "syntax error"
    line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
    elif re.search(r"\(at end of document\)\s*$", message) and line is None:
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)\s*$", "", message)
    reason = getattr(exc, "msg", None) or reason
    return TomlSyntaxError(path, line or 1, col or 1, reason)


def _found(value: Any) -> Any:
    """What to show after 'found': the value itself for plain TOML values, a short label otherwise."""
    if isinstance(value, dict):
        return "<a table>"
    if isinstance(value, (str, bool, int, float, list)):
        return value
    return f"<a {type(value).__name__}>"


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------------------------- validation


class _Origins:
    """Which dotted keys came from ``--set`` overrides, to name the right source in errors."""

    def __init__(self, source: str, overridden: set[str] | None = None):
        self.source = source
        self.overridden = overridden or set()

    def of(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.overridden:
                return OVERRIDE_SOURCE
        return self.source


def _check(rule: _Rule, value: Any, key: str, src: str) -> Any:
    """Return ``value`` converted to the rule's type, or raise ConfigError."""
    if rule.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(src, key, "a boolean", _found(value))
        return value
    if rule.kind in ("name", "path"):
        if not isinstance(value, str):
            raise ConfigError(src, key, "a string", _found(value))
        if "\x00" in value or len(value) > 4096:
            raise ConfigError(src, key, "a string without NUL bytes, of at most 4096 characters",
                              f"<a string of {len(value)} characters>" if len(value) > 80 else value)
        if rule.kind == "name" and value and (len(value) > 100 or not value.isprintable() or value in (".", "..")
                                              or any(c in value for c in "/\\")):
            raise ConfigError(src, key, "a name of at most 100 printable characters without / or \\ (a name, "
                              "not a path: --run-dir chooses where the run goes)", value[:100])
        return value
    if rule.kind == "choice":
        expected = "one of " + ", ".join(repr(c) for c in rule.choices)
        if value not in rule.choices or not isinstance(value, str):
            hint = _did_you_mean(value, rule.choices) if isinstance(value, str) else ""
            raise ConfigError(src, key, expected, _found(value), hint=hint)
        return value
    if rule.kind == "scheme":  # a named scheme, or "N:M" (integers 0 < N < M)
        from robprune.engine.pruning import NM_EXPECTED, is_scheme

        if not isinstance(value, str) or not is_scheme(value):
            hint = _did_you_mean(value, rule.choices) if isinstance(value, str) else ""
            raise ConfigError(src, key, NM_EXPECTED, _found(value), hint=hint)
        return value
    if rule.kind == "int_list":
        expected = f"a list of increasing integers{rule.range_text()}"
        if not isinstance(value, list):
            raise ConfigError(src, key, expected, _found(value))
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not _in_range(rule, item, upper=False):
                raise ConfigError(src, key, expected, _found(value))
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ConfigError(src, key, expected, _found(value))
        return list(value)
    if rule.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(src, key, "an integer", _found(value))
        if not _in_range(rule, value, upper=not rule.split_hi):
            raise ConfigError(src, key, f"an integer{rule.range_text()}", value)
        return value
    if rule.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(src, key, "a number", _found(value))
        value = float(value)
        if not math.isfinite(value) or not _in_range(rule, value, upper=not rule.split_hi):
            raise ConfigError(src, key, f"a number{rule.range_text()}", value)
        if rule.split_hi and not (value <= rule.hi if not rule.hi_open else value < rule.hi):
            raise ConfigError(src, key, f"a number {'<' if rule.hi_open else '<='} {_num(rule.hi)}",
                              value, hint=rule.split_hi)
        return value
    raise AssertionError(f"unknown rule kind {rule.kind!r}")


def _in_range(rule: _Rule, x: float, *, upper: bool) -> bool:
    if rule.lo is not None and not (x > rule.lo if rule.lo_open else x >= rule.lo):
        return False
    if upper and rule.hi is not None and not (x < rule.hi if rule.hi_open else x <= rule.hi):
        return False
    return True


def _check_layers(value: Any, origins: _Origins) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(origins.of(LAYERS_KEY), LAYERS_KEY, "a table of layer name or glob = ratio",
                          _found(value))
    layers: dict[str, float] = {}
    for pattern, ratio in value.items():
        key = f"{LAYERS_KEY}.{pattern}"
        if not pattern:
            raise ConfigError(origins.of(key), key, "a layer name or glob", "<an empty name>")
        layers[pattern] = _check(_RATIO, ratio, key, origins.of(key))
    return layers


def _build(default: Any, d: Any, path: str, origins: _Origins) -> Any:
    """Build a dataclass like ``default`` from table ``d`` (missing keys keep the default's values)."""
    if not isinstance(d, dict):
        raise ConfigError(origins.of(path), path, "a table", _found(d))
    names = [f.name for f in dataclasses.fields(default) if f.name not in ("source", "overridden")]
    values = {name: copy.deepcopy(getattr(default, name)) for name in names}
    for key, value in d.items():
        dotted = f"{path}.{key}" if path else key
        if key not in names:
            expected = f"a known key of [{path}]" if path else "a known table"
            hint = _did_you_mean(key, names) or "known: " + ", ".join(names)
            raise ConfigError(origins.of(dotted), dotted, expected, "<an unknown key>", hint=hint)
        current = values[key]
        if dataclasses.is_dataclass(current):
            values[key] = _build(current, value, dotted, origins)
        elif dotted == LAYERS_KEY:
            values[key] = _check_layers(value, origins)
        else:
            values[key] = _check(_RULES[dotted], value, dotted, origins.of(dotted))
    return type(default)(**values)


def _cross_checks(cfg: Config, origins: _Origins) -> None:
    m = cfg.model
    if m.arch == "wrn" and (m.depth < 10 or (m.depth - 4) % 6 != 0):
        raise ConfigError(origins.of("model.depth"), "model.depth",
                          "an integer >= 10 with (depth - 4) % 6 == 0 for wrn", m.depth,
                          hint="e.g. 16, 22, 28, 34, 40")
    pr = cfg.prune
    if pr.allocation != "uniform" and (pr.scheme != "irregular" or pr.linear_scheme != "irregular"):
        key, scheme = (("prune.scheme", pr.scheme) if pr.scheme != "irregular"
                       else ("prune.linear_scheme", pr.linear_scheme))
        raise ConfigError(origins.of("prune.allocation"), "prune.allocation",
                          f"'uniform' with {key} = {scheme!r} (global and erk rank single weights: they need "
                          "prune.scheme and prune.linear_scheme = 'irregular')", pr.allocation)
    if pr.global_normalize and pr.allocation != "global":
        raise ConfigError(origins.of("prune.global_normalize"), "prune.global_normalize",
                          f"false with prune.allocation = {pr.allocation!r} (it applies to 'global' only)", True)


def _from_dict(d: dict, source: str, overridden: set[str]) -> Config:
    origins = _Origins(source, overridden)
    cfg = _build(Config(), d, "", origins)
    cfg.source = source
    cfg.overridden = frozenset(overridden)
    _cross_checks(cfg, origins)
    return cfg


def from_dict(d: dict, source: str) -> Config:
    """Validate a profile's parsed tables and return the Config; ``source`` names it in errors."""
    return _from_dict(d, source, set())


# --------------------------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``), else the text as a plain string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


def _apply_overrides(d: dict, overrides: Sequence[str], source: str) -> tuple[dict, set[str]]:
    out = copy.deepcopy(d)
    overridden: set[str] = set()
    known = schema_keys()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(OVERRIDE_SOURCE, key or "<override>", "dotted.key=value", item)
        if key.startswith(LAYERS_KEY + "."):
            parts = ["prune", "layers", key[len(LAYERS_KEY) + 1:]]
            if not parts[2]:
                raise ConfigError(OVERRIDE_SOURCE, key, "a layer name or glob after 'prune.layers.'", item)
        elif key in known:
            parts = key.split(".")
        else:
            inside = [k for k in known if k.startswith(key + ".")]
            hint = (f"{key!r} is a table; set one of its keys, e.g. {inside[0]!r}" if inside
                    else _did_you_mean(key, known))
            raise ConfigError(OVERRIDE_SOURCE, key, "a known key", "<an unknown key>", hint=hint)
        table = out
        for i, part in enumerate(parts[:-1]):
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                dotted = ".".join(parts[: i + 1])
                raise ConfigError(source, dotted, "a table", _found(sub))
            table = sub
        table[parts[-1]] = parse_value(raw.strip())
        overridden.add(key)
    return out, overridden


def apply_overrides(d: dict, overrides: Sequence[str], source: str) -> dict:
    """Return a copy of ``d`` with each ``dotted.key=value`` override set (``d`` is left untouched).

    Values are read as TOML values, falling back to plain strings (so ``data.name=mnist`` works).
    ``prune.layers.<pattern>=<ratio>`` takes everything after ``prune.layers.`` as the pattern.
    """
    return _apply_overrides(d, overrides, source)[0]


# --------------------------------------------------------------------------------------------- built-in profiles


def _profiles_root() -> Path:
    """The folder of the built-in profiles (package data of ``robprune.profiles``)."""
    return Path(str(resources.files("robprune.profiles")))


def builtin_profiles() -> dict[str, Path]:
    """The profiles shipped with the package, by name (``mnist_quick`` -> its .toml), sorted by name."""
    root = _profiles_root()
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def presets_dir() -> Path:
    """The folder of the built-in experiment presets (``cpu``, ``paper``, ``tiny``)."""
    return _profiles_root() / "experiments"


def profile_description(path: Path) -> str:
    """The first sentence of a profile's leading comment (its one-line description)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = re.search(r"\.\s+(?=[A-Z])", text)
    return text[:end.start() + 1] if end else text


def resolve_profile(arg: str | Path) -> Path:
    """Where PROFILE points: a file path when one exists there (a path always wins); otherwise a built-in profile
    named ``NAME``, ``NAME.toml`` or ``profiles/NAME.toml`` (so the commands in the docs work from any directory).
    Anything else is returned as given, for :func:`load_profile` to report."""
    p = Path(arg)
    if p.exists() or p.is_symlink():
        return p
    if p.parent in (Path("."), Path("profiles")) and p.suffix in ("", ".toml"):
        builtin = builtin_profiles().get(p.stem if p.suffix else p.name)
        if builtin is not None:
            return builtin
    return p


def load_profile(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML profile (a path, or the name of a built-in one), apply ``--set`` overrides and validate;
    errors are one-line UserErrors."""
    source = str(path)
    p = resolve_profile(path)
    if p != Path(path):
        source = str(p)  # a built-in profile: errors name the file that was read
    raw = _read_profile_bytes(p, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not a UTF-8 text file (byte {e.start})") from None
    return load_profile_text(text, source, overrides)


def load_profile_text(text: str, source: str, overrides: Sequence[str] = ()) -> Config:
    """:func:`load_profile` of a profile's text (``source`` names it in errors)."""
    try:
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise _toml_error(source, text, e) from None
        d, overridden = _apply_overrides(d, overrides, source)
        return _from_dict(d, source, overridden)
    except RecursionError:
        raise UserError(f"{source}: nested too deeply: expected the profile's tables (a few levels) and flat "
                        "values") from None


MAX_PROFILE_BYTES = 1 << 20


def _read_profile_bytes(p: Path, source: str) -> bytes:
    """The bytes of a profile file: a regular file of at most 1 MiB (a FIFO would hang, /dev/zero never end)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.parent in (Path("."), Path("profiles")):  # it may have meant a built-in profile
            raise UserError(f"{source}: no such profile file, and no built-in profile of that name (built-in: "
                            f"{', '.join(builtin_profiles())})") from None
        raise UserError(f"{source}: no such profile file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read profile: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{source}: is a directory, expected a TOML profile file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{source}: is {file_kind(st.st_mode)}, expected a regular TOML profile file")
    if st.st_size > MAX_PROFILE_BYTES:
        raise UserError(f"{source}: {st.st_size:,} bytes, expected a profile of at most {MAX_PROFILE_BYTES:,} bytes")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise UserError(f"{source}: cannot read profile: {e.strerror or e}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise UserError(f"{source}: more than {MAX_PROFILE_BYTES:,} bytes, expected a profile of at most that")
    return raw


# --------------------------------------------------------------------------------------------- TOML writer


def toml_value(v: Any) -> str:
    """One value as TOML text on one line (arrays inline), for ``dotted.key=value`` overrides and listings."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if v:
            raise TypeError("cannot write a non-empty table as one TOML value")
        return "{}"
    return tomli_w.dumps({"v": v}).removeprefix("v = ").removesuffix("\n")


def dump_toml(d: dict) -> str:
    """Write nested dicts as TOML with tomli_w: scalars and lists first (a non-empty list one item a line), then each
    sub-table under its own header.

    Keys of ``[prune.layers]`` are always quoted (they are layer names or globs).
    """
    table, _, name = LAYERS_KEY.partition(".")
    parent = d.get(table)
    layers = parent.get(name) if isinstance(parent, dict) else None
    if not isinstance(layers, dict) or not layers:
        return tomli_w.dumps(d)
    lines = tomli_w.dumps({**d, table: {**parent, name: {}}}).split("\n")
    at = lines.index(f"[{LAYERS_KEY}]") + 1
    lines[at:at] = [f"{toml_value(str(k))} = {toml_value(v)}" for k, v in layers.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- profile comparison

_MISSING = "<missing>"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested tables as one level of dotted keys; an empty table stays a key of its own (value ``{}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key) or {key: {}})
        else:
            out[key] = v
    return out


def profile_change(old: str, new: str, *, ignore: Sequence[str] = (), arrow: str = "->",
                   unreadable: str = "?") -> str | None:
    """How two profile texts differ in their values, for a one-line message: ``key: old <arrow> new`` for the first
    differing dotted key (``and N more`` when there are others), or None when they hold the same values (formatting
    aside, and leaving out the keys in ``ignore``). A text that is not TOML differs at the key ``unreadable``."""
    if old == new:
        return None
    try:
        a, b = flatten(tomllib.loads(old)), flatten(tomllib.loads(new))
    except tomllib.TOMLDecodeError:
        a, b = {unreadable: "?"}, {}
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING) and k not in ignore]
    if not diff:
        return None
    k = diff[0]
    more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
    return f"{k}: {a.get(k, _MISSING)!r} {arrow} {b.get(k, _MISSING)!r}{more}"
