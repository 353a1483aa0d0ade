"""Catastrophic overfitting checks of single-step training: the rules, and the engine's events and warnings."""
from __future__ import annotations

import pytest

from robprune.engine import overfit
from robprune.engine.rundir import read_jsonl
from tests.conftest import run_session


def test_gap_rule_fires_only_beyond_the_gap():
    m = overfit.OverfitMonitor()
    assert m.judge("pretrain", apgd_acc=0.50, train_attack_acc=0.50 + overfit.GAP - 0.01) is None
    assert m.judge("pretrain", apgd_acc=0.02, train_attack_acc=0.02 + overfit.GAP + 0.01) == "gap"


def test_drop_rule_counts_from_the_best_of_the_phase_and_resets_per_phase():
    m = overfit.OverfitMonitor()
    assert m.judge("pretrain", 0.60, 0.70) is None
    assert m.judge("pretrain", 0.60 - overfit.DROP + 0.01, 0.40) is None  # a dip within the rule
    assert m.best == 0.60
    assert m.judge("pretrain", 0.60 - overfit.DROP - 0.01, 0.40) == "drop"
    # a new phase (the hard prune may cost accuracy): its own best
    assert m.judge("retrain", 0.20, 0.30) is None and m.best == 0.20
    st = m.state_dict()
    m2 = overfit.OverfitMonitor()
    m2.load_state_dict(st)
    assert (m2.phase, m2.best) == ("retrain", 0.20)


def test_message_gives_the_numbers():
    text = overfit.message("gap", n=256, apgd_acc=0.031, train_attack_acc=0.875, best=0.5, kind="FGSM-RS")
    assert "256 held-out examples" in text and "87.5%" in text and "3.1%" in text
    text = overfit.message("drop", n=64, apgd_acc=0.1, train_attack_acc=0.2, best=0.55, kind="FGSM-RS")
    assert "down from 55.0%" in text


def _run(tmp_path, overrides):
    return run_session(tmp_path, ["attack.train.kind=\"fgsm-rs\"", "attack.train.step_size=0.125",
                                  "eval.overfit_check=64", "eval.final_attack=\"pgd\"", *overrides])[0]


def test_single_step_training_checks_every_epoch(tmp_path):
    s = _run(tmp_path, [])
    checks = [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "overfit_check"]
    cfg = s.engine.cfg
    epochs = sum(getattr(cfg.phases, p).epochs for p in ("pretrain", "admm", "retrain"))
    assert len(checks) == epochs
    assert [c["phase"] for c in checks] == (["pretrain"] * cfg.phases.pretrain.epochs + ["admm"] * cfg.phases.admm.epochs
                                           + ["retrain"] * cfg.phases.retrain.epochs)
    for c in checks:
        assert c["n"] == 64 and c["train_attack"] == "fgsm-rs"
        assert 0.0 <= c["apgd_acc"] <= c["train_attack_acc"] + 0.25 and c["train_attack_acc"] <= 1.0
        assert c["apgd_steps"] == s.engine.cfg.attack.eval.steps
        # accuracies of 64 examples: multiples of 1/64
        assert round(c["apgd_acc"] * 64, 6) == int(round(c["apgd_acc"] * 64))


def test_a_detection_is_a_warning_in_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(overfit, "GAP", -1.0)  # every check fires: the plumbing, not the threshold, is tested
    s = _run(tmp_path, [])
    warnings = [e for e in read_jsonl(s.rundir.events) if e["type"] == "log" and e.get("level") == "warning"
                and "catastrophic overfitting" in e.get("message", e.get("text", ""))]
    checks = [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "overfit_check"]
    assert checks and all(c["detected"] == "gap" for c in checks)
    assert len(warnings) == len(checks)


def test_pgd_training_is_not_checked(tmp_path):
    s, _ = run_session(tmp_path, ["eval.final_attack=\"pgd\"", "phases.admm.epochs=0", "phases.retrain.epochs=0"])
    assert not [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "overfit_check"]


@pytest.mark.parametrize("value", ["-1", "1.5", "\"many\""])
def test_overfit_check_key_is_validated(tmp_path, value):
    from robprune.engine.config import load_profile
    from robprune.engine.errors import ConfigError
    from tests.conftest import TINY

    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    with pytest.raises(ConfigError) as exc:
        load_profile(prof, [f"eval.overfit_check={value}"])
    assert "eval.overfit_check" in str(exc.value)


def test_a_phase_can_train_with_its_own_attack(tmp_path):
    """phases.pretrain.attack_kind = "fgsm-rs" under attack.train = PGD: single-step (and checked) in the dense
    phase only; the other phases train with PGD and are not checked."""
    from robprune.engine.config import load_profile, phase_attack
    from tests.conftest import TINY

    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    over = ["phases.pretrain.attack_kind=\"fgsm-rs\"", "phases.pretrain.attack_step_size=0.125",
            "phases.pretrain.attack_steps=1", "eval.overfit_check=32", "eval.final_attack=\"pgd\""]
    cfg = load_profile(prof, over)
    pre, adm = phase_attack(cfg.attack.train, cfg.phases.pretrain), phase_attack(cfg.attack.train, cfg.phases.admm)
    assert (pre.kind, pre.steps, pre.step_size, pre.eps) == ("fgsm-rs", 1, 0.125, cfg.attack.train.eps)
    assert adm == cfg.attack.train
    s, _ = run_session(tmp_path / "r", over)
    checks = [r for r in read_jsonl(s.rundir.metrics) if r["type"] == "overfit_check"]
    assert [c["phase"] for c in checks] == ["pretrain"] * cfg.phases.pretrain.epochs
    with pytest.raises(Exception) as exc:
        load_profile(prof, ["phases.retrain.attack_kind=\"fgsm\""])
    assert "phases.retrain.attack_kind" in str(exc.value)
