#!/usr/bin/env python3
"""Tokens per second of real generation: full-depth transformers Llamas, compiled, torch fp16
against gemmtune's configs.

Why: `bench/decode.py` times the GEMMs of a decode step; what a user gains is tokens per second
of a whole model (attention, norms, the LM head and the host included), run the way users run
models now: `torch.compile(fullgraph=True)` with a static KV cache and CUDA graphs.

Models: `LlamaForCausalLM` of the Llama-2-13B and Llama-3-8B architectures (and, asked for,
Llama-2-70B; dims from `gemmtune.autotune.models.MODEL_PRESETS`, full depth), random weights,
nothing downloaded. The fp16 model is built on the GPU; the quantized one is the same model whose
every linear except the LM head is replaced by a `QuantLinear` holding random 4-bit g128 GPTQ
weights drawn on the GPU, so both share embeddings, norms and head. Without the fp16 row the
quantized model is built on the `meta` device and only its quantized layers, embeddings, norms
and head are ever allocated (a 70B model's fp16 weights would not fit one card).

Rows, the same run for each (same prompts, batches, steps, cache length, repeats):
  fp16               the model with its fp16 nn.Linear weights
  default, exllamav2-0.0.12   every QuantLinear pinned to that preset
  tuned              what the runtime serves from a database holding a `decode` and a `mixed`
                     tune of the GEMMs the model runs (`gemmtune tune --model`'s transformers
                     layout: q+k+v, o, gate+up, down, as the runtime fuses them; with
                     --no-fuse the separate projections); by default tuned now into a fresh
                     database (`--trials` per shape), or `--db URL` of an existing tune
Fusion: the quantized rows run q/k/v and gate/up as one GEMM each (runtime/fusion.py, what
`patch` / `load_quantized` do by default); `--no-fuse` runs every projection alone.
Measured:
  prefill            one compiled forward of a [1, PROMPT] prompt into an empty static cache
                     (CUDA events, median of --repeats)
  decode             at each batch B: B prompts are prefilled (eager, untimed), then one greedy
                     decode step (compiled forward of [B, 1] + argmax into the next input) is
                     captured as a CUDA graph and replayed --steps times; tokens/s = B * steps /
                     time, median of --repeats (every repeat restarts at the prompt's end)
  weights            bytes the model's quantizable linears hold for their weights once
                     loaded (fp16: their nn.Linear weights; quantized: `QuantLinear.
                     resident_bytes`, the kernel layout, against `packed` bytes of the checkpoint)
  peak memory        torch.cuda.max_memory_allocated over the row's run (weights, cache,
                     workspace, graphs); `load_peak_gib` of a model: the peak while its
                     quantized layers were built and prepared
  GEMM share         measured, not estimated: a few replays of each captured decode step under
                     torch.profiler; the GPU time of gemmtune's kernels (the quantized linears;
                     the fp16 row: cuBLAS's GEMMs of its linears and head) per step against the
                     step's time; the JSON keeps every kernel class's time per step

Switching between the quantized rows re-prepares the layers; the compiled graph is reused (the
op names the layer, not its plan: runtime/ops.py) and only the CUDA graphs are captured again.

    python bench/generate.py -o out/generate.json                       # both models, every row
    python bench/generate.py --model llama-2-13b --batches 1 --repeats 3 --steps 16 -o g.json
    python bench/generate.py --db ./tuning.db --no-tune -o g.json       # tuned = that database
    python bench/generate.py --report out/13b.json out/8b.json          # the BENCHMARKS.md tables

Each model costs one compile per phase (prefill, and decode per batch size) for fp16 and one
for the quantized model (shared by its rows): about 20-40 s each for a 40-layer model, so run
one model per command when time is short, and `--layers 2 --batches 1 --steps 4 --repeats 1`
for a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "gemmtune-generate"
SCHEMA_VERSION = 1
QUANT_ROWS = ("default", "exllamav2-0.0.12", "tuned")
ROWS = ("fp16", *QUANT_ROWS)
ROW_LABELS = {"fp16": "torch fp16"}
TUNE_WORKLOADS = ("decode", "mixed")  # the pair the runtime splits at M <= 8 (README)
GROUP_SIZE = 128

# What the presets do not hold (published config.json values); speed does not depend on them
# except the vocabulary, which sizes the embedding and the LM head.
ARCH_EXTRA: dict[str, dict[str, Any]] = {
    "llama-2-13b": {"vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama-3-8b": {"vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "llama-2-70b": {"vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0},
}
DEFAULT_MODELS = ["llama-2-13b", "llama-3-8b"]

# Random GPTQ scales: (q - 8) * scale with q uniform in 0..15 has a standard deviation near
# 0.02, transformers' initializer_range, so activations stay finite through 40 layers.
SCALE = 0.004


# -- models ------------------------------------------------------------------------------------

def llama_config(name: str, layers: int | None = None) -> Any:
    """A `transformers.LlamaConfig` of the named architecture (`--layers` shortens it)."""
    import transformers
    from gemmtune.autotune.models import MODEL_PRESETS

    if name not in ARCH_EXTRA:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(ARCH_EXTRA)}")
    spec, extra = MODEL_PRESETS[name], ARCH_EXTRA[name]
    return transformers.LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim, num_hidden_layers=layers or spec.num_hidden_layers,
        vocab_size=extra["vocab_size"], max_position_embeddings=extra["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": extra["rope_theta"]},
        rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=True)


def build_model(config: Any, device: torch.device | str, dtype: torch.dtype = torch.float16) -> Any:
    """The model with random weights, built directly on `device` ("meta": no memory)."""
    import transformers

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def quantizable(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears GPTQ checkpoints quantize: all but the LM head."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct (K, N) of the quantizable linears, in model order."""
    return list(dict.fromkeys((m.in_features, m.out_features) for _, m in quantizable(model)))


def gemm_shapes(config: Any, fuse: bool = True) -> list[tuple[int, int]]:
    """Distinct (K, N) of the GEMMs the quantized model runs, in model order: what `tuned`
    tunes. The tuner's own rule (`gemmtune tune --model`'s `transformers` layout, or
    `separate` without fusion), so the shapes tuned are the shapes the runtime serves."""
    from gemmtune.autotune.models import spec_from_config, spec_layers

    spec = spec_from_config(json.loads(config.to_json_string()), "config")
    layers = spec_layers(spec, 4, GROUP_SIZE, False, layout="transformers" if fuse else "separate")
    return list(dict.fromkeys((la.problem.k, la.problem.n) for la in layers))


def random_gptq_on(k: int, n: int, device: torch.device | str, generator: torch.Generator,
                   group_size: int = GROUP_SIZE) -> Any:
    """Random symmetric 4-bit GPTQ tensors drawn on `device` (a 13B model's worth would take
    minutes on the host): uniform packed words, zeros 8 (stored as 7, GPTQ v1), scales near
    SCALE, no act-order."""
    from gemmtune.kernels.gptq import GPTQTensors, pack_cols

    g = k // group_size
    qweight = torch.randint(-(1 << 31), 1 << 31, (k // 8, n), dtype=torch.int64, device=device,
                            generator=generator).to(torch.int32)
    qzeros = pack_cols(torch.full((g, n), 7, dtype=torch.int32, device=device), 4)
    scales = ((torch.rand((g, n), device=device, generator=generator) + 0.5) * SCALE).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32, device=device) // group_size
    return GPTQTensors(qweight, qzeros, scales, g_idx, 4, group_size, "v1")


def quantize_random(model: nn.Module, config: str | None = "default", seed: int = 0,
                    device: torch.device | str | None = None, fuse: bool = True) -> int:
    """Replace every quantizable linear (in place, freeing its fp16 weight) by a QuantLinear
    with random GPTQ weights on `device` (default: the linear's), prepared there one at a time
    on CUDA (a fused group's members together, as `load_quantized` does). Returns the number
    replaced."""
    from gemmtune.runtime import PatchReport, QuantLinear
    from gemmtune.runtime.patch import LayerPlacer

    names = [n for n, _ in quantizable(model)]
    dev = torch.device(device) if device is not None else model.get_submodule(names[0]).weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    placer = LayerPlacer(model, names, fuse, PatchReport())
    for name in names:
        lin = model.get_submodule(name)
        q = QuantLinear.from_gptq_tensors(random_gptq_on(lin.in_features, lin.out_features, dev, gen),
                                          None, config=config)
        del lin
        placer.place(name, q)
    placer.close()
    return len(names)


def build_quantized(config: Any, device: torch.device | str, seed: int = 0, fuse: bool = True) -> Any:
    """The quantized model without its fp16 one: built on `meta`, every quantizable linear
    replaced by a random QuantLinear on `device`, then embeddings, norms, head and rotary
    buffers allocated on `device` and initialised as transformers initialises them."""
    from gemmtune.runtime.patch import materialize

    model = build_model(config, "meta")
    quantize_random(model, "default", seed, device=device, fuse=fuse)
    materialize(model, device)
    return model.eval()


def weight_bytes(model: nn.Module) -> tuple[int, int | None]:
    """(bytes the quantizable linears hold for their weights, their checkpoint's packed bytes;
    None for an fp16 model)."""
    from gemmtune.runtime import QuantLinear

    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if quant:
        return sum(m.resident_bytes() for m in quant), sum(m.packed_bytes() for m in quant)
    return sum(m.weight.numel() * m.weight.element_size() for _, m in quantizable(model)), None


def set_config(model: nn.Module, config: str | None) -> dict[str, str]:
    """Re-prepare every QuantLinear under `config` (None: what the runtime resolves).
    Returns the key of each problem a GEMM runs (a fused group's) -> 'config-key (source)'."""
    from gemmtune.runtime import QuantLinear

    used: dict[str, str] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.requested_config = config
            res = m.prepare()  # new plans over the same kernel-layout weight
            key = (m.problem if m.fused_group is None else m.fused_group.problem).key()
            used[key] = res.label if res is not None else "cpu reference"
            if len(m.bands) > 1:  # a plan over M bands: every band, the last one is `res`
                used[key] = "; ".join(f"{b.span}: {b.config.key()} ({b.source})" for b in m.bands)
    return used


# -- static cache and the two compiled functions -------------------------------------------------

def _cache_keyword(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); take what this one calls it."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def static_cache(model: Any, max_len: int) -> Any:
    """A StaticCache; its tensors are allocated (and marked static) by the first, eager forward."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def rewind(cache: Any, length: int) -> None:
    """Set every layer's filled length to `length` in place (the tensors keep their addresses,
    so captured graphs stay valid); later writes overwrite what lay beyond."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def prefill_fn(model: Any, cache: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """`ids [B, P]` -> next-token logits [B, 1, vocab], writing the prompt into `cache`."""
    kw = _cache_keyword(model)

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
    return prefill


def decode_step_fn(model: Any, cache: Any) -> Callable[[torch.Tensor], None]:
    """One greedy step: `ids [B, 1]` -> the next token written back into `ids` (so a captured
    step replays as real generation, the cache growing by one each replay)."""
    kw = _cache_keyword(model)

    def step(ids: torch.Tensor) -> None:
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return step


# -- measuring (GPU) ----------------------------------------------------------------------------

def _events_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_prefill(prefill: Callable[[torch.Tensor], Any], ids: torch.Tensor, cache: Any,
                 repeats: int) -> list[float]:
    """ms per compiled prefill of `ids` (first two calls compile and warm up, untimed)."""
    out = []
    for i in range(repeats + 2):
        rewind(cache, 0)
        ms = _events_ms(lambda: prefill(ids))
        if i >= 2:
            out.append(ms)
    return out


GEMMTUNE_KERNEL = "gemmtune"  # every kernel of kernels/cuda is in this namespace (mangled or not)
CUBLAS_GEMM = ("gemm", "gemv", "nvjet", "xmma", "cutlass")  # cuBLAS / cuBLASLt GEMM kernel names


def kernel_class(name: str) -> str:
    """'gemmtune' (the quantized linears' kernels, reconstruct included), 'gemm' (cuBLAS: fp16
    linears, the LM head, a reconstruct's GEMM) or 'other' (attention, norms, copies, ...)."""
    if GEMMTUNE_KERNEL in name:
        return "gemmtune"
    low = name.lower()
    return "gemm" if any(k in low for k in CUBLAS_GEMM) else "other"


def kernel_times(run: Callable[[], None], steps: int) -> dict[str, Any]:
    """GPU time per step of each kernel class over `steps` calls of `run` under torch.profiler
    (CUPTI records the kernels inside CUDA-graph replays as well). Empty when the profiler saw
    no kernel (then nothing is claimed)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    per: dict[str, float] = {"gemmtune": 0.0, "gemm": 0.0, "other": 0.0}
    names: dict[str, float] = {}
    kernels = 0
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or e.name.startswith(("Memcpy", "Memset")):
            continue
        us = e.time_range.elapsed_us()
        per[kernel_class(e.name)] += us
        names[e.name] = names.get(e.name, 0.0) + us
        kernels += 1
    if not kernels:
        return {}
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": steps, "kernels_per_step": kernels / steps,
            "us_per_step": {k: v / steps for k, v in per.items()},
            "top_kernels_us_per_step": {k[:160]: v / steps for k, v in top}}


def gemm_share(times: dict[str, Any], step_ms: float, row: str, *, every_gemm: bool = False) -> float | None:
    """The GEMM share of a step: the quantized rows' gemmtune kernels (the fp16 row: cuBLAS's
    GEMMs, its linears and head) per step over the step's measured time; `every_gemm` adds
    cuBLAS's GEMMs to a quantized row's (its LM head, and any reconstruct GEMM)."""
    if not times:
        return None
    us = times["us_per_step"]
    got = us["gemm"] if row == "fp16" else us["gemmtune"] + (us["gemm"] if every_gemm else 0.0)
    return got / (step_ms * 1e3)


def time_decode(step: Callable[[torch.Tensor], None], first: torch.Tensor, cache: Any, prompt: int,
                steps: int, repeats: int, profile_steps: int = 0) -> tuple[list[float], dict[str, Any]]:
    """tokens/s of `steps` replays of the captured decode step, per repeat, the cache holding
    `prompt` tokens at the start of each; and, with `profile_steps`, `kernel_times` of that many
    more replays (a profiled replay is not timed)."""
    ids = first.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            step(ids)
    torch.cuda.current_stream().wait_stream(side)
    rewind(cache, prompt)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ids)

    def run() -> None:
        for _ in range(steps):
            graph.replay()

    out = []
    for i in range(repeats + 1):
        rewind(cache, prompt)
        ids.copy_(first)
        ms = _events_ms(run)
        if i:
            out.append(first.shape[0] * steps / ms * 1e3)
    times: dict[str, Any] = {}
    if profile_steps:
        rewind(cache, prompt)
        ids.copy_(first)
        times = kernel_times(graph.replay, profile_steps)
        if times:
            times["method"] = "captured step replays"
        else:  # a profiler that does not see into graphs: the same compiled step, launched
            rewind(cache, prompt)
            ids.copy_(first)
            times = kernel_times(lambda: step(ids), profile_steps)
            if times:
                times["method"] = "compiled step outside the graph (the profiler saw no kernel in replays)"
    return out, times  # the graph (and its memory pool) goes with this frame


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_row(model: Any, caches: dict[int, Any], prompts: dict[int, torch.Tensor],
            compiled: dict[str, Any], args: argparse.Namespace, log: Callable[[str], None],
            row: str) -> dict[str, Any]:
    """Prefill and decode of one row on `model` as it is now configured."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights, packed = weight_bytes(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        b1 = min(caches)
        rewind(caches[b1], 0)
        prefill_fn(model, caches[b1])(prompts[b1])  # eager: allocates the cache tensors
        if "prefill" not in compiled:
            compiled["prefill"] = torch.compile(prefill_fn(model, caches[b1]), fullgraph=True)
        prefill_ms = time_prefill(compiled["prefill"], prompts[b1][:1], caches[b1], args.repeats)
        log(f"  {row:18s} prefill {args.prompt} tokens: {_median(prefill_ms):8.2f} ms")
        decode: dict[str, Any] = {}
        for b in args.batches:
            cache = caches[b]
            rewind(cache, 0)
            prefill_fn(model, cache)(prompts[b])  # eager, untimed: the cache holds B prompts
            key = f"decode{b}"
            if key not in compiled:
                compiled[key] = torch.compile(decode_step_fn(model, cache), fullgraph=True)
            first = prompts[b][:, -1:].clone()
            tps, times = time_decode(compiled[key], first, cache, args.prompt, args.steps, args.repeats,
                                     args.profile_steps)
            step_ms = b / _median(tps) * 1e3
            share = gemm_share(times, step_ms, row)
            decode[str(b)] = {"tokens_per_s": _median(tps), "step_ms": step_ms, "all_tokens_per_s": tps,
                              "gemm_share": share,
                              "all_gemm_share": gemm_share(times, step_ms, row, every_gemm=True),
                              "kernel_times": times}
            log(f"  {row:18s} decode B={b:<3d} {_median(tps):10.1f} tok/s"
                + ("" if share is None else f", GEMMs {share * 100:.0f} % of the step"))
    torch.cuda.synchronize()
    return {"row": row, "prefill_ms": _median(prefill_ms), "all_prefill_ms": prefill_ms,
            "decode": decode, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "weights_gib": weights / 2**30, "packed_gib": None if packed is None else packed / 2**30,
            "seconds": time.perf_counter() - t0}


def tune_shapes(shapes: Sequence[tuple[int, int]], db_url: str, trials: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    """`gemmtune tune` of `shapes` for the decode and mixed workloads into `db_url` (shapes
    tuned there before are skipped by the tuner itself)."""
    t0 = time.perf_counter()
    for workload in TUNE_WORKLOADS:
        # -P: the tuner imports the gemmtune this script runs (cwd may be a checkout)
        cmd = [sys.executable, "-P", "-c", "from gemmtune.cli import main; main()", "tune",
               *[a for k, n in shapes for a in ("--shape", f"{k}x{n}")],
               "--workload", workload, "--trials", str(trials), "--db", db_url]
        log(f"  tuning {len(shapes)} shapes for {workload}: {' '.join(cmd[4:])}")
        subprocess.run(cmd, check=True)
    return {"db": db_url, "trials": trials, "workloads": list(TUNE_WORKLOADS),
            "shapes": [f"{k}x{n}" for k, n in shapes], "seconds": time.perf_counter() - t0}


def run_model(name: str, args: argparse.Namespace, log: Callable[[str], None],
              saved: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    from gemmtune.runtime import clear_cache

    config = llama_config(name, args.layers)
    shapes = gemm_shapes(config, args.fuse)
    result: dict[str, Any] = {"model": name, "layers": config.num_hidden_layers,
                              "vocab_size": config.vocab_size, "shapes": [f"{k}x{n}" for k, n in shapes],
                              "rows": []}
    log(f"{name}: {config.num_hidden_layers} layers, shapes {', '.join(result['shapes'])}")
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    # Without the fp16 row the fp16 model is never built (a 70B one would not fit the card).
    model = build_model(config, dev) if "fp16" in args.rows else build_quantized(config, dev, fuse=args.fuse)
    gen = torch.Generator(device=dev).manual_seed(0)
    max_len = args.prompt + args.steps + 8
    batches = sorted(set(args.batches) | {1})
    prompts = {b: torch.randint(0, config.vocab_size, (b, args.prompt), device=dev, generator=gen)
               for b in batches}
    caches = {b: static_cache(model, max_len) for b in batches}
    compiled: dict[str, Any] = {}
    if "fp16" in args.rows:
        result["rows"].append(run_row(model, caches, prompts, compiled, args, log, "fp16"))
        saved(result)
    torch._dynamo.reset()
    compiled.clear()
    if "fp16" in args.rows:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        quantize_random(model, "default", fuse=args.fuse)
    torch.cuda.synchronize()
    result["load_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["loaded_gib"] = torch.cuda.memory_allocated() / 2**30
    torch.cuda.empty_cache()
    for row in (r for r in QUANT_ROWS if r in args.rows):
        if row == "tuned":
            # tuned last, right before its row (a subprocess; the model stays resident), so a run
            # cut off by a time limit has the fp16 and preset rows already written
            if not args.no_tune:
                result["tune"] = tune_shapes(shapes, args.db, args.trials, log)
            os.environ["GEMMTUNE_DB"] = args.db
            os.environ.pop("GEMMTUNE_PROFILE", None)
            clear_cache()
        used = set_config(model, None if row == "tuned" else row)
        res = run_row(model, caches, prompts, compiled, args, log, row)
        res["configs"] = used
        if row == "tuned":
            res["tuned_found"] = any("(default)" not in u for u in used.values())
        result["rows"].append(res)
        saved(result)
    del model, caches, compiled
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import transformers
    from gemmtune.kernels.device import query_device
    from gemmtune.kernels.sources import kernel_hash

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # one frame compiles per batch size and phase
    if args.db is None:
        args.db = f"sqlite:///{Path(tempfile.mkdtemp(prefix='gemmtune-generate-')) / 'tuning.db'}"
    res: dict[str, Any] = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/generate.py " + " ".join(argv),
        "device": query_device().to_dict(), "kernel_hash": kernel_hash(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {"prompt": args.prompt, "batches": args.batches, "steps": args.steps,
                     "repeats": args.repeats, "rows": args.rows, "fuse": args.fuse,
                     "profile_steps": args.profile_steps},
        "models": [],
    }
    def saved(current: dict[str, Any]) -> None:
        # after every row, so a run cut off by a time limit keeps the rows it finished
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            partial = res | {"models": [*res["models"], current], "complete": False}
            Path(args.output).write_text(json.dumps(partial, indent=1))

    for name in args.model:
        res["models"].append(run_model(name, args, log, saved))
    res["complete"] = True
    return res


# -- report -----------------------------------------------------------------------------------

def render(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: one table per model, card, date and command above."""
    s = res["settings"]
    lines = [f"Generation on {res['device']['name']}, {res['created_at'][:10]} "
             f"(torch {res['torch']}, transformers {res['transformers']}):",
             "", f"    {res['command']}", "",
             f"Random weights, full depth, `torch.compile(fullgraph=True)`, static KV cache. Prefill: "
             f"one {s['prompt']}-token prompt, ms. Decode: greedy, {s['steps']} steps after the "
             f"prompt, each step one CUDA graph, tokens/s (× torch fp16). Medians of {s['repeats']} "
             "repeats; weights: what the quantizable linears hold once loaded (quantized rows: × "
             "their packed checkpoint bytes); peak memory over the row's run. Quantized rows: 4-bit, "
             "group 128" + ("" if s.get("fuse") is None else
                            ", q+k+v and gate+up fused" if s["fuse"] else ", every projection alone")
             + "." + (" GEMM share: GPU time of the step's GEMM kernels (quantized rows: gemmtune's; "
                      "fp16: cuBLAS's) over the step's time, measured by profiling captured steps."
                      if _has_share(res) else ""), ""]
    share = _has_share(res)
    for m in res["models"]:
        rows = {r["row"]: r for r in m["rows"]}
        base = rows.get("fp16")
        batches = [str(b) for b in s["batches"]]
        lines += [f"| {m['model']} ({m['layers']} layers) | prefill (ms) | "
                  + " | ".join(f"decode B={b}" for b in batches)
                  + (f" | GEMM share B={batches[0]}" if share else "") + " | weights (GiB) | peak memory (GiB) |",
                  "|---|---:|" + "---:|" * len(batches) + ("---:|" if share else "") + "---:|---:|"]
        for name, r in rows.items():
            label = ROW_LABELS.get(name, name)
            if name == "tuned" and not r.get("tuned_found", True):
                label += " (nothing tuned: default)"
            cells = []
            for b in batches:
                tps = r["decode"][b]["tokens_per_s"]
                ratio = "" if base is None or name == "fp16" else \
                    f" ({tps / base['decode'][b]['tokens_per_s']:.2f}×)"
                cells.append(f"{tps:.1f}{ratio}")
            w = r.get("weights_gib")  # absent in results of older runs
            weights = "-" if w is None else f"{w:.2f}" + (
                f" ({w / r['packed_gib']:.2f}×)" if r.get("packed_gib") else "")
            if share:
                g = r["decode"][batches[0]].get("gemm_share")
                cells.append("-" if g is None else f"{g * 100:.0f} %")
            lines.append(f"| {label} | {r['prefill_ms']:.1f} | " + " | ".join(cells)
                         + f" | {weights} | {r['peak_memory_gib']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _has_share(res: dict[str, Any]) -> bool:
    """Whether any row measured a GEMM share (results of older runs have none)."""
    return any(d.get("gemm_share") is not None for m in res["models"] for r in m["rows"]
               for d in r["decode"].values())


# -- command line ---------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return out
    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]))
    ap.add_argument("--model", type=_names(tuple(ARCH_EXTRA)), default=DEFAULT_MODELS,
                    help="comma-separated architectures (default: %(default)s)")
    ap.add_argument("--rows", type=_names(ROWS), default=list(ROWS),
                    help="comma-separated rows (default: all: %(default)s)")
    ap.add_argument("--batches", type=_ints, default=[1, 4, 16], help="decode batch sizes (default 1,4,16)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per repeat (default 32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's; "
                    "fewer for a quick check, reported in the table)")
    ap.add_argument("--db", default=None, help="tuning database for the tuned row (default: a fresh "
                    "temporary one); shapes not tuned there are tuned into it unless --no-tune")
    ap.add_argument("--no-tune", action="store_true", help="do not tune: tuned = what --db holds")
    ap.add_argument("--trials", type=int, default=40, help="tuner trials per shape and workload (default 40)")
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                    help="quantized rows run q+k+v and gate+up as one GEMM each, as patch / "
                    "load_quantized do (default); --no-fuse: every projection alone")
    ap.add_argument("--profile-steps", type=int, default=4, help="decode replays profiled per row "
                    "and batch for the GEMM share (default 4; 0: not measured)")
    ap.add_argument("-o", "--output", help="write the results JSON here")
    ap.add_argument("--report", metavar="JSON", nargs="+", help="render the BENCHMARKS.md tables of "
                    "results files (e.g. one per model) and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if min(args.prompt, args.steps, args.repeats) < 1:
        ap.error("--prompt, --steps and --repeats must be positive")
    if args.profile_steps < 0:
        ap.error("--profile-steps must be 0 or more")
    if args.no_tune and "tuned" in args.rows and args.db is None:
        ap.error("--no-tune needs --db (the database of an existing tune)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            res = json.loads(Path(path).read_text())
            if res.get("format") != FORMAT:
                raise SystemExit(f"{path}: not a {FORMAT} results file")
            print(render(res))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench/generate.py needs a CUDA GPU (--report renders a results file anywhere)")
    res = run(args, argv)
    text = json.dumps(res, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
