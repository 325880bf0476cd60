"""`gemmtune::quant_linear`: one QuantLinear call as a torch custom op, so `torch.compile` can
trace a patched model without a graph break.

Why an op: dynamo cannot trace a CuPy launch (nor the CPU path's dense-weight cache, which
checks buffer versions and fills a dict on first use), so a plain `forward` would break the graph
at every layer and bring the host overhead back. Registered as a custom op with a fake
implementation, the whole layer call is one opaque node whose output shape dynamo, AOTAutograd
and Inductor know without running it.

The handle. A custom op takes tensors and plain scalars, not Python objects, and a layer's
kernel plan (compiled CuPy functions, launch grids, the kernel-ready weight) is not a tensor. So
every QuantLinear registers itself here at construction and gets an int handle, never reused in
a process; the op is `quant_linear(x, layer, out_features)` and its implementation runs that
layer's eager forward, `forward_eager(x)` -- the same code as an uncompiled call, so compiled
and eager outputs are the same numbers, the CPU cache still follows in-place edits of the
buffers, and re-preparing a layer (`.cuda()`, `load_state_dict`, a new config) needs no
recompile: the graph names the layer, not a plan. The registry holds layers weakly (a graph
does not keep a deleted model alive); a handle is meaningful only in the process that made it,
so a graph using it cannot be exported to another process. A fused group of projections
(runtime/fusion.py) registers the same way: its op computes the group's concatenated columns
once, and each member's output is a slice of it in the traced graph.

The annotations. `mutates_args=()` and a fresh output are exact: the op allocates its output
(shape `[*x.shape[:-1], out_features]`, `x`'s dtype and device, contiguous: what nn.Linear
returns) and never writes `x` nor returns a view of it. What it does write is internal: the
per-device split-K workspace, which the fused kernel's last block of each tile restores to
zero before the call ends (kernels/workspace.py), the reconstruct path's scratch, and the
layer's caches (prepared plans, dense weights), all memos of values that never change what a
call returns. None of these is an input of the op, so none is a user-visible mutation; the
workspace is one per device and, as in eager mode, serves one stream at a time.

No autograd formula is registered: the CUDA path is inference-only (as in eager mode), so run
compiled models under `torch.no_grad()` / `torch.inference_mode()` (transformers' `generate`
does).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch

OP_NAME = "gemmtune::quant_linear"


class OpLayer(Protocol):
    """What the op needs of a layer: its output width and the forward it runs."""

    out_features: int

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor: ...


_layers: weakref.WeakValueDictionary[int, OpLayer] = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def register(layer: OpLayer) -> int:
    """A new handle for `layer` (held weakly). Copies of a layer must register themselves."""
    handle = next(_handles)
    _layers[handle] = layer
    return handle


@torch.library.custom_op(OP_NAME, mutates_args=())
def quant_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """`layer`'s forward on `x` (see the module docstring for why the layer is a handle)."""
    try:
        mod = _layers[layer]
    except KeyError:
        raise RuntimeError(f"{OP_NAME}: layer handle {layer} names no live QuantLinear or fused "
                           "group (the module was deleted, or the graph comes from another "
                           "process)") from None
    out = mod.forward_eager(x)
    # The fake implementation promises a contiguous tensor; every path returns one today, and
    # this keeps the promise if one stops doing so.
    return out if out.is_contiguous() else out.contiguous()


@quant_linear.register_fake
def _quant_linear_fake(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
