#!/usr/bin/env python3
"""Time named fused variants on named shapes, each result checked against the reference first.

For same-call A/Bs of kernel revisions (run it once per tree, the tree's package first on
`PYTHONPATH`): unlike `bench/kernels.py`, which sweeps a family and keeps the fastest, this times
exactly the variants asked for, and a variant whose output is off refuses to be timed (the row
says `wrong` and the exit status is 1), so a fast broken kernel cannot pass for a fast one.

    python bench/variants.py --shapes 5120x5120,4096x6144 --ms 1,8 \\
        --keys stream1x8-ch8-sl2-sk0,stream1x8-ch8-sl2-sk2 -o ab.json

Timing is the harness's (`autotune.timing.graph_time`: graph replays, weight copies rotated past
L2, medians); 4-bit, group 128, random layers seeded by shape. The check is one call on fresh
random activations, the output poisoned with NaN first, against the fp32 product (no TF32) of the
CPU reference's dequantised weight (`kernels.reference`), within the fp32-accumulation tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
from gemmtune.autotune import timing
from gemmtune.kernels import reference
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.dispatch import plan_for
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.weights import QuantizedWeight

FORCE_FUSED = 8192
"""max_q_gemm_rows that keeps every asked M on the fused path."""


def check(plan, a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of one call on `a` against `ref` (the output poisoned with NaN first)."""
    out = torch.full(tuple(ref.shape), float("nan"), device="cuda", dtype=torch.float16)
    plan(a.cuda(), out)
    torch.cuda.synchronize()
    return reference.relative_error(out.cpu(), ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", required=True, help="KxN,KxN,...")
    p.add_argument("--ms", default="1,8", help="M values, comma-separated")
    p.add_argument("--keys", required=True, help="variant keys (KernelConfig.variant_key), comma-separated")
    p.add_argument("-o", "--output", help="JSON file for the rows")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    keys = args.keys.split(",")
    rows, bad = [], 0
    for k, n in shapes:
        t = random_gptq(k, n, 4, 128, generator=torch.Generator().manual_seed(k * 7 + n))
        copies = timing.copies_needed(t.problem.weight_bytes())
        weights = [QuantizedWeight(t, "cuda") for _ in range(copies)]
        acts = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in ms}
        w32 = reference.dequantize(t, torch.float32).cuda()
        fresh = {m: torch.randn(m, k, dtype=torch.float16) for m in ms}  # not the timed ones
        torch.backends.cuda.matmul.allow_tf32 = False
        refs = {m: (fresh[m].cuda().float() @ w32).cpu() for m in ms}
        del w32
        tol = reference.fp32_accum_tolerance(k)
        for key in keys:
            cfg = KernelConfig.from_variant_key(key).replace(max_q_gemm_rows=FORCE_FUSED)
            plans = [plan_for(w, cfg) for w in weights]
            plans[0].prepare()
            for m in ms:
                err = check(plans[0], fresh[m], refs[m])
                row = {"K": k, "N": n, "M": m, "key": key, "rel_error": err}
                if not err <= tol:  # NaN included
                    row["wrong"] = True
                    bad += 1
                else:
                    a = acts[m]
                    row["us"] = timing.graph_time(lambda i, a=a, ps=plans: ps[i % len(ps)](a)).median_us
                rows.append(row)
                shown = f"{row['us']:9.2f} us" if "us" in row else f"WRONG (rel error {err:.3g} > {tol:.3g})"
                print(f"{k}x{n} M={m:<3} {key:<28} {shown}", flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"what": "bench/variants.py", "date": datetime.date.today().isoformat(),
                       "device": torch.cuda.get_device_name(), "kernel_hash": kernel_hash(),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
