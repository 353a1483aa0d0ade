"""``robprune export``'s model files: weights and masks in safetensors, a torch.export program that runs without
robprune, the model card, and ``--compact`` (a dense model without the pruned channels, same logits)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from robprune.engine import api
from robprune.engine.export import _program_bytes, compact_model, export_all, export_model, load_run_model
from robprune.engine.models import build_model, prunable_parameters
from robprune.engine.pruning import project
from tests.conftest import TINY, write_profile
from tests.test_cli import ENV, assert_one_line_error, robprune

SHORT = TINY.replace("epochs = 2", "epochs = 1").replace("epochs = 3", "epochs = 1")
FILTER = SHORT.replace('scheme = "irregular"', 'scheme = "filter"\nlinear_scheme = "filter"')
RESNET = (SHORT.replace('scheme = "irregular"', 'scheme = "filter"')
          .replace('arch = "lenet"\nwidth = 2', 'arch = "resnet18"\nwidth = 1')
          .replace('"conv1.weight" = 0.5', '"conv1.weight" = 0.0').replace("synthetic_train = 512", "synthetic_train = 128"))


def _parallel(*commands) -> list[subprocess.CompletedProcess]:
    """Run ``python -m robprune ARGS`` for each ARGS at the same time (the CPU has idle cores while one imports)."""
    procs = [subprocess.Popen([sys.executable, "-m", "robprune", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for args in commands]
    out = []
    for args, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished tiny runs: LeNet irregular, LeNet filter (linear layers too), ResNet-18 width 1 filter."""
    tmp = tmp_path_factory.mktemp("export")
    profiles = {"irregular": SHORT, "filter": FILTER, "resnet": RESNET}
    done = _parallel(*[("run", write_profile(tmp, text, f"{name}.toml"), "--run-dir", tmp / name, "-q")
                       for name, text in profiles.items()])
    for r in done:
        assert r.returncode == 0, r.stderr
    return {name: tmp / name for name in profiles}


@pytest.fixture(scope="module")
def exported(runs):
    """`robprune export` of the irregular run; `--compact` of both filter-pruned runs."""
    done = _parallel(("export", runs["irregular"]), ("export", runs["filter"], "--compact"),
                     ("export", runs["resnet"], "--compact"))
    for r in done:
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    return dict(zip(("irregular", "filter", "resnet"), done))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _test_x(rd: Path, n: int = 16) -> torch.Tensor:
    return api.load_test_set(rd)[0][:n].contiguous()


# ------------------------------------------------------------------------------------------------ model files

@pytest.mark.parametrize("which", ["irregular", "resnet"])
def test_weights_masks_and_card_match_the_run(runs, exported, which):
    rd = runs[which]
    printed = exported[which].stdout.splitlines()
    for f in ("model.safetensors", "masks.safetensors", "model.pt2", "model_card.json", "summary.json"):
        assert str(rd / f) in printed, (f, printed)
    summary = json.loads((rd / "summary.json").read_text())
    ref = torch.load(rd / "model.pt", weights_only=True)
    ck = torch.load(rd / "checkpoint.pt", weights_only=True)

    sd = load_file(rd / "model.safetensors")
    assert set(sd) == set(ref)  # buffers (BatchNorm statistics) included
    if which == "resnet":
        assert "bn1.running_var" in sd and "layer1.0.bn1.num_batches_tracked" in sd
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
    for L in summary["layers"]:
        w = sd[L["name"]]
        assert w.numel() == L["params"] and int((w == 0).sum()) == L["zeros"], L["name"]
        assert L["zeros"] > 0 or L["target"] == 0, L["name"]
    weights = [v for k, v in sd.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    assert sum(int(torch.count_nonzero(v)) for v in weights) == summary["sparsity"]["nonzero_params"]
    assert sum(v.numel() for v in weights) == summary["sparsity"]["total_params"]
    with safe_open(rd / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == summary["model"]["arch"] and meta["width"] == str(summary["model"]["width"])
    assert meta["normalization"] == "none, inputs are in [0, 1]" and json.loads(meta["input_shape"]) == [1, 1, 28, 28]

    masks = load_file(rd / "masks.safetensors")
    assert set(masks) == set(ck["masks"]) and masks
    for k, m in masks.items():
        assert m.dtype == torch.bool and torch.equal(m, ck["masks"][k].bool()), k
        assert bool((sd[k][~m] == 0).all())
        L = next(L for L in summary["layers"] if L["name"] == k)
        assert int((~m).sum()) <= L["zeros"]
    with safe_open(rd / "masks.safetensors", "pt") as f:
        assert f.metadata()["masks_source"] == "checkpoint"

    card = json.loads((rd / "model_card.json").read_text())
    assert card["pruning"]["sparsity"] == summary["sparsity"]
    assert card["pruning"]["layers"] == summary["layers"]
    assert card["pruning"]["masks_source"] == "checkpoint" and card["pruning"]["masked_nonzero_set_to_zero"] == 0
    f = summary["final"]
    assert card["evaluation"] == {"source": "final evaluation", "clean_acc": f["nat_acc"], "pgd_acc": f["adv_acc"],
                                  "n": f["n"], "attack": f["attack"]}
    assert card["evaluation"]["n"] == 128 and card["evaluation"]["attack"]["steps"] == 3
    assert card["threat_model"] == {"norm": "Linf", "eps": 0.1}
    assert card["input"]["range"] == [0, 1] and card["input"]["normalization"] == "none, inputs are in [0, 1]"
    assert card["input"]["shape"] == [1, 1, 28, 28] and card["input"]["batch"] == "dynamic"
    assert card["model"]["architecture"] == summary["model"]["arch"] and card["model"]["num_classes"] == 10
    assert card["autoattack"] is None
    for name, info in card["files"].items():
        assert info == {"sha256": _sha(rd / name), "bytes": (rd / name).stat().st_size}, name
    assert card["versions"]["torch"] == torch.__version__
    rb = card["robustbench"]
    assert rb["eps"] == "0.1" and rb["clean_acc"] == f"{100 * f['nat_acc']:.2f}"
    assert rb["reported"] == f"{100 * f['adv_acc']:.2f}" and rb["autoattack_acc"] is None
    assert rb["additional_data"] is False and rb["number_forward_passes"] == 1 and rb["venue"] is None
    apb = card["adversarial_pruning_benchmark"]
    assert apb["structure"] == ("weights" if which == "irregular" else "filters")
    assert apb["sparsity_rate"] == round(100 * summary["sparsity"]["prunable"], 2)


CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = sys.argv[1].split(chr(31))
    try:
        import robprune  # noqa: F401
        sys.exit("robprune is importable here")
    except ImportError:
        print("robprune-not-importable")
    import torch
    from safetensors.torch import load_file, save_file
    args = sys.argv[2:]
    for run, x_file, out_file in zip(args[0::3], args[1::3], args[2::3]):
        x = load_file(x_file)["x"]
        prog = torch.export.load(run + "/model.pt2").module()
        with torch.no_grad():
            out = {"program": prog(x), "program_one": prog(x[:1])}
            prog.load_state_dict(load_file(run + "/model.safetensors"))  # the weights file fits the program
            out["weights"] = prog(x)
        assert not [m for m in sys.modules if m.split(".")[0] == "robprune"]
        save_file({k: v.contiguous() for k, v in out.items()}, out_file)
        print("ok")
""")


def test_program_and_weights_reproduce_the_logits_without_robprune(runs, exported, tmp_path):
    """One isolated interpreter (-I -S: no site hooks, so not robprune's editable install either) loads each run's
    model.pt2 and model.safetensors with plain torch and safetensors."""
    import safetensors

    want, args = {}, []
    for which in ("irregular", "resnet"):  # LeNet; ResNet-18 with BatchNorm buffers
        rd = runs[which]
        x = _test_x(rd)
        save_file({"x": x}, tmp_path / f"x-{which}.safetensors")
        with torch.no_grad():
            want[which] = api.load_model(rd)(x)
        args += [str(rd), str(tmp_path / f"x-{which}.safetensors"), str(tmp_path / f"out-{which}.safetensors")]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    paths = list(dict.fromkeys(str(Path(m.__file__).resolve().parent.parent) for m in (torch, safetensors)))
    r = subprocess.run([sys.executable, "-I", "-S", str(script), chr(31).join(paths), *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert r.returncode == 0 and r.stdout.split() == ["robprune-not-importable", "ok", "ok"], (r.stdout, r.stderr[-3000:])
    for which, w in want.items():
        got = load_file(tmp_path / f"out-{which}.safetensors")
        for k in ("program", "weights"):
            assert got[k].shape == w.shape and torch.allclose(got[k], w, atol=1e-5), (which, k)
        assert torch.allclose(got["program_one"], w[:1], atol=1e-5)


# ------------------------------------------------------------------------------------------------ --compact

@pytest.mark.parametrize("which", ["filter", "resnet"])
def test_compact_is_smaller_with_the_same_logits(runs, exported, which):
    rd = runs[which]
    out = exported[which].stdout
    card = json.loads((rd / "model_card.json").read_text())
    c = card["compact"]
    p = c["parameters"]
    assert p["masked"] == card["model"]["parameters"] == sum(v.numel() for v in api.load_model(rd).parameters())
    assert 0 < p["compact"] < p["masked"]
    assert f"parameters {p['masked']} -> {p['compact']}" in out
    for masked, compact in (("model.safetensors", "model_compact.safetensors"), ("model.pt2", "model_compact.pt2")):
        assert (rd / compact).stat().st_size < (rd / masked).stat().st_size
        assert card["files"][compact]["sha256"] == _sha(rd / compact)
    assert c["channels_removed"] == sum(e["removed"] for e in c["layers"]) > 0
    assert c["check"]["allclose_float32"] and c["check"]["max_abs_diff_float64"] < 1e-5

    x = _test_x(rd, 32)
    with torch.no_grad():
        want = api.load_model(rd)(x)
        prog = torch.export.load(rd / "model_compact.pt2").module()
        assert torch.allclose(prog(x), want, atol=1e-5)
        sd = load_file(rd / "model_compact.safetensors")
        prog.load_state_dict(sd)
        assert torch.allclose(prog(x), want, atol=1e-5)
    n_params = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked")))
    assert n_params == p["compact"]
    by = {e["layer"]: e for e in c["layers"]}
    if which == "filter":
        assert sd["conv1.weight"].shape[0] == by["conv1"]["kept"] < 4
        assert sd["fc1.weight"].shape == (by["fc1"]["kept"], by["conv2"]["kept"] * 49)
        assert by["fc2"]["kept"] == 10 and "logits" in by["fc2"]["kept_because"]
        assert "conv1: 4 -> " in out
    else:
        assert sd["layer4.0.conv1.weight"].shape[0] == by["layer4.0.conv1"]["kept"] < 32
        assert sd["layer4.0.bn1.running_mean"].shape[0] == by["layer4.0.conv1"]["kept"]
        assert sd["layer4.0.conv2.weight"].shape[:2] == (32, by["layer4.0.conv1"]["kept"])
        e = by["layer4.0.conv2"]  # its zero filters are added to the shortcut's output: they stay
        assert e["kept"] == 32 and e["zero_filters_kept"] > 0 and "residual" in e["kept_because"]
        assert "residual connection" in out


def test_compact_refused_for_an_irregular_run(runs, exported):
    rd = runs["irregular"]
    before = (rd / "summary.json").stat().st_mtime_ns
    r = robprune("export", rd, "--compact")
    assert_one_line_error(r, str(rd), "cannot be compacted", "irregular", "scattered", "filter or column")
    assert not (rd / "model_compact.pt2").exists() and not (rd / "model_compact.safetensors").exists()
    assert (rd / "summary.json").stat().st_mtime_ns == before  # refused before anything was written
    from robprune.engine.errors import UserError
    from robprune.engine.export import run_compact_bench

    with pytest.raises(UserError, match="cannot be compacted"):  # bench --compact: the same check, the same line
        run_compact_bench(rd)


def test_bench_compact_prints_both_timings(runs, exported):
    r = robprune("bench", "--compact", runs["filter"], "--repeats", "3", "--warmup", "1", "--iters", "2",
                 "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["bench"] == "compact" and res["batch"] == 128 and res["repeats"] == 3
    assert len(res["masked_ms_per_batch_runs"]) == len(res["compact_ms_per_batch_runs"]) == 3
    assert res["masked_ms_per_batch"] > 0 and res["compact_ms_per_batch"] > 0
    assert res["speedup"] == pytest.approx(res["masked_ms_per_batch"] / res["compact_ms_per_batch"])
    assert res["parameters"]["compact"] < res["parameters"]["masked"]


# ------------------------------------------------------------------------------------------------ run states

def test_unfinished_run_exports_the_checkpoint_with_derived_masks(runs, exported, tmp_path):
    rd = tmp_path / "unfinished"
    shutil.copytree(runs["irregular"], rd)
    (rd / "model.pt").unlink()
    st = torch.load(rd / "checkpoint.pt", weights_only=True)
    st["masks"] = None  # as in the ADMM phase: no fixed masks yet
    torch.save(st, rd / "checkpoint.pt")
    paths, card = export_all(rd)
    assert rd / "model_card.json" in paths and json.loads((rd / "model_card.json").read_text()) == card
    assert card["pruning"]["masks_source"] == "derived" and card["model"]["weights_from"] == "checkpoint.pt"
    assert card["status"] == "in progress"
    sd, masks = load_file(rd / "model.safetensors"), load_file(rd / "masks.safetensors")
    assert set(masks) == {k for k, v in st["layers"].items() if v["target"] > 0}
    for k, m in masks.items():
        assert torch.equal(m, st["model"][k] != 0) and torch.equal(sd[k], st["model"][k])
    with safe_open(rd / "masks.safetensors", "pt") as f:
        assert f.metadata()["masks_source"].startswith("derived")


def test_card_reads_the_newest_autoattack_file(runs, exported, tmp_path):
    rd = tmp_path / "aa"
    shutil.copytree(runs["irregular"], rd)
    ev = rd / "eval"
    ev.mkdir()
    (ev / "autoattack-1.json").write_text(json.dumps({"clean_acc": 0.5, "robust_acc": 0.25, "eps": 0.1, "n": 100,
                                                      "version": "standard"}))
    # as `robprune eval --attack autoattack` writes it: eps, n and version in its "attack"
    (ev / "autoattack-2.json").write_text(json.dumps({"clean_acc": 0.5, "robust_acc": 0.2, "per_attack": {},
                                                      "attack": {"name": "autoattack", "version": "standard",
                                                                 "eps": 0.1, "n": 128}}))
    (ev / "autoattack-3.json").write_text("{not json")
    (ev / "autoattack-4.state.json").write_text(json.dumps({"clean_acc": 1.0}))  # a run's state file: not a result
    names = ("autoattack-1.json", "autoattack-2.json", "autoattack-3.json", "autoattack-4.state.json")
    for i, name in enumerate(names):
        os.utime(ev / name, (1_000_000 + i, 1_000_000 + i))
    _, card = export_model(rd)
    assert card["autoattack"] == {"clean_acc": 0.5, "robust_acc": 0.2, "eps": 0.1, "n": 128, "version": "standard",
                                  "file": "eval/autoattack-2.json"}
    assert card["robustbench"]["autoattack_acc"] == "20.00" and card["robustbench"]["clean_acc"] == "50.00"
    assert card["adversarial_pruning_benchmark"]["aa_robust_acc"] == 0.2
    assert any("autoattack-3.json" in n for n in card["notes"])
    assert json.loads((rd / "model_card.json").read_text()) == card


# ------------------------------------------------------------------------------------------------ every architecture

def _pruned(arch: str, width: int, scheme: str, ratio: float = 0.5, seed: int = 0) -> nn.Module:
    """A model with random BatchNorm statistics and biases (so zero filters are nonzero constants after ReLU) and
    every prunable layer but the logits projected onto ``scheme`` at ``ratio``."""
    torch.manual_seed(seed)
    m = build_model(arch, width, in_channels=3, image_size=32, depth=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2)
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0, 0.5)
        params = prunable_parameters(m)
        for name, p in list(params.items())[:-1]:
            p.copy_(project(p, scheme, ratio)[0])
    return m.eval()


@pytest.mark.parametrize("arch,width", [("lenet", 2), ("vgg16", 1), ("resnet18", 1), ("wrn", 1)])
def test_every_arch_exports_with_a_dynamic_batch_and_compacts_exactly(arch, width):
    """torch.export of each architecture, any batch size; the compact copy's logits equal the masked model's (its
    own torch.export is tested with the LeNet and ResNet-18 runs)."""
    m = _pruned(arch, width, "filter")
    shape = (1, 3, 32, 32)
    data, info = _program_bytes(m, shape)
    assert info["batch"] == "dynamic" and "note" not in info
    prog = torch.export.load(io.BytesIO(data)).module()
    cm, report = compact_model(m, None, shape)
    with torch.no_grad():
        for n in (1, 3):
            x = torch.rand(n, *shape[1:])
            want = m(x)
            assert torch.allclose(prog(x), want, atol=1e-5) and torch.allclose(cm(x), want, atol=1e-5)
    assert report["parameters"]["compact"] < report["parameters"]["masked"]
    assert report["parameters"]["masked"] == sum(p.numel() for p in m.parameters())
    assert report["parameters"]["compact"] == sum(p.numel() for p in cm.parameters())
    reasons = {k for e in report["layers"] for k, v in (e.get("removed_because") or {}).items() if v}
    assert reasons & {"folded", "merged"}  # nonzero constant channels met and handled exactly


def test_column_pruning_removes_entirely_zero_input_channels():
    m = _pruned("lenet", 2, "column", ratio=0.3)
    with torch.no_grad():
        m.conv1.weight[:, 0] = 0  # the image's first channel: unused, but the image stays what it is
        m.conv2.weight[:, 1] = 0  # input channel 1 of conv2: zero at every kernel position
        m.fc2.weight[:, :5] = 0  # five hidden units nobody reads
    cm, report = compact_model(m, {"conv1.weight": {"scheme": "column", "target": 0.3},
                                   "conv2.weight": {"scheme": "column", "target": 0.3}}, (1, 3, 32, 32))
    by = {e["layer"]: e for e in report["layers"]}
    assert by["conv1"]["removed_because"]["unused"] == 1 and cm.conv2.in_channels == m.conv2.in_channels - 1
    assert by["fc1"]["removed_because"]["unused"] >= 5 and cm.fc1.out_features <= m.fc1.out_features - 5
    assert any(n.startswith("conv1: column pruning: 1 of 3 input channels entirely zero") and "image" in n
               for n in report["notes"]), report["notes"]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(cm(x), m(x), atol=1e-5)


def test_load_run_model_names_a_non_run_directory(tmp_path):
    from robprune.engine.errors import UserError

    with pytest.raises(UserError, match="profile.toml"):
        load_run_model(tmp_path)
