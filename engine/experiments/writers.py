"""Writing an experiment's report files in OUT: report.md (the tables, findings and how the numbers were made),
results.json, results.csv (one line per table cell), runs.csv (one line per run) and the PNG figures. The figures
need matplotlib (``pip install 'robprune[plots]'``); without it the same report is written without them and
report.md says so."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..config import toml_value
from ..rundir import atomic_write_bytes, atomic_write_text
from .tables import cell_text, pstr

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
        lines.append(f"| {r['label']} | " + " | ".join(_cell_md(c) for c in r["cells"]) + " |")
    return lines


def _cell_md(c: dict | None) -> str:
    if c is not None and "value" in c and c.get("digits"):
        s = f"{c['value']:.{c['digits']}f}"
        return f"**{s}**" if c.get("mark") else s
    return cell_text(c)


def report_markdown(r: dict) -> str:
    L = [f"# {r['title']}", "",
         f"`robprune experiment {r['experiment']} {r['base_profile']} --preset {r['preset']}"
         + "".join(f" --set {o}" for o in [*r["overrides"], *r["param_overrides"]])
         + f"` — {r['created']}", "",
         f"Preset: {r['preset']} ({r['preset_description']}). Data: {r['data']['name']}, model: {r['model']['arch']}. "
         f"Accuracies are natural/PGD % on {', '.join(map(str, r['data']['final_eval_examples']))} test examples "
         f"(PGD eps {r['attack']['eval']['eps']:g}, step {r['attack']['eval']['step_size']:g}, "
         f"{r['attack']['eval']['steps']} steps, {r['attack']['eval']['restarts']} restart(s))"
         + (f"; a third number is AutoAttack's robust accuracy ({r['autoattack']})" if r.get("autoattack") else "")
         + ".", ""]
    for i, t in enumerate(r["tables"], 1):
        L += [f"## Table {i}: {t['title']}", ""]
        L += table_markdown(t)
        L += [""]
        f = t["finding"]
        if f["claim"]:
            L += [f"**The paper's finding:** {f['claim']}.", "", f"**On this run:** {f['sentence']}.", ""]
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
          f"- seed: run.seed = {r['seeds']['run.seed']} for every run; initial weights: {r['seeds']['init']} "
          f"({', '.join(r['seeds']['init_files']) or 'none'})",
          "- training attack: " + _attack_text(r["attack"]["train"]) + "; evaluation attack: "
          + _attack_text(r["attack"]["eval"]),
          "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
          f"- time: {r['wall_seconds']:.0f} s for this invocation; the runs' training phases took "
          f"{r['train_seconds']:.0f} s in all; trained (or resumed) in this invocation: "
          f"{', '.join(r['trained_this_call']) or 'none (all reused)'}",
          "- raw numbers: `results.json` (these tables are rendered from its `tables`), `results.csv` (one line per "
          "table cell), `runs.csv` (one line per run)", "",
          "| run | what | natural % | PGD % | AutoAttack % | sparsity % | nonzero / prunable | train s | profile |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        role = run["role"]
        what = ", ".join(f"{k} {v}" for k, v in role.items() if k not in ("ratios", "init", "source", "mask_of"))
        aa = "n/a" if run.get("aa_acc") is None else pstr(run["aa_acc"])
        L.append(f"| {name} | {what} | {pstr(run['nat_acc'])} | {pstr(run['adv_acc'])} | {aa} | {100 * run['sparsity']:.2f} | "
                 f"{run['prunable_nonzero']} / {run['prunable_params']} | {run['train_seconds']:.0f} | "
                 f"[{run['profile']}]({run['profile']}) |")
    return "\n".join(L) + "\n"


def _attack_text(a: dict) -> str:
    if a["kind"] == "none":
        return "none"
    return f"{a['kind']} eps {a['eps']:g}, step {a['step_size']:g}, {a['steps']} steps, {a['restarts']} restart(s)"


def results_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "run", "nat_acc", "adv_acc", "value"])
    for t in r["tables"]:
        for row in t["rows"]:
            for col, c in zip(t["columns"], row["cells"]):
                if c is None:
                    continue
                if "nat" in c:
                    run = r["runs"][c["run"]]
                    w.writerow([t["id"], row["label"], col, c["run"], run["nat_acc"], run["adv_acc"], ""])
                elif "value" in c:
                    w.writerow([t["id"], row["label"], col, "", "", "", c.get("raw", c["value"])])
                else:
                    w.writerow([t["id"], row["label"], col, "", "", "", c.get("text", "")])
    return buf.getvalue()


def runs_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["run", "kind", "width", "w_L", "w_S", "scheme", "status", "nat_acc", "adv_acc", "n", "sparsity",
            "prunable_params", "prunable_nonzero", "total_params", "nonzero_params", "train_seconds", "device",
            "profile"]
    w.writerow(cols)
    for name, run in r["runs"].items():
        role = run["role"]
        w.writerow([name, role.get("kind"), role.get("width", role.get("w_L")), role.get("w_L"), role.get("w_S"),
                    role.get("scheme"), run["status"], *[run[c] for c in cols[7:]]])
    return buf.getvalue()


# ============================================================================================ figures


def write_figures(plots: list[dict], out: Path) -> list[str] | None:
    """Each plot spec as a PNG in ``out``; the files written, or None (nothing written) when matplotlib does not
    import."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    for plot in plots:
        render_png(plot, out / plot["file"])
    return [plot["file"] for plot in plots]


def render_png(plot: dict, path: Path) -> None:
    """Draw one plot spec (the same specs the CLI draws in the terminal with plotext) as a PNG with matplotlib's
    Agg canvas (imported here, not at module import; pyplot and its global backend are not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    kind = plot["kind"]
    if kind == "line":
        for label, ys in plot["series"].items():
            ax.plot([str(v) for v in plot["x"]], ys, marker="o", label=label)
    elif kind == "bar":
        n = len(plot["series"])
        width = 0.8 / max(n, 1)
        for k, (label, ys) in enumerate(plot["series"].items()):
            ax.bar([i + (k - (n - 1) / 2) * width for i in range(len(plot["x"]))], ys, width, label=label)
        ax.set_xticks(range(len(plot["x"])), [str(v) for v in plot["x"]])
    elif kind == "hist":
        xs = plot["x"]
        step = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
        for label, ys in plot["series"].items():
            ax.bar(xs, ys, width=step, alpha=0.5, label=label)
    elif kind == "matrix":
        m = plot["matrix"]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100)
        ax.set_xticks(range(len(plot["xlabels"])), plot["xlabels"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(plot["ylabels"])), plot["ylabels"], fontsize=7)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 50 else "black", fontweight="bold" if i == j else "normal")
        fig.colorbar(im, ax=ax, label="PGD accuracy %")
    else:
        raise ValueError(f"unknown plot kind {kind!r}")
    ax.set_title(plot["title"])
    if plot.get("xlabel"):
        ax.set_xlabel(plot["xlabel"])
    if plot.get("ylabel"):
        ax.set_ylabel(plot["ylabel"])
    if kind != "matrix":
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


