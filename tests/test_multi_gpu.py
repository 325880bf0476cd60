"""Several GPUs in one process: layers on cuda:1 while torch's current device is 0.

The GPU tests need two visible GPUs and skip with the reason otherwise
(`python -m pytest -q -m gpu tests/test_multi_gpu.py` on a 2-GPU machine). The CPU test is the
one-GPU stand-in: it checks the rule that makes them pass — a dispatch plan launches with its
weight's card current, whatever torch's current device is.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from gemmtune.kernels import reference
from gemmtune.kernels.dispatch import Plan
from gemmtune.runtime import QuantLinear

from tests.gpu_util import activations, capture, cuda_ok, layer, reference_product

two_gpus = pytest.mark.skipif(
    not cuda_ok() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (a model split across cards); run on a multi-GPU machine")


def test_a_plan_launches_with_its_cards_context_current(monkeypatch: pytest.MonkeyPatch) -> None:
    current = {"device": 0}
    switched: list[int] = []

    @contextlib.contextmanager
    def device(index: int):
        switched.append(index)
        before, current["device"] = current["device"], index
        try:
            yield
        finally:
            current["device"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "device", device)
    plan = Plan.__new__(Plan)  # the device rule only; no GPU here
    plan.device_index = 1
    seen: list[int] = []
    plan._call = lambda a, out: seen.append(current["device"]) or a  # type: ignore[method-assign]
    plan(torch.zeros(1))
    assert seen == [1] and switched == [1] and current["device"] == 0
    current["device"] = 1  # already current: no switch
    plan(torch.zeros(1))
    assert seen == [1, 1] and switched == [1]


@pytest.mark.gpu
@two_gpus
@pytest.mark.usefixtures("fresh_runtime")
@pytest.mark.parametrize("current", [0, 1])
def test_a_model_split_across_two_cards_matches_the_reference(current: int) -> None:
    t0 = layer(4096, 2048, 4, 128, False, seed=1)
    t1 = layer(2048, 1024, 4, 128, True, seed=2)
    first = QuantLinear.from_gptq_tensors(t0).to("cuda:0")
    second = QuantLinear.from_gptq_tensors(t1).to("cuda:1")
    assert first._qw.device == torch.device("cuda", 0)
    assert second._qw.device == torch.device("cuda", 1)
    torch.cuda.set_device(current)
    try:
        for m in (1, 8, 100):
            a = activations(m, 4096, seed=10 + m, device="cuda:0")
            h = first(a)
            h1 = torch.full((m, 2048), float("nan"), dtype=torch.float16, device="cuda:1")
            h1.copy_(h)
            y = second(h1)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            assert y.device == torch.device("cuda", 1)
            assert reference.relative_error(h.float(), reference_product(a, t0)) < \
                reference.fp16_tolerance(4096)
            assert reference.relative_error(y.float(), reference_product(h1, t1)) < \
                reference.fp16_tolerance(2048)
    finally:
        torch.cuda.set_device(0)


@pytest.mark.gpu
@two_gpus
@pytest.mark.usefixtures("fresh_runtime")
def test_cuda_graph_capture_on_the_second_card() -> None:
    t = layer(4096, 2048, 4, 128, False, seed=3)
    q = QuantLinear.from_gptq_tensors(t).to("cuda:1")
    torch.cuda.set_device(0)
    static_in = activations(4, 4096, seed=1, device="cuda:1")
    with torch.cuda.device(1):
        g, static_out = capture(lambda: q(static_in))
    for seed in (2, 3):
        a = activations(4, 4096, seed=seed, device="cuda:1")
        static_in.copy_(a)
        g.replay()
        torch.cuda.synchronize(1)
        assert reference.relative_error(static_out.float(), reference_product(a, t)) < \
            reference.fp16_tolerance(4096)


@pytest.mark.gpu
@two_gpus
@pytest.mark.usefixtures("fresh_runtime")
def test_each_card_is_looked_up_by_its_own_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    import gemmtune.runtime.quant_linear as ql

    asked: list[int] = []
    real = ql.device_info

    def record(index: int):
        asked.append(index)
        return real(index)

    monkeypatch.setattr(ql, "device_info", record)
    torch.cuda.set_device(0)
    QuantLinear.from_gptq_tensors(layer(1024, 512, 4, 128, False, seed=4)).to("cuda:1")
    QuantLinear.from_gptq_tensors(layer(1024, 512, 4, 128, False, seed=5)).to("cuda:0")
    assert asked == [1, 0]
