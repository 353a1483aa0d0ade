"""What results.json records besides the tables: the experiment's settings, seeds, attack settings and versions,
the rules its verdicts follow, each side's training budget, and one record per run (role, seed, status, final
accuracies, sparsity, times, ADMM convergence, the sha256 of its resolved profile)."""
from __future__ import annotations

import hashlib
import platform
import time
from typing import TYPE_CHECKING

import torch

from ..config import load_profile
from ..rundir import atomic_write_text
from . import convergence, stats
from .presets import preset_path
from .runs import RunResult
from .tables import Table

if TYPE_CHECKING:
    from .runner import Experiment


def results_record(e: Experiment, title: str, results: dict, seconds: float) -> dict:
    """results.json's dict: the experiment's title and settings, seeds, attacks, versions and runs, then ``results``
    (the report's tables, plots and extra numbers); copies every run's profile to OUT/profiles."""
    out = e.out
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, r in e.runs.items():
        text = (r.path / "profile.toml").read_text(encoding="utf-8")
        atomic_write_text(out / "profiles" / f"{name}.toml", text)
        runs[name] = run_record(r, text, f"profiles/{name}.toml", e.convergence.get(name))
    cfg = e.cfg0
    init_files = sorted(str(p.relative_to(out)) for p in (out / "init").glob("*.pt")) if (out / "init").is_dir() else []
    results = {
        "experiment": e.name, "title": title, "preset": e.preset_name,
        "preset_file": str(preset_path(e.preset_name)), "preset_description": e.preset.get("description", ""),
        "base_profile": str(e.profile), "overrides": e.user_overrides, "param_overrides": e.param_sets,
        "params": e.params,
        "out": str(out), "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "wall_seconds": round(seconds, 3),
        "train_seconds": round(sum(r["train_seconds"] for r in runs.values()), 3),
        "trained_this_call": sorted(n for n, r in e.runs.items() if r.status != "reused"),
        "seeds": {"seeds": list(e.seeds), "init_files": init_files,
                  "init": "build_model(...) after torch.manual_seed(seed), saved as a state_dict, for each seed"},
        "rules": {"spread": stats.SPREAD, "verdict": stats.RULE, "convergence": convergence.RULE,
                  "primal_converged": convergence.PRIMAL_CONVERGED},
        "budgets": budgets(e),
        "data": {"name": cfg.data.name, "batch_size": cfg.data.batch_size, "train_subset": cfg.data.train_subset,
                 "final_eval_examples": sorted({r["n"] for r in runs.values() if r["n"] is not None})},
        "model": {"arch": cfg.model.arch},
        "attack": {"train": _attack_dict(cfg.attack.train), "eval": _attack_dict(cfg.attack.eval)},
        "autoattack": _autoattack_label(runs),
        "versions": versions(),
        "runs": runs,
        **results,
    }
    results["tables"] = [t.to_dict() if isinstance(t, Table) else t for t in results.get("tables", [])]
    return results


def _attack_dict(a) -> dict:
    return {"kind": a.kind, "eps": a.eps, "step_size": a.step_size, "steps": a.steps, "restarts": a.restarts,
            "loss": a.loss}


def _autoattack_label(runs: dict) -> str:
    """The AutoAttack every run was evaluated with, named exactly ("" when none was)."""
    from ..summary import attack_label

    labels = sorted({attack_label(r["autoattack"]) for r in runs.values() if r.get("autoattack")})
    return "; ".join(labels)


def versions() -> dict:
    import torchvision

    from ..rundir import _version

    v = {"robprune": _version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "python": platform.python_version(), "platform": platform.platform()}
    try:
        import numpy

        v["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version

        v["matplotlib"] = version("matplotlib")
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def run_record(r: RunResult, profile_text: str, profile: str, admm_end: dict | None = None) -> dict:
    """A run's entry in results.json's ``runs``: its role, seed, status, final accuracies, sparsity, times and, for an
    ADMM run, the end of its ADMM phase (:func:`.convergence.admm_end`)."""
    s = r.summary
    sp = s["sparsity"]
    return {
        "role": r.spec.role, "base": r.spec.role["base"], "seed": r.spec.role["seed"], "status": r.status,
        "run_dir": str(r.path),
        "profile": profile,
        "profile_sha256": hashlib.sha256(profile_text.encode()).hexdigest(),
        "nat_acc": s["final"]["nat_acc"], "adv_acc": s["final"]["adv_acc"], "n": s["final"]["n"],
        "attack": s["final"]["attack"], "device": s.get("device"), "steps": s.get("steps"),
        "aa_acc": (s["final"].get("autoattack") or {}).get("robust_acc"),
        "autoattack": (s["final"].get("autoattack") or {}).get("attack"),
        "prunable_params": sp["prunable_params"], "prunable_nonzero": sp["prunable_nonzero"],
        "sparsity": sp["prunable"], "total_params": sp["total_params"], "nonzero_params": sp["nonzero_params"],
        "train_seconds": round(sum(s.get("phase_seconds", {}).values()), 3),
        "wall_seconds_this_call": round(r.wall_seconds, 3),
        "admm_end": admm_end,
    }


def budgets(e: Experiment) -> list[dict]:
    """Each side's training, one entry per run (its first seed's resolved profile; the seeds differ only in
    run.seed): what it starts from, each phase's epochs and settings, the training attack and the final attack."""
    out = []
    for name, r in e.runs.items():
        role = r.spec.role
        if role["seed"] != e.seeds[0]:
            continue
        cfg = load_profile(r.path / "profile.toml")
        phases = {}
        for ph in ("pretrain", "admm", "retrain"):
            pc = getattr(cfg.phases, ph)
            phases[ph] = None if pc.epochs == 0 else {
                "epochs": pc.epochs, "optimizer": pc.optimizer, "lr": pc.lr, "schedule": pc.schedule,
                "eps_warmup": pc.eps_warmup, "weight_decay": pc.weight_decay}
        a = cfg.attack.train
        out.append({"run": role["base"], "kind": role.get("kind"), "from": role.get("from", ""), "phases": phases,
                    "train_attack": "none" if a.kind == "none" else
                    f"{a.kind} eps {a.eps:g}, {a.steps} x {a.step_size:g}",
                    "final_attack": cfg.eval.final_attack,
                    "autoattack_n": cfg.eval.autoattack_n if cfg.eval.final_attack == "autoattack" else None})
    return out
