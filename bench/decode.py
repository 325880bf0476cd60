#!/usr/bin/env python3
"""Decode-step benchmark: a stack of Llama-3-8B decoder GEMMs through QuantLinear, per config.

A "step" is every layer's four GEMMs (fused qkv 4096x6144, o 4096x4096, fused gate_up
4096x28672, down 14336x4096) for one batch of M tokens, captured as ONE CUDA graph and timed
with `gemmtune.autotune.timing.graph_time` (GPU time; layers hold distinct weight copies, so L2
never holds the next weight). M = 1, 4, 16 are decode steps, M = 512 a prefill chunk. Configs:
`default`, `exllamav2-0.0.11`, `exllamav2-0.0.12` and `tuned` (what `gemmtune.runtime.lookup`
serves: `GEMMTUNE_PROFILE`/`--profile`, the database, or nothing — said so, never faked). torch
fp16 (`F.linear` on fp16 weights of the same shapes) is the baseline; "ratio" is fp16 time over
quantized time (> 1: faster than fp16). Also measures QuantLinear.forward's host overhead at
M = 1: eager calls (Python + launch) against graph replay.

    python bench/decode.py -o out/decode.json                 # 32 layers (~ a minute on an H100)
    python bench/decode.py --layers 8 --profile my.json        # tuned = that profile
    python bench/decode.py --lookup-only                       # CPU: 70B lookup cost from SQLite
    python bench/decode.py --gemv -o out/gemv.json             # per-layer M <= 8: stream vs decode

`--gemv` times single layers instead of a step: for each shape of GEMV_SHAPES and M of GEMV_MS,
the stream kernel's best of STREAM_CANDIDATES and the decode kernel's best of DECODE_CANDIDATES
(the per-shape winners of the H200 kernel benchmark), each checked first against the reconstruct
path on the same input, CUDA-graph timed over weight copies that defeat L2 (autotune.timing),
beside the read floor of the same run (`kernels/cuda/stream_read.cu`: the layer's checkpoint
bytes at the measured streaming-read bandwidth), the same probe reading just the layer's packed
weights in the same harness ("read": launch, first-touch latency and ramp included) and a launch
of nothing (stream_read over 16 bytes: what a graph node costs before any byte moves).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
PRESET_NAMES = ["default", "exllamav2-0.0.11", "exllamav2-0.0.12"]
MS = [1, 4, 16, 512]


def _layers(n_layers: int) -> list[list[Any]]:
    """n_layers x 4 QuantLinears on the GPU (one random layer per shape, copied per layer)."""
    from gemmtune.kernels.gptq import random_gptq
    from gemmtune.runtime import QuantLinear

    base = {name: random_gptq(k, n, 4, 128, False, "v1", generator=torch.Generator().manual_seed(k + n))
            for name, k, n in SHAPES}
    return [[QuantLinear.from_gptq_tensors(base[name].to("cuda")) for name, _, _ in SHAPES]
            for _ in range(n_layers)]


def _set_config(layers: list[list[Any]], config: Any) -> dict[str, str]:
    """Re-prepare every layer under `config` (None: looked up). Returns shape -> 'key (source)'."""
    used: dict[str, str] = {}
    for row in layers:
        for (name, _, _), q in zip(SHAPES, row, strict=True):
            q.requested_config = config
            q._invalidate()
            res = q.prepare()
            used[name] = res.label
    return used


def _step_fn(layers: list[list[Any]], m: int) -> Any:
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for k in (4096, 14336)}

    def step(_i: int) -> None:
        for row in layers:
            for (_, k, _), q in zip(SHAPES, row, strict=True):
                q(xs[k])
    return step


def _fp16_step_fn(n_layers: int, m: int) -> Any:
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _, k, n in SHAPES]
          for _ in range(n_layers)]
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.float16) for k in (4096, 14336)}

    def step(_i: int) -> None:
        for row in ws:
            for (_, k, _), w in zip(SHAPES, row, strict=True):
                torch.nn.functional.linear(xs[k], w)
    return step, ws


def host_overhead(repeats: int = 2000) -> dict[str, float]:
    """µs of host time per QuantLinear.forward at M = 1 (4096x4096): eager vs graph replay,
    with nn.Linear fp16 eager for scale. Wall time of many back-to-back calls, so the number is
    the host cost whenever it exceeds the tiny GPU time."""
    from gemmtune.kernels.gptq import random_gptq
    from gemmtune.runtime import QuantLinear

    q = QuantLinear.from_gptq_tensors(random_gptq(4096, 4096, 4, 128).to("cuda"), config="default")
    q.prepare()
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)

    def wall(fn: Any) -> float:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats * 1e6

    eager = wall(lambda: q(x))
    eager_lin = wall(lambda: lin(x))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q(x)
    replay = wall(g.replay)
    return {"quantlinear_eager_us": eager, "nn_linear_fp16_eager_us": eager_lin,
            "quantlinear_graph_replay_us": replay}


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from gemmtune.autotune.timing import graph_time
    from gemmtune.kernels.device import query_device
    from gemmtune.kernels.sources import kernel_hash
    from gemmtune.runtime import clear_cache

    if args.profile:
        os.environ["GEMMTUNE_PROFILE"] = str(Path(args.profile).resolve())
    clear_cache()
    dev = query_device()
    layers = _layers(args.layers)
    results: dict[str, Any] = {"configs": {}, "fp16": {}}
    fp16_us: dict[int, float] = {}
    for m in args.ms:
        step, ws = _fp16_step_fn(args.layers, m)
        fp16_us[m] = graph_time(step, calls=1, repeats=args.repeats).median_us
        del ws, step
        torch.cuda.empty_cache()
        results["fp16"][str(m)] = {"step_us": fp16_us[m], "tokens_per_s": m / fp16_us[m] * 1e6}
    for name in [*PRESET_NAMES, "tuned"]:
        used = _set_config(layers, None if name == "tuned" else name)
        tuned_any = name != "tuned" or any(not u.endswith("(default)") for u in used.values())
        row: dict[str, Any] = {"configs": used, "tuned_found": tuned_any, "ms": {}}
        for m in args.ms:
            us = graph_time(_step_fn(layers, m), calls=1, repeats=args.repeats).median_us
            row["ms"][str(m)] = {"step_us": us, "tokens_per_s": m / us * 1e6,
                                 "ratio_vs_fp16": fp16_us[m] / us}
            print(f"{name:18s} M={m:4d} step {us:9.1f} us  {m / us * 1e6:10.0f} tok/s  "
                  f"x{fp16_us[m] / us:.2f} vs fp16", file=sys.stderr)
        results["configs"][name] = row
    if not results["configs"]["tuned"]["tuned_found"]:
        results["note"] = ("nothing tuned for this device and kernel hash: 'tuned' resolved to the "
                           "default config everywhere (run `gemmtune tune` or pass --profile)")
    results["host_overhead"] = host_overhead()
    results["meta"] = {"device": dev.to_dict(), "kernel_hash": kernel_hash(), "layers": args.layers,
                       "date": dt.datetime.now(dt.UTC).isoformat(), "torch": torch.__version__,
                       "command": " ".join(sys.argv)}
    return results


def markdown(res: dict[str, Any]) -> str:
    ms = list(res["fp16"])
    lines = [f"Decode step, {res['meta']['layers']} Llama-3-8B layers (qkv/o/gate_up/down, 4-bit g128), "
             f"{res['meta']['device']['name']}, {res['meta']['date'][:10]}. tok/s-equivalent = M / step "
             "time; ratio = fp16 time / quantized time.", "",
             "| config | " + " | ".join(f"M={m} tok/s (ratio)" for m in ms) + " |",
             "|---|" + "---|" * len(ms)]
    lines.append("| torch fp16 | " + " | ".join(f"{res['fp16'][m]['tokens_per_s']:.0f}" for m in ms) + " |")
    for name, row in res["configs"].items():
        label = name if row["tuned_found"] else f"{name} (nothing tuned = default)"
        lines.append(f"| {label} | " + " | ".join(
            f"{row['ms'][m]['tokens_per_s']:.0f} ({row['ms'][m]['ratio_vs_fp16']:.2f})" for m in ms) + " |")
    h = res["host_overhead"]
    lines += ["", f"Host overhead at M=1 (4096x4096): QuantLinear eager {h['quantlinear_eager_us']:.1f} µs/call, "
              f"nn.Linear fp16 eager {h['nn_linear_fp16_eager_us']:.1f} µs/call, "
              f"QuantLinear in a CUDA graph {h['quantlinear_graph_replay_us']:.1f} µs/replay."]
    return "\n".join(lines)


def lookup_only(layers: int = 80) -> dict[str, float]:
    """Cost of resolving every layer of a 70B model (80 layers x 4 problems) from a warm SQLite
    file holding tuned entries (plus 200 unrelated ones), as a model load does it."""
    from datetime import UTC, datetime

    from gemmtune.db.store import Store, TunedEntry
    from gemmtune.kernels import WORKLOADS, DeviceInfo, KernelConfig, Problem
    from gemmtune.runtime import clear_cache, lookup
    from gemmtune.runtime.lookup import current_kernel_hash

    dev = DeviceInfo("nvidia", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30)
    problems = [Problem(8192, 10240), Problem(8192, 8192), Problem(8192, 57344), Problem(28672, 8192)]
    filler = [Problem(k, n) for k in (1024, 2048, 3072, 5120, 6144) for n in range(1024, 41 * 1024, 1024)]
    cfg = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8)
    wl = WORKLOADS["decode"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tuning.db"
        entries = [TunedEntry(device=dev.to_dict(), kernel_hash=current_kernel_hash(),
                              problem={"k": p.k, "n": p.n, "bits": 4, "group_size": 128, "act_order": False},
                              problem_key=p.key(), workload={"name": wl.name, "ms": list(wl.ms),
                                                             "weights": list(wl.weights)},
                              workload_key=wl.key(), config=cfg.to_dict(), objective_us=10.0,
                              default_objective_us=12.0, latencies_us={m: 1.0 for m in wl.ms},
                              default_latencies_us={m: 1.2 for m in wl.ms},
                              created_at=datetime.now(UTC))
                   for p in problems + filler[:200]]
        with Store.open(str(path)) as store:
            store.import_entries(entries)
        os.environ["GEMMTUNE_DB"] = str(path)
        os.environ.pop("GEMMTUNE_PROFILE", None)
        path.read_bytes()  # warm: the file is in the page cache
        timings = []
        for _ in range(5):
            clear_cache()
            t0 = time.perf_counter()
            got = [lookup(dev, p) for _ in range(layers) for p in problems]
            timings.append((time.perf_counter() - t0) * 1e3)
            assert all(r.source == "database" for r in got), got[0]
        t0 = time.perf_counter()
        for _ in range(layers):
            for p in problems:
                lookup(dev, p)
        cached_us = (time.perf_counter() - t0) * 1e6 / (layers * len(problems))
        clear_cache()
    return {"load_ms_first": timings[0], "load_ms_median": sorted(timings)[2],
            "cached_lookup_us": cached_us, "layers": layers, "distinct_problems": len(problems)}


GEMV_SHAPES = [(4096, 4096), (4096, 1024), (4096, 6144), (14336, 4096), (8192, 8192),
               (8192, 57344), (28672, 8192), (4096, 28672), (8192, 10240)]
GEMV_MS = [1, 2, 4, 8]
STREAM_CANDIDATES = [
    # (warps_n, warps_k, chunk, slots, split_k): split_k 0 = the launch plan picks the cluster.
    (1, 16, 4, 2, 0), (1, 8, 4, 4, 0), (1, 8, 8, 2, 0), (2, 8, 4, 2, 0), (1, 8, 2, 4, 0),
    (1, 16, 2, 4, 0), (2, 4, 8, 2, 0), (1, 4, 8, 4, 0),
    (1, 16, 4, 2, 1), (1, 8, 4, 4, 1),  # one CTA per K slice (no cluster)
    (1, 8, 4, 4, 4), (1, 8, 4, 4, 8),  # clusters of 4 and 8 whatever the layer
]
DECODE_CANDIDATES = ["mk16-bn128-t128-sk0-u2", "mk8-bn128-t128-sk0-u8", "mk16-bn64-t64-sk0-u2",
                     "mk32-bn128-t128-sk0-u2", "mk64-bn128-t128-sk0-u1", "mk64-bn64-t64-sk0-u1",
                     "mk8-bn128-t128-sk0-u2", "mk16-bn128-t128-sk0-u4", "mk8-bn64-t64-sk0-u2",
                     "mk16-bn64-t256-sk0-u4"]


def _floor_us(k: int, n: int, m: int, bw_tbps: float, group: int = 128) -> float:
    """The layer's fewest bytes (checkpoint weight, scales and packed zeros, A, C) at the
    streaming-read bandwidth: bench/kernels.py's roofline without its (here negligible) FLOP term."""
    g = k // group
    nbytes = k * n // 2 + g * n * 2 + g * n // 2 + m * k * 2 + m * n * 2
    return nbytes / (bw_tbps * 1e12) * 1e6


def _read_us(tensors: list[torch.Tensor]) -> float:
    """GPU time per call of `kernels/cuda/stream_read.cu` reading one of `tensors` (the layer's
    packed weights) whole, rotated and graph-timed exactly as the GEMMs are: what reading these
    bytes costs a kernel in this harness, launch, first-touch latency and ramp included -- the
    floor a small layer can actually reach, beside the bandwidth floor."""
    from gemmtune.autotune import timing
    from gemmtune.kernels import compile as ck

    probe = ck.StreamReadVariant()
    dev = torch.cuda.current_device()
    fn = ck.get_kernel(probe, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    grid = (sms * ck.blocks_per_sm(fn, probe.threads), 1, 1)
    sink = torch.zeros(grid[0], dtype=torch.int32, device="cuda")
    words = tensors[0].numel() * tensors[0].element_size() // 16
    args = [(ck.ptr(t.data_ptr()), ck.i64(words), ck.ptr(sink.data_ptr())) for t in tensors]
    return timing.graph_time(lambda i: ck.launch(fn, grid, probe.threads, args[i % len(args)],
                                                 torch.cuda.current_stream().cuda_stream)).median_us


def _gemv_shape(k: int, n: int, ms: list[int], streams: list[Any], decodes: list[Any], bw: float,
                failures: list[str]) -> list[dict[str, Any]]:
    """One shape of `gemv_bench`: every candidate at every M, checked, then timed."""
    from gemmtune.autotune import timing
    from gemmtune.kernels import reference
    from gemmtune.kernels.config import KernelConfig
    from gemmtune.kernels.dispatch import plan_for
    from gemmtune.kernels.gptq import random_gptq
    from gemmtune.kernels.weights import QuantizedWeight

    t = random_gptq(k, n, 4, 128, False, "v1", generator=torch.Generator().manual_seed(k + 3 * n))
    copies = timing.copies_needed(t.problem.weight_bytes())
    weights = [QuantizedWeight(t, "cuda") for _ in range(copies)]
    acts = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in ms}
    recon = KernelConfig(max_q_gemm_rows=0)
    refs = {m: plan_for(weights[0], recon)(acts[m]).float() for m in ms}
    read_us = _read_us([w.qweight for w in weights])
    tol = reference.fp16_tolerance(k)

    def measure(cfg: KernelConfig, m: int) -> float | None:
        key = f"{k}x{n} M={m} {cfg.variant_key()}"
        try:
            plans = [plan_for(w, cfg) for w in weights]
            plans[0].prepare((m,))
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            plans[0](acts[m], out)
            torch.cuda.synchronize()
            err = reference.relative_error(out.float(), refs[m])
            if not err < tol:  # NaN (an unwritten output) fails too
                failures.append(f"{key}: relative error {err:.2e} over {tol:.2e}")
                return None
            return timing.graph_time(lambda i: plans[i % copies](acts[m])).median_us
        except Exception as exc:  # a variant that cannot run is a result, not a crash
            failures.append(f"{key}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return None

    rows = []
    for m in ms:
        st = {c.variant_key(): measure(c, m) for c in streams}
        de = {c.variant_key(): measure(c, m) for c in decodes}
        floor = _floor_us(k, n, m, bw)
        sbest = min(((v, key) for key, v in st.items() if v is not None), default=(math.nan, ""))
        dbest = min(((v, key) for key, v in de.items() if v is not None), default=(math.nan, ""))
        row = {"K": k, "N": n, "M": m, "floor_us": round(floor, 3), "read_us": round(read_us, 3),
               "stream_us": round(sbest[0], 3), "stream_variant": sbest[1],
               "stream_pct_floor": round(100 * floor / sbest[0], 1),
               "decode_us": round(dbest[0], 3), "decode_variant": dbest[1],
               "decode_pct_floor": round(100 * floor / dbest[0], 1),
               "stream_vs_decode": round(dbest[0] / sbest[0], 2),
               "stream_all": {key: (round(v, 3) if v is not None else None) for key, v in st.items()},
               "decode_all": {key: (round(v, 3) if v is not None else None) for key, v in de.items()}}
        rows.append(row)
        print(f"{k:6d}x{n:<6d} M={m}  floor {floor:7.2f}  read {read_us:7.2f}  stream {sbest[0]:7.2f} ({row['stream_pct_floor']:5.1f}%) "
              f"[{sbest[1]}]  decode {dbest[0]:7.2f} ({row['decode_pct_floor']:5.1f}%) [{dbest[1]}]  "
              f"x{row['stream_vs_decode']:.2f}", file=sys.stderr, flush=True)
    return rows


def gemv_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Single-layer M <= 8 timings: stream kernel vs decode kernel vs the read floor."""
    from gemmtune.autotune import timing
    from gemmtune.kernels import compile as ck
    from gemmtune.kernels.config import STREAM, KernelConfig
    from gemmtune.kernels.device import query_device
    from gemmtune.kernels.sources import kernel_hash

    dev = query_device()
    bw = timing.read_bandwidth_tbps()
    probe = ck.StreamReadVariant()
    fn = ck.get_kernel(probe, torch.cuda.current_device())
    src = torch.zeros(4, dtype=torch.int32, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    empty_us = timing.graph_time(lambda i: ck.launch(
        fn, (1, 1, 1), probe.threads, (ck.ptr(src.data_ptr()), ck.i64(1), ck.ptr(sink.data_ptr())),
        torch.cuda.current_stream().cuda_stream)).median_us
    print(f"# {dev.name}: read {bw:.2f} TB/s, an empty launch {empty_us:.2f} us", file=sys.stderr, flush=True)
    streams = [KernelConfig(max_q_gemm_rows=max(args.gemv_ms), kernel=STREAM, stream_warps_n=wn,
                            stream_warps_k=wk, stream_chunk=ch, stream_slots=sl, split_k=sk)
               for wn, wk, ch, sl, sk in STREAM_CANDIDATES]
    decodes = [KernelConfig.from_variant_key(key).replace(max_q_gemm_rows=64) for key in DECODE_CANDIDATES]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for k, n in args.gemv_shapes:
        rows += _gemv_shape(k, n, args.gemv_ms, streams, decodes, bw, failures)
        torch.cuda.empty_cache()
    return {"what": "single-layer decode GEMM (4-bit g128), stream vs decode kernel vs read floor",
            "device": dev.to_dict(), "kernel_hash": kernel_hash(), "date": dt.datetime.now(dt.UTC).isoformat(),
            "read_bandwidth_TBps": round(bw, 3), "empty_launch_us": round(empty_us, 3),
            "command": " ".join(sys.argv), "rows": rows, "failures": failures}


def gemv_markdown(res: dict[str, Any]) -> str:
    lines = [f"Single-layer decode GEMM, 4-bit g128, {res['device']['name']}, {res['date'][:10]}; read "
             f"{res['read_bandwidth_TBps']} TB/s, an empty launch {res['empty_launch_us']} µs.", "",
             "| K x N | M | floor µs | read µs | stream µs (% floor) | decode µs (% floor) | stream speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['floor_us']:.2f} | {r.get('read_us', math.nan):.2f} "
                     f"| {r['stream_us']:.2f} "
                     f"({r['stream_pct_floor']:.0f} %) | {r['decode_us']:.2f} ({r['decode_pct_floor']:.0f} %) "
                     f"| {r['stream_vs_decode']:.2f}x |")
    if res["failures"]:
        lines += ["", f"{len(res['failures'])} variant runs failed:"] + [f"- {f}" for f in res["failures"][:40]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="write the results as JSON here")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile", help="profile JSON to serve the 'tuned' configs")
    ap.add_argument("--lookup-only", action="store_true", help="only time the 70B lookup (CPU)")
    ap.add_argument("--gemv", action="store_true",
                    help="single layers at M <= 8: stream kernel vs decode kernel vs read floor")
    ap.add_argument("--gemv-shapes", default=",".join(f"{k}x{n}" for k, n in GEMV_SHAPES))
    ap.add_argument("--gemv-ms", default=",".join(map(str, GEMV_MS)))
    args = ap.parse_args()
    args.ms = [int(m) for m in args.ms.split(",")]
    args.gemv_shapes = [tuple(int(x) for x in s.split("x")) for s in args.gemv_shapes.split(",")]
    args.gemv_ms = [int(m) for m in args.gemv_ms.split(",")]
    if args.gemv:
        if not torch.cuda.is_available():
            sys.exit("bench/decode.py --gemv needs a CUDA GPU")
        res = gemv_bench(args)
        text = gemv_markdown(res)
    elif args.lookup_only:
        res: dict[str, Any] = {"lookup_70b": lookup_only()}
        text = json.dumps(res, indent=2)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/decode.py needs a CUDA GPU (use --lookup-only on a CPU machine)")
        res = run_gpu(args)
        res["lookup_70b"] = lookup_only()
        text = markdown(res)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
