#!/usr/bin/env python
"""First-GPU check: run the engine's GPU paths once, small, and print ONE JSON object (docs/performance.md).

Parts (each a function taking ``device``, so tests/test_gpu_check.py runs them on the CPU): a tiny WRN run with
bf16 + channels_last + cudnn.benchmark + torch.compile; two deterministic runs (bitwise-equal weights?); a run
SIGKILLed after its first checkpoint and resumed; ``robprune eval`` (PGD, AutoAttack) on the device and on the CPU;
``robprune export`` with model.pt2 reloaded on the CPU; ``robprune bench`` for ResNet-18 w=16 and WRN-28-10 with
and without --bf16; ``robprune bench --semi-structured`` (dense against 2:4 sparse inference). A part that breaks is named in the JSON (``failed``) and on stderr, and the exit code is 1;
without CUDA the script exits 2 with one line. Usage: tools/gpu_check.sh [--keep]
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomli_w
import torch

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
# `python -m robprune ARGS`, plus the process's peak CUDA memory written at exit to $GPU_CHECK_PEAK
WRAP = ("import atexit, os, runpy, sys\n"
        "def _peak():\n"
        "    import torch\n"
        "    if torch.cuda.is_initialized():\n"
        "        open(os.environ['GPU_CHECK_PEAK'], 'w').write(str(torch.cuda.max_memory_allocated()))\n"
        "atexit.register(_peak)\n"
        "runpy.run_module('robprune', run_name='__main__', alter_sys=True)\n")

GPU_MODEL = {"arch": "wrn", "width": 2, "depth": 10}                      # WRN-10-2: seconds a run
FAST = {"bf16": True, "channels_last": True, "compile": True}            # cudnn.benchmark: on when not deterministic
DETERMINISTIC = {"bf16": True, "channels_last": True, "deterministic": True}
BENCH = [("resnet18", 16, 28), ("wrn", 10, 28)]
BUDGET_S = 240  # the whole check, on one H200-class GPU


class Failed(Exception):
    """A part broke: the message goes into the JSON and onto stderr."""


def profile(device: str, model: dict, run: dict, epochs=(2, 2, 1)) -> dict:
    """A small profile on synthetic data (1x28x28, 10 classes): ``model`` and ``run`` keys on top."""
    phase = {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}
    attack = {"kind": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 3}
    threads = 1 if device == "cpu" else 4  # fixed (bitwise reproducibility on the CPU needs it); runs go side by side
    return {"run": {"seed": 0, "device": device, "threads": threads, "log_interval_s": 0.5, "checkpoint_every": 1,
                    **run},
            "data": {"name": "synthetic", "batch_size": 64, "test_batch_size": 128, "synthetic_train": 512,
                     "synthetic_test": 128},
            "model": model, "attack": {"train": attack, "eval": attack}, "prune": {"ratio": 0.8},
            "admm": {"rho": 2.0, "update_every": 1}, "eval": {"every": 0, "subset": 64, "final_subset": 0},
            "phases": {"pretrain": {**phase, "epochs": epochs[0]},
                       "admm": {**phase, "epochs": epochs[1], "schedule": "constant"},
                       "retrain": {**phase, "epochs": epochs[2]}}}


def write_profile(work: Path, name: str, prof: dict) -> Path:
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(prof))
    return path


def _argv(*args) -> list[str]:
    return [sys.executable, "-c", WRAP, *map(str, args)]


def _env(peak: Path) -> dict:
    return {**ENV, "GPU_CHECK_PEAK": str(peak)}


def _peak(path: Path) -> int | None:
    return int(path.read_text()) if path.is_file() else None


def robprune(work: Path, *args, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run ``robprune ARGS`` to the end: (the process, its peak CUDA memory or None); exit != 0 fails the part."""
    peak = work / f"peak-{time.monotonic_ns()}"
    try:
        r = subprocess.run(_argv(*args), capture_output=True, text=True, cwd=work, env=_env(peak), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"robprune {args[0]} timed out after {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = " | ".join(ln for ln in r.stderr.strip().splitlines()[-3:])
        raise Failed(f"robprune {' '.join(map(str, args))} exited {r.returncode}: {tail}")
    return r, _peak(peak)


def weights_equal(a: Path, b: Path) -> dict:
    """Compare two model.pt state dicts tensor by tensor: bitwise, and the largest difference."""
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    if wa.keys() != wb.keys():
        raise Failed(f"{a} and {b}: model.pt holds different tensors")
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    diff = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in differ), default=0.0)
    return {"bitwise_equal": not differ, "tensors_differing": differ[:10], "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------------ the parts

def check_device(device: str) -> dict:
    if torch.device(device).type != "cuda":
        return {"name": "cpu", "compute_capability": None, "torch": torch.__version__}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def check_train(device: str, work: Path, model: dict, run: dict, epochs=(2, 2, 1), name: str = "train") -> dict:
    """One whole run with ``run`` flags (bf16, channels_last, compile): it completes, with its final accuracies."""
    rd = work / name
    prof = write_profile(work, name, profile(device, model, run, epochs))
    _, peak = robprune(work, "run", prof, "--run-dir", rd, "-q")
    s = json.loads((rd / "summary.json").read_text())
    if s["status"] != "completed":
        raise Failed(f"{rd}: status {s['status']}")
    events = [json.loads(line) for line in (rd / "events.jsonl").read_text().splitlines() if line.strip()]
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] != "info"]
    return {"run_dir": str(rd), "flags": run, "final_nat_acc": s["final"]["nat_acc"],
            "final_adv_acc": s["final"]["adv_acc"], "warnings": warnings[:5], "peak_memory_bytes": peak}


def check_deterministic(device: str, work: Path, model: dict, run: dict, epochs=(2, 2, 1)) -> dict:
    """The same deterministic profile twice, side by side: are the final weights bitwise equal?"""
    prof = write_profile(work, "det", profile(device, model, {**run, "deterministic": True}, epochs))
    peaks = [work / f"peak-det{i}" for i in (1, 2)]
    procs = [subprocess.Popen(_argv("run", prof, "--run-dir", work / f"det{i}", "-q"), cwd=work, env=_env(peaks[i - 1]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for i, p in enumerate(procs, 1):
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise Failed(f"deterministic run {i} timed out after 300 s") from None
        if p.returncode != 0:
            raise Failed(f"deterministic run {i} exited {p.returncode}: {err.strip().splitlines()[-1:]}")
    peak = max(_peak(p) or 0 for p in peaks) or None
    return {**weights_equal(work / "det1", work / "det2"), "peak_memory_bytes": peak}


def check_resume(device: str, work: Path, model: dict, run: dict, epochs=(2, 2, 1)) -> dict:
    """The deterministic profile, SIGKILLed once its first checkpoint is on disk, then ``run --resume``: it
    completes; its weights are compared with the uninterrupted run's (det1) where that one exists."""
    prof = write_profile(work, "resume", profile(device, model, {**run, "deterministic": True}, epochs))
    rd = work / "killed"
    p = subprocess.Popen(_argv("run", prof, "--run-dir", rd, "-q"), cwd=work, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (rd / "checkpoint.pt").exists():
        if p.poll() is not None:
            raise Failed(f"the run exited ({p.returncode}) before its first checkpoint: {p.stderr.read()[-300:]}")
        if time.monotonic() > deadline:
            p.kill()
            raise Failed("no checkpoint after 300 s")
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    if (rd / "model.pt").exists():
        raise Failed("the run finished before the kill: give it more epochs")
    ck = torch.load(rd / "checkpoint.pt", weights_only=True)
    _, peak = robprune(work, "run", "--resume", rd, "-q")
    if json.loads((rd / "summary.json").read_text())["status"] != "completed":
        raise Failed(f"{rd}: the resumed run did not complete")
    out = {"killed_at": {"phase": ck["phase"], "epoch": ck["epoch"], "step": ck["step"]}, "completed": True,
           "peak_memory_bytes": peak}
    if (work / "det1" / "model.pt").exists():
        out["bitwise_equal_to_uninterrupted"] = weights_equal(work / "det1", rd)["bitwise_equal"]
    return out


def check_eval(device: str, run_dir: Path, n_pgd: int | None, n_autoattack: int, autoattack_eps: float = 0.5) -> dict:
    """``robprune eval`` with PGD (the profile's eps) and AutoAttack on ``device`` and on the CPU, all four at
    once (the CPU's on a copy of the run: AutoAttack keeps its state in the run directory). AutoAttack runs at
    ``autoattack_eps``, where the tiny model is fooled everywhere by APGD-CE, so APGD-T, FAB-T and Square get no
    examples: with robust examples left they take minutes on the CPU. It checks the path, not robustness."""
    cpu_copy = run_dir.parent / f"{run_dir.name}-cpu"
    shutil.copytree(run_dir, cpu_copy, dirs_exist_ok=True)
    keys = {"pgd": ("nat_acc", "adv_acc"), "autoattack": ("clean_acc", "robust_acc")}
    jobs = [(attack, where, dev, rd) for attack in keys
            for where, dev, rd in (("on_device", device, run_dir), ("on_cpu", "cpu", cpu_copy))]

    def one(job):
        attack, where, dev, rd = job
        extra = ([] if n_pgd is None else ["--n", n_pgd]) if attack == "pgd" else [
            "--n", n_autoattack, "--eps", autoattack_eps, "--fresh"]
        t0 = time.monotonic()
        r, peak = robprune(rd.parent, "eval", rd, "--attack", attack, *extra, "--device", dev, "--json", timeout=180)
        got = json.loads(r.stdout)
        clean, robust = (got[k] for k in keys[attack])
        if not 0 <= robust <= clean <= 1 or got.get("resumed"):
            raise Failed(f"eval {attack} on {dev}: accuracies {clean}, {robust} (resumed: {got.get('resumed')})")
        return {keys[attack][0]: clean, keys[attack][1]: robust, "n": got.get("n") or got["attack"].get("n"),
                "eps": got["attack"]["eps"], "seconds": round(time.monotonic() - t0, 1), "peak_memory_bytes": peak}

    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(one, jobs))
    out: dict = {}
    for (attack, where, _, _), res in zip(jobs, done):
        out.setdefault(attack, {})[where] = res
    for attack, res in out.items():
        res["difference"] = {k: res["on_device"][k] - res["on_cpu"][k] for k in keys[attack]}
    return out


def check_export(device: str, run_dir: Path, n: int = 64) -> dict:
    """``robprune export``, then model.pt2 reloaded on the CPU against the run's model on ``device`` (float32)."""
    from robprune.engine import api, evaluation

    robprune(run_dir.parent, "export", run_dir)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    x = api.load_test_set(run_dir, "cpu")[0][:n]
    with torch.no_grad(), evaluation.float32():
        ref = api.load_model(run_dir, dev)(x.to(dev)).float().cpu()
        got = torch.export.load(str(run_dir / "model.pt2")).module()(x)
    diff = (got - ref).abs().max().item()
    tol = 1e-3 * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise Failed(f"model.pt2 on the CPU differs from the model on {device} by {diff:.3g} (> {tol:.3g})")
    return {"n": len(x), "max_abs_logit_diff": diff, "tolerance": tol, "same_argmax": bool(
        (got.argmax(1) == ref.argmax(1)).all()), "peak_memory_bytes": torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda" else None}


KEEP = ("speedup", "train_images_per_s", "baseline_images_per_s", "matmul_dtype", "baseline_matmul_dtype",
        "train_fraction_of_matmul", "baseline_fraction_of_matmul", "train_fraction_of_peak",
        "baseline_fraction_of_peak", "peak_memory_bytes", "baseline_peak_memory_bytes")


def check_bench(device: str, work: Path, configs=BENCH, batch: int = 128, steps: int = 10, bf16s=(False, True)) -> dict:
    """``robprune bench --baseline`` per (model, width, depth), without and with --bf16: few iterations."""
    out = {}
    for model, width, depth in configs:
        for bf16 in bf16s:
            args = ["bench", "--model", model, "--width", width, "--depth", depth, "--batch", batch, "--steps", steps,
                    "--device", device, "--repeats", 2, "--warmup", 1, "--iters", 2, "--baseline", "--eval-batches", 0]
            r, _ = robprune(work, *args, *(["--bf16"] if bf16 else []), timeout=300)
            got = json.loads(r.stdout)
            res = {k: got.get(k) for k in KEEP} | {"bf16": got["settings"]["bf16"]}
            if not got.get("speedup"):
                raise Failed(f"bench {model}: no speedup in its output")
            for k in ("train_fraction_of_peak", "baseline_fraction_of_peak"):
                if (res[k] or 0) > 1:
                    raise Failed(f"bench {model} bf16={bf16}: {k} = {res[k]:.2f} > 1: wrong FLOP count or timing")
            out[f"{model}-w{width}{'-d%d' % depth if model == 'wrn' else ''}{'-bf16' if bf16 else ''}"] = res
    return out


def check_semi_structured(device: str, work: Path, batch: int = 4096, hidden: int = 4096) -> dict:
    """``robprune bench --semi-structured``: dense against 2:4 sparse inference of a linear-heavy model. On a GPU of
    compute capability 8.0 or newer it must run (and agree with the dense model); elsewhere the JSON says why not."""
    r, peak = robprune(work, "bench", "--semi-structured", "--device", device, "--batch", batch, "--hidden", hidden,
                       "--repeats", 3, "--warmup", 2, "--iters", 5, timeout=300)
    got = json.loads(r.stdout)
    keep = ("supported", "reason", "dense_ms_per_batch", "sparse_ms_per_batch", "speedup", "max_abs_diff", "converted")
    res = {k: got[k] for k in keep if k in got} | {"peak_gpu_mem_mb": None if peak is None else round(peak / 2**20)}
    capable = device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    if capable and not got.get("supported"):
        raise Failed(f"2:4 bench: not supported on a GPU of compute capability 8.0 or newer: {got.get('reason')}")
    if got.get("supported") and not got.get("speedup"):
        raise Failed("2:4 bench: no speedup in its output")
    return res


# ------------------------------------------------------------------------------------------------ the driver

def run_part(report: dict, part: str, fn, *args, **kw):
    """Run one part into ``report[part]``; a failure is recorded and said on stderr, never skipped."""
    t0 = time.monotonic()
    try:
        report[part] = {"ok": True, **fn(*args, **kw)}
    except Exception as exc:  # noqa: BLE001 - every failure is reported, whatever it is
        msg = str(exc) if isinstance(exc, Failed) else f"{type(exc).__name__}: {exc}"
        report[part] = {"ok": False, "error": msg}
        report["failed"].append(part)
        print(f"gpu_check: FAILED {part}: {msg}", file=sys.stderr, flush=True)
    report[part]["seconds"] = round(time.monotonic() - t0, 1)
    return report[part]


def needs(what: str):
    raise Failed(f"needs {what}, which failed")


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); this check needs an NVIDIA GPU",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report: dict = {"ok": False, "failed": [], "work_dir": str(work) if "--keep" in argv else None}
    device = "cuda"
    run_part(report, "device", check_device, device)
    for name in ("train", "deterministic", "resume", "eval", "export", "bench", "semi_structured"):
        report[name] = None  # the JSON's order

    def reproducibility():  # beside the compiling run: the deterministic pair, then the kill and resume
        run_part(report, "deterministic", check_deterministic, device, work, GPU_MODEL, DETERMINISTIC)
        run_part(report, "resume", check_resume, device, work, GPU_MODEL, DETERMINISTIC)

    with ThreadPoolExecutor(2) as pool:
        side = pool.submit(reproducibility)
        train = run_part(report, "train", check_train, device, work, GPU_MODEL, FAST)
        side.result()
    for name, fn, args in (("eval", check_eval, (None, 16)), ("export", check_export, ())):
        run_part(report, name, fn, device, Path(train["run_dir"]), *args) if train["ok"] else run_part(
            report, name, needs, "the train part's run")
    run_part(report, "bench", check_bench, device, work)
    run_part(report, "semi_structured", check_semi_structured, device, work)
    report["seconds"] = round(time.monotonic() - t0, 1)
    if report["seconds"] > BUDGET_S:
        report["failed"].append("budget")
        print(f"gpu_check: FAILED budget: {report['seconds']} s, over {BUDGET_S} s", file=sys.stderr)
    report["ok"] = not report["failed"]
    if "--keep" not in argv:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report), flush=True)
    if report["failed"]:
        print(f"gpu_check: FAILED: {', '.join(report['failed'])}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
