"""QuantLinear and the model helpers on CPU: reference numbers, nn.Linear parity, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gemmtune.kernels import InvalidProblemError, InvalidTensorError, reference
from gemmtune.kernels.gptq import GPTQTensors, quantize, random_gptq, to_v2
from gemmtune.runtime import GPTQSpec, QuantLinear, describe, patch, quantize_model
from safetensors.torch import save_file
from torch import nn


def _layer(k: int = 256, n: int = 128, group: int = 64, act: bool = True, seed: int = 0,
           bits: int = 4) -> GPTQTensors:
    return random_gptq(k, n, bits, group, act, generator=torch.Generator().manual_seed(seed))


def _oracle(x: torch.Tensor, t: GPTQTensors, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = reference.gemm(x.reshape(-1, t.k).double(), t)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], t.n)


@pytest.mark.parametrize("bits,group,act", [(4, 64, True), (4, -1, False), (8, 32, False), (3, 128, True)])
def test_forward_matches_the_oracle_on_any_leading_dims(bits: int, group: int, act: bool) -> None:
    t = _layer(256, 128, group, act, seed=bits + group, bits=bits)
    bias = torch.randn(128, dtype=torch.float16)
    m = QuantLinear.from_gptq_tensors(t, bias)
    for shape in [(256,), (7, 256), (2, 3, 256), (0, 256)]:
        x = torch.randn(shape)
        y = m(x)
        assert y.shape == nn.Linear(256, 128)(x).shape and y.dtype == torch.float32
        assert reference.relative_error(y, _oracle(x, t, bias)) < 1e-6  # fp32 rounding only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_and_shape_are_those_of_nn_linear(dtype: torch.dtype) -> None:
    t = _layer(seed=3)
    m = QuantLinear.from_gptq_tensors(t, torch.randn(128, dtype=torch.float16))
    lin = nn.Linear(256, 128).to(dtype)
    x = torch.randn(4, 5, 256).to(dtype)
    y = m(x)
    assert (y.shape, y.dtype) == (lin(x).shape, lin(x).dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(y.double(), _oracle(x, t, m.bias), rtol=tol, atol=tol * 10)


def test_v1_and_v2_zeros_give_the_same_layer() -> None:
    t = _layer(seed=5)
    x = torch.randn(6, 256)
    torch.testing.assert_close(QuantLinear.from_gptq_tensors(to_v2(t))(x), QuantLinear.from_gptq_tensors(t)(x))


def test_state_dict_round_trips_like_a_gptq_module_and_reloading_refreshes_the_cache() -> None:
    t = _layer(seed=7)
    m = QuantLinear.from_gptq_tensors(t, torch.randn(128, dtype=torch.float16))
    sd = m.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert (sd["qweight"].dtype, tuple(sd["qweight"].shape)) == (torch.int32, (32, 128))
    x = torch.randn(3, 256)
    fresh = QuantLinear(256, 128, bits=4, group_size=64)
    y0 = fresh(x)  # caches the (placeholder) dense weight
    fresh.load_state_dict(sd)
    assert not torch.equal(fresh(x), y0)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    # An in-place edit of a buffer is seen too (the cache follows tensor versions).
    other = _layer(seed=8)
    with torch.no_grad():
        fresh.scales.copy_(other.scales)
    torch.testing.assert_close(
        fresh(x).double(), _oracle(x, GPTQTensors(t.qweight, t.qzeros, other.scales, t.g_idx, 4, 64), m.bias),
        rtol=1e-5, atol=1e-5)


def test_dtype_casts_keep_scales_fp16_and_results_exact() -> None:
    t = _layer(seed=9)
    m = QuantLinear.from_gptq_tensors(t, torch.randn(128, dtype=torch.float16))
    x = torch.randn(2, 256)
    before = m(x)
    m.float()
    assert m.scales.dtype == torch.float16 and m.bias.dtype == torch.float32
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)
    m.double()
    assert m.scales.dtype == torch.float16 and m(x.double()).dtype == torch.float64


def test_extra_repr_names_shape_format_and_config_state() -> None:
    m = QuantLinear.from_gptq_tensors(_layer(seed=1))
    r = repr(m)
    assert "in_features=256" in r and "out_features=128" in r and "group_size=64" in r
    assert "act_order=True" in r and "config=none (CPU: reference path)" in r


# -- checkpoints ---------------------------------------------------------------------------------


def _save(tmp_path: Path, t: GPTQTensors, bias: torch.Tensor | None, prefix: str = "layers.0.proj") -> Path:
    path = tmp_path / "model.safetensors"
    tensors = {f"{prefix}.qweight": t.qweight, f"{prefix}.qzeros": t.qzeros,
               f"{prefix}.scales": t.scales, f"{prefix}.g_idx": t.g_idx,
               "other.weight": torch.randn(4, 4)}
    if bias is not None:
        tensors[f"{prefix}.bias"] = bias
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_from_safetensors_reads_the_hf_quantization_config(tmp_path: Path, fmt: str) -> None:
    t = _layer(seed=11)
    stored = to_v2(t) if fmt == "gptq_v2" else t
    bias = torch.randn(128, dtype=torch.float16)
    path = _save(tmp_path, stored, bias)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
          "checkpoint_format": fmt}
    m = QuantLinear.from_safetensors(path, "layers.0.proj", qc)
    assert m.zero_format == ("v2" if fmt == "gptq_v2" else "v1")
    x = torch.randn(5, 256)
    torch.testing.assert_close(m(x).double(), _oracle(x, t, bias), rtol=1e-5, atol=1e-5)
    # Reading a v1 file as v2 shifts every zero by one: the output must differ.
    if fmt == "gptq":
        wrong = QuantLinear.from_safetensors(path, "layers.0.proj", {**qc, "checkpoint_format": "gptq_v2"})
        assert not torch.allclose(wrong(x), m(x), rtol=1e-2, atol=1e-2)


def test_checkpoint_config_is_validated(tmp_path: Path) -> None:
    t = _layer(seed=12)
    path = _save(tmp_path, t, None)
    good = {"bits": 4, "group_size": 64, "desc_act": True, "sym": False}
    with pytest.raises(InvalidTensorError, match="sym=True"):
        QuantLinear.from_safetensors(path, "layers.0.proj", {**good, "sym": True})
    with pytest.raises(InvalidTensorError, match="quant_method=awq but the tensors have not AWQ's"):
        QuantLinear.from_safetensors(path, "layers.0.proj", {**good, "quant_method": "awq"})
    with pytest.raises(InvalidProblemError, match="quant_method='exl2'"):
        QuantLinear.from_safetensors(path, "layers.0.proj", {**good, "quant_method": "exl2"})
    with pytest.raises(InvalidProblemError, match="checkpoint_format"):
        GPTQSpec.from_config({**good, "checkpoint_format": "marlin"})
    with pytest.raises(InvalidTensorError, match="layers.1.proj.qweight"):
        QuantLinear.from_safetensors(path, "layers.1.proj", good)
    with pytest.raises(InvalidTensorError):  # wrong group size for these tensors
        QuantLinear.from_safetensors(path, "layers.0.proj", {**good, "group_size": 128})
    sym = quantize(torch.randn(256, 128), 4, 64, sym=True)
    m = QuantLinear.from_safetensors(_save(tmp_path, sym, None), "layers.0.proj", {**good, "sym": True})
    assert m.bits == 4


# -- patch / quantize_model -------------------------------------------------------------------------


class ForeignGPTQLinear(nn.Module):
    """Shaped like AutoGPTQ's QuantLinear: GPTQ buffers plus bits/group_size attributes
    (group_size -1 stored as in_features), and a forward patch() must make unnecessary."""

    def __init__(self, t: GPTQTensors, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__()
        self.bits = t.bits
        self.group_size = group_size
        self.infeatures, self.outfeatures = t.k, t.n
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, getattr(t, name).clone())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a foreign GPTQ kernel ran: patch() missed this module")


def test_patch_replaces_foreign_gptq_modules_and_reports_them(capsys: pytest.CaptureFixture[str]) -> None:
    t1, t2 = _layer(256, 512, 64, True, seed=21), _layer(512, 128, -1, False, seed=22)
    b1 = torch.randn(512, dtype=torch.float16)
    model = nn.Sequential(ForeignGPTQLinear(t1, b1, 64), nn.ReLU(),
                          nn.Sequential(ForeignGPTQLinear(t2, None, 512)))
    x = torch.randn(3, 256)
    report = patch(model)
    assert capsys.readouterr().out == ""
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert [(r.name, r.problem_key, r.source) for r in report] == [
        ("0", "256x512-b4-g64-act", "cpu reference"), ("2.0", "512x128-b4-g-1", "cpu reference")]
    h = torch.relu(_oracle(x, t1, b1))
    torch.testing.assert_close(model(x).double(), _oracle(h.float(), t2), rtol=1e-4, atol=1e-4)
    assert len(describe(model)) == 2
    patch(model, verbose=True)  # nothing left to patch, but the table prints
    assert "quantized layers" in capsys.readouterr().out


def test_patch_needs_bits_from_the_module_or_the_config() -> None:
    t = _layer(seed=23)
    bare = ForeignGPTQLinear(t, None, 64)
    del bare.bits, bare.group_size
    model = nn.Sequential(bare)
    with pytest.raises(InvalidProblemError, match="quantization_config"):
        patch(model)
    patch(model, {"bits": 4, "group_size": 64, "desc_act": True, "sym": False})
    assert isinstance(model[0], QuantLinear)


def test_quantize_model_selects_layers_and_skips_the_lm_head() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"q_proj": nn.Linear(128, 128), "up_proj": nn.Linear(128, 256, bias=False),
                           "lm_head": nn.Linear(128, 64)})
    w = model["q_proj"].weight.detach().clone()
    names = quantize_model(model, bits=4, group_size=32, include=r"proj$")
    assert names == ["q_proj", "up_proj"] and isinstance(model["lm_head"], nn.Linear)
    q = model["q_proj"]
    assert isinstance(q, QuantLinear) and q.bias is not None
    # RTN error: within half a quantisation step of every weight.
    deq = reference.dequantize(q.gptq_tensors())
    step = q.scales.float().repeat_interleave(32, dim=0)
    assert bool(((deq - w.t()).abs() <= step / 2 + 1e-6).all())
