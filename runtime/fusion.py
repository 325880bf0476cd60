"""Projections that read one input run as one GEMM over their concatenated columns (issue 23).

A transformers Llama calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj
and up_proj on the same MLP input. At batch 1 each small GEMM pays a launch and a pipeline fill
that cost more than its weight read, so five launches a layer where two would do is the largest
fixed cost of a decode step. `fuse_projections` (called by `patch`, `load_quantized` and
`quantize_model` unless `fuse=False`) makes such siblings one `FusedGroup`:

- *One copy of the weight* (issue 21). The group's engine is a QuantLinear outside the module
  tree whose kernel layout holds every member's columns side by side (the only copy); each
  member holds `QuantizedWeight.columns` of it, a view sharing that memory, so its own
  `state_dict()`, copies, moves and `resident_bytes()` work exactly as before and rebuild
  exactly its own GPTQ tensors. The module tree does not change: `self_attn.k_proj` is still
  the QuantLinear the checkpoint named.
- *Which siblings.* The rule is `gemmtune.kernels.fusion` (shared with `gemmtune tune --model`,
  so the fused shapes are the tuned ones): the parent module's class must come from a
  transformers architecture known to call them on one tensor (Llama, Mistral, Qwen2 and
  architectures derived from them), and their quantization must allow one problem (same
  bits/group/act-order, 32-column offsets; act-order members must share their permutation,
  checked here on the tensors, else they stay separate, with the reason reported).
- *Eager calls.* The first member called with an input runs the fused GEMM and returns its
  columns as a view; the other members' column views wait in a stash (one per thread) until
  their member is called with the *same tensor* (identity, and the same version counter for
  in-place edits). The stash holds one group's outputs at most: it is emptied when the last
  member takes its output, when another group computes, or when the input tensor is freed
  (a weak reference), so no prefill output outlives its layer. A member called alone (or
  with another tensor) computes the fused GEMM and returns its own columns: always right.
- *Compiled calls* (`torch.compile`, fullgraph). Dynamo traces the same bookkeeping at trace
  time in a second memo (`_TRACED`, never touched by eager code): the first member emits one
  `gemmtune::quant_linear` op over the group (the op names the group's handle, so re-preparing
  needs no recompile), later members with the same traced tensor slice its output; the last
  one clears the memo, so the graph outputs nothing extra and CUDA graphs capture one launch.
  A compiled region that calls only some members of a group leaves that group's output in the
  memo until the next compiled call (one group's, never one per layer).
- *Outputs* are column views of the fused output (row stride = the group's width), as engines
  that fuse return them; transformers reshapes them with `.view` (valid on a column slice).
- *Life cycle.* Members prepared on a CUDA device build the engine when the last of them
  arrives there (`.cuda()`, streaming loads): each member's own buffers are freed before the
  fused layout is built, so a load needs about one group of head room. Moving a member away,
  or loading a state dict into it, drops the engine (the other members keep their views, their
  weight) and the next preparation builds it again from all members. A deleted member, or
  members whose permutations stopped matching, dissolve the group: its members run alone.
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from gemmtune.kernels.fusion import fused_problem, projection_groups, why_not_fused
from gemmtune.kernels.gptq import GPTQTensors
from gemmtune.kernels.problem import Problem
from torch import nn

from . import ops

if TYPE_CHECKING:
    from .quant_linear import QuantLinear

_TRANSFORMERS_MODULE = re.compile(r"^transformers\.models\.([A-Za-z0-9_]+)\.modeling_\1$")


def model_type_of(module: nn.Module) -> str | None:
    """The transformers `model_type` whose modeling code defines `module`'s class or one of its
    bases (`transformers.models.<type>.modeling_<type>`): how the runtime asks the rule about
    a module, including user subclasses of a transformers class. None for any other class."""
    for cls in type(module).__mro__:
        m = _TRANSFORMERS_MODULE.match(getattr(cls, "__module__", "") or "")
        if m and projection_groups(m.group(1)):
            return m.group(1)
    return None


def planned_groups(model: nn.Module, candidates: set[str] | None = None) -> list[tuple[str, ...]]:
    """Module names of every sibling group the rule fuses in `model` (each tuple in column
    order), among `candidates` (default: every QuantLinear not already grouped). Only the
    architecture half of the rule: `form_group` checks the tensors."""
    from .quant_linear import QuantLinear

    out = []
    for pname, parent in model.named_modules():
        for names in projection_groups(model_type_of(parent)):
            full = tuple(f"{pname}.{n}" if pname else n for n in names)
            kids = [getattr(parent, n, None) for n in names]
            if candidates is not None:
                ok = all(f in candidates for f in full)
            else:
                ok = all(isinstance(k, QuantLinear) and k._group is None for k in kids)
            if ok:
                out.append(full)
    return out


def _why_not(members: Sequence[QuantLinear], tensors: Sequence[GPTQTensors] | None = None) -> str | None:
    """Why `members` cannot share one GEMM (None: they can): the kernels' rule on their
    problems, then what only the layers know (zero convention, device, and an act-order
    permutation that must be the same for all)."""
    reason = why_not_fused([m.problem for m in members])
    if reason:
        return reason
    first = members[0]
    for m in members[1:]:
        if m.zero_format != first.zero_format:
            return "zero formats differ (gptq v1 vs v2)"
        if m.device != first.device:
            return f"on different devices ({first.device} vs {m.device})"
    if first.problem.act_order:
        ts = tensors if tensors is not None else [m.gptq_tensors() for m in members]
        g0 = ts[0].g_idx
        if any(t.g_idx is None or g0 is None or not torch.equal(t.g_idx, g0) for t in ts[1:]):
            return "act-order permutations (g_idx) differ"
    return None


def concat_columns(tensors: Sequence[GPTQTensors]) -> GPTQTensors:
    """The GPTQ tensors of one layer whose columns are `tensors`' side by side (same K, bits,
    group, zero convention and g_idx: see `_why_not`). qzeros concatenate on packed columns,
    whole words since every width is a multiple of 32 / bits (Problem's rule)."""
    first = tensors[0]
    return GPTQTensors(torch.cat([t.qweight for t in tensors], dim=1),
                       torch.cat([t.qzeros for t in tensors], dim=1),
                       torch.cat([t.scales for t in tensors], dim=1),
                       first.g_idx, first.bits, first.group_size, first.zero_format)


def _column_slice(t: GPTQTensors, a: int, b: int) -> GPTQTensors:
    """Columns a:b of `t` as new contiguous tensors (a failed build gives members theirs back)."""
    per_word = 32 // t.bits
    return GPTQTensors(t.qweight[:, a:b].contiguous(), t.qzeros[:, a // per_word:b // per_word].contiguous(),
                       t.scales[:, a:b].contiguous(),
                       None if t.g_idx is None else t.g_idx.clone(), t.bits, t.group_size, t.zero_format)


# -- the eager stash and the trace-time memo (module docstring) -------------------------------------

_local = threading.local()


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors keep no version counter


def _drop(ref: weakref.ref[torch.Tensor]) -> None:
    """The stashed outputs' input was freed: nobody can ask for them any more."""
    entry = getattr(_local, "entry", None)
    if entry is not None and entry[1] is ref:
        _local.entry = None


def _take(group: FusedGroup, i: int, x: torch.Tensor) -> torch.Tensor | None:
    entry = getattr(_local, "entry", None)
    if entry is None or entry[0] is not group or entry[1]() is not x or entry[2] != _version(x):
        return None
    outs = entry[3]
    out = outs[i]
    if out is None:
        return None
    outs[i] = None
    if not any(o is not None for o in outs):
        _local.entry = None
    return out


def _put(group: FusedGroup, i: int, x: torch.Tensor, outs: list[torch.Tensor | None]) -> None:
    outs[i] = None
    _local.entry = (group, weakref.ref(x, _drop), _version(x), outs) if any(
        o is not None for o in outs) else None


def clear_stash() -> None:
    """Drop this thread's stashed outputs (they are dropped on their own; for tests)."""
    _local.entry = None


class _Traced:
    """Dynamo's memo of the last fused output while tracing (module docstring)."""

    group: Any = None
    x: Any = None
    y: Any = None
    left = 0


_TRACED = _Traced()


# -- the group ------------------------------------------------------------------------------------

class FusedGroup:
    """Sibling QuantLinears computed by one GEMM over their concatenated columns (module
    docstring). Build with `form_group` / `fuse_projections`; members find it as `_group`."""

    def __init__(self, members: Sequence[QuantLinear], names: Sequence[str]) -> None:
        offsets = list(itertools.accumulate((m.out_features for m in members), initial=0))
        self.names = tuple(names)
        self.spans = tuple(zip(offsets[:-1], offsets[1:], strict=True))
        """(first, end) column of each member in the fused output."""
        self.in_features = members[0].in_features
        self.out_features = offsets[-1]
        self.problem: Problem = fused_problem([m.problem for m in members])
        self.engine: QuantLinear | None = None
        """The fused layer on CUDA (outside the module tree): the only copy of the weights."""
        self.reason: str | None = None
        """Why the group was dissolved (None while it holds)."""
        self._init_runtime()
        self._members: list[weakref.ref[QuantLinear] | None] = [weakref.ref(m) for m in members]
        for i, m in enumerate(members):
            m._group, m._member = self, i

    def _init_runtime(self) -> None:
        self._dense: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._dense_version: tuple[Any, ...] = ()
        self._op_handle = ops.register(self)

    # copies: the structure travels, members register themselves (QuantLinear.__setstate__)
    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "spans": self.spans, "in_features": self.in_features,
                "out_features": self.out_features, "problem": self.problem, "reason": self.reason}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.engine = None
        self._members = [None] * len(self.spans)
        self._init_runtime()

    def _register(self, member: QuantLinear, i: int) -> None:
        self._members[i] = weakref.ref(member)

    def __repr__(self) -> str:
        return f"FusedGroup({'+'.join(n.rpartition('.')[2] for n in self.names)}, {self.problem.key()})"

    # -- members --------------------------------------------------------------------------------
    def arriving(self) -> bool:
        """Whether a copy of the group still waits for copies of some members (a deep copy or
        unpickling restores members one at a time)."""
        return any(ref is None for ref in self._members)

    def _alive(self) -> list[QuantLinear | None]:
        return [None if ref is None else ref() for ref in self._members]

    def members(self) -> list[QuantLinear] | None:
        """The members in column order; None once any is gone or left (the group cannot run)."""
        out = self._alive()
        if any(m is None or m._group is not self for m in out):
            return None
        return out  # type: ignore[return-value]

    def dissolve(self, reason: str) -> None:
        """Members run alone from now on (each prepares its own layout when next needed)."""
        self.reason = reason
        self.engine = None
        self._dense, self._dense_version = {}, ()
        for m in self._alive():
            if m is not None and m._group is self:
                m._group, m._member = None, -1

    def reset(self) -> None:
        """A member's weight or device changed: drop the engine and what was derived from the
        weights. Members keep their views (their weights); the next preparation rebuilds."""
        self.engine = None
        self._dense, self._dense_version = {}, ()
        for ref in self._members:
            m = None if ref is None else ref()
            if m is not None and m._group is self:
                m.lookup_result, m.bands = None, ()
        if getattr(_local, "entry", None) is not None and _local.entry[0] is self:
            _local.entry = None

    def serves(self, member: QuantLinear) -> bool:
        """Whether the engine is built and `member` holds its columns of it."""
        eng = self.engine
        return eng is not None and member._qw is not None and member._qw.view_of is eng._qw

    # -- preparation ---------------------------------------------------------------------------
    def prepare(self, member: QuantLinear, *, wait: bool = False) -> bool:
        """Make the engine ready on `member`'s CUDA device: True once it serves every member.
        False when it cannot: a member is elsewhere (then `wait` callers leave the member
        unprepared until the last arrives; others prepare it alone) or the group dissolved.
        Without `wait` a ready engine re-resolves its config as `member` asks (what
        `QuantLinear.prepare` promises: a new config or a re-tune is picked up)."""
        if self.arriving():
            return False
        members = self.members()
        if members is None:
            self.dissolve("a member was deleted or left the group")
            return False
        dev = member.device
        if dev.type != "cuda" or any(m.device != dev for m in members):
            return False
        eng = self.engine
        if eng is not None and eng.device == dev and all(self.serves(m) for m in members):
            if not wait or eng.lookup_result is None:
                eng.requested_config, eng.workload = member.requested_config, member.workload
                eng.prepare()
            self._refresh(members)
        elif not self._build(members, dev, member):
            return False
        return True

    def _build(self, members: list[QuantLinear], dev: torch.device, caller: QuantLinear) -> bool:
        """One fused layout from every member's tensors; the members' own copies are freed
        before it is built, and given back if building fails."""
        from .quant_linear import GPTQ_BUFFERS, QuantLinear

        tensors = [m.gptq_tensors() for m in members]
        reason = _why_not(members, tensors)
        if reason:
            self.dissolve(reason)
            return False
        cat = concat_columns(tensors)
        del tensors
        self.engine = None
        for m in members:  # their copies (buffers, own layouts or views of an old engine) go now
            m._qw = None
            for name in GPTQ_BUFFERS:
                m._buffers[name] = None
            m._invalidate()
        p = self.problem
        try:
            eng = QuantLinear(p.k, p.n, p.bits, p.group_size, bias=False, zero_format=cat.zero_format,
                              config=caller.requested_config, workload=caller.workload, device="meta")
            eng._buffers.update(qweight=cat.qweight, qzeros=cat.qzeros, scales=cat.scales, g_idx=cat.g_idx)
            eng._invalidate()
            eng.prepare(dev)
            if eng._qw is None:
                raise RuntimeError("the fused layer did not build a kernel layout")
        except BaseException:
            for m, (a, b) in zip(members, self.spans, strict=True):
                t = _column_slice(cat, a, b)
                m._buffers.update(qweight=t.qweight, qzeros=t.qzeros, scales=t.scales, g_idx=t.g_idx)
                m._invalidate()
            raise
        del cat
        for m, (a, b) in zip(members, self.spans, strict=True):
            m._adopt(eng._qw.columns(a, b))
        self.engine = eng
        self._refresh(members)
        return True

    def _refresh(self, members: list[QuantLinear]) -> None:
        """The engine's bias from the members' (they may have been cast or reloaded) and its
        resolved bands shown on every member."""
        eng = self.engine
        assert eng is not None
        bias = None
        dtype = next((m.bias.dtype for m in members if m.bias is not None), None)
        if dtype is not None:
            bias = torch.cat([m.bias.to(device=eng.device, dtype=dtype) if m.bias is not None
                              else torch.zeros(m.out_features, dtype=dtype, device=eng.device)
                              for m in members])
        old = eng.bias
        if bias is None or old is None or old.dtype != bias.dtype or not torch.equal(old, bias):
            # replaced only when it changed: a CUDA graph captured earlier reads these addresses
            eng._buffers["bias"] = bias
            eng._bias16 = None if bias is None else bias.to(torch.float16).contiguous()
        for m in members:
            m.lookup_result, m.bands = eng.lookup_result, eng.bands

    # -- running -------------------------------------------------------------------------------
    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The fused output `[..., out_features]` (what `gemmtune::quant_linear` runs for the
        group): the engine on its device, the dense reference on the host, else each member
        alone, concatenated (a group whose members are scattered still answers)."""
        eng = self.engine
        if eng is not None and x.device == eng.device:
            return eng.forward_eager(x)
        members = self.members()
        if members is not None and all(m.device == x.device for m in members):
            if x.device.type == "cpu":
                return self._forward_dense(x, members)
            if x.is_cuda and self.prepare(members[0]):
                return self.engine.forward_eager(x)  # type: ignore[union-attr]
        # Scattered or dissolved (a graph compiled while it held may still call it): each
        # member alone; a deleted member's columns are zeros (nobody can ask for them).
        return torch.cat([m._forward_alone(x) if m is not None else x.new_zeros((*x.shape[:-1], b - a))
                          for m, (a, b) in zip(self._alive(), self.spans, strict=True)], dim=-1)

    def member_forward(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """`member`'s output: its stashed columns if a sibling just ran the fused GEMM on this
        very tensor, else the fused GEMM now (stashing the siblings' columns)."""
        i = member._member
        out = _take(self, i, x)
        if out is not None:
            return out
        if not self._runs(x):
            return member._forward_alone(x)
        y = self.forward_eager(x)
        outs: list[torch.Tensor | None] = [y[..., a:b] for a, b in self.spans]
        out = outs[i]
        _put(self, i, x, outs)
        return out  # type: ignore[return-value]

    def traced_member(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """`member_forward` as dynamo traces it: the memo lives only during the trace."""
        t = _TRACED
        if t.group is not self or t.x is not x:
            t.group, t.x, t.left = self, x, len(self.spans)
            t.y = ops.quant_linear(x, self._op_handle, self.out_features)
        y = t.y
        t.left -= 1
        if t.left <= 0:
            t.group, t.x, t.y = None, None, None
        a, b = self.spans[member._member]
        return y[..., a:b]

    def _runs(self, x: torch.Tensor) -> bool:
        """Whether the fused GEMM can serve `x` now (building the engine if it can be built)."""
        eng = self.engine
        if eng is not None:
            return x.device == eng.device
        members = self.members()
        if members is None:
            if self.reason is None:
                self.dissolve("a member was deleted or left the group")
            return False
        if any(m.device != x.device for m in members):
            return False
        if x.device.type == "cpu":
            return True
        return x.is_cuda and self.prepare(members[0])

    def _forward_dense(self, x: torch.Tensor, members: list[QuantLinear]) -> torch.Tensor:
        """The CPU reference path of the fused layer: the members' dequantized weights stacked
        (cached like a member's own, and dropped when any member's buffers change), one
        `F.linear`; fp16/bf16 inputs computed in fp32 and rounded back, like the oracle."""
        work = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):
            work = torch.float32
        version = tuple(m._weight_version() for m in members)
        if version != self._dense_version:
            self._dense, self._dense_version = {}, version
        key = (x.device, work)
        w = self._dense.get(key)
        if w is None:
            w = torch.cat([m._dequantized(x.device, work) for m in members], dim=0)
            self._dense[key] = w
        bias = None
        if any(m.bias is not None for m in members):
            bias = torch.cat([m.bias.to(work) if m.bias is not None
                              else torch.zeros(m.out_features, dtype=work) for m in members])
        out = F.linear(x.to(work), w, bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def dense_bytes(self, i: int) -> int:
        """Bytes of member `i`'s rows in the cached dense weights (resident_bytes' share)."""
        a, b = self.spans[i]
        return sum((b - a) * w.shape[1] * w.element_size() for w in self._dense.values())


# -- forming groups -------------------------------------------------------------------------------

def form_group(members: Sequence[QuantLinear], names: Sequence[str]) -> FusedGroup | str:
    """Group `members` (column order) if they can share one GEMM, else the reason they cannot.
    Nothing is built: preparation on CUDA builds the engine (`FusedGroup.prepare`)."""
    if any(m._group is not None for m in members):
        return "a member is already fused"
    first = members[0]
    if any((m.requested_config, m.workload) != (first.requested_config, first.workload) for m in members):
        return "requested config or workload differ"  # later, the last prepare() names the group's
    reason = _why_not(members)
    if reason:
        return reason
    group = FusedGroup(members, names)
    return group


@dataclass(frozen=True)
class Fusion:
    """What `fuse_projections` did: the groups formed, and each group it left separate with why."""

    groups: tuple[FusedGroup, ...]
    separate: tuple[tuple[tuple[str, ...], str], ...]


def fuse_projections(model: nn.Module) -> Fusion:
    """Group every set of sibling QuantLinears of `model` the rule fuses (module docstring),
    preparing them where they already are on CUDA. The module tree and state dict are those
    of the unfused model. Run again after replacing layers; already grouped ones are skipped."""
    groups, separate = [], []
    for names in planned_groups(model):
        members = [model.get_submodule(n) for n in names]
        g = form_group(members, names)  # type: ignore[arg-type]
        if isinstance(g, str):
            separate.append((names, g))
            continue
        groups.append(g)
        if members[0].device.type == "cuda":
            members[0].prepare()
    return Fusion(tuple(groups), tuple(separate))


def launched_problems(model: nn.Module) -> Counter[Problem]:
    """The problems whose GEMMs one forward of `model` launches: each fused group's once,
    every other QuantLinear's own (what the tuner's `transformers` layout must cover)."""
    from .quant_linear import QuantLinear

    out: Counter[Problem] = Counter()
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        g = m._group
        if g is None:
            out[m.problem] += 1
        elif id(g) not in seen:
            seen.add(id(g))
            out[g.problem] += 1
    return out
