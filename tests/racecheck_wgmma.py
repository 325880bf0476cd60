"""One small launch of every built wgmma instance shape, for `compute-sanitizer --tool racecheck`
(run by `tests/test_wgmma_gpu.py::test_wgmma_has_no_shared_memory_race`; by hand:
`compute-sanitizer --tool racecheck --kernel-name kns=gptq_wgmma python -m tests.racecheck_wgmma`).

Each instance runs once on a layer whose K ends in a partial stage and whose N and M end in
partial tiles (so the masked paths run too), split 1 and 3, and is checked against the CPU
reference, so a run that silently skipped the kernel cannot pass. Prints one line per instance."""

from __future__ import annotations

import sys

from gemmtune.kernels.config import WGMMA, WGMMA_TILES, KernelConfig, wgmma_deepest_stages

from tests.gpu_util import check_dispatch, layer


def instances() -> list[tuple[int, KernelConfig]]:
    """(bits, config) of every buildable wgmma tile x tile_k, at the deepest stages it builds,
    unsplit and split 3 ways."""
    out = []
    for bits in (4, 8):
        for (tile_m, tile_n) in sorted(WGMMA_TILES):
            for tile_k in (64, 128):
                stages = wgmma_deepest_stages(bits, tile_m, tile_n, tile_k)
                if not stages:
                    continue
                for split in (1, 3):
                    out.append((bits, KernelConfig(max_q_gemm_rows=4096, kernel=WGMMA, wgmma_m=tile_m,
                                                   wgmma_n=tile_n, wgmma_k=tile_k, wgmma_stages=stages,
                                                   split_k=split)))
    return out


def main() -> int:
    layers = {bits: layer(1056, 296, bits, 32, False, "v1", seed=bits) for bits in (4, 8)}
    for bits, cfg in instances():
        check_dispatch(layers[bits], cfg, [cfg.wgmma_m + 1], seed=bits)
        print(f"{bits}-bit {cfg.variant_key()}: ran, matches the reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
