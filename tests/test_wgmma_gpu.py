"""The wgmma kernel (kernels/cuda/gptq_wgmma_gemm.cu, sm_90a) against the CPU reference on fresh
random data, output poisoned first (`pytest -m gpu`, sm_90 cards only): every built tile at both
stage lengths, every format, M at and around the tile edges, N and K that are not multiples of
the tile, split-K (the workspace left clean) and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.config import WGMMA, WGMMA_TILES, KernelConfig, wgmma_violation

from tests.gpu_util import (
    FORMATS,
    activations,
    capture,
    check_dispatch,
    check_product,
    layer,
    reference_product,
    requires_gpu,
)


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _sm90(), reason="the wgmma kernel runs on sm_90 cards only")]


def wgmma(m: int, n: int, k: int = 64, stages: int = 4, split_k: int = 0,
          rows: int = 4096) -> KernelConfig:
    return KernelConfig(max_q_gemm_rows=rows, kernel=WGMMA, wgmma_m=m, wgmma_n=n, wgmma_k=k,
                        wgmma_stages=stages, split_k=split_k)


def _deepest(bits: int, m: int, n: int, k: int) -> int:
    return next((s for s in (4, 3, 2) if wgmma_violation(bits, m, n, k, s) is None), 0)


@pytest.mark.parametrize("bits,group,act,zf", FORMATS)
def test_wgmma_formats(bits: int, group: int, act: bool, zf: str) -> None:
    # K of 17 4-bit steps where the group allows (a partial last stage); N = 1000 leaves a
    # partial 32-column block and a partial tile.
    k = 640 if group == 128 else 544
    t = layer(k, 1000, bits, group, act, zf, seed=bits * 100 + group + act)
    for cfg in (wgmma(16, 128, 64, 3), wgmma(64, 256, 64, 4, split_k=3)):
        check_dispatch(t, cfg, [1, 15, 16, 17, 65, 130], seed=group)


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("tile", sorted(WGMMA_TILES))
@pytest.mark.parametrize("tile_k", (64, 128))
def test_every_wgmma_tile(tile: tuple[int, int], tile_k: int, bits: int) -> None:
    tile_m, tile_n = tile
    stages = _deepest(bits, tile_m, tile_n, tile_k)
    if not stages:
        pytest.skip(wgmma_violation(bits, tile_m, tile_n, tile_k, 2))
    t = layer(1056, 1000, bits, 32, False, "v1", seed=tile_m + tile_n + tile_k + bits)  # 33 4-bit steps
    for split in (1, 5):
        check_dispatch(t, wgmma(tile_m, tile_n, tile_k, stages, split),
             sorted({1, tile_m - 1, tile_m, tile_m + 1, 2 * tile_m + 1}), seed=split)


@pytest.mark.parametrize("stages", (2, 3, 4, 5))
def test_wgmma_stages(stages: int) -> None:
    t = layer(2048, 640, 4, 128, False, "v2", seed=stages)
    check_dispatch(t, wgmma(32, 128, 64, stages, 0), [1, 31, 32, 33, 100], seed=stages)


def test_wgmma_split_workspace_is_left_clean() -> None:
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    t = layer(4096, 512, 4, 128, False, "v1", seed=7)
    w = QuantizedWeight(t, "cuda")
    plan = plan_for(w, wgmma(32, 256, 64, 4, split_k=8))
    w_ref = reference.dequantize(t, torch.float32).cuda()
    for seed in (1, 2):
        a = activations(40, t.k, seed=seed)
        out = torch.full((40, t.n), float("nan"), dtype=torch.float16, device="cuda")
        plan(a, out)
        torch.cuda.synchronize()
        check_product(out, reference_product(a, t, w_ref), t.k)
    assert not plan.ws.partials.any() and not plan.ws.counters.any()


def test_wgmma_under_cuda_graph_replay() -> None:
    """Captured once, replayed on new activations: each replay matches the reference, split and
    unsplit, act-order (the gather) included."""
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.weights import QuantizedWeight

    for act, split in ((False, 4), (True, 1)):
        t = layer(2048, 768, 4, 128, act, "v1", seed=11 + act)
        w = QuantizedWeight(t, "cuda")
        plan = plan_for(w, wgmma(64, 256, 64, 4, split_k=split))
        plan.prepare((48,))
        w_ref = reference.dequantize(t, torch.float32).cuda()
        a = activations(48, t.k, seed=0)
        out = torch.empty((48, t.n), dtype=torch.float16, device="cuda")
        g, _ = capture(lambda p=plan, x=a, o=out: p(x, o))
        for seed in (3, 4):
            a.copy_(activations(48, t.k, seed=seed))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            check_product(out, reference_product(a, t, w_ref), t.k)
