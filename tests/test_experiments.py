"""`robprune experiment`: every experiment on the tiny preset (synthetic data, one epoch a phase), its report's
rows, columns and files, report.md's numbers against results.json, reuse and resume of runs, the lottery mask."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from robprune.engine.config import load_profile
from robprune.engine.errors import UserError
from robprune.engine.experiments import (EXPERIMENTS, Experiment, ExperimentStopped, lottery_init, sliced_state)
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


def cell_matches(text: str, cell: dict | None) -> bool:
    """A markdown cell says exactly what the JSON cell holds (numbers compared as numbers)."""
    if cell is None:
        return text == ""
    if "nat" in cell:
        m = re.fullmatch(r"(\d+\.\d\d)/(\d+\.\d\d)(?:/(\d+\.\d\d))?", text)
        aa = None if not m or m.group(3) is None else float(m.group(3))
        return bool(m) and float(m.group(1)) == cell["nat"] and float(m.group(2)) == cell["adv"] and \
            aa == cell.get("aa")
    if "value" in cell:
        bold = text.startswith("**") and text.endswith("**")
        if bold != bool(cell.get("mark")):
            return False
        return float(text.strip("*")) == round(cell["value"], cell.get("digits", 2))
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
    "schemes": {"schemes": ("pruned to", ["irregular", "column", "filter"], ["2->1 (75.00%)"])},
}

FIGURES = {"weight-dist": {"weights_w1.png", "weights_w2.png", "accuracy.png"},
           "scratch-vs-pruned": {"pgd_by_pair.png", "adv_training_by_width.png"},
           "lottery": {"lottery.png"}, "transfer": {"transfer.png"},
           "schemes": {"schemes_pgd.png", "schemes_natural.png"}}


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
        assert cfg.run.name == run and cfg.run.seed == results["seeds"]["run.seed"]
        assert info["status"] == "trained"
    for key in ("torch", "torchvision", "python", "robprune"):
        assert results["versions"][key]
    assert results["attack"]["eval"] == {"kind": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 2, "restarts": 1,
                                          "loss": "ce"}
    md = (out / "report.md").read_text()
    for text in ("run.seed = 0", "evaluation attack: pgd eps 0.1, step 0.05, 2 steps", "torch 2.", "torchvision",
                 "python 3.", "robprune "):
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
        assert f["claim"] and isinstance(f["held"], bool)
        assert f["sentence"].startswith("Held: " if f["held"] else "Did not hold: ")


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
                    run = results["runs"][cell["run"]]
                    assert cell["nat"] == round(100 * run["nat_acc"], 2)
                    assert cell["adv"] == round(100 * run["adv_acc"], 2)
                if cell and "raw" in cell:
                    assert round(cell["raw"] * (1 if cell.get("digits") else 100), cell.get("digits", 2)) == cell["value"]
        sentence = t["finding"]["sentence"]
        assert f"**On this run:** {sentence}." in md
    # results.csv: one line per non-empty cell, with the raw numbers
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
    sd = safe_torch_load(out / "runs" / "admm-w2-to-w1" / "model.pt")
    for k, n in small.items():
        assert int(torch.count_nonzero(sd[k])) == n, k
    # dense runs are dense and natural training is natural
    assert results["runs"]["adv-w2"]["sparsity"] == 0.0
    assert load_profile(out / "profiles" / "natural-w1.toml").attack.train.kind == "none"
    assert load_profile(out / "profiles" / "adv-w1.toml").attack.train.kind == "pgd"
    # (d) starts from the w_L model's sliced weights
    init = safe_torch_load(out / "init" / "inherit-w2-to-w1.pt")
    big = safe_torch_load(out / "runs" / "adv-w2" / "model.pt")
    assert torch.equal(init["conv2.weight"], big["conv2.weight"][:4, :2])
    assert torch.equal(init["fc1.weight"], big["fc1.weight"][:64, :196])


def test_lottery_ticket_keeps_exactly_the_admm_mask(done):
    out, results, _ = done["lottery"]
    admm = safe_torch_load(out / "runs" / "admm-w2-to-w1" / "model.pt")
    ticket = safe_torch_load(out / "runs" / "lottery-w2-to-w1" / "model.pt")
    init = safe_torch_load(out / "init" / "lottery-w2-to-w1.pt")
    original = safe_torch_load(out / "init" / "lenet-w2-seed0.pt")
    ratios = results["runs"]["lottery-w2-to-w1"]["role"]["ratios"]
    for k, r in ratios.items():
        mask = admm[k] != 0
        assert int((~mask).sum()) == n_pruned(admm[k].numel(), r), k  # exact counts
        assert torch.equal(init[k], original[k] * mask), k  # the original init times the mask
        assert torch.equal(ticket[k] != 0, mask), k  # the hard prune at retrain start kept exactly that mask
        assert not torch.equal(ticket[k], init[k]), k  # and the ticket was trained
    assert results["mask_identical"] == {"2->1": True}
    # the dense model's pretraining started from the same original init
    assert load_profile(out / "profiles" / "adv-w2.toml").run.init == str(out / "init" / "lenet-w2-seed0.pt")


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
    run = out / "runs" / "admm-w2-to-w1"
    assert (run / "checkpoint.pt").is_file() and not (run / "model.pt").exists()
    events = []
    results = Experiment("lottery", base, out=out, preset="tiny", progress=events.append).run()
    status = {n: r["status"] for n, r in results["runs"].items()}
    assert status == {"adv-w2": "reused", "admm-w2-to-w1": "resumed", "lottery-w2-to-w1": "trained"}
    assert results["mask_identical"] == {"2->1": True}


def test_changed_settings_are_refused(done, base):
    out, _, _ = done["lottery"]
    with pytest.raises(UserError, match=r"adv-w2: made with other settings \(attack.train.steps: 2 now 3\)"):
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
        if name in ("weight-dist", "schemes"):
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
    """--set exp.final_attack=autoattack: every run ends with an AutoAttack, every accuracy cell gets a third number
    (AutoAttack's robust accuracy, never above the PGD one of the same run here), the report names the attack, and
    without it (the default) no run runs one, even when the base profile asks for it."""
    out = tmp_path / "lottery-aa"
    results = Experiment("lottery", base, out=out, preset="tiny", overrides=["exp.final_attack=autoattack"]).run()
    assert results["params"]["final_attack"] == "autoattack"
    cells = [c for t in results["tables"] for r in t["rows"] for c in r["cells"] if c and "nat" in c]
    assert cells and all(c["aa"] is not None and 0 <= c["aa"] <= c["adv"] for c in cells)
    for name, run in results["runs"].items():
        s = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        assert run["aa_acc"] == s["final"]["autoattack"]["robust_acc"], name
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
