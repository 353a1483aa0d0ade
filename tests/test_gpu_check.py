"""tools/gpu_check.py on the CPU: its exit without CUDA, and each of its parts with device="cpu" on a tiny LeNet
profile (synthetic data), so what a first GPU runs has been run once before it gets there."""
from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

from tests.runproc import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)

LENET = {"arch": "lenet", "width": 2}
EPOCHS = (1, 1, 1)  # the first checkpoint (pretrain's end) leaves two phases to kill the run in


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_check")


@pytest.fixture(scope="module")
def trained(work):
    return gc.check_train("cpu", work, LENET, {}, epochs=EPOCHS)


def test_without_cuda_it_exits_2_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where the tests run on one
    r = subprocess.run(["sh", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=120)  # the wrapper: the project's python runs gpu_check.py
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), r.stderr


def test_device_part_on_the_cpu():
    assert gc.check_device("cpu") == {"name": "cpu", "compute_capability": None, "torch": gc.torch.__version__}


def test_train_completes_and_a_broken_run_fails_the_part_loudly(trained, work, capsys):
    assert trained["final_nat_acc"] > 0.5 and 0 <= trained["final_adv_acc"] <= trained["final_nat_acc"]
    assert trained["peak_memory_bytes"] is None  # no CUDA in that process
    assert trained["warnings"] == []
    report = {"failed": []}
    part = gc.run_part(report, "train", gc.check_train, "cpu", work, {"arch": "lenet", "width": 0}, {},
                       name="bad")
    assert part["ok"] is False and report["failed"] == ["train"]
    assert "robprune run" in part["error"] and "exited 2" in part["error"] and "model.width" in part["error"]
    assert capsys.readouterr().err.startswith("gpu_check: FAILED train: robprune run")


def test_deterministic_twice_then_kill_and_resume_are_bitwise_equal_on_the_cpu(work):
    det = gc.check_deterministic("cpu", work, LENET, {}, epochs=EPOCHS)
    assert det["bitwise_equal"] is True and det["tensors_differing"] == [] and det["max_abs_diff"] == 0.0
    res = gc.check_resume("cpu", work, LENET, {}, epochs=EPOCHS)
    assert res["completed"] is True
    assert res["killed_at"]["phase"] in ("pretrain", "admm")  # killed before the end
    assert res["bitwise_equal_to_uninterrupted"] is True  # the documented promise: deterministic, CPU


def test_eval_on_the_device_and_on_the_cpu(trained, monkeypatch):
    monkeypatch.setitem(gc.ENV, "OMP_NUM_THREADS", "1")  # four processes at once on a small CI machine
    out = gc.check_eval("cpu", gc.Path(trained["run_dir"]), n_pgd=8, n_autoattack=8)
    pgd, aa = out["pgd"], out["autoattack"]
    assert pgd["on_device"]["n"] == pgd["on_cpu"]["n"] == 8 == aa["on_device"]["n"] == aa["on_cpu"]["n"]
    assert pgd["on_device"]["eps"] == 0.1 and aa["on_device"]["eps"] == 0.5
    assert pgd["difference"] == {"nat_acc": 0.0, "adv_acc": 0.0}  # the same device twice: the same numbers
    assert aa["difference"] == {"clean_acc": 0.0, "robust_acc": 0.0}
    assert aa["on_cpu"]["robust_acc"] == 0.0  # fooled everywhere at 0.5: the later attacks had nothing to do


def test_export_reloads_model_pt2_with_the_same_logits(trained):
    out = gc.check_export("cpu", gc.Path(trained["run_dir"]))
    assert out["n"] == 64 and out["same_argmax"] is True
    assert out["max_abs_logit_diff"] <= 1e-5 and out["peak_memory_bytes"] is None


def test_bench_part_reports_bf16_as_not_used_on_the_cpu(work):
    out = gc.check_bench("cpu", work, configs=[("lenet", 1, 28)], batch=4, steps=1, bf16s=(True,))
    assert set(out) == {"lenet-w1-bf16"}
    for key, r in out.items():
        assert r["speedup"] > 0 and r["bf16"] is False  # --bf16 is not used on the CPU
        assert r["matmul_dtype"] == r["baseline_matmul_dtype"] == "float32"
        assert r["train_fraction_of_matmul"] > 0 and r["train_fraction_of_peak"] is None  # no datasheet for a CPU


def test_semi_structured_part_says_why_not_on_the_cpu(work):
    out = gc.check_semi_structured("cpu", work, batch=64, hidden=64)
    assert out["supported"] is False and "speedup" not in out
    assert out["reason"]  # one line saying why the CPU cannot


@pytest.mark.parametrize("broken", [None, "train", "bench", "semi_structured"])
def test_main_runs_every_part_on_cuda_and_names_what_broke(broken, monkeypatch, capsys):
    """The driver's wiring, with the parts faked: one JSON line on stdout; a broken part is in ``failed``, on stderr
    and in the exit code; eval and export, which need the train part's run, fail with it rather than vanish."""
    calls = []

    def fake(name):
        def part(device, *args, **kw):
            calls.append((name, device))
            if name == broken:
                raise gc.Failed(f"{name} broke")
            return {"run_dir": "/nowhere"} if name == "train" else {}
        return part

    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    for name in ("device", "train", "deterministic", "resume", "eval", "export", "bench", "semi_structured"):
        monkeypatch.setattr(gc, f"check_{name}", fake(name))
    rc = gc.main([])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1
    report = gc.json.loads(lines[0])
    parts = ["device", "train", "deterministic", "resume", "eval", "export", "bench", "semi_structured"]
    assert [k for k in report if k in parts] == parts and all(report[p]["seconds"] >= 0 for p in parts)
    assert {device for _, device in calls} == {"cuda"}
    if broken is None:
        assert rc == 0 and report["ok"] is True and report["failed"] == [] and err == ""
        return
    assert rc == 1 and report["ok"] is False
    expect = ["train", "eval", "export"] if broken == "train" else [broken]
    assert report["failed"] == expect and report[broken]["error"] == f"{broken} broke"
    assert f"gpu_check: FAILED {broken}: {broken} broke" in err
    assert err.splitlines()[-1] == f"gpu_check: FAILED: {', '.join(expect)}"
    if broken == "train":
        assert ("eval", "cuda") not in calls and report["eval"]["error"] == "needs the train part's run, which failed"
