"""`DeviceInfo`: what a GPU is, and which GPUs are interchangeable for tuning purposes."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from .errors import CudaUnavailableError


@dataclass(frozen=True)
class DeviceInfo:
    vendor: str
    name: str
    compute_capability: str
    sm_count: int
    memory_bytes: int
    driver_version: str = ""
    runtime_version: str = ""

    @property
    def fingerprint(self) -> str:
        """Hash of what makes two cards interchangeable: vendor, model name, compute capability,
        SM count and memory size (rounded to GiB, since drivers reserve a little differently).
        Driver and runtime versions are deliberately left out: they change on every update and
        the kernel hash already pins the compiler."""
        gib = round(self.memory_bytes / 2**30)
        text = f"{self.vendor}|{self.name}|{self.compute_capability}|{self.sm_count}|{gib}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def arch(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceInfo:
        keys = ("vendor", "name", "compute_capability", "sm_count", "memory_bytes",
                "driver_version", "runtime_version")
        return cls(**{k: data[k] for k in keys if k in data})


def _cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def query_device(index: int | None = None) -> DeviceInfo:
    """Describe a CUDA device through torch (and CuPy for the driver version, when present)."""
    import torch

    if not torch.cuda.is_available():
        raise CudaUnavailableError("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if index is None:
        index = torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise CudaUnavailableError(f"GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    p = torch.cuda.get_device_properties(index)
    vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
    driver = runtime = ""
    try:
        import cupy

        driver = _cuda_version_string(cupy.cuda.runtime.driverGetVersion())
        runtime = _cuda_version_string(cupy.cuda.runtime.runtimeGetVersion())
    except Exception:  # CuPy missing or unable to talk to the driver: versions stay unknown
        runtime = str(torch.version.cuda or torch.version.hip or "")
    return DeviceInfo(
        vendor=vendor,
        name=p.name,
        compute_capability=f"{p.major}.{p.minor}",
        sm_count=p.multi_processor_count,
        memory_bytes=int(p.total_memory),
        driver_version=driver,
        runtime_version=runtime,
    )
