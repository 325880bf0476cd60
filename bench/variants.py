#!/usr/bin/env python3
"""Time named fused variants on named shapes, each result checked against the reference first.

For same-call A/Bs of kernel revisions (run it once per tree, the tree's package first on
`PYTHONPATH`): unlike `bench/kernels.py`, which sweeps a family and keeps the fastest, this times
exactly the variants asked for, and a variant whose output is off refuses to be timed (the row
says `failed` with the reason and the exit status is 1), so a fast broken kernel cannot pass for a fast one.

    python bench/variants.py --shapes 5120x5120,4096x6144 --ms 1,8 \\
        --keys stream1x8-ch8-sl2-sk0,stream1x8-ch8-sl2-sk2 -o ab.json

Check and timing are the tuner's own (`autotune.measure.CudaEvaluator.fused`): one call on fresh
random activations, the output poisoned with NaN first, against the CPU reference's dequantised
weight within the fp32-accumulation tolerance, then graph replays (eager cost above
`GRAPHED_MAX_M`) with weight copies rotated past L2, medians; 4-bit, group 128, random layers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
from gemmtune.autotune.evaluator import TrialFailure
from gemmtune.autotune.measure import CudaEvaluator
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.workload import Workload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", required=True, help="KxN,KxN,...")
    p.add_argument("--ms", default="1,8", help="M values, comma-separated")
    p.add_argument("--keys", required=True, help="variant keys (KernelConfig.variant_key), comma-separated")
    p.add_argument("-o", "--output", help="JSON file for the rows")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = tuple(int(v) for v in args.ms.split(","))
    keys = args.keys.split(",")
    workload = Workload("variants", ms, tuple(1.0 for _ in ms))
    rows, bad = [], 0
    for k, n in shapes:
        ev = CudaEvaluator(Problem(k, n), workload, seed=k * 7 + n)
        for key in keys:
            cfg = KernelConfig.from_variant_key(key)
            for m in ms:
                row = {"K": k, "N": n, "M": m, "key": key}
                try:
                    row["us"] = ev.fused(cfg, m).median_us
                    shown = f"{row['us']:9.2f} us"
                except TrialFailure as exc:  # a wrong result, or a variant this layer refuses
                    row["failed"] = exc.reason
                    bad += 1
                    shown = f"FAILED: {exc.reason}"
                rows.append(row)
                print(f"{k}x{n} M={m:<3} {key:<28} {shown}", flush=True)
        ev.close()
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"what": "bench/variants.py", "date": datetime.date.today().isoformat(),
                       "device": torch.cuda.get_device_name(), "kernel_hash": kernel_hash(),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
