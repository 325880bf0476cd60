"""gemmtune: tune quantized GEMM kernel parameters per GPU and layer shape, store the winners,
look them up at model load.

The public API re-exports the core objects; heavy modules (CUDA, database) load lazily.
"""

from __future__ import annotations

from gemmtune.kernels.config import PRESETS, KernelConfig, preset
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import WORKLOADS, Workload


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one owner."""
    from importlib import metadata

    try:
        return metadata.version("gemmtune")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


__version__ = _version()

__all__ = [
    "PRESETS",
    "WORKLOADS",
    "DeviceInfo",
    "GemmtuneError",
    "KernelConfig",
    "Problem",
    "Workload",
    "__version__",
    "preset",
]
