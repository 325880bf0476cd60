"""Compile + launch: the narrow backend API the rest of gemmtune sees kernels through.

`get_kernel(variant, device)` builds one template instance of a shipped `.cu` file with NVRTC
(through `cupy.RawModule`), once per process and device; CuPy keeps the binary in its disk
cache across processes. `launch(...)` runs it on a given CUDA stream handle (torch's current
stream) with no per-call context manager and no allocation, so it is cheap on the host and
records into CUDA graphs.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CudaUnavailableError, KernelBuildError
from .sources import COMMON_FLAGS, CUDA_DIR, read_source


@dataclass(frozen=True)
class FusedVariant:
    """One compiled instance of the fused kernel (`kernels/cuda/gptq_gemm.cu`)."""

    bits: int
    m_count: int
    warps_n: int
    warps_k: int
    unroll: int
    act_order: bool
    split: bool

    source = "gptq_gemm.cu"

    @property
    def threads(self) -> int:
        return 32 * self.warps_n * self.warps_k

    def expression(self) -> str:
        b = lambda v: "true" if v else "false"  # noqa: E731
        return (
            f"gemmtune::gptq_gemm<{self.bits},{self.m_count},{self.warps_n},{self.warps_k},"
            f"{self.unroll},{b(self.act_order)},{b(self.split)}>"
        )

    def signature(self) -> str:
        return ("const half*, const uint32_t*, const half2*, const int*, half*, float*, int*, "
                "int, int, int, int")


@dataclass(frozen=True)
class TiledVariant:
    """One compiled instance of the tiled kernel (`kernels/cuda/gptq_tiled_gemm.cu`)."""

    bits: int
    warps_m: int
    mt: int
    warps_n: int
    nw: int
    ks: int
    stages: int
    split: bool

    source = "gptq_tiled_gemm.cu"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def tile_m(self) -> int:
        return 8 * self.mt * self.warps_m

    @property
    def tile_n(self) -> int:
        return 32 * self.nw * self.warps_n

    @property
    def tile_k(self) -> int:
        return self.ks * 4 * (32 // self.bits)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one block (the launch asks for exactly this)."""
        from .config import tiled_smem_bytes

        return tiled_smem_bytes(self.bits, self.tile_m, self.tile_n, self.tile_k, self.stages)

    def expression(self) -> str:
        return (
            f"gemmtune::gptq_tiled_gemm<{self.bits},{self.warps_m},{self.mt},{self.warps_n},"
            f"{self.nw},{self.ks},{self.stages},{'true' if self.split else 'false'}>"
        )

    def signature(self) -> str:
        return "const half*, const uint32_t*, const half2*, half*, float*, int*, int, int, int, int"


@dataclass(frozen=True)
class WgmmaVariant:
    """One compiled instance of the wgmma kernel (`kernels/cuda/gptq_wgmma_gemm.cu`, sm_90a)."""

    bits: int
    wgm: int
    wgn: int
    tn: int
    ks: int
    stages: int
    split: bool

    source = "gptq_wgmma_gemm.cu"
    arch = "sm_90a"
    """Built for exactly this target (NVRTC's `--gpu-architecture`), not the card's default."""

    @property
    def threads(self) -> int:
        return 128 * self.wgm * self.wgn

    @property
    def tile_m(self) -> int:
        return self.wgm * self.tn

    @property
    def tile_n(self) -> int:
        return 128 * self.wgn

    @property
    def tile_k(self) -> int:
        return self.ks * 4 * (32 // self.bits)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one block (the launch asks for exactly this)."""
        from .config import wgmma_smem_bytes

        return wgmma_smem_bytes(self.bits, self.tile_m, self.tile_n, self.tile_k, self.stages)

    def expression(self) -> str:
        return (
            f"gemmtune::gptq_wgmma_gemm<{self.bits},{self.wgm},{self.wgn},{self.tn},{self.ks},"
            f"{self.stages},{'true' if self.split else 'false'}>"
        )

    def signature(self) -> str:
        return "const half*, const uint32_t*, const half2*, half*, float*, int*, int, int, int, int"


@dataclass(frozen=True)
class ReconVariant:
    """One compiled instance of the reconstruct kernel (`kernels/cuda/gptq_reconstruct.cu`)."""

    bits: int
    act_order: bool

    source = "gptq_reconstruct.cu"
    threads = 256

    def expression(self) -> str:
        return f"gemmtune::gptq_reconstruct<{self.bits},{'true' if self.act_order else 'false'}>"

    def signature(self) -> str:
        return "const uint32_t*, const half2*, const int*, half*, int, int, int, int, int, int"


@dataclass(frozen=True)
class StreamReadVariant:
    """The read-bandwidth probe (`kernels/cuda/stream_read.cu`): the ceiling of every roofline."""

    unroll: int = 4

    source = "stream_read.cu"
    threads = 256

    def expression(self) -> str:
        return f"gemmtune::stream_read<{self.unroll}>"

    def signature(self) -> str:
        return "const uint4*, long long, uint32_t*"


@dataclass(frozen=True)
class StreamVariant:
    """One compiled instance of the stream kernel (`kernels/cuda/gptq_stream_gemm.cu`): one CTA
    per K slice (`cluster` = 1, sm_80+) or a thread-block cluster of `cluster` CTAs (sm_90)."""

    bits: int
    warps: int
    chunk: int
    slots: int
    act_order: bool
    cluster: int

    source = "gptq_stream_gemm.cu"
    smem_bytes = 0
    """Its dynamic shared memory depends on the layer and M (rows of A): `kernels.stream` opts
    each function in to the card's limit and launches with what a launch needs."""

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def expression(self) -> str:
        args = (f"{self.bits},{self.warps},{self.chunk},{self.slots},"
                f"{'true' if self.act_order else 'false'}")
        if self.cluster == 1:
            return f"gemmtune::gptq_stream_gemm<{args}>"
        return f"gemmtune::gptq_stream_gemm_cluster<{args},{self.cluster}>"

    def signature(self) -> str:
        return "const half*, const uint32_t*, const half2*, const int*, half*, int, int, int, int"


Variant = FusedVariant | TiledVariant | WgmmaVariant | ReconVariant | StreamReadVariant | StreamVariant

_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
"""CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (the CUDA driver API's enum value)."""

_lock = threading.Lock()
_functions: dict[tuple[str, int], Any] = {}
_modules: list[Any] = []


def nvrtc_options() -> tuple[str, ...]:
    return (*COMMON_FLAGS, f"-I{CUDA_DIR}")


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CudaUnavailableError(
            "CuPy is not installed: pip install 'gemmtune[cuda13]' (or [cuda12])"
        ) from exc
    return cupy


def get_kernel(variant: Variant, device: int = 0) -> Any:
    """The launchable `cupy.cuda.Function` of `variant` on `device` (compiled on first use, and
    allowed the dynamic shared memory it launches with)."""
    key = (variant.expression(), device)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cupy = _cupy()
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        try:
            with cupy.cuda.Device(device):
                arch = getattr(variant, "arch", None)
                if arch is not None:
                    fn = _build_for_arch(variant, arch)
                else:
                    module = cupy.RawModule(
                        code=read_source(variant.source),
                        options=nvrtc_options(),
                        name_expressions=[variant.expression()],
                    )
                    kernel = module.get_function(variant.expression())
                    fn = getattr(kernel, "kernel", kernel)  # RawKernel -> cupy.cuda.Function
                allow_shared_memory(fn, variant)
        except cupy.cuda.compiler.CompileException as exc:
            raise KernelBuildError(f"{variant.expression()} failed to compile:\n{exc}") from exc
        except cupy.cuda.driver.CUDADriverError as exc:
            raise KernelBuildError(f"{variant.expression()} failed to load: {exc}") from exc
        _functions[key] = fn
    return fn


def cuda_include_dirs() -> list[str]:
    """Directories holding the CUDA toolkit headers (cuda_fp16.h) for an NVRTC build CuPy does not
    drive: wherever CuPy or cuda-pathfinder would find them (a pip CUDA 13 install keeps them
    beside NVRTC, a system toolkit under its root), each kept only if cuda_fp16.h is there."""
    import os

    found: list[str] = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found.append(find_nvidia_header_directory("cudart") or "")
    except Exception:  # noqa: BLE001 - pathfinder absent or of another version: other places
        pass
    try:
        import cupy

        found.append(os.path.join(cupy.cuda.get_cuda_path() or "", "include"))
    except Exception:  # noqa: BLE001 - no CuPy or no CUDA root it knows of
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            found.append(os.path.join(os.environ[var], "include"))
    found.append("/usr/local/cuda/include")
    out: list[str] = []
    for d in found:
        if d and os.path.isfile(os.path.join(d, "cuda_fp16.h")) and d not in out:
            out.append(d)
    return out


def nvrtc_cubin(variant: Variant, arch: str) -> tuple[bytes, str]:
    """(cubin, lowered kernel name) of `variant` built by NVRTC for exactly `arch` (e.g.
    `sm_90a`), through CuPy's NVRTC bindings; needs no GPU. KernelBuildError with NVRTC's log
    when it does not compile.

    `cupy.RawModule` always appends the card's own `-arch=sm_XY` to the options, and NVRTC
    rejects a second architecture option (NVRTC_ERROR_INVALID_OPTION), so an arch-specific
    ("a") build cannot go through it: the same NVRTC is driven directly instead, with CuPy's
    flags and the CUDA header directories (`cuda_include_dirs`)."""
    from cupy.cuda import nvrtc

    options = [*nvrtc_options(), f"--gpu-architecture={arch}", "-ftz=true",
               "--device-as-default-execution-space", *(f"-I{d}" for d in cuda_include_dirs())]
    name = variant.expression()
    prog = nvrtc.createProgram(read_source(variant.source), variant.source, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise KernelBuildError(f"{name} failed to compile for {arch}:\n"
                                   f"{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getCUBIN(prog), nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)


def _build_for_arch(variant: Variant, arch: str) -> Any:
    """`nvrtc_cubin` loaded as a CuPy module in the current device's context. CuPy's disk cache
    does not apply: each process compiles such a variant once (~0.3 s)."""
    from cupy.cuda import function

    cubin, lowered = nvrtc_cubin(variant, arch)
    module = function.Module()
    module.load(cubin)
    _modules.append(module)  # kept for the process: its functions must not outlive it
    return module.get_function(lowered)


def allow_shared_memory(fn: Any, variant: Variant) -> None:
    """Opt `fn` into exactly the dynamic shared memory `variant` launches with (past 48 KB, static
    shared memory included, a launch fails without it); nothing for variants without any."""
    smem = int(getattr(variant, "smem_bytes", 0))
    if smem:
        _cupy().cuda.driver.funcSetAttribute(fn.ptr, _MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)


class StreamRef:
    """The one attribute CuPy's launcher reads from a stream object: its handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


_streams: dict[int, StreamRef] = {}


def stream_ref(handle: int) -> StreamRef:
    ref = _streams.get(handle)
    if ref is None:
        ref = _streams[handle] = StreamRef(handle)
    return ref


def launch(fn: Any, grid: tuple[int, int, int], block: int, args: tuple[Any, ...],
           stream: int, shared_mem: int = 0) -> None:
    """Launch on the CUDA stream `stream` (a raw handle, e.g. torch's `cuda_stream`) with
    `shared_mem` bytes of dynamic shared memory."""
    fn(grid, (block, 1, 1), args, shared_mem=shared_mem, stream=stream_ref(stream))


def blocks_per_sm(fn: Any, threads: int, shared_mem: int = 0) -> int:
    """Resident blocks per SM for `fn` at `threads` threads and `shared_mem` bytes of dynamic
    shared memory (driver occupancy query, or an estimate from the register and shared-memory
    use when the driver API is not exposed)."""
    try:
        from cupy.cuda import driver

        return max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, shared_mem)))
    except Exception:
        regs = max(1, int(getattr(fn, "num_regs", 64)))
        smem = int(getattr(fn, "shared_size_bytes", 0)) + shared_mem
        warps = -(-threads // 32)
        by_regs = 65536 // (((regs * 32 + 255) // 256) * 256 * warps)
        by_smem = (228 * 1024) // smem if smem else 32
        return max(1, min(by_regs, by_smem, 2048 // threads, 32))


_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
"""CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED (the CUDA driver API's enum value)."""


def allow_dynamic_shared_memory(fn: Any, nbytes: int, cluster: int = 1) -> None:
    """Let `fn` launch with up to `nbytes` of dynamic shared memory (for kernels whose need
    varies by launch), and with clusters past the portable 8 CTAs when `cluster` asks for them."""
    driver = _cupy().cuda.driver
    driver.funcSetAttribute(fn.ptr, _MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes))
    if cluster > 8:
        driver.funcSetAttribute(fn.ptr, _NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig of the CUDA driver API (cuda.h, CUDA 12 and 13)."""

    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]


_libcuda: list[Any] = []


def max_active_clusters(fn: Any, cluster: int, threads: int, shared_mem: int) -> int | None:
    """Clusters of `fn` (whose cluster shape is compiled in) resident on the GPU at once with
    `threads` threads and `shared_mem` bytes of dynamic shared memory per CTA: the driver's
    cuOccupancyMaxActiveClusters, which knows how clusters pack into the GPU's processor clusters
    (CuPy does not wrap it, so it is called through ctypes). None where the driver cannot say."""
    try:
        if not _libcuda:
            _libcuda.append(ctypes.CDLL("libcuda.so.1"))
        lib = _libcuda[0]
        cfg = _LaunchConfig(cluster, 1, 1, threads, 1, 1, shared_mem, None, None, 0)
        out = ctypes.c_int(0)
        rc = lib.cuOccupancyMaxActiveClusters(ctypes.byref(out), ctypes.c_void_p(fn.ptr),
                                              ctypes.byref(cfg))
        return int(out.value) if rc == 0 else None
    except (OSError, AttributeError):
        return None


def ptr(value: int) -> np.uint64:
    return np.uint64(value)


def i32(value: int) -> np.int32:
    return np.int32(value)


def i64(value: int) -> np.int64:
    return np.int64(value)
