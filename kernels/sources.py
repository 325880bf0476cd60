"""CUDA sources shipped with the package, the compile flags, and `kernel_hash`.

A stored measurement is valid only for the exact code that produced it: `kernel_hash` covers the
sources, the flags and the compiler version, so any change makes older results *stale* (reported,
never served).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

# Flags shared by NVRTC (run time) and nvcc (static check). Tunables are added as template
# arguments, never here.
COMMON_FLAGS: tuple[str, ...] = ("-std=c++17",)


def source_files() -> list[Path]:
    return sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


def read_source(name: str) -> str:
    return (CUDA_DIR / name).read_text()


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    """NVRTC version as CuPy sees it, or `unknown` where no CUDA toolkit libraries load."""
    try:
        from cupy.cuda import nvrtc

        major, minor = nvrtc.getVersion()
        return f"nvrtc-{major}.{minor}"
    except Exception:
        return "unknown"


def kernel_hash(compiler: str | None = None) -> str:
    """sha256 over every shipped .cu/.cuh file (name and bytes), the common flags and the
    compiler version. Pass `compiler` to compute the hash another machine would get."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(COMMON_FLAGS).encode() + b"\0")
    h.update((compiler or compiler_version()).encode())
    return h.hexdigest()
