"""GPU timing the way DESIGN requires: CUDA graphs, events, L2-defeating rotation, medians.

A Python CuPy launch costs ~20 µs of host time, more than a small GEMV runs, so calls are
captured into a CUDA graph (one call per weight copy, the copies together larger than L2) and
the graph's replays are timed with CUDA events. The result is GPU time per call.

Prefill is the exception (`Workload.eager`): users run it eagerly, because prompt lengths vary
and a graph holds one shape, so there every launch of a path also costs host time (Python,
argument marshalling, the launch API: ~20 µs a CuPy launch). `eager_time` charges a call its GPU
time *plus* its host issue time. Not the larger of the two, which is what a call costs alone:
an eager prefill of a whole model is host-bound at times (Llama-3-8B at 512 tokens on an H100:
26.8 ms for ~20 ms of GPU work), and there every extra launch adds its host time to the step. A
tuned plan that chunked gate+up's reconstruct into 7 kernel + cuBLAS pairs timed level with the
unchunked one when both were measured alone, and made the model's prefill 9 ms slower, about
its 448 extra launches at ~20 µs each (BENCHMARKS.md, H100 2026-12-07).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from .evaluator import Measurement

L2_DEFEAT_BYTES = 150 * 2**20
"""Copies rotated per measurement must total more than this (H100 L2 is 50 MB)."""

CALLS_PER_GRAPH = 20


def copies_needed(bytes_per_copy: int, budget_bytes: int = 8 * 2**30) -> int:
    """Weight copies to rotate through: enough to exceed L2_DEFEAT_BYTES, at least 2, at most
    CALLS_PER_GRAPH, and no more than fit in `budget_bytes`."""
    want = max(2, math.ceil(L2_DEFEAT_BYTES / max(bytes_per_copy, 1)))
    fit = max(1, budget_bytes // max(bytes_per_copy, 1))
    return int(max(1, min(want, CALLS_PER_GRAPH, fit)))


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def _capture(call: Callable[[int], object], calls: int) -> torch.cuda.CUDAGraph:
    """Run `call(0..calls-1)` once eagerly on a side stream (compiles, allocates, warms cuBLAS),
    then capture the same calls into a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            call(i)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            call(i)
    return graph


def graph_time(call: Callable[[int], object], calls: int = CALLS_PER_GRAPH, repeats: int = 15,
               warmup: int = 2) -> Measurement:
    """Per-call GPU time of `call(i)` for i in 0..calls-1, captured once and replayed.

    `call(i)` must launch its work on torch's current stream and use copy `i % copies` of its
    data. It is run once eagerly first (compiles, allocates, warms cuBLAS) outside the capture.
    """
    return _timed([_capture(call, calls).replay], calls, repeats, warmup)[0]


def host_issue_time(call: Callable[[int], object], calls: int = CALLS_PER_GRAPH,
                    repeats: int = 15) -> Measurement:
    """Host time to issue one `call(i)` (Python, argument marshalling, the launch API), per call:
    `calls` calls issued back to back on torch's current stream, the GPU drained between batches
    so that no launch waits for room in the queue."""
    xs: list[float] = []
    torch.cuda.synchronize()
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            call(i)
        xs.append((time.perf_counter() - start) * 1e6 / calls)
        torch.cuda.synchronize()
    return Measurement(statistics.median(xs), _iqr(xs), repeats)


def eager_cost(gpu: Measurement, host: Measurement) -> Measurement:
    """What a call costs in an eager forward: its GPU time plus its host issue time (the module
    docstring says why the sum and not the larger of the two)."""
    return Measurement(gpu.median_us + host.median_us, gpu.spread_us + host.spread_us,
                       min(gpu.repeats, host.repeats))


def eager_time(call: Callable[[int], object], calls: int = CALLS_PER_GRAPH, repeats: int = 15,
               warmup: int = 2) -> Measurement:
    """Cost of `call(i)` in an eager forward: `eager_cost` of its graph-replayed GPU time and its
    host issue time. Same contract as `graph_time` (torch's current stream, copy `i % copies`)."""
    gpu = graph_time(call, calls, repeats, warmup)
    return eager_cost(gpu, host_issue_time(call, calls, repeats))


def _timed(runs: list[Callable[[], None]], calls: int, rounds: int, warmup: int) -> list[Measurement]:
    """Time each of `runs` (a batch of `calls` calls) A B A B … `rounds` times on a private
    stream, events around each batch; per-call medians."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    out: list[list[float]] = [[] for _ in runs]
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for run in runs:
                run()
        stream.synchronize()
        for _ in range(rounds):
            for idx, run in enumerate(runs):
                start.record(stream)
                run()
                end.record(stream)
                end.synchronize()
                out[idx].append(start.elapsed_time(end) * 1000.0 / calls)
    return [Measurement(statistics.median(xs), _iqr(xs), rounds) for xs in out]


def time_interleaved(calls_a: Callable[[int], object], calls_b: Callable[[int], object],
                     calls: int = CALLS_PER_GRAPH, rounds: int = 15,
                     eager: bool = False) -> tuple[Measurement, Measurement]:
    """Time two alternatives A B A B … (same card, same conditions): for the final check of a
    tuned winner against the default, where drift between two separate runs would bias it.
    Graph replays; with `eager` each side is also charged its host issue time (`eager_cost`)."""
    a, b = _timed([_capture(fn, calls).replay for fn in (calls_a, calls_b)], calls, rounds, 1)
    if eager:
        a = eager_cost(a, host_issue_time(calls_a, calls, rounds))
        b = eager_cost(b, host_issue_time(calls_b, calls, rounds))
    return a, b


def read_bandwidth_tbps(nbytes: int = 2 * 2**30) -> float:
    """What a kernel can read from device memory, in TB/s: `kernels/cuda/stream_read.cu`
    streaming `nbytes` with 16-byte loads, timed like every GEMM here (CUDA-graph replays).

    This is the ceiling of every roofline and "% of floor" figure: a weight-streaming GEMV is a
    read stream. On an H200 it measures 4.35 TB/s, while a torch `copy_` captured in a graph
    runs at 2.77 TB/s (read + write), which would inflate efficiencies by up to 1.57x."""
    from gemmtune.kernels import compile as ck

    words = nbytes // 16
    src = torch.randint(-(2**31), 2**31 - 1, (words * 4,), dtype=torch.int32, device="cuda")
    variant = ck.StreamReadVariant()
    fn = ck.get_kernel(variant, torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    grid = (sms * ck.blocks_per_sm(fn, variant.threads), 1, 1)
    sink = torch.zeros(grid[0], dtype=torch.int32, device="cuda")
    args = (ck.ptr(src.data_ptr()), ck.i64(words), ck.ptr(sink.data_ptr()))

    def call(_: int) -> None:
        ck.launch(fn, grid, variant.threads, args, torch.cuda.current_stream().cuda_stream)

    m = graph_time(call, calls=5, repeats=10)
    return words * 16 / (m.median_us * 1e-6) / 1e12


def copy_bandwidth_tbps(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s, of a torch
    `copy_` captured in a CUDA graph. Kept for comparison only: graph-captured copies run well
    under what kernels read (see `read_bandwidth_tbps`, the ceiling to use)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    m = graph_time(lambda i: dst.copy_(src), calls=5, repeats=10)
    return 2 * src.numel() * 2 / (m.median_us * 1e-6) / 1e12


def fp16_matmul_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    m = graph_time(lambda i: torch.mm(a, b), calls=5, repeats=10)
    return 2 * size**3 / (m.median_us * 1e-6) / 1e12
