"""The wgmma kernel (kernels/cuda/gptq_wgmma_gemm.cu, sm_90a) against the CPU reference on fresh
random data, output poisoned first (`pytest -m gpu`, sm_90 cards only): every built tile at both
stage lengths, every format, M at and around the tile edges, N and K that are not multiples of
the tile, split-K (the workspace left clean) and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch
from gemmtune.kernels.config import (
    WGMMA,
    WGMMA_TILES,
    KernelConfig,
    wgmma_deepest_stages,
    wgmma_violation,
)

from tests.gpu_util import (
    FORMATS,
    check_dispatch,
    check_graph_replay,
    check_split_workspace_clean,
    layer,
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
    stages = wgmma_deepest_stages(bits, tile_m, tile_n, tile_k)
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
    check_split_workspace_clean(wgmma(32, 256, 64, 4, split_k=8))


def test_wgmma_under_cuda_graph_replay() -> None:
    check_graph_replay(lambda split: wgmma(64, 256, 64, 4, split_k=split))


def _sanitizer() -> str | None:
    import os
    import shutil

    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and root and os.path.isfile(os.path.join(root, "bin", "compute-sanitizer")):
            found = os.path.join(root, "bin", "compute-sanitizer")
    return found


@pytest.mark.skipif(_sanitizer() is None, reason="compute-sanitizer (CUDA toolkit) not found")
def test_wgmma_has_no_shared_memory_race() -> None:
    # racecheck instruments every shared-memory access of the wgmma instances (one small launch
    # each, tests/racecheck_wgmma.py): a hazard between the cp.async ring, the activation stores
    # and the warpgroup MMAs' reads would show here even when the sums happen to come out right.
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.racecheck_wgmma import instances

    root = Path(__file__).resolve().parent.parent
    tool = _sanitizer()
    assert tool is not None
    # Only our kernels are instrumented (torch's own are slow under racecheck and not ours to
    # check); the option was --kernel-regex before it became --kernel-name.
    usage = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=60).stdout
    only = next(([opt, "kns=gptq_wgmma"] for opt in ("--kernel-name", "--kernel-regex") if opt in usage), [])
    run = subprocess.run([tool, "--tool", "racecheck", "--racecheck-report", "all", *only,
                          "--error-exitcode", "3",
                          sys.executable, "-m", "tests.racecheck_wgmma"],
                         cwd=root, capture_output=True, text=True, timeout=480)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert log.count("matches the reference") == len(instances()), log[-4000:]
    summary = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed", log)
    assert summary is not None and summary.group(1) == "0", log[-4000:]
