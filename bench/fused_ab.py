#!/usr/bin/env python3
"""A/B a shipped fused kernel against another revision of its source, same run, same card.

For each shape and M, every candidate variant is checked against the CPU reference on fresh
random data (output poisoned first) and timed for both sources; the table gives the best variant
of each source per cell, their ratio, and the anchor's peers when `--anchor` is given. Timing is
the harness's (CUDA-graph replays, weight copies rotated past L2, median). The floor is the
weight + scale/zero bytes over the streaming-read ceiling measured in the same run.

    git show REV:kernels/cuda/gptq_gemm.cu > /tmp/old/gptq_gemm.cu
    python bench/fused_ab.py --old /tmp/old/gptq_gemm.cu --anchor anchors.json -o ab.json

`--kernel tiled` does the same for `gptq_tiled_gemm.cu` (every built tile whose pipeline fits,
tile_k 64/128, 3-4 stages; default Ms 12-512):

    git show REV:kernels/cuda/gptq_tiled_gemm.cu > /tmp/old/gptq_tiled_gemm.cu
    python bench/fused_ab.py --kernel tiled --old /tmp/old/gptq_tiled_gemm.cu --splits 0,1,2,4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import torch
from gemmtune.autotune import timing
from gemmtune.kernels import compile as ck
from gemmtune.kernels import reference
from gemmtune.kernels.config import TILED, TILES, KernelConfig, tiled_violation
from gemmtune.kernels.device import query_device
from gemmtune.kernels.dispatch import Plan
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.weights import QuantizedWeight

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 8192),
          (8192, 57344), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64]
TILED_MS = [12, 16, 24, 32, 48, 64, 128, 256, 512]


def tiled_candidates(m: int, splits: tuple[int, ...] = (0,)) -> list[KernelConfig]:
    """Tiles no taller than the next power of two of M (at least 16), tile_k 64/128, 3-4 stages
    where the tiled rule allows them at 4 bits, the given split_k values."""
    top = max(16, 1 << (m - 1).bit_length())
    return [KernelConfig(max_q_gemm_rows=4096, kernel=TILED, tile_m=tm, tile_n=tn, tile_k=tk,
                         stages=st, split_k=sk)
            for (tm, tn) in TILES if tm <= top for tk in (64, 128) for st in (3, 4)
            if tiled_violation(4, tm, tn, tk, st) is None for sk in splits]


def candidates(m: int, splits: tuple[int, ...] = (0,)) -> list[KernelConfig]:
    """Variants worth timing at M: rows per block that hold M (or 64), 1-2 warps of K, the
    given split_k values (0 = the dispatch's automatic choice)."""
    out = []
    mks = sorted({min(64, max(8, 1 << (m - 1).bit_length())), 64 if m > 8 else 8})
    for mk in mks:
        for bn in (64, 128):
            for wk in (1, 2):
                for u in (1, 2, 4):
                    tiles = -(-mk // 8)
                    if u * tiles > 8 or (u == 1 and mk == 8):
                        continue
                    out += [KernelConfig(max_q_gemm_rows=4096, max_q_gemm_rows_kernel=mk, block_n=bn,
                                         threads=bn * wk, split_k=sk, k_unroll=u) for sk in splits]
    return out


class OldSource:
    """Compiles variants from another `gptq_gemm.cu`, with extra `-D` flags (kept apart from the
    shipped kernel cache)."""

    def __init__(self, path: Path, flags: tuple[str, ...] = ()) -> None:
        self.code = path.read_text()
        self.flags = flags
        self.fns: dict[str, object] = {}

    def fn(self, v: ck.FusedVariant | ck.TiledVariant) -> object:
        import cupy

        got = self.fns.get(v.expression())
        if got is None:
            mod = cupy.RawModule(code=self.code, options=(*ck.nvrtc_options(), *self.flags), name_expressions=[v.expression()])
            k = mod.get_function(v.expression())
            got = self.fns[v.expression()] = getattr(k, "kernel", k)
            ck.allow_shared_memory(got, v)
        return got


def plan(weight: QuantizedWeight, cfg: KernelConfig, old: OldSource | None) -> Plan:
    p = Plan(weight, cfg)
    if old is not None:
        if cfg.tiled:
            for split in (False, True):
                p._fns[(0, split)] = old.fn(p._tiled[split])
            return p
        for rows in {p.rows_for(m) for m in range(1, cfg.max_q_gemm_rows_kernel + 1)}:
            for split in (False, True):
                p._fns[(rows, split)] = old.fn(p.variant_for(rows, split))
    return p


def floor_us(k: int, n: int, bw: float, group: int = 128) -> float:
    g = k // group
    return (k * n // 2 + g * n * 4) / (bw * 1e12) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("decode", "tiled"), default="decode",
                    help="which fused kernel: decode (gptq_gemm.cu) or tiled (gptq_tiled_gemm.cu)")
    ap.add_argument("--old", type=Path, required=True, help="the other revision of that kernel's .cu")
    ap.add_argument("--alt", action="append", default=[],
                    help="more sources: NAME=PATH[:-DFLAG,-DFLAG] (timed beside new and old)")
    ap.add_argument("--shapes", default="", help="comma list of KxN (default: the eight)")
    ap.add_argument("--ms", default="", help="comma list of M")
    ap.add_argument("--anchor", type=Path, help="peer timings JSON on the same card model (an anchor file, as bench/report.py reads)")
    ap.add_argument("--splits", default="0", help="comma list of split_k values to time (0 = auto)")
    ap.add_argument("-o", "--output", default="fused-ab.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(x) for x in args.ms.split(",")] if args.ms else (TILED_MS if args.kernel == "tiled" else MS)
    pick = tiled_candidates if args.kernel == "tiled" else candidates
    anchor = {}
    if args.anchor:
        for r in json.loads(args.anchor.read_text())["rows"]:
            anchor[(r["K"], r["N"], r["M"])] = r
    sources: list[tuple[str, OldSource | None]] = [("new", None), ("old", OldSource(args.old))]
    for spec in args.alt:
        name, _, rest = spec.partition("=")
        path, _, flags = rest.partition(":")
        sources.append((name, OldSource(Path(path), tuple(f for f in flags.split(",") if f))))
    t0 = time.time()
    bw = timing.read_bandwidth_tbps()
    copy_bw = timing.copy_bandwidth_tbps()
    print(f"# {query_device().name}: read {bw:.2f} TB/s, graph-captured copy {copy_bw:.2f} TB/s", flush=True)
    rows = []
    for k, n in shapes:
        t = random_gptq(k, n, 4, 128, False, "v1", generator=torch.Generator().manual_seed(k + n))
        copies = timing.copies_needed(t.problem.weight_bytes())
        weights = [QuantizedWeight(t, "cuda") for _ in range(copies)]
        w_ref = reference.dequantize(t, torch.float32).cuda()
        for m in ms:
            a = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = a.float() @ w_ref
            best: dict[str, tuple[float, str]] = {}
            for cfg in pick(m, tuple(int(x) for x in args.splits.split(","))):
                for name, src in sources:
                    plans = [plan(w, cfg, src) for w in weights]
                    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                    plans[0](a, out)
                    torch.cuda.synchronize()
                    err = reference.relative_error(out.float(), ref)
                    if not err < reference.fp32_accum_tolerance(k):
                        print(f"WRONG {name} {cfg.variant_key()} {k}x{n} M={m}: rel err {err:.2e}", flush=True)
                        continue
                    us = timing.graph_time(lambda i, ps=plans, c=copies, x=a: ps[i % c](x)).median_us
                    if us < best.get(name, (math.inf, ""))[0]:
                        best[name] = (us, cfg.variant_key())
            peer = anchor.get((k, n, m), {})
            fl = floor_us(k, n, bw)
            row = {"K": k, "N": n, "M": m, "new_us": round(best["new"][0], 2), "new_variant": best["new"][1],
                   "old_us": round(best["old"][0], 2), "old_variant": best["old"][1],
                   "floor_us": round(fl, 2),
                   **{f"{name}_us": round(best[name][0], 2) for name, _ in sources[2:]},
                   **{p: peer.get(p) for p in ("fp16_us", "marlin_us", "exl_default_us")}}
            rows.append(row)
            peers = [v for v in (row["fp16_us"], row["marlin_us"], row["exl_default_us"]) if v]
            bp = min(peers) if peers else math.nan
            print(f"{k:6d}x{n:<6d} M={m:3d}  new {row['new_us']:8.2f} [{row['new_variant']}]  old {row['old_us']:8.2f}"
                  f"  new/old {row['new_us'] / row['old_us']:.3f}  floor {fl:6.1f} ({fl / row['new_us'] * 100:3.0f} %)"
                  f"  best peer {bp:7.2f}  new/peer {row['new_us'] / bp:.2f}"
                  + "".join(f"  {name} {best[name][0]:.2f} [{best[name][1]}]" for name, _ in sources[2:]), flush=True)
        del weights
        torch.cuda.empty_cache()
    result = {"what": f"best {args.kernel} kernel variant per cell, shipped source (new) vs --old source", "date": dt.date.today().isoformat(),
              "device": query_device().to_dict(), "kernel_hash": kernel_hash(), "command": " ".join(sys.argv),
              "ceilings": {"read_bandwidth_TBps": round(bw, 3), "graph_copy_TBps": round(copy_bw, 3)},
              "seconds": round(time.time() - t0, 1), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
