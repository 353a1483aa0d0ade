"""Experiment presets and parameters: the experiments' names, the preset files (``cpu``, ``paper``, ``tiny`` in
``profiles/experiments/``, or a path), an experiment's parameters from its preset table and ``--set exp.<param>``
with the checks of every parameter, and the profile keys the preset and ``--set`` add to every run (never the keys
an experiment sets per run itself)."""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import ALLOCATIONS, FINAL_ATTACKS, PHASES, SCHEMES, load_profile, parse_value, presets_dir, toml_value
from ..errors import ConfigError, UserError
from ..pruning import parse_nm

EXPERIMENTS = ("weight-dist", "scratch-vs-pruned", "lottery", "transfer", "schemes", "budgets")
PRESETS = ("cpu", "paper", "tiny")
PARAM_PREFIX = "exp."
# parameters every experiment takes: seeds = the run.seed of each independent repetition of every run (each seed
# trains every run from its own initial weights); final_attack = "autoattack" gives every run whose numbers a finding
# compares a final AutoAttack (eval.final_attack; eval.autoattack_n examples), and its accuracy cells a third number
COMMON_PARAMS = {"seeds": [0], "final_attack": "pgd"}

# profile keys every experiment sets per run (the user sets them through the experiment's parameters instead);
# prune.allocation is "uniform" (global_normalize false) in every run but those of `budgets`, which compares them
CONTROLLED = ("model.width", "prune.ratio", "prune.layers", "prune.allocation", "prune.global_normalize", "run.init",
              "run.name", "run.seed", "eval.final_attack", *(f"phases.{phase}.epochs" for phase in PHASES))
CONTROLLED_EXTRA = {"schemes": ("prune.scheme", "prune.linear_scheme"),
                    "budgets": ("prune.scheme", "prune.linear_scheme")}


def preset_path(preset: str | Path) -> Path:
    p = Path(preset)
    if str(preset) in PRESETS:
        return presets_dir() / f"{preset}.toml"
    if p.suffix == ".toml":
        return p
    raise UserError(f"--preset {preset}: expected one of {', '.join(PRESETS)} or a .toml file"
                    + hint(str(preset), PRESETS))


def load_preset(preset: str | Path) -> dict:
    """A preset as a dict: ``description``, ``profile`` (dotted key -> value), one table per experiment."""
    path = preset_path(preset)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such preset file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    for name in d:
        if name not in ("description", "profile", *EXPERIMENTS):
            raise UserError(f"{path}: [{name}]: expected one of description, profile, {', '.join(EXPERIMENTS)}"
                            + hint(name, EXPERIMENTS))
    return d


def hint(word: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def experiment_params(name: str, preset: dict, source: str, sets: Sequence[str]) -> dict:
    """The experiment's parameters: its preset table (``source`` names the preset file in errors), then each
    ``<param>=<value>`` of ``sets`` (the ``--set exp.`` items without the prefix), type-checked and validated."""
    base = preset.get(name)
    if not isinstance(base, dict):
        raise UserError(f"{source}: no [{name}] table: this preset does not define the experiment")
    params = {**COMMON_PARAMS, **{k: v for k, v in base.items() if k != "profile"}}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", PARAM_PREFIX + key, "exp.<parameter>=<value>", item)
        if key not in params:
            raise ConfigError("--set", PARAM_PREFIX + key, f"a parameter of {name} ("
                              + ", ".join(params) + ")", "<an unknown key>",
                              hint=hint(key, list(params)).strip(" ()"))
        value = parse_value(raw.strip())
        if not _same_type(params[key], value):
            raise ConfigError("--set", PARAM_PREFIX + key, f"a value like {toml_value(params[key])}", value)
        params[key] = float(value) if isinstance(params[key], float) else value
    user = {item.partition("=")[0].strip() for item in sets}
    _check_params(name, params, lambda key: "--set" if key in user else source)
    return params


def profile_overrides(name: str, preset: dict, source: str, profile: Path, user_overrides: Sequence[str],
                      params: dict) -> list[str]:
    """The ``dotted.key=value`` overrides every run of the experiment gets: the preset's ``[profile]`` keys, its
    ``[<experiment>.profile]`` keys, then the user's ``--set`` keys (validated on ``profile`` first, so that an error
    names --set and not the preset). Keys the experiment sets per run are refused."""
    controlled = set(CONTROLLED) | set(CONTROLLED_EXTRA.get(name, ()))
    common = preset.get("profile", {}) or {}
    own = (preset.get(name) or {}).get("profile", {}) or {}
    out = []
    for table in (common, own):
        for key, value in table.items():
            if table is own and (key in controlled or key.startswith("prune.layers.")):
                raise UserError(f"{source}: {key}: set by the experiment for each run; remove it from the preset")
            out.append(f"{key}={toml_value(value)}")
    for item in user_overrides:
        key = item.partition("=")[0].strip()
        if key in controlled or key.startswith("prune.layers."):
            raise ConfigError("--set", key, "a key the experiment does not set per run", "<a controlled key>",
                              hint="every run's seed is one of exp.seeds: --set exp.seeds=[0,1,2]"
                              if key == "run.seed" else f"{name} sets it for each run; change the experiment's "
                              f"parameters with --set exp.<name>=<value> ({', '.join(params)})")
    load_profile(profile, user_overrides)
    return out + list(user_overrides)


def _check_params(name: str, p: dict, origin: Callable[[str], str]) -> None:
    def bad(key: str, expected: str) -> UserError:
        return ConfigError(origin(key), f"{PARAM_PREFIX}{key}", expected, p.get(key))

    def widths(key: str, *, many: bool = True) -> list[int]:
        v = p[key]
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            raise bad(key, "a non-empty list of widths >= 1")
        if len(set(v)) != len(v):
            raise bad(key, "a list of distinct widths")
        if many and len(v) < 2 and name == "scratch-vs-pruned":
            raise bad(key, "at least two widths (pairs w_L > w_S are pruned)")
        return v

    seeds = p.get("seeds")
    if not isinstance(seeds, list) or not seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                                       for x in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", "a non-empty list of distinct integers >= 0")
    if p.get("final_attack") not in FINAL_ATTACKS:
        raise bad("final_attack", " or ".join(repr(a) for a in FINAL_ATTACKS))
    for key, v in p.items():
        if key.endswith("epochs") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(key, "an integer >= 1")
    if name in ("weight-dist", "scratch-vs-pruned"):
        widths("widths")
    if name in ("lottery", "schemes"):
        w = p["width"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 2:
            raise bad("width", "an integer >= 2")
        t = widths("targets")
        if any(x >= w for x in t):
            raise bad("targets", f"widths below width = {w}")
    if name == "budgets":
        w = p["width"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise bad("width", "an integer >= 1")
        r = p["ratios"]
        if not isinstance(r, list) or not r or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                   or not 0 < x < 1 for x in r) or len(set(r)) != len(r):
            raise bad("ratios", "a non-empty list of distinct overall sparsities in (0, 1)")
        p["ratios"] = [float(x) for x in r]
        a = p["allocations"]
        if not isinstance(a, list) or any(x not in ALLOCATIONS for x in a) or len(set(a)) != len(a) \
                or "uniform" not in a or len(a) < 2:
            raise bad("allocations", "a list of distinct allocations among " + ", ".join(ALLOCATIONS)
                      + " with 'uniform' and at least one other (the finding compares them with uniform)")
        if not isinstance(p["global_normalize"], bool):
            raise bad("global_normalize", "true or false")
    if name == "schemes":
        s = p["schemes"]
        if not isinstance(s, list) or not s or any(x not in SCHEMES for x in s) or len(set(s)) != len(s):
            raise bad("schemes", "a list of distinct schemes among " + ", ".join(SCHEMES))
        if p["linear"] not in ("irregular", "match"):
            raise bad("linear", "'irregular' or 'match'")
        if p["nm"] and parse_nm(p["nm"]) is None:
            raise bad("nm", "an N:M pattern such as \"2:4\" (0 < N < M), or \"\" for none")
    if name == "transfer":
        dense = widths("dense")
        if not isinstance(p["natural"], list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                     for x in p["natural"]):
            raise bad("natural", "a list of widths >= 1")
        pr = p["pruned"]
        if not isinstance(pr, list) or any(not isinstance(x, list) or len(x) != 2 or not all(
                isinstance(y, int) and not isinstance(y, bool) for y in x) or not x[0] > x[1] >= 1 for x in pr):
            raise bad("pruned", "a list of [w_L, w_S] pairs with w_L > w_S >= 1")
        if any(x[0] not in dense for x in pr):
            raise bad("pruned", f"pairs whose w_L is one of the dense widths {dense}")
        if isinstance(p["subset"], bool) or not isinstance(p["subset"], int) or p["subset"] < 1:
            raise bad("subset", "an integer >= 1")
    if "near_zero" in p and not (isinstance(p["near_zero"], (int, float)) and 0 < p["near_zero"] < 1):
        raise bad("near_zero", "a number in (0, 1)")
    if "match_tolerance" in p and not (isinstance(p["match_tolerance"], (int, float)) and p["match_tolerance"] >= 0):
        raise bad("match_tolerance", "a number >= 0")
