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
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidProblemError, InvalidTensorError
from .gptq import GPTQTensors, pack_rows, unpack_rows, zeros
from .problem import KERNEL_BITS, Problem


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
    """Inverse of `tile_qweight` (tests and debugging)."""
    n_pad = -(-n // 32) * 32
    q = tiled.view(n_pad // 32, rows // 4, 8, 4, 4).permute(1, 3, 0, 2, 4).reshape(rows, n_pad)
    return q[:, :n].contiguous()


class QuantizedWeight:
    """Device-resident, kernel-ready form of one GPTQ linear weight."""

    def __init__(self, tensors: GPTQTensors, device: torch.device | str | int | None = None) -> None:
        tensors.validate()
        problem = tensors.problem
        if problem.bits not in KERNEL_BITS:
            raise InvalidProblemError(
                f"{problem.bits}-bit weights have no CUDA kernel (supported: {KERNEL_BITS}); "
                "use the CPU reference path"
            )
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise InvalidTensorError(f"QuantizedWeight needs a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.problem: Problem = problem
        self.device = dev
        t = tensors.to(dev)
        z = zeros(t).to(torch.float32)
        sz = torch.stack([t.scales.to(torch.float16), (1024.0 + z).to(torch.float16)], dim=-1)
        self.sz = sz.contiguous()  # [G, N, 2] fp16
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
            q = unpack_rows(t.qweight, problem.bits, problem.k)
            self.qweight = pack_rows(q[perm], problem.bits).contiguous()
            self.perm = perm.to(torch.int32).contiguous()
        else:
            self.qweight = t.qweight.contiguous()
            self.perm = torch.zeros(1, dtype=torch.int32, device=dev)
        self.qweight = tile_qweight(self.qweight)
        self.plans: dict[Any, Any] = {}  # KernelConfig -> dispatch plan (see dispatch.py)

    @property
    def k(self) -> int:
        return self.problem.k

    @property
    def n(self) -> int:
        return self.problem.n

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.qweight, self.sz, self.perm))

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.problem.key()}, device={self.device})"
