"""`ProfileValidator`: how the database layer checks imported data against the kernel package.

`gemmtune.db` must not import `gemmtune.kernels`, so profile import takes a validator object; this
is the one implementation, built from the core objects' own constructors, so a profile can hold
nothing the search space does not allow. Each method raises a `GemmtuneError` subclass or
returns the canonical key of what it checked.
"""

from __future__ import annotations

from typing import Any

from .config import KernelConfig
from .device import DeviceInfo
from .problem import Problem
from .workload import Workload


class KernelValidator:
    def problem(self, data: dict[str, Any]) -> str:
        return Problem.from_dict(data).key()

    def workload(self, data: dict[str, Any]) -> str:
        return Workload.from_dict(data).key()

    def config(self, data: dict[str, Any]) -> str:
        return KernelConfig.from_dict(data).key()

    def device(self, data: dict[str, Any]) -> str:
        return DeviceInfo.from_dict(data).fingerprint
