"""The run's model in files that load without robprune, and a physically smaller copy of a structurally pruned one.

``robprune export RUN_DIR`` writes, beside the summary files (:mod:`robprune.engine.summary`):

    model.safetensors   the final weights (pruned entries exactly zero) with the BatchNorm buffers: a state_dict
    masks.safetensors   the pruning masks, bool (True = kept), one per pruned layer
    model.pt2           a ``torch.export`` program: the same logits with plain torch (``torch.export.load``)
    model_card.json     what the model is, what it takes, how sparse it is, how it was evaluated, the files' sha256

and with ``--compact`` (filter or column pruning only) ``model_compact.safetensors`` and ``model_compact.pt2``: a
dense model without the channels pruning made useless, whose logits equal the masked model's. See
:func:`compact_model` for which channels go and why others stay.

With ``--semi-structured`` (a run whose linear layers were pruned 2:4, on a CUDA GPU of compute capability 8.0 or
newer) the 2:4 linear weights are converted with ``torch.sparse.to_sparse_semi_structured`` and the converted model's
logits checked against the dense masked model's; the model card's ``semi_structured`` says which layers converted
(and why others did not). No file holds the converted tensors (they are a GPU-only tensor subclass):
:func:`to_semi_structured` converts a loaded model the same way. Elsewhere the option is refused in one line.

Every file is written atomically (temp file in the run directory, fsync, rename).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import UserError
from .rundir import RunDir, atomic_write_bytes, atomic_write_text, read_json_state

CARD_FORMAT = 1
MODEL_FILE, MASKS_FILE, PROGRAM_FILE, CARD_FILE = "model.safetensors", "masks.safetensors", "model.pt2", "model_card.json"
COMPACT_MODEL_FILE, COMPACT_PROGRAM_FILE = "model_compact.safetensors", "model_compact.pt2"
NORMALIZATION = "none, inputs are in [0, 1]"
# the compact model's outputs must equal the masked one's to this (float64, so that only the algebra and the float32
# rounding of the folded weights count, not the order of summation)
CHECK_ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ the run's model

@dataclass
class RunModel:
    """A run's final model (model.pt, or the checkpoint's weights while the run is unfinished), on the CPU in eval
    mode, with the masks applied, and what was read to make it."""

    rd: RunDir
    cfg: object
    spec: object
    model: nn.Module
    state: dict[str, Tensor]
    masks: dict[str, Tensor]
    masks_source: str  # "checkpoint" or "derived"
    layers: dict[str, dict]
    weights_file: str
    masked_nonzero: int = 0  # entries a mask removes that were not zero (set to zero here); 0 is the rule


def load_run_model(run_dir: str | Path) -> RunModel:
    from . import data as data_mod
    from .api import _weights_do_not_fit
    from .models import build_model
    from .summary import read_run

    rd, cfg, st, state, src = read_run(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    spec = data_mod.dataset_spec(cfg.data.name)
    model = build_model(cfg.model.arch, cfg.model.width, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size, depth=cfg.model.depth, source=str(rd.profile))
    layers = st["layers"]
    raw = st.get("masks")
    if raw:
        masks, source = {}, "checkpoint"
        for name, m in raw.items():
            w = state.get(name)
            if w is None or not isinstance(m, Tensor) or tuple(m.shape) != tuple(w.shape):
                raise UserError(f"{rd.checkpoint}: masks: {name!r}: expected a mask shaped like that weight "
                                f"{tuple(w.shape) if w is not None else '(no such weight)'}")
            masks[name] = m.detach().cpu().to(torch.bool).contiguous()
    else:
        source = "derived"
        masks = {name: (state[name] != 0).contiguous() for name, info in layers.items()
                 if name in state and float(info.get("target", 0)) > 0}
    fixed = 0
    for name, m in masks.items():
        w = state[name]
        fixed += int((w[~m] != 0).sum())
        w.masked_fill_(~m, 0)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise _weights_do_not_fit(rd, cfg, exc) from None
    return RunModel(rd=rd, cfg=cfg, spec=spec, model=model.eval(), state=state, masks=masks, masks_source=source,
                    layers=layers, weights_file=src.name, masked_nonzero=fixed)


# ------------------------------------------------------------------------------------------------ file helpers

def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def _program_bytes(model: nn.Module, shape: tuple[int, ...]) -> tuple[bytes | None, dict]:
    """``torch.export`` ``model`` for inputs of ``shape`` (1, C, H, W) with any batch size; where a dynamic batch
    fails, for batch 1 only. Returns (the .pt2 file's bytes or None, what was done)."""
    model = model.eval()
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dynamic in (True, False):
            try:
                if dynamic:
                    example = torch.rand(2, *shape[1:])  # 2, not 1: torch.export specialises a size of 1
                    ep = torch.export.export(model, (example,),
                                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
                else:
                    ep = torch.export.export(model, (torch.rand(*shape),))
                buf = io.BytesIO()
                torch.export.save(ep, buf)
            except Exception as exc:  # torch.export's errors have no common base class
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            info = {"batch": "dynamic" if dynamic else "static",
                    "input_shape": ["batch" if dynamic else shape[0], *shape[1:]]}
            if errors:
                info["note"] = f"dynamic batch failed ({errors[0]}): exported for batch {shape[0]} only"
            return buf.getvalue(), info
    return None, {"batch": None, "note": "torch.export failed: " + "; ".join(errors)}


def _write(rd: RunDir, name: str, data: bytes, files: dict) -> Path:
    path = rd.path / name
    atomic_write_bytes(path, data, hint="run robprune export again")
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return path


def _meta(rm: RunModel, **more) -> dict[str, str]:
    cfg, spec = rm.cfg, rm.spec
    meta = {"format": "pt", "producer": "robprune", "arch": cfg.model.arch, "width": str(cfg.model.width),
            "num_classes": str(spec.num_classes), "dataset": cfg.data.name,
            "input_shape": json.dumps([1, spec.in_channels, spec.image_size, spec.image_size]),
            "normalization": NORMALIZATION, "run": cfg.name, "weights_from": rm.weights_file}
    if cfg.model.arch == "wrn":
        meta["depth"] = str(cfg.model.depth)
    meta.update({k: str(v) for k, v in more.items()})
    return meta


# ------------------------------------------------------------------------------------------------ the export

def check_compactable(rm: RunModel) -> None:
    """Refuse ``--compact`` for a run no layer of which was pruned in whole filters or columns."""
    schemes = {str(info.get("scheme")) for info in rm.layers.values() if float(info.get("target", 0)) > 0}
    if not schemes & {"filter", "column"}:
        cfg = rm.cfg
        how = " and ".join([w for w, on in (("N:M", any(":" in s for s in schemes)),
                                            ("irregularly", "irregular" in schemes or not schemes)) if on])
        raise UserError(f"{rm.rd.path}: cannot be compacted: it was pruned {how} (prune.scheme = "
                        f"{cfg.prune.scheme}, prune.linear_scheme = {cfg.prune.linear_scheme}): its zeros are "
                        "scattered single weights, no filter or channel is entirely zero by design; --compact needs "
                        "prune.scheme = filter or column")


# ------------------------------------------------------------------------------------------------ 2:4 semi-structured

SEMI_STRUCTURED_SCHEME = "2:4"
SEMI_STRUCTURED_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere (A100, RTX 30xx) and newer


def semi_structured_support(device: torch.device | None = None, capability: tuple[int, int] | None = None
                            ) -> tuple[bool, str]:
    """Whether torch's 2:4 semi-structured sparse kernels run here, and in one line why not: they need a CUDA GPU of
    compute capability 8.0 or newer and a torch with ``torch.sparse.to_sparse_semi_structured``."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured (torch >= 2.1 has)"
    if capability is None:
        if device is not None and device.type != "cuda" or not torch.cuda.is_available():
            where = f"the device is {device}" if device is not None and device.type != "cuda" else "no CUDA device here"
            return False, (f"2:4 semi-structured sparse kernels run on NVIDIA GPUs of compute capability 8.0 or newer "
                           f"only ({where})")
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < SEMI_STRUCTURED_CAPABILITY:
        return False, (f"2:4 semi-structured sparse kernels need compute capability 8.0 or newer (A100, RTX 30xx, "
                       f"H100 ...); this GPU has {capability[0]}.{capability[1]}")
    return True, ""


def semi_structured_layers(model: nn.Module, layers: dict[str, dict]) -> list[str]:
    """The weights of ``model``'s Linear layers that ``layers`` (the checkpoint's per-layer scheme and target) says
    were pruned 2:4, in model order."""
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return [k for k, info in layers.items() if k in linear and info.get("scheme") == SEMI_STRUCTURED_SCHEME
            and float(info.get("target", 0)) > 0]


def check_semi_structured(rm: RunModel, device: torch.device | None = None) -> None:
    """Refuse ``--semi-structured`` in one line: for a run without 2:4 linear layers, or where the kernels cannot
    run (no CUDA GPU of compute capability 8.0 or newer)."""
    if not semi_structured_layers(rm.model, rm.layers):
        cfg = rm.cfg
        raise UserError(f"{rm.rd.path}: cannot be converted to 2:4 semi-structured sparse: no linear layer was pruned "
                        f"2:4 (prune.scheme = {cfg.prune.scheme}, prune.linear_scheme = {cfg.prune.linear_scheme}); "
                        "--semi-structured needs prune.linear_scheme = \"2:4\"")
    ok, why = semi_structured_support(device)
    if not ok:
        raise UserError(f"{rm.rd.path}: cannot convert to 2:4 semi-structured sparse here: {why}")


def to_semi_structured(model: nn.Module, names: list[str], *, dtype: torch.dtype = torch.float16,
                       device: torch.device | str = "cuda") -> tuple[nn.Module, dict]:
    """A copy of ``model`` on ``device`` in ``dtype``, eval mode, whose Linear weights ``names`` are converted with
    ``torch.sparse.to_sparse_semi_structured``. A weight that is not 2:4 along its rows, or whose shape or dtype the
    kernels do not take, stays dense and is named in the report with the reason. Returns (model, report)."""
    ok, why = semi_structured_support(torch.device(device))
    if not ok:
        raise UserError(f"cannot convert to 2:4 semi-structured sparse here: {why}")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    converted, skipped = [], {}
    for name in names:
        mod = out.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if not isinstance(mod, nn.Linear):
            skipped[name] = "not the weight of a Linear layer"
            continue
        w = mod.weight.detach()
        if w.shape[1] % 4 or bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) > 2).any()):
            skipped[name] = "not 2:4 along its rows (more than 2 nonzeros in a group of 4)"
            continue
        try:
            mod.weight = nn.Parameter(to_sparse_semi_structured(w.contiguous()), requires_grad=False)
        except (RuntimeError, ValueError, TypeError) as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        converted.append(name)
    return out, {"dtype": str(dtype).removeprefix("torch."), "device": str(device), "converted": converted,
                 "skipped": skipped}


def semi_structured_report(rm: RunModel, n: int = 64) -> dict:
    """Convert the run's 2:4 linear weights (float16, on the GPU) and compare the logits with the dense masked model's
    in float16 on ``n`` random [0, 1] inputs."""
    names = semi_structured_layers(rm.model, rm.layers)
    sparse, report = to_semi_structured(rm.model, names)
    dense = copy.deepcopy(rm.model).to(device="cuda", dtype=torch.float16).eval()
    shape = (n, rm.spec.in_channels, rm.spec.image_size, rm.spec.image_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        a, b = dense(x).float(), sparse(x).float()
    diff = float((a - b).abs().max())
    report["check"] = {"inputs": n, "max_abs_diff_float16": diff,
                       "same_predictions": float((a.argmax(1) == b.argmax(1)).float().mean())}
    report["note"] = ("convert after loading: robprune.engine.export.to_semi_structured(model, names) or "
                      "torch.sparse.to_sparse_semi_structured on each converted weight (float16, CUDA)")
    return report


def semi_structured_lines(report: dict) -> list[str]:
    out = [f"semi-structured: {len(report['converted'])} linear weight(s) converted to 2:4 sparse "
           f"({report['dtype']}, {report['device']})" + (f": {', '.join(report['converted'])}" if report['converted']
                                                         else "")]
    out += [f"  {k} stays dense: {why}" for k, why in report["skipped"].items()]
    c = report.get("check")
    if c:
        out.append(f"semi-structured: max |logit difference| {c['max_abs_diff_float16']:.3g} against the dense "
                   f"model in float16 on {c['inputs']} random inputs; same prediction for "
                   f"{100 * c['same_predictions']:.1f}%")
    return out


def _refuse_links(rd: RunDir) -> None:
    for name in (MODEL_FILE, MASKS_FILE, PROGRAM_FILE, CARD_FILE, COMPACT_MODEL_FILE, COMPACT_PROGRAM_FILE):
        if (rd.path / name).is_symlink():
            raise UserError(f"{rd.path / name}: is a symlink; robprune never writes through one: remove it")


def export_all(run_dir: str | Path, skipped: list[str] | None = None, *, compact: bool = False,
               semi_structured: bool = False) -> tuple[list[Path], dict]:
    """``robprune export``: the summary files (:func:`robprune.engine.summary.export_run`), then the model files
    (:func:`export_model`). Returns (every path written, the model card). A run that cannot be compacted (or
    converted to 2:4 semi-structured sparse, here) is refused before anything is written."""
    from .summary import export_run

    rm = load_run_model(run_dir)
    if compact:
        check_compactable(rm)
    if semi_structured:
        check_semi_structured(rm)
    _refuse_links(rm.rd)
    paths = export_run(run_dir, skipped)
    more, card = export_model(rm, compact=compact, semi_structured=semi_structured)
    return paths + more, card


def export_model(run: RunModel | str | Path, summary: dict | None = None, *, compact: bool = False,
                 semi_structured: bool = False) -> tuple[list[Path], dict]:
    """Write model.safetensors, masks.safetensors, model.pt2 (and with ``compact`` the compact model's files), then
    model_card.json. ``summary`` is the run's summary dict (summary.json's content; read from there when not
    given): the card's sparsity and accuracy figures are its own. Returns (paths written, the card)."""
    try:
        import safetensors
    except ImportError:
        raise UserError("safetensors is not installed: pip install 'safetensors>=0.4' (a dependency of robprune)"
                        ) from None

    rm = run if isinstance(run, RunModel) else load_run_model(run)
    rd = rm.rd
    if summary is None:
        summary = read_json_state(rd.path / "summary.json")
        if not isinstance(summary, dict):
            raise UserError(f"{rd.path / 'summary.json'}: missing or damaged: run robprune export first")
    if compact:
        check_compactable(rm)
    if semi_structured:
        check_semi_structured(rm)
    _refuse_links(rd)
    spec = rm.spec
    shape = (1, spec.in_channels, spec.image_size, spec.image_size)
    files: dict[str, dict] = {}
    if compact:  # first: a compaction that fails its check writes nothing
        cm, report = compact_model(rm.model, rm.layers, shape)
    semi_info = semi_structured_report(rm) if semi_structured else None
    paths = [
        _write(rd, MODEL_FILE, _safetensors_bytes(rm.state, _meta(rm, content="state_dict (parameters and buffers)")),
               files),
        _write(rd, MASKS_FILE, _safetensors_bytes(rm.masks, _meta(
            rm, content="pruning masks, bool, True = kept",
            masks_source="checkpoint" if rm.masks_source == "checkpoint" else "derived: weight != 0 (the run has no "
                                                                             "fixed masks yet)")), files),
    ]
    program, program_info = _program_bytes(rm.model, shape)
    if program is not None:
        paths.append(_write(rd, PROGRAM_FILE, program, files))
    program_info = {"file": PROGRAM_FILE if program is not None else None, **program_info}
    compact_info = None
    if compact:
        cprog, cinfo = _program_bytes(cm, shape)
        paths.append(_write(rd, COMPACT_MODEL_FILE, _safetensors_bytes(cm.state_dict(), _meta(
            rm, content="state_dict of the compact model (channels removed; shapes differ from the architecture's)",
            channels=json.dumps(_channel_shapes(cm)))), files))
        if cprog is not None:
            paths.append(_write(rd, COMPACT_PROGRAM_FILE, cprog, files))
        compact_info = {**report, "program": {"file": COMPACT_PROGRAM_FILE if cprog is not None else None, **cinfo},
                        "files": {"masked": {MODEL_FILE: files[MODEL_FILE]["bytes"],
                                             PROGRAM_FILE: files.get(PROGRAM_FILE, {}).get("bytes")},
                                  "compact": {COMPACT_MODEL_FILE: files[COMPACT_MODEL_FILE]["bytes"],
                                              COMPACT_PROGRAM_FILE: files.get(COMPACT_PROGRAM_FILE, {}).get("bytes")}}}
    card = build_card(rm, summary, files=files, program=program_info, compact=compact_info,
                      versions={"robprune": _robprune_version(), "torch": torch.__version__,
                                "safetensors": safetensors.__version__})
    if semi_info is not None:
        card["semi_structured"] = semi_info
    atomic_write_text(rd.path / CARD_FILE, json.dumps(card, indent=2) + "\n")
    paths.append(rd.path / CARD_FILE)
    rd.append_event({"type": "export", "paths": [str(p) for p in paths]})
    return paths, card


def _robprune_version() -> str:
    from robprune import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ the model card

ARCH_NAMES = {"lenet": "LeNet", "vgg16": "VGG-16", "resnet18": "ResNet-18"}
STRUCTURES = {"irregular": "weights", "filter": "filters", "column": "channels"}


def _arch_display(arch: str, width: int, depth: int) -> str:
    if arch == "wrn":
        return f"WideResNet-{depth}-{width}"
    return f"{ARCH_NAMES.get(arch, arch)} (width {width})"


def _eps_str(eps) -> str | None:
    """RobustBench writes eps as 8/255 where it is one."""
    if eps is None:
        return None
    k = float(eps) * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{float(eps):g}"


def _pct(x) -> str | None:
    """A fraction as RobustBench's percent string ("88.98"); a value above 1 is taken as a percentage already."""
    if x is None:
        return None
    x = float(x)
    return f"{100 * x if x <= 1 else x:.2f}"


def read_autoattack(rd: RunDir, model: nn.Module | None = None) -> tuple[dict | None, list[str]]:
    """The newest result file ``eval/autoattack-*.json`` of the run directory (``robprune eval --attack
    autoattack``; by modification time, then name), reduced to ``clean_acc``, ``robust_acc``, ``eps``, ``n``,
    ``version`` (top-level, or in its ``attack``), ``file``, and, where the file records the weights' sha256,
    ``same_weights``: whether it evaluated ``model``'s weights. A damaged file is passed over and named in the notes;
    none at all is (None, [])."""
    notes: list[str] = []
    try:
        found = [p for p in rd.eval_dir.glob("autoattack-*.json")
                 if p.is_file() and not p.is_symlink() and not p.name.endswith(".state.json")]
        found.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    except OSError:
        return None, notes
    for p in found:
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            notes.append(f"{p}: not readable JSON ({type(exc).__name__}); skipped")
            continue
        if not isinstance(d, dict):
            notes.append(f"{p}: not a JSON object; skipped")
            continue
        attack = d.get("attack") if isinstance(d.get("attack"), dict) else {}
        out = {k: d.get(k) for k in ("clean_acc", "robust_acc")}
        out.update({k: d.get(k, attack.get(k)) for k in ("eps", "n", "version")})
        out["file"] = str(p.relative_to(rd.path))
        if isinstance(d.get("weights_sha256"), str) and model is not None:
            from .evaluation import weights_fingerprint

            out["same_weights"] = weights_fingerprint(model) == d["weights_sha256"]
        return out, notes
    return None, notes


def build_card(rm: RunModel, summary: dict, *, files: dict, program: dict, compact: dict | None,
               versions: dict) -> dict:
    cfg, spec = rm.cfg, rm.spec
    arch, width, depth = cfg.model.arch, cfg.model.width, cfg.model.depth
    final = summary.get("final") or {}
    attack = final.get("attack") or {}
    eps = attack.get("eps", cfg.attack.eval.eps)
    aa_file, aa_notes = read_autoattack(rm.rd, rm.model)
    aa = aa_file if aa_file and aa_file.get("same_weights", True) else None
    if aa_file and aa is None:
        aa_notes.append(f"{aa_file['file']}: evaluated other weights than these (its weights_sha256 differs); "
                        "left out of the robustbench and adversarial_pruning_benchmark entries")
    layers = summary.get("layers", [])
    sp = summary.get("sparsity", {})
    schemes = {L.get("scheme") for L in layers if float(L.get("target") or 0) > 0}
    structured = bool(schemes & {"filter", "column"})
    pretrain_attack = cfg.attack.train.kind
    evaluated = "final evaluation" if summary.get("status") == "completed" else "latest evaluation (run in progress)"
    footnote = (f"clean and PGD accuracy from robprune's {evaluated} on {final.get('n')} test examples"
                + (f"; AutoAttack from {aa['file']}" if aa else "; no AutoAttack evaluation yet"))
    card = {
        "format": CARD_FORMAT,
        "run": summary.get("run", cfg.name),
        "status": summary.get("status"),
        "steps": summary.get("steps"),
        "model": {"architecture": arch, "width": width, "depth": depth if arch == "wrn" else None,
                  "name": _arch_display(arch, width, depth), "num_classes": spec.num_classes,
                  "parameters": sp.get("total_params"), "nonzero_parameters": sp.get("nonzero_params"),
                  "weights_from": rm.weights_file},
        "input": {"shape": [1, spec.in_channels, spec.image_size, spec.image_size], "layout": "NCHW",
                  "dtype": "float32", "range": [0, 1], "normalization": NORMALIZATION,
                  "batch": program.get("batch")},
        "dataset": cfg.data.name,
        "pruning": {"scheme": cfg.prune.scheme, "linear_scheme": cfg.prune.linear_scheme,
                    "masks": MASKS_FILE, "masks_dtype": "bool (True = kept)", "masks_source": rm.masks_source,
                    "masked_nonzero_set_to_zero": rm.masked_nonzero,
                    "sparsity": sp, "compression_rate": summary.get("compression_rate"),
                    "layers": layers},
        "threat_model": {"norm": "Linf", "eps": eps},
        "evaluation": {"source": evaluated, "clean_acc": final.get("nat_acc"), "pgd_acc": final.get("adv_acc"),
                       "n": final.get("n"), "attack": attack or None},
        "autoattack": aa_file,
        "files": files,
        "program": program,
        "compact": compact,
        "versions": versions,
        "robustbench": {
            "name": summary.get("run", cfg.name), "authors": None, "link": None,
            "architecture": _arch_display(arch, width, depth), "eps": _eps_str(eps),
            "clean_acc": _pct(aa["clean_acc"] if aa and aa.get("clean_acc") is not None else final.get("nat_acc")),
            "reported": _pct(final.get("adv_acc")),
            "autoattack_acc": _pct(aa.get("robust_acc")) if aa else None,
            "additional_data": False, "number_forward_passes": 1, "dataset": cfg.data.name, "venue": None,
            "unreliable": None, "footnote": footnote,
        },
        "adversarial_pruning_benchmark": {
            "ap_method": "RADMM (Ye et al., ICCV 2019: concurrent adversarial training and ADMM pruning)",
            "architecture": arch, "dataset": cfg.data.name,
            "structure": STRUCTURES.get(cfg.prune.scheme, cfg.prune.scheme),
            "sparsity_rate": None if sp.get("prunable") is None else round(100 * sp["prunable"], 2),
            "clean_acc": final.get("nat_acc"),
            "aa_robust_acc": aa.get("robust_acc") if aa else None, "hofmn_robust_acc": None,
            "normalization": False,
            "taxonomy": {"pipeline": "A (pruning after training)",
                         "pretraining": "AT" if pretrain_attack != "none" else "NT",
                         "finetuning": "AT" if pretrain_attack != "none" else "NT",
                         "1S/IT": "1S", "S/US": "S" if structured else "US", "L/G": "L", "criterion": "SOLWM"},
        },
    }
    if aa_notes:
        card["notes"] = aa_notes
    return card


# ------------------------------------------------------------------------------------------------ compaction

@dataclass
class Link:
    """A channel dimension that only ``producer`` writes and only ``consumer`` reads: producer (Conv2d or Linear)
    -> ``bn`` (BatchNorm2d or None) -> ReLU -> max / average pooling -> [flatten] -> consumer. A Linear consumer
    after a flatten takes ``spatial`` inputs per channel."""

    producer: str
    bn: str | None
    consumer: str
    spatial: int = 1


def _links(model: nn.Module) -> tuple[list[Link], dict[str, str]]:
    """The model's removable channel links, in forward order, and why the other prunable layers' output channels
    cannot go (layer name -> reason)."""
    from .models import VGG, LeNet, ResNet, WideResNet

    residual = "its outputs are added to a residual connection (another branch adds to the same channel)"
    logits = "its outputs are the logits"
    links: list[Link] = []
    fixed: dict[str, str] = {}
    if isinstance(model, LeNet):
        side2 = model.fc1.in_features // model.conv2.out_channels
        links = [Link("conv1", None, "conv2"), Link("conv2", None, "fc1", spatial=side2), Link("fc1", None, "fc2")]
        fixed["fc2"] = logits
    elif isinstance(model, VGG):
        convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
        for a, b in zip(convs, convs[1:]):
            links.append(Link(f"features.{a}", f"features.{a + 1}", f"features.{b}"))
        links.append(Link(f"features.{convs[-1]}", f"features.{convs[-1] + 1}", "classifier", spatial=1))
        fixed["classifier"] = logits
    elif isinstance(model, (ResNet, WideResNet)):
        stages = ["layer1", "layer2", "layer3", "layer4"] if isinstance(model, ResNet) else ["block1", "block2", "block3"]
        bn = "bn1" if isinstance(model, ResNet) else "bn2"
        for s in stages:
            for i in range(len(getattr(model, s))):
                links.append(Link(f"{s}.{i}.conv1", f"{s}.{i}.{bn}", f"{s}.{i}.conv2"))
        inner = {ln.producer for ln in links}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in inner:
                fixed[name] = logits if name == "fc" else residual
        if isinstance(model, WideResNet) and model.block1[0].shortcut is not None:
            fixed["conv1"] = ("its outputs go through the first block's BatchNorm and ReLU into both of that block's "
                              "branches")
    else:
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fixed[name] = f"{type(model).__name__} is not a model robprune knows how to compact"
    return links, fixed


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _input_view(m: nn.Module, n: int, spatial: int) -> Tensor:
    """The consumer's weight as (out, n channels, inputs per channel)."""
    w = m.weight.detach()
    return w.reshape(w.shape[0], n, -1) if isinstance(m, nn.Conv2d) else w.reshape(w.shape[0], n, spatial)


def _zero_filters(m: nn.Module, keep_in: Tensor | None, spatial_in: int) -> Tensor:
    """Which output filters of ``m`` are entirely zero on the inputs that stay."""
    w = m.weight.detach()
    if keep_in is not None:
        if isinstance(m, nn.Conv2d):
            w = w[:, keep_in]
        else:
            w = w.reshape(w.shape[0], -1, spatial_in)[:, keep_in]
    return (w.reshape(w.shape[0], -1) == 0).all(1)


@torch.no_grad()
def compact_model(model: nn.Module, layers: dict[str, dict] | None = None,
                  shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict]:
    """A dense copy of ``model`` (eval mode) without the channels its pruning made useless, whose outputs equal
    ``model``'s; and a report (per layer: channels before / after, why each went, why zero filters stayed).

    A channel of a :class:`Link` goes when

    * ``unused``: the next layer's weights on it are all zero (column pruning, or a zeroed input channel);
    * ``zero``: its filter is zero and bias / BatchNorm / ReLU make it exactly 0;
    * ``folded``: its filter is zero, so it is a nonzero constant after ReLU; where the next layer is a Linear (or
      an unpadded conv) the constant times its weights is added to that layer's bias;
    * ``merged``: as ``folded``, but the next conv pads with zeros, so a constant is not a bias there: all such
      channels of the layer become one channel of constant 1 (the next conv's weights on it are the constants'
      weighted sum); that one stays.

    Output channels added to a residual connection (ResNet / WRN outside a block's inner conv) and the logits
    stay. The copy is checked against ``model`` in float64 on random inputs of ``shape``."""
    links, fixed = _links(model)
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    keep_in: dict[str, Tensor] = {}
    keep_out: dict[str, Tensor] = {}
    spatial_of: dict[str, int] = {}
    report_layers = []
    for ln in links:
        P, C = mods[ln.producer], mods[ln.consumer]
        bn = mods[ln.bn] if ln.bn else None
        if any(getattr(x, "groups", 1) != 1 for x in (P, C)):
            fixed[ln.producer] = "grouped convolution"
            continue
        n = P.out_channels if isinstance(P, nn.Conv2d) else P.out_features
        spatial_of[ln.consumer] = ln.spatial
        zero_filter = _zero_filters(P, keep_in.get(ln.producer), spatial_of.get(ln.producer, 1))
        wc = _input_view(C, n, ln.spatial)
        unused = (wc == 0).all(2).all(0)
        v = P.bias.detach().clone() if P.bias is not None else torch.zeros(n, dtype=P.weight.dtype)
        if bn is not None:
            v = bn(v.reshape(1, n, 1, 1)).reshape(n)
        k = torch.relu(v)  # the value of a zero filter's channel
        const = zero_filter & ~unused
        zero_val = const & (k == 0)
        const_nz = const & (k != 0)
        foldable = isinstance(C, nn.Linear) or all(p == 0 for p in _pairs(C.padding))
        removed = unused | zero_val
        counts = {"unused": int(unused.sum()), "zero": int(zero_val.sum()), "folded": 0, "merged": 0}
        carrier = None
        idx = const_nz.nonzero().flatten().tolist()
        if idx and foldable:
            delta = (wc[:, idx] * k[idx].reshape(1, -1, 1)).sum((1, 2))
            if C.bias is None:
                C.bias = nn.Parameter(torch.zeros(C.weight.shape[0], dtype=C.weight.dtype))
            C.bias.add_(delta)
            removed |= const_nz
            counts["folded"] = len(idx)
        elif idx:
            carrier = idx[0]
            merged = (wc[:, idx] * k[idx].reshape(1, -1, 1)).sum(1)  # (out, per-channel inputs)
            C.weight.view(C.weight.shape[0], n, -1)[:, carrier] = merged
            if bn is not None:
                bn.weight[carrier], bn.bias[carrier] = 0.0, 1.0
                bn.running_mean[carrier], bn.running_var[carrier] = 0.0, 1.0
            else:
                P.bias[carrier] = 1.0
            removed |= const_nz
            removed[carrier] = False
            counts["merged"] = len(idx) - 1
        keep = (~removed).nonzero().flatten()
        if keep.numel() == 0:  # keep one channel, silenced: every channel's contribution is gone or in the bias
            keep = torch.zeros(1, dtype=torch.long)
            C.weight.view(C.weight.shape[0], n, -1)[:, 0] = 0
        keep_out[ln.producer] = keep_in[ln.consumer] = keep
        kept_zero = int((zero_filter[keep]).sum())
        entry = {"layer": ln.producer, "next": ln.consumer, "channels": n, "kept": int(keep.numel()),
                 "removed": n - int(keep.numel()), "removed_because": counts, "zero_filters_kept": kept_zero}
        if kept_zero:
            why = []
            if carrier is not None:
                what = (f"carries the {len(idx)} constant channels merged into one" if len(idx) > 1
                        else "is a nonzero constant (zero filter, bias or BatchNorm shift through ReLU)")
                why.append(f"1 {what}: {ln.consumer} pads with zeros, so a constant is not a bias there")
            rest = kept_zero - (carrier is not None)
            if rest:
                why.append(f"{rest} kept as the only channel left")
            entry["kept_because"] = "; ".join(why)
        report_layers.append(entry)
    # layers whose output channels stay: say how many of their filters are zero and why they stay
    for name, reason in fixed.items():
        mod = mods.get(name)
        if mod is None or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        zf = int(_zero_filters(mod, keep_in.get(name), spatial_of.get(name, 1)).sum())
        n = mod.weight.shape[0]
        entry = {"layer": name, "next": None, "channels": n, "kept": n, "removed": 0, "zero_filters_kept": zf}
        if zf:
            entry["kept_because"] = reason
        report_layers.append(entry)
    # column pruning: how many input channels are entirely zero, and how many of those went
    notes: list[str] = []
    originals = dict(model.named_modules())
    removed_unused = {e["next"]: e["removed_because"]["unused"] for e in report_layers if e.get("next")}
    for name, info in (layers or {}).items():
        mod_name = name.rsplit(".", 1)[0]
        mod = originals.get(mod_name)
        if info.get("scheme") != "column" or float(info.get("target", 0)) <= 0 or mod is None:
            continue
        w = mod.weight.detach()
        spatial = spatial_of.get(mod_name, 1) if isinstance(mod, nn.Linear) else 1
        per_in = w.transpose(0, 1).reshape(w.shape[1] // spatial, -1)  # one row per input channel
        zero_in, n_in = int((per_in == 0).all(1).sum()), per_in.shape[0]
        gone = removed_unused.get(mod_name, 0)
        if zero_in == 0:
            why = "none entirely zero (the zeroed columns are single kernel positions or features): nothing to remove"
        elif gone < zero_in:
            why = (f"{gone} removed; the rest kept: their input is the image or a residual connection, which other "
                   "layers read too" if mod_name not in removed_unused else f"{gone} removed")
        else:
            why = f"all {gone} removed"
        notes.append(f"{mod_name}: column pruning: {zero_in} of {n_in} input channels entirely zero; {why}")
    # rebuild the shrunk modules
    for name in dict.fromkeys([*keep_out, *keep_in]):
        old = mods[name]
        _set_module(m, name, _shrink(old, keep_out.get(name), keep_in.get(name), spatial_of.get(name, 1)))
    for ln in links:
        if ln.bn and ln.producer in keep_out:
            _set_module(m, ln.bn, _shrink_bn(mods[ln.bn], keep_out[ln.producer]))
    m.eval()
    names = [n for n, _ in model.named_modules()]
    report_layers.sort(key=lambda e: names.index(e["layer"]))
    report = {"layers": report_layers,
              "channels_removed": sum(e["removed"] for e in report_layers),
              "parameters": {"masked": _count(model), "compact": _count(m)},
              "nonzero_parameters": {"masked": _count(model, nonzero=True), "compact": _count(m, nonzero=True)},
              "notes": notes}
    if shape is not None:
        report["check"] = _check(model, m, shape)
    return m, report


def _pairs(p) -> tuple:
    if isinstance(p, str):  # "same" / "valid"
        return (0,) if p == "valid" else (1,)
    return tuple(p) if isinstance(p, (tuple, list)) else (p,)


def _count(model: nn.Module, nonzero: bool = False) -> int:
    return sum(int(torch.count_nonzero(p)) if nonzero else p.numel() for p in model.parameters())


def _shrink(old: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None, spatial_in: int) -> nn.Module:
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if isinstance(old, nn.Conv2d):
        if in_idx is not None:
            w = w[:, in_idx]
        new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, bias=b is not None, padding_mode=old.padding_mode)
    else:
        if in_idx is not None:
            cols = (in_idx.reshape(-1, 1) * spatial_in + torch.arange(spatial_in).reshape(1, -1)).flatten()
            w = w[:, cols]
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    new = new.to(dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _shrink_bn(old: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(int(idx.numel()), eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats).to(dtype=old.running_mean.dtype)
    if old.affine:
        new.weight.data.copy_(old.weight.detach()[idx])
        new.bias.data.copy_(old.bias.detach()[idx])
    if old.track_running_stats:
        new.running_mean.copy_(old.running_mean[idx])
        new.running_var.copy_(old.running_var[idx])
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new.eval()


def _channel_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}


@torch.no_grad()
def _check(masked: nn.Module, compact: nn.Module, shape: tuple[int, ...], n: int = 8) -> dict:
    """Compare the outputs on ``n`` random [0, 1] inputs: in float64 (the algebra; must agree) and in float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape[1:], generator=g)
    a64 = copy.deepcopy(masked).double().eval()(x.double())
    b64 = copy.deepcopy(compact).double().eval()(x.double())
    d64 = float((a64 - b64).abs().max())
    if not torch.allclose(a64, b64, atol=CHECK_ATOL, rtol=1e-5):
        raise RuntimeError(f"compaction changed the outputs (max |difference| {d64:.3g} in float64): a robprune bug, "
                           "please report it; no compact files were written")
    a32, b32 = masked.eval()(x), compact.eval()(x)
    return {"inputs": n, "max_abs_diff_float64": d64, "max_abs_diff_float32": float((a32 - b32).abs().max()),
            "allclose_float32": bool(torch.allclose(a32, b32, atol=CHECK_ATOL))}


def compact_lines(compact: dict) -> list[str]:
    """The compaction report as lines for a terminal."""
    out = []
    for e in compact["layers"]:
        if not e["removed"] and not e["zero_filters_kept"]:
            continue
        why = ", ".join(f"{v} {k}" for k, v in (e.get("removed_because") or {}).items() if v)
        line = f"  {e['layer']}: {e['channels']} -> {e['kept']} channels"
        if why:
            line += f" (removed: {why})"
        if e.get("zero_filters_kept"):
            line += f"; {e['zero_filters_kept']} zero filter(s) kept: {e.get('kept_because', '')}"
        out.append(line)
    out += [f"  {n}" for n in compact.get("notes", [])]
    p = compact["parameters"]
    f = compact["files"]
    out.append(f"compact: {compact['channels_removed']} channels removed; parameters {p['masked']} -> {p['compact']} "
               f"({100 * (1 - p['compact'] / max(p['masked'], 1)):.1f}% fewer)")
    size = {**f["masked"], **f["compact"]}
    out.append("compact: " + "; ".join(
        f"{a} {size[a] if size[a] is not None else '(not written)'} B -> {b} "
        f"{size[b] if size[b] is not None else '(not written)'} B"
        for a, b in ((MODEL_FILE, COMPACT_MODEL_FILE), (PROGRAM_FILE, COMPACT_PROGRAM_FILE))))
    c = compact.get("check")
    if c:
        out.append(f"compact: same logits as the masked model (max |difference| {c['max_abs_diff_float32']:.2g} "
                   f"in float32 on {c['inputs']} random inputs)")
    return out


# ------------------------------------------------------------------------------------------------ bench --compact

def run_compact_bench(run_dir: str | Path, *, device: str = "auto", repeats: int = 5, warmup: int = 3,
                      iters: int = 10, threads: int = 0, batch: int = 0) -> dict:
    """Inference time of the masked dense model against the compact one, on the same random [0, 1] batch (the
    run's test batch size unless ``batch``): blocks of ``iters`` forward passes, masked and compact alternating
    (A B A B ...), medians reported with their ratio (masked / compact: above 1, the compact model is faster)."""
    for name, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0), ("iters", iters, 1), ("threads", threads, 0),
                        ("batch", batch, 0)):
        if v < lo:
            raise UserError(f"--{name}: expected an integer >= {lo}, found {v}")
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device}: expected auto, cpu or cuda") from None
    rm = load_run_model(run_dir)
    check_compactable(rm)
    shape = (1, rm.spec.in_channels, rm.spec.image_size, rm.spec.image_size)
    compact, report = compact_model(rm.model, rm.layers, shape)
    models = {"masked": rm.model.to(dev).eval(), "compact": compact.to(dev).eval()}
    bs = batch or rm.cfg.data.test_batch_size
    x = torch.rand(bs, *shape[1:], generator=torch.Generator().manual_seed(0)).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    runs: dict[str, list[float]] = {"masked": [], "compact": []}
    with torch.inference_mode():
        for name, mod in models.items():
            for _ in range(warmup):
                mod(x)
        for r in range(repeats):
            for name in (("masked", "compact") if r % 2 == 0 else ("compact", "masked")):
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    models[name](x)
                sync()
                runs[name].append(1000 * (time.perf_counter() - t0) / iters)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"bench": "compact", "run_dir": str(rm.rd.path), "arch": rm.cfg.model.arch, "width": rm.cfg.model.width,
            "device": str(dev), "threads": torch.get_num_threads(), "batch": bs, "repeats": repeats,
            "warmup": warmup, "iters": iters,
            "masked_ms_per_batch": med["masked"], "compact_ms_per_batch": med["compact"],
            "speedup": med["masked"] / med["compact"] if med["compact"] > 0 else None,
            "masked_ms_per_batch_runs": runs["masked"], "compact_ms_per_batch_runs": runs["compact"],
            "parameters": report["parameters"], "channels_removed": report["channels_removed"],
            "torch": torch.__version__}
