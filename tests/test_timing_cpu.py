"""The eager cost rule of the timing harness, without a GPU."""

from __future__ import annotations

from gemmtune.autotune.evaluator import Measurement
from gemmtune.autotune.timing import eager_cost


def test_an_eager_call_costs_its_gpu_time_plus_its_host_time() -> None:
    """Llama-3-8B's gate+up at a 512-token prompt on an H100 (2026-12-07): reconstruct + cuBLAS in
    7 chunks ran 286 µs on the GPU for ~14 launches of ~20 µs host time each, unchunked 300 µs
    for 2 launches. Alone, the larger of host and GPU time made the chunked path the winner; in
    the model's eager prefill it was 9 ms slower. Under the sum the unchunked path must win."""
    chunked = eager_cost(Measurement(286.0, 3.0, 15), Measurement(14 * 20.0, 10.0, 15))
    whole = eager_cost(Measurement(300.0, 3.0, 15), Measurement(2 * 20.0, 2.0, 15))
    assert whole.median_us < chunked.median_us
    assert chunked.median_us == 286.0 + 280.0
    assert chunked.spread_us == 13.0 and chunked.repeats == 15
