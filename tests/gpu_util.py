"""Shared helpers of the GPU tests: skip reason, reference products on fresh random data."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.gptq import GPTQTensors, random_gptq


def cuda_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


T = TypeVar("T")

requires_gpu = pytest.mark.skipif(not cuda_ok(), reason="needs a CUDA GPU and CuPy (run `pytest -m gpu` on the GPU machine)")


def layer(k: int, n: int, bits: int = 4, group: int = 128, act: bool = False, zf: str = "v1",
          seed: int = 0) -> GPTQTensors:
    return random_gptq(k, n, bits, group, act, zf, generator=torch.Generator().manual_seed(seed))


def reference_product(a: torch.Tensor, t: GPTQTensors, w_ref: torch.Tensor | None = None) -> torch.Tensor:
    """float32 product of `a` (any device) with the CPU-reference dequantized weight, on a's device."""
    if w_ref is None:
        w_ref = reference.dequantize(t, torch.float32).to(a.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a.reshape(-1, t.k).float() @ w_ref
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def capture(call: Callable[[], T], warmups: int = 1) -> tuple[torch.cuda.CUDAGraph, T]:
    """`call()` warmed up on a side stream (compiles, allocates, picks cuBLAS handles outside the
    capture), then captured on the current device: the graph and what the captured call returned
    (its output tensors, which each replay rewrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmups):
            call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def activations(m: int, k: int, seed: int, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, k, generator=g, device=device, dtype=torch.float32).to(torch.float16)


FORMATS = [
    (bits, group, act, zf)
    for bits, group, act, zf in itertools.product((4, 8), (32, 128, -1), (False, True), ("v1", "v2"))
    if not (act and group == -1)
]
"""Every weight format a kernel family must take: bits x group x act-order x zero convention
(act-order needs groups)."""


def check_product(out: torch.Tensor, ref: torch.Tensor, k: int, tol: float | None = None) -> None:
    """`out` (poisoned with NaN before the call) fully written and within `tol` (default: the
    fp32-accumulation tolerance at K) of the float32 reference product."""
    assert not torch.isnan(out).any(), "unwritten (poisoned) outputs remain"
    err = reference.relative_error(out.float().reshape(ref.shape), ref)
    limit = tol if tol is not None else reference.fp32_accum_tolerance(k)
    assert err < limit, f"relative error {err:.2e} over {limit:.2e}"


def check_dispatch(t: GPTQTensors, cfg: KernelConfig, ms: Sequence[int], seed: int) -> None:
    """`dispatch` of `t` under `cfg` at every M of `ms` against the reference, fresh activations
    per M, output poisoned first (every M must take the fused path: fp32 tolerance)."""
    from gemmtune.kernels.dispatch import dispatch
    from gemmtune.kernels.weights import QuantizedWeight

    w = QuantizedWeight(t, "cuda")
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for m in ms:
        a = activations(m, t.k, seed=seed + m)
        out = torch.full((m, t.n), float("nan"), dtype=torch.float16, device="cuda")
        dispatch(a, w, cfg, out=out)
        torch.cuda.synchronize()
        check_product(out, reference_product(a, t, w_ref), t.k)


def check_split_workspace_clean(cfg: KernelConfig) -> None:
    """Split-K partials and counters are restored to zero by the kernel under `cfg` (a split
    config): a second call with other data is still right, and the workspace is all zero after."""
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    t = layer(4096, 512, 4, 128, False, "v1", seed=7)
    plan = plan_for(QuantizedWeight(t, "cuda"), cfg)
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for seed in (1, 2):
        a = activations(40, t.k, seed=seed)
        out = torch.full((40, t.n), float("nan"), dtype=torch.float16, device="cuda")
        plan(a, out)
        torch.cuda.synchronize()
        check_product(out, reference_product(a, t, w_ref), t.k)
    assert not plan.ws.partials.any() and not plan.ws.counters.any()


def check_graph_replay(config_for_split: Callable[[int], KernelConfig], m: int = 48) -> None:
    """Captured once, replayed on new activations written into the captured input: each replay
    matches the reference, split (4 slices) and unsplit, act-order (the gather) included."""
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    for act, split in ((False, 4), (True, 1)):
        t = layer(2048, 768, 4, 128, act, "v1", seed=11 + act)
        plan = plan_for(QuantizedWeight(t, "cuda"), config_for_split(split))
        plan.prepare((m,))
        w_ref = reference.dequantize(t, torch.float32).cuda()
        a = activations(m, t.k, seed=0)
        out = torch.empty((m, t.n), dtype=torch.float16, device="cuda")
        g, _ = capture(lambda p=plan, x=a, o=out: p(x, o))
        for seed in (3, 4):
            a.copy_(activations(m, t.k, seed=seed))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            check_product(out, reference_product(a, t, w_ref), t.k)
