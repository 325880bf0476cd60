"""`torch.compile` of patched models: one graph, no break, eager's numbers (runtime/ops.py).

CPU tests compile the reference path; the GPU tests (marked `gpu`) compile the kernel path and
replay it in CUDA graphs, by hand and through `mode="reduce-overhead"`. On the GPU machine:
`python -m pytest -q -m gpu tests/test_runtime_compile.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.gptq import random_gptq
from gemmtune.runtime import QuantLinear, quantize_model
from gemmtune.runtime import ops as gt_ops
from torch import nn

from tests.gpu_util import capture, requires_gpu
from tests.tiny_llama import tiny_llama

transformers = pytest.importorskip("transformers")

OP = torch.ops.gemmtune.quant_linear.default
LAYERS = 14  # q k v o gate up down x 2 decoder layers


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    """Every test compiles from scratch (no graph or recompile count left by another test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _quantized_llama(seed: int = 1) -> Any:
    model = tiny_llama(seed)
    names = quantize_model(model, bits=4, group_size=32, act_order=True,
                           generator=torch.Generator().manual_seed(seed + 1))
    assert len(names) == LAYERS
    return model


def _ids(seed: int, shape: tuple[int, int] = (2, 12), device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _op_calls(explanation: Any) -> int:
    return sum(1 for g in explanation.graphs for node in g.graph.nodes if node.target is OP)


def _layer(k: int, n: int, seed: int, bias: bool = True) -> QuantLinear:
    t = random_gptq(k, n, 4, 32, bool(seed % 2), generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_gptq_tensors(t, torch.randn(n, dtype=torch.float16) if bias else None)


def _stack(seed: int = 0) -> nn.Module:
    return nn.Sequential(_layer(128, 256, seed), nn.SiLU(), _layer(256, 128, seed + 1, bias=False)).eval()


# -- CPU: the reference path --------------------------------------------------------------------

def test_a_patched_llama_is_one_graph_with_every_layer_as_the_op() -> None:
    model = _quantized_llama()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(_ids(0))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert _op_calls(explanation) == LAYERS


def test_fullgraph_compiled_llama_gives_eager_logits_without_recompiling() -> None:
    model = _quantized_llama()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        first = compiled(_ids(1)).logits
        torch.testing.assert_close(first, model(_ids(1)).logits, rtol=0, atol=0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(_ids(2)).logits  # same shapes: the cached dense weights are not guards
        torch.testing.assert_close(again, model(_ids(2)).logits, rtol=0, atol=0)


def test_inductor_compiled_layers_match_eager_on_any_leading_dims() -> None:
    model = _stack()
    compiled = torch.compile(model, fullgraph=True)  # the default backend: Inductor
    with torch.no_grad():
        for x in (torch.randn(3, 5, 128), torch.randn(7, 128).half()):
            got, want = compiled(x), model(x)
            assert (got.shape, got.dtype) == (want.shape, want.dtype)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_compiled_model_follows_in_place_edits_of_its_buffers() -> None:
    """The dense-weight cache is read at run time (inside the op), so a compiled model sees a
    reloaded scale the way an eager one does, with no recompile."""
    model = _stack()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = compiled(x)
        model[0].scales.mul_(2)
        with torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, model(x), rtol=0, atol=0)


def test_a_deep_copy_is_compiled_with_its_own_weights() -> None:
    original = _stack(seed=4)
    clone = copy.deepcopy(original)
    assert clone[0]._op_handle != original[0]._op_handle
    with torch.no_grad():
        clone[2].scales.mul_(3)
        x = torch.randn(2, 128)
        got = torch.compile(clone, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, clone(x), rtol=0, atol=0)
    assert not torch.equal(got, original(x))


def test_dynamic_token_counts_share_one_graph() -> None:
    """Generation feeds the prompt, then one token at a time: with dynamic shapes the op's fake
    implementation keeps M symbolic, so the sizes share one graph (sizes 0 and 1 are torch's
    own specialisations, so they are left out)."""
    model = _stack(seed=6)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        compiled(torch.randn(1, 9, 128))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for m in (2, 3, 40):
                x = torch.randn(1, m, 128)
                torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_the_op_registration_passes_torch_opcheck() -> None:
    """Schema (no input mutated, output aliases nothing), fake implementation against the real
    one, and AOT dispatch with dynamic shapes, as torch.library checks them."""
    q = _layer(128, 64, seed=8)
    for x in (torch.randn(2, 3, 128), torch.randn(5, 128).half()):
        torch.library.opcheck(OP, (x, q._op_handle, q.out_features))


def test_eager_calls_do_not_go_through_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager forward is the hot path: it calls the layer directly, never the op."""
    def refuse(*_a: Any) -> None:
        raise AssertionError("eager forward went through gemmtune::quant_linear")

    monkeypatch.setattr(gt_ops, "quant_linear", refuse)
    model = _stack(seed=10)
    assert model(torch.randn(2, 128)).shape == (2, 128)


def test_a_handle_of_a_deleted_layer_fails_clearly() -> None:
    q = _layer(128, 64, seed=12)
    handle = q._op_handle
    del q
    with pytest.raises(RuntimeError, match=f"layer handle {handle} names no live QuantLinear"):
        OP(torch.randn(1, 128), handle, 64)


# -- GPU: the kernel path --------------------------------------------------------------------------

def _gpu_llama() -> Any:
    """The tiny Llama on the GPU in fp16, without a KV cache (the graphs are whole forwards)."""
    model = _quantized_llama(seed=20).half().cuda()
    model.config.use_cache = False
    return model


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert reference.relative_error(got, want) < 1e-2


def _spy(layer: QuantLinear, calls: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """Record, per run of `layer` inside the op, whether a CUDA graph was being captured."""
    real: Callable[[torch.Tensor], torch.Tensor] = layer.forward_eager

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.cuda.is_current_stream_capturing())
        return real(x)

    monkeypatch.setattr(layer, "forward_eager", spy)


@pytest.mark.parametrize("shape", [(2, 12), (2, 1)], ids=["prompt", "decode"])
@pytest.mark.gpu
@requires_gpu
@pytest.mark.usefixtures("fresh_runtime")
def test_gpu_compiled_llama_has_no_graph_break_and_matches_eager(shape: tuple[int, int]) -> None:
    model = _gpu_llama()
    ids = _ids(30, shape, "cuda")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        assert _op_calls(explanation) == LAYERS
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(ids).logits
        _close(got, model(ids).logits)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.usefixtures("fresh_runtime")
def test_gpu_the_op_registration_passes_torch_opcheck() -> None:
    q = _layer(1024, 512, seed=32).cuda()
    assert q.lookup_result is not None
    for x in (torch.randn(4, 1024, device="cuda").half(), torch.randn(2, 100, 1024, device="cuda").half(),
              torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)):
        torch.library.opcheck(OP, (x, q._op_handle, q.out_features))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.usefixtures("fresh_runtime")
def test_gpu_compiled_llama_replays_in_a_cuda_graph() -> None:
    model = _gpu_llama()
    compiled = torch.compile(model, fullgraph=True)
    static_ids = _ids(40, (2, 4), "cuda")
    with torch.no_grad():
        # compile and warm up (twice) outside the capture
        g, static_logits = capture(lambda: compiled(static_ids).logits, warmups=2)
        for seed in (41, 42):
            ids = _ids(seed, (2, 4), "cuda")
            static_ids.copy_(ids)
            g.replay()
            torch.cuda.synchronize()
            _close(static_logits, model(ids).logits)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.usefixtures("fresh_runtime")
def test_gpu_reduce_overhead_captures_the_kernels_and_replays_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mode="reduce-overhead"`: Inductor's CUDA graphs record the op's kernel launches (the
    layer runs once under capture) and later calls replay them without running Python."""
    model = _gpu_llama()
    inputs = [_ids(50 + i, (2, 1), "cuda") for i in range(6)]
    with torch.no_grad():
        want = [model(ids).logits for ids in inputs]
        calls: list[bool] = []
        _spy(model.get_submodule("model.layers.1.mlp.down_proj"), calls, monkeypatch)
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        seen = []
        for ids, w in zip(inputs, want, strict=True):
            torch.compiler.cudagraph_mark_step_begin()
            _close(compiled(ids).logits.clone(), w)
            seen.append(len(calls))
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert True in calls, f"the layer never ran under CUDA-graph capture (cudagraph skips: {skips})"
    assert seen[-1] == seen[-3], f"late calls still ran the layer eagerly: runs per call {seen}"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.usefixtures("fresh_runtime")
def test_gpu_a_new_config_needs_no_recompile() -> None:
    """The graph names the layer, not its plan: re-preparing under another config (what
    bench/generate.py does between rows) is served by the same compiled graph."""
    model = _stack(seed=60).cuda()
    x = torch.randn(3, 128, device="cuda").half()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _close(compiled(x), model(x))
        for q in (model[0], model[2]):
            q.requested_config = "exllamav2-0.0.12"
            q._invalidate()
            q.prepare()
        with torch._dynamo.config.patch(error_on_recompile=True):
            _close(compiled(x), model(x))
    assert model[0].config is not None and model[0].config.max_q_gemm_rows == 32
