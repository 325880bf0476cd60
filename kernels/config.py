"""`KernelConfig`: every tunable of the dispatch and its kernels, in one frozen object.

The ranges below are the *space*: what the kernels can be compiled and launched with. The tuner
(`gemmtune.autotune.space`) derives its Optuna search space from this table, profile import
validates against it, and `key()` is the one stable spelling used by caches, the database and
exported profiles alike (Triton's `Config` plays the same role).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import InvalidConfigError


@dataclass(frozen=True)
class Tunable:
    """Declared range of one field: `choices` for the tuner, `lo..hi` for validation."""

    name: str
    doc: str
    choices: tuple[int, ...]
    lo: int
    hi: int
    affects_kernel: bool = True


TUNABLES: tuple[Tunable, ...] = (
    Tunable("max_q_gemm_rows", "M at or below which the fused kernel runs; above it the weight is "
            "reconstructed to fp16 and cuBLAS multiplies", (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 50,
            64, 96, 128, 192, 256, 384, 512), 0, 8192, affects_kernel=False),
    Tunable("max_q_gemm_rows_kernel", "rows of A one fused-kernel block handles (the m_count "
            "template instance)", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), 1, 64),
    Tunable("block_n", "output columns one block covers (32 per warp column)", (32, 64, 128, 256),
            32, 256),
    # 512 threads stay valid (within the register rule below) but out of the tuner's choices:
    # they never won on an H100 except in instances that spilled.
    Tunable("threads", "threads per block; threads / block_n warps split the block's K range",
            (64, 128, 256), 32, 512),
    Tunable("split_k", "K slices across blocks (0 = choose from the SM count); slices are "
            "reduced in fp32 by the last block to finish", (0, 1, 2, 3, 4, 6, 8, 12, 16), 0, 64),
    Tunable("k_unroll", "pipeline depth: the fused kernel keeps up to 4 * k_unroll K steps of "
            "weights per warp in flight through a shared-memory ring",
            (1, 2, 4, 8), 1, 16),
    Tunable("recon_chunk_n", "reconstruct path: columns dequantized per cuBLAS call so the fp16 "
            "chunk stays in L2 (0 = whole matrix at once)", (0, 1024, 2048, 4096, 8192, 16384),
            0, 1 << 20, affects_kernel=False),
    # The tiled kernel (kernels/cuda/gptq_tiled_gemm.cu) and its knobs; appended, so every key
    # written before it existed still parses (as a decode-kernel config, see LATE_FIELDS).
    Tunable("kernel", "fused kernel family: 0 = decode (each warp streams its own columns and "
            "reads its rows of A itself; small M), 1 = tiled (A and weight tiles staged through a "
            "shared-memory pipeline and shared by the block's warps; M past decode sizes), "
            "2 = wgmma (sm_90a only: the tiled pipeline feeding Hopper's warpgroup MMA), "
            "3 = stream (M <= 8: one wave of persistent blocks, the weight stream in flight from "
            "the first cycle, K slices reduced on chip)",
            (0, 1, 2, 3), 0, 3),
    Tunable("tile_m", "tiled kernel: rows of A per block (TILES lists the built tiles)",
            (16, 32, 64, 128), 16, 128),
    Tunable("tile_n", "tiled kernel: output columns per block", (64, 128, 256), 64, 256),
    Tunable("tile_k", "tiled kernel: K per pipeline stage", (64, 128), 64, 128),
    Tunable("stages", "tiled kernel: pipeline depth (stages of loads in flight + the one computed)",
            (2, 3, 4), 2, 8),
    # The wgmma kernel (kernels/cuda/gptq_wgmma_gemm.cu) and its knobs; appended, so every key
    # written before it existed still parses (see LATE_FIELDS).
    Tunable("wgmma_m", "wgmma kernel: tokens (rows of A) per block; WGMMA_TILES lists the built "
            "tiles", (16, 32, 64, 128, 256), 16, 256),
    Tunable("wgmma_n", "wgmma kernel: output columns per block (128 per warpgroup)", (128, 256),
            128, 256),
    Tunable("wgmma_k", "wgmma kernel: K per pipeline stage", (64, 128), 64, 128),
    Tunable("wgmma_stages", "wgmma kernel: pipeline depth (stages of weight loads in flight + the "
            "one computed)", (2, 3, 4, 5), 2, 8),
    # The stream kernel (kernels/cuda/gptq_stream_gemm.cu) and its knobs; appended, so every key
    # written before it existed still parses (see LATE_FIELDS). Its K split across blocks is
    # `split_k`: the CTAs of a thread-block cluster.
    # The stream kernel cuts each block's share into one even run per warp, so it has no column
    # dimension: its warps are stream_warps_n x stream_warps_k, and the spaces keep warps_n at 1
    # (the field stays so that stored keys, stream1x8-..., keep their spelling).
    Tunable("stream_warps_n", "stream kernel: a factor of the block's warps (warps_n x warps_k "
            "warps, each streaming an even run of the block's share); 1 in the spaces", (1,), 1, 16),
    Tunable("stream_warps_k", "stream kernel: warps a block's share is cut into (times warps_n)",
            (1, 2, 4, 8, 16), 1, 16),
    Tunable("stream_chunk", "stream kernel: K steps (512 bytes of weights each) one bulk copy "
            "brings into a warp's ring", (2, 4, 8, 16), 1, 32),
    Tunable("stream_slots", "stream kernel: ring slots per warp (chunks in flight)",
            (2, 3, 4, 6, 8), 2, 16),
)

DECODE, TILED, WGMMA = 0, 1, 2
STREAM = 3
"""Values of `kernel`."""

TILES: dict[tuple[int, int], tuple[int, int, int, int]] = {
    # (tile_m, tile_n): (warps_m, 8-row tiles per warp, warps_n, 32-column blocks per warp).
    # Four warps up to 32 rows (the memory-bound band: many small blocks keep loads in flight),
    # eight above, except 64x256: four warps of 64 rows each dequantise every weight once and
    # feed it to 8 row tiles, which measured 5-14 % faster than eight warps of 32 rows at M = 64
    # and 128 on four of the public shapes (H200). A warp holds at most 2 x 2 x 8 accumulator
    # tiles (128 registers: such tiles sit at ptxas' 255 and spill with long stages, see
    # TILED_REGISTER_BOUND).
    (16, 64): (1, 2, 2, 1),
    (16, 128): (1, 2, 4, 1),
    (16, 256): (1, 2, 4, 2),
    (32, 64): (1, 4, 2, 1),
    (32, 128): (1, 4, 4, 1),
    (32, 256): (1, 4, 4, 2),
    (64, 64): (2, 4, 2, 1),
    (64, 128): (2, 4, 4, 1),
    (64, 256): (1, 8, 4, 2),
    (128, 64): (4, 4, 2, 1),
    (128, 128): (4, 4, 2, 2),
    (128, 256): (2, 8, 4, 2),
}
"""The tiled kernel's block tiles, an explicit list for compile time: each is one template
instance per (bits, tile_k, stages, split), and `gemmtune kernels check` builds all of them."""

WGMMA_TILES: dict[tuple[int, int], tuple[int, int, int]] = {
    # (wgmma_m, wgmma_n): (warpgroups along M, tokens per warpgroup = the wgmma N, warpgroups
    # along N). A warpgroup covers 128 columns as two m64 tiles, so its tokens cost 1 fp32
    # accumulator register each per thread: 128 is the widest token tile a warpgroup holds.
    # One warpgroup up to 64 tokens x 128 columns (small M: many blocks keep loads in flight),
    # two along N (256 columns share each staged activation tile). 128 tokens only with two
    # warpgroups along N: one alone (128x128), or two along M (256x128), holds 128 accumulators
    # beside 8 prefetched activation chunks (32 registers) a thread, and spilled 24-1168 bytes
    # at every depth (ptxas 13.0, sm_90a), so neither is built.
    (16, 128): (1, 16, 1),
    (16, 256): (1, 16, 2),
    (32, 128): (1, 32, 1),
    (32, 256): (1, 32, 2),
    (64, 128): (1, 64, 1),
    (64, 256): (1, 64, 2),
    (128, 256): (1, 128, 2),
}
"""The wgmma kernel's block tiles, an explicit list for compile time: each is one template instance
per (bits, wgmma_k, wgmma_stages, split), and `gemmtune kernels check` builds all of them for
sm_90a."""

WGMMA_ARCH = "sm_90a"
"""The only target the wgmma kernel builds for (`wgmma.mma_async` is an sm_90a feature)."""

WGMMA_CAPABILITY = (9, 0)
"""Compute capability of the cards the wgmma family exists on (H100, H200): elsewhere it is not
in the search space and a config of it is refused when a weight is bound."""

SMEM_OPT_IN_SM90 = 227 * 1024
"""Largest dynamic shared memory a block may opt into on sm_90 (H100/H200): the cap a tiled
config is checked against before anything is built. A smaller card's own limit is checked when a
weight is bound to the config (`dispatch.Plan`)."""


def tiled_shape(bits: int, tile_m: int, tile_n: int, tile_k: int) -> tuple[int, int]:
    """(K steps per stage, bytes of shared memory per stage) of a tiled instance: weights (16 bytes
    per lane, 32 columns and step), the A tile, and one (scale, zero) row per step. Mirrors
    `TiledStage` in gptq_tiled_gemm.cu."""
    kstep = 4 * (32 // bits)
    ks = tile_k // kstep
    vecs = tile_n * ks + tile_m * tile_k // 8 + ks * tile_n // 4
    return ks, 16 * vecs


def tiled_smem_bytes(bits: int, tile_m: int, tile_n: int, tile_k: int, stages: int) -> int:
    return stages * tiled_shape(bits, tile_m, tile_n, tile_k)[1]


TILED_REGISTER_BOUND: dict[int, dict[tuple[int, int, int], int]] = {
    # bits: {(tile_m, tile_n, tile_k): most stages that build without spilling}. Measured with
    # ptxas 13.0 for sm_80, sm_86, sm_89 and sm_90 (`gemmtune kernels check --arch ...`; the
    # smallest bound of the four), either split instance spilling counting (the dispatch picks
    # the split per M, so a config launches both). These sit at 254-255 registers: 128x256 and
    # 64x256 give a warp 8 x 2 accumulator tiles (128 registers), and a 128-deep stage of 8-bit
    # weights with 256 columns doubles the weight fragments a warp keeps per stage. 8-bit
    # 16x256x128 spills at 2 stages on sm_86/89 and at 3 on sm_90; 8-bit 32x256x128 at 2-3 on
    # sm_80: neither is built.
    4: {(128, 256, 128): 0, (128, 256, 64): 2, (64, 256, 128): 0},
    8: {(128, 256, 128): 0, (128, 256, 64): 2, (64, 256, 128): 0, (16, 256, 128): 0,
        (32, 256, 128): 0},
}
"""Tiled instances ptxas cannot fit in 255 registers. Every other instance that fits shared
memory builds without spilling; `gemmtune kernels check` builds every instance this allows, so a
kernel change that makes another one spill fails there and belongs in this table."""


def _tile_violation(family: str, arch: str, tiles: Mapping[tuple[int, int], object],
                    bounds: dict[int, dict[tuple[int, int, int], int]], smem_bytes: int,
                    k_field: str, k_rule: str, bits: int, tile_m: int, tile_n: int, tile_k: int, stages: int,
                    smem_limit: int) -> str | None:
    """The rules every block-tile family shares, in order: a built tile, a K tile (`k_field`) of
    whole 64-half swizzle/staging units (`k_rule` says why), no register spill (`bounds`, measured
    with ptxas for `arch`), and the pipeline's `smem_bytes` within `smem_limit`."""
    if (tile_m, tile_n) not in tiles:
        return (f"{family} tile {tile_m}x{tile_n} is not a built tile (built: "
                f"{', '.join(f'{m}x{n}' for m, n in tiles)})")
    if tile_k % 64:
        return f"{k_field}={tile_k} must be a multiple of 64 ({k_rule})"
    shape = f"{family} {tile_m}x{tile_n}x{tile_k}"
    bound = bounds.get(bits, {}).get((tile_m, tile_n, tile_k))
    if bound is not None and stages > bound:
        if not bound:
            return f"{shape} spills registers at {bits}-bit with any number of stages (ptxas, {arch})"
        return (f"{shape} with {stages} stages spills registers at {bits}-bit (ptxas, {arch}; at "
                f"most {bound} stages fit)")
    if smem_bytes > smem_limit:
        return (f"{shape} with {stages} stages needs {smem_bytes // 1024} KB of shared memory at "
                f"{bits}-bit, more than the {smem_limit // 1024} KB a block may use")
    return None


def tiled_violation(bits: int, tile_m: int, tile_n: int, tile_k: int, stages: int,
                    smem_limit: int = SMEM_OPT_IN_SM90) -> str | None:
    """Why a tiled-kernel instance cannot be built or launched with `smem_limit` bytes of shared
    memory per block, or None: the one statement of the tiled kernel's rules (used by
    `KernelConfig` at 4-bit, `dispatch.Plan` at the weight's bits and the card's limit, the
    search space at every bit width and the static build check)."""
    # The A tile's XOR swizzle permutes 8 16-byte chunks (64 halves) of a row: a row of another
    # length would be read past its end.
    return _tile_violation("tiled", "sm_90", TILES, TILED_REGISTER_BOUND,
                           tiled_smem_bytes(bits, tile_m, tile_n, tile_k, stages),
                           "tile_k", "the A tile's swizzle spans 64 columns", bits, tile_m, tile_n, tile_k,
                           stages, smem_limit)


def wgmma_shape(bits: int, wgmma_m: int, wgmma_n: int, wgmma_k: int) -> tuple[int, int]:
    """(K steps per stage, bytes of shared memory per stage) of a wgmma instance: the A tile, the
    weights (16 bytes per lane, 32 columns and step) and one (scale, zero) row per step. Mirrors
    `WgmmaStage` in gptq_wgmma_gemm.cu."""
    kstep = 4 * (32 // bits)
    ks = wgmma_k // kstep
    return ks, wgmma_m * wgmma_k * 2 + wgmma_n * ks * 16 + ks * wgmma_n * 4


def wgmma_smem_bytes(bits: int, wgmma_m: int, wgmma_n: int, wgmma_k: int, stages: int) -> int:
    return stages * wgmma_shape(bits, wgmma_m, wgmma_n, wgmma_k)[1]


WGMMA_REGISTER_BOUND: dict[int, dict[tuple[int, int, int], int]] = {
    # bits: {(wgmma_m, wgmma_n, wgmma_k): most stages that build without spilling} (ptxas 13.0,
    # sm_90a, either split instance; `gemmtune kernels check --arch sm_90`). A 128-deep stage
    # doubles the activation chunks a thread prefetches (16 -> 32 registers): beside 128
    # accumulators (128x256) it spills 220-592 bytes; 8-bit 64x128 spills 8-32 bytes at 2-3
    # stages and sits at 255 registers at 4-5, so it is not built at all.
    4: {(128, 256, 128): 0},
    8: {(128, 256, 128): 0, (64, 128, 128): 0},
}
"""wgmma instances ptxas cannot fit in 255 registers (see TILED_REGISTER_BOUND)."""


def wgmma_violation(bits: int, wgmma_m: int, wgmma_n: int, wgmma_k: int, stages: int,
                    smem_limit: int = SMEM_OPT_IN_SM90) -> str | None:
    """Why a wgmma-kernel instance cannot be built or launched with `smem_limit` bytes of shared
    memory per block, or None: the one statement of the wgmma kernel's rules (used by
    `KernelConfig` at 4-bit, `dispatch.Plan` at the weight's bits and the card's limit, the search
    space at every bit width and the static build check). The card itself (sm_90) is checked
    where a weight is bound."""
    return _tile_violation("wgmma", "sm_90a", WGMMA_TILES, WGMMA_REGISTER_BOUND,
                           wgmma_smem_bytes(bits, wgmma_m, wgmma_n, wgmma_k, stages),
                           "wgmma_k", "a warp stages 64 columns of a row", bits, wgmma_m, wgmma_n, wgmma_k,
                           stages, smem_limit)



def wgmma_deepest_stages(bits: int, wgmma_m: int, wgmma_n: int, wgmma_k: int) -> int:
    """The deepest pipeline (4, 3 or 2 stages) `wgmma_violation` allows for this tile at `bits`,
    or 0 when none builds: the weights stream through STAGES - 1 stages in flight, so more is
    better until registers or shared memory run out."""
    return next((s for s in (4, 3, 2) if wgmma_violation(bits, wgmma_m, wgmma_n, wgmma_k, s) is None), 0)

STREAM_ROWS = 8
"""Rows of A one launch of the stream kernel takes (one 8-row MMA tile); a larger M is served by
launches of STREAM_ROWS rows each, every one reading the whole weight (correct, not fast: the
band plan keeps the stream kernel where it measures fastest, M <= 8)."""

STREAM_MAX_THREADS = 512
"""Most threads of a stream block: ptxas holds the kernel at 70-100 registers, and 1024 threads
would cap it at 64."""

STREAM_MAX_CLUSTER = 16
"""Most CTAs of one thread-block cluster (8 portable; 16 on sm_90 with the non-portable opt-in,
which the launch sets)."""


def stream_fixed_smem(warps_n: int, warps_k: int, chunk: int, slots: int) -> int:
    """Shared memory of a stream block apart from what grows with its rows of A: each warp's ring
    (per slot, `chunk` steps of 512 weight bytes and room for one 128-byte (scale, zero) row per
    step), the rings' mbarriers and two more (A's bulk copy, a cluster's pushes), padded to 16
    bytes. Mirrors the layout in gptq_stream_gemm.cu."""
    warps = warps_n * warps_k
    bars = -(-(warps * slots + 2) * 8 // 16) * 16
    return warps * slots * chunk * (512 + 128) + bars


def stream_a_row_bytes(bits: int, k: int, cluster: int) -> int:
    """Shared memory one row of A takes in a stream block: the block's K slice (the longer one
    when `cluster` does not divide the steps) plus 16 bytes that keep rows off each other's
    banks."""
    kstep = 4 * (32 // bits)
    steps = k // kstep
    return (-(-steps // cluster) * kstep + 8) * 2


def stream_partial_row_bytes(warps: int, tiles_max: int) -> int:
    """Shared memory one row of the partials takes in a stream block: one fp32 slot of 32 columns
    for each (warp, tile) pair a run can end in, `tiles_max + warps - 1` of them when a cluster
    takes at most `tiles_max` tiles (the kernel's slot `tile + warp`)."""
    return (tiles_max + warps - 1) * 32 * 4


def stream_recv_row_bytes(cluster: int, tiles_max: int) -> int:
    """Shared memory one row takes in a stream block of a cluster for the sums the other CTAs
    push: one 16-byte slot a rank for each of the quads (4 columns) it owns, `tiles_max * 8`
    quads a row in all, rounded up to a multiple of `cluster` (exact up to 8; 16 adds at most 8
    quads, which the extra 128 bytes a row cover). 0 without a cluster."""
    if cluster == 1:
        return 0
    return tiles_max * 8 * 16 + (128 if cluster > 8 else 0)


def stream_row_bytes(bits: int, warps: int, k: int, cluster: int, tiles_max: int) -> int:
    """Shared memory each row of A adds to a stream block: its K slice, its partials and, in a
    cluster, the pushed sums."""
    return (stream_a_row_bytes(bits, k, cluster) + stream_partial_row_bytes(warps, tiles_max)
            + stream_recv_row_bytes(cluster, tiles_max))


def stream_smem_bytes(bits: int, warps_n: int, warps_k: int, chunk: int, slots: int, rows: int,
                      k: int, cluster: int, tiles_max: int) -> int:
    """Dynamic shared memory of one stream launch of `rows` rows whose clusters take at most
    `tiles_max` tiles each (the launch asks for this)."""
    per_row = stream_row_bytes(bits, warps_n * warps_k, k, cluster, tiles_max)
    return stream_fixed_smem(warps_n, warps_k, chunk, slots) + rows * per_row


def stream_violation(warps_n: int, warps_k: int, chunk: int, slots: int, split_k: int,
                     smem_limit: int = SMEM_OPT_IN_SM90) -> str | None:
    """Why a stream-kernel instance cannot be built or launched, or None: the rules that hold for
    every layer (used by `KernelConfig`, the search space and the static build check). What
    depends on the layer and the card -- at least one row of A beside the rings, clusters only on
    sm_90 -- is checked where a weight is bound (`kernels.stream`)."""
    threads = 32 * warps_n * warps_k
    if threads > STREAM_MAX_THREADS:
        return (f"stream kernel with {warps_n} x {warps_k} warps has {threads} threads, more than "
                f"{STREAM_MAX_THREADS} (its registers would be capped at {65536 // threads})")
    if split_k > STREAM_MAX_CLUSTER:
        return (f"split_k={split_k}: the stream kernel splits K across the CTAs of one "
                f"thread-block cluster, at most {STREAM_MAX_CLUSTER}")
    need = stream_fixed_smem(warps_n, warps_k, chunk, slots)
    if need > smem_limit:
        return (f"stream kernel with {warps_n} x {warps_k} warps, {slots} slots of {chunk} steps "
                f"needs {need // 1024} KB of shared memory for its rings alone, more than the "
                f"{smem_limit // 1024} KB a block may use")
    return None


_BY_NAME = {t.name: t for t in TUNABLES}

_TILED_KEY = re.compile(r"tiled(\d+)x(\d+)x(\d+)-st(\d+)-sk(\d+)")
_DECODE_KEY = re.compile(r"mk(\d+)-bn(\d+)-t(\d+)-sk(\d+)-u(\d+)")
_WGMMA_KEY = re.compile(r"wgmma(\d+)x(\d+)x(\d+)-st(\d+)-sk(\d+)")
_STREAM_KEY = re.compile(r"stream(\d+)x(\d+)-ch(\d+)-sl(\d+)-sk(\d+)")

DECODE_FIELDS = ("max_q_gemm_rows_kernel", "block_n", "threads", "k_unroll")
"""Fields only the decode kernel reads."""

TILED_FIELDS = ("tile_m", "tile_n", "tile_k", "stages")
"""Fields only the tiled kernel reads."""

WGMMA_FIELDS = ("wgmma_m", "wgmma_n", "wgmma_k", "wgmma_stages")
"""Fields only the wgmma kernel reads."""

STREAM_FIELDS = ("stream_warps_n", "stream_warps_k", "stream_chunk", "stream_slots")
"""Fields only the stream kernel reads (its K split is the shared `split_k`)."""

FAMILY_FIELDS = {DECODE: DECODE_FIELDS, TILED: TILED_FIELDS, WGMMA: WGMMA_FIELDS, STREAM: STREAM_FIELDS}
"""The fields each fused family reads alone, by `KernelConfig.kernel`."""
FAMILY_LABELS = {DECODE: "decode", TILED: "tiled", WGMMA: "wgmma", STREAM: "stream"}
"""The fused families' names, by `KernelConfig.kernel` (what tables, logs and errors call them)."""


MAX_THREADS = 1024
"""CUDA's limit on threads per block (every current NVIDIA and AMD card)."""


def launch_violation(block_n: int, threads: int, rows: int, unroll: int) -> str | None:
    """Why a fused-kernel instance (block_n columns, `threads`, `rows` rows of A per block,
    `unroll` K steps in flight) cannot be built or launched, or None when it can: the one
    statement of the coupled rules, used by `KernelConfig`, the search space and the static
    build check alike (ranges of single fields are `TUNABLES`')."""
    if block_n % 32:
        return f"block_n={block_n} must be a multiple of 32"
    if threads % 32:
        return f"threads={threads} must be a multiple of 32"
    if threads > MAX_THREADS:
        return f"threads={threads} exceeds {MAX_THREADS}"
    if threads < block_n or threads % block_n:
        return (f"threads={threads} must be a multiple of block_n={block_n} "
                "(one warp per 32 columns, the rest split K)")
    warps_k = threads // block_n
    if warps_k & (warps_k - 1):
        return f"threads/block_n={warps_k} must be a power of two"
    tiles = -(-rows // 8)
    if not registers_fit(threads, rows, unroll):
        return (f"threads={threads} with k_unroll={unroll} and max_q_gemm_rows_kernel="
                f"{rows} needs more than the {65536 // threads} "
                "registers a thread gets (512 threads: k_unroll <= 2 for <= 8 rows, < 64 rows)")
    if unroll * tiles > 8:
        return (f"k_unroll={unroll} with max_q_gemm_rows_kernel={rows} "
                f"keeps {unroll * tiles} activation tiles in registers (at most 8: "
                "k_unroll * ceil(rows/8) <= 8)")
    return None


def registers_fit(threads: int, rows: int, unroll: int) -> bool:
    """Whether a fused-kernel instance fits its register budget without spilling. 512 threads
    leave 128 registers per thread; ptxas (sm_90, `gemmtune kernels check`) spills 4-bit
    instances there with one 8-row tile and k_unroll >= 4 (double-buffered loads), and with
    eight tiles (64 rows)."""
    if threads < 512:
        return True
    tiles = -(-rows // 8)
    return unroll <= 2 if tiles == 1 else tiles < 8


@dataclass(frozen=True)
class KernelConfig:
    """One point of the search space. Construct with keywords; invalid values raise."""

    # The built-in default: on an H100 (bench/results/kernels-h100-2026-11-26.json) this variant is within
    # 1 % of the per-shape best fused time at M = 1 and 15 % (geometric mean) over M 1..64 on the
    # eight Llama shapes; the fused kernel beats reconstruct + cuBLAS up to M = 64 on most of them.
    max_q_gemm_rows: int = 64
    max_q_gemm_rows_kernel: int = 32
    block_n: int = 64
    threads: int = 64
    split_k: int = 0
    k_unroll: int = 2
    recon_chunk_n: int = 0
    kernel: int = DECODE
    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    wgmma_m: int = 64
    wgmma_n: int = 256
    wgmma_k: int = 64
    wgmma_stages: int = 4
    stream_warps_n: int = 1
    stream_warps_k: int = 8
    stream_chunk: int = 8
    stream_slots: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            t = _BY_NAME[f.name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"{f.name} must be an int, got {value!r}")
            if not t.lo <= value <= t.hi:
                raise InvalidConfigError(f"{f.name}={value} is outside {t.lo}..{t.hi}")
        why = launch_violation(self.block_n, self.threads, self.max_q_gemm_rows_kernel,
                               self.k_unroll)
        if why is not None:
            raise InvalidConfigError(why)
        why = tiled_violation(4, self.tile_m, self.tile_n, self.tile_k, self.stages)
        if why is not None:
            raise InvalidConfigError(why)
        why = wgmma_violation(4, self.wgmma_m, self.wgmma_n, self.wgmma_k, self.wgmma_stages)
        if why is not None:
            raise InvalidConfigError(why)
        why = stream_violation(self.stream_warps_n, self.stream_warps_k, self.stream_chunk,
                               self.stream_slots, self.split_k if self.stream else 0)
        if why is not None:
            raise InvalidConfigError(why)
        # One variant, one key: the families a config does not run keep their fields at the
        # defaults, so two configs that launch the same kernel never differ in key.
        unused = [f for k, own in FAMILY_FIELDS.items() if k != self.kernel for f in own]
        moved = [f for f in unused if getattr(self, f) != _DEFAULTS[f]]
        if moved:
            family = self.family
            raise InvalidConfigError(
                f"{', '.join(moved)} {'is' if len(moved) == 1 else 'are'} not read by the {family} "
                f"kernel (kernel={self.kernel}) and must stay at "
                f"{', '.join(f'{f}={_DEFAULTS[f]}' for f in moved)}")
        if self.recon_chunk_n and self.recon_chunk_n % 256:
            raise InvalidConfigError(f"recon_chunk_n={self.recon_chunk_n} must be 0 or a multiple of 256")

    # -- derived -------------------------------------------------------------------------------
    @property
    def warps_n(self) -> int:
        return self.block_n // 32

    @property
    def warps_k(self) -> int:
        return self.threads // self.block_n

    @property
    def tiled(self) -> bool:
        return self.kernel == TILED

    @property
    def wgmma(self) -> bool:
        return self.kernel == WGMMA

    @property
    def stream(self) -> bool:
        return self.kernel == STREAM

    @property
    def wgmma_layout(self) -> tuple[int, int, int]:
        """(warpgroups along M, tokens per warpgroup, warpgroups along N) of the wgmma kernel."""
        return WGMMA_TILES[(self.wgmma_m, self.wgmma_n)]

    @property
    def tile_layout(self) -> tuple[int, int, int, int]:
        """(warps_m, row tiles per warp, warps_n, column blocks per warp) of the tiled kernel."""
        return TILES[(self.tile_m, self.tile_n)]

    def key(self) -> str:
        """Stable, human-readable identity (field order is part of the format: append only).
        Decode-kernel configs keep the spelling they had before the tiled kernel existed."""
        base = (
            f"r{self.max_q_gemm_rows}-mk{self.max_q_gemm_rows_kernel}-bn{self.block_n}"
            f"-t{self.threads}-sk{self.split_k}-u{self.k_unroll}-rc{self.recon_chunk_n}"
        )
        if self.wgmma:
            return (f"{base}-wgmma{self.wgmma_m}x{self.wgmma_n}x{self.wgmma_k}"
                    f"-st{self.wgmma_stages}")
        if self.stream:
            return (f"{base}-stream{self.stream_warps_n}x{self.stream_warps_k}"
                    f"-ch{self.stream_chunk}-sl{self.stream_slots}")
        if not self.tiled:
            return base
        return f"{base}-tiled{self.tile_m}x{self.tile_n}x{self.tile_k}-st{self.stages}"

    @property
    def family(self) -> str:
        """The fused family this config launches ("decode", "tiled", "wgmma" or "stream")."""
        return FAMILY_LABELS[self.kernel]

    def variant_key(self) -> str:
        """Identity of the fused-kernel launch alone: configs equal here time identically at any
        M the fused kernel handles (so measurements are memoised per (variant, M))."""
        if self.tiled:
            return f"tiled{self.tile_m}x{self.tile_n}x{self.tile_k}-st{self.stages}-sk{self.split_k}"
        if self.wgmma:
            return (f"wgmma{self.wgmma_m}x{self.wgmma_n}x{self.wgmma_k}-st{self.wgmma_stages}"
                    f"-sk{self.split_k}")
        if self.stream:
            return (f"stream{self.stream_warps_n}x{self.stream_warps_k}-ch{self.stream_chunk}"
                    f"-sl{self.stream_slots}-sk{self.split_k}")
        return (
            f"mk{self.max_q_gemm_rows_kernel}-bn{self.block_n}-t{self.threads}"
            f"-sk{self.split_k}-u{self.k_unroll}"
        )

    @classmethod
    def from_variant_key(cls, key: str) -> KernelConfig:
        """The config (threshold and chunk at their defaults) whose `variant_key()` is `key`:
        results that name variants by key (bench JSON, memos) read back as configs.
        InvalidConfigError for a key no config spells."""
        m = _TILED_KEY.fullmatch(key)
        w = _WGMMA_KEY.fullmatch(key)
        s = _STREAM_KEY.fullmatch(key)
        if s:
            wn, wk, ch, sl, sk = map(int, s.groups())
            return cls(kernel=STREAM, stream_warps_n=wn, stream_warps_k=wk, stream_chunk=ch,
                       stream_slots=sl, split_k=sk)
        if m:
            tm, tn, tk, st, sk = map(int, m.groups())
            cfg = cls(kernel=TILED, tile_m=tm, tile_n=tn, tile_k=tk, stages=st, split_k=sk)
        elif w:
            wm, wn, wk, st, sk = map(int, w.groups())
            cfg = cls(kernel=WGMMA, wgmma_m=wm, wgmma_n=wn, wgmma_k=wk, wgmma_stages=st, split_k=sk)
        else:
            m = _DECODE_KEY.fullmatch(key)
            if m is None:
                raise InvalidConfigError(f"{key!r} is not a variant key")
            mk, bn, th, sk, u = map(int, m.groups())
            cfg = cls(max_q_gemm_rows_kernel=mk, block_n=bn, threads=th, split_k=sk, k_unroll=u)
        return cfg

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelConfig:
        """Strict: unknown or missing fields and wrong types raise InvalidConfigError."""
        if not isinstance(data, dict):
            raise InvalidConfigError(f"config must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        extra = set(data) - names
        missing = names - set(data) - set(LATE_FIELDS)
        if extra:
            raise InvalidConfigError(f"unknown config field(s): {', '.join(sorted(extra))}")
        if missing:
            raise InvalidConfigError(f"missing config field(s): {', '.join(sorted(missing))}")
        return cls(**data)

    def replace(self, **changes: int) -> KernelConfig:
        return replace(self, **changes)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_DEFAULTS: dict[str, int] = {f.name: f.default for f in fields(KernelConfig)}  # type: ignore[misc]

LATE_FIELDS = ("kernel", *TILED_FIELDS, *WGMMA_FIELDS, *STREAM_FIELDS)
"""Fields added after configs were first stored: a stored config without them is a config of a
family that existed when it was written (decode, or tiled without the wgmma fields), so
`from_dict` fills them with their defaults."""

PRESETS: dict[str, KernelConfig] = {
    "default": KernelConfig(),
    # ExLlamaV2 up to 0.0.11: fused kernel up to 50 rows, 8 rows per block.
    "exllamav2-0.0.11": KernelConfig(max_q_gemm_rows=50, max_q_gemm_rows_kernel=8),
    # ExLlamaV2 from 0.0.12: fused kernel up to 32 rows, 4 rows per block.
    "exllamav2-0.0.12": KernelConfig(max_q_gemm_rows=32, max_q_gemm_rows_kernel=4),
}


def preset(name: str) -> KernelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
