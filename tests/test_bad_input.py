"""The bad-input corpus: every case runs the real command line (`python -m robprune ...`) and must exit with code
2, print exactly one non-empty line on stderr with no traceback, name the file and the key or what was wrong
and what was expected -- and lose nothing (no half-made run directory, a resumable one left as it was)."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from robprune.engine.events import StepMetrics
from robprune.engine.session import Session
from tests.conftest import TINY
from tests.runproc import ENV, ROOT, one_line_error, robprune

# ----------------------------------------------------------------------------------------------- profiles

def _one_value(table: str, key: str, value: str, expected: str, *more: str) -> tuple[str, list[str]]:
    """A profile setting ``key`` of ``[table]`` to ``value`` (TOML), and what the error line must say."""
    return f"[{table}]\n{key} = {value}\n", [f"p.toml: {table}.{key}: expected {expected}", *more]


BAD_PROFILES = {
    "toml-unclosed-table": ("[run\nseed = 1\n", ["p.toml:1:5: invalid TOML", "Expected ']'"]),
    "toml-missing-value": ("[run]\nseed = 1\nname = \n", ["p.toml:3:8: invalid TOML", "Invalid value"]),
    "unknown-key": _one_value("run", "sed", "1", "a known key of [run]", "did you mean 'seed'"),
    "unknown-table": ("[rnu]\nseed = 1\n", ["p.toml: rnu: expected a known table", "did you mean 'run'"]),
    "type-int": _one_value("run", "seed", "'x'", "an integer, found 'x'"),
    "type-bool": _one_value("run", "deterministic", "1", "a boolean, found 1"),
    "type-list": _one_value("phases.retrain", "milestones", "3", "a list of increasing integers >= 0, found 3"),
    "negative-eps": _one_value("attack.train", "eps", "-0.1", "a number >= 0", "found -0.1"),
    "eps-above-1": _one_value("attack.eval", "eps", "8", "a number <= 1", "found 8.0", "inputs are in [0, 1]"),
    "ratio-1": _one_value("prune", "ratio", "1.0", "a number in [0, 1), found 1.0"),
    "ratio-negative": _one_value("prune", "ratio", "-0.2", "a number in [0, 1), found -0.2"),
    "layer-ratio-1.5": ('[prune.layers]\n"fc1.weight" = 1.5\n',
                        ["p.toml: prune.layers.fc1.weight: expected a number in [0, 1), found 1.5"]),
    "negative-steps": _one_value("attack.train", "steps", "-5", "an integer in [1, 10000]", "found -5"),
    "negative-epochs": _one_value("phases.admm", "epochs", "-1", "an integer in [0, 100000]", "found -1"),
    "zero-batch-size": _one_value("data", "batch_size", "0", "an integer in [1, 65536]", "found 0"),
    "unknown-arch": _one_value("model", "arch", "'resnet50'", "one of 'lenet', 'vgg16'", "found 'resnet50'"),
    "unknown-dataset": _one_value("data", "name", "'imagenet'", "one of 'mnist-5k'", "found 'imagenet'"),
    "unknown-scheme": _one_value("prune", "scheme", "'block'", "one of 'irregular', 'filter', 'column'",
                                 "found 'block'"),
    "channels-last-crash": ("[model]\narch = 'resnet18'\nwidth = 1\n[run]\ndevice = 'cpu'\nchannels_last = true\n",
                            ["p.toml: run.channels_last: expected false for resnet18 width 1 on the CPU, found True",
                             "1x1 stride-2 conv layer2.0.shortcut.0"]),
    "unknown-optimizer": ("[phases.admm]\noptimizer = 'adamw'\n", ["p.toml: phases.admm.optimizer",
                                                                   "found 'adamw'", "did you mean 'adam'"]),
}


@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_bad_profile(tmp_path, case):
    text, parts = BAD_PROFILES[case]
    p = tmp_path / "p.toml"
    p.write_text(text)
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "r"), *parts)
    assert not (tmp_path / "r").exists()  # nothing half-made


BAD_OVERRIDES = {
    "unknown-key": ("run.sede=1", ["--set: run.sede: expected a known key", "did you mean 'run.seed'"]),
    "type": ("data.batch_size=abc", ["--set: data.batch_size: expected an integer, found 'abc'"]),
    "no-equals": ("noequals", ["--set: noequals: expected dotted.key=value"]),
    "glob-matches-nothing": ("prune.layers.conv9*=0.5",
                             ['--set: prune.layers."conv9*": expected a layer name or glob matching at least one '
                              "prunable layer"]),
    # numbers that used to pass validation and crash later: every numeric key has a stated range
    "seed-2^32": ("run.seed=4294967296", ["--set: run.seed: expected an integer in [0, 4294967295]"]),
    "threads-huge": ("run.threads=4294967296", ["--set: run.threads: expected an integer in [0, 1024]"]),
    "width-huge": ("model.width=100000", ["--set: model.width: expected an integer in [1, 1024], found 100000"]),
    "synthetic-1e12": ("data.synthetic_train=1000000000000", ["--set: data.synthetic_train: expected an integer in "
                                                              "[1, 100000000]"]),
    "rho-1e308": ("admm.rho=1e308", ["--set: admm.rho: expected a number in [1e-08, 1000000], found 1e+308"]),
    "rho-inf": ("admm.rho=inf", ["--set: admm.rho: expected a number in [1e-08, 1000000], found inf"]),
    "rho-nan": ("admm.rho=nan", ["--set: admm.rho: expected a number in [1e-08, 1000000], found nan"]),
    "lr-1e308": ("phases.pretrain.lr=1e308", ["--set: phases.pretrain.lr: expected a number in (0, 10]"]),
    "multiplier-huge": ("admm.rho_multiplier=1e9", ["--set: admm.rho_multiplier: expected a number in [1, 100]"]),
    "steps-huge": ("attack.eval.steps=10000000", ["--set: attack.eval.steps: expected an integer in [1, 10000]"]),
    "epochs-huge": ("phases.admm.epochs=99999999999", ["--set: phases.admm.epochs: expected an integer in "
                                                       "[0, 100000]"]),
    "batch-huge": ("data.batch_size=1000000000", ["--set: data.batch_size: expected an integer in [1, 65536]"]),
    "log-interval-huge": ("run.log_interval_s=1e9", ["--set: run.log_interval_s: expected a number in (0, 86400]"]),
    "weight-decay-huge": ("phases.retrain.weight_decay=5", ["--set: phases.retrain.weight_decay: expected a number "
                                                           "in [0, 1]"]),
    # sizes inside the ranges that cannot fit this machine: the estimate is in the message
    "model-too-big": ("model.width=1024", ["--set: model.width: expected a model that fits in",
                                           "parameters, about", "GiB for weights, gradients, optimizer and ADMM"]),
    "data-too-big": ("data.synthetic_train=100000000", ["--set: data.synthetic_train: expected a data set that "
                                                        "fits in half of", "100,000,128 examples, about"]),
    # strings: a run name is a name, not a path
    "name-absolute": ('run.name="/abs/path"', ["--set: run.name: expected a name of at most 100 printable",
                                               "not a path", "found '/abs/path'"]),
    "name-dotdot": ('run.name="../../x"', ["--set: run.name: expected a name", "found '../../x'"]),
    "name-dots": ('run.name=".."', ["--set: run.name: expected a name", "found '..'"]),
    "name-nul": ('run.name="a\\u0000b"', ["--set: run.name: expected a string without NUL bytes"]),
    "name-newline": ('run.name="a\\nb"', ["--set: run.name: expected a name of at most 100 printable"]),
    "name-long": ('run.name="' + "n" * 101 + '"', ["--set: run.name: expected a name of at most 100"]),
    "root-nul": ('data.root="/tmp/\\u0000x"', ["--set: data.root: expected a string without NUL bytes"]),
    "set-deep": ("run.name=" + "[" * 600 + "]" * 600, ["nested too deeply"]),
    # blame the right place: a whole-table override is --set's, a device is not "no such file"
    "layers-table-no-match": ('prune.layers={"nomatch*"=0.5}', ['--set: prune.layers."nomatch*": expected a layer '
                                                                "name or glob matching at least one"]),
    "init-dev-zero": ("run.init=/dev/zero", ["--set: run.init: /dev/zero: is a character device, expected a "
                                             "model.pt or checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_override(tmp_path, case):
    override, parts = BAD_OVERRIDES[case]
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "r", "--set", override), *parts)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- paths


def test_profile_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "p.toml"
    os.mkfifo(fifo)
    one_line_error(robprune("run", fifo, timeout=60), f"{fifo}: is a FIFO (named pipe), expected a regular TOML")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_profile_that_is_a_device_is_refused(device):
    one_line_error(robprune("run", device, timeout=60), f"{device}: is a character device, expected a regular")


def test_profile_over_a_megabyte_is_refused(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY + "#" * (1 << 20) + "\n")
    one_line_error(robprune("run", p), f"{p}: ", "bytes, expected a profile of at most 1,048,576 bytes")


@pytest.mark.parametrize("text", ["a = " + "[" * 500 + "]" * 500 + "\n", "[" + ".".join(["t"] * 1000) + "]\n"],
                         ids=["array-500-deep", "table-1000-deep"])
def test_deeply_nested_profile_is_one_line(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    one_line_error(robprune("run", p), f"{p}: nested too deeply")


@pytest.mark.parametrize("where", ["file", "under-file", "dev-null", "proc"])
def test_run_dir_that_cannot_be_one(tmp_path, where):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    (tmp_path / "afile").write_text("mine")
    rd, words = {"file": (tmp_path / "afile", "is not a directory"),
                 "under-file": (tmp_path / "afile" / "run", "cannot create the run directory: not a directory"),
                 "dev-null": (Path("/dev/null"), "is not a directory"),
                 "proc": (Path("/proc/robprune-run"), "cannot create the run directory")}[where]
    one_line_error(robprune("run", p, "--run-dir", rd), f"{rd}: {words}")
    assert (tmp_path / "afile").read_text() == "mine"


def test_run_dir_in_a_read_only_place(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "ro" / "r"), "cannot create the run directory")
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "ro"), "cannot write in the run directory")


@pytest.mark.parametrize("args, words", [
    (["--width", "100000"], "'--width': Input should be less than or equal to 1024"),
    (["--model", "resnet18", "--width", "1024"], "--width 1024, --batch 128: resnet18 has 45,702,189,066 parameters"),
    (["--batch", "0"], "'--batch': Input should be greater than or equal to 1"),
    (["--steps", "99999"], "'--steps': Input should be less than or equal to 10000"),
    (["--model", "wrn", "--depth", "0"], "'--depth': Input should be greater than or equal to 1"),
    (["--iters", "10000000"], "'--iters': Input should be less than or equal to 100000"),
], ids=["width-over-the-bound", "width-that-cannot-fit", "batch-0", "steps-huge", "depth-0", "iters-huge"])
def test_bench_settings_out_of_range_are_refused_before_anything_is_built(args, words):
    r = robprune("bench", *args, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert words in " ".join(r.stderr.split()), r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("command", ["experiment", "pipeline-bench"])
@pytest.mark.parametrize("where", ["file", "under-file", "dev-null", "dangling-link"])
def test_out_directory_that_cannot_be_one(tmp_path, command, where):
    """`--out` of robprune experiment and of robprune bench --pipeline: what stands in the way is one line naming
    the path, exit 2, before anything runs; nothing of the user's is touched."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out, words = {"file": (tmp_path / "afile", "is not a directory (a file or a device is there)"),
                  "under-file": (tmp_path / "afile" / "out", "cannot create the "),
                  "dev-null": (Path("/dev/null"), "is not a directory"),
                  "dangling-link": (tmp_path / "link", "is not a directory")}[where]
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    args = (["experiment", "weight-dist", p, "--preset", "tiny", "-q"] if command == "experiment"
            else ["bench", "--pipeline", p, p, "--repeats", "1"])
    line = one_line_error(robprune(*args, "--out", out, timeout=120), f"{out}: {words}", "choose another --out")
    assert "under-file" != where or "not a directory" in line
    assert (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "nowhere").exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["afile", "link", "p.toml"]


def test_setup_error_keeps_the_users_empty_run_dir(tmp_path):
    """A setup error removes only what this process made: the user's own (empty) --run-dir stays."""
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    (tmp_path / "mine").mkdir()
    r = robprune("run", p, "--run-dir", tmp_path / "mine", "--set", "data.name=mnist",
                 "--set", f"data.root={tmp_path / 'data'}")
    one_line_error(r, "MNIST not found")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
    r = robprune("run", p, "--run-dir", tmp_path / "new" / "deeper", "--set", "data.name=mnist",
                 "--set", f"data.root={tmp_path / 'data'}")
    one_line_error(r, "MNIST not found")
    assert not (tmp_path / "new").exists()  # directories it made are gone again


def test_missing_profile_file(tmp_path):
    one_line_error(robprune("run", tmp_path / "nope.toml"), f"{tmp_path / 'nope.toml'}: no such profile file")


def test_profile_is_a_directory(tmp_path):
    one_line_error(robprune("run", tmp_path), f"{tmp_path}: is a directory, expected a TOML profile file")


def test_missing_data_directory(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    r = robprune("run", p, "--run-dir", tmp_path / "r", "--set", "data.name=mnist",
                 "--set", f"data.root={tmp_path / 'data'}")
    one_line_error(r, str(tmp_path / "data"), "MNIST not found", "data.download=true")
    assert not (tmp_path / "r").exists()


def test_init_directory_without_weights(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    (tmp_path / "empty").mkdir()
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "r", "--set", f"run.init={tmp_path / 'empty'}"),
                   f"--set: run.init: {tmp_path / 'empty' / 'checkpoint.pt'}: no such file")
    assert not (tmp_path / "r").exists()


def test_missing_init_weights(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "r", "--set", f"run.init={tmp_path / 'w.pt'}"),
                   f"{tmp_path / 'w.pt'}: no such file")


def test_run_dir_not_empty(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    one_line_error(robprune("run", p, "--run-dir", tmp_path / "r"),
                   f"{tmp_path / 'r'}: run directory already exists and is not empty", "resume it")
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of the tiny profile stopped in its ADMM phase: a resumable run directory to damage in copies."""
    d = tmp_path_factory.mktemp("stopped")
    prof = d / "tiny.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.pretrain.epochs=1"], d / "run")
    s.prepare()
    s.subscribe(lambda e: s.stop() if isinstance(e, StepMetrics) and e.phase == "admm" and e.step >= 12 else None)
    s.run()
    assert s.state == "stopped"
    return d / "run"


@pytest.fixture
def run_dir(stopped_run, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(stopped_run, rd)
    return rd


def _snapshot(rd: Path) -> dict:
    return {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file() and p.name != ".lock"}


def resume_fails(rd: Path, *parts: str) -> str:
    before = _snapshot(rd)
    line = one_line_error(robprune("run", "--resume", rd), *parts)
    assert _snapshot(rd) == before  # nothing changed: the run can still be repaired and resumed
    return line


def test_resume_missing_directory(tmp_path):
    one_line_error(robprune("run", "--resume", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such run directory")


def test_resume_not_a_run_directory(tmp_path):
    one_line_error(robprune("run", "--resume", tmp_path),
                   f"{tmp_path / 'profile.toml'}: missing; {tmp_path} is not a robprune run directory")


def test_resume_with_a_profile_too(run_dir, tmp_path):
    one_line_error(robprune("run", tmp_path / "x.toml", "--resume", run_dir),
                   f"--resume {run_dir}: the profile comes from the run directory", "give no PROFILE or --set")


def test_resume_without_checkpoint(run_dir):
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "best.pt").unlink(missing_ok=True)
    resume_fails(run_dir, f"{run_dir / 'checkpoint.pt'}: no checkpoint to resume from")


def test_resume_truncated_checkpoint(run_dir):
    ck = run_dir / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    resume_fails(run_dir, f"{ck}: truncated ({len(data) // 2} bytes; the end of the archive is missing)",
                 "expected a complete file written by robprune", "best.pt holds an earlier state")


def test_resume_corrupt_checkpoint(run_dir):
    ck = run_dir / "checkpoint.pt"
    ck.write_bytes((bytes(range(7, 256)) * 17)[:4096])  # not a zip, not a pickle
    resume_fails(run_dir, f"{ck}: corrupt (4096 bytes; not a torch.save archive)",
                 "expected a complete file written by robprune")


def test_resume_empty_checkpoint(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(b"")
    resume_fails(run_dir, f"{run_dir / 'checkpoint.pt'}: empty (0 bytes)")


class _Evil:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_would_run_code(run_dir, tmp_path):
    marker = tmp_path / "PWNED"
    ck = run_dir / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["last_eval"] = _Evil(marker)
    torch.save(state, ck)
    line = resume_fails(run_dir, f"{ck}: refused to load: it holds a Python object", "system", "could run code",
                        "expected tensors and plain containers only")
    assert "weights_only" not in line  # no advice to turn the protection off
    assert not marker.exists()  # and the code did not run


def test_resume_refuses_a_checkpoint_with_a_class_instance(run_dir):
    ck = run_dir / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["extra"] = Path("/etc/passwd")  # any class instance
    torch.save(state, ck)
    resume_fails(run_dir, f"{ck}: refused to load: it holds a Python object (pathlib", "could run code")


def test_resume_profile_edited_after_the_checkpoint(run_dir):
    prof = run_dir / "profile.toml"
    prof.write_text(prof.read_text().replace("[phases.admm]\nepochs = 3", "[phases.admm]\nepochs = 5"))
    resume_fails(run_dir, f"{prof}: changed after the checkpoint was written (phases.admm.epochs: 3 -> 5)",
                 "a run resumes with the profile it started with", "undo the edit")


def test_resume_profile_edited_into_bad_input(run_dir):
    prof = run_dir / "profile.toml"
    prof.write_text(prof.read_text().replace("[phases.admm]\nepochs = 3", "[phases.admm]\nepochs = -3"))
    resume_fails(run_dir, f"{prof}: phases.admm.epochs: expected an integer in [0, 100000], found -3")


def test_resume_run_directory_of_another_format_version(run_dir):
    meta = run_dir / "meta.json"
    meta.write_text('{"format": 99, "robprune": "9.0.0"}\n')
    resume_fails(run_dir, f"{meta}: run directory format 99 (written by robprune 9.0.0), expected format 1",
                 "use the robprune version that wrote it")


def test_resume_checkpoint_of_another_format_version(run_dir):
    ck = run_dir / "checkpoint.pt"
    state = torch.load(ck, weights_only=True)
    state["format"] = 2
    torch.save(state, ck)
    resume_fails(run_dir, f"{ck}: checkpoint format 2, expected 1", "written by another version of robprune")


def test_resume_a_model_file_in_place_of_the_checkpoint(run_dir):
    ck = run_dir / "checkpoint.pt"
    torch.save(torch.load(ck, weights_only=True)["model"], ck)
    resume_fails(run_dir, f"{ck}: not a robprune checkpoint (no format field)")


def test_resume_run_directory_in_use(run_dir):
    """Another process holds the run directory's lock (here: this test process)."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        resume_fails(run_dir, f"{run_dir}: in use by another robprune process (pid {os.getpid()})",
                     "wait for it to finish")
    finally:
        os.close(fd)


def test_full_disk_while_writing_a_checkpoint(tmp_path):
    """The real command line, with os.write failing (ENOSPC) from the second checkpoint's temp file on: the
    failure is injected by this test's launcher, not by anything in robprune."""
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    rd = tmp_path / "r"
    launcher = textwrap.dedent(f"""
        import errno, os, sys
        real_write, temps = os.write, []
        def write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{{fd}}")
            except OSError:
                target = ""
            if ".checkpoint.pt." in os.path.basename(target):
                if target not in temps:
                    temps.append(target)
                if len(temps) > 1:  # the first checkpoint fits, the disk is full for the second
                    real_write(fd, bytes(data[: len(data) // 2]))
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)
        os.write = write
        sys.argv = ["robprune", "run", {str(p)!r}, "--run-dir", {str(rd)!r}, "-q", "--set", "phases.pretrain.epochs=3"]
        from robprune.tui.cli import main
        main()
    """)
    r = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=300)
    ck = rd / "checkpoint.pt"
    one_line_error(r, f"{ck}: cannot write: no space left on device; the previous checkpoint.pt is intact",
                   f"free some space, then resume the run (robprune run --resume {rd})")
    state = torch.load(ck, weights_only=True)  # the first checkpoint, whole
    assert state["phase"] == "pretrain" and state["epoch"] == 1
    assert not list(rd.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------- damaged records


@pytest.mark.parametrize("damage,why", [(b"this is not json", "not valid JSON"),
                                        (b"\xff\xfe binary \x00 bytes", "binary bytes, not UTF-8 text"),
                                        (b"[1, 2, 3]", "a JSON list, not an object")],
                         ids=["not-json", "binary", "not-an-object"])
def test_export_skips_a_damaged_line_and_keeps_every_other_record(run_dir, damage, why):
    """One damaged line in the middle of metrics.jsonl: export warns with the file and line, says how many it
    skipped, and writes every other step and evaluation record (it used to stop reading there, silently)."""
    lines = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")
    wanted = sum(1 for ln in lines if ln.strip() and json.loads(ln)["type"] in ("step", "eval"))
    lines.insert(4, damage)
    (run_dir / "metrics.jsonl").write_bytes(b"\n".join(lines))
    r = robprune("export", run_dir)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert warns == [f"robprune: warning: {run_dir / 'metrics.jsonl'} line 5: {why}; skipped",
                     "robprune: warning: 1 damaged line skipped; every other record is in the export"], warns
    with open(run_dir / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == wanted
    assert json.loads((run_dir / "summary.json").read_text())["final"]["nat_acc"] is not None


def test_eval_of_a_run_whose_profile_was_edited_names_the_changed_key(run_dir):
    """robprune eval on a run whose profile.toml now says another width: one line naming the key, not a
    state_dict traceback (the stopped run has no model.pt, so its checkpoint's weights are used for the check)."""
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save(ck["model"], run_dir / "model.pt")
    prof = run_dir / "profile.toml"
    prof.write_text(prof.read_text().replace("width = 2", "width = 3"))
    one_line_error(robprune("eval", run_dir), f"{prof}: changed after the run (model.width: 2 -> 3)", "undo the edit")


def test_full_disk_while_appending_a_record(tmp_path):
    """os.write to metrics.jsonl fails (ENOSPC, after writing part of the line) once the file holds 6 KB: one
    line naming the file, exit 2; no torn line is left; events.jsonl says why; the run resumes to the end."""
    p = tmp_path / "p.toml"
    p.write_text(TINY)
    rd = tmp_path / "r"
    launcher = textwrap.dedent(f"""
        import errno, os, sys
        real_write = os.write
        def write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{{fd}}")
            except OSError:
                target = ""
            if target.endswith("metrics.jsonl") and os.fstat(fd).st_size + len(data) > 6000:
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)
        os.write = write
        sys.argv = ["robprune", "run", {str(p)!r}, "--run-dir", {str(rd)!r}, "-q"]
        from robprune.tui.cli import main
        main()
    """)
    r = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=300)
    one_line_error(r, f"{rd / 'metrics.jsonl'}: cannot write: no space left on device",
                   f"free some space, then resume the run (robprune run --resume {rd})")
    data = (rd / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n") and all(json.loads(ln) for ln in data.splitlines())
    errors = [json.loads(ln) for ln in (rd / "events.jsonl").read_bytes().splitlines()
              if json.loads(ln)["type"] == "error"]
    assert errors and "metrics.jsonl: cannot write: no space left on device" in errors[0]["message"]
    r = robprune("run", "--resume", rd, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((rd / "summary.json").read_text())["status"] == "completed"
    steps = [json.loads(ln)["step"] for ln in (rd / "metrics.jsonl").read_bytes().splitlines()
             if json.loads(ln)["type"] == "step"]
    assert steps == sorted(set(steps))


def test_advice_after_a_run_killed_before_its_first_checkpoint_works(run_dir, tmp_path):
    """What the refusal says to do is what works: a new --run-dir starts the run; with best.pt present, copying it
    over checkpoint.pt resumes."""
    (run_dir / "checkpoint.pt").unlink()
    best = run_dir / "best.pt"
    kept = best.read_bytes() if best.exists() else None
    if kept is not None:
        resume_fails(run_dir, f"{run_dir / 'checkpoint.pt'}: missing, but best.pt holds a checkpoint",
                     "copy it to checkpoint.pt and resume again")
        shutil.copy(best, run_dir / "checkpoint.pt")
        r = robprune("run", "--resume", run_dir, "-q")
        assert r.returncode == 0, r.stderr
        (run_dir / "checkpoint.pt").unlink()
        best.unlink()
    line = resume_fails(run_dir, "no checkpoint to resume from", "start it again with another --run-dir")
    assert "--run-dir" in line
    p = tmp_path / "p.toml"
    p.write_text((run_dir / "profile.toml").read_text())
    r = robprune("run", p, "--run-dir", tmp_path / "another", "-q", "--set", "phases.admm.epochs=1",
                 "--set", "phases.retrain.epochs=0")
    assert r.returncode == 0, r.stderr


def test_resume_removes_only_its_own_temp_files(run_dir):
    ours = run_dir / ".checkpoint.pt.a1b2c3d4.tmp"
    ours.write_bytes(b"half a checkpoint")
    theirs = [run_dir / ".notes.tmp", run_dir / ".checkpoint.pt.tmp", run_dir / ".mine.pt.abcdefgh.tmp"]
    for f in theirs:
        f.write_text("a user's file")
    r = robprune("run", "--resume", run_dir, "-q")
    assert r.returncode == 0, r.stderr
    assert not ours.exists()
    assert all(f.read_text() == "a user's file" for f in theirs)


@pytest.mark.parametrize("name", ["events.jsonl", "metrics.jsonl", ".lock", "checkpoint.pt"])
def test_a_symlink_where_the_engine_writes_is_refused(run_dir, tmp_path, name):
    """Never write through a link: a run directory with one where the engine writes or locks is refused with one
    line, and the file the link points to is untouched."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"someone else's file")
    f = run_dir / name
    if name == "checkpoint.pt":
        target.write_bytes(f.read_bytes())
    f.unlink(missing_ok=True)
    f.symlink_to(target)
    before = target.read_bytes()
    one_line_error(robprune("run", "--resume", run_dir), f"{f}: is a symlink; robprune never writes through one")
    assert target.read_bytes() == before


@pytest.mark.parametrize("name", ["meta.json", "metrics.jsonl", "events.jsonl"])
def test_a_fifo_in_the_run_directory_is_refused_not_waited_on(run_dir, name):
    """A FIFO where robprune keeps a file would hold an open or a read until someone opened its other end: resume
    and export refuse it at once, in one line naming it, and leave the run as it was."""
    f = run_dir / name
    f.unlink()
    os.mkfifo(f)
    resume_fails(run_dir, f"{f}: is a FIFO (named pipe), expected a file robprune writes: remove it")
    if name != "meta.json":  # export does not read meta.json
        one_line_error(robprune("export", run_dir, timeout=120), f"{f}: is a FIFO (named pipe)")
    assert stat.S_ISFIFO(os.lstat(f).st_mode)


def test_a_fifo_in_place_of_summary_json_is_replaced_by_the_export(run_dir):
    """summary.json is only read back for the device the run recorded: a FIFO there is not read (it would block)
    but replaced, atomically, by the new summary."""
    f = run_dir / "summary.json"
    f.unlink(missing_ok=True)
    os.mkfifo(f)
    r = robprune("export", run_dir, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert stat.S_ISREG(os.lstat(f).st_mode)
    assert json.loads(f.read_text())["run_dir"] == str(run_dir)
