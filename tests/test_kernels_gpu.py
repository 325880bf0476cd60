"""GPU kernels and dispatch against the CPU reference on fresh random data (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.config import PRESETS, KernelConfig, registers_fit
from gemmtune.kernels.errors import InvalidTensorError

from tests.gpu_util import (
    FORMATS,
    activations,
    check_product,
    layer,
    reference_product,
    requires_gpu,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

M_VALUES = [*range(1, 17), 17, 31, 33, 64, 257]


def _weight(t):
    from gemmtune.kernels.weights import QuantizedWeight

    return QuantizedWeight(t, "cuda")


@pytest.mark.parametrize("bits,group,act,zf", FORMATS)
def test_dispatch_formats_all_m(bits: int, group: int, act: bool, zf: str) -> None:
    from gemmtune.kernels.dispatch import dispatch

    k, n = 512, 384
    t = layer(k, n, bits, group, act, zf, seed=bits * 100 + group + act)
    w = _weight(t)
    w_ref = reference.dequantize(t, torch.float32).cuda()
    fused = KernelConfig(max_q_gemm_rows=10_00, max_q_gemm_rows_kernel=8, block_n=64, threads=128)
    recon = KernelConfig(max_q_gemm_rows=0)
    for m in M_VALUES:
        a = activations(m, k, seed=m)
        ref = reference_product(a, t, w_ref)
        for cfg, tol in ((fused, None), (recon, reference.fp16_tolerance(k))):
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            dispatch(a, w, cfg, out=out)
            torch.cuda.synchronize()
            check_product(out, ref, k, tol)


def _variant_sample() -> list[KernelConfig]:
    """Every value of every fused-kernel tunable at least once, plus the presets."""
    out = [PRESETS[name] for name in PRESETS]
    mks = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    bns = (32, 64, 128, 256)
    wks = (1, 2, 4, 8)
    sks = (0, 1, 2, 3, 4, 6, 8, 12, 16)
    us = (1, 2, 4, 8)
    for i in range(max(len(mks), len(sks))):
        mk = mks[i % len(mks)]
        bn = bns[i % len(bns)]
        wk = wks[(i // 2) % len(wks)]
        if bn * wk > 512:
            wk = 512 // bn
        u = us[i % len(us)]
        while not registers_fit(bn * wk, mk, 1):
            wk //= 2
        while u * -(-mk // 8) > 8 or not registers_fit(bn * wk, mk, u):
            u //= 2
        out.append(KernelConfig(max_q_gemm_rows=4096, max_q_gemm_rows_kernel=mk, block_n=bn,
                                threads=bn * wk, split_k=sks[i % len(sks)], k_unroll=u))
    return out


@pytest.mark.parametrize("cfg", _variant_sample(), ids=lambda c: c.variant_key())
def test_fused_variants(cfg: KernelConfig) -> None:
    from gemmtune.kernels.dispatch import dispatch

    for bits, act in ((4, False), (8, True)):
        k, n = 1024, 608  # N not a multiple of any block: exercises the column tail
        t = layer(k, n, bits, 64, act, "v2", seed=cfg.max_q_gemm_rows_kernel + bits)
        w = _weight(t)
        w_ref = reference.dequantize(t, torch.float32).cuda()
        for m in (1, 5, 16, 33, 70):
            a = activations(m, k, seed=1000 + m)
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            dispatch(a, w, cfg, out=out)
            torch.cuda.synchronize()
            check_product(out, reference_product(a, t, w_ref), k)


@pytest.mark.parametrize("k,n", [(5120, 11008), (14336, 4096), (4096, 5120)])
def test_llm_shapes_and_leading_dims(k: int, n: int) -> None:
    from gemmtune.kernels.dispatch import dispatch

    t = layer(k, n, 4, 128, False, "v1", seed=k)
    w = _weight(t)
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for cfg in (PRESETS["default"], PRESETS["exllamav2-0.0.12"], KernelConfig(max_q_gemm_rows=0, recon_chunk_n=2048)):
        for shape in ((1, k), (2, 3, k), (4, 16, k), (300, k)):
            a = activations(int(torch.tensor(shape[:-1]).prod()), k, seed=len(shape)).view(*shape)
            out = dispatch(a, w, cfg)
            assert out.shape == (*shape[:-1], n) and out.dtype == torch.float16
            torch.cuda.synchronize()
            tol = None if a.numel() // k <= cfg.max_q_gemm_rows else reference.fp16_tolerance(k)
            check_product(out, reference_product(a, t, w_ref), k, tol)


def test_cuda_graph_capture_replays_with_new_inputs() -> None:
    from gemmtune.kernels.dispatch import dispatch, plan_for

    k, n = 2048, 1024
    t = layer(k, n, 4, 128, True, "v1", seed=7)
    w = _weight(t)
    w_ref = reference.dequantize(t, torch.float32).cuda()
    cfg = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8, split_k=4)
    plan_for(w, cfg).prepare()
    a_small = activations(4, k, seed=1)
    a_big = activations(64, k, seed=2)
    dispatch(a_small, w, cfg), dispatch(a_big, w, cfg)  # warm: cuBLAS handles, workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out_small = dispatch(a_small, w, cfg)
        out_big = dispatch(a_big, w, cfg)
    for seed in (10, 11, 12):
        a_small.copy_(activations(4, k, seed=seed))
        a_big.copy_(activations(64, k, seed=seed + 100))
        out_small.fill_(float("nan"))
        out_big.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_product(out_small, reference_product(a_small, t, w_ref), k)
        check_product(out_big, reference_product(a_big, t, w_ref), k, reference.fp16_tolerance(k))


def test_split_k_workspace_left_clean_between_calls() -> None:
    """The split-K partial buffer must be all-zero after every call, or the next call is wrong."""
    from gemmtune.kernels.dispatch import dispatch, plan_for

    k, n = 4096, 512
    t = layer(k, n, 4, 128, False, "v2", seed=3)
    w = _weight(t)
    cfg = KernelConfig(max_q_gemm_rows=64, max_q_gemm_rows_kernel=16, split_k=8)
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for m in (3, 16, 40, 64):
        a = activations(m, k, seed=m)
        check_product(dispatch(a, w, cfg), reference_product(a, t, w_ref), k)
    torch.cuda.synchronize()
    ws = plan_for(w, cfg).ws
    assert int(torch.count_nonzero(ws.partials)) == 0
    assert int(torch.count_nonzero(ws.counters)) == 0


def test_bad_inputs_raise_typed_errors() -> None:
    from gemmtune.kernels.dispatch import dispatch

    t = layer(256, 128, 4, 128, False, "v1", seed=1)
    w = _weight(t)
    cfg = PRESETS["default"]
    a = activations(4, 256, seed=0)
    with pytest.raises(InvalidTensorError, match="dtype"):
        dispatch(a.float(), w, cfg)
    with pytest.raises(InvalidTensorError, match="cpu"):
        dispatch(a.cpu(), w, cfg)
    with pytest.raises(InvalidTensorError, match="K=256"):
        dispatch(activations(4, 128, seed=0), w, cfg)
    with pytest.raises(InvalidTensorError, match="contiguous"):
        dispatch(activations(256, 8, seed=0).t(), w, cfg)
