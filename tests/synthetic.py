"""A synthetic objective landscape behind the `Evaluator` protocol (a test fixture, not a product
path): the search logic is tested on CPU against a function whose optimum is known.

Landscape: the fused kernel's time at M is `factor(variant) * (fused_base + fused_per_row * M)`,
where `factor` is 1 at `optimum` and grows by `step` per choice-index step away from it in every
field, so the optimum variant is the unique fastest at every M. The reconstruct path costs
`recon_base + recon_per_row * M`, scaled by `chunk_factor[chunk]`. With the defaults the fused
path wins below M ~ 30 and reconstruct above it, as on a real card.

Every miss of the memo is counted (`calls`, `fused_measured`), so tests can prove that a resumed
study does not measure finished variants again.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gemmtune.autotune.evaluator import Measurement, TrialFailure
from gemmtune.kernels.config import TUNABLES, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload

FAKE_DEVICE = DeviceInfo(
    vendor="nvidia", name="Synthetic GPU", compute_capability="9.0", sm_count=132,
    memory_bytes=80 * 2**30, driver_version="13.0", runtime_version="13.0",
)
FAKE_KERNEL_HASH = hashlib.sha256(b"synthetic kernels").hexdigest()

_CHOICES = {t.name: t.choices for t in TUNABLES}


@dataclass(frozen=True)
class Landscape:
    optimum: KernelConfig = KernelConfig(max_q_gemm_rows_kernel=8, block_n=128, threads=256,
                                         split_k=2, k_unroll=2)
    step: float = 0.15
    fused_base: float = 4.0
    fused_per_row: float = 1.0
    recon_base: float = 30.0
    recon_per_row: float = 0.05
    chunk_factor: dict[int, float] = field(default_factory=lambda: {4096: 0.8})

    def factor(self, c: KernelConfig) -> float:
        o = self.optimum
        d = 0.0
        for name in ("max_q_gemm_rows_kernel", "split_k", "k_unroll"):
            ch = _CHOICES[name]
            d += abs(ch.index(getattr(c, name)) - ch.index(getattr(o, name)))
        d += abs(math.log2(c.block_n) - math.log2(o.block_n))
        d += abs(math.log2(c.threads) - math.log2(o.threads))
        return 1.0 + self.step * d

    def fused(self, c: KernelConfig, m: int) -> float:
        return self.factor(c) * (self.fused_base + self.fused_per_row * m)

    def recon(self, c: KernelConfig, m: int) -> float:
        return self.chunk_factor.get(c.recon_chunk_n, 1.0) * (self.recon_base + self.recon_per_row * m)

    def dispatch(self, c: KernelConfig, m: int) -> float:
        return self.fused(c, m) if m <= c.max_q_gemm_rows else self.recon(c, m)


class SyntheticEvaluator:
    """Deterministic `Evaluator` over a `Landscape`.

    fail: variant -> reason (or None) for the fused kernel; `fail_chunks` make reconstruct fail.
    noise: relative, deterministic per (key, M, seed). interleave_penalty multiplies the first
    config's latencies in `interleaved` (a winner that turns out slower on re-measurement).
    on_fused: hook called before each fused measurement (e.g. to raise KeyboardInterrupt).
    """

    def __init__(
        self,
        problem: Problem,
        workload: Workload,
        landscape: Landscape | None = None,
        *,
        fail: Callable[[KernelConfig], str | None] | None = None,
        fail_chunks: frozenset[int] = frozenset(),
        noise: float = 0.0,
        seed: int = 0,
        interleave_penalty: float = 1.0,
        device: DeviceInfo = FAKE_DEVICE,
        kernel_hash: str = FAKE_KERNEL_HASH,
        on_fused: Callable[[KernelConfig, int], None] | None = None,
    ) -> None:
        self.problem = problem
        self.workload = workload
        self.device = device
        self.kernel_hash = kernel_hash
        self.landscape = landscape or Landscape()
        self.fail = fail
        self.fail_chunks = fail_chunks
        self.noise = noise
        self.seed = seed
        self.interleave_penalty = interleave_penalty
        self.on_fused = on_fused
        self.calls: Counter[str] = Counter()
        self.fused_measured: list[tuple[str, int]] = []
        self.interleaved_ms: list[tuple[KernelConfig, int]] = []  # (side A's config, M)
        self._fused: dict[tuple[str, int], Measurement] = {}
        self._recon: dict[tuple[int, int], Measurement] = {}
        self.closed = False

    def _jitter(self, key: str, m: int) -> float:
        if not self.noise:
            return 1.0
        h = hashlib.sha256(f"{key}|{m}|{self.seed}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        return 1.0 + self.noise * (2 * u - 1)

    def fused(self, config: KernelConfig, m: int) -> Measurement:
        key = (config.variant_key(), m)
        if key not in self._fused:
            if self.on_fused is not None:
                self.on_fused(config, m)
            self.calls["fused"] += 1
            self.fused_measured.append(key)
            reason = self.fail(config) if self.fail else None
            if reason:
                raise TrialFailure(reason)
            t = self.landscape.fused(config, m) * self._jitter(key[0], m)
            self._fused[key] = Measurement(t, 0.01 * t, 20)
        return self._fused[key]

    def recon(self, config: KernelConfig, m: int) -> Measurement:
        key = (config.recon_chunk_n, m)
        if key not in self._recon:
            self.calls["recon"] += 1
            if config.recon_chunk_n in self.fail_chunks:
                raise TrialFailure(f"recon chunk {config.recon_chunk_n} out of memory")
            t = self.landscape.recon(config, m) * self._jitter(f"rc{key[0]}", m)
            self._recon[key] = Measurement(t, 0.01 * t, 20)
        return self._recon[key]

    def interleaved(
        self, a: KernelConfig, b: KernelConfig, rounds: int = 5, ms: Any = None
    ) -> tuple[dict[int, Measurement], dict[int, Measurement]]:
        self.calls["interleaved"] += 1
        todo = self.workload.ms if ms is None else tuple(ms)
        self.interleaved_ms.extend((a, m) for m in todo)
        ra = {m: Measurement(self.landscape.dispatch(a, m) * self.interleave_penalty, 0.0, rounds)
              for m in todo}
        rb = {m: Measurement(self.landscape.dispatch(b, m), 0.0, rounds) for m in todo}
        return ra, rb

    def close(self) -> None:
        self.closed = True
