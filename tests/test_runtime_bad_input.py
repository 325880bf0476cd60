"""Bad arguments to the runtime raise a typed error with one clear line, before the model is
touched: a typo'd preset or workload, a checkpoint path that is missing, a folder or not
safetensors, a CUDA device on a machine without CUDA. CPU only (CUDA is hidden where present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gemmtune.kernels import (
    CudaUnavailableError,
    GemmtuneError,
    InvalidConfigError,
    InvalidProblemError,
    InvalidTensorError,
    KernelConfig,
)
from gemmtune.kernels.gptq import GPTQTensors, random_gptq
from gemmtune.kernels.workload import WORKLOADS
from gemmtune.runtime import QuantLinear, load_quantized, patch, quantize_model
from safetensors.torch import save_file
from torch import nn

QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
      "checkpoint_format": "gptq"}

Snapshot = tuple[list[tuple[str, type]], dict[str, torch.Tensor]]


def _snapshot(model: nn.Module) -> Snapshot:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    modules, state = _snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    for k, v in state.items():
        assert v.device == before[1][k].device and torch.equal(v, before[1][k]), k


def _check(exc: pytest.ExceptionInfo[GemmtuneError], *phrases: str) -> None:
    """The error's message is one line holding every phrase."""
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for p in phrases:
        assert p in msg, (p, msg)


# -- models ----------------------------------------------------------------------------------------


class Net(nn.Module):
    """Two linears and an embedding: enough for a checkpoint with quantized and plain tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


class ForeignGPTQLinear(nn.Module):
    """Shaped like AutoGPTQ's QuantLinear: what `patch` replaces."""

    def __init__(self, t: GPTQTensors) -> None:
        super().__init__()
        self.bits, self.group_size = t.bits, t.group_size
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, getattr(t, name).clone())


def _foreign_model() -> nn.Module:
    t = random_gptq(64, 32, 4, 32, False, generator=torch.Generator().manual_seed(1))
    return nn.Sequential(ForeignGPTQLinear(t), nn.ReLU())


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A quantized Net's safetensors file, with its config.json beside it."""
    src = _net(1)
    quantize_model(src, bits=4, group_size=32, generator=torch.Generator().manual_seed(2))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    (folder / "config.json").write_text(json.dumps({"quantization_config": QC}))
    return path


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where there is a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- config and workload ---------------------------------------------------------------------------


@pytest.mark.parametrize("config,phrases", [
    ("nope", ["'nope' is not a preset", "exllamav2-0.0.12", "default"]),
    ("exllamav2-0.0.13", ["'exllamav2-0.0.13' is not a preset", "exllamav2-0.0.11"]),
    (123, ["got int 123", "a KernelConfig", "exllamav2-0.0.12"]),
    ({"block_n": 64}, ["config dict", "missing config field"]),
])
def test_quant_linear_refuses_a_bad_config_when_built(config: object, phrases: list[str]) -> None:
    with pytest.raises(InvalidConfigError) as exc:
        QuantLinear(128, 128, 4, 32, config=config)  # type: ignore[arg-type]
    _check(exc, *phrases)


@pytest.mark.parametrize("workload,phrases", [
    ("foo", ["'foo'", *WORKLOADS]),
    ("decod", ["'decod'", "decode"]),
    ("0,1", ["workload='0,1'", "1..65536"]),
    (5, ["got int 5", "decode"]),
])
def test_quant_linear_refuses_a_bad_workload_when_built(workload: object, phrases: list[str]) -> None:
    with pytest.raises(InvalidProblemError) as exc:
        QuantLinear(128, 128, 4, 32, workload=workload)  # type: ignore[arg-type]
    _check(exc, *phrases)


@pytest.mark.parametrize("config", [None, "default", "exllamav2-0.0.12", KernelConfig(),
                                    KernelConfig().to_dict()])
@pytest.mark.parametrize("workload", [None, "decode", " mixed ", "1,2,4", "1:4,512:1", WORKLOADS["prefill"]])
def test_valid_configs_and_workloads_are_kept_as_given(config: object, workload: object) -> None:
    q = QuantLinear(128, 128, 4, 32, config=config, workload=workload)  # type: ignore[arg-type]
    assert q.requested_config is config and q.workload is workload


def test_patch_refuses_a_typod_preset_or_workload_and_leaves_the_model_alone() -> None:
    model = _foreign_model()
    before = _snapshot(model)
    with pytest.raises(InvalidConfigError) as exc:
        patch(model, config="exllamav2-0.0.13")
    _check(exc, "'exllamav2-0.0.13' is not a preset", "exllamav2-0.0.12")
    assert_unchanged(model, before)
    with pytest.raises(InvalidProblemError) as pexc:
        patch(model, workload="foo")
    _check(pexc, "'foo'", "decode")
    assert_unchanged(model, before)
    # Also with nothing to patch: the argument is wrong whatever the model holds.
    with pytest.raises(InvalidConfigError):
        patch(nn.Sequential(nn.Linear(4, 4)), config="nope")
    patch(model, config="exllamav2-0.0.12", workload="decode")  # the valid spelling still works
    assert isinstance(model[0], QuantLinear) and model[0].requested_config == "exllamav2-0.0.12"


def test_quantize_model_refuses_a_bad_config_or_workload_and_leaves_the_model_alone() -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(InvalidConfigError) as exc:
        quantize_model(model, group_size=32, config="nope")
    _check(exc, "'nope' is not a preset")
    with pytest.raises(InvalidProblemError) as pexc:
        quantize_model(model, group_size=32, workload="foo")
    _check(pexc, "'foo'")
    assert_unchanged(model, before)


# -- load_quantized: the checkpoint path ---------------------------------------------------------


def test_load_quantized_names_a_missing_checkpoint(tmp_path: Path) -> None:
    model = _net()
    before = _snapshot(model)
    for qc in (None, QC):  # without a quantization_config it must not blame config.json
        with pytest.raises(InvalidTensorError) as exc:
            load_quantized(model, tmp_path / "nope.safetensors", qc)
        _check(exc, "nope.safetensors does not exist")
    assert_unchanged(model, before)


def test_load_quantized_refuses_an_ambiguous_or_empty_folder(tmp_path: Path, checkpoint: Path) -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(InvalidTensorError) as exc:
        load_quantized(model, tmp_path, QC)
    _check(exc, "is a folder holding no .safetensors file", "give the .safetensors file, not the folder")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (1, 2):
        (shards / f"model-0000{i}-of-00002.safetensors").write_bytes(checkpoint.read_bytes())
    with pytest.raises(InvalidTensorError) as exc:
        load_quantized(model, shards, QC)
    _check(exc, "2 .safetensors files", "model-00001-of-00002.safetensors",
           "give the .safetensors file, not the folder")
    assert_unchanged(model, before)


def test_load_quantized_takes_a_folder_holding_one_checkpoint(checkpoint: Path) -> None:
    by_file, by_folder = _net(), _net()
    load_quantized(by_file, checkpoint)
    report = load_quantized(by_folder, checkpoint.parent)  # config.json read beside the file
    assert len(report) == 2 and isinstance(by_folder.up, QuantLinear)
    x = torch.randint(0, 16, (3,))
    torch.testing.assert_close(by_folder.down(by_folder.up(by_folder.emb(x))),
                               by_file.down(by_file.up(by_file.emb(x))), rtol=0, atol=0)
    # One *.safetensors under another name is as unambiguous.
    checkpoint.rename(checkpoint.parent / "weights.safetensors")
    assert len(load_quantized(_net(), checkpoint.parent)) == 2


@pytest.mark.parametrize("content", [b"", b"hello world, not safetensors " * 10,
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"])
def test_load_quantized_refuses_a_file_that_is_not_safetensors(tmp_path: Path, checkpoint: Path,
                                                                content: bytes) -> None:
    bad = checkpoint.parent / "model.bin"
    bad.write_bytes(content)
    model = _net()
    before = _snapshot(model)
    for qc in (None, QC):
        with pytest.raises(InvalidTensorError) as exc:
            load_quantized(model, bad, qc)
        _check(exc, "model.bin is not a safetensors file")
    truncated = checkpoint.parent / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(InvalidTensorError) as exc:
        load_quantized(model, truncated)
    _check(exc, "truncated.safetensors is not a safetensors file")
    assert_unchanged(model, before)


def test_load_quantized_refuses_a_bad_config_or_workload_before_loading(checkpoint: Path) -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(InvalidConfigError) as exc:
        load_quantized(model, checkpoint, config="exllamav2-0.0.13")
    _check(exc, "'exllamav2-0.0.13' is not a preset")
    with pytest.raises(InvalidProblemError) as pexc:
        load_quantized(model, checkpoint, workload="foo")
    _check(pexc, "'foo'")
    assert_unchanged(model, before)


def test_from_safetensors_names_a_bad_path(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(InvalidTensorError) as exc:
        QuantLinear.from_safetensors(tmp_path / "nope.safetensors", "up", QC)
    _check(exc, "does not exist")
    (tmp_path / "x.txt").write_text("not a checkpoint")
    with pytest.raises(InvalidTensorError) as exc:
        QuantLinear.from_safetensors(tmp_path / "x.txt", "up", QC)
    _check(exc, "x.txt is not a safetensors file")
    with pytest.raises(InvalidConfigError):
        QuantLinear.from_safetensors(checkpoint, "up", QC, config="nope")
    assert QuantLinear.from_safetensors(checkpoint.parent, "up", QC).out_features == 128


# -- devices ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda")])
def test_a_cuda_device_without_cuda_is_refused_before_anything_moves(checkpoint: Path,
                                                                     device: object) -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(CudaUnavailableError) as exc:
        load_quantized(model, checkpoint, device=device)  # type: ignore[arg-type]
    _check(exc, "no CUDA GPU is visible")
    assert_unchanged(model, before)
    foreign = _foreign_model()
    fbefore = _snapshot(foreign)
    with pytest.raises(CudaUnavailableError) as exc:
        patch(foreign, device=device)  # type: ignore[arg-type]
    _check(exc, "no CUDA GPU is visible")
    assert_unchanged(foreign, fbefore)
    q = QuantLinear(64, 32, 4, 32)
    with pytest.raises(CudaUnavailableError):
        q.prepare(device)  # type: ignore[arg-type]
    assert q.device.type == "cpu"
    with pytest.raises(CudaUnavailableError):
        QuantLinear.from_safetensors(checkpoint, "up", QC, device=device)  # type: ignore[arg-type]


def test_a_gpu_that_does_not_exist_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = _foreign_model()
    before = _snapshot(model)
    with pytest.raises(CudaUnavailableError) as exc:
        patch(model, device="cuda:3")
    _check(exc, "GPU 3 does not exist (1 visible)")
    assert_unchanged(model, before)


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", 1.5])
def test_a_device_that_is_not_one_is_named(checkpoint: Path, device: object) -> None:
    model = _net()
    before = _snapshot(model)
    with pytest.raises(InvalidTensorError) as exc:
        load_quantized(model, checkpoint, device=device)  # type: ignore[arg-type]
    _check(exc, f"device={device!r} is not a device")
    assert_unchanged(model, before)
