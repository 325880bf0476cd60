"""CUDA sources shipped with the package, the compile flags, and `kernel_hash`.

A stored measurement is valid only for the exact code that produced it: `kernel_hash` covers the
sources, the flags and the compiler version, so any change makes older results *stale* (reported,
never served).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

# Flags shared by NVRTC (run time) and nvcc (static check). Tunables are added as template
# arguments, never here.
COMMON_FLAGS: tuple[str, ...] = ("-std=c++17",)


def source_files() -> list[Path]:
    return sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


def read_source(name: str) -> str:
    return (CUDA_DIR / name).read_text()


NO_COMPILER = "unknown"
"""`compiler_version()` where NVRTC does not load (a machine without the CUDA libraries)."""

NVRTC_VERSIONS: tuple[str, ...] = tuple(f"nvrtc-{major}.{minor}" for major in (11, 12, 13, 14)
                                        for minor in range(10))
"""The compiler versions `build_hash` tries where NVRTC does not load."""


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    """NVRTC version as CuPy sees it, or `unknown` where no CUDA toolkit libraries load."""
    try:
        from cupy.cuda import nvrtc

        major, minor = nvrtc.getVersion()
        return f"nvrtc-{major}.{minor}"
    except Exception:
        return NO_COMPILER


def kernel_hash(compiler: str | None = None) -> str:
    """sha256 over every shipped .cu/.cuh file (name and bytes), the common flags and the
    compiler version. Pass `compiler` to compute the hash another machine would get."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(COMMON_FLAGS).encode() + b"\0")
    h.update((compiler or compiler_version()).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _hashes_under_any_compiler(here: str) -> frozenset[str]:
    """These sources' hashes under every NVRTC_VERSIONS compiler; `here` (their hash without a
    compiler) keys the cache to the sources as they are."""
    return frozenset(kernel_hash(c) for c in NVRTC_VERSIONS)


def build_hash(stored: Iterable[str] = (), here: str | None = None) -> str:
    """The kernel hash to judge stored results against: this build's (`kernel_hash()`). Where
    NVRTC does not load, this machine cannot name its compiler, so its own hash matches nothing
    measured on a GPU machine; there the one hash among `stored` that is these very sources and
    flags under some NVRTC version is taken instead (when exactly one is), so that `resolve`,
    `show`, `export` and `import` on a machine without a GPU judge a GPU machine's results by
    the code that measured them. On a machine with NVRTC, `stored` is not even read. `here`:
    `kernel_hash()` when the caller has it already (it reads every source file)."""
    here = here or kernel_hash()
    if compiler_version() != NO_COMPILER:
        return here
    ours = {h for h in stored if h in _hashes_under_any_compiler(here)}
    return ours.pop() if len(ours) == 1 else here
