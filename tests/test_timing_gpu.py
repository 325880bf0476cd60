"""The timing harness charges host launch cost where a model pays it (`pytest -m gpu`).

Prompt chunks (M above `GRAPHED_MAX_M`) run eagerly in a model, so a dispatch path made of many
launches must not look as cheap there as its CUDA-graph replay: that is what made a tuned plan
with a chunked reconstruct slower at prefill than the default it had beaten in the tuner."""

from __future__ import annotations

import pytest
import torch
from gemmtune.autotune import timing
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import GRAPHED_MAX_M, Workload

from tests.gpu_util import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


def test_eager_time_counts_the_host_cost_of_many_small_launches() -> None:
    x = torch.zeros(16, device="cuda")

    def call(_: int) -> None:
        for _ in range(40):  # 40 launches of almost no GPU work
            x.add_(1.0)

    graphed = timing.graph_time(call, calls=4, repeats=7).median_us
    eager = timing.eager_time(call, calls=4, repeats=7).median_us
    assert eager > 1.5 * graphed, f"eager {eager:.1f} µs vs graph {graphed:.1f} µs per call"


def test_evaluator_charges_a_chunked_reconstruct_its_launches_at_prefill_ms() -> None:
    from gemmtune.autotune.measure import CudaEvaluator

    prefill = GRAPHED_MAX_M * 2
    assert Workload.eager(prefill) and not Workload.eager(GRAPHED_MAX_M)
    ev = CudaEvaluator(Problem(4096, 4096), Workload("t", (GRAPHED_MAX_M, prefill), (1.0, 1.0)))
    try:
        chunked = KernelConfig(max_q_gemm_rows=0, recon_chunk_n=256)  # 16 kernel + cuBLAS pairs
        at_prefill = ev.recon(chunked, prefill).median_us
        plans = ev._plans(chunked)
        a = torch.randn(prefill, 4096, device="cuda").half()
        gpu = timing.graph_time(lambda i: plans[i % len(plans)](a), calls=len(plans)).median_us
        assert at_prefill > 1.3 * gpu, f"prefill {at_prefill:.1f} µs vs GPU time {gpu:.1f} µs"
        # At a graphed M the same path is GPU time (within noise of a fresh graph measurement).
        at_decode = ev.recon(chunked, GRAPHED_MAX_M).median_us
        a = torch.randn(GRAPHED_MAX_M, 4096, device="cuda").half()
        gpu = timing.graph_time(lambda i: plans[i % len(plans)](a), calls=len(plans)).median_us
        assert at_decode < 1.25 * gpu, f"decode {at_decode:.1f} µs vs GPU time {gpu:.1f} µs"
    finally:
        ev.close()
