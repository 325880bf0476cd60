"""One copy of the weight (issue 21), without a GPU: the kernel layout rebuilds the checkpoint's
GPTQ tensors bit for bit, a layer holding only the layout still saves, loads, copies, pickles
and computes like one holding its buffers, reports say what it holds, and `load_quantized`
fills a model built on the `meta` device.

The layout is built on the host here (`QuantizedWeight(..., allow_cpu=True)`): the same code as
on the GPU, which the GPU tests (tests/test_weight_residency_gpu.py) run for real.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import InvalidProblemError
from gemmtune.kernels.awq import from_gptq, random_awq, to_gptq
from gemmtune.kernels.gptq import GPTQTensors, act_order_g_idx, pack_cols, random_gptq
from gemmtune.kernels.weights import QuantizedWeight, packed_bytes
from gemmtune.runtime import QuantLinear, describe, load_quantized, quantize_model
from gemmtune.runtime.quant_linear import GPTQ_BUFFERS
from torch import nn

from tests.tiny_llama import tiny_llama, tiny_llama_config


def _bits16(x: torch.Tensor) -> torch.Tensor:
    """fp16 bit patterns (so -0.0 and NaN payloads compare exactly)."""
    return x.view(torch.int16)


def assert_same_tensors(got: GPTQTensors, want: GPTQTensors) -> None:
    assert (got.bits, got.group_size, got.zero_format) == (want.bits, want.group_size, want.zero_format)
    assert torch.equal(got.qweight, want.qweight)
    assert torch.equal(got.qzeros, want.qzeros)
    assert torch.equal(_bits16(got.scales), _bits16(want.scales))
    if want.g_idx is None:
        assert got.g_idx is None
    else:
        assert got.g_idx is not None and torch.equal(got.g_idx, want.g_idx)


def _with_every_zero_and_odd_scales(t: GPTQTensors, seed: int) -> GPTQTensors:
    """`t` with its stored zeros covering every value its format can store (v1 stored 2**bits-1
    is a real zero of 2**bits) and scales including -0.0, subnormals and fp16's extremes."""
    gen = torch.Generator().manual_seed(seed)
    top = (1 << t.bits) - 1
    stored = torch.randint(0, top + 1, (t.groups, t.n), dtype=torch.int32, generator=gen)
    stored.view(-1)[: top + 1] = torch.arange(top + 1, dtype=torch.int32)
    scales = t.scales.clone()
    odd = torch.tensor([-0.0, 6e-8, 6.1e-5, 65504.0, -65504.0, 1.0, -2.5], dtype=torch.float16)
    scales.view(-1)[-odd.numel():] = odd
    return GPTQTensors(t.qweight, pack_cols(stored, t.bits), scales, t.g_idx, t.bits, t.group_size,
                       t.zero_format)


# -- the layout rebuilds the checkpoint ----------------------------------------------------------

@pytest.mark.parametrize("zf", ["v1", "v2"])
@pytest.mark.parametrize(("bits", "group", "n", "act"), [
    (4, 128, 128, False), (4, 128, 128, True), (4, 32, 72, False), (4, 32, 72, True),  # 72: tile padding
    (8, 64, 100, False), (8, 64, 100, True), (8, 32, 64, True), (4, -1, 96, False)])
def test_the_kernel_layout_rebuilds_the_gptq_tensors_bit_for_bit(bits: int, group: int, n: int, act: bool,
                                                                 zf: str) -> None:
    t = _with_every_zero_and_odd_scales(
        random_gptq(256, n, bits, group, act, zf, generator=torch.Generator().manual_seed(bits * n)), seed=n)
    qw = QuantizedWeight(t, "cpu", allow_cpu=True)
    assert qw.problem.act_order == act
    assert_same_tensors(qw.gptq_tensors(), t)


def test_an_irregular_but_valid_act_order_g_idx_comes_back_exactly() -> None:
    """Groups visited in any order, a group's rows anywhere: g_idx is still rebuilt exactly."""
    gen = torch.Generator().manual_seed(3)
    k, group = 512, 64
    base = random_gptq(k, 64, 4, group, False, "v1", generator=gen)
    g_idx = (torch.arange(k, dtype=torch.int32) // group)[torch.randperm(k, generator=gen)]
    g_idx[:group] = 7  # the first rows all belong to the last group ...
    g_idx[group:] = (torch.arange(k - group, dtype=torch.int32) // group)[torch.randperm(k - group, generator=gen)]
    t = GPTQTensors(base.qweight, base.qzeros, base.scales, g_idx.contiguous(), 4, group, "v1")
    assert t.act_order
    assert_same_tensors(QuantizedWeight(t, "cpu", allow_cpu=True).gptq_tensors(), t)
    # ... and a g_idx from a quantizer's own permutation
    perm_t = GPTQTensors(base.qweight, base.qzeros, base.scales,
                         act_order_g_idx(torch.randperm(k, generator=gen), group), 4, group, "v2")
    assert_same_tensors(QuantizedWeight(perm_t, "cpu", allow_cpu=True).gptq_tensors(), perm_t)


def test_a_g_idx_with_unequal_groups_is_refused() -> None:
    t = random_gptq(256, 64, 4, 64, True, "v1", generator=torch.Generator().manual_seed(4))
    g = t.g_idx.clone()
    g[g == 1] = 0  # group 0 now holds 128 rows, group 1 none
    with pytest.raises(InvalidProblemError, match="irregular"):
        QuantizedWeight(GPTQTensors(t.qweight, t.qzeros, t.scales, g, 4, 64, "v1"), "cpu", allow_cpu=True)


def test_a_weight_given_without_g_idx_comes_back_without_one() -> None:
    t = random_gptq(256, 64, 4, 128, False, "v2", generator=torch.Generator().manual_seed(5))
    bare = GPTQTensors(t.qweight, t.qzeros, t.scales, None, 4, 128, "v2")
    assert_same_tensors(QuantizedWeight(bare, "cpu", allow_cpu=True).gptq_tensors(), bare)


def test_an_awq_layer_rebuilds_its_documented_gptq_form_and_from_it_the_awq_file() -> None:
    a = random_awq(256, 128, 64, generator=torch.Generator().manual_seed(6))
    g = to_gptq(a)
    back = QuantizedWeight(g, "cpu", allow_cpu=True).gptq_tensors()
    assert_same_tensors(back, g)
    again = from_gptq(back)
    assert torch.equal(again.qweight, a.qweight) and torch.equal(again.qzeros, a.qzeros)
    assert torch.equal(_bits16(again.scales), _bits16(a.scales))


def test_the_cpu_layout_is_a_test_aid_not_a_silent_default() -> None:
    t = random_gptq(256, 64, 4, 128, False, "v1", generator=torch.Generator().manual_seed(7))
    with pytest.raises(Exception, match="CUDA device"):
        QuantizedWeight(t, "cpu")


@pytest.mark.parametrize(("bits", "group", "act"), [(4, 128, False), (4, 32, True), (8, 128, False), (4, -1, False)])
def test_packed_bytes_are_the_checkpoints_weight_bytes_and_resident_stays_close(bits: int, group: int,
                                                                               act: bool) -> None:
    t = random_gptq(512, 256, bits, group, act, "v1", generator=torch.Generator().manual_seed(bits))
    nbytes = sum(x.numel() * x.element_size() for x in (t.qweight, t.qzeros, t.scales))
    assert packed_bytes(t.problem) == nbytes
    qw = QuantizedWeight(t, "cpu", allow_cpu=True)
    # tiled qweight as packed; one (scale, 1024 + zero) half pair per group and column; perm
    zeros_as_half = t.groups * t.n * 2 - t.qzeros.numel() * 4
    assert qw.nbytes() == nbytes + zeros_as_half + (512 * 4 if act else 4)


# -- a layer holding only the layout -------------------------------------------------------------

def _layer(seed: int, act: bool = True, zf: str = "v1", bits: int = 4, bias: bool = True) -> tuple[QuantLinear, GPTQTensors]:
    t = random_gptq(256, 128, bits, 64, act, zf, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(128, generator=torch.Generator().manual_seed(seed + 1)).half() if bias else None
    return QuantLinear.from_gptq_tensors(t, b), t


def _held(q: QuantLinear) -> QuantLinear:
    """`q` holding only its kernel layout, as `prepare()` leaves a layer on CUDA."""
    q._hold(QuantizedWeight(q.gptq_tensors(), "cpu", allow_cpu=True))
    return q


@pytest.mark.parametrize(("zf", "act", "bits"), [("v1", True, 4), ("v2", False, 4), ("v1", False, 8), ("v2", True, 8)])
def test_a_held_layer_keeps_no_gptq_buffers_but_its_state_dict_is_the_checkpoints(zf: str, act: bool,
                                                                                  bits: int) -> None:
    q, t = _layer(10, act, zf, bits)
    want = q.state_dict()
    x = torch.randn(3, 256)
    y = q(x)
    _held(q)
    assert all(getattr(q, name) is None for name in GPTQ_BUFFERS)
    assert [n for n, _ in q.named_buffers()] == ["bias"]
    assert q.resident_bytes() == q._qw.nbytes() and q.packed_bytes() == packed_bytes(t.problem)
    got = q.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k].view(torch.int16) if got[k].is_floating_point() else got[k],
                           want[k].view(torch.int16) if want[k].is_floating_point() else want[k]), k
    assert_same_tensors(q.gptq_tensors(), t)
    assert all(getattr(q, name) is None for name in GPTQ_BUFFERS)  # saving did not bring them back
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)
    assert "act_order=True" in repr(q) if act else "act_order" not in repr(q)


def test_an_awq_layer_held_saves_the_documented_gptq_tensors() -> None:
    a = random_awq(256, 128, 64, generator=torch.Generator().manual_seed(11))
    q = QuantLinear.from_awq_tensors(a)
    want = {k: v.clone() for k, v in q.state_dict().items()}
    _held(q)
    got = q.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert got["g_idx"].equal(torch.arange(256, dtype=torch.int32) // 64) and q.zero_format == "v2"


def test_loading_a_state_dict_into_a_held_layer_replaces_its_weight() -> None:
    q, _ = _layer(12)
    other, t_other = _layer(13)
    _held(q)
    q.load_state_dict(other.state_dict())
    assert q._qw is None  # on the host the reloaded layer keeps its buffers (nothing to prepare)
    assert_same_tensors(q.gptq_tensors(), t_other)
    x = torch.randn(2, 256)
    torch.testing.assert_close(q(x), other(x), rtol=0, atol=0)
    # a partial load keeps what the state dict lacks
    q2, t2 = _layer(14)
    _held(q2)
    q2.load_state_dict({"scales": other.scales}, strict=False)
    got = q2.gptq_tensors()
    assert torch.equal(got.qweight, t2.qweight) and torch.equal(got.scales, other.scales)


def test_copies_and_pickles_of_a_held_layer_are_independent_layers_with_the_same_weight() -> None:
    q, t = _layer(15)
    x = torch.randn(4, 256)
    y = q(x)
    _held(q)
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert twin._qw is None and twin._op_handle != q._op_handle
        assert_same_tensors(twin.gptq_tensors(), t)
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_same_tensors(loaded.gptq_tensors(), t)
    assert q._qw is not None and all(getattr(q, n) is None for n in GPTQ_BUFFERS)  # the original is untouched


def test_a_dtype_cast_keeps_the_layout_and_casts_the_bias() -> None:
    q, _ = _layer(16)
    x = torch.randn(2, 256)
    y = q(x)
    _held(q)
    qw = q._qw
    q.float()
    assert q._qw is qw and q.bias.dtype == torch.float32
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)


def test_describe_reports_resident_against_packed_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    q1, t1 = _layer(17, bias=False)
    q2, t2 = _layer(18, act=False, bias=False)
    _held(q2)
    model = nn.Sequential(q1, q2)
    report = describe(model)
    rows = {r.name: r for r in report}
    assert rows["0"].packed_bytes == rows["1"].packed_bytes == packed_bytes(t1.problem)
    assert rows["0"].resident_bytes == sum(x.numel() * x.element_size()
                                           for x in (t1.qweight, t1.qzeros, t1.scales, t1.g_idx))
    assert rows["1"].resident_bytes == q2._qw.nbytes()
    assert report.resident_bytes() == rows["0"].resident_bytes + rows["1"].resident_bytes
    assert report.packed_bytes() == 2 * packed_bytes(t1.problem)
    line = report.memory()
    assert f"{report.resident_bytes() / report.packed_bytes():.2f}x" in line and "on cpu" in line
    q1(torch.randn(1, 256))  # the reference path caches a dense weight: that is held too
    assert describe(model).resident_bytes() > report.resident_bytes()
    report.print()
    out = capsys.readouterr().out
    assert "resident (x packed)" in out and "quantized weights resident" in out


# -- loading into a model built on the meta device -----------------------------------------------

QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
      "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(safetensors path, the quantized model it was saved from)."""
    from safetensors.torch import save_file

    model = tiny_llama(21)
    quantize_model(model, bits=4, group_size=32, act_order=True, generator=torch.Generator().manual_seed(22))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (path.parent / "config.json").write_text(json.dumps({"quantization_config": QC}))
    return path, model


def test_a_model_built_on_meta_loads_and_gives_the_source_models_logits(checkpoint: tuple[Path, Any]) -> None:
    import transformers

    path, source = checkpoint
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    report = load_quantized(skeleton, path, device="cpu")
    assert len(report) == 14
    assert not [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_a_meta_model_whose_tied_head_is_not_in_the_file_keeps_the_tie(tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import save_file

    cfg = tiny_llama_config(tie_word_embeddings=True)
    torch.manual_seed(24)
    source = transformers.LlamaForCausalLM(cfg).eval()
    assert source.lm_head.weight is source.model.embed_tokens.weight
    quantize_model(source, bits=4, group_size=32, generator=torch.Generator().manual_seed(25))
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(Exception, match="missing .*lm_head.weight"):
        load_quantized(skeleton, tmp_path / "m.safetensors", {**QC, "desc_act": False}, device="cpu")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg).eval()
    load_quantized(skeleton, tmp_path / "m.safetensors", {**QC, "desc_act": False}, device="cpu", strict=False)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_a_meta_tensor_nothing_can_fill_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = random_gptq(64, 32, 4, 32, False, "v1", generator=torch.Generator().manual_seed(27))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 32, bias=False)
            self.register_buffer("table", torch.zeros(3), persistent=False)

    save_file({"proj.qweight": t.qweight, "proj.qzeros": t.qzeros, "proj.scales": t.scales},
              str(tmp_path / "n.safetensors"))
    with torch.device("meta"):
        net = Net()
    with pytest.raises(Exception, match="meta device.*table"):
        load_quantized(net, tmp_path / "n.safetensors", {**QC, "desc_act": False}, device="cpu")


def test_a_meta_tensor_the_initialiser_skips_is_named_not_left_as_garbage(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = random_gptq(64, 32, 4, 32, False, "v1", generator=torch.Generator().manual_seed(28))

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("freq", torch.arange(4.0), persistent=False)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 32, bias=False)
            self.rope = Rotary()

        def _init_weights(self, module: nn.Module) -> None:
            pass  # knows nothing of Rotary

    save_file({"proj.qweight": t.qweight, "proj.qzeros": t.qzeros, "proj.scales": t.scales},
              str(tmp_path / "n.safetensors"))
    with torch.device("meta"):
        net = Net()
    with pytest.raises(Exception, match=r"left \['freq'\] of rope unset"):
        load_quantized(net, tmp_path / "n.safetensors", {**QC, "desc_act": False}, device="cpu")
