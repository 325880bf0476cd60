"""Fused projections on the GPU (issue 23, point 2; runtime/fusion.py): one kernel-layout copy of a
group's weights, one GEMM per group, the unfused model's logits eager, compiled (fullgraph) and
replayed in CUDA graphs, a member called on its own, state dicts bit for bit.

Run on the GPU machine: `python3 -m pytest -m gpu -q tests/test_fusion_gpu.py -s` (`-s` prints the
measured figures, lines starting with `FUSION`).
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import Problem, reference
from gemmtune.kernels.gptq import GPTQTensors, act_order_g_idx, random_gptq
from gemmtune.runtime import (
    QuantLinear,
    describe,
    fuse_projections,
    fusion,
    launched_problems,
    load_quantized,
    quantize_model,
)
from gemmtune.runtime.quant_linear import GPTQ_BUFFERS
from safetensors.torch import save_file

from tests.gpu_util import activations, capture, reference_product, requires_gpu
from tests.test_fusion import ATTN, pair, quantize_like_gptq, tiny_qwen2
from tests.test_weight_residency_gpu import _allocated
from tests.tiny_llama import tiny_llama

pytestmark = [pytest.mark.gpu, requires_gpu, pytest.mark.usefixtures("fresh_runtime")]

OP = torch.ops.gemmtune.quant_linear.default
SLACK = 32 * 2**20  # allocator rounding (see tests/test_weight_residency_gpu.py)


def report(what: str, **figures: Any) -> None:
    print(f"FUSION {what}: " + json.dumps(figures), flush=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gpu_pair(build: Any, act_order: bool = False) -> tuple[Any, Any]:
    """(fused, unfused) fp16 copies of one quantized tiny model on the GPU, no KV cache."""
    fused, unfused = pair(build, act_order)
    out = []
    for m in (fused, unfused):
        m = m.half().cuda()
        m.config.use_cache = False
        out.append(m)
    assert all(m.fused_group is not None and m.fused_group.serves(m) for m in out[0].modules()
               if isinstance(m, QuantLinear) and m.fused_group is not None)
    return out[0], out[1]


def _ids(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).cuda()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-2) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert reference.relative_error(got, want) < tol


CASES = [(tiny_llama, False), (tiny_llama, True), (tiny_qwen2, False)]
CASE_IDS = ["llama", "llama-act-order", "qwen2-biases"]


@pytest.mark.parametrize("build, act_order", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(2, 12), (2, 1), (1, 1)], ids=["prompt", "decode-b2", "decode-b1"])
def test_gpu_fused_model_gives_the_unfused_logits_eager_and_compiled(build: Any, act_order: bool,
                                                                     shape: tuple[int, int]) -> None:
    fused, unfused = _gpu_pair(build, act_order)
    ids = _ids(1, shape)
    with torch.no_grad():
        want = unfused(ids).logits
        _close(fused(ids).logits, want)
        assert fusion._local.entry is None
        explanation = torch._dynamo.explain(fused)(ids)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        assert sum(1 for g in explanation.graphs for n in g.graph.nodes if n.target is OP) == 8
        torch._dynamo.reset()
        _close(torch.compile(fused, fullgraph=True)(ids).logits, want)
        assert fusion._TRACED.group is None


@pytest.mark.parametrize("build, act_order", CASES, ids=CASE_IDS)
def test_gpu_compiled_fused_model_replays_in_a_cuda_graph(build: Any, act_order: bool) -> None:
    fused, unfused = _gpu_pair(build, act_order)
    compiled = torch.compile(fused, fullgraph=True)
    static_ids = _ids(40, (2, 4))
    with torch.no_grad():
        g, static_logits = capture(lambda: compiled(static_ids).logits, warmups=2)
        for seed in (41, 42):
            ids = _ids(seed, (2, 4))
            static_ids.copy_(ids)
            g.replay()
            torch.cuda.synchronize()
            _close(static_logits, unfused(ids).logits)


def test_gpu_eager_member_calls_replay_in_a_cuda_graph() -> None:
    """q, k, v called eagerly inside a capture: one fused launch recorded, each member's
    columns right on every replay, nothing kept once the capture's input is gone."""
    fused, unfused = _gpu_pair(tiny_qwen2)
    f, u = fused.model.layers[0].self_attn, unfused.model.layers[0].self_attn
    x = activations(3, 128, seed=90)
    with torch.no_grad():
        g, outs = capture(lambda: [getattr(f, n)(x) for n in ATTN], warmups=2)
        for seed in (91, 92):
            x.copy_(activations(3, 128, seed=seed))
            g.replay()
            torch.cuda.synchronize()
            for n, got in zip(ATTN, outs, strict=True):
                _close(got, getattr(u, n)(x))
    assert fusion._local.entry is None


def test_gpu_reduce_overhead_records_one_launch_per_group_and_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    fused, unfused = _gpu_pair(tiny_llama)
    group = fused.model.layers[1].self_attn.q_proj.fused_group
    calls: list[bool] = []
    real: Callable[[torch.Tensor], torch.Tensor] = group.forward_eager

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.cuda.is_current_stream_capturing())
        return real(x)

    monkeypatch.setattr(group, "forward_eager", spy)
    inputs = [_ids(50 + i, (2, 1)) for i in range(6)]
    with torch.no_grad():
        want = [unfused(ids).logits for ids in inputs]
        compiled = torch.compile(fused, fullgraph=True, mode="reduce-overhead")
        seen = []
        for ids, w in zip(inputs, want, strict=True):
            torch.compiler.cudagraph_mark_step_begin()
            _close(compiled(ids).logits.clone(), w)
            seen.append(len(calls))
    assert True in calls, "the group never ran under CUDA-graph capture"
    assert seen[-1] == seen[-3], f"late calls still ran the group eagerly: runs per call {seen}"
    # one run of the group per forward while recording: q, k and v did not each launch it
    assert seen[0] <= 2


# -- a group of real shapes ---------------------------------------------------------------------

def _shared_g_idx(ts: list[GPTQTensors], seed: int) -> list[GPTQTensors]:
    """The same act-order permutation for every member (what GPTQ gives q/k/v)."""
    k, gs = ts[0].k, ts[0].group_size
    g = act_order_g_idx(torch.randperm(k, generator=torch.Generator().manual_seed(seed)), gs)
    return [GPTQTensors(t.qweight, t.qzeros, t.scales, g, t.bits, t.group_size, t.zero_format) for t in ts]


def _group(k: int, ns: tuple[int, ...], bits: int = 4, group: int = 128, act: bool = False,
           bias: bool = False, seed: int = 0) -> tuple[list[QuantLinear], list[GPTQTensors], list[Any]]:
    """Members (on the host, grouped, not yet prepared), their tensors and biases."""
    ts = [random_gptq(k, n, bits, group, act, generator=torch.Generator().manual_seed(seed + i))
          for i, n in enumerate(ns)]
    if act:
        ts = _shared_g_idx(ts, seed)
    biases = [torch.randn(n, dtype=torch.float16) if bias else None for n in ns]
    members = [QuantLinear.from_gptq_tensors(t, b) for t, b in zip(ts, biases, strict=True)]
    g = fusion.form_group(members, [f"attn.{n}" for n in ATTN[:len(ns)]])
    assert isinstance(g, fusion.FusedGroup), g
    return members, ts, biases


@pytest.mark.parametrize("bits, group, act, bias", [(4, 128, False, False), (4, 128, True, True),
                                                    (8, 64, False, True), (4, -1, False, False)])
def test_gpu_each_member_alone_and_in_turn_is_its_own_product(bits: int, group: int, act: bool,
                                                              bias: bool) -> None:
    members, ts, biases = _group(4096, (4096, 1024, 1024), bits, group, act, bias, seed=3)
    for m in members:
        m.cuda()  # the last one to arrive builds the group's layout
    assert members[0].fused_group.serves(members[0]) and members[0].problem.n == 4096
    for m_rows in (1, 3, 8, 16, 100):
        x = activations(m_rows, 4096, seed=m_rows)
        want = [reference_product(x, t) + (0 if b is None else b.cuda().float()) for t, b in zip(ts, biases, strict=True)]
        with torch.no_grad():
            for i in (1, 0, 2):  # alone, each starting a fresh fused GEMM
                fusion.clear_stash()
                got = members[i](x)
                assert got.shape == (m_rows, members[i].out_features) and got.dtype == torch.float16
                assert reference.relative_error(got.float(), want[i]) < 1e-2, (m_rows, i)
            outs = [m(x) for m in members]  # in turn: one GEMM, the others' columns stashed
            for got, w in zip(outs, want, strict=True):
                assert reference.relative_error(got.float(), w) < 1e-2, m_rows


def test_gpu_a_group_holds_one_copy_of_its_weights() -> None:
    """Llama-2-13B's q+k+v and gate+up: after `.cuda()` the allocator holds the two fused
    layouts and nothing else (the kernels' scratch aside), the members hold views of them, and
    everything goes with the members."""
    gc.collect()
    start = _allocated()
    groups = [_group(5120, (5120, 5120, 5120), seed=10)[0], _group(5120, (13824, 13824), seed=20)[0]]
    members = [m for g in groups for m in g]
    for m in members:
        m.cuda()
    held = _allocated() - start
    packed = sum(m.packed_bytes() for m in members)
    resident = sum(m.resident_bytes() for m in members)
    engines = [g[0].fused_group.engine for g in groups]
    report("13B q+k+v and gate+up groups", packed=packed, resident=resident, allocated=held,
           ratio=held / packed)
    assert all(all(getattr(m, b) is None for b in GPTQ_BUFFERS) for m in members)
    assert all(m._qw.view_of is m.fused_group.engine._qw for m in members)
    assert resident == sum(e._qw.nbytes() for e in engines)  # the views partition the layouts
    assert resident <= 1.05 * packed
    assert abs(held - resident) <= SLACK, (held, resident)  # nothing beside the layouts (and scratch)
    del groups, members, engines, m
    gc.collect()
    assert _allocated() - start <= SLACK  # the group dies with its members


def test_gpu_state_dicts_moves_and_reloads_keep_the_checkpoints_tensors() -> None:
    fused, unfused = _gpu_pair(tiny_qwen2)
    ref = {k: v.cpu() for k, v in unfused.state_dict().items()}
    got = fused.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k].cpu(), ref[k]) for k in ref)
    ids = _ids(60, (2, 5))
    with torch.no_grad():
        want = unfused(ids).logits
        fused.cpu()
        assert all(m.fused_group is not None and m.fused_group.engine is None and m.qweight is not None
                   for m in fused.modules() if isinstance(m, QuantLinear) and m.fused_group is not None)
        fused.cuda()  # regrouped: the last member of each group builds its layout again
        assert all(m.fused_group.serves(m) for m in fused.modules()
                   if isinstance(m, QuantLinear) and m.fused_group is not None)
        _close(fused(ids).logits, want)
        copy_ = copy.deepcopy(fused)
        assert sum(launched_problems(copy_).values()) == 8
        _close(copy_(ids).logits, want)
        other = tiny_qwen2(7)
        quantize_like_gptq(other, False, seed=70)
        sd = other.state_dict()
        fused.load_state_dict(sd)
        other = other.half().cuda()
        other.config.use_cache = False
        _close(fused(ids).logits, other(ids).logits)
    assert all(torch.equal(v.cpu(), sd[k].to(v.dtype)) for k, v in fused.state_dict().items())


def test_gpu_a_streamed_load_builds_each_group_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_quantized places a group's members, then builds its one layout: no member ever
    builds a layout of its own on the way (which would need two copies), and the model runs."""
    model = tiny_llama(1)
    quantize_model(model, bits=4, group_size=32, generator=torch.Generator().manual_seed(2), fuse=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    built: list[Problem] = []
    real = QuantLinear._prepare_alone

    def spy(self: QuantLinear, dev: torch.device) -> Any:
        built.append(self.problem)
        return real(self, dev)

    monkeypatch.setattr(QuantLinear, "_prepare_alone", spy)
    client = tiny_llama(4)
    rep = load_quantized(client, tmp_path / "m.safetensors", {"bits": 4, "group_size": 32, "desc_act": False, "sym": False},
                         device="cuda")
    assert sorted(p.n for p in built) == sorted([256, 128, 512, 128] * 2)  # qkv, o, gate_up, down x 2
    assert all(r.device == "cuda:0" and r.source != "unresolved" for r in rep)
    assert not fuse_projections(client).groups  # nothing left to group
    assert sum(launched_problems(client).values()) == 8
    client.half()
    model.half().cuda()
    ids = _ids(80, (2, 6))
    with torch.no_grad():
        _close(client(ids).logits, model(ids).logits)
    assert len(describe(client)) == 14



def test_gpu_the_group_op_passes_torch_opcheck() -> None:
    members, _, _ = _group(1024, (1024, 256, 256), bias=True, seed=95)
    for m in members:
        m.cuda()
    g = members[0].fused_group
    assert g.serves(members[0])
    for x in (activations(4, 1024, seed=96), torch.randn(2, 100, 1024, device="cuda").half(),
              torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)):
        torch.library.opcheck(OP, (x, g._op_handle, g.out_features))
