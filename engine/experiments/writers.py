"""Writing an experiment's report files in OUT: report.md (the tables, findings, warnings and how the numbers were
made, with each side's training budget and each run's row), results.json, results.csv (one line per table cell and
seed), runs.csv (one line per run) and the PNG figures (:mod:`.figures`). The figures need matplotlib (``pip install
'robprune[plots]'``); without it the same report is written without them and report.md says so."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..config import toml_value
from ..rundir import atomic_write_text
from .figures import write_figures
from .stats import cell_text
from .tables import pstr

FIGURES_SKIPPED = "Figures skipped: matplotlib is not installed; `pip install 'robprune[plots]'` adds them."


def write_report(out: Path, results: dict, *, figures: bool = True) -> dict:
    """Draw the figures of ``results["plots"]`` (when ``figures`` and matplotlib imports), then write results.json,
    results.csv, runs.csv and report.md in ``out``. Sets ``results["figures"]`` (the PNGs written) and, when
    matplotlib is missing, ``results["figures_skipped"]``; returns ``results``."""
    drawn = write_figures(results.get("plots", []), out) if figures else []
    if drawn is None:
        results["figures"] = []
        results["figures_skipped"] = "matplotlib is not installed"
    else:
        results["figures"] = drawn
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / "results.csv", results_csv(results))
    atomic_write_text(out / "runs.csv", runs_csv(results))
    atomic_write_text(out / "report.md", report_markdown(results))
    return results


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(type(o).__name__)


def table_markdown(t: dict) -> list[str]:
    lines = [f"<!-- table: {t['id']} -->", f"| {t['corner']} | " + " | ".join(t["columns"]) + " |",
             "|" + "---|" * (len(t["columns"]) + 1)]
    for r in t["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(cell_text(c) for c in r["cells"]) + " |")
    return lines


def report_markdown(r: dict) -> str:
    seeds = r["seeds"]["seeds"]
    L = [f"# {r['title']}", "",
         f"`robprune experiment {r['experiment']} {r['base_profile']} --preset {r['preset']}"
         + "".join(f" --set {o}" for o in [*r["overrides"], *r["param_overrides"]])
         + f"` — {r['created']}", "",
         f"Preset: {r['preset']} ({r['preset_description']}). Data: {r['data']['name']}, model: {r['model']['arch']}. "
         f"Accuracies are natural/PGD % on {', '.join(map(str, r['data']['final_eval_examples']))} test examples "
         f"(PGD eps {r['attack']['eval']['eps']:g}, step {r['attack']['eval']['step_size']:g}, "
         f"{r['attack']['eval']['steps']} steps, {r['attack']['eval']['restarts']} restart(s))"
         + (f"; a third number is AutoAttack's robust accuracy ({r['autoattack']}), for the runs whose numbers the "
            f"findings compare" if r.get("autoattack") else "") + ".", "",
         (f"Every run was trained once per seed ({', '.join(map(str, seeds))}), each from its own initial weights; a "
          f"number is the mean over the {len(seeds)} seeds, in brackets its {r['rules']['spread']} range over seeds."
          if len(seeds) > 1 else f"Every run was trained with one seed ({seeds[0]}): there is no spread, and no "
          "finding is decided."), "",
         f"Verdicts: {r['rules']['verdict']}. They use the strongest robust accuracy every compared run has "
         "(AutoAttack when it ran, else PGD).", ""]
    for i, t in enumerate(r["tables"], 1):
        L += [f"## Table {i}: {t['title']}", ""]
        L += table_markdown(t)
        L += [""]
        f = t["finding"]
        if f["claim"]:
            L += [f"**The paper's finding:** {f['claim']}.", "", f"**On this run:** {f['sentence']}.", ""]
        for w in t.get("warnings", []):
            L += [f"**{w}**", ""]
        if t.get("note"):
            L += [t["note"], ""]
    for note in r.get("notes", []):
        L += [note, ""]
    if r.get("figures"):
        L += ["## Figures", ""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    elif r.get("figures_skipped"):
        L += ["## Figures", "", FIGURES_SKIPPED, ""]
    L += ["## How these numbers were made", "",
          f"- base profile: `{r['base_profile']}`; preset `{r['preset']}` (`{r['preset_file']}`); "
          f"--set: {', '.join(f'`{o}`' for o in r['overrides']) or 'none'}",
          "- experiment parameters: " + ", ".join(f"{k} = {toml_value(v)}" for k, v in r["params"].items()),
          f"- seeds: {', '.join(map(str, seeds))} (run.seed of every run of that seed; run `<name>-s<seed>`); "
          f"initial weights: {r['seeds']['init']} ({', '.join(r['seeds']['init_files']) or 'none'})",
          "- training attack: " + _attack_text(r["attack"]["train"]) + "; evaluation attack: "
          + _attack_text(r["attack"]["eval"]),
          f"- ADMM convergence: {r['rules']['convergence']}; each ADMM run's row below gives its mean primal residual "
          "and its natural/PGD accuracy just before the hard prune (the ADMM phase's last evaluation)",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
          f"- time: {r['wall_seconds']:.0f} s for this invocation; the runs' training phases took "
          f"{r['train_seconds']:.0f} s in all; trained (or resumed) in this invocation: "
          f"{', '.join(r['trained_this_call']) or 'none (all reused)'}",
          "- raw numbers: `results.json` (these tables are rendered from its `tables`; every seed's numbers are in its "
          "`runs`), `results.csv` (one line per table cell and seed), `runs.csv` (one line per run)", ""]
    L += budget_markdown(r["budgets"])
    L += ["### Runs", "",
          "| run | seed | what | natural % | PGD % | AutoAttack % | sparsity % | nonzero / prunable | ADMM primal "
          "residual | before hard prune nat/PGD % | train s | profile |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        role = run["role"]
        what = ", ".join(f"{k} {v}" for k, v in role.items()
                         if k not in ("ratios", "init", "source", "mask_of", "base", "seed", "from", "compared"))
        aa = "n/a" if run.get("aa_acc") is None else pstr(run["aa_acc"])
        end = run.get("admm_end")
        primal = before = ""
        if end:
            primal = f"{end['primal_mean']:.3f}" + ("" if end["converged"] else " (not converged)")
            b = end.get("before_hard_prune")
            before = "" if not b or b.get("nat_acc") is None else \
                f"{pstr(b['nat_acc'])}/{pstr(b['adv_acc'])} (n {b['n']})"
        L.append(f"| {name} | {run['seed']} | {what} | {pstr(run['nat_acc'])} | {pstr(run['adv_acc'])} | {aa} | "
                 f"{100 * run['sparsity']:.2f} | {run['prunable_nonzero']} / {run['prunable_params']} | {primal} | "
                 f"{before} | {run['train_seconds']:.0f} | [{run['profile']}]({run['profile']}) |")
    return "\n".join(L) + "\n"


def budget_markdown(budgets: list[dict]) -> list[str]:
    """The budget table: one row per run (the same for every seed), each phase's epochs and settings."""
    L = ["### Training budgets", "",
         "Each side's training, the same on every seed. A phase is `epochs x optimizer lr, schedule, eps warm-up "
         "epochs`; the masked training of a pruned model (and of a lottery ticket) is its retraining phase.", "",
         "| run | starts from | dense training (pretrain) | ADMM | masked training (retrain) | training attack | "
         "final evaluation |", "|---|---|---|---|---|---|---|"]
    for b in budgets:
        ph = [_phase_text(b["phases"][k]) for k in ("pretrain", "admm", "retrain")]
        final = "PGD" + (f" + AutoAttack (n {b['autoattack_n']})" if b["final_attack"] == "autoattack" else "")
        L.append(f"| {b['run']} | {b['from']} | {ph[0]} | {ph[1]} | {ph[2]} | {b['train_attack']} | {final} |")
    return L + [""]


def _phase_text(pc: dict | None) -> str:
    if not pc:
        return "-"
    return (f"{pc['epochs']} x {pc['optimizer']} {pc['lr']:g}, {pc['schedule']}"
            + (f", warm-up {pc['eps_warmup']}" if pc["eps_warmup"] else ""))


def _attack_text(a: dict) -> str:
    if a["kind"] == "none":
        return "none"
    return f"{a['kind']} eps {a['eps']:g}, step {a['step_size']:g}, {a['steps']} steps, {a['restarts']} restart(s)"


def results_csv(r: dict) -> str:
    """One line per table cell and seed, with that seed's raw numbers (fractions, or the cell's raw value)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "seed", "run", "nat_acc", "adv_acc", "aa_acc", "value"])
    seeds = r["seeds"]["seeds"]
    for t in r["tables"]:
        for row in t["rows"]:
            for col, c in zip(t["columns"], row["cells"]):
                if c is None:
                    continue
                if "nat" in c:
                    for seed, name in zip(c["seeds"], c["runs"]):
                        run = r["runs"][name]
                        w.writerow([t["id"], row["label"], col, seed, name, run["nat_acc"], run["adv_acc"],
                                    "" if run.get("aa_acc") is None else run["aa_acc"], ""])
                elif "value" in c:
                    for seed, v in zip(seeds, c.get("raw_seeds", [c["value"]])):
                        w.writerow([t["id"], row["label"], col, seed, "", "", "", "", v])
                else:
                    w.writerow([t["id"], row["label"], col, "", "", "", "", "", c.get("text", "")])
    return buf.getvalue()


def runs_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["run", "base", "seed", "kind", "width", "w_L", "w_S", "scheme", "status", "nat_acc", "adv_acc", "aa_acc",
            "n", "sparsity", "prunable_params", "prunable_nonzero", "total_params", "nonzero_params", "train_seconds",
            "device", "profile", "admm_primal_mean", "before_hard_prune_nat_acc", "before_hard_prune_adv_acc"]
    w.writerow(cols)
    for name, run in r["runs"].items():
        role = run["role"]
        end = run.get("admm_end") or {}
        before = end.get("before_hard_prune") or {}
        w.writerow([name, run["base"], run["seed"], role.get("kind"), role.get("width", role.get("w_L")),
                    role.get("w_L"), role.get("w_S"), role.get("scheme"), run["status"],
                    *[run[c] for c in cols[9:21]], end.get("primal_mean", ""), before.get("nat_acc", ""),
                    before.get("adv_acc", "")])
    return buf.getvalue()
