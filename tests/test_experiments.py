"""`robprune experiment`: every experiment on the tiny preset (synthetic data, one epoch a phase, one seed), its
report's rows, columns and files, report.md's numbers against results.json, reuse and resume of runs, the lottery
mask; the verdict rule on constructed numbers, and a two-seed run whose cells are the means and ranges of its
seeds' numbers; equal budgets and ADMM convergence in the reports."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from robprune.engine.config import load_profile
from robprune.engine.errors import UserError
from robprune.engine.experiments import (EXPERIMENTS, HELD, INCONCLUSIVE, NOT_HELD, PRIMAL_CONVERGED, Comparison,
                                         Experiment, ExperimentStopped, RunResult, admm_end, budgets, lottery_init,
                                         sliced_state, verdict)
from robprune.engine.models import build_model, prunable_parameters
from robprune.engine.pruning import n_pruned
from robprune.engine.rundir import safe_torch_load
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("exp") / "tiny.toml"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def done(base) -> dict[str, tuple[Path, dict, float]]:
    """Every experiment, run once on the tiny preset: name -> (OUT, results, seconds)."""
    torch.set_num_threads(2)
    out = {}
    for name in EXPERIMENTS:
        d = base.parent / name
        t0 = time.time()
        results = Experiment(name, base, out=d, preset="tiny").run()
        out[name] = (d, results, time.time() - t0)
    return out


# ------------------------------------------------------------------------------------------------ markdown tables


def _split(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def md_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The tables of report.md, by the id in the ``<!-- table: id -->`` line above each."""
    lines = text.splitlines()
    tables = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- table: (\S+) -->", line.strip())
        if not m:
            continue
        header = _split(lines[i + 1])
        assert set(lines[i + 2].replace("|", "")) == {"-"}, lines[i + 2]
        rows, j = [], i + 3
        while j < len(lines) and lines[j].startswith("|"):
            rows.append(_split(lines[j]))
            j += 1
        tables[m.group(1)] = (header, rows)
    return tables


NUM = r"(\d+\.\d+)"
RANGED = rf"{NUM} \[{NUM}-{NUM}\]"


def cell_matches(text: str, cell: dict | None) -> bool:
    """A markdown cell says exactly what the JSON cell holds (numbers compared as numbers): ``nat/adv(/aa)`` with one
    seed, ``mean [min-max]`` for each number with more."""
    if cell is None:
        return text == ""
    if "nat" in cell:
        keys = [k for k in ("nat", "adv", "aa") if cell.get(k) is not None]
        if "range" not in cell:
            m = re.fullmatch("/".join([NUM] * len(keys)), text)
            return bool(m) and [float(g) for g in m.groups()] == [cell[k] for k in keys]
        m = re.fullmatch(" / ".join([RANGED] * len(keys)), text)
        want = [x for k in keys for x in (cell[k], *cell["range"][k])]
        return bool(m) and [float(g) for g in m.groups()] == want
    if "value" in cell:
        bold = text.startswith("**") and text.endswith("**")
        if bold != bool(cell.get("mark")):
            return False
        d = cell.get("digits", 2)
        got = [float(g) for g in re.fullmatch(RANGED if "range" in cell else NUM, text.strip("*")).groups()]
        return got == [round(cell["value"], d), *[round(x, d) for x in cell.get("range", [])]]
    return text == cell["text"]


EXPECTED = {  # table id -> (corner, columns, row labels) on the tiny preset
    "weight-dist": {"accuracy": ("width", ["natural training", "adversarial training"], ["w=1", "w=2"]),
                    "weights": ("width", ["near-zero, natural", "near-zero, adversarial", "std, natural",
                                          "std, adversarial"], ["w=1", "w=2"])},
    "scratch-vs-pruned": {"table2": ("w", ["natural training", "adv training", "->1"], ["1", "2"]),
                          "cases": ("w_L->w_S", ["(a) natural", "(b) adv scratch", "(c) ADMM pruned",
                                                 "(d) inherited"], ["2->1"])},
    "lottery": {"lottery": ("pruned to", ["ADMM pruned", "lottery ticket", "same mask"], ["2->1 (75.00%)"])},
    "transfer": {"transfer": ("crafted on (row), evaluated on (column)",
                              ["adv-w1", "adv-w2", "natural-w2", "admm-w2-to-w1"],
                              ["adv-w1", "adv-w2", "natural-w2", "admm-w2-to-w1", "natural (no attack)"])},
    "schemes": {"schemes": ("pruned to", ["irregular", "column", "filter"], ["2->1 (75.00%)"]),
                "nm": ("pruning", ["2:4", "irregular, same ratios"], ["50% of 3 of 4 layers"])},
    "budgets": {"budgets": ("allocation", ["90%", "95%", "99%"], ["uniform", "global", "erk"]),
                "ratios": ("layer (weights)", [f"{a} {r}%" for r in (90, 95, 99) for a in ("uniform", "global", "erk")],
                           ["conv1.weight (100)", "conv2.weight (800)", "fc1.weight (50176)", "fc2.weight (1280)",
                            "pruned / prunable"])},
}
# tables that only show what the runs chose, or compare what is not one of the paper's findings
NO_FINDING = {("budgets", "ratios"), ("schemes", "nm")}

FIGURES = {"weight-dist": {"weights_w1.png", "weights_w2.png", "accuracy.png"},
           "scratch-vs-pruned": {"pgd_by_pair.png", "adv_training_by_width.png"},
           "lottery": {"lottery.png"}, "transfer": {"transfer.png"},
           "schemes": {"schemes_pgd.png", "schemes_natural.png"},
           "budgets": {"budgets_robust.png", "budgets_natural.png"}}


# ------------------------------------------------------------------------------------------------ the reports


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_report_files(done, name):
    out, results, _ = done[name]
    for f in ("report.md", "results.json", "results.csv", "runs.csv"):
        assert (out / f).is_file(), f
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["figures"]) == FIGURES[name]
    for f in results["figures"]:
        data = (out / f).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 1000, f
        assert f"]({f})" in (out / "report.md").read_text()
    # the exact profile of every run, seeds, attack settings and versions are recorded
    assert set(results["runs"]) == {p.stem for p in (out / "profiles").glob("*.toml")}
    for run, info in results["runs"].items():
        recorded = (out / info["profile"]).read_text()
        assert recorded == (out / "runs" / run / "profile.toml").read_text()
        cfg = load_profile(out / info["profile"])
        assert cfg.run.name == run == f"{info['base']}-s0" and cfg.run.seed == info["seed"] == 0
        assert info["status"] == "trained"
    assert results["seeds"]["seeds"] == [0]
    for key in ("torch", "torchvision", "python", "robprune"):
        assert results["versions"][key]
    assert results["attack"]["eval"] == {"kind": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 2, "restarts": 1,
                                          "loss": "ce"}
    md = (out / "report.md").read_text()
    for text in ("- seeds: 0 (run.seed of every run of that seed", "evaluation attack: pgd eps 0.1, step 0.05, 2 steps",
                 "torch 2.", "torchvision", "python 3.", "robprune ", "### Training budgets", "### Runs",
                 "no finding is decided"):
        assert text in md, text


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_rows_and_columns(done, name):
    _, results, _ = done[name]
    tables = {t["id"]: t for t in results["tables"]}
    assert set(tables) == set(EXPECTED[name])
    for tid, (corner, columns, rows) in EXPECTED[name].items():
        t = tables[tid]
        assert t["corner"] == corner and t["columns"] == columns
        assert [r["label"] for r in t["rows"]] == rows
        assert all(len(r["cells"]) == len(columns) for r in t["rows"])
        f = t["finding"]
        if (name, tid) in NO_FINDING:
            assert not f["claim"] and not f["verdict"] and not f["sentence"] and not f["comparisons"]
            continue
        # one seed: no spread, nothing decided
        assert f["claim"] and f["held"] is None and f["verdict"] == INCONCLUSIVE and f["rule"]
        assert f["sentence"].startswith("Inconclusive at this budget: ")
        assert f["comparisons"] and all(c["outcome"] == 0 for c in f["comparisons"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_report_numbers_equal_results_json(done, name):
    out, results, _ = done[name]
    md = (out / "report.md").read_text()
    parsed = md_tables(md)
    assert set(parsed) == {t["id"] for t in results["tables"]}
    for t in results["tables"]:
        header, rows = parsed[t["id"]]
        assert header == [t["corner"], *t["columns"]]
        assert len(rows) == len(t["rows"])
        for md_row, row in zip(rows, t["rows"]):
            assert md_row[0] == row["label"]
            for text, cell in zip(md_row[1:], row["cells"]):
                assert cell_matches(text, cell), (t["id"], row["label"], text, cell)
            for cell in row["cells"]:  # and the table's numbers are the runs' raw numbers, as percentages
                if cell and "nat" in cell:
                    run = results["runs"][cell["runs"][0]]
                    assert cell["nat"] == round(100 * run["nat_acc"], 2) and "range" not in cell
                    assert cell["adv"] == round(100 * run["adv_acc"], 2)
                if cell and "raw" in cell:
                    assert round(cell["raw"] * (1 if cell.get("digits") else 100), cell.get("digits", 2)) == cell["value"]
        sentence = t["finding"]["sentence"]
        assert f"**On this run:** {sentence}." in md if sentence else (name, t["id"]) in NO_FINDING
    # results.csv: one line per non-empty cell (and seed: one here), with the raw numbers
    lines = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(lines) == sum(c is not None for t in results["tables"] for r in t["rows"] for c in r["cells"])
    for ln in lines:
        if ln["run"]:
            assert float(ln["adv_acc"]) == results["runs"][ln["run"]]["adv_acc"]
    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert [r["run"] for r in runs] == list(results["runs"])


def test_summary_numbers_match_run_dirs(done):
    out, results, _ = done["scratch-vs-pruned"]
    for run, info in results["runs"].items():
        s = json.loads((out / "runs" / run / "summary.json").read_text())
        assert s["status"] == "completed"
        assert (info["nat_acc"], info["adv_acc"]) == (s["final"]["nat_acc"], s["final"]["adv_acc"])


# ------------------------------------------------------------------------------------------------ what the runs are


def test_pruned_runs_have_the_parameter_count_of_the_small_width(done):
    out, results, _ = done["scratch-vs-pruned"]
    small = {k: p.numel() for k, p in prunable_parameters(build_model("lenet", 1)).items()}
    sd = safe_torch_load(out / "runs" / "admm-w2-to-w1-s0" / "model.pt")
    for k, n in small.items():
        assert int(torch.count_nonzero(sd[k])) == n, k
    # dense runs are dense and natural training is natural
    assert results["runs"]["adv-w2-s0"]["sparsity"] == 0.0
    assert load_profile(out / "profiles" / "natural-w1-s0.toml").attack.train.kind == "none"
    assert load_profile(out / "profiles" / "adv-w1-s0.toml").attack.train.kind == "pgd"
    # (d) starts from the w_L model's sliced weights
    init = safe_torch_load(out / "init" / "inherit-w2-to-w1-s0.pt")
    big = safe_torch_load(out / "runs" / "adv-w2-s0" / "model.pt")
    assert torch.equal(init["conv2.weight"], big["conv2.weight"][:4, :2])
    assert torch.equal(init["fc1.weight"], big["fc1.weight"][:64, :196])


def test_lottery_ticket_keeps_exactly_the_admm_mask(done):
    out, results, _ = done["lottery"]
    admm = safe_torch_load(out / "runs" / "admm-w2-to-w1-s0" / "model.pt")
    ticket = safe_torch_load(out / "runs" / "lottery-w2-to-w1-s0" / "model.pt")
    init = safe_torch_load(out / "init" / "lottery-w2-to-w1-s0.pt")
    original = safe_torch_load(out / "init" / "lenet-w2-seed0.pt")
    ratios = results["runs"]["lottery-w2-to-w1-s0"]["role"]["ratios"]
    for k, r in ratios.items():
        mask = admm[k] != 0
        assert int((~mask).sum()) == n_pruned(admm[k].numel(), r), k  # exact counts
        assert torch.equal(init[k], original[k] * mask), k  # the original init times the mask
        assert torch.equal(ticket[k] != 0, mask), k  # the hard prune at retrain start kept exactly that mask
        assert not torch.equal(ticket[k], init[k]), k  # and the ticket was trained
    assert results["mask_identical"] == {"2->1": True}
    # the dense model's pretraining started from the same original init
    assert load_profile(out / "profiles" / "adv-w2-s0.toml").run.init == str(out / "init" / "lenet-w2-seed0.pt")


def test_lottery_init_and_slicing_helpers():
    torch.manual_seed(0)
    orig = build_model("lenet", 2).state_dict()
    pruned = {k: v.clone() for k, v in orig.items()}
    pruned["fc1.weight"][:, ::2] = 0
    t = lottery_init(orig, pruned, ["fc1.weight"])
    assert torch.equal(t["fc1.weight"] == 0, pruned["fc1.weight"] == 0)
    assert torch.equal(t["fc2.weight"], orig["fc2.weight"])
    small = sliced_state(orig, build_model("lenet", 1))
    assert small["fc2.weight"].shape == (10, 64) and torch.equal(small["fc2.bias"], orig["fc2.bias"])


def test_transfer_matrix(done):
    _, results, _ = done["transfer"]
    m = results["transfer"]
    t = results["tables"][0]
    for i, row in enumerate(t["rows"][:-1]):
        for j, cell in enumerate(row["cells"]):
            assert (cell.get("mark") == "white-box") == (i == j)
            assert cell["raw"] == m["adv_acc"][i][j]


# ------------------------------------------------------------------------------------------------ reuse and resume


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_rerun_reuses_finished_runs(done, base, name):
    out, first, _ = done[name]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    events = []
    results = Experiment(name, base, out=out, preset="tiny", progress=events.append).run()
    assert {r["status"] for r in results["runs"].values()} == {"reused"}
    assert results["trained_this_call"] == []
    assert not [e for e in events if e.get("status") in ("started", "resumed", "finished")]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps
    assert [t["rows"] for t in results["tables"]] == [t["rows"] for t in first["tables"]]


def test_interrupted_experiment_resumes_the_run(tmp_path, base):
    out = tmp_path / "lottery"
    exp = None

    def stop_in_second_run(e):
        if e.get("type") == "run" and e.get("status") == "started" and e["index"] == 1:
            exp.stop()

    exp = Experiment("lottery", base, out=out, preset="tiny", progress=stop_in_second_run)
    with pytest.raises(ExperimentStopped):
        exp.run()
    run = out / "runs" / "admm-w2-to-w1-s0"
    assert (run / "checkpoint.pt").is_file() and not (run / "model.pt").exists()
    events = []
    results = Experiment("lottery", base, out=out, preset="tiny", progress=events.append).run()
    status = {n: r["status"] for n, r in results["runs"].items()}
    assert status == {"adv-w2-s0": "reused", "admm-w2-to-w1-s0": "resumed", "lottery-w2-to-w1-s0": "trained"}
    assert results["mask_identical"] == {"2->1": True}


def test_changed_settings_are_refused(done, base):
    out, _, _ = done["lottery"]
    with pytest.raises(UserError, match=r"adv-w2-s0: made with other settings \(attack.train.steps: 2 now 3\)"):
        Experiment("lottery", base, out=out, preset="tiny", overrides=["attack.train.steps=3"]).run()


# ------------------------------------------------------------------------------------------------ bad input, presets


@pytest.mark.parametrize("args,match", [
    (("lotery",), r"unknown experiment 'lotery'.*did you mean 'lottery'"),
    (("lottery", ["exp.widht=3"]), r"--set: exp.widht: expected a parameter of lottery.*did you mean 'width'"),
    (("lottery", ["exp.width=1"]), r"exp.width: expected an integer >= 2"),
    (("lottery", ["exp.targets=[2]"]), r"exp.targets: expected widths below width = 2"),
    (("lottery", ["exp.train_epochs=x"]), r"exp.train_epochs: expected a value like 1"),
    (("lottery", ["model.width=8"]), r"--set: model.width: expected a key the experiment does not set per run"),
    (("schemes", ["prune.scheme=filter"]), r"--set: prune.scheme: .*schemes sets it for each run"),
    (("lottery", ["attack.eval.steps=0"]), r"--set: attack.eval.steps: expected an integer in \[1, 10000\]"),
    (("transfer", ["exp.pruned=[[1, 2]]"]), r"exp.pruned: expected a list of \[w_L, w_S\] pairs"),
    (("lottery", ["run.seed=1"]), r"--set: run.seed: expected a key the experiment does not set per run.*exp.seeds"),
    (("lottery", ["exp.seeds=[]"]), r"exp.seeds: expected a non-empty list of distinct integers >= 0"),
    (("lottery", ["exp.seeds=[1, 1]"]), r"exp.seeds: expected a non-empty list of distinct integers >= 0"),
    (("weight-dist", ["exp.natural_epochs=3"]), r"exp.natural_epochs: expected a parameter of weight-dist"),
    (("budgets", ["prune.allocation=erk"]), r"--set: prune.allocation: .*budgets sets it for each run"),
    (("budgets", ["prune.ratio=0.5"]), r"--set: prune.ratio: .*budgets sets it for each run"),
    (("budgets", ["prune.scheme=column"]), r"--set: prune.scheme: .*budgets sets it for each run"),
    (("lottery", ["prune.allocation=global"]), r"--set: prune.allocation: .*lottery sets it for each run"),
    (("lottery", ["prune.global_normalize=true"]), r"--set: prune.global_normalize: .*lottery sets it"),
    (("budgets", ["exp.ratios=[0.9, 1.0]"]), r"exp.ratios: expected a non-empty list of distinct overall sparsities"),
    (("budgets", ["exp.ratios=[]"]), r"exp.ratios: expected a non-empty list"),
    (("budgets", ['exp.allocations=["global", "erk"]']), r"exp.allocations: expected .*with 'uniform' and at least"),
    (("budgets", ['exp.allocations=["uniform", "random"]']), r"exp.allocations: expected a list of distinct"),
])
def test_bad_input_is_one_line_user_error(base, tmp_path, args, match):
    name, sets = args[0], (args[1] if len(args) > 1 else [])
    with pytest.raises(UserError, match=match) as e:
        Experiment(name, base, out=tmp_path / "o", preset="tiny", overrides=sets)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_bad_preset(base, tmp_path):
    with pytest.raises(UserError, match="--preset gpu: expected one of cpu, paper, tiny"):
        Experiment("lottery", base, preset="gpu")
    bad = tmp_path / "p.toml"
    bad.write_text('[lotery]\nwidth = 2\n')
    with pytest.raises(UserError, match=r"\[lotery\].*did you mean 'lottery'"):
        Experiment("lottery", base, preset=str(bad))


@pytest.mark.parametrize("preset,profile", [("cpu", "profiles/mnist_quick.toml"),
                                            ("paper", "profiles/mnist_lenet_paper.toml")])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_presets_plan_valid_runs(tmp_path, preset, profile, name):
    """Every run of the CPU and paper presets resolves to a valid profile (nothing is trained)."""
    e = Experiment(name, ROOT / profile, out=tmp_path / "o", preset=preset)
    for spec in e.plan:
        cfg, text = e.resolved_profile(spec)
        assert cfg.run.name == spec.name
        assert tomllib.loads(text)["run"]["name"] == spec.name
    if preset == "paper":
        if name in ("weight-dist", "schemes", "budgets"):
            assert (cfg.data.name, cfg.model.arch, cfg.attack.eval.steps) == ("cifar10", "vgg16", 10)
            assert abs(cfg.attack.eval.eps - 8 / 255) < 1e-12
        else:
            assert (cfg.data.name, cfg.model.arch, cfg.attack.eval.eps, cfg.attack.eval.steps) == ("mnist", "lenet",
                                                                                                  0.3, 40)
    else:
        assert cfg.data.name == "mnist-5k"


def test_paper_ratios():
    e = Experiment("lottery", ROOT / "profiles/mnist_lenet_paper.toml", preset="paper")
    r = e.ratios(16, 4)
    assert r["conv2.weight"] == r["fc1.weight"] == 0.9375  # 1 - (4/16)^2
    assert r["conv1.weight"] == r["fc2.weight"] == 0.75  # the first conv and the last layer scale with w


def test_cli_experiment(done, base):
    out, _, _ = done["lottery"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "robprune", "experiment", "lottery", str(base), "--out", str(out),
                        "--preset", "tiny", "--no-plots"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'report.md'}" in r.stdout
    assert "reused" in r.stderr and "Table 1 (lottery): " in r.stderr
    r = subprocess.run([sys.executable, "-m", "robprune", "experiment", "lottery", str(base), "--preset", "tiny",
                        "--set", "exp.widht=3"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robprune: error: --set: exp.widht:"), r.stderr


def test_engine_imports_no_ui_or_plotting_libraries():
    code = ("import sys, robprune.engine.experiments; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'textual', 'plotext', 'matplotlib'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_settings_that_do_not_change_numbers_do_not_block_reuse(done, base):
    out, _, _ = done["lottery"]
    results = Experiment("lottery", base, out=out, preset="tiny",
                         overrides=["run.threads=2", "run.log_interval_s=0.5"]).run()
    assert {r["status"] for r in results["runs"].values()} == {"reused"}


def test_autoattack_column(base, tmp_path):
    """--set exp.final_attack=autoattack: every run a finding compares ends with an AutoAttack (the dense model that
    is only pruned does not), its accuracy cells get a third number (AutoAttack's robust accuracy, never above the PGD
    one of the same run here), the verdict uses it, the report names the attack, and without it (the default) no run
    runs one, even when the base profile asks for it."""
    out = tmp_path / "lottery-aa"
    results = Experiment("lottery", base, out=out, preset="tiny", overrides=["exp.final_attack=autoattack"]).run()
    assert results["params"]["final_attack"] == "autoattack"
    cells = [c for t in results["tables"] for r in t["rows"] for c in r["cells"] if c and "nat" in c]
    assert cells and all(c["aa"] is not None and 0 <= c["aa"] <= c["adv"] for c in cells)
    assert {c["metric"] for c in results["tables"][0]["finding"]["comparisons"]} == {"AutoAttack"}
    for name, run in results["runs"].items():
        s = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        if run["role"]["compared"]:
            assert run["aa_acc"] == s["final"]["autoattack"]["robust_acc"], name
        else:
            assert name == "adv-w2-s0" and run["aa_acc"] is None and not s["final"].get("autoattack")
    budgets = {b["run"]: b for b in results["budgets"]}
    assert budgets["adv-w2"]["final_attack"] == "pgd" and budgets["lottery-w2-to-w1"]["final_attack"] == "autoattack"
    md = (out / "report.md").read_text()
    assert "a third number is AutoAttack's robust accuracy (AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; " in md
    for tid, (header, rows) in md_tables(md).items():
        table = next(t for t in results["tables"] if t["id"] == tid)
        for row, jrow in zip(rows, table["rows"]):
            assert all(cell_matches(txt, c) for txt, c in zip(row[1:], jrow["cells"])), (tid, row)
    wants_aa = tmp_path / "aa.toml"
    assert "[eval]" in base.read_text()
    wants_aa.write_text(base.read_text().replace("[eval]", '[eval]\nfinal_attack = "autoattack"'))
    e = Experiment("lottery", wants_aa, out=tmp_path / "plain", preset="tiny")
    assert all(e.resolved_profile(spec)[0].eval.final_attack == "pgd" for spec in e.plan)


def test_report_without_matplotlib(base, tmp_path):
    """Without matplotlib (the ``plots`` extra) the same report is written without PNGs, and report.md says so."""
    out = tmp_path / "lottery"
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from robprune.engine.experiments import Experiment; "
            f"Experiment('lottery', {str(base)!r}, out={str(out)!r}, preset='tiny').run()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.png"))
    md = (out / "report.md").read_text()
    assert [ln for ln in md.splitlines() if "robprune[plots]" in ln] == [
        "Figures skipped: matplotlib is not installed; `pip install 'robprune[plots]'` adds them."]
    assert "![" not in md
    results = json.loads((out / "results.json").read_text())
    assert results["figures"] == [] and results["figures_skipped"] == "matplotlib is not installed"
    assert set(md_tables(md)) == {"lottery"} and results["plots"]


# ------------------------------------------------------------------------------------------------ seeds and verdicts


def test_verdict_rule_on_constructed_numbers():
    """A difference counts only when it exceeds the spread (the larger of the two min-max ranges over seeds); a
    finding held when every difference counts for it, did not hold when one counts against it, else inconclusive."""
    c = Comparison("8->1", "ADMM", [0.80, 0.82, 0.84], "ticket", [0.70, 0.71, 0.74])
    assert c.diff == pytest.approx(0.1033333, abs=1e-6) and c.spread == pytest.approx(0.04) and c.outcome == 1
    assert verdict([(c, +1)]) == HELD and verdict([(c, -1)]) == NOT_HELD
    assert "8->1: ADMM 82.00 vs ticket 71.67 PGD (+10.33 points; spread 4.00: counts)" == c.text()
    # the inconclusive case: a difference of 4 points with seeds that spread over 20
    d = Comparison("8->4", "ADMM", [0.80, 0.90, 0.70], "ticket", [0.75, 0.76, 0.77])
    assert d.spread == pytest.approx(0.20) and d.outcome == 0
    assert verdict([(d, +1)]) == INCONCLUSIVE == verdict([(d, -1)])
    assert "ADMM 80.00 vs ticket 76.00 PGD (+4.00 points; spread 20.00: within the spread)" in d.text()
    assert verdict([(c, +1), (d, +1)]) == INCONCLUSIVE  # every difference must count for "held"
    assert verdict([(c, -1), (d, +1)]) == NOT_HELD  # one against is enough for "did not hold"
    assert verdict([]) == INCONCLUSIVE
    # exactly the spread does not count (0.25 = 0.25, exact in binary), a hair more does
    assert Comparison("x", "a", [0.5, 0.75], "b", [0.25, 0.5]).outcome == 0
    assert Comparison("x", "a", [0.5, 0.75], "b", [0.25, 0.499]).outcome == 1
    # the other sign counts too
    assert Comparison("x", "a", [0.1, 0.2], "b", [0.5, 0.6]).outcome == -1
    # a tolerance: the ticket is "at most 2 points behind" (outcome -1) only when diff - 0.02 is below -spread
    near = Comparison("t", "ADMM", [0.80, 0.82], "ticket", [0.80, 0.80], margin=0.02)  # diff 0.01, spread 0.02
    assert near.outcome == 0
    assert Comparison("t", "ADMM", [0.80, 0.805], "ticket", [0.81, 0.815], margin=0.02).outcome == -1
    assert Comparison("t", "ADMM", [0.90, 0.91], "ticket", [0.60, 0.62], margin=0.02).outcome == 1
    assert "against a tolerance of 2.00" in near.text()
    # one seed: no spread, never decided, however large the difference
    one = Comparison("x", "a", [0.9], "b", [0.1])
    assert one.spread == 0 and one.outcome == 0 and verdict([(one, +1)]) == INCONCLUSIVE
    assert "one seed, no spread" in one.text()


@pytest.fixture(scope="module")
def two_seeds(base) -> tuple[Path, dict, dict]:
    """The tiny lottery with seed 0, then with seeds [0, 1] in the same OUT: (OUT, results, first results)."""
    out = base.parent / "lottery-2seeds"
    first = Experiment("lottery", base, out=out, preset="tiny").run()
    return out, Experiment("lottery", base, out=out, preset="tiny", overrides=["exp.seeds=[0, 1]"]).run(), first


def test_more_seeds_reuse_the_seeds_done(two_seeds):
    out, results, first = two_seeds
    assert {n for n, r in first["runs"].items()} == {"adv-w2-s0", "admm-w2-to-w1-s0", "lottery-w2-to-w1-s0"}
    status = {n: r["status"] for n, r in results["runs"].items()}
    assert status == {"adv-w2-s0": "reused", "admm-w2-to-w1-s0": "reused", "lottery-w2-to-w1-s0": "reused",
                      "adv-w2-s1": "trained", "admm-w2-to-w1-s1": "trained", "lottery-w2-to-w1-s1": "trained"}
    # each seed is an independent training from its own initial weights
    i0, i1 = (safe_torch_load(out / "init" / f"lenet-w2-seed{s}.pt") for s in (0, 1))
    assert not torch.equal(i0["conv1.weight"], i1["conv1.weight"])
    for s in (0, 1):
        cfg = load_profile(out / "profiles" / f"adv-w2-s{s}.toml")
        assert cfg.run.seed == s and cfg.run.init == str(out / "init" / f"lenet-w2-seed{s}.pt")
        assert load_profile(out / "profiles" / f"admm-w2-to-w1-s{s}.toml").run.init == \
            str(out / "runs" / f"adv-w2-s{s}" / "model.pt")
        assert load_profile(out / "profiles" / f"lottery-w2-to-w1-s{s}.toml").run.init == \
            str(out / "init" / f"lottery-w2-to-w1-s{s}.pt")
    # fewer seeds reuse too, and their cells are that seed's numbers
    only1 = Experiment("lottery", out.parent / "tiny.toml", out=out, preset="tiny",
                       overrides=["exp.seeds=[1]"]).run()
    assert {r["status"] for r in only1["runs"].values()} == {"reused"} and set(only1["runs"]) == {
        "adv-w2-s1", "admm-w2-to-w1-s1", "lottery-w2-to-w1-s1"}
    c = only1["tables"][0]["rows"][0]["cells"][0]
    assert c["runs"] == ["admm-w2-to-w1-s1"]
    assert c["adv"] == round(100 * results["runs"]["admm-w2-to-w1-s1"]["adv_acc"], 2)
    again = Experiment("lottery", out.parent / "tiny.toml", out=out, preset="tiny",
                       overrides=["exp.seeds=[0, 1]"]).run()
    assert {r["status"] for r in again["runs"].values()} == {"reused"}  # (and the report is the two seeds' again)
    assert [t["rows"] for t in again["tables"]] == [t["rows"] for t in results["tables"]]


def test_two_seeds_cells_are_the_seeds_means_and_ranges(two_seeds):
    out, results, _ = two_seeds
    runs = results["runs"]
    for name, run in runs.items():  # results.json keeps every seed's numbers, those of its run directory
        s = json.loads((out / "runs" / name / "summary.json").read_text())
        assert (run["nat_acc"], run["adv_acc"], run["seed"]) == (s["final"]["nat_acc"], s["final"]["adv_acc"],
                                                                  int(name[-1]))
    t = results["tables"][0]
    md_header, md_rows = md_tables((out / "report.md").read_text())["lottery"]
    for row, md_row in zip(t["rows"], md_rows):
        for c, text in zip(row["cells"][:2], md_row[1:3]):
            assert c["runs"] == [f"{c['runs'][0][:-3]}-s0", f"{c['runs'][0][:-3]}-s1"] and c["seeds"] == [0, 1]
            parts = []
            for key, raw in (("nat", "nat_acc"), ("adv", "adv_acc")):
                xs = [runs[n][raw] for n in c["runs"]]
                assert c[key] == round(100 * (xs[0] + xs[1]) / 2, 2)
                assert c["range"][key] == [round(100 * min(xs), 2), round(100 * max(xs), 2)]
                parts.append(f"{c[key]:.2f} [{c['range'][key][0]:.2f}-{c['range'][key][1]:.2f}]")
            assert text == " / ".join(parts) and cell_matches(text, c)
        assert md_row[3] == "yes"
    # the verdict rests on those very numbers, by the rule
    (cmp,) = t["finding"]["comparisons"]
    assert cmp["a_seeds"] == [runs["admm-w2-to-w1-s0"]["adv_acc"], runs["admm-w2-to-w1-s1"]["adv_acc"]]
    assert cmp["b_seeds"] == [runs["lottery-w2-to-w1-s0"]["adv_acc"], runs["lottery-w2-to-w1-s1"]["adv_acc"]]
    again = Comparison("", "", cmp["a_seeds"], "", cmp["b_seeds"], margin=cmp["margin"])
    assert cmp["outcome"] == again.outcome and cmp["spread"] == again.spread and cmp["wanted"] == -1
    assert t["finding"]["verdict"] == verdict([(again, -1)])
    assert f"{100 * again.diff:+.2f} points against a tolerance of 2.00; " in t["finding"]["sentence"]
    # results.csv: one line per cell and seed, with that seed's raw numbers
    lines = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(lines) == 2 * 2 + 1
    for ln in lines:
        if ln["run"]:
            assert float(ln["adv_acc"]) == runs[ln["run"]]["adv_acc"] and int(ln["seed"]) == runs[ln["run"]]["seed"]
    assert "a number is the mean over the 2 seeds, in brackets its min-max range over seeds" in \
        (out / "report.md").read_text()


def test_admm_convergence_in_the_report(two_seeds):
    """Each ADMM run's row gives its final mean primal residual and the accuracy just before the hard prune, read from
    its metrics.jsonl; an unconverged one (tiny: one ADMM epoch) gets a warning under the table."""
    out, results, _ = two_seeds
    md = (out / "report.md").read_text()
    for s in (0, 1):
        name = f"admm-w2-to-w1-s{s}"
        recs = [json.loads(ln) for ln in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        res = [r for r in recs if r["type"] == "residuals" and r["phase"] == "admm"][-1]
        primal = [v["primal"] for v in res["layers"].values()]
        before = [r for r in recs if r["type"] == "eval" and r["phase"] == "admm" and r["reason"] == "phase_end"][-1]
        end = results["runs"][name]["admm_end"]
        assert end == admm_end(out / "runs" / name)
        assert end["primal_mean"] == sum(primal) / len(primal) and end["primal_max"] == max(primal)
        assert end["before_hard_prune"] == {"nat_acc": before["nat_acc"], "adv_acc": before["adv_acc"],
                                            "n": before["n"]}
        assert end["converged"] is (end["primal_mean"] <= PRIMAL_CONVERGED) is False
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        assert f"| {end['primal_mean']:.3f} (not converged) | {100 * before['nat_acc']:.2f}/" \
               f"{100 * before['adv_acc']:.2f} (n {before['n']}) |" in row
    assert results["runs"]["adv-w2-s0"]["admm_end"] is None
    (warning,) = results["tables"][0]["warnings"]
    assert warning.startswith("Warning: ADMM had not converged in admm-w2-to-w1 (") and "seed 1: " in warning
    assert f"**{warning}**" in md
    assert f"at most {PRIMAL_CONVERGED:g}" in md


# ------------------------------------------------------------------------------------------------ equal budgets

@pytest.mark.parametrize("preset,profile", [("cpu", "profiles/mnist_quick.toml"),
                                            ("paper", "profiles/mnist_lenet_paper.toml")])
def test_equal_budgets_by_construction(tmp_path, preset, profile):
    """The compared sides get the same training: the lottery ticket's whole (masked) training is the ADMM run's
    retraining phase; (d) inherited gets (c)'s ADMM-phase settings and retraining; every scheme the same phases;
    natural and adversarial training in weight-dist the same epochs and settings."""
    def cfgs(name):
        e = Experiment(name, ROOT / profile, out=tmp_path / name, preset=preset)
        assert e.seeds == [0, 1, 2] and len(e.plan) % 3 == 0
        out = {}
        for spec in e.plan:
            cfg = e.resolved_profile(spec)[0]
            assert cfg.run.seed == spec.role["seed"] and spec.name.endswith(f"-s{spec.role['seed']}")
            out[spec.name] = cfg
        return e, out

    e, c = cfgs("lottery")
    big = e.params["width"]
    for s in e.params["targets"]:
        admm, ticket = c[f"admm-w{big}-to-w{s}-s1"], c[f"lottery-w{big}-to-w{s}-s1"]
        assert admm.phases.retrain == ticket.phases.retrain and admm.attack.train == ticket.attack.train
        assert ticket.phases.pretrain.epochs == ticket.phases.admm.epochs == 0
        assert admm.eval.final_attack == ticket.eval.final_attack
    e, c = cfgs("scratch-vs-pruned")
    ws = sorted(e.params["widths"])
    for b in ws:
        for s in [x for x in ws if x < b]:
            admm, inh = c[f"admm-w{b}-to-w{s}-s0"], c[f"inherit-w{b}-to-w{s}-s0"]
            assert inh.phases.pretrain == admm.phases.admm and inh.phases.retrain == admm.phases.retrain
            assert inh.attack.train == admm.attack.train and inh.phases.admm.epochs == 0
    e, c = cfgs("schemes")
    pruned = [v for k, v in c.items() if k.startswith("admm-")]
    assert all(p.phases == pruned[0].phases and p.attack.train == pruned[0].attack.train for p in pruned)
    e, c = cfgs("weight-dist")
    for w in e.params["widths"]:
        nat, adv = c[f"natural-w{w}-s2"], c[f"adv-w{w}-s2"]
        assert nat.phases == adv.phases and nat.attack.train.kind == "none"
    e, c = cfgs("budgets")
    pruned = [v for k, v in c.items() if k.startswith("admm-")]
    assert len(pruned) == 3 * 9
    assert all(p.phases == pruned[0].phases and p.attack == pruned[0].attack and p.eval == pruned[0].eval
               for p in pruned)


def test_budget_table_in_the_report(two_seeds):
    out, results, _ = two_seeds
    md = (out / "report.md").read_text()
    rows = {r[0]: r for r in (_split(ln) for ln in md.split("### Training budgets")[1].split("### Runs")[0]
                              .splitlines() if ln.startswith("| ") and not ln.startswith("| run "))}
    assert set(rows) == {"adv-w2", "admm-w2-to-w1", "lottery-w2-to-w1"}
    assert rows["admm-w2-to-w1"][4] == rows["lottery-w2-to-w1"][4] == "1 x adam 0.001, constant"
    assert rows["lottery-w2-to-w1"][1] == "init of adv-w2 x mask of admm-w2-to-w1"
    assert rows["adv-w2"][2] == "1 x adam 0.003, constant" and rows["adv-w2"][4] == "-"


# ------------------------------------------------------------------------------------------------ budgets

ALLOCS = ("uniform", "global", "erk")


def test_budgets_plan(tmp_path, base):
    """One dense model per seed, then every allocation at every ratio ADMM-pruned from it (9 runs with the default
    ratios and allocations), each setting only its prune.allocation and prune.ratio: equal budgets by construction.
    prune.layers is empty in every run (the allocation covers every layer, whatever the base profile says), and the
    other experiments' runs are uniform whatever the base profile says."""
    e = Experiment("budgets", ROOT / "profiles/mnist_quick.toml", out=tmp_path / "o", preset="cpu")
    assert (e.params["ratios"], e.params["allocations"], e.params["width"]) == ([0.9, 0.95, 0.99], list(ALLOCS), 4)
    assert len(e.plan) == 3 * (1 + 9)
    for seed in e.seeds:
        specs = [s for s in e.plan if s.role["seed"] == seed]
        assert [s.name for s in specs] == [f"adv-w4-s{seed}"] + [f"admm-w4-{a}-{r}pct-s{seed}"
                                                                 for r in (90, 95, 99) for a in ALLOCS]
        cfgs = {s.name: e.resolved_profile(s)[0] for s in specs}
        dense = cfgs.pop(f"adv-w4-s{seed}")
        assert dense.prune.allocation == "uniform" and dense.eval.final_attack == "pgd" and dense.prune.ratio == 0
        first = cfgs[f"admm-w4-uniform-90pct-s{seed}"].to_dict()
        for spec in specs[1:]:
            cfg = cfgs[spec.name]
            assert (cfg.prune.allocation, cfg.prune.ratio) == (spec.role["allocation"], spec.role["ratio"])
            assert cfg.prune.layers == {} and cfg.prune.scheme == cfg.prune.linear_scheme == "irregular"
            assert cfg.run.init == str(e.run_dir(f"adv-w4-s{seed}") / "model.pt") and cfg.run.seed == seed
            assert cfg.phases.pretrain.epochs == 0 and cfg.eval.final_attack == "autoattack"
            d = cfg.to_dict()
            for x in (d, first):  # nothing else differs
                for key in ("allocation", "ratio"):
                    x["prune"].pop(key, None)
                x["run"].pop("name", None)
            assert d == first, spec.name
    assert load_profile(base).prune.layers  # the tests' base profile prunes conv1 at 0.5: not in these runs
    e = Experiment("budgets", base, out=tmp_path / "t", preset="tiny", overrides=["exp.ratios=[0.99]"])
    assert [s.name for s in e.plan] == ["adv-w2-s0", *(f"admm-w2-{a}-99pct-s0" for a in ALLOCS)]
    assert all(e.resolved_profile(s)[0].prune.layers == {} for s in e.plan)
    glob = tmp_path / "global.toml"
    glob.write_text(base.read_text().replace("[prune]\n", '[prune]\nallocation = "global"\nglobal_normalize = true\n'))
    for name in ("lottery", "schemes"):
        e = Experiment(name, glob, out=tmp_path / name, preset="tiny")
        assert {(c.prune.allocation, c.prune.global_normalize) for c in (e.resolved_profile(s)[0] for s in e.plan)} \
            == {("uniform", False)}
    e = Experiment("budgets", glob, out=tmp_path / "g", preset="tiny", overrides=["exp.global_normalize=true"])
    assert {(c.prune.allocation, c.prune.global_normalize) for c in (e.resolved_profile(s)[0] for s in e.plan)} == {
        ("uniform", False), ("global", True), ("erk", False)}


def test_budgets_ratios_are_the_runs_targets(done):
    """The per-layer ratios in the report are each run's summary.json targets (and its events.jsonl allocation);
    every run removes exactly n_pruned(total, ratio) weights overall (uniform: floor(ratio x n) of each layer, which
    on LeNet w=2 adds up to the same)."""
    out, results, _ = done["budgets"]
    t = {t["id"]: t for t in results["tables"]}["ratios"]
    md = md_tables((out / "report.md").read_text())["ratios"]
    for j, col in enumerate(t["columns"]):
        a, pct = col.split()
        r = {"90%": 0.9, "95%": 0.95, "99%": 0.99}[pct]
        name = f"admm-w2-{a}-{pct[:-1]}pct-s0"
        run = out / "runs" / name
        summary = json.loads((run / "summary.json").read_text())
        (alloc,) = [x for x in map(json.loads, (run / "events.jsonl").read_text().splitlines())
                    if x["type"] == "allocation"]
        assert (alloc["method"], alloc["ratio"], summary["prune"]["allocation"]) == (a, r, a)
        targets = {L["name"]: L["target"] for L in summary["layers"]}
        for row, md_row in zip(t["rows"][:-1], md[1][:-1]):
            layer = row["label"].split()[0]
            c = row["cells"][j]
            assert c["raw_seeds"] == [targets[layer]] == [alloc["layers"][layer]["ratio"]]
            assert c["value"] == round(100 * targets[layer], 2) and cell_matches(md_row[j + 1], c)
            assert results["allocations"][a][pct]["layers"][layer] == [targets[layer]]
        sd = safe_torch_load(run / "model.pt")
        total = sum(L["params"] for L in summary["layers"])
        zeros = sum(int((sd[k] == 0).sum()) for k in targets)
        assert zeros == alloc["pruned"] == summary["prune"]["allocated"]["pruned"] == n_pruned(total, r), name
        assert total == alloc["prunable"] == summary["sparsity"]["prunable_params"] == 52356
        for L in summary["layers"]:  # each layer exactly at its own target
            assert int((sd[L["name"]] == 0).sum()) == alloc["layers"][L["name"]]["pruned"] == n_pruned(L["params"],
                                                                                                  L["target"])
            if a == "uniform":
                assert L["target"] == r
        assert t["rows"][-1]["cells"][j] == {"text": f"{zeros} / {total}"} and md[1][-1][j + 1] == f"{zeros} / {total}"


def test_budgets_report(done):
    """results.json holds every seed's numbers, the accuracy cells are the runs', the budgets are equal, and the
    finding says held / did not hold / inconclusive with the numbers."""
    out, results, _ = done["budgets"]
    t = {t["id"]: t for t in results["tables"]}["budgets"]
    for row in t["rows"]:
        for pct, c in zip((90, 95, 99), row["cells"]):
            name = f"admm-w2-{row['label']}-{pct}pct-s0"
            s = json.loads((out / "runs" / name / "summary.json").read_text())
            assert c["runs"] == [name] and results["runs"][name]["role"]["allocation"] == row["label"]
            assert (results["runs"][name]["nat_acc"], results["runs"][name]["adv_acc"]) == (s["final"]["nat_acc"],
                                                                                          s["final"]["adv_acc"])
            assert c["adv"] == round(100 * s["final"]["adv_acc"], 2)
    f = t["finding"]
    assert f["verdict"] in (HELD, NOT_HELD, INCONCLUSIVE)
    assert re.match(r"(Held|Did not hold|Inconclusive at this budget): ", f["sentence"])
    assert "at 99%: " in f["sentence"] and "margin over uniform: at 99% (" in f["sentence"]
    assert "best non-uniform minus uniform (means): " in f["sentence"]
    assert [c["wanted"] for c in f["comparisons"]] == [1, 1]
    best = results["best_non_uniform"]["99%"]
    assert f["comparisons"][0]["a_seeds"] == [results["runs"][f"admm-w2-{best}-99pct-s0"]["adv_acc"]]
    assert results["margin_over_uniform"]["99%"]["seeds"] == f["comparisons"][1]["a_seeds"]
    md = (out / "report.md").read_text()
    assert f"**On this run:** {f['sentence']}." in md and "HARP" in md
    rows = [_split(ln) for ln in md.split("### Training budgets")[1].split("### Runs")[0].splitlines()
            if ln.startswith("| admm-")]
    assert len(rows) == 9 and len({tuple(r[1:]) for r in rows}) == 1  # equal budgets, but for the name
    assert all(r["admm_end"] for n, r in results["runs"].items() if n.startswith("admm-"))  # convergence rows


def _fake_budgets(tmp_path, base, adv: dict) -> dict:
    """budgets' report on two seeds of made-up accuracies (PGD): ``adv[(allocation, ratio)]`` per seed."""
    e = Experiment("budgets", base, out=tmp_path / "fake", preset="tiny",
                   overrides=["exp.seeds=[0, 1]", "exp.ratios=[0.9, 0.99]"])
    for spec in e.plan:
        role = spec.role
        r = role.get("ratio", 0.0)
        summary = {"final": {"nat_acc": 0.9, "adv_acc": adv.get((role.get("allocation"), r), [0.5, 0.5])[role["seed"]],
                             "n": 64, "attack": {}, "autoattack": None},
                   "layers": [{"name": k, "params": n, "target": r} for k, n in e.numels(2).items()],
                   "prune": {"allocated": {"pruned": 0, "prunable": 1, "ratio": r}}}
        e.runs[spec.name] = RunResult(spec, e.run_dir(spec.name), "reused", summary, 0.0)
    return budgets.report(e)["tables"][0]


@pytest.mark.parametrize("adv,want", [
    # erk beats uniform by 30 points at 99% and global by 4.5 at 90%: held
    ({("uniform", 0.99): [0.10, 0.12], ("erk", 0.99): [0.40, 0.42], ("global", 0.99): [0.30, 0.31],
      ("uniform", 0.9): [0.50, 0.52], ("global", 0.9): [0.55, 0.56], ("erk", 0.9): [0.53, 0.54]}, HELD),
    # uniform is best at 99%: did not hold
    ({("uniform", 0.99): [0.40, 0.41], ("erk", 0.99): [0.10, 0.11], ("global", 0.99): [0.10, 0.12]}, NOT_HELD),
    # non-uniform wins at 99% but by less than at 90%: did not hold
    ({("uniform", 0.99): [0.10, 0.11], ("erk", 0.99): [0.20, 0.21], ("global", 0.99): [0.15, 0.16],
      ("uniform", 0.9): [0.20, 0.21], ("global", 0.9): [0.60, 0.61]}, NOT_HELD),
    # the seeds spread more than the differences: inconclusive
    ({("uniform", 0.99): [0.10, 0.40], ("erk", 0.99): [0.20, 0.45]}, INCONCLUSIVE),
])
def test_budgets_verdict_on_constructed_numbers(tmp_path, base, adv, want):
    t = _fake_budgets(tmp_path, base, adv)
    assert t.verdict == want, t.detail
    assert t.detail.startswith(("at 99%: ", "against the finding: ", "2 of 2", "1 of 2"))
    assert "best non-uniform minus uniform (means): " in t.detail


def test_schemes_nm_row_prunes_n_of_m_and_compares_irregular_at_the_same_ratios(tmp_path):
    """exp.nm = "2:4": the dense model pruned 2:4 (every group of 4 along a row keeps exactly 2; LeNet's conv1, rows of
    25, stays dense) and pruned irregularly to exactly the same per-layer counts, on the same budget."""
    from robprune.engine.experiments import Experiment

    e = Experiment("schemes", ROOT / "profiles/mnist_quick.toml", out=tmp_path / "s", preset="tiny",
                   figures=False)
    res = e.run()
    nm = {k: v for k, v in safe_torch_load(tmp_path / "s/runs/admm-2of4-w2-s0/model.pt").items()
          if k in prunable_parameters(build_model("lenet", 2))}
    irr = safe_torch_load(tmp_path / "s/runs/admm-irregular-as-2of4-w2-s0/model.pt")
    for name, w in nm.items():
        rows = w.reshape(w.shape[0], -1)
        if rows.shape[1] % 4:
            assert name == "conv1.weight" and int((w == 0).sum()) == 0
            continue
        zeros = (rows.reshape(rows.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros == 2).all()), name  # exactly M - N zeros in every group
        assert int((irr[name] == 0).sum()) == int((w == 0).sum()) == w.numel() // 2
    t = next(t for t in res["tables"] if t["id"] == "nm")
    assert t["columns"] == ["2:4", "irregular, same ratios"] and t["rows"][0]["label"] == "50% of 3 of 4 layers"
    assert "irregular minus 2:4 is" in t["note"] and "conv1.weight" in t["note"]


def test_two_fresh_invocations_give_the_same_numbers_and_verdicts(tmp_path):
    """The lottery verdict must not flip between invocations: with the same seeds, two fresh runs of the whole
    experiment (nothing reused) give identical tables, findings and per-seed accuracies."""
    from robprune.engine.experiments import Experiment

    got = []
    for k in (1, 2):
        e = Experiment("lottery", ROOT / "profiles/mnist_quick.toml", out=tmp_path / f"l{k}", preset="tiny",
                       overrides=["exp.seeds=[0,1]"], figures=False)
        res = e.run()
        runs = json.loads((tmp_path / f"l{k}" / "results.json").read_text())["runs"]
        got.append(([(t["rows"], t["finding"]) for t in res["tables"]],
                    {n: (r["nat_acc"], r["adv_acc"]) for n, r in runs.items()}))
    assert got[0] == got[1]
    assert got[0][0][0][1]["verdict"]  # a verdict was reached (held, did not hold or inconclusive)



def test_a_runs_summary_that_is_a_fifo_or_not_an_object_counts_as_none(tmp_path):
    """A finished run's summary.json decides whether the run is reused: a FIFO there is not read (that would wait
    for a writer forever), and it, like a JSON array, counts as no summary, so the run is finished again."""
    from robprune.engine.experiments.runs import read_json

    fifo, array, good = tmp_path / "fifo.json", tmp_path / "array.json", tmp_path / "summary.json"
    os.mkfifo(fifo)
    array.write_text("[1, 2]\n")
    good.write_text('{"status": "completed"}\n')
    assert read_json(fifo) is None and read_json(array) is None and read_json(tmp_path / "missing.json") is None
    assert read_json(good) == {"status": "completed"}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
