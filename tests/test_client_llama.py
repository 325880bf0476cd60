"""A real client: a tiny transformers Llama, GPTQ- or AWQ-quantized, saved, loaded, patched, run.

The quantized model's logits must equal those of the same model whose nn.Linear weights are the
dequantized weights (the oracle), whichever way the checkpoint is loaded: into a plain model
with `load_quantized`, or into AutoGPTQ / AutoAWQ-style modules that `patch` then replaces.
The AWQ checkpoint is made here (the project's RTN quantizer to AWQ's GEMM format) and saved as
AutoAWQ saves one: `model.safetensors` with AWQ-packed qweight/qzeros/scales, and a config.json
whose quantization_config says awq/gemm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import InvalidTensorError, reference
from gemmtune.kernels.awq import AWQTensors, quantize_awq
from gemmtune.kernels.gptq import GPTQTensors
from gemmtune.runtime import QuantLinear, describe, load_quantized, patch, quantize_model
from safetensors.torch import load_file, save_file
from torch import nn

from tests.gpu_util import requires_gpu
from tests.tiny_llama import tiny_llama, tiny_llama_config

transformers = pytest.importorskip("transformers")

QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
      "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(safetensors path, oracle model): a random Llama quantized with the project quantizer
    (act-order, group 32), its state dict saved as a GPTQ checkpoint, and the same model with
    dequantized nn.Linear weights."""
    model = tiny_llama(1)
    names = quantize_model(model, bits=4, group_size=32, act_order=True,
                           generator=torch.Generator().manual_seed(2))
    assert len(names) == 14 and "lm_head" not in names  # q k v o gate up down x 2 layers
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    oracle = tiny_llama(3)
    plain = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(n + ".") for n in names)}
    missing = oracle.load_state_dict(plain, strict=False).missing_keys
    assert sorted(missing) == sorted(f"{n}.weight" for n in names)
    for n in names:
        q: QuantLinear = model.get_submodule(n)
        lin: nn.Linear = oracle.get_submodule(n)
        with torch.no_grad():
            lin.weight.copy_(reference.dequantize(q.gptq_tensors()).t())
    return path, oracle


def _ids(seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed)).to(device)


class AutoGPTQStyleLinear(nn.Module):
    """Stand-in for AutoGPTQ/GPTQModel's QuantLinear: empty GPTQ buffers that load_state_dict
    fills, `bits`/`group_size` attributes, and no usable forward of its own."""

    def __init__(self, k: int, n: int, bits: int, group: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group
        g = k // group
        self.register_buffer("qweight", torch.empty(k * bits // 32, n, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(g, n * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(g, n, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(k, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the foreign GPTQ module ran: patch() missed it")


def _autogptq_model(path: Path) -> Any:
    model = tiny_llama(4)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    AutoGPTQStyleLinear(m.in_features, m.out_features, 4, 32))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def test_load_quantized_logits_match_the_dequantized_model(checkpoint: tuple[Path, Any]) -> None:
    path, oracle = checkpoint
    client = tiny_llama(5)
    report = load_quantized(client, path, QC)
    assert len(report) == 14 and all(isinstance(client.get_submodule(r.name), QuantLinear) for r in report)
    assert {r.problem_key for r in report} == {"128x128-b4-g32-act", "128x64-b4-g32-act",
                                               "128x256-b4-g32-act", "256x128-b4-g32-act"}
    ids = _ids(0)
    with torch.no_grad():
        got, want = client(ids).logits, oracle(ids).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_patched_autogptq_modules_give_the_same_logits(checkpoint: tuple[Path, Any]) -> None:
    path, oracle = checkpoint
    client = _autogptq_model(path)
    report = patch(client, QC)
    assert len(report) == 14 and not any(isinstance(m, AutoGPTQStyleLinear) for m in client.modules())
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(client(ids).logits, oracle(ids).logits, rtol=1e-4, atol=1e-4)
    # The patched layers hold exactly the checkpoint's tensors (state_dict round trip).
    sd = load_file(str(path))
    q = client.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(q.qweight, sd["model.layers.1.mlp.down_proj.qweight"])
    assert isinstance(q.gptq_tensors(), GPTQTensors) and q.gptq_tensors().act_order


@pytest.mark.gpu
@requires_gpu
def test_gpu_fp16_logits_match_the_dequantized_fp16_model(checkpoint: tuple[Path, Any]) -> None:
    path, oracle = checkpoint
    client = tiny_llama(6)
    load_quantized(client, path, QC)
    client.half().cuda()
    ref = tiny_llama(7)
    ref.load_state_dict(oracle.state_dict())
    ref.half().cuda()
    report = describe(client)
    assert len(report) == 14 and all(r.source in ("default", "database", "profile") for r in report)
    ids = _ids(2, "cuda")
    with torch.no_grad():
        got, want = client(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape
    assert reference.relative_error(got, want) < 1e-2
    # Decode-sized steps (M = 1 token) take the fused kernel and agree too.
    with torch.no_grad():
        got1, want1 = client(ids[:, :1]).logits, ref(ids[:, :1]).logits
    assert reference.relative_error(got1, want1) < 1e-2


# -- AWQ ------------------------------------------------------------------------------------------

AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(model.safetensors path, oracle): a random Llama whose 14 linears (not lm_head) are
    quantized to AWQ GEMM, g32, saved with a config.json; the oracle is the same model with
    nn.Linear weights dequantized from the AWQ tensors by the AWQ reference."""
    model = tiny_llama(11)
    oracle = tiny_llama(11)  # same seed: embeddings, norms and lm_head equal the checkpoint's
    state: dict[str, torch.Tensor] = {}
    quantized = []
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and not name.endswith("lm_head"):
            a = quantize_awq(lin.weight.detach().t().float(), group_size=32)
            state |= {f"{name}.qweight": a.qweight, f"{name}.qzeros": a.qzeros, f"{name}.scales": a.scales}
            with torch.no_grad():
                oracle.get_submodule(name).weight.copy_(reference.dequantize_awq(a).t())
            quantized.append(name)
    assert len(quantized) == 14
    state |= {k: v.contiguous() for k, v in model.state_dict().items()
              if not any(k.startswith(n + ".") for n in quantized)}
    folder = tmp_path_factory.mktemp("awq")
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads(tiny_llama_config().to_json_string())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": AWQ_QC}))
    return folder / "model.safetensors", oracle


def test_awq_checkpoint_holds_awq_shapes(awq_checkpoint: tuple[Path, Any]) -> None:
    sd = load_file(str(awq_checkpoint[0]))
    # down_proj: K=256 in, N=128 out -> qweight [K, N/8], qzeros [K/32, N/8], scales [K/32, N].
    assert tuple(sd["model.layers.0.mlp.down_proj.qweight"].shape) == (256, 16)
    assert tuple(sd["model.layers.0.mlp.down_proj.qzeros"].shape) == (8, 16)
    assert tuple(sd["model.layers.0.mlp.down_proj.scales"].shape) == (8, 128)


def test_load_quantized_reads_an_awq_checkpoint_and_its_config(awq_checkpoint: tuple[Path, Any]) -> None:
    path, oracle = awq_checkpoint
    client = transformers.LlamaForCausalLM(
        transformers.LlamaConfig.from_pretrained(str(path.parent))).eval()
    report = load_quantized(client, path)  # quantization_config from the config.json beside it
    assert len(report) == 14 and all(isinstance(client.get_submodule(r.name), QuantLinear) for r in report)
    assert {r.problem_key for r in report} == {"128x128-b4-g32", "128x64-b4-g32", "128x256-b4-g32",
                                               "256x128-b4-g32"}
    ids = _ids(3)
    with torch.no_grad():
        got, want = client(ids).logits, oracle(ids).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class WQLinearGEMMStyle(nn.Module):
    """Stand-in for AutoAWQ's WQLinear_GEMM (`w_bit`) or GPTQModel's AWQ GEMM layer (`bits`),
    which transformers uses for AWQ models: AWQ-shaped buffers that load_state_dict fills, and
    no usable forward of its own."""

    def __init__(self, k: int, n: int, group: int, bits_attr: str) -> None:
        super().__init__()
        setattr(self, bits_attr, 4)
        self.group_size, self.in_features, self.out_features = group, k, n
        self.register_buffer("qweight", torch.empty(k, n // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(k // group, n // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(k // group, n, dtype=torch.float16))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the foreign AWQ module ran: patch() missed it")


def _awq_model(path: Path, bits_attr: str) -> Any:
    model = tiny_llama(13)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    WQLinearGEMMStyle(m.in_features, m.out_features, 32, bits_attr))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


@pytest.mark.parametrize("bits_attr", ["w_bit", "bits"])
@pytest.mark.parametrize("qc", [None, AWQ_QC])
def test_patched_awq_modules_give_the_same_logits(awq_checkpoint: tuple[Path, Any], bits_attr: str,
                                                  qc: dict[str, Any] | None) -> None:
    path, oracle = awq_checkpoint
    client = _awq_model(path, bits_attr)
    report = patch(client, qc)  # found by their tensors: no config needed
    assert len(report) == 14 and not any(isinstance(m, WQLinearGEMMStyle) for m in client.modules())
    assert {r.problem_key for r in report} == {"128x128-b4-g32", "128x64-b4-g32", "128x256-b4-g32",
                                               "256x128-b4-g32"}
    ids = _ids(4)
    with torch.no_grad():
        torch.testing.assert_close(client(ids).logits, oracle(ids).logits, rtol=1e-4, atol=1e-4)
    # Converted, not reinterpreted: the layer's GPTQ view dequantizes to the AWQ file's weights.
    sd = load_file(str(path))
    name = "model.layers.1.mlp.down_proj"
    a = AWQTensors(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], 32)
    q = client.get_submodule(name)
    assert torch.equal(reference.dequantize(q.gptq_tensors()), reference.dequantize_awq(a))


def test_patch_refuses_awq_modules_under_a_gptq_config(awq_checkpoint: tuple[Path, Any]) -> None:
    client = _awq_model(awq_checkpoint[0], "w_bit")
    with pytest.raises(InvalidTensorError, match="model.layers.0.self_attn.q_proj: quantization_config "
                                                 "says quant_method=gptq but the tensors have AWQ's"):
        patch(client, {**QC, "desc_act": False})


@pytest.mark.gpu
@requires_gpu
def test_gpu_awq_fp16_logits_match_the_dequantized_fp16_model(awq_checkpoint: tuple[Path, Any]) -> None:
    path, oracle = awq_checkpoint
    client = tiny_llama(14)
    load_quantized(client, path)
    client.half().cuda()
    ref = tiny_llama(15)
    ref.load_state_dict(oracle.state_dict())
    ref.half().cuda()
    report = describe(client)
    assert len(report) == 14 and all(r.source in ("default", "database", "profile") for r in report)
    ids = _ids(5, "cuda")
    with torch.no_grad():
        got, want = client(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape
    assert reference.relative_error(got, want) < 1e-2
    with torch.no_grad():  # M = 1 per sequence: the fused kernel
        got1, want1 = client(ids[:, :1]).logits, ref(ids[:, :1]).logits
    assert reference.relative_error(got1, want1) < 1e-2


def test_patch_refuses_a_group_size_the_awq_tensors_do_not_have(awq_checkpoint: tuple[Path, Any]) -> None:
    client = _awq_model(awq_checkpoint[0], "bits")
    with pytest.raises(InvalidTensorError, match="says group_size=128 but the tensors have 4 groups of 32"):
        patch(client, {**AWQ_QC, "group_size": 128})
