"""A real client: a tiny transformers Llama, GPTQ-quantized, saved, loaded, patched and run.

The quantized model's logits must equal those of the same model whose nn.Linear weights are the
dequantized GPTQ weights (the oracle), whichever way the checkpoint is loaded: into a plain model
with `load_quantized`, or into AutoGPTQ-style modules that `patch` then replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.gptq import GPTQTensors
from gemmtune.runtime import QuantLinear, describe, load_quantized, patch, quantize_model
from safetensors.torch import load_file, save_file
from torch import nn

from tests.gpu_util import requires_gpu

transformers = pytest.importorskip("transformers")

QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
      "checkpoint_format": "gptq"}


def _config() -> Any:
    return transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
        tie_word_embeddings=False)


def _fresh(seed: int) -> Any:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(safetensors path, oracle model): a random Llama quantized with the project quantizer
    (act-order, group 32), its state dict saved as a GPTQ checkpoint, and the same model with
    dequantized nn.Linear weights."""
    model = _fresh(1)
    names = quantize_model(model, bits=4, group_size=32, act_order=True,
                           generator=torch.Generator().manual_seed(2))
    assert len(names) == 14 and "lm_head" not in names  # q k v o gate up down x 2 layers
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    oracle = _fresh(3)
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
    model = _fresh(4)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    AutoGPTQStyleLinear(m.in_features, m.out_features, 4, 32))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def test_load_quantized_logits_match_the_dequantized_model(checkpoint: tuple[Path, Any]) -> None:
    path, oracle = checkpoint
    client = _fresh(5)
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
    client = _fresh(6)
    load_quantized(client, path, QC)
    client.half().cuda()
    ref = _fresh(7)
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
