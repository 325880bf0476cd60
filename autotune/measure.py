"""`CudaEvaluator`: the GPU implementation of the `Evaluator` the search talks to.

For one (problem, workload) it owns random weights (rotated copies, together larger than L2),
activations per M, and the reference weight. Every kernel variant is checked against the CPU
reference on fresh random data *before* it is timed (a fast wrong kernel must never win), then
timed through CUDA graphs (`timing.graph_time`), plus the host time of issuing it at the Ms a
model runs eagerly (`Workload.eager`: prompt chunks; `timing.eager_time`), so a path's launches
count there. Results are memoised per (variant, M) for the fused kernel and per (chunk, M) for
the reconstruct path, so trials that differ only in the dispatch threshold cost nothing.
Anything that goes wrong with a variant (compile error, launch error, resource limit, wrong
result) becomes a `TrialFailure` with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from gemmtune.kernels import reference
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.device import DeviceInfo, query_device
from gemmtune.kernels.dispatch import Plan, plan_for
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.weights import QuantizedWeight
from gemmtune.kernels.workload import Workload

from . import timing
from .evaluator import Measurement, TrialFailure

GATE_ROWS = 64
"""Rows of A checked against the reference per gate (the kernels treat every M-tile alike, so a
larger M adds nothing a 64-row check does not cover, except time)."""

TIME_BUDGET_S = 1.5
"""Rough GPU seconds one measurement may take; slow variants get fewer calls and repeats."""


class CudaEvaluator:
    def __init__(self, problem: Problem, workload: Workload, device_index: int = 0,
                 seed: int = 0) -> None:
        torch.cuda.set_device(device_index)
        self.problem = problem
        self.workload = workload
        self.device: DeviceInfo = query_device(device_index)
        self.kernel_hash = kernel_hash()
        self._dev = torch.device("cuda", device_index)
        gen = torch.Generator().manual_seed(seed)
        self._tensors = random_gptq(problem.k, problem.n, problem.bits, problem.group_size,
                                    problem.act_order, "v1", generator=gen)
        copies = timing.copies_needed(problem.weight_bytes())
        self._weights = [QuantizedWeight(self._tensors, self._dev) for _ in range(copies)]
        self._w_ref = reference.dequantize(self._tensors, torch.float32).to(self._dev)
        g = torch.Generator(device=self._dev).manual_seed(seed + 1)
        self._acts = {m: torch.randn(m, problem.k, generator=g, device=self._dev).to(torch.float16)
                      for m in workload.ms}
        self._gate_gen = torch.Generator(device=self._dev).manual_seed(seed + 2)
        self._max_fused = max(workload.ms)
        self._fused: dict[tuple[str, int], Measurement] = {}
        self._recon: dict[tuple[int, int], Measurement] = {}
        self._failed: dict[str, str] = {}
        self.measurements = 0

    # -- helpers ---------------------------------------------------------------------------------
    def _plans(self, cfg: KernelConfig) -> list[Plan]:
        return [plan_for(w, cfg) for w in self._weights]

    def _gate(self, plan: Plan, m: int, what: str) -> None:
        rows = min(m, GATE_ROWS)
        # Checking at `rows` exercises the same instance only if rows map like m does.
        if plan.max_rows and m <= plan.max_rows and plan.rows_for(rows) != plan.rows_for(m):
            rows = m
        a = torch.randn(rows, self.problem.k, generator=self._gate_gen, device=self._dev).to(torch.float16)
        out = torch.full((rows, self.problem.n), float("nan"), dtype=torch.float16, device=self._dev)
        plan(a, out)
        torch.cuda.synchronize()
        ref = a.float() @ self._w_ref
        err = reference.relative_error(out.float(), ref)
        tol = (reference.fp32_accum_tolerance(self.problem.k) if rows <= plan.max_rows
               else reference.fp16_tolerance(self.problem.k))
        if not err < tol:
            raise TrialFailure(f"{what}: wrong result at M={rows} (relative error {err:.3g} > {tol:.3g})")

    def _time(self, plans: list[Plan], m: int) -> Measurement:
        a = self._acts[m]
        n = len(plans)
        start = time.perf_counter()
        plans[0](a)
        torch.cuda.synchronize()
        once = time.perf_counter() - start
        calls = timing.CALLS_PER_GRAPH
        repeats = 15
        if once * calls * repeats > TIME_BUDGET_S:
            calls = max(n, 4)
            repeats = 5
        timer = timing.eager_time if self.workload.eager(m) else timing.graph_time
        return timer(lambda i: plans[i % n](a), calls=max(calls, n), repeats=repeats)

    def _measure(self, cfg: KernelConfig, m: int, what: str) -> Measurement:
        if what in self._failed:
            raise TrialFailure(self._failed[what])
        try:
            plans = self._plans(cfg)
            plans[0].prepare((m,))
            self._gate(plans[0], m, what)
            self.measurements += 1
            return self._time(plans, m)
        except TrialFailure as exc:
            self._failed[what] = exc.reason
            raise
        except (GemmtuneError, RuntimeError) as exc:  # compile, launch, resource errors
            reason = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            self._failed[what] = reason
            raise TrialFailure(reason) from exc

    # -- Evaluator -------------------------------------------------------------------------------
    def fused(self, config: KernelConfig, m: int) -> Measurement:
        key = (config.variant_key(), m)
        got = self._fused.get(key)
        if got is None:
            cfg = config.replace(max_q_gemm_rows=min(self._max_fused, 8192), recon_chunk_n=0)
            got = self._fused[key] = self._measure(cfg, m, f"fused {config.variant_key()}")
        return got

    def recon(self, config: KernelConfig, m: int) -> Measurement:
        key = (config.recon_chunk_n, m)
        got = self._recon.get(key)
        if got is None:
            cfg = KernelConfig(max_q_gemm_rows=0, recon_chunk_n=config.recon_chunk_n)
            got = self._recon[key] = self._measure(cfg, m, f"reconstruct chunk {config.recon_chunk_n}")
        return got

    def dispatch(self, config: KernelConfig, check: bool = True) -> dict[int, Measurement]:
        """Whole-dispatch time of `config` at every workload M (fresh, not memoised), each path
        checked against the reference first when `check`."""
        plans = self._plans(config)
        plans[0].prepare(self.workload.ms)
        out: dict[int, Measurement] = {}
        for m in self.workload.ms:
            if check:
                self._gate(plans[0], m, f"dispatch {config.key()}")
            out[m] = self._time(plans, m)
        return out

    def interleaved(self, a: KernelConfig, b: KernelConfig, rounds: int = 5,
                    ms: Sequence[int] | None = None
                    ) -> tuple[dict[int, Measurement], dict[int, Measurement]]:
        out_a: dict[int, Measurement] = {}
        out_b: dict[int, Measurement] = {}
        todo = tuple(self.workload.ms if ms is None else ms)
        pa, pb = self._plans(a), self._plans(b)
        pa[0].prepare(todo)
        pb[0].prepare(todo)
        n = len(pa)
        for m in todo:
            act = self._acts[m]
            ma, mb = timing.time_interleaved(lambda i, act=act: pa[i % n](act),
                                             lambda i, act=act: pb[i % n](act),
                                             calls=max(n, 4), rounds=max(rounds, 3),
                                             eager=self.workload.eager(m))
            out_a[m], out_b[m] = ma, mb
        return out_a, out_b

    def close(self) -> None:
        """Drop the weights, activations and memos (the GPU memory is torch's to reuse)."""
        self._weights, self._acts = [], {}
        self._fused.clear()
        self._recon.clear()
