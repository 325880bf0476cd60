"""The stream decode kernel (kernels/cuda/gptq_stream_gemm.cu) through the dispatch, against the
CPU reference on fresh random data, outputs poisoned first (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.config import STREAM, STREAM_ROWS, KernelConfig
from gemmtune.kernels.errors import InvalidConfigError

from tests.gpu_util import (
    FORMATS,
    activations,
    capture,
    check_product,
    layer,
    reference_product,
    requires_gpu,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

# Every row count one launch takes, the band edge of an 8-row band (8, 9) and past it, where a
# call is several launches of STREAM_ROWS rows (16 = two full ones, 17 = a 1-row remainder).
M_VALUES = [*range(1, STREAM_ROWS + 1), STREAM_ROWS + 1, 2 * STREAM_ROWS, 2 * STREAM_ROWS + 1]


def stream(wn: int = 1, wk: int = 8, chunk: int = 8, slots: int = 2, split_k: int = 1,
           max_rows: int = 64) -> KernelConfig:
    return KernelConfig(max_q_gemm_rows=max_rows, kernel=STREAM, stream_warps_n=wn, stream_warps_k=wk,
                        stream_chunk=chunk, stream_slots=slots, split_k=split_k)


def _sm90() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


def _run_all_m(t, cfg: KernelConfig, ms=M_VALUES) -> None:  # noqa: ANN001
    from gemmtune.kernels.dispatch import dispatch
    from gemmtune.kernels.weights import QuantizedWeight

    w = QuantizedWeight(t, "cuda")
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for m in ms:
        a = activations(m, t.k, seed=31 * m + t.k)
        out = torch.full((m, t.n), float("nan"), dtype=torch.float16, device="cuda")
        dispatch(a, w, cfg, out=out)
        torch.cuda.synchronize()
        tol = None if m <= cfg.max_q_gemm_rows else reference.fp16_tolerance(t.k)
        check_product(out, reference_product(a, t, w_ref), t.k, tol)


@pytest.mark.parametrize("bits,group,act,zf", FORMATS)
def test_stream_formats_every_m(bits: int, group: int, act: bool, zf: str) -> None:
    """4- and 8-bit, every group size, act-order, both zero conventions; N not a multiple of 32
    (the last tile is partial) and, with two tiles a block, a last unit with an empty tile."""
    k = 1024
    n = 200 if bits == 4 else 196
    t = layer(k, n, bits, group, act, zf, seed=bits * 10 + group + act)
    _run_all_m(t, stream(wn=1, wk=8, chunk=8, slots=2, split_k=1))
    _run_all_m(t, stream(wn=2, wk=2, chunk=4, slots=3, split_k=2 if _sm90() else 1), ms=(1, 3, 8, 9))


@pytest.mark.parametrize("split_k", [0, 1, 2, 4, 8])
def test_stream_clusters_and_uneven_slices(split_k: int) -> None:
    """K slices across the CTAs of a cluster (reduced through distributed shared memory), slices
    that do not divide the steps, warps left without a step (20 steps over up to 8 x 8 warps)."""
    if split_k > 1 and not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    t = layer(640, 1056, 4, 128, False, "v1", seed=split_k)
    _run_all_m(t, stream(wn=1, wk=8, chunk=2, slots=3, split_k=split_k))
    t8 = layer(4096, 1024, 4, 128, True, "v1", seed=100 + split_k)
    _run_all_m(t8, stream(wn=1, wk=8, chunk=8, slots=2, split_k=split_k), ms=(1, 2, 5, 8))


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_stream_runs_cross_tiles_and_every_cta_takes_several(split_k: int) -> None:
    """263 tiles (the last one partial) on at most 132 CTAs: a cluster takes several tiles, and
    warp runs begin and end inside tiles and inside chunks (20 steps a tile, chunks of 8 cut at
    8, 16, 20). 4- and 8-bit; two calls give the same bits (the reduction has a fixed order)."""
    if split_k > 1 and not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    from gemmtune.kernels.dispatch import dispatch
    from gemmtune.kernels.weights import QuantizedWeight

    for bits in (4, 8):
        k = 640 if bits == 4 else 320
        t = layer(k, 263 * 32 - 8, bits, 64, False, "v2", seed=split_k + bits)
        cfg = stream(wn=1, wk=8, chunk=8, slots=2, split_k=split_k)
        _run_all_m(t, cfg, ms=(1, 3, 8))
        w = QuantizedWeight(t, "cuda")
        a = activations(8, k, seed=3)
        first = dispatch(a, w, cfg).clone()
        assert torch.equal(dispatch(a, w, cfg), first)


def test_stream_cluster_of_16_runs_or_is_refused() -> None:
    """16 CTAs a cluster is past the portable 8: the launch opts in; a card that cannot schedule
    such a cluster must refuse the config with a typed error, not fail at launch."""
    if not _sm90():
        pytest.skip("thread-block clusters need sm_90")
    t = layer(4096, 512, 4, 128, False, "v2", seed=16)
    try:
        _run_all_m(t, stream(wn=1, wk=4, chunk=4, slots=2, split_k=16), ms=(1, 8))
    except InvalidConfigError as exc:
        assert "cluster" in str(exc)


def test_long_k_takes_fewer_rows_per_launch_or_is_refused() -> None:
    """A row of A for K = 40960 does not fit beside 160 KB of rings in one CTA's K slice: bound
    with split_k=1 it is refused when the weight is bound; with split_k=2 half a row fits, so a
    call of M rows is M launches of one row each -- still correct."""
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    t = layer(40960, 64, 4, 128, False, "v1", seed=5)
    with pytest.raises(InvalidConfigError, match="does not fit"):
        plan_for(QuantizedWeight(t, "cuda"), stream(wn=1, wk=8, chunk=16, slots=2, split_k=1))
    if _sm90():
        cfg = stream(wn=1, wk=8, chunk=16, slots=2, split_k=2)
        plan = plan_for(QuantizedWeight(t, "cuda"), cfg)
        assert plan.stream is not None and plan.stream.rows_fit(2, 1) == 1
        _run_all_m(t, cfg, ms=(1, 3))


def test_band_edge_fused_then_reconstruct() -> None:
    """max_q_gemm_rows = 8: the stream kernel up to M = 8, reconstruct + cuBLAS from M = 9."""
    t = layer(2048, 768, 4, 64, False, "v1", seed=9)
    _run_all_m(t, stream(split_k=0, max_rows=8), ms=(7, 8, 9))


def test_graph_capture_replays_with_new_inputs() -> None:
    """Captured once, replayed on new activations: nothing per call but the launches (M = 12 is
    two of them)."""
    from gemmtune.kernels.dispatch import dispatch, plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    k, n = 2048, 1024
    t = layer(k, n, 4, 128, True, "v1", seed=7)
    w = QuantizedWeight(t, "cuda")
    w_ref = reference.dequantize(t, torch.float32).cuda()
    cfg = stream(split_k=0, max_rows=16)
    plan_for(w, cfg).prepare((1, 8, 12))
    xs = {m: activations(m, k, seed=m) for m in (1, 8, 12)}
    graph, outs = capture(lambda: {m: dispatch(a, w, cfg) for m, a in xs.items()})
    for seed in (10, 11):
        for m, a in xs.items():
            a.copy_(activations(m, k, seed=seed * 100 + m))
            outs[m].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for m, a in xs.items():
            check_product(outs[m], reference_product(a, t, w_ref), k)
