#!/usr/bin/env python3
"""Render a `bench/kernels.py` JSON result as the BENCHMARKS.md kernel table.

Peers merged into the rows by `bench/kernels.py --peers` (same device call) are used as they are;
otherwise, with `--anchor` (the peers' timings on the same card model, same shapes × M) the table adds
ExLlamaV2 0.3.2's shipped dispatch, Marlin where the anchor has it, and each cell's ratio to the
best peer; an anchor from another card model is ignored. torch fp16 is always the figure
re-measured in *our* run, so the ratio to it is same-run.

The roofline's bandwidth is the streaming-read ceiling of the same run (`read_bandwidth_TBps`);
results from before it existed fall back to their copy bandwidth and say so.

    python bench/report.py out/kernels.json --anchor h200-2026-12-01.json   # peers' timings, same card model
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemmtune.kernels.workload import Workload


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def same_run_peers(result: dict) -> dict | None:
    """The peers' figures that `bench/kernels.py --peers` put into the rows (taken in the same
    device call), in the anchor's shape (a cell needs ExLlamaV2's figure, as an anchor's does);
    None when the rows carry none."""
    rows = [{"K": r["K"], "N": r["N"], "M": r["M"], "exl_default_us": r["exl_us"],
             "marlin_us": r.get("marlin_us")} for r in result["rows"] if r.get("exl_us")]
    return {"what": f"peers measured in the same run on {result['device']['name']}",
            "rows": rows} if rows else None


def render(result: dict, anchor: dict | None, replan: bool = False) -> str:
    rows = result["rows"]
    anc = {}
    if anchor:
        anc = {(r["K"], r["N"], r["M"]): r for r in anchor["rows"]}
    dev = result["device"]
    ceil = result["ceilings"]
    read_bw = ceil.get("read_bandwidth_TBps")
    bw = read_bw or ceil["copy_bandwidth_TBps"]
    bw_text = (f"streaming-read bandwidth {read_bw:.2f} TB/s (the roofline's; a graph-captured torch copy "
               f"ran at {ceil['copy_bandwidth_TBps']:.2f} TB/s read + write)" if read_bw else
               f"copy bandwidth {bw:.2f} TB/s (read + write; this run predates the streaming-read ceiling)")
    out = [
        f"Card: **{dev['name']}** ({dev['sm_count']} SMs, driver {dev['driver_version']}, "
        f"CUDA runtime {dev['runtime_version']}), date {result['date']}, kernel hash "
        f"`{result['kernel_hash'][:12]}`, torch {result['torch']}.",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s).",
        f"Method: {result['method']}.",
        f"Ceilings measured in the same run: {bw_text}, fp16 matmul "
        f"{ceil['fp16_matmul_TFLOPs']:.0f} TFLOP/s; roofline = "
        "max(bytes ÷ bandwidth, FLOPs ÷ peak), bytes = 4-bit weight + scales + zeros + A + C.",
        "",
        "µs per call (median). *fused* = best fused variant at that M (decode or tiled kernel); "
        "*recon* = reconstruct + cuBLAS (best chunking); *dispatch* = the shape's plan over M "
        "bands as the tuner's DP builds it from these measurements (each M weighted by 1 / its "
        "fp16 time), re-measured with each M's band config, as a tuned model runs it.",
        "",
    ]
    extra = [f for f in ("wgmma", "stream") if any(r.get(f"{f}_best_us") for r in rows)]
    head = ("| shape K×N | M | torch fp16 | decode kernel | tiled kernel | "
            + "".join(f"{f} kernel | " for f in extra)
            + "recon | dispatch | dispatch ÷ fp16 | roofline | eff. |")
    sep = "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)
    has_marlin = any(a.get("marlin_us") for a in anc.values())
    if anc:
        head += " ExLlamaV2 0.3.2 | fused ÷ ExL | dispatch ÷ ExL |"
        sep += "---|---|---|"
        if has_marlin:
            head += " Marlin | best peer | dispatch ÷ best peer |"
            sep += "---|---|---|"
    out += [head, sep]
    effs, vs_exl_small, worse, vs_best = [], [], [], []
    for r in rows:
        eff = r["roofline_us"] / r["dispatch_us"]
        effs.append(eff)
        dec = r.get("decode_best_us", r["fused_best_us"])
        til = r.get("tiled_best_us")
        line = (f"| {r['K']}×{r['N']} | {r['M']} | {r['fp16_us']:.1f} | "
                f"{'–' if dec is None else f'{dec:.1f}'} | {'–' if til is None else f'{til:.1f}'} | "
                + "".join(f"{_us(r.get(f'{f}_best_us'))} | " for f in extra)
                + f"{r['recon_us']:.1f} | {r['dispatch_us']:.1f} | {r['dispatch_us'] / r['fp16_us']:.2f} | "
                f"{r['roofline_us']:.1f} | {eff:.2f} |")
        a = anc.get((r["K"], r["N"], r["M"]))
        if a:
            exl = a["exl_default_us"]
            line += f" {exl:.1f} | {r['fused_best_us'] / exl:.2f} | {r['dispatch_us'] / exl:.2f} |"
            if r["M"] <= 16:
                vs_exl_small.append(exl / r["fused_best_us"])
            if r["dispatch_us"] > exl:
                worse.append(f"{r['K']}×{r['N']} M={r['M']} ({r['dispatch_us']:.1f} vs {exl:.1f})")
            if has_marlin:
                peers = [v for v in (r["fp16_us"], exl, a.get("marlin_us")) if v]
                best = min(peers)
                vs_best.append(r["dispatch_us"] / best)
                marlin = f"{a['marlin_us']:.1f}" if a.get("marlin_us") else "–"
                line += f" {marlin} | {best:.1f} | {r['dispatch_us'] / best:.2f} |"
        out.append(line)
    out.append("")
    out.append(f"Geometric-mean roofline efficiency of the dispatch over {len(effs)} cells: "
               f"**{geomean(effs):.2f}**.")
    big = [r for r in rows if r["M"] >= 64]
    if big:
        worst = max(big, key=lambda r: r["dispatch_us"] / r["fp16_us"])
        out.append(f"M ≥ 64: dispatch ÷ torch fp16 ranges {min(r['dispatch_us'] / r['fp16_us'] for r in big):.2f}"
                   f"–{worst['dispatch_us'] / worst['fp16_us']:.2f} (worst {worst['K']}×{worst['N']} M={worst['M']}).")
    m1 = [r for r in rows if r["M"] == 1]
    for r in m1:
        floor = (r["K"] * r["N"] // 2 + (r["K"] // 128) * r["N"] * 2.5) / (bw * 1e12) * 1e6
        out.append(f"M = 1, {r['K']}×{r['N']}: fused {r['fused_best_us']:.1f} µs = "
                   f"{floor / r['fused_best_us'] * 100:.0f} % of the weight-read floor "
                   f"({floor:.1f} µs at {bw:.2f} TB/s).")
    if anc:
        out.append(f"M ≤ 16: best fused ÷ ExLlamaV2 speedup, geometric mean {geomean(vs_exl_small):.2f}×, "
                   f"min {min(vs_exl_small):.2f}×, max {max(vs_exl_small):.2f}×.")
        out.append("Cells where the dispatch is slower than ExLlamaV2's shipped dispatch: "
                   + (", ".join(worse) if worse else "none") + ".")
    out += targets(rows, anc)
    if replan and "fused_by_variant" in result:
        again = replanned(result)
        out.append("")
        out.append("With this checkout's band rule, priced from the same run's per-variant timings "
                   "(not re-measured):")
        best = [r["dispatch_us"] / min(v for v in (r["fp16_us"], a["exl_default_us"], a.get("marlin_us")) if v)
                for r in again for a in [anc.get((r["K"], r["N"], r["M"]))] if a]
        if best:
            out.append(f"dispatch ÷ best peer, geometric mean **{geomean(best):.2f}** over {len(best)} "
                       f"cells, faster than the best peer in {sum(b < 1 for b in best)}.")
        out += targets(again, anc)
    if vs_best:
        out.append(f"Dispatch ÷ best peer per cell (min of torch fp16 same-run, ExLlamaV2, Marlin): geometric "
                   f"mean **{geomean(vs_best):.2f}** over {len(vs_best)} cells; faster than the best peer in "
                   f"{sum(v < 1 for v in vs_best)}.")
    return "\n".join(out) + "\n"


def bench_workload(fp16_us: dict[int, float]) -> Workload:
    """The workload a shape's plan is built for in the kernel benchmark: its Ms, each weighted by
    1 / its torch fp16 time, so every M counts about equally (as in a geometric mean) instead of
    the largest M dominating a sum of microseconds. bench/kernels.py plans with it, `--replan`
    re-plans with it."""
    from gemmtune.kernels.workload import Workload

    ms = tuple(sorted(fp16_us))
    return Workload("bench", ms, tuple(1.0 / fp16_us[m] for m in ms))


def replanned(result: dict) -> list[dict]:
    """The rows with `dispatch_us` priced from this run's per-variant timings under the current
    band rule (`autotune.bands.plan_bands`, the tuner's DP), not re-measured: what the plan rule
    of this checkout would dispatch, when the run was made with an older rule."""
    from gemmtune.autotune.bands import Measured, plan_bands
    from gemmtune.kernels.config import KernelConfig

    out = []
    by_shape: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_shape.setdefault(f"{r['K']}x{r['N']}", []).append(r)
    for shape, rows in by_shape.items():
        fused = [Measured(KernelConfig.from_variant_key(key), {int(m): v for m, v in d.items()})
                 for key, d in result["fused_by_variant"][shape].items()]
        recon = {int(c): {int(m): v for m, v in d.items()}
                 for c, d in result["recon_by_chunk"][shape].items()}
        plan = plan_bands(fused, recon, bench_workload({r["M"]: r["fp16_us"] for r in rows}))
        assert plan is not None
        out += [{**r, "dispatch_us": plan.latencies_us[r["M"]]} for r in rows]
    return out


def targets(rows: list[dict], anc: dict) -> list[str]:
    """The decode and GEMM issues' targets, cell by cell (what was reached, not pass/fail)."""
    out = []
    small = [(r, anc.get((r["K"], r["N"], r["M"]))) for r in rows if r["M"] <= 8]
    small = [(r, a) for r, a in small if a]
    if small:
        lose = [f"{r['K']}×{r['N']} M={r['M']} ({r['dispatch_us']:.1f} vs {best:.1f})"
                for r, a in small
                for best in [min(v for v in (r["fp16_us"], a["exl_default_us"], a.get("marlin_us")) if v)]
                if r["dispatch_us"] >= best]
        out.append(f"M ≤ 8: the dispatch is faster than min(Marlin, ExLlamaV2, torch fp16) in "
                   f"{len(small) - len(lose)} of {len(small)} cells"
                   + (f"; not in {', '.join(lose)}." if lose else "."))
    mid = [(r, anc.get((r["K"], r["N"], r["M"]))) for r in rows if 16 <= r["M"] <= 128]
    mid = [(r, a["marlin_us"]) for r, a in mid if a and a.get("marlin_us")]
    if mid:
        lose = [f"{r['K']}×{r['N']} M={r['M']} ({r['dispatch_us'] / m:.2f}×)" for r, m in mid
                if r["dispatch_us"] >= m]
        out.append(f"16 ≤ M ≤ 128: the dispatch is faster than Marlin in {len(mid) - len(lose)} of "
                   f"{len(mid)} cells; dispatch ÷ Marlin geometric mean "
                   f"{geomean([r['dispatch_us'] / m for r, m in mid]):.2f}"
                   + (f"; slower in {', '.join(lose)}." if lose else "."))
    m16 = [r for r in rows if r["M"] == 16]
    if m16:
        out.append("M = 16, torch fp16 ÷ dispatch: " + ", ".join(
            f"{r['K']}×{r['N']} {r['fp16_us'] / r['dispatch_us']:.2f}×" for r in m16) + " (target ≥ 3×).")
    big = [r for r in rows if r["M"] >= 256]
    if big:
        out.append("M ≥ 256, dispatch ÷ torch fp16: " + ", ".join(
            f"{r['K']}×{r['N']} M={r['M']} {r['dispatch_us'] / r['fp16_us']:.2f}" for r in big)
            + " (target ≤ 1.1).")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--anchor", help="peers' timings JSON (same card model only)")
    ap.add_argument("--replan", action="store_true",
                    help="also price the dispatch under this checkout's band rule from the run's "
                         "per-variant timings (for a run made with an older rule)")
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text())
    anchor = json.loads(Path(args.anchor).read_text()) if args.anchor else same_run_peers(result)
    if anchor and result["device"]["name"] not in anchor["what"]:
        anchor = None  # another card model: its figures are history, not peers of this run
    print(render(result, anchor, args.replan), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
