"""`dispatch(a, weight, config)`: fused kernel for small M, reconstruct + cuBLAS above.

All per-(weight, config) decisions (kernel variants, grid shapes, workspace sizes) are made once
in a `Plan`; a call does a few attribute checks, picks the path by M and launches on torch's
current stream. Nothing but the output is allocated per call, so calls record into CUDA graphs.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from . import compile as ck
from .config import (
    WGMMA_CAPABILITY,
    KernelConfig,
    tiled_shape,
    tiled_violation,
    wgmma_shape,
    wgmma_violation,
)
from .errors import InvalidConfigError, InvalidTensorError
from .stream import StreamPlan
from .weights import QuantizedWeight
from .workspace import Workspace, workspace

# Split-K partial sums are kept for at most this many rows of A: splitting K pays when M is small
# (few output tiles for many SMs); above it the grid is large enough without, and the fp32
# workspace (rows x N) stays bounded (256 x 57344 x 4 B = 59 MB) whatever max_q_gemm_rows is.
SPLIT_MAX_ROWS = 256

# Blocks to aim for when split_k = 0 (auto): two waves of the GPU keep every SM busy while the
# last blocks of the first wave drain.
_AUTO_WAVES = 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """Everything needed to run one weight under one config."""

    def __init__(self, weight: QuantizedWeight, config: KernelConfig) -> None:
        p = weight.problem
        # The weight's tensors are held directly and the weight itself only weakly: it caches
        # this plan (`weight.plans`), so a strong reference back would be a cycle that keeps a
        # re-prepared layer's old weights on the GPU until Python's cyclic GC happens to run.
        self._weight = weakref.ref(weight)
        self.qweight, self.sz, self.perm = weight.qweight, weight.sz, weight.perm
        self.config = config
        self.device_index = weight.device.index
        self.k, self.n = p.k, p.n
        g = p.effective_group
        # Kernels find a row's group with a shift: groups are powers of two, or one per column.
        self.group_shift = g.bit_length() - 1 if g & (g - 1) == 0 and p.group_size != -1 else 31
        self.max_rows = config.max_q_gemm_rows
        self.m_count = config.max_q_gemm_rows_kernel
        self.threads = config.threads
        self.grid_x = _cdiv(p.n, config.block_n)
        kstep = 4 * (32 // p.bits)
        self.total_steps = p.k // kstep
        props = torch.cuda.get_device_properties(self.device_index)
        self.sm_count = props.multi_processor_count
        self.bits, self.act_order = p.bits, p.act_order
        self._variants: dict[tuple[int, bool], ck.FusedVariant] = {}
        self.recon_variant = ck.ReconVariant(p.bits, p.act_order)
        self.chunk = config.recon_chunk_n if 0 < config.recon_chunk_n < p.n else p.n
        self.ws: Workspace = workspace(weight.device)
        # The wgmma kernel takes the tiled kernel's arguments and grid, so both block-tile
        # families launch through run_tiled ("tiled" below means either).
        self.tiled = config.tiled or config.wgmma
        if config.wgmma:
            self._bind_wgmma(weight, props)
        elif self.tiled:
            why = tiled_violation(p.bits, config.tile_m, config.tile_n, config.tile_k, config.stages,
                                  props.shared_memory_per_block_optin)
            if why is not None:
                raise InvalidConfigError(f"{why} ({props.name})")
            wm, mt, wn, nw = config.tile_layout
            ks = tiled_shape(p.bits, config.tile_m, config.tile_n, config.tile_k)[0]
            self.tile_m, self.stage_steps = config.tile_m, ks
            self.grid_x = _cdiv(p.n, config.tile_n)
            self.threads = 32 * wm * wn
            self._tiled = {split: ck.TiledVariant(p.bits, wm, mt, wn, nw, ks, config.stages, split)
                           for split in (False, True)}
            self.smem = self._tiled[False].smem_bytes
            self.perm_index = self.perm if p.act_order else None
        # The stream family: its own launch plan (one wave, K split on chip: no workspace).
        self.stream: StreamPlan | None = None
        if config.stream:
            self.stream = StreamPlan(p, config, self.device_index, props,
                                     (weight.qweight, weight.sz, weight.perm), self.group_shift)
        split_rows = 0 if self.stream else min(self.max_rows, SPLIT_MAX_ROWS)
        tiles = self.grid_x * _cdiv(max(split_rows, 1), self.tile_m if self.tiled else self.m_count)
        self.ws.ensure(split_rows * p.n, tiles, p.k * self.chunk)
        self._fns: dict[tuple[int, bool], object] = {}
        self._slots: dict[int, int] = {}
        self._recon_fn: object | None = None
        self._launch_cache: dict[int, tuple[tuple[int, int, int], object]] = {}

    @property
    def weight(self) -> QuantizedWeight | None:
        """The weight this plan runs (None once it is gone; the plan keeps its tensors)."""
        return self._weight()

    def _bind_wgmma(self, weight: QuantizedWeight, props: Any) -> None:
        """The wgmma family's variants, grid and shared memory; it exists on sm_90 cards only
        (`wgmma.mma_async` is an sm_90a instruction)."""
        p, c = weight.problem, self.config
        cc, name = (props.major, props.minor), props.name
        if cc != WGMMA_CAPABILITY:
            raise InvalidConfigError(
                f"the wgmma kernel runs on sm_90 cards only ({name} is sm_{cc[0]}{cc[1]})")
        why = wgmma_violation(p.bits, c.wgmma_m, c.wgmma_n, c.wgmma_k, c.wgmma_stages,
                              props.shared_memory_per_block_optin)
        if why is not None:
            raise InvalidConfigError(f"{why} ({name})")
        wgm, tn, wgn = c.wgmma_layout
        ks = wgmma_shape(p.bits, c.wgmma_m, c.wgmma_n, c.wgmma_k)[0]
        self.tile_m, self.stage_steps = c.wgmma_m, ks
        self.grid_x = _cdiv(p.n, c.wgmma_n)
        self.threads = 128 * wgm * wgn
        self._tiled = {split: ck.WgmmaVariant(p.bits, wgm, wgn, tn, ks, c.wgmma_stages, split)
                       for split in (False, True)}  # type: ignore[misc]
        self.smem = self._tiled[False].smem_bytes
        self.perm_index = weight.perm if p.act_order else None

    # -- variants and grid ----------------------------------------------------------------------
    def tiled_fn(self, split: bool) -> object:
        key = (0, split)  # the tiled kernel has one instance per split flag
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = ck.get_kernel(self._tiled[split], self.device_index)
        return fn

    def rows_for(self, m: int) -> int:
        """Rows per block at M: the config's `max_q_gemm_rows_kernel`, or fewer when M itself is
        smaller (8, 16 or 32, the next that holds M). A block holds all M rows either way; the
        smaller instance just skips MMA tiles that would be all padding."""
        mk = self.m_count
        if m >= mk:
            return mk
        rows = 8
        while rows < m:
            rows *= 2
        return min(mk, rows)

    def variant_for(self, rows: int, split: bool) -> ck.FusedVariant:
        key = (rows, split)
        v = self._variants.get(key)
        if v is None:
            c = self.config
            v = self._variants[key] = ck.FusedVariant(self.bits, rows, c.warps_n, c.warps_k,
                                                      c.k_unroll, self.act_order, split)
        return v

    def fused_fn(self, rows: int, split: bool) -> object:
        key = (rows, split)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = ck.get_kernel(self.variant_for(rows, split), self.device_index)
        return fn

    def slots(self, rows: int) -> int:
        """Blocks of this variant resident on the whole GPU at once."""
        got = self._slots.get(rows)
        if got is None:
            if self.tiled:
                per_sm = ck.blocks_per_sm(self.tiled_fn(True), self.threads, self.smem)
            else:
                per_sm = ck.blocks_per_sm(self.fused_fn(rows, True), self.threads)
            got = self._slots[rows] = self.sm_count * per_sm
        return got

    def split_for(self, m: int) -> int:
        """K slices at M: config.split_k, or (auto, 0) the count whose grid fills the GPU's block
        slots in the most nearly whole waves, so the last wave does not run a few SMs alone.
        No split above SPLIT_MAX_ROWS rows."""
        if m > SPLIT_MAX_ROWS:
            return 1
        if self.tiled:
            rows = self.tile_m
            max_split = max(1, self.total_steps // self.stage_steps)  # a slice holds a stage
        else:
            rows = self.rows_for(m)
            max_split = max(1, self.total_steps // self.config.warps_k)
        base = self.grid_x * _cdiv(m, rows)
        split = self.config.split_k
        if split == 0:
            slots = self.slots(rows)
            best, split = -1.0, 1
            for s in range(1, 17):
                waves = base * s / slots
                score = waves / math.ceil(waves) - 0.01 * s
                if score > best:
                    best, split = score, s
        return max(1, min(split, max_split))

    def recon_fn(self) -> object:
        if self._recon_fn is None:
            self._recon_fn = ck.get_kernel(self.recon_variant, self.device_index)
        return self._recon_fn

    def prepare(self, ms: tuple[int, ...] = ()) -> None:
        """Compile every kernel this plan launches at the given Ms (default: every fused row
        count), so a timed or captured call compiles nothing."""
        if self.stream is not None:
            fused = ms if ms else range(1, self.max_rows + 1)
            self.stream.prepare(tuple(m for m in fused if m <= self.max_rows))
            self.recon_fn()
            return
        if self.tiled:
            self.tiled_fn(False)
            self.tiled_fn(True)
            self.recon_fn()
            return
        rows = {self.rows_for(m) for m in ms if m <= self.max_rows} if ms else \
            {self.rows_for(m) for m in range(1, min(self.max_rows, self.m_count) + 1)}
        for r in rows:
            self.fused_fn(r, False)
            self.fused_fn(r, True)
        self.recon_fn()

    # -- paths ---------------------------------------------------------------------------------
    def run_tiled(self, a: torch.Tensor, c: torch.Tensor, m: int, stream: int) -> None:
        cached = self._launch_cache.get(m)
        if cached is None:
            gy = self.split_for(m)
            cached = ((_cdiv(m, self.tile_m), gy, self.grid_x), self.tiled_fn(gy > 1))
            self._launch_cache[m] = cached
        grid, fn = cached
        if self.perm_index is not None:
            # Act-order: A's columns into stored-row order, once per call (the kernel stages A
            # with 16-byte copies, which cannot gather). The one allocation of a call besides the
            # output, M x K halves from torch's caching allocator (a graph's own pool when
            # captured).
            a = torch.index_select(a, 1, self.perm_index)
        ws = self.ws
        args = (
            ck.ptr(a.data_ptr()), ck.ptr(self.qweight.data_ptr()), ck.ptr(self.sz.data_ptr()),
            ck.ptr(c.data_ptr()), ck.ptr(ws.partials.data_ptr()), ck.ptr(ws.counters.data_ptr()),
            ck.i32(m), ck.i32(self.k), ck.i32(self.n), ck.i32(self.group_shift),
        )
        ck.launch(fn, grid, self.threads, args, stream, self.smem)

    def run_fused(self, a: torch.Tensor, c: torch.Tensor, m: int, stream: int) -> None:
        if self.stream is not None:
            self.stream.run(a, c, m, stream)
            return
        if self.tiled:
            self.run_tiled(a, c, m, stream)
            return
        cached = self._launch_cache.get(m)
        if cached is None:
            rows = self.rows_for(m)
            gy = self.split_for(m)
            cached = ((self.grid_x, gy, _cdiv(m, rows)), self.fused_fn(rows, gy > 1))
            self._launch_cache[m] = cached
        grid, fn = cached
        ws = self.ws
        args = (
            ck.ptr(a.data_ptr()), ck.ptr(self.qweight.data_ptr()), ck.ptr(self.sz.data_ptr()),
            ck.ptr(self.perm.data_ptr()), ck.ptr(c.data_ptr()), ck.ptr(ws.partials.data_ptr()),
            ck.ptr(ws.counters.data_ptr()), ck.i32(m), ck.i32(self.k), ck.i32(self.n),
            ck.i32(self.group_shift),
        )
        ck.launch(fn, grid, self.threads, args, stream)

    def reconstruct(self, out: torch.Tensor, n0: int, count: int, ldo: int, stream: int) -> None:
        steps = self.k * self.bits // 32 // 4
        threads = _cdiv(count, 4) * steps
        grid = (_cdiv(threads, ck.ReconVariant.threads), 1, 1)
        args = (
            ck.ptr(self.qweight.data_ptr()), ck.ptr(self.sz.data_ptr()), ck.ptr(self.perm.data_ptr()),
            ck.ptr(out.data_ptr()), ck.i32(self.k), ck.i32(self.n), ck.i32(self.group_shift),
            ck.i32(n0), ck.i32(count), ck.i32(ldo),
        )
        ck.launch(self.recon_fn(), grid, ck.ReconVariant.threads, args, stream)

    def run_recon(self, a: torch.Tensor, c: torch.Tensor, stream: int) -> None:
        k, n, chunk = self.k, self.n, self.chunk
        buf = self.ws.dequant
        if chunk >= n:
            w = buf[: k * n].view(k, n)
            self.reconstruct(w, 0, n, n, stream)
            torch.mm(a, w, out=c)
            return
        for n0 in range(0, n, chunk):
            cnt = min(chunk, n - n0)
            w = buf[: k * cnt].view(k, cnt)
            self.reconstruct(w, n0, cnt, cnt, stream)
            torch.mm(a, w, out=c[:, n0 : n0 + cnt])

    def __call__(self, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # CuPy launches into the *current* CUDA context, and this plan's kernels and stream belong
        # to the weight's device: a layer on cuda:1 called while torch's current device is 0 (a
        # model split across cards) switches for the call. One int compare when they agree.
        if torch.cuda.current_device() != self.device_index:
            with torch.cuda.device(self.device_index):
                return self._call(a, out)
        return self._call(a, out)

    def _call(self, a: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        k, n = self.k, self.n
        m = a.numel() // k
        a2 = a.view(m, k)
        c = torch.empty((m, n), dtype=torch.float16, device=a.device) if out is None else out.view(m, n)
        if m == 0:
            return c.view(*a.shape[:-1], n)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        if m <= self.max_rows:
            self.run_fused(a2, c, m, stream)
        else:
            self.run_recon(a2, c, stream)
        return c.view(*a.shape[:-1], n)


def check_input(a: torch.Tensor, weight: QuantizedWeight, out: torch.Tensor | None = None) -> None:
    """Typed errors for every input the kernels cannot take (instead of a CUDA fault)."""
    if not isinstance(a, torch.Tensor):
        raise InvalidTensorError(f"input must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype != torch.float16:
        raise InvalidTensorError(f"input dtype must be torch.float16, got {a.dtype}")
    if a.device != weight.device:
        raise InvalidTensorError(f"input is on {a.device}, weight on {weight.device}")
    if a.dim() < 1 or a.shape[-1] != weight.k:
        raise InvalidTensorError(f"input last dimension must be K={weight.k}, got shape {tuple(a.shape)}")
    if not a.is_contiguous():
        raise InvalidTensorError("input must be contiguous (call .contiguous())")
    if a.data_ptr() % 16:
        raise InvalidTensorError("input data must be 16-byte aligned")
    if out is not None:
        m = a.numel() // weight.k
        if out.dtype != torch.float16 or out.device != weight.device or not out.is_contiguous() \
                or out.numel() != m * weight.n:
            raise InvalidTensorError(f"out must be a contiguous float16 tensor of {m}x{weight.n} on {weight.device}")


def plan_for(weight: QuantizedWeight, config: KernelConfig) -> Plan:
    plan = weight.plans.get(config)
    if plan is None:
        plan = weight.plans[config] = Plan(weight, config)
    return plan


def dispatch(a: torch.Tensor, weight: QuantizedWeight, config: KernelConfig,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """C = A @ dequant(W) in fp16 for any leading dims of A; picks fused vs reconstruct by M."""
    check_input(a, weight, out)
    return plan_for(weight, config)(a, out)
