"""`ProfileValidator`: how the database layer checks imported data against the kernel package.

`gemmtune.db` must not import `gemmtune.kernels`, so profile import takes a validator object; this
is the one implementation, built from the core objects' own constructors, so a profile can hold
nothing the search space does not allow. Each method raises a `GemmtuneError` subclass or
returns the canonical key (or derived value) of what it checked.

On top of what the constructors accept, a profile entry is a *measurement* on this build's
kernels, so it may only name what those kernels run: a bit width without a CUDA kernel
(`KERNEL_BITS`) cannot have been tuned, and a workload that carries a preset's name must be that
preset (otherwise the name would claim Ms and weights it does not have).
"""

from __future__ import annotations

from typing import Any

from .config import KernelConfig
from .device import DeviceInfo
from .errors import InvalidProblemError
from .problem import KERNEL_BITS, Problem
from .workload import WORKLOADS, Workload


def _workload(data: dict[str, Any]) -> Workload:
    wl = Workload.from_dict(data)
    preset = WORKLOADS.get(wl.name)
    if preset is not None and wl != preset:
        raise InvalidProblemError(
            f"name {wl.name!r} is a preset workload, but its ms/weights are not the preset's "
            f"(ms {list(preset.ms)}, weights {[f'{w:g}' for w in preset.weights]}); a custom "
            "workload needs another name (the tuner writes 'custom')")
    return wl


class KernelValidator:
    def problem(self, data: dict[str, Any]) -> str:
        p = Problem.from_dict(data)
        if not p.has_kernel:
            raise InvalidProblemError(
                f"bits={p.bits} has no CUDA kernel in this build (kernels: "
                f"{', '.join(map(str, KERNEL_BITS))} bits), so it cannot have been tuned")
        return p.key()

    def workload(self, data: dict[str, Any]) -> str:
        return _workload(data).key()

    def objective(self, workload: dict[str, Any], latencies_us: dict[int, float]) -> float:
        """The tuning objective the entry's latencies give (`Workload.objective`, the one
        definition), for checking the entry's stored objective against."""
        return _workload(workload).objective(latencies_us)

    def config(self, data: dict[str, Any]) -> str:
        return KernelConfig.from_dict(data).key()

    def device(self, data: dict[str, Any]) -> str:
        return DeviceInfo.from_dict(data).fingerprint
