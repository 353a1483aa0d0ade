"""A small Python API over a run directory, for users and for independent checking of our numbers.

    model = robprune.engine.api.load_model("runs/mnist_quick-...")   # eval mode, final weights
    x, y = robprune.engine.api.load_test_set("runs/mnist_quick-...") # x in [0, 1], shape (N, C, H, W)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import data as data_mod
from .config import Config, load_profile, profile_change
from .errors import UserError
from .models import build_model
from .rundir import RunDir, safe_torch_load


def load_config(run_dir: str | Path) -> Config:
    rd = RunDir(run_dir)
    if not rd.profile.is_file():
        raise UserError(f"{rd.profile}: missing; {rd.path} is not a robprune run directory")
    return load_profile(rd.profile)


def _spec(cfg: Config):
    return data_mod.dataset_spec(cfg.data.name)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", *, allow_checkpoint: bool = False) -> nn.Module:
    """The run's final model (``model.pt``) in eval mode. With ``allow_checkpoint``, an unfinished run's
    latest checkpoint weights are used when there is no model.pt yet."""
    rd = RunDir(run_dir)
    cfg = load_config(run_dir)
    spec = _spec(cfg)
    model = build_model(cfg.model.arch, cfg.model.width, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size, depth=cfg.model.depth, source=str(rd.profile))
    if rd.model.exists():
        sd = safe_torch_load(rd.model)
    elif allow_checkpoint and rd.checkpoint.exists():
        sd = safe_torch_load(rd.checkpoint)["model"]
    else:
        raise UserError(f"{rd.model}: missing; the run has not finished (resume it, or use its checkpoint)")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise _weights_do_not_fit(rd, cfg, exc) from None
    return model.to(device).eval()


def _weights_do_not_fit(rd: RunDir, cfg: Config, exc: RuntimeError) -> UserError:
    """Why a run's own weights do not fit the model its profile.toml describes: most often, an edit."""
    saved = ""
    if rd.checkpoint.is_file():
        try:
            saved = safe_torch_load(rd.checkpoint).get("profile") or ""
        except UserError:
            saved = ""
    change = profile_change(saved, rd.profile.read_text(encoding="utf-8")) if saved else None
    if change is not None:
        return UserError(f"{rd.profile}: changed after the run ({change}): its weights belong to the profile it ran "
                         "with; undo the edit")
    return UserError(f"{rd.model}: weights do not fit model {cfg.model.arch} (width {cfg.model.width}): "
                     f"{str(exc).splitlines()[0]}")


def load_test_set(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test set as float tensors in [0, 1] and int64 labels (the training set is not read)."""
    cfg = load_config(run_dir)
    ds = data_mod.load_dataset(cfg.data.name, cfg.data.root, False, "cpu", train_subset=cfg.data.train_subset,
                               synthetic_train=cfg.data.synthetic_train, synthetic_test=cfg.data.synthetic_test,
                               seed=cfg.run.seed, test_only=True)
    return data_mod.to_float(ds.test_x.to(device)), ds.test_y.to(device)
