"""The run summary: final natural/PGD accuracy, sparsity per layer and overall, compression, times, rho.

One code path serves the end of a run and ``robprune export RUN_DIR``: both call :func:`build_summary`
with the model's weights and the run's records, then :func:`write_summary`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from .rundir import RunDir, atomic_write_text, read_json_state, read_jsonl


def build_summary(*, cfg, weights: dict[str, torch.Tensor], layers: dict[str, dict], final_eval: dict | None,
                  phase_times: dict[str, float], rho_history: list[dict], status: str, step: int,
                  device: str, run_dir: str, allocation: dict | None = None) -> dict:
    """``allocation``: the per-layer ratios as the run fixed them (the checkpoint's ``allocation``, see
    :meth:`robprune.engine.pruning.PrunePlan.record`), or None before they were fixed."""
    per_layer = []
    pr_total = pr_nonzero = 0
    for name, info in layers.items():
        w = weights[name]
        n = w.numel()
        nz = int(torch.count_nonzero(w))
        pr_total += n
        pr_nonzero += nz
        per_layer.append({"name": name, "shape": list(w.shape), "params": n, "nonzero": nz, "zeros": n - nz,
                          "sparsity": (n - nz) / n if n else 0.0, "target": info["target"],
                          "scheme": info["scheme"]})
    total = sum(v.numel() for k, v in weights.items() if v.is_floating_point() and not _is_buffer_name(k))
    nonzero = sum(int(torch.count_nonzero(v)) for k, v in weights.items()
                  if v.is_floating_point() and not _is_buffer_name(k))
    ev = final_eval or {}
    return {
        "run": cfg.name, "profile": cfg.source, "status": status, "device": device, "steps": step,
        "run_dir": run_dir,
        "model": {"arch": cfg.model.arch, "width": cfg.model.width,
                  **({"depth": cfg.model.depth} if cfg.model.arch == "wrn" else {})},
        "data": cfg.data.name,
        "final": {"nat_acc": ev.get("nat_acc"), "adv_acc": ev.get("adv_acc"), "n": ev.get("n"),
                  "attack": ev.get("attack"), "autoattack": ev.get("autoattack"), "robust": reported_robustness(ev)},
        "prune": {"scheme": cfg.prune.scheme, "linear_scheme": cfg.prune.linear_scheme, "ratio": cfg.prune.ratio,
                  "allocation": getattr(cfg.prune, "allocation", "uniform"),
                  "allocated": None if allocation is None else {
                      k: allocation.get(k) for k in ("method", "ratio", "normalize", "prunable", "pruned", "step",
                                                     "phase")}},
        "layers": per_layer,
        "sparsity": {"prunable_params": pr_total, "prunable_nonzero": pr_nonzero,
                     "prunable": (pr_total - pr_nonzero) / pr_total if pr_total else 0.0,
                     "total_params": total, "nonzero_params": nonzero,
                     "overall": (total - nonzero) / total if total else 0.0},
        "compression_rate": {"prunable": pr_total / max(pr_nonzero, 1), "overall": total / max(nonzero, 1)},
        "phase_seconds": {k: round(v, 3) for k, v in phase_times.items()},
        "rho_history": rho_history,
    }


def attack_label(attack: dict | None, n: int | None = None) -> str:
    """One line naming an evaluation exactly: attack, loss, eps, steps and step, restarts, n."""
    a = attack or {}
    if a.get("name") == "autoattack":
        from .attacks.autoattack import label

        return label(a)
    if not a:
        return "n/a"
    kind = str(a.get("kind", "?")).upper()
    loss = f" ({'CW margin' if a.get('loss') == 'cw' else 'CE'} loss)" if a.get("kind") == "pgd" else ""
    return (f"{kind}-{a.get('steps')}{loss}, Linf eps {a.get('eps')}, step {a.get('step_size')}, "
            f"{a.get('restarts')} restart(s)" + (f", n {n}" if n is not None else ""))


def accuracy_lines(final: dict) -> list[str]:
    """The final evaluation in words, one line per evaluation, each named exactly (for captions and logs)."""
    lines = [f"natural {_pct(final.get('nat_acc'))}, robust {_pct(final.get('adv_acc'))}: "
             f"{attack_label(final.get('attack'), final.get('n'))}"]
    aa = final.get("autoattack")
    if aa:
        lines.append(f"clean {_pct(aa.get('clean_acc'))}, robust {_pct(aa.get('robust_acc'))}: "
                     f"{attack_label(aa.get('attack'))}")
    return lines


def reported_robustness(ev: dict) -> dict | None:
    """The robust accuracy a run reports: AutoAttack's when it ran (the stronger evaluation), else PGD's, with
    the evaluation named exactly."""
    aa = ev.get("autoattack")
    if aa:
        return {"acc": aa.get("robust_acc"), "attack": attack_label(aa.get("attack")), "n": aa.get("attack", {}).get("n")}
    if ev.get("adv_acc") is None:
        return None
    return {"acc": ev.get("adv_acc"), "attack": attack_label(ev.get("attack"), ev.get("n")), "n": ev.get("n")}


def target_label(target: float | None, scheme: str | None = None, digits: int = 2) -> str:
    """A layer's target ratio for a table: ``80.00%``; an N:M layer's with its pattern, ``50.00% (2:4)``."""
    if target is None:
        return "n/a"
    text = f"{100 * target:.{digits}f}%"
    return f"{text} ({scheme})" if target > 0 and isinstance(scheme, str) and ":" in scheme else text


def _allocation_text(s: dict) -> str:
    a = (s.get("prune") or {}).get("allocated")
    if not a or a.get("method") in (None, "uniform"):
        return ""
    return (f"; allocation {a['method']}{' (RMS-normalised)' if a.get('normalize') else ''}: {a['pruned']} of "
            f"{a['prunable']} prunable weights ({_pct(a['pruned'] / max(a['prunable'], 1))}), per-layer ratios fixed at "
            f"step {a.get('step')}")


def _is_buffer_name(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def summary_markdown(s: dict) -> str:
    f = s["final"]
    a = f.get("attack") or {}
    sp = s["sparsity"]
    lines = [
        f"# robprune run summary: {s['run']}", "",
        f"- status: {s['status']} after {s['steps']} steps on {s['device']}",
        f"- model: {s['model']['arch']} width {s['model']['width']}"
        + (f" depth {s['model']['depth']}" if "depth" in s["model"] else "") + f", data {s['data']}",
        f"- pruning: {s['prune']['scheme']} (linear layers: {s['prune']['linear_scheme']})" + _allocation_text(s), "",
        "## Accuracy", "",
        "| evaluation | natural | robust | test examples |", "|---|---|---|---|",
        f"| {attack_label(a)} | {_pct(f.get('nat_acc'))} | {_pct(f.get('adv_acc'))} | {f.get('n')} |",
    ]
    aa = f.get("autoattack")
    if aa:
        lines.append(f"| {attack_label(aa.get('attack'))} | {_pct(aa.get('clean_acc'))} | {_pct(aa.get('robust_acc'))} "
                     f"| {(aa.get('attack') or {}).get('n')} |")
    rob = f.get("robust")
    lines += [
        "", f"Reported robustness: {_pct(rob['acc'])} ({rob['attack']})" if rob else "Reported robustness: n/a", "",
        "## Sparsity", "",
        "| layer | shape | params | nonzero | sparsity | target | scheme |", "|---|---|---|---|---|---|---|",
    ]
    for L in s["layers"]:
        lines.append(f"| {L['name']} | {'x'.join(map(str, L['shape']))} | {L['params']} | {L['nonzero']} | "
                     f"{_pct(L['sparsity'])} | {target_label(L['target'], L['scheme'])} | {L['scheme']} |")
    cr = s["compression_rate"]
    lines += [
        "", f"- prunable weights: {sp['prunable_params']} total, {sp['prunable_nonzero']} nonzero, "
            f"sparsity {_pct(sp['prunable'])}, compression {cr['prunable']:.2f}x",
        f"- all parameters: {sp['total_params']} total, {sp['nonzero_params']} nonzero, "
        f"sparsity {_pct(sp['overall'])}, compression {cr['overall']:.2f}x", "",
        "## Time per phase", "", "| phase | seconds |", "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["phase_seconds"].items()]
    lines += ["", "## rho history", "", "| step | epoch | reason | rho (min .. max over layers) |", "|---|---|---|---|"]
    for h in s["rho_history"]:
        vals = list(h["rho"].values()) or [0.0]
        lines.append(f"| {h['step']} | {h['epoch']} | {h['reason']} | {min(vals):.4g} .. {max(vals):.4g} |")
    return "\n".join(lines) + "\n"


METRIC_COLUMNS = ["t", "type", "step", "epoch", "phase", "batch", "loss", "adv_acc", "nat_acc", "penalty", "lr",
                  "images_per_s", "n", "reason"]
RESOURCE_COLUMNS = ["host_rss_mb", "cpu_pct", "gpu_mem_alloc_mb", "gpu_mem_reserved_mb", "gpu_mem_peak_mb",
                    "gpu_util_pct", "gpu_temp_c"]


def metrics_csv(records: list[dict]) -> str:
    """Step and evaluation records as CSV (one row per record; layer/residual records are in the JSONL); a step
    record's resource figures get a column each."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS + RESOURCE_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        if r.get("type") in ("step", "eval"):
            res = r.get("resources")
            w.writerow({**r, **res} if isinstance(res, dict) else r)
    return buf.getvalue()


def write_summary(rundir: RunDir, summary: dict, records: list[dict] | None = None) -> list[Path]:
    out = [rundir.path / "summary.json", rundir.path / "summary.md", rundir.path / "metrics.csv"]
    atomic_write_text(out[0], json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out[1], summary_markdown(summary))
    atomic_write_text(out[2], metrics_csv(records if records is not None else read_jsonl(rundir.metrics)))
    return out


def read_run(run_dir: str | Path):
    """A run directory's profile, checkpoint and final weights (model.pt, or the checkpoint's when the run has not
    finished), each checked: ``(rundir, cfg, checkpoint, weights, weights_path)``. What is missing or not what robprune
    writes is one line naming the file."""
    from .config import load_profile
    from .errors import UserError
    from .rundir import safe_torch_load

    rd = RunDir(run_dir)
    if not rd.profile.is_file():
        raise UserError(f"{rd.profile}: missing; {rd.path} is not a robprune run directory")
    cfg = load_profile(rd.profile)
    if not rd.checkpoint.exists():
        raise UserError(f"{rd.checkpoint}: missing; nothing to export yet")
    st = safe_torch_load(rd.checkpoint)
    if not isinstance(st, dict) or not isinstance(st.get("model"), dict) or not isinstance(st.get("layers"), dict):
        raise UserError(f"{rd.checkpoint}: expected a robprune checkpoint (a dict with 'model' and 'layers')")
    src = rd.model if rd.model.exists() else rd.checkpoint
    weights = safe_torch_load(rd.model) if rd.model.exists() else st["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{src}: expected a state_dict (parameter names to tensors)")
    return rd, cfg, st, weights, src


def export_run(run_dir: str | Path, skipped: list[str] | None = None) -> list[Path]:
    """Rebuild the summary from a run directory's files (final weights, or the last checkpoint's). Damaged lines
    of metrics.jsonl are left out and named in ``skipped`` (when given); every good record is kept."""
    rd, cfg, st, weights, _ = read_run(run_dir)
    records = read_jsonl(rd.metrics)
    evals = [r for r in records if r.get("type") == "eval"]
    final = next((r for r in reversed(evals) if r.get("reason") == "final"), evals[-1] if evals else None)
    if final is not None and final.get("reason") == "final":
        at = records.index(final)
        aa = next((r for r in records[at + 1:] if r.get("type") == "autoattack"), None)
        if aa is not None:
            final = {**final, "autoattack": {k: aa.get(k) for k in ("attack", "clean_acc", "robust_acc", "per_attack",
                                                                     "seconds", "path")}}
    status = "completed" if rd.model.exists() else "in progress"
    summary = build_summary(cfg=cfg, weights=weights, layers=st["layers"], allocation=st.get("allocation"),
                            final_eval=final,
                            phase_times=st["phase_times"], rho_history=st["rho_history"], status=status,
                            step=st["step"], device="n/a (export)", run_dir=str(rd.path))
    # keep what only the run knew (its device); None: no file there, or not one to read (a FIFO, a damaged file)
    previous = read_json_state(rd.path / "summary.json")
    if isinstance(previous, dict):
        summary["device"] = previous.get("device", summary["device"])
    paths = write_summary(rd, summary, records)
    rd.append_event({"type": "export", "paths": [str(p) for p in paths], "skipped_lines": len(records.skipped)})
    if skipped is not None:
        skipped.extend(records.skipped)
    return paths
