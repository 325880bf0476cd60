"""`QuantizedWeight`: GPTQ tensors prepared once for the CUDA kernels.

Preparation happens at load, never per call:
- act-order rows are sorted by group (GPTQ act-order groups all hold `group_size` rows, so after
  sorting they are contiguous); `perm` maps each stored row back to its column of A;
- scales and zeros are fused into one `(scale, 1024 + zero)` half2 per group and column, which
  is exactly what the kernels subtract and multiply with (one 16-byte load per 4 columns);
- the v1/v2 zero convention is resolved here;
- qweight is re-laid out in tiles: for each 32-column block, for each step of 4 packed word
  rows, the 4 x 32 words a warp reads at once are 512 contiguous bytes, lane-major (lane 4g+t
  holds row t, columns 4g..4g+3). A warp walking K then reads one contiguous stream instead of
  128-byte pieces of rows N*4 bytes apart, which keeps DRAM pages open.

This layout is the only copy of a prepared layer's weight on the GPU (issue 21: the checkpoint
tensors beside it doubled a model's memory). Nothing of the checkpoint is lost in it, so
`gptq_tensors()` rebuilds the GPTQ tensors bit for bit on demand (saving, `.cpu()`, copies):
- qweight: untiling is a pure re-layout, and act-order rows come back through `perm`;
- g_idx: a valid act-order g_idx is exactly `g_idx[perm[i]] = i // group_size` (the check at
  build time), so `perm` alone gives it back, whatever order the groups were in;
- scales are stored as they are; zeros as fp16 `1024 + zero`, exact for every zero an 8-bit
  or 4-bit layer can hold (0..256: fp16 counts by one from 1024 to 2048), re-stored in the
  weight's own v1/v2 convention.
The only extras kept are two plain fields (`zero_format`, whether a g_idx was given).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidProblemError, InvalidTensorError
from .gptq import GPTQTensors, ZeroFormat, pack_cols, pack_rows, unpack_rows, zeros
from .problem import KERNEL_BITS, Problem

# Act-order rows are permuted through their unpacked values (one int32 per weight): done in
# column slices of at most this many values, so a 70B layer (28672 x 8192) costs ~128 MB of
# scratch at a time instead of ~1.9 GB, which would break the ~1 layer of head room a
# streaming load promises.
_PERMUTE_VALUES = 1 << 24


def packed_bytes(problem: Problem) -> int:
    """Bytes of a layer's checkpoint weight: packed qweight + packed qzeros + fp16 scales (the
    figure resident bytes are compared with; g_idx and bias are not weight data)."""
    g, n, bits = problem.groups, problem.n, problem.bits
    return problem.k * n * bits // 8 + g * n * bits // 8 + g * n * 2


def permute_packed_rows(qweight: torch.Tensor, bits: int, k: int, index: torch.Tensor) -> torch.Tensor:
    """Packed rows of `unpack_rows(qweight)[index]`: row i of the result holds stored row
    `index[i]`, computed in column slices (see _PERMUTE_VALUES)."""
    n = qweight.shape[1]
    out = torch.empty_like(qweight)
    step = max(32, _PERMUTE_VALUES // max(k, 1) // 32 * 32)
    idx = index.to(device=qweight.device, dtype=torch.int64)
    for n0 in range(0, n, step):
        q = unpack_rows(qweight[:, n0:n0 + step], bits, k)
        out[:, n0:n0 + step] = pack_rows(q.index_select(0, idx), bits)
    return out


def tile_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """[R, N] packed rows -> flat tiled layout [ceil(N/32), R/4, 8 (g), 4 (t), 4 (c)].

    Columns past N (when N is not a multiple of 32) are zero padding the kernels never store."""
    rows, n = qweight.shape
    if rows % 4:
        raise InvalidProblemError(f"packed rows {rows} must be a multiple of 4")
    n_pad = -(-n // 32) * 32
    q = qweight
    if n_pad != n:
        q = torch.nn.functional.pad(q, (0, n_pad - n))
    tiled = q.view(rows // 4, 4, n_pad // 32, 8, 4).permute(2, 0, 3, 1, 4)
    return tiled.contiguous().view(-1)


def untile_qweight(tiled: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """Inverse of `tile_qweight`: new [R, N] packed rows (what `gptq_tensors` rebuilds from)."""
    n_pad = -(-n // 32) * 32
    q = tiled.view(n_pad // 32, rows // 4, 8, 4, 4).permute(1, 3, 0, 2, 4).reshape(rows, n_pad)
    return q[:, :n].contiguous()


class QuantizedWeight:
    """Device-resident, kernel-ready form of one GPTQ linear weight (module docstring).

    `plans` caches one dispatch Plan per KernelConfig. A Plan refers back to its weight only
    weakly (kernels/dispatch.py), so dropping the last reference to a QuantizedWeight frees its
    tensors at once, without waiting for Python's cyclic GC.
    """

    def __init__(self, tensors: GPTQTensors, device: torch.device | str | int | None = None, *,
                 allow_cpu: bool = False) -> None:
        """`allow_cpu` builds the same layout on the host: the kernels cannot run it, but it
        rebuilds (`gptq_tensors`) like a GPU one, which is how CPU tests check the layout."""
        tensors.validate()
        problem = tensors.problem
        if not problem.has_kernel:
            raise InvalidProblemError(
                f"{problem.bits}-bit weights have no CUDA kernel (supported: {KERNEL_BITS}); "
                "use the CPU reference path"
            )
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda" and not (allow_cpu and dev.type == "cpu"):
            raise InvalidTensorError(f"QuantizedWeight needs a CUDA device, got {dev}")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.problem: Problem = problem
        self.device = dev
        self.zero_format: ZeroFormat = tensors.zero_format
        self.has_g_idx = tensors.g_idx is not None
        t = tensors.to(dev)
        z = zeros(t).to(torch.float32)
        sz = torch.stack([t.scales.to(torch.float16), (1024.0 + z).to(torch.float16)], dim=-1)
        self.sz = sz.contiguous()  # [G, N, 2] fp16
        del z, sz
        if problem.act_order:
            assert t.g_idx is not None
            g = t.g_idx.to(torch.int64)
            perm = torch.argsort(g, stable=True)
            expected = torch.arange(problem.k, device=dev) // problem.group_size
            if not torch.equal(g[perm], expected):
                raise InvalidProblemError(
                    "g_idx is irregular: after sorting, every group must hold exactly "
                    f"group_size={problem.group_size} rows (GPTQ act-order guarantees this)"
                )
            rows = permute_packed_rows(t.qweight, problem.bits, problem.k, perm)
            self.perm = perm.to(torch.int32).contiguous()
        else:
            rows = t.qweight.contiguous()
            self.perm = torch.zeros(1, dtype=torch.int32, device=dev)
        del t
        self.qweight = tile_qweight(rows)
        self.plans: dict[Any, Any] = {}  # KernelConfig -> dispatch plan (see dispatch.py)
        self.view_of: QuantizedWeight | None = None
        """The weight whose memory this one shares (`columns`); None for a weight of its own."""
        self.first_column = 0
        """Where a `columns` view starts in `view_of` (0 for a weight of its own)."""

    def columns(self, n0: int, n1: int) -> QuantizedWeight:
        """Columns `n0:n1` as a weight sharing this one's memory (nothing is copied): how each
        projection of a fused group (runtime/fusion.py) keeps its own weight inside the group's
        one copy, and rebuilds its own GPTQ tensors from it (`gptq_tensors`). `n0` must start a
        32-column tile, so the view's qweight is a contiguous run of tiles; its scale/zero pairs
        are a strided view, which the kernels cannot read: a view is for rebuilding and
        counting, never for a launch. `nbytes` of views that partition a weight sum to its own
        (the shared `perm` counts in the view starting at column 0)."""
        p = self.problem
        if not 0 <= n0 < n1 <= p.n or n0 % 32:
            raise InvalidProblemError(f"columns {n0}:{n1} of a {p.n}-column weight: need "
                                      "0 <= n0 < n1 <= N with n0 a multiple of 32")
        words = p.k * p.bits // 32 * 32  # one 32-column tile of the tiled qweight
        view = object.__new__(QuantizedWeight)
        view.problem = Problem(p.k, n1 - n0, p.bits, p.group_size, p.act_order)
        view.device, view.zero_format, view.has_g_idx = self.device, self.zero_format, self.has_g_idx
        view.sz = self.sz[:, n0:n1]
        view.perm = self.perm
        view.qweight = self.qweight[n0 // 32 * words:-(-n1 // 32) * words]
        view.plans = {}
        view.view_of, view.first_column = self, self.first_column + n0
        return view

    def gptq_tensors(self, device: torch.device | str | None = None) -> GPTQTensors:
        """The GPTQ tensors this weight was built from, bit for bit (module docstring): new
        tensors, computed on this weight's device and returned on `device` (default: the same).
        A g_idx comes back when one was given (the trivial one unless act-order)."""
        p = self.problem
        rows = p.k * p.bits // 32
        qweight = untile_qweight(self.qweight, rows, p.n)
        g_idx: torch.Tensor | None = None
        if p.act_order:
            perm = self.perm.to(torch.int64)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(p.k, device=perm.device)
            qweight = permute_packed_rows(qweight, p.bits, p.k, inverse)
            g_idx = torch.empty(p.k, dtype=torch.int32, device=perm.device)
            g_idx[perm] = torch.arange(p.k, dtype=torch.int32, device=perm.device) // p.group_size
        elif self.has_g_idx:
            g_idx = torch.arange(p.k, dtype=torch.int32, device=self.qweight.device)
            g_idx = torch.zeros_like(g_idx) if p.group_size == -1 else g_idx // p.group_size
        scales = self.sz[..., 0].contiguous()
        z = (self.sz[..., 1].to(torch.float32) - 1024.0).to(torch.int32)
        qzeros = pack_cols(z - 1 if self.zero_format == "v1" else z, p.bits)
        t = GPTQTensors(qweight, qzeros, scales, g_idx, p.bits, p.group_size, self.zero_format)
        return t if device is None or torch.device(device) == self.device else t.to(device)

    @property
    def k(self) -> int:
        return self.problem.k

    @property
    def n(self) -> int:
        return self.problem.n

    def nbytes(self) -> int:
        """Bytes this weight holds on its device (tiled qweight, scale/zero pairs, perm; a
        `columns` view counts its own columns, and the perm only if it starts at column 0)."""
        own = (self.qweight, self.sz) if self.first_column else (self.qweight, self.sz, self.perm)
        return sum(x.numel() * x.element_size() for x in own)

    def packed_bytes(self) -> int:
        """The checkpoint's bytes for the same weight (`packed_bytes`)."""
        return packed_bytes(self.problem)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.problem.key()}, device={self.device})"
