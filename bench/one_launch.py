#!/usr/bin/env python3
"""Run one fused variant on one shape and M a few times (for a profiler: `ncu --kernel-name
regex:gptq_ --launch-skip 2 --launch-count 1 python3 bench/one_launch.py 8192x57344 64 KEY`).

KEY is a variant key (`KernelConfig.variant_key()`, e.g. `wgmma64x256x64-st4-sk0`); a 4-bit,
group-128 random layer."""

from __future__ import annotations

import sys

import torch
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.dispatch import Plan
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.weights import QuantizedWeight


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    k, n = (int(v) for v in sys.argv[1].split("x"))
    m = int(sys.argv[2])
    cfg = KernelConfig.from_variant_key(sys.argv[3]).replace(max_q_gemm_rows=4096)
    w = QuantizedWeight(random_gptq(k, n, 4, 128, generator=torch.Generator().manual_seed(1)), "cuda")
    plan = Plan(w, cfg)
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    for _ in range(4):
        plan(a, out)
    torch.cuda.synchronize()
    print(f"{sys.argv[1]} M={m} {sys.argv[3]}: ran, grid of {plan.split_for(m)} K slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
