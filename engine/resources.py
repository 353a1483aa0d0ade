"""What the run costs the machine, sampled at each progress emission and carried in the step records.

Host: resident memory (RSS) and the process's CPU use since the last sample (100% = one core busy). CUDA: memory
allocated, reserved and the peak allocated (torch.cuda, no device sync); utilisation and temperature when NVIDIA's
management library is importable (``pip install 'robprune[gpu]'``: nvidia-ml-py; never required). Every figure
is optional: a key is absent when it cannot be known here.
"""
from __future__ import annotations

import os
import time

import torch

_MB = 2**20


def _host_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak, where nothing better exists
    except (ImportError, OSError):
        return None


class _Nvml:
    """Utilisation and temperature of one CUDA device through pynvml (nvidia-ml-py), if it imports and starts."""

    def __init__(self, index: int) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            self.handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None
                           else pynvml.nvmlDeviceGetHandleByIndex(index))
            self.pynvml = pynvml
        except Exception:  # not installed, no driver, an unusual device: the figures are simply absent
            self.handle = None

    def sample(self) -> dict:
        if self.handle is None:
            return {}
        try:
            util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            temp = self.pynvml.nvmlDeviceGetTemperature(self.handle, self.pynvml.NVML_TEMPERATURE_GPU)
            return {"gpu_util_pct": float(util), "gpu_temp_c": float(temp)}
        except Exception:
            return {}


class ResourceMonitor:
    """``sample()`` returns a flat dict of floats (MB, %, degrees C) for the step record."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._t = time.monotonic()
        self._cpu = sum(os.times()[:2])
        self._nvml = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._nvml = _Nvml(index)

    def device_name(self) -> str:
        if self.device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def sample(self) -> dict:
        out: dict[str, float] = {}
        rss = _host_rss_bytes()
        if rss is not None:
            out["host_rss_mb"] = round(rss / _MB, 1)
        now, cpu = time.monotonic(), sum(os.times()[:2])
        if now > self._t:
            out["cpu_pct"] = round(100.0 * (cpu - self._cpu) / (now - self._t), 1)
        self._t, self._cpu = now, cpu
        if self.device.type == "cuda" and torch.cuda.is_available():
            d = self.device
            out["gpu_mem_alloc_mb"] = round(torch.cuda.memory_allocated(d) / _MB, 1)
            out["gpu_mem_reserved_mb"] = round(torch.cuda.memory_reserved(d) / _MB, 1)
            out["gpu_mem_peak_mb"] = round(torch.cuda.max_memory_allocated(d) / _MB, 1)
            out["gpu_mem_total_mb"] = round(torch.cuda.get_device_properties(d).total_memory / _MB, 1)
            if self._nvml is not None:
                out.update(self._nvml.sample())
        return out


# ------------------------------------------------------------------------------------------ will it fit?

_KNOWN_SIZES = {"mnist-5k": 5000, "mnist": 70000, "cifar10": 60000}
# per parameter, float32: weights, gradients, two optimizer moments, ADMM's Z, U and previous Z, a mask's share
_BYTES_PER_PARAM = 4 * 7 + 1


def memory_available(device: torch.device) -> tuple[int, str]:
    """Bytes this run may use on ``device`` and what they are (the card's memory, or the host's RAM)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62, "memory"


def model_memory(arch: str, width: int, **kw) -> tuple[int, int]:
    """(parameters, bytes) of the model ``build_model(arch, width, **kw)`` would make, counted on the meta device
    (no memory): the bytes are those its weights, gradients, optimizer and ADMM state take in a run."""
    from .models import build_model

    with torch.device("meta"):
        model = build_model(arch, width, **kw)
    n = sum(p.numel() for p in model.parameters())
    return n, n * _BYTES_PER_PARAM


def check_fits(cfg, device: torch.device | None = None) -> None:
    """Refuse a model or a data set that cannot fit (one line with the estimate), before a run directory exists.

    The model is built on the meta device (no memory) to count its parameters; the data set's size is known
    for the named ones and given for synthetic data."""
    from .data import dataset_spec
    from .errors import ConfigError

    device = device or torch.device("cuda" if cfg.run.device in ("auto", "cuda") and torch.cuda.is_available()
                                    else "cpu")
    have, what = memory_available(device)
    spec = dataset_spec(cfg.data.name)
    n, need = model_memory(cfg.model.arch, cfg.model.width, num_classes=spec.num_classes,
                           in_channels=spec.in_channels, image_size=spec.image_size, depth=cfg.model.depth,
                           source=cfg.source)
    if need > have:
        key = "model.width"
        raise ConfigError(cfg.origin(key), key, f"a model that fits in {what} ({have / 2**30:.1f} GiB)",
                          f"{cfg.model.width}: {n:,} parameters, about {need / 2**30:.1f} GiB for weights, "
                          "gradients, optimizer and ADMM state")
    examples = (cfg.data.synthetic_train + cfg.data.synthetic_test if cfg.data.name == "synthetic"
                else _KNOWN_SIZES.get(cfg.data.name, 0))
    data_bytes = examples * spec.in_channels * spec.image_size ** 2 * 4
    if data_bytes > have // 2:  # the data set lives on the device next to the model and the activations
        key = "data.synthetic_train" if cfg.data.name == "synthetic" else "data.name"
        raise ConfigError(cfg.origin(key), key, f"a data set that fits in half of {what} "
                          f"({have / 2**31:.1f} GiB)", f"{examples:,} examples, about {data_bytes / 2**30:.1f} GiB")
