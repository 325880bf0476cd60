"""Typed errors of the kernel layer.

Every bad input a user can hand us (wrong dtype, device, shape, layout, a group size that does
not divide K, an unsupported bit width) raises one of these with a message naming the problem,
before anything reaches the GPU: a CUDA fault would poison the whole process.
"""

from __future__ import annotations


class GemmtuneError(Exception):
    """Base class of every error gemmtune raises on purpose."""


class InvalidProblemError(GemmtuneError, ValueError):
    """A layer shape / quantisation setting the format or the kernels do not allow."""


class UnsupportedFormatError(InvalidProblemError):
    """A checkpoint's `quantization_config` names a format gemmtune does not read (EXL2,
    bitsandbytes, fp8, AWQ's gemv/marlin/exllama versions, mixed bit widths, ...).

    The message is one line naming the field and its value. `exit_code` is 2 because, like a
    usage error, retrying the same command cannot succeed; the CLI exits with it.
    """

    exit_code = 2


class InvalidConfigError(GemmtuneError, ValueError):
    """A KernelConfig field outside the search space."""


class InvalidTensorError(GemmtuneError, ValueError):
    """A tensor of the wrong dtype, device, shape or memory layout."""


class CudaUnavailableError(GemmtuneError, RuntimeError):
    """A GPU path was asked for on a machine without a usable CUDA device / CuPy."""


class KernelBuildError(GemmtuneError, RuntimeError):
    """NVRTC or nvcc refused to build a kernel variant (message carries the compiler log)."""
