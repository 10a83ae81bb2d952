"""Device memory per process from NVML: a series sampled beside smaps, not a region class.

smaps cannot see memory on the GPU (a tensor kept alive per request grows the device, not RSS),
so NVML's per-process "used GPU memory" is sampled with every smaps sample and judged like any
other series. nvidia-ml-py is optional (the `gpu` extra); leakhunt never imports torch. Without
the package, a driver or a GPU, `NvmlReader.open()` says why in one line and everything else
carries on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuUnavailable:
    reason: str


class NvmlReader:
    """Reads the device memory used by given pids, summed over every GPU they use."""

    def __init__(self, nvml) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls) -> NvmlReader | GpuUnavailable:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuUnavailable("nvidia-ml-py not installed (pip install 'leakhunt[gpu]')")
        try:
            nvml.nvmlInit()
            reader = cls(nvml)
        except nvml.NVMLError as e:
            return GpuUnavailable(f"{e} (no NVIDIA driver or GPU here)")
        if not reader._handles:
            return GpuUnavailable("NVML sees no GPU")
        return reader

    @property
    def devices(self) -> int:
        return len(self._handles)

    def used_by(self, pids: set[int]) -> dict[int, int]:
        """Bytes of device memory each pid uses (0 for a pid NVML does not list)."""
        used = dict.fromkeys(pids, 0)
        for handle in self._handles:
            for query in (
                self._nvml.nvmlDeviceGetComputeRunningProcesses,
                self._nvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                try:
                    procs = query(handle)
                except self._nvml.NVMLError:
                    continue
                for p in procs:
                    # usedGpuMemory is None when the driver cannot tell (no permission, MIG).
                    if p.pid in used and p.usedGpuMemory:
                        used[p.pid] += int(p.usedGpuMemory)
        return used

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
