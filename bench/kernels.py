#!/usr/bin/env python3
"""Benchmark the GPTQ kernels against torch fp16 on the LLM shapes of the kernels issue.

For each shape and M: the best variant of each fused kernel family (decode and tiled; on sm_90
cards wgmma from M = 8 up and stream up to M = 8; a two-stage sweep each), the reconstruct +
cuBLAS path, the *dispatch* of the plan over M bands that the tuner's
DP (`autotune.bands.plan_bands`) builds from these measurements, and torch fp16 matmul. Every number is GPU time per call from CUDA-graph
replays (20 calls per graph, each on a different weight copy, copies > 150 MB so L2 cannot hold
them), median of 15 replays. Ceilings (streaming-read bandwidth, the roofline's; fp16 matmul
peak; and, for comparison only, a graph-captured torch copy) are measured in the same run. Writes JSON; `bench/report.py` turns it into the BENCHMARKS.md table.

`--peers` merges the peers' figures into each row as `marlin_us`, `exl_us` and `peer_fp16_us`,
beside our own `fp16_us` and `dispatch_us`: a `peer.json` of Marlin's, ExLlamaV2's and cuBLAS
fp16's µs per shape and M, timed the way this harness times (graph replays, weight copies past
L2, medians) in the same device call on the same card, with a `peer_meta.json` naming the card
beside it (the peers are not part of gemmtune; the team's peer harness writes these two files).
A peers file from another card model is refused.

    python bench/kernels.py -o out/kernels.json              # full run (~ minutes on an H100)
    python bench/kernels.py --shapes 4096x4096 --ms 1,16,64  # quick look
    python bench/kernels.py --families wgmma,tiled --ms 16,64,256,512 --peers $OUT/peer.json
    python bench/kernels.py --merge a.json b.json --peers peer.json -o kernels.json  # pieces + peers
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
from gemmtune.autotune.bands import Measured, plan_bands
from gemmtune.kernels.config import (
    FAMILY_LABELS,
    STREAM,
    STREAM_ROWS,
    TILED,
    TILES,
    WGMMA,
    WGMMA_CAPABILITY,
    WGMMA_TILES,
    KernelConfig,
    registers_fit,
    stream_violation,
    tiled_violation,
    wgmma_deepest_stages,
)
from gemmtune.kernels.device import query_device
from gemmtune.kernels.dispatch import plan_for
from gemmtune.kernels.gptq import random_gptq
from gemmtune.kernels.sources import kernel_hash
from gemmtune.kernels.weights import QuantizedWeight
from report import bench_workload

SHAPES = [
    ("llama3-8b", "qkv", 4096, 6144),
    ("llama3-8b", "o", 4096, 4096),
    ("llama3-8b", "gate_up", 4096, 28672),
    ("llama3-8b", "down", 14336, 4096),
    ("llama2-70b", "qkv", 8192, 10240),
    ("llama2-70b", "o", 8192, 8192),
    ("llama2-70b", "gate_up", 8192, 57344),
    ("llama2-70b", "down", 28672, 8192),
]
MS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512]
STAGE1_MS = (1, 8, 16, 64)
TILED_STAGE1_MS = (16, 64, 256)
TILED_MIN_M = 8  # the tiled and wgmma kernels are not measured below this M (the decode band)
FAMILIES = tuple(FAMILY_LABELS.values())  # decode, tiled, wgmma, stream
SPLITS = (1, 2, 4, 8)  # explicit split_k tried on each family's three best
FUSED_LIMIT = 512  # max_q_gemm_rows that forces the fused path at every benchmarked M


def candidates() -> list[KernelConfig]:
    out = []
    for mk in (8, 16, 32, 64):
        for bn in (64, 128):
            for wk in (1, 2, 4):
                for u in (1, 2, 4, 8):
                    if u * -(-mk // 8) > 8 or (u == 1 and mk < 64) or (u == 8 and mk > 8) \
                            or not registers_fit(bn * wk, mk, u):
                        continue
                    out.append(KernelConfig(max_q_gemm_rows=FUSED_LIMIT, max_q_gemm_rows_kernel=mk,
                                            block_n=bn, threads=bn * wk, split_k=0, k_unroll=u))
    return out


def tiled_candidates() -> list[KernelConfig]:
    """Every built tile with both stage lengths and 3 or 4 stages (2 only where 3 does not fit)."""
    out = []
    for (tm, tn) in TILES:
        for tk in (64, 128):
            for st in (3, 4):
                if tiled_violation(4, tm, tn, tk, st) is None:
                    out.append(KernelConfig(max_q_gemm_rows=FUSED_LIMIT, kernel=TILED, tile_m=tm,
                                            tile_n=tn, tile_k=tk, stages=st))
    return out


def wgmma_candidates() -> list[KernelConfig]:
    """Every built wgmma tile with both stage lengths at the deepest pipeline that fits (4-bit)."""
    out = []
    for (tm, tn) in sorted(WGMMA_TILES):
        for tk in (64, 128):
            st = wgmma_deepest_stages(4, tm, tn, tk)
            if st:
                out.append(KernelConfig(max_q_gemm_rows=FUSED_LIMIT, kernel=WGMMA, wgmma_m=tm,
                                        wgmma_n=tn, wgmma_k=tk, wgmma_stages=st))
    return out


def stream_candidates() -> list[KernelConfig]:
    """The standard space's stream tiles, K split chosen by the launcher."""
    from gemmtune.autotune.space import STREAM_TILES

    return [KernelConfig(max_q_gemm_rows=FUSED_LIMIT, kernel=STREAM, stream_warps_n=wn,
                         stream_warps_k=wk, stream_chunk=ch, stream_slots=sl)
            for wn, wk, ch, sl in STREAM_TILES if stream_violation(wn, wk, ch, sl, 0) is None]


def family_of(variant_key: str) -> str:
    """The family of a variant key in the result's `fused_by_variant` (keys are what the JSON holds)."""
    return KernelConfig.from_variant_key(variant_key).family


def roofline_us(k: int, n: int, m: int, bw_tbps: float, tflops: float, group: int = 128) -> float:
    g = k // group
    nbytes = k * n // 2 + g * n * 2 + g * n // 2 + m * k * 2 + m * n * 2
    return max(nbytes / (bw_tbps * 1e12), 2 * m * n * k / (tflops * 1e12)) * 1e6


def bench_shape(model: str, layer: str, k: int, n: int, ms: list[int], bw: float, tf: float,
                log, families: tuple[str, ...] = FAMILIES) -> list[dict]:
    gen = torch.Generator().manual_seed(k * 7 + n)
    t = random_gptq(k, n, 4, 128, False, "v1", generator=gen)
    per_copy = t.problem.weight_bytes()
    copies = timing.copies_needed(per_copy)
    weights = [QuantizedWeight(t, "cuda") for _ in range(copies)]
    fp16_copies = timing.copies_needed(k * n * 2)
    w16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02 for _ in range(fp16_copies)]

    def run_cfg(cfg: KernelConfig, a: torch.Tensor) -> timing.Measurement:
        plans = [plan_for(w, cfg) for w in weights]
        for p in plans[:1]:
            p.prepare()
        return timing.graph_time(lambda i: plans[i % copies](a))

    acts = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in ms}
    fused: dict[str, dict[int, float]] = {}

    def sweep(cands: list[KernelConfig], stage1: list[int], stage2: list[int]) -> list[KernelConfig]:
        """Two stages: every candidate at `stage1`, then the six best (geometric mean) and each
        stage-1 M's best at every M of `stage2`; returns those finalists."""
        for c in cands:
            fused[c.variant_key()] = {m: run_cfg(c, acts[m]).median_us for m in stage1}
        def score(c: KernelConfig) -> float:
            return sum(math.log(fused[c.variant_key()][m]) for m in stage1)
        top = sorted(cands, key=score)[:6]
        for m in stage1:  # so each M's best variant is in stage 2
            best_m = min(cands, key=lambda c: fused[c.variant_key()][m])
            if best_m not in top:
                top.append(best_m)
        for c in top:
            for m in stage2:
                if m not in fused[c.variant_key()]:
                    fused[c.variant_key()][m] = run_cfg(c, acts[m]).median_us
        return top

    dms = [m for m in ms if m <= FUSED_LIMIT]
    top = sweep(candidates(), [m for m in STAGE1_MS if m in acts] or dms[:1], dms) \
        if "decode" in families else []
    dtop = list(top)
    # the block-tile families the same way, from M = TILED_MIN_M up
    tms = [m for m in ms if m >= TILED_MIN_M]
    stage1 = [m for m in TILED_STAGE1_MS if m in tms] or tms[:1]
    ttop = sweep(tiled_candidates(), stage1, tms) if tms and "tiled" in families else []
    sm90 = torch.cuda.get_device_capability() == WGMMA_CAPABILITY
    wtop = sweep(wgmma_candidates(), stage1, tms) if tms and sm90 and "wgmma" in families else []
    sms = [m for m in ms if m <= STREAM_ROWS]
    stop = sweep(stream_candidates(), sms[:1] + sms[-1:], sms) if sms and "stream" in families else []
    top += ttop + wtop + stop
    # explicit K splits of the three best of each family (the sweep above uses the launcher's
    # automatic split, which scores whole waves and not the split-K reduction's traffic; the
    # tuner searches split_k, so the best-variant columns should too)
    for fam, fms in ((dtop[:3], [m for m in dms if m <= 64]), (ttop[:3], tms), (wtop[:3], tms)):
        for c in fam:
            for sk in SPLITS:
                v = c.replace(split_k=sk)
                if v.variant_key() in fused:
                    continue
                fused[v.variant_key()] = {m: run_cfg(v, acts[m]).median_us for m in fms}
                top.append(v)
    recon: dict[int, dict[int, float]] = {}
    for chunk in (0, 1024, 4096):
        if chunk >= n:
            continue
        cfg = KernelConfig(max_q_gemm_rows=0, recon_chunk_n=chunk)
        recon[chunk] = {m: run_cfg(cfg, acts[m]).median_us for m in ms}
    fp16 = {m: timing.graph_time(lambda i, a=acts[m]: torch.mm(a, w16[i % fp16_copies])).median_us for m in ms}

    # dispatch: the plan over M bands a tuner stores (autotune.bands, the same DP) from these
    # measurements, for the benchmark's workload (report.bench_workload)
    plan = plan_bands([Measured(c, fused[c.variant_key()]) for c in top], recon, bench_workload(fp16))
    assert plan is not None
    plans_by_shape[f"{k}x{n}"] = [[m_hi, cfg.key()] for m_hi, cfg in plan.bands]
    rows = []
    # Largest M first: on the H100 (2026-12-07) the M = 1-2 dispatch cells, timed right after the
    # fp16 column's M = 512 matmuls, came out up to 30 % above the same variant's sweep time, most on
    # the shapes with the heaviest fp16 GEMMs; a clock/power transient is the likely cause, so the
    # small, latency-bound cells are now timed last, after the light ones.
    for m in sorted(ms, reverse=True):
        cfg_m = plan.config_at(m)
        d = run_cfg(cfg_m, acts[m]).median_us
        fbest_key = min(fused, key=lambda key: fused[key].get(m, math.inf))
        best = {f: min((t[m] for key, t in fused.items() if family_of(key) == f and m in t),
                       default=math.inf) for f in FAMILIES}
        rows.append({
            "model": model, "layer": layer, "K": k, "N": n, "M": m,
            "fp16_us": round(fp16[m], 2),
            "fused_best_us": round(fused[fbest_key][m], 2),
            "fused_best_variant": fbest_key,
            **{f"{f}_best_us": round(best[f], 2) if math.isfinite(best[f]) else None for f in FAMILIES},
            "recon_us": round(min(rv[m] for rv in recon.values()), 2),
            "dispatch_us": round(d, 2),
            "dispatch_config": cfg_m.key(),
            "roofline_us": round(roofline_us(k, n, m, bw, tf), 2),
        })
        log(f"{model:11s} {layer:8s} {k:6d}x{n:<6d} M={m:4d} fp16 {fp16[m]:8.2f}  fused {fused[fbest_key][m]:8.2f} "
            f"[{fbest_key}]  recon {rows[-1]['recon_us']:8.2f}  dispatch {d:8.2f}  roof {rows[-1]['roofline_us']:7.2f}")
    rows.sort(key=lambda r: r["M"])
    torch.cuda.empty_cache()
    all_fused.setdefault(f"{k}x{n}", {}).update(
        {key: {str(m): round(v, 2) for m, v in d.items()} for key, d in fused.items()})
    all_recon.setdefault(f"{k}x{n}", {}).update(
        {str(c): {str(m): round(v, 2) for m, v in d.items()} for c, d in recon.items()})
    return rows


PEER_COLUMNS = {"marlin_us": "marlin_us", "exl_default_us": "exl_us", "fp16_us": "peer_fp16_us"}
"""peer_bench.py's column -> this table's (its fp16 is cuBLAS timed by the peers' harness; ours
stays `fp16_us`)."""


def merge_peers(rows: list[dict], peer_rows: list[dict], peer_card: str, card: str) -> None:
    """Copy the peers' per-(K, N, M) figures into `rows`. A row the peers have no cell for keeps
    the peer figures it already carries (a table whose peers were timed in pieces, e.g. M >= 16
    in one call and M <= 8 in another) and gets None where it has none. Raises ValueError for
    peers measured on another card model, or for a cell whose row already holds peer figures."""
    if card not in peer_card:
        raise ValueError(f"the peers were measured on {peer_card!r}, not on this {card}")
    by_cell = {(r["K"], r["N"], r["M"]): r for r in peer_rows}
    for row in rows:
        peer = by_cell.get((row["K"], row["N"], row["M"]))
        if peer is None:
            for ours in PEER_COLUMNS.values():
                row.setdefault(ours, None)
            continue
        if any(row.get(ours) is not None for ours in PEER_COLUMNS.values()):
            raise ValueError(f"cell {row['K']}x{row['N']} M={row['M']} already has peer figures")
        for theirs, ours in PEER_COLUMNS.items():
            v = peer.get(theirs)
            row[ours] = round(v, 2) if isinstance(v, (int, float)) else None


def load_peers(path: str) -> tuple[list[dict], str]:
    """peer_bench.py's rows and the card they were measured on (its peer_meta.json beside them)."""
    rows = json.loads(Path(path).read_text())
    meta = json.loads((Path(path).parent / "peer_meta.json").read_text())
    return rows, str(meta.get("device", ""))


class MergeError(ValueError):
    """Tables that cannot be joined into one (another card, another kernel build, a cell twice)."""


def join_tables(results: list[dict]) -> dict:
    """One table from several runs of this script on the same card model and kernel build (a
    table measured in pieces, e.g. shapes split over device calls of limited length): rows in
    run order, each run's per-variant figures and plans, each run's ceilings. Raises MergeError
    for runs on different cards or kernel builds, or a (K, N, M) cell measured twice."""
    first = results[0]
    card, build = first["device"]["name"], first.get("kernel_hash")
    seen: set[tuple[int, int, int]] = set()
    for r in results:
        if r["device"]["name"] != card:
            raise MergeError(f"runs on two cards: {card} and {r['device']['name']}")
        if r.get("kernel_hash") != build:
            raise MergeError(f"runs of two kernel builds: {build} and {r.get('kernel_hash')}")
        for row in r["rows"]:
            cell = (row["K"], row["N"], row["M"])
            if cell in seen:
                raise MergeError(f"cell {row['K']}x{row['N']} M={row['M']} is in two runs")
            seen.add(cell)
    if len(results) == 1:
        return dict(first)
    joined = dict(first)
    joined["rows"] = [row for r in results for row in r["rows"]]
    for key in ("fused_by_variant", "recon_by_chunk", "plans"):
        joined[key] = {k: v for r in results for k, v in r.get(key, {}).items()}
    joined["command"] = " + ".join(r["command"] for r in results)
    joined["ceilings_by_run"] = [r["ceilings"] for r in results]
    joined["seconds"] = round(sum(r.get("seconds", 0.0) for r in results), 1)
    joined["complete"] = all(r.get("complete", True) for r in results)
    return joined


def merge_file(result_paths: list[str], peers_path: str | None, output: str) -> int:
    """`--merge`: one table from the runs in `result_paths` (`join_tables`), with the peers
    merged in when `--peers` is given (a device call that timed the peers after the table: the
    peers' ExLlamaV2 build is CPU work that overlaps the table's GPU work)."""
    where = f"--merge {' '.join(result_paths)}"
    try:
        result = join_tables([json.loads(Path(p).read_text()) for p in result_paths])
        if peers_path:
            peer_rows, peer_card = load_peers(peers_path)
            merge_peers(result["rows"], peer_rows, peer_card, str(result["device"]["name"]))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {where}{f' --peers {peers_path}' if peers_path else ''}: {exc}", file=sys.stderr)
        return 2
    if peers_path:
        result["command"] += f" (peers merged: {peers_path})"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1))
    print(f"wrote {output}: {len(result['rows'])} rows of {len(result_paths)} run(s)"
          + (f" with the peers of {peer_card}" if peers_path else ""))
    return 0


all_fused: dict[str, dict[str, dict[str, float]]] = {}
all_recon: dict[str, dict[str, dict[str, float]]] = {}
plans_by_shape: dict[str, list[list]] = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma list of KxN (default: all eight)")
    ap.add_argument("--ms", default="", help="comma list of M (default: the 15 of the issue)")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma list of the fused families to sweep (default {','.join(FAMILIES)}; "
                         "wgmma and stream on sm_90 only)")
    ap.add_argument("--peers", help="peer_bench.py's peer.json from the same device call (its "
                                    "peer_meta.json beside it names the card): its Marlin, "
                                    "ExLlamaV2 and fp16 figures go into each row")
    ap.add_argument("--merge", metavar="RESULT", nargs="+",
                    help="measure nothing: join RESULTs, tables this script wrote on one card and "
                         "kernel build (e.g. shapes split over device calls), and merge --peers "
                         "(timed after them) if given; written to -o")
    ap.add_argument("-o", "--output", default="bench-kernels.json")
    args = ap.parse_args()
    if args.merge:
        return merge_file(args.merge, args.peers, args.output)
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = set(families) - set(FAMILIES)
    if unknown:
        print(f"error: --families: unknown {', '.join(sorted(unknown))} (choose from {', '.join(FAMILIES)})",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 1
    shapes = SHAPES
    if args.shapes:
        want = dict.fromkeys(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
        known = {(s[2], s[3]) for s in SHAPES}
        shapes = [s for s in SHAPES if (s[2], s[3]) in want]
        # a KxN outside the table's eight (e.g. Llama-3-8B's separate k/v, 4096x1024) is measured
        # too, as its own model; it used to be dropped without a word, leaving an empty table
        shapes += [("other", f"{k}x{n}", k, n) for k, n in want if (k, n) not in known]
    ms = [int(x) for x in args.ms.split(",")] if args.ms else MS
    dev = query_device()
    t0 = time.time()
    bw = timing.read_bandwidth_tbps()
    copy_bw = timing.copy_bandwidth_tbps()
    tf = timing.fp16_matmul_tflops()
    print(f"# {dev.name}  read {bw:.2f} TB/s (graph-captured copy {copy_bw:.2f})  fp16 matmul {tf:.0f} TFLOP/s",
          flush=True)
    rows: list[dict] = []

    def write(complete: bool) -> dict:
        # Written after every shape too ("complete": false), so a run cut off by a time limit
        # keeps the shapes it finished.
        result = {
            "what": "Per-call GPU time (µs) of 4-bit g128 GPTQ GEMMs, gemmtune kernels vs torch fp16",
            "method": "CUDA graph of 20 calls, each on a different weight copy (copies > 150 MB), "
                      "median of 15 event-timed replays; random data",
            "date": dt.date.today().isoformat(),
            "device": dev.to_dict(),
            "kernel_hash": kernel_hash(),
            "torch": torch.__version__,
            "command": "python bench/kernels.py " + " ".join(sys.argv[1:]),
            "ceilings": {"read_bandwidth_TBps": round(bw, 3), "copy_bandwidth_TBps": round(copy_bw, 3),
                         "fp16_matmul_TFLOPs": round(tf, 1)},
            "seconds": round(time.time() - t0, 1),
            "complete": complete,
            "rows": rows,
            "fused_by_variant": all_fused,
            "recon_by_chunk": all_recon,
            "plans": plans_by_shape,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        return result

    for model, layer, k, n in shapes:
        rows += bench_shape(model, layer, k, n, ms, bw, tf, lambda s: print(s, flush=True), families)
        write(complete=False)
    if args.peers:
        try:
            peer_rows, peer_card = load_peers(args.peers)
            merge_peers(rows, peer_rows, peer_card, dev.name)
        except (OSError, ValueError) as exc:
            print(f"error: --peers {args.peers}: {exc}", file=sys.stderr)
            return 2
    result = write(complete=True)
    print(f"wrote {args.output} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
