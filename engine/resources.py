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
