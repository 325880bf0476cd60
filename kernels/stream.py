"""Launch plan of the stream decode kernel (`kernels/cuda/gptq_stream_gemm.cu`).

Per M it decides, once: how many rows of A one launch takes (the block keeps its K slice of those
rows, and its partials of the tiles it covers, in shared memory beside the weight rings, so a
long K or a wide layer fits fewer), the K split (the CTAs of a thread-block cluster; `split_k` = 0
chooses the one that gives the busiest CTA the least to read), the persistent grid (one wave: as
many clusters as the GPU holds at once, never more than there are 32-column tiles) and the
dynamic shared memory. A call then only launches, so it records into CUDA graphs; nothing is
allocated.

Rules that hold for every layer are `config.stream_violation`'s. The ones that depend on the
layer and the card are applied here when a weight is bound: at least one row of A must fit beside
the rings, and clusters need sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import compile as ck
from .config import (
    STREAM_ROWS,
    KernelConfig,
    stream_a_row_bytes,
    stream_fixed_smem,
    stream_row_bytes,
    stream_smem_bytes,
    stream_violation,
)
from .errors import InvalidConfigError
from .problem import Problem

AUTO_CLUSTERS = (1, 2, 4, 8)
"""Cluster sizes `split_k` = 0 chooses among (the portable ones)."""

CLUSTER_CAPABILITY = (9, 0)
"""Thread-block clusters (and the bulk copies the kernel fills its rings with) start at sm_90;
before it the kernel runs one CTA per K slice, filling its rings with cp.async."""


@dataclass(frozen=True)
class StreamLaunch:
    """One launch of a call: rows `row0 .. row0 + rows - 1` of A and C."""

    fn: Any
    grid: int
    smem: int
    row0: int
    rows: int


class StreamPlan:
    """Everything the stream kernel needs for one weight under one config."""

    def __init__(self, problem: Problem, config: KernelConfig, device_index: int, props: Any,
                 tensors: tuple[Any, Any, Any], group_shift: int) -> None:
        self.bits, self.k, self.n, self.act_order = problem.bits, problem.k, problem.n, problem.act_order
        self.wn, self.wk = config.stream_warps_n, config.stream_warps_k
        self.warps = self.wn * self.wk
        self.chunk, self.slots = config.stream_chunk, config.stream_slots
        self.threads = 32 * self.warps
        self.device_index = device_index
        self.sm_count = props.multi_processor_count
        self.smem_limit = props.shared_memory_per_block_optin
        self.name = props.name
        why = stream_violation(self.wn, self.wk, self.chunk, self.slots, config.split_k, self.smem_limit)
        if why is not None:
            raise InvalidConfigError(f"{why} ({props.name})")
        self.qweight, self.sz, self.perm = tensors  # held: the launches read them by address
        self.group_shift = group_shift
        self.steps = problem.k // (4 * (32 // problem.bits))
        self.tiles = -(-problem.n // 32)  # 32-column tiles
        self.fixed = stream_fixed_smem(self.wn, self.wk, self.chunk, self.slots)
        clusters_ok = (props.major, props.minor) >= CLUSTER_CAPABILITY
        if config.split_k == 0:
            cands = [c for c in AUTO_CLUSTERS if c <= self.steps and (c == 1 or clusters_ok)]
        else:
            if config.split_k > 1 and not clusters_ok:
                raise InvalidConfigError(
                    f"split_k={config.split_k}: the stream kernel splits K across a thread-block "
                    f"cluster, which needs sm_90 ({props.name} is sm_{props.major}{props.minor})")
            cands = [min(config.split_k, self.steps)]
        # A cluster shape is kept where one row fits with the fewest partials (one tile a cluster).
        self.clusters = [c for c in cands if self.rows_fit(c, 1) >= 1]
        if not self.clusters:
            raise InvalidConfigError(
                f"stream kernel: one row of A of K={problem.k} ({stream_a_row_bytes(self.bits, self.k, cands[-1])} "
                f"bytes per K slice) does not fit beside rings of {self.fixed // 1024} KB in the "
                f"{self.smem_limit // 1024} KB of shared memory a block may use ({props.name}); "
                "use fewer slots, shorter chunks or a larger split_k")
        self._fns: dict[int, Any] = {}
        self._resident: dict[tuple[int, int], int] = {}
        self._launches: dict[int, tuple[StreamLaunch, ...]] = {}

    # -- resources -------------------------------------------------------------------------------
    def rows_fit(self, cluster: int, tiles_max: int) -> int:
        """Rows of A one launch can keep beside the rings (at most STREAM_ROWS) when a cluster
        takes at most `tiles_max` tiles (each row also holds the partials of those tiles)."""
        room = self.smem_limit - self.fixed
        per_row = stream_row_bytes(self.bits, self.warps, self.k, cluster, tiles_max)
        return max(0, min(STREAM_ROWS, room // per_row))

    def smem(self, rows: int, cluster: int, tiles_max: int) -> int:
        return stream_smem_bytes(self.bits, self.wn, self.wk, self.chunk, self.slots, rows, self.k,
                                 cluster, tiles_max)

    def variant(self, cluster: int) -> ck.StreamVariant:
        return ck.StreamVariant(self.bits, self.warps, self.chunk, self.slots, self.act_order, cluster)

    def fn(self, cluster: int) -> Any:
        fn = self._fns.get(cluster)
        if fn is None:
            fn = ck.get_kernel(self.variant(cluster), self.device_index)
            try:
                ck.allow_dynamic_shared_memory(fn, self.smem_limit, cluster)
            except Exception as exc:  # the driver refuses the attribute: this card cannot run it
                raise InvalidConfigError(
                    f"stream kernel: {self.name} refuses a cluster of {cluster} CTAs with "
                    f"{self.smem_limit // 1024} KB of shared memory each ({exc})") from exc
            self._fns[cluster] = fn
        return fn

    def resident(self, cluster: int, smem: int) -> int:
        """CTAs of this variant the GPU holds at once with `smem` bytes each (whole clusters)."""
        key = (cluster, smem)
        got = self._resident.get(key)
        if got is None:
            fn = self.fn(cluster)
            per_sm = ck.blocks_per_sm(fn, self.threads, smem)
            got = self.sm_count * per_sm
            if cluster > 1:
                active = ck.max_active_clusters(fn, cluster, self.threads, smem)
                got = (active if active is not None else got // cluster) * cluster
            self._resident[key] = got
        return got

    # -- per M -----------------------------------------------------------------------------------
    def layout(self, cluster: int, m: int) -> tuple[int, int, int] | None:
        """(rows per launch, grid, shared memory) of clusters of `cluster` CTAs at M, or None where
        not one row, or not one cluster, fits. The grid is one wave of clusters (at most one per
        tile) and sizes the partials (the most tiles a cluster takes), which size the shared
        memory, which sizes the wave: start from one CTA an SM and grow the partials until the
        wave they give needs no more."""
        tiles_max = -(-self.tiles // max(1, self.sm_count // cluster))
        while True:
            rows = min(m, self.rows_fit(cluster, tiles_max))
            if rows < 1:
                return None
            smem = self.smem(rows, cluster, tiles_max)
            clusters = min(self.tiles, self.resident(cluster, smem) // cluster)
            if clusters < 1:
                return None
            need = -(-self.tiles // clusters)
            if need <= tiles_max:
                return rows, clusters * cluster, smem
            tiles_max = need

    def choose(self, m: int) -> tuple[int, int]:
        """(cluster, rows per launch) at M: fewest launches first (each reads the whole weight),
        then the least the busiest CTA reads (its cluster's tiles times its K slice: a cluster
        splits K, so a layer whose tiles divide badly into the SM count still spreads evenly),
        then the smaller cluster."""
        best: tuple[tuple[int, ...], int, int] | None = None
        for c in self.clusters:
            lay = self.layout(c, m)
            if lay is None:
                continue
            rows, grid, _ = lay
            work = -(-self.tiles // (grid // c)) * -(-self.steps // c)
            score = (-(-m // rows), work, c)
            if best is None or score < best[0]:
                best = (score, c, rows)
        if best is None:
            raise InvalidConfigError(f"stream kernel: no cluster of {self.clusters} fits {self.name}")
        return best[1], best[2]

    def launches(self, m: int) -> tuple[StreamLaunch, ...]:
        got = self._launches.get(m)
        if got is None:
            cluster, _ = self.choose(m)
            rows, grid, smem = self.layout(cluster, m)  # type: ignore[misc]  # choose() found it
            fn = self.fn(cluster)
            got = tuple(StreamLaunch(fn, grid, smem, r0, min(rows, m - r0)) for r0 in range(0, m, rows))
            self._launches[m] = got
        return got

    def prepare(self, ms: tuple[int, ...]) -> None:
        """Compile and size every launch at these Ms (a timed or captured call compiles nothing)."""
        for m in ms:
            self.launches(m)

    def run(self, a: Any, c: Any, m: int, stream: int) -> None:
        a0, c0 = a.data_ptr(), c.data_ptr()
        q, s, p = ck.ptr(self.qweight.data_ptr()), ck.ptr(self.sz.data_ptr()), ck.ptr(self.perm.data_ptr())
        k, n = self.k, self.n
        for ln in self.launches(m):
            args = (ck.ptr(a0 + 2 * ln.row0 * k), q, s, p, ck.ptr(c0 + 2 * ln.row0 * n),
                    ck.i32(ln.rows), ck.i32(k), ck.i32(n), ck.i32(self.group_shift))
            ck.launch(ln.fn, (ln.grid, 1, 1), self.threads, args, stream, ln.smem)
