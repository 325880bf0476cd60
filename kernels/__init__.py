"""gemmtune.kernels: GPTQ and AWQ formats, CPU reference math, CUDA sources, compile + launch, dispatch.

Imports nothing from the other gemmtune areas. CuPy and the GPU are touched lazily, so this
package imports on machines without either.
"""

if __name__ != "gemmtune.kernels":  # imported as top-level `kernels`: not ours to answer
    from gemmtune._toplevel import hand_over

    hand_over(__name__, __file__)
else:
    from .config import PRESETS, TUNABLES, KernelConfig, preset
    from .device import DeviceInfo
    from .errors import (
        CudaUnavailableError,
        GemmtuneError,
        InvalidConfigError,
        InvalidProblemError,
        InvalidTensorError,
        KernelBuildError,
        UnsupportedFormatError,
    )
    from .problem import Problem
    from .workload import WORKLOADS, Workload

    __all__ = [
        "PRESETS",
        "TUNABLES",
        "WORKLOADS",
        "CudaUnavailableError",
        "DeviceInfo",
        "GemmtuneError",
        "InvalidConfigError",
        "InvalidProblemError",
        "InvalidTensorError",
        "KernelBuildError",
        "KernelConfig",
        "Problem",
        "UnsupportedFormatError",
        "Workload",
        "preset",
    ]
