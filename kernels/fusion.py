"""Which projections run as one GEMM: the rule `gemmtune.runtime.patch` applies to a model and
`gemmtune tune --model` applies to its config, so the shapes tuned are the shapes served.

Why here: the runtime (which fuses a loaded model) and the tuner (which derives a model's
shapes from its config) may not import each other (runtime -> db, kernels; autotune -> db,
kernels), and a rule both follow must live in one place. It is model vocabulary next to
`Problem` and `Workload`, which both areas share for the same reason.

The rule has two halves:

- *Architecture*: `FUSED_PROJECTIONS` maps a transformers `model_type` to the groups of sibling
  linears (children of one module) that its code calls on the same tensor: q/k/v of the
  attention, gate/up of the MLP. Only architectures whose modeling code was read are listed
  (tests/test_fusion_rule.py checks each against the installed transformers source); anything
  else runs its projections separately, because fusing linears that read different inputs
  (cross-attention, a norm between them) would compute the wrong thing.
- *Quantization*: `why_not_fused` says whether a group's problems, in column order, can be one
  problem over their concatenated columns: same K, bits, group size and act-order flag, bits
  the kernels run, and every member but the last a whole number of 32-column tiles (the kernel
  layout tiles columns by 32, so each member's weight is then a contiguous run of tiles of the
  fused one, and its GPTQ tensors are rebuilt from that run alone). Act-order members must also
  share their row permutation (their `g_idx`); only the runtime sees the tensors, so it checks
  that too, and runs members whose permutations differ separately.
"""

from __future__ import annotations

from collections.abc import Sequence

from .problem import Problem

COLUMN_TILE = 32
"""Columns per tile of the kernel layout (kernels/weights.py): member offsets must be multiples."""

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")

FUSED_PROJECTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llama": (_ATTENTION, _MLP),
    "mistral": (_ATTENTION, _MLP),
    "ministral": (_ATTENTION, _MLP),
    "mixtral": (_ATTENTION,),  # its experts are not gate_proj / up_proj linears
    "qwen2": (_ATTENTION, _MLP),  # q/k/v carry biases: the fused GEMM adds them per column
    "qwen2_moe": (_ATTENTION, _MLP),  # the MLP pair of its shared expert and dense layers
    "qwen3": (_ATTENTION, _MLP),
    "qwen3_moe": (_ATTENTION, _MLP),
}
"""transformers `model_type` -> sibling linears its attention / MLP compute from one input,
each group in the column order of the fused GEMM (the order the model calls them)."""


def projection_groups(model_type: str | None) -> tuple[tuple[str, ...], ...]:
    """The groups of `model_type` (none for an architecture not known to share the input)."""
    return FUSED_PROJECTIONS.get(model_type or "", ())


def why_not_fused(problems: Sequence[Problem]) -> str | None:
    """None if `problems` (in column order) can run as one GEMM over their concatenated
    columns, else the reason they cannot (shown in reports)."""
    if len(problems) < 2:
        return "fewer than two projections"
    first = problems[0]
    for p in problems[1:]:
        if p.k != first.k:
            return f"in_features differ ({first.k} vs {p.k})"
        if (p.bits, p.group_size) != (first.bits, first.group_size):
            return f"quantization differs (b{first.bits} g{first.group_size} vs b{p.bits} g{p.group_size})"
        if p.act_order != first.act_order:
            return "act-order differs"
    if not first.has_kernel:
        return f"{first.bits}-bit weights have no CUDA kernel"
    odd = [p.n for p in problems[:-1] if p.n % COLUMN_TILE]
    if odd:
        return f"out_features {odd[0]} is not a multiple of {COLUMN_TILE} (the layout's column tile)"
    return None


def fused_problem(problems: Sequence[Problem]) -> Problem:
    """The one problem `problems` run as (their columns side by side); check `why_not_fused`."""
    first = problems[0]
    return Problem(first.k, sum(p.n for p in problems), first.bits, first.group_size, first.act_order)
