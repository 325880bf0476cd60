"""The narrow interface between the search and the measurement of kernels.

The search (`study.py`) and bench/compare (`benchmark.py`) see kernels only through an
`Evaluator`: per-M latencies of the fused kernel and of the reconstruct path under a config, the
whole dispatch, and two configs interleaved; they never know CUDA. The GPU
implementation lives in `measure.py`; tests use a synthetic landscape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload


class TrialFailure(Exception):
    """A variant that cannot be used: compile error, launch error, resource limit, or a wrong
    result against the reference. `reason` is stored with the failed trial."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Measurement:
    """Time of one call, in µs: median of repeats and their spread. GPU time (CUDA-graph
    replays), except at the Ms that run eagerly in a model (`Workload.eager`), where it is GPU
    time plus host issue time (`timing.eager_cost`)."""

    median_us: float
    spread_us: float  # interquartile range of the repeats
    repeats: int


class Evaluator(Protocol):
    problem: Problem
    workload: Workload
    device: DeviceInfo
    kernel_hash: str

    def fused(self, config: KernelConfig, m: int) -> Measurement:
        """Fused-kernel time at M rows. Depends only on `config.variant_key()`; memoised per
        (variant, M). Raises TrialFailure."""
        ...

    def recon(self, config: KernelConfig, m: int) -> Measurement:
        """Reconstruct + cuBLAS time at M rows. Depends only on `config.recon_chunk_n`;
        memoised. Raises TrialFailure."""
        ...

    def interleaved(
        self, a: KernelConfig, b: KernelConfig, rounds: int = 5,
        ms: Sequence[int] | None = None,
    ) -> tuple[dict[int, Measurement], dict[int, Measurement]]:
        """Whole-dispatch times of `a` and `b` for every M of the workload (or only `ms`, a
        subset of it: one band of a plan), measured A B A B … on the same card (fresh, not
        memoised): the final check before a winner is stored, and `compare` of two sources."""
        ...

    def dispatch(self, config: KernelConfig, check: bool = True) -> dict[int, Measurement]:
        """Whole-dispatch time of `config` (its own threshold and chunk) at every M of the
        workload, fresh, each path checked against the reference first when `check`:
        `bench`."""
        ...

    def close(self) -> None:
        """Free what the evaluator holds on the GPU (callers call it when done)."""
        ...
