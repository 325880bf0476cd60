"""The tiled kernel (kernels/cuda/gptq_tiled_gemm.cu) against the CPU reference on fresh random
data, output poisoned first (`pytest -m gpu`): every built tile, both pipeline stage lengths,
every format, M at and around the tile edges, N and K that are not multiples of the tile."""

from __future__ import annotations

import pytest
from gemmtune.kernels.config import TILED, TILES, KernelConfig, tiled_violation

from tests.gpu_util import (
    FORMATS,
    check_dispatch,
    check_graph_replay,
    check_split_workspace_clean,
    layer,
    requires_gpu,
)

pytestmark = [pytest.mark.gpu, requires_gpu]


def tiled(tile_m: int, tile_n: int, tile_k: int = 64, stages: int = 4, split_k: int = 0,
          rows: int = 4096) -> KernelConfig:
    return KernelConfig(max_q_gemm_rows=rows, kernel=TILED, tile_m=tile_m, tile_n=tile_n,
                        tile_k=tile_k, stages=stages, split_k=split_k)


def _edges(tile_m: int) -> list[int]:
    """M at and around the tile's edge and its double, plus one row."""
    return sorted({1, tile_m - 1, tile_m, tile_m + 1, 2 * tile_m + 1})


@pytest.mark.parametrize("bits,group,act,zf", FORMATS)
def test_tiled_formats(bits: int, group: int, act: bool, zf: str) -> None:
    # K = 17 K steps of 4-bit (not a whole number of stages: the last is partial) where the
    # group allows it; N = 1000 leaves a partial 32-column block and a partial tile.
    k = 640 if group == 128 else 544
    t = layer(k, 1000, bits, group, act, zf, seed=bits * 100 + group + act)
    for cfg in (tiled(16, 128, 64, 3), tiled(64, 128, 128, 4, split_k=3)):
        check_dispatch(t, cfg, [1, 15, 16, 17, 65, 130], seed=group)


@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize("tile_k", (64, 128))
def test_every_tile(tile: tuple[int, int], tile_k: int) -> None:
    tile_m, tile_n = tile
    t = layer(1056, 1000, 4, 32, False, "v1", seed=tile_m + tile_n + tile_k)  # 33 K steps
    # The deepest pipeline the rule allows (128x256 spills with long stages; 128-deep not at all).
    stages = next((s for s in (4, 3, 2) if tiled_violation(4, tile_m, tile_n, tile_k, s) is None), 0)
    if not stages:
        pytest.skip(tiled_violation(4, tile_m, tile_n, tile_k, 2))
    for split in (1, 0, 5):
        check_dispatch(t, tiled(tile_m, tile_n, tile_k, stages, split), _edges(tile_m), seed=split)


@pytest.mark.parametrize("stages", (2, 3, 4))
def test_stages_and_8bit(stages: int) -> None:
    t = layer(1056, 776, 8, 32, True, "v2", seed=stages)
    check_dispatch(t, tiled(32, 64, 128, stages, 0), [1, 31, 32, 33, 100], seed=stages)


def test_split_workspace_is_left_clean() -> None:
    check_split_workspace_clean(tiled(32, 128, 64, 4, split_k=8))


def test_tiled_under_cuda_graph_replay() -> None:
    check_graph_replay(lambda split: tiled(64, 128, 64, 4, split_k=split))
