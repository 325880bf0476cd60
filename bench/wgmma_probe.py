#!/usr/bin/env python3
"""First measurement of the wgmma family (issue 22): per shape and M, torch fp16 (cuBLAS), the
best of a few tiled-kernel configs and the best wgmma config, all in one process on one card.

Timing is the harness's (`autotune.timing.graph_time`: CUDA-graph replays, weight copies rotated
past L2, median). Every timed fused config is first checked on the same random layer against the
product with the reconstruct kernel's fp16 weight (relative error; the GPU tests check the kernels
against the CPU reference), output poisoned first.

    python bench/wgmma_probe.py -o out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

import torch
from gemmtune.autotune import timing
from gemmtune.kernels.config import (
    TILED,
    TILES,
    WGMMA,
    WGMMA_TILES,
    KernelConfig,
    tiled_violation,
    wgmma_violation,
)
from gemmtune.kernels.device import query_device
from gemmtune.kernels.dispatch import Plan
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.weights import QuantizedWeight

SHAPES = [(8192, 57344), (4096, 4096), (8192, 28672), (28672, 8192)]
MS = [16, 64, 128, 256, 512]


def _deepest(rule, *tile: int) -> int:  # noqa: ANN001
    return next((s for s in (4, 3, 2) if rule(4, *tile, s) is None), 0)


def tiled_candidates(m: int) -> list[KernelConfig]:
    top = max(16, 1 << (m - 1).bit_length())
    out = []
    for tm, tn in TILES:
        if tn < 128 or tm > top or tm * 4 < min(m, 128):
            continue
        st = _deepest(tiled_violation, tm, tn, 64)
        if st:
            out.append(KernelConfig(max_q_gemm_rows=4096, kernel=TILED, tile_m=tm, tile_n=tn,
                                    tile_k=64, stages=st))
    return out


def wgmma_candidates(m: int, ks: tuple[int, ...] = (64, 128)) -> list[KernelConfig]:
    top = max(16, 1 << (m - 1).bit_length())
    out = []
    for tm, tn in WGMMA_TILES:
        if tm > top or tm * 4 < min(m, 128):
            continue
        for tk in ks:
            st = _deepest(wgmma_violation, tm, tn, tk)
            if st:
                out.append(KernelConfig(max_q_gemm_rows=4096, kernel=WGMMA, wgmma_m=tm,
                                        wgmma_n=tn, wgmma_k=tk, wgmma_stages=st))
    return out


def short(cfg: KernelConfig) -> str:
    return cfg.variant_key()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--wgmma-ks", default="64,128", help="wgmma_k values to try")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    dev = query_device(0)
    rows: list[dict] = []
    t0 = time.time()
    for k, n in shapes:
        t = random_gptq(k, n, 4, 128, False, "v1", generator=torch.Generator().manual_seed(k + n))
        nbytes = t.qweight.numel() * 4 + t.scales.numel() * 4
        copies = max(2, min(args.calls, timing.copies_needed(nbytes)))
        weights = [QuantizedWeight(t, "cuda") for _ in range(copies)]
        w16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02
               for _ in range(max(2, min(args.calls, timing.copies_needed(k * n * 2))))]
        # Reference weight: the reconstruct kernel's fp16 dequantisation of copy 0.
        ref_plan = Plan(weights[0], KernelConfig(max_q_gemm_rows=0))
        wref = torch.empty(k, n, dtype=torch.float16, device="cuda")
        ref_plan.reconstruct(wref, 0, n, n, torch.cuda.current_stream().cuda_stream)
        for m in ms:
            acts = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(2)]
            outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(2)]
            ref = acts[0].float() @ wref.float()
            fp16 = timing.graph_time(
                lambda i, x=acts, w=w16, o=outs: torch.matmul(x[i % 2], w[i % len(w)], out=o[i % 2]),
                calls=args.calls, repeats=args.repeats)
            row = {"k": k, "n": n, "m": m, "fp16_us": fp16.median_us, "tiled": {}, "wgmma": {},
                   "errors": {}}
            wks = tuple(int(v) for v in args.wgmma_ks.split(","))
            for fam, cands in (("tiled", tiled_candidates(m)), ("wgmma", wgmma_candidates(m, wks))):
                for cfg in cands:
                    try:
                        plans = [Plan(w, cfg) for w in weights]
                        plans[0].prepare((m,))
                        outs[0].fill_(float("nan"))
                        plans[0](acts[0], outs[0])
                        torch.cuda.synchronize()
                        err = ((outs[0].float() - ref).norm() / ref.norm()).item()
                        if not err < 2e-3:  # NaN fails too
                            row["errors"][short(cfg)] = f"relative error {err:.2e}"
                            continue
                        meas = timing.graph_time(
                            lambda i, p=plans, x=acts, o=outs: p[i % len(p)](x[i % 2], o[i % 2]),
                            calls=args.calls, repeats=args.repeats)
                        row[fam][short(cfg)] = round(meas.median_us, 2)
                    except Exception as exc:  # noqa: BLE001 - a failing config is a result
                        row["errors"][short(cfg)] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for fam in ("tiled", "wgmma"):
                best = min(row[fam].items(), key=lambda kv: kv[1], default=(None, None))
                row[f"{fam}_best"], row[f"{fam}_us"] = best
            rows.append(row)
            w_us, t_us = row["wgmma_us"], row["tiled_us"]
            print(f"{k}x{n} M={m:4d}  fp16 {fp16.median_us:8.1f}  tiled {t_us or float('nan'):8.1f} "
                  f"({row['tiled_best']})  wgmma {w_us or float('nan'):8.1f} ({row['wgmma_best']})"
                  + (f"  wg/fp16 {w_us / fp16.median_us:.2f} wg/tiled {w_us / t_us:.2f}"
                     if w_us and t_us else "")
                  + (f"  errors: {row['errors']}" if row["errors"] else ""), flush=True)
        del weights, w16, ref_plan
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": dev.to_dict() if hasattr(dev, "to_dict") else dev.name,
                   "date": dt.date.today().isoformat(), "seconds": time.time() - t0,
                   "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
