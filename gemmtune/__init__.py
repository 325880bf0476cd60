"""gemmtune: tune quantized GEMM kernel parameters per GPU and layer shape, store the winners,
look them up at model load.

The public API re-exports the core objects; heavy modules (CUDA, database) load lazily.
"""

from __future__ import annotations

import os as _os


def _serve_areas_from_the_checkout() -> None:
    """In a checkout, `gemmtune.kernels`, `gemmtune.db`, … are the root's area folders.

    Python started in the checkout finds this folder as `gemmtune` ahead of any installed copy. An
    editable install maps the areas itself; without one (a wheel installed with `pip install .`, a
    bare checkout) nothing would, and `import gemmtune` died on `gemmtune.kernels`. So the checkout
    root joins this package's path, which is the same mapping `package-dir` in pyproject.toml makes
    (here `gemmtune.bench` and `gemmtune.tests` resolve too; nothing imports them). An installed
    package holds its areas beside this file, and is left alone."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if not _os.path.isdir(_os.path.join(here, "kernels")) and _os.path.isfile(_os.path.join(root, "pyproject.toml")):
        __path__.append(root)


_serve_areas_from_the_checkout()

from gemmtune.kernels.config import PRESETS, KernelConfig, preset  # noqa: E402 (after the areas are on __path__)
from gemmtune.kernels.device import DeviceInfo  # noqa: E402 (after the areas are on __path__)
from gemmtune.kernels.errors import GemmtuneError  # noqa: E402 (after the areas are on __path__)
from gemmtune.kernels.problem import Problem  # noqa: E402 (after the areas are on __path__)
from gemmtune.kernels.workload import WORKLOADS, Workload  # noqa: E402 (after the areas are on __path__)


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
