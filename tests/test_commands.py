"""The command vocabulary: every way in (dialog, Session, commands.jsonl) is checked in one place; a bad command
is refused with a reason, never fatal; only the run's user may steer it through its command file."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from robprune.engine.control import (FACTOR_RANGE, MAX_LINE_BYTES, RHO_RANGE, CommandError, CommandFile, Pause,
                                     Refused, SetRho, Stop, make_command, parse_command_line, send_to_run_dir,
                                     steering_problem)
from robprune.engine.rundir import read_jsonl
from robprune.engine.session import Session
from tests.conftest import TINY
from tests.runproc import wait_for

LAYERS = {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}

# (line as bytes, words the refusal must contain)
HOSTILE: list[tuple[bytes, str]] = [
    (b'{"command": "set_rho", "args": {"value": 1e308}}', "expected a number from 1e-08 to 1e+06"),
    (b'{"command": "set_rho", "args": {"value": 1e39}}', "found 1e+39"),
    (b'{"command": "set_rho", "args": {"value": Infinity}}', "Infinity is not a number"),
    (b'{"command": "set_rho", "args": {"value": NaN}}', "NaN is not a number"),
    (b'{"command": "set_rho", "args": {"value": -Infinity}}', "-Infinity is not a number"),
    (b'{"command": "set_rho", "args": {"value": 1e400}}', "found inf"),
    (b'{"command": "set_rho", "args": {"value": 1' + b"0" * 400 + b'}}', "integer too large for a float"),
    (b'{"command": "set_rho", "args": {"value": 1' + b"0" * 5000 + b'}}', "bytes; expected at most"),
    (b'{"command": "set_rho", "args": {"value": 0}}', "found 0"),
    (b'{"command": "set_rho", "args": {"value": -0.5}}', "found -0.5"),
    (b'{"command": "set_rho", "args": {"value": "0.1"}}', "found str"),
    (b'{"command": "set_rho", "args": {"value": true}}', "found bool"),
    (b'{"command": "set_rho", "args": {"value": [0.1]}}', "found list"),
    (b'{"command": "set_rho", "args": {"value": 1e4, "multiply": true}}', "factor: expected a number from 0.001"),
    (b'{"command": "set_rho", "args": {"value": 2, "multiply": "yes"}}', "multiply: expected true or false"),
    (b'{"command": "set_rho", "args": {"value": 0.1, "layer": ["fc1.weight"]}}', "layer: expected a layer name"),
    (b'{"command": "set_rho", "args": {"value": 0.1, "layer": {"a": 1}}}', "layer: expected a layer name"),
    (b'{"command": "set_rho", "args": {"value": 0.1, "layer": "nope"}}', "no ADMM layer named 'nope'"),
    (b'{"command": "set_rho", "args": {"value": 0.1, "layer": "' + b"a" * 300 + b'"}}', "1 to 256 printable"),
    (b'{"command": "set_rho", "args": {"value": 0.1, "lr": 5}}', "unknown argument 'lr'"),
    (b'{"command": "set_rho"}', "expected the arguments value"),
    (b'{"command": "set_rho", "args": [1, 2]}', "args: expected an object"),
    (b'{"command": "rm -rf /"}', "command: expected one of pause"),
    (b'{"command": 42}', "found a JSON int"),
    (b'{"command": "pause", "args": {"now": true}}', "unknown argument 'now'; expected none"),
    (b'{"command": "pause", "sudo": true}', "unknown key 'sudo'"),
    (b'[1, 2, 3]', "expected a JSON object, found a JSON list"),
    (b'"stop"', "expected a JSON object, found a JSON str"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary\x80", "binary bytes"),
    (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    (b'{"command": "stop", "args": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1501, "bytes; expected at most"),
    (b'{"command": "set_rho", "args": {"value": 0.1}}' + b" " * MAX_LINE_BYTES, "bytes; expected at most"),
]


@pytest.mark.parametrize("line,words", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_lines_are_refused_with_a_reason(line, words):
    with pytest.raises(CommandError) as info:
        parse_command_line(line, layers=LAYERS)
    msg = str(info.value)
    assert words in msg, msg
    assert "\n" not in msg and len(msg) < 300


def test_valid_lines_make_typed_commands():
    assert parse_command_line(b'{"t": 1, "command": "pause"}') == Pause()
    cmd = parse_command_line(b'{"command": "set_rho", "args": {"value": 2, "layer": "fc1.weight", "multiply": true}}',
                             layers=LAYERS)
    assert cmd == SetRho(2.0, "fc1.weight", True) and isinstance(cmd.value, float)
    assert make_command("set_rho", {"value": RHO_RANGE[1]}) == SetRho(RHO_RANGE[1])
    assert make_command("set_rho", {"value": FACTOR_RANGE[0], "multiply": True}).value == FACTOR_RANGE[0]
    assert json.loads(SetRho(0.5, None).to_json())["args"] == {"value": 0.5, "layer": None, "multiply": False}


def test_session_refuses_what_the_file_refuses(tmp_path):
    prof = tmp_path / "t.toml"
    prof.write_text(TINY)
    s = Session.new(prof, [], tmp_path / "run")
    s.prepare()
    with pytest.raises(CommandError, match="expected a number"):
        s.send(SetRho(math.inf))
    with pytest.raises(CommandError, match="no ADMM layer named 'fc9.weight'"):
        s.send(SetRho(0.5, "fc9.weight"))
    with pytest.raises(CommandError, match="expected a command"):
        s.send("stop")  # type: ignore[arg-type]


def test_a_running_engine_refuses_each_hostile_line_and_finishes_with_finite_weights(tmp_path):
    """Every hostile line appended to the command file of a running engine: one warning each, with the reason,
    in events.jsonl; the run completes; every weight is finite; the valid lines among them still apply."""
    prof = tmp_path / "t.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.admm.epochs=6"], tmp_path / "run")
    s.prepare()
    rd = s.rundir.path
    s.start()
    wait_for(lambda: s.engine.admm is not None and s.engine.step > 20)
    path = rd / "commands.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for line, _ in HOSTILE:
        os.write(fd, line + b"\n")
    os.write(fd, b'{"command": "set_rho", "args": {"value": 1.5, "layer": "fc1.weight", "multiply": true}}\n')
    os.close(fd)
    assert s.join(300) and s.error is None
    assert s.state == "finished"
    ev = read_jsonl(rd / "events.jsonl")
    refused = [e["message"] for e in ev if e["type"] == "log" and e["level"] == "warning"
               and "commands.jsonl: line refused" in e["message"]]
    assert len(refused) == len(HOSTILE), refused
    for (_, words), msg in zip(HOSTILE, refused):
        assert words in msg, (words, msg)
    applied = [e for e in ev if e["type"] == "set_rho"]
    assert len(applied) == 1 and applied[0]["layer"] == "fc1.weight" and applied[0]["multiply"]
    for k, v in s.engine.model.state_dict().items():
        assert torch.isfinite(v.float()).all(), k


def test_a_multiply_that_would_leave_the_range_changes_nothing(tmp_path):
    prof = tmp_path / "t.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.admm.epochs=40"], tmp_path / "run")
    s.prepare()
    s.start()
    wait_for(lambda: s.engine.admm is not None and s.engine.step > 20)
    s.send(Pause())  # commands apply while paused, and no Z/U update moves rho in between
    wait_for(lambda: s.state == "paused")
    s.send(SetRho(0.5))
    for _ in range(3):  # 0.5 * 1000^3 > 1e6: the third is refused, and rho stays as it was after the second
        s.send(SetRho(1000.0, multiply=True))
    s.send(Stop())
    assert s.join(120) and s.error is None
    assert all(v == pytest.approx(5e5) for v in s.engine.admm.rho.values())
    msgs = [e["message"] for e in read_jsonl(s.rundir.events) if e["type"] == "log" and e["level"] == "warning"]
    assert any("set_rho refused: rho of" in m and "expected 1e-08 to 1e+06" in m for m in msgs), msgs


# ------------------------------------------------------------------------------------------ who may steer


def test_only_the_runs_user_may_steer_through_the_command_file(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir(mode=0o755)
    os.chmod(rd, 0o755)
    path = rd / "commands.jsonl"
    f = CommandFile(path, poll_interval_s=0)
    send_to_run_dir(rd, Pause())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f.poll() == [Pause()]
    os.chmod(path, 0o622)  # group- and world-writable: anyone could append
    send_to_run_dir(rd, Stop())
    got = f.poll()
    assert len(got) == 1 and isinstance(got[0], Refused) and "writable by group or others" in got[0].reason
    assert f.poll() == []  # one warning, then ignored
    os.chmod(path, 0o600)
    assert f.poll() == [Stop()]  # fixed: read again, from where it was
    os.chmod(rd, 0o777)
    got = f.poll()
    assert len(got) == 1 and "writable by others" in got[0].reason
    os.chmod(rd, 0o755)
    path.unlink()
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")
    path.symlink_to(target)
    assert "is a symlink" in steering_problem(rd, path)
    with pytest.raises(CommandError.__mro__[1], match="is a symlink"):  # UserError
        send_to_run_dir(rd, Stop())
    assert target.read_text() == ""


def test_command_file_of_another_user_is_ignored(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    os.chmod(rd, 0o755)
    path = rd / "commands.jsonl"
    path.write_text("")
    os.chmod(path, 0o600)
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(path, 12345, 12345)
    assert "belongs to uid 12345" in steering_problem(rd, path)


def test_an_over_long_line_is_refused_once_and_the_next_line_still_counts(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    os.chmod(rd, 0o755)
    path = rd / "commands.jsonl"
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    f = CommandFile(path, poll_interval_s=0)
    with open(path, "ab") as g:
        g.write(b"x" * (3 * MAX_LINE_BYTES))  # no newline yet: a writer that never ends its line
    got = f.poll()
    assert len(got) == 1 and isinstance(got[0], Refused) and "expected at most" in got[0].reason
    with open(path, "ab") as g:
        g.write(b"y" * MAX_LINE_BYTES + b'\n{"command": "pause"}\n')
    assert f.poll() == [Pause()]


def test_a_rho_set_before_admm_is_the_one_the_admm_start_line_logs(tmp_path):
    prof = tmp_path / "t.toml"
    prof.write_text(TINY)
    s = Session.new(prof, ["phases.admm.epochs=1", "phases.retrain.epochs=0"], tmp_path / "run")
    s.prepare()
    s.send(SetRho(0.05))  # before the run starts: stored, applied when ADMM begins
    s.send(SetRho(2.0, layer="fc1.weight", multiply=True))  # stored too: both apply, in order
    s.run()
    msgs = [e["message"] for e in read_jsonl(s.rundir.events) if e["type"] == "log"]
    start = [m for m in msgs if m.startswith("ADMM: Z = Proj(W)")]
    assert start == ["ADMM: Z = Proj(W), U = 0 for 4 layers, rho 0.05 to 0.1 (per layer)"], start
