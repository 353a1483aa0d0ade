"""N:M sparsity and per-layer budgets through the whole engine: a 2:4 run (masks, summary, dashboard, the 2:4
export and bench refused in one line without a GPU), an ERK run with exact counts, and refusals before a run
directory is made. The projections and allocations themselves are tested in tests/test_pruning.py."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from robprune.engine.errors import ConfigError, UserError
from robprune.engine.pruning import n_pruned
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY, run_session, write_profile
from tests.test_cli import assert_one_line_error, robprune

NO_LAYERS = TINY.replace('[prune.layers]\n"conv1.weight" = 0.5\n', "")
NM_SETS = ['prune.scheme="2:4"', 'prune.linear_scheme="2:4"', "prune.layers.conv1.weight=0.0",
           "phases.pretrain.epochs=1", "phases.admm.epochs=2", "phases.retrain.epochs=1"]


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    """A finished LeNet run, 2:4 everywhere but conv1 (rows of 25: left dense), with every event it emitted."""
    events = []
    s, summary = run_session(tmp_path_factory.mktemp("nm"), NM_SETS, events=events)
    return s, summary, events


def test_nm_run_masks_weights_and_summary(nm_run):
    s, summary, events = nm_run
    rd = s.rundir.path
    ck = torch.load(rd / "checkpoint.pt", weights_only=True)
    weights = torch.load(rd / "model.pt", weights_only=True)
    assert set(ck["masks"]) == {"conv2.weight", "fc1.weight", "fc2.weight"}
    for k, mask in ck["masks"].items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert ((~groups).sum(-1) == 2).all(), k  # every group of 4: exactly 2 removed
        assert torch.count_nonzero(weights[k][~mask]) == 0
        w = weights[k].reshape(mask.shape[0], -1, 4)
        assert ((w != 0).sum(-1) <= 2).all(), k  # the weights are 2:4, along the rows torch's kernels read
    by = {L["name"]: L for L in summary["layers"]}
    assert by["conv1.weight"]["target"] == 0.0 and by["conv1.weight"]["zeros"] == 0
    for k in ck["masks"]:
        assert by[k]["scheme"] == "2:4" and by[k]["target"] == 0.5 and by[k]["zeros"] == by[k]["params"] // 2
    assert summary["prune"]["scheme"] == "2:4" and summary["prune"]["allocated"]["method"] == "uniform"
    md = (rd / "summary.md").read_text()
    assert "| fc1.weight | 128x392 | 50176 | 25088 | 50.00% | 50.00% (2:4) | 2:4 |" in md
    notes = [e.message for e in events if e.type == "log" and "1 - N/M" in e.message]
    assert notes == ["2:4 layers are pruned at 50% (1 - N/M); prune.ratio 0.8 is not used"]
    alloc = [e for e in read_jsonl(rd / "events.jsonl") if e["type"] == "allocation"]
    assert len(alloc) == 1 and alloc[0]["pruned"] == (800 + 128 * 392 + 10 * 128) // 2
    assert alloc[0]["layers"]["fc2.weight"] == {"ratio": 0.5, "numel": 1280, "pruned": 640, "scheme": "2:4",
                                                "set_by": "scheme"}
    last = [e for e in events if e.type == "layers"][-1].layers
    fc1 = next(L for L in last if L["name"] == "fc1.weight")
    assert fc1["n_pruned"] == 25088 and fc1["masked"] == 25088 and fc1["masked_nonzero"] == 0
    assert fc1["at_or_below"] >= 0.5 and fc1["threshold"] == 0.0 and not fc1["target_pending"]


def test_nm_layer_table_and_summary_tables_show_the_pattern(nm_run):
    from robprune.tui.app import RobpruneApp
    from robprune.tui.backend import AttachBackend
    from robprune.tui.widgets.layer_table import LayerTable, target_cell

    s, summary, _ = nm_run
    assert target_cell({"target": 0.5, "scheme": "2:4"}) == "2:4"
    assert target_cell({"target": 0.0, "scheme": "2:4"}) == "0.0%"  # left dense
    assert target_cell({"target": 0.8, "scheme": "irregular", "target_pending": True}) == "auto"
    assert target_cell({"target": 0.8125, "scheme": "irregular"}) == "81.2%"
    from robprune.tui.headless import summary_table

    t = summary_table(summary)
    assert "50.00% (2:4)" in t.columns[-1]._cells and "0.00%" in t.columns[-1]._cells

    app = RobpruneApp(AttachBackend(s.rundir.path, poll_s=0.05), refresh_hz=20)

    async def scenario():
        async with app.run_test(size=(120, 40)):
            table = app.query_one(LayerTable)
            t0 = time.monotonic()
            while table.row_count < 4:
                assert time.monotonic() - t0 < 60, "the layer table never filled"
                await asyncio.sleep(0.05)
            return {k: str(table.get_cell(k, "target")) for k in ("conv1.weight", "fc1.weight", "fc2.weight")}

    cells = asyncio.run(scenario())
    assert cells == {"conv1.weight": "0.0%", "fc1.weight": "2:4", "fc2.weight": "2:4"}


def test_nm_export_and_bench_refuse_in_one_line_without_a_gpu(nm_run, monkeypatch):
    from robprune.engine.bench import run_semi_structured_bench
    from robprune.engine.export import (check_semi_structured, load_run_model, semi_structured_layers,
                                        semi_structured_support, to_semi_structured)

    s, _, _ = nm_run
    rd = s.rundir.path
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal: this machine has a GPU")
    r = robprune("export", rd, "--semi-structured")
    assert_one_line_error(r, str(rd), "cannot convert to 2:4 semi-structured sparse here",
                          "compute capability 8.0 or newer", "no CUDA device here")
    assert not (rd / "model_card.json").exists() and not (rd / "model.safetensors").exists()  # nothing written

    rm = load_run_model(rd)
    assert semi_structured_layers(rm.model, rm.layers) == ["fc1.weight", "fc2.weight"]
    rm.layers = {k: {**v, "scheme": "irregular"} for k, v in rm.layers.items()}
    with pytest.raises(UserError, match="no linear layer was pruned 2:4 .*needs prune.linear_scheme = \"2:4\""):
        check_semi_structured(rm)
    assert semi_structured_support(capability=(7, 5)) == (False, "2:4 semi-structured sparse kernels need compute "
                                                                  "capability 8.0 or newer (A100, RTX 30xx, H100 ...); "
                                                                  "this GPU has 7.5")
    assert semi_structured_support(capability=(8, 0)) == (True, "")
    with pytest.raises(UserError, match="cannot convert to 2:4 semi-structured sparse here"):
        to_semi_structured(rm.model, ["fc1.weight"])

    res = run_semi_structured_bench(device="cpu", repeats=1, warmup=0, iters=1)
    assert res["bench"] == "semi_structured" and res["supported"] is False and "compute capability" in res["reason"]
    r = robprune("bench", "--semi-structured", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["supported"] is False and out["settings"]["batch"] == 4096 and "the device is cpu" in out["reason"]
    with pytest.raises(ValueError, match="multiple of 64"):
        run_semi_structured_bench(device="cpu", hidden=100)


def test_to_semi_structured_picks_the_2_4_linear_weights(nm_run, monkeypatch):
    """The conversion's bookkeeping, on the CPU with a stand-in converter: the 2:4 Linear weights are converted,
    a weight that is not 2:4 stays dense with the reason, and so does one the converter refuses."""
    from robprune.engine import export
    from robprune.engine.export import load_run_model, semi_structured_layers, to_semi_structured

    s, _, _ = nm_run
    rm = load_run_model(s.rundir.path)
    monkeypatch.setattr(export, "semi_structured_support", lambda *a, **kw: (True, ""))
    calls = []

    def fake(w):
        calls.append(tuple(w.shape))
        if w.shape[0] % 32:
            raise RuntimeError("Error original_tensor.shape torch.Size([10, 128]) is not supported!\nmore")
        return w.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake)
    rm.model.fc1.weight.data[0, :4] = 1.0  # one group made dense: not 2:4 any more
    names = semi_structured_layers(rm.model, rm.layers) + ["conv2.weight"]
    out, report = to_semi_structured(rm.model, names, dtype=torch.float32, device="cpu")
    assert report["converted"] == []
    assert report["skipped"] == {
        "fc1.weight": "not 2:4 along its rows (more than 2 nonzeros in a group of 4)",
        "fc2.weight": "RuntimeError: Error original_tensor.shape torch.Size([10, 128]) is not supported!",
        "conv2.weight": "not the weight of a Linear layer"}
    rm = load_run_model(s.rundir.path)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    out, report = to_semi_structured(rm.model, ["fc1.weight", "fc2.weight"], dtype=torch.float32, device="cpu")
    assert report["converted"] == ["fc1.weight", "fc2.weight"] and not out.fc1.weight.requires_grad
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(out(x), rm.model(x))


# ------------------------------------------------------------------------------------------------ refusals


def test_nm_row_length_refused_before_a_run_directory(tmp_path):
    prof = write_profile(tmp_path, NO_LAYERS)
    s = Session.new(prof, ['prune.scheme="2:4"'], tmp_path / "r")
    with pytest.raises(ConfigError) as ei:
        s.prepare()
    msg = str(ei.value)
    assert msg.startswith("--set: prune.scheme: expected an N:M scheme whose M divides the row length")
    assert "'conv1.weight' 4x1x5x5 has rows of 25, not a multiple of 4" in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / "r").exists()
    r = robprune("run", write_profile(tmp_path, NO_LAYERS.replace('scheme = "irregular"', 'scheme = "2:4"'),
                                      "nm.toml"), "--run-dir", tmp_path / "r2", "-q")
    assert_one_line_error(r, "nm.toml: prune.scheme", "'conv1.weight'", "not a multiple of 4")
    assert not (tmp_path / "r2").exists()


def test_nm_layer_with_another_ratio_refused(tmp_path):
    prof = write_profile(tmp_path, TINY.replace('"conv1.weight" = 0.5', '"conv1.weight" = 0.0\n"fc*" = 0.8'))
    s = Session.new(prof, ['prune.scheme="2:4"', 'prune.linear_scheme="2:4"'], tmp_path / "r")
    with pytest.raises(ConfigError) as ei:
        s.prepare()
    assert str(ei.value) == (f'{prof}: prune.layers."fc*": expected 0 (left dense) or 0.5 (the ratio 2:4 implies) '
                             "for the 2:4 layer 'fc1.weight', found 0.8")
    assert not (tmp_path / "r").exists()


def test_allocation_budget_refused_before_a_run_directory(tmp_path):
    s = Session.new(write_profile(tmp_path), ['prune.allocation="erk"', "prune.ratio=0.0005"], tmp_path / "r")
    with pytest.raises(ConfigError) as ei:
        s.prepare()
    assert str(ei.value) == ("--set: prune.ratio: expected a ratio in [0.000955, 0.999] with allocation 'erk': the "
                             "layers prune.layers sets already remove 50 of the 52356 weights, more than 26, found "
                             "0.0005")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ ERK in a run


def test_erk_run_meets_the_overall_count_exactly(tmp_path):
    from robprune.engine.models import prunable_parameters
    from robprune.engine.pruning import erk_counts

    sets = ['prune.allocation="erk"', "prune.ratio=0.9", "phases.pretrain.epochs=1", "phases.admm.epochs=1",
            "phases.retrain.epochs=0"]
    s = Session.new(write_profile(tmp_path), sets, tmp_path / "r")
    s.prepare()
    expected = dict(s.engine.ratios)  # ERK needs no weights: known (and shown) from the start
    summary = s.run()
    params = prunable_parameters(s.engine.model)
    shapes = {k: tuple(p.shape) for k, p in params.items() if k != "conv1.weight"}
    total = sum(p.numel() for p in params.values())
    budget = n_pruned(total, 0.9) - n_pruned(params["conv1.weight"].numel(), 0.5)
    counts = erk_counts(shapes, budget)
    by = {L["name"]: L for L in summary["layers"]}
    for k, c in counts.items():
        assert by[k]["zeros"] == c and by[k]["target"] == expected[k], k
    assert by["conv1.weight"]["zeros"] == n_pruned(100, 0.5)
    assert sum(L["zeros"] for L in summary["layers"]) == n_pruned(total, 0.9)
    assert summary["prune"]["allocated"]["pruned"] == n_pruned(total, 0.9)
    assert "allocation erk" in (s.rundir.path / "summary.md").read_text()


def test_dashboard_state_takes_the_allocation_at_once():
    from robprune.tui.state import RunState
    from robprune.tui.widgets.layer_table import target_cell

    rs = RunState()
    layers = [{"name": n, "shape": [4, 4], "numel": 16, "target": 0.8, "target_pending": n != "a", "scheme":
               "irregular", "zeros": 0, "sparsity": 0.0} for n in ("a", "b", "c")]
    rs.apply({"t": 1.0, "type": "layers", "step": 8, "epoch": 1, "phase": "pretrain", "layers": layers})
    assert [target_cell(L) for L in rs.layers] == ["80.0%", "auto", "auto"]
    rs.apply({"t": 2.0, "type": "allocation", "method": "global", "ratio": 0.8, "normalize": False, "prunable": 48,
              "pruned": 38, "step": 8, "phase": "admm",
              "layers": {"a": {"ratio": 0.8}, "b": {"ratio": 0.625}, "c": {"ratio": 0.9375}}})
    assert [target_cell(L) for L in rs.layers] == ["80.0%", "62.5%", "93.8%"]
    assert rs.log[-1][1:] == ("info", "per-layer ratios fixed (global): 38 of 48 prunable weights (79.17%)")
