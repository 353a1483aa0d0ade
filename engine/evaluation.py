"""Evaluations of a finished model, as ``robprune eval`` and the end of a run make them: PGD, or AutoAttack with
a resumable state, in float32 (TF32 off) on the device asked for.

Results of ``robprune eval --attack autoattack`` are written to ``eval/autoattack-<eps>-n<N>.json`` (``rand``
version: ``autoattack-rand-...``) in the run directory, with their state file next to them while they run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .attacks import evaluate
from .attacks.autoattack import AutoAttack, describe
from .config import FINAL_ATTACKS as ATTACKS
from .errors import UserError
from .rundir import DIR_MODE, RunDir, atomic_write_text

DEVICES = ("auto", "cpu", "cuda")


def pick_device(want: str, *, where: str = "--device") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or CUDA on a machine
    without it, is one line naming ``where``."""
    base, _, index = str(want).partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise UserError(f"{where}: {want!r} is not a device: expected auto, cpu, cuda or cuda:N")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{where}: {want!r} asked for, but no CUDA device is available here: use cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"{where}: {want!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(want)


@contextlib.contextmanager
def float32():
    """Reported accuracies are float32 ones: TF32 (cuDNN's and cuBLAS's default on Ampere and newer) is off
    while an evaluation runs, and put back after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state (names, shapes, dtypes and bytes), whatever file or device it came from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def autoattack_name(version: str, eps: float, n: int) -> str:
    return f"autoattack-{'' if version == 'standard' else version + '-'}{eps:g}-n{n}"


def _eval_dir(rd: RunDir) -> Path:
    d = rd.eval_dir
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise UserError(f"{d}: is not a directory robprune made (a symlink or a file is there): remove it")
    d.mkdir(mode=DIR_MODE, exist_ok=True)
    return d


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rd: RunDir, *, eps: float, version: str,
               batch_size: int, seed: int, num_classes: int,
               progress: Callable[[str, int, int], None] | None = None, fresh: bool = False, dist=None) -> dict:
    """AutoAttack ``model`` on ``(x, y)`` with its state in the run directory's ``eval/``; write the result
    there as JSON (state file removed) and return it. ``fresh`` ignores a saved state. ``dist``: a data-parallel
    run's context; the ranks share the batches, and rank 0 alone writes (see :class:`AutoAttack`)."""
    writer = dist is None or dist.writer
    name = autoattack_name(version, eps, len(y))
    d = _eval_dir(rd) if writer else rd.eval_dir
    state = d / f"{name}.state.json"
    if fresh and writer and state.is_file():
        state.unlink()
    aa = AutoAttack(model, eps=eps, version=version, batch_size=batch_size, seed=seed,
                    state_path=state if writer else None, fingerprint=weights_fingerprint(model),
                    progress=progress, num_classes=num_classes, dist=dist)
    with float32():
        res = aa.run(x, y)
    robust = res.pop("robust")
    dev = next(model.parameters()).device
    res.update({"device": str(dev), "precision": "float32 (TF32 off)", "resumed": aa.resumed,
                "weights_sha256": aa.fingerprint, "robust_examples": int(robust.sum()),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
    out = d / f"{name}.json"
    if writer:
        atomic_write_text(out, json.dumps(res, indent=2) + "\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state)
    res["path"] = str(out)
    return res


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        restarts: int, loss: str, batch_size: int, seed: int) -> dict:
    """Natural and PGD accuracy (float32, TF32 off), with the attack named exactly."""
    with float32():
        nat, adv = evaluate(model, x, y, kind="pgd", eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                            batch_size=batch_size, loss=loss, seed=seed)
    return {"nat_acc": nat, "adv_acc": adv, "n": len(y),
            "attack": {"kind": "pgd", "loss": loss, "eps": eps, "step_size": step_size, "steps": steps,
                       "restarts": restarts}}


__all__ = ["ATTACKS", "DEVICES", "autoattack", "autoattack_name", "describe", "float32", "pgd", "pick_device",
           "weights_fingerprint"]
