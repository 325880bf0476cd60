"""Per-device scratch shared by every weight: split-K partial sums, tile counters and the fp16
buffer of the reconstruct path.

Owning these per weight would cost hundreds of MB across a 70B model (ExLlamaV2 shares one
`temp_dq` for the same reason). Buffers only grow, and only when a weight is bound to a config
(`ensure`), never inside a call. The split-K buffers are kept all-zero between calls by the
kernel itself. Like ExLlamaV2's scratch, one device's workspace serves one stream at a time:
calls on two streams concurrently must not share a device workspace.

A buffer that grows is not freed: a CUDA graph captured before (say, a model's decode step, then
a larger layer bound to a config) still holds the old address, and the caching allocator would
hand that memory to the next tensor. Grown-out buffers stay alive (`retired`) for the process;
they are smaller than their successors, so this at most doubles the workspace.
"""

from __future__ import annotations

import torch


class Workspace:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partials = torch.zeros(0, dtype=torch.float32, device=device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)
        self.dequant = torch.empty(0, dtype=torch.float16, device=device)
        self.retired: list[torch.Tensor] = []

    def _grow(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if old.numel():
            self.retired.append(old)  # captured graphs may still point at it
        return new

    def ensure(self, partial_floats: int, counters: int, dequant_halves: int) -> None:
        if partial_floats > self.partials.numel():
            self.partials = self._grow(self.partials, torch.zeros(
                partial_floats, dtype=torch.float32, device=self.device))
        if counters > self.counters.numel():
            self.counters = self._grow(self.counters, torch.zeros(
                counters, dtype=torch.int32, device=self.device))
        if dequant_halves > self.dequant.numel():
            self.dequant = self._grow(self.dequant, torch.empty(
                dequant_halves, dtype=torch.float16, device=self.device))


_workspaces: dict[int, Workspace] = {}


def workspace(device: torch.device) -> Workspace:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ws = _workspaces.get(idx)
    if ws is None:
        ws = _workspaces[idx] = Workspace(torch.device("cuda", idx))
    return ws
