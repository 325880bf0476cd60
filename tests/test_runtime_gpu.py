"""QuantLinear on the GPU: kernel results, nn.Linear parity, CUDA graphs, tuned-config lookup.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_runtime_gpu.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from gemmtune.kernels import PRESETS, KernelConfig, reference
from gemmtune.runtime import QuantLinear, describe, patch
from torch import nn

from tests.gpu_util import activations, layer, reference_product, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu, pytest.mark.usefixtures("fresh_runtime")]

TUNED = KernelConfig(max_q_gemm_rows=24, max_q_gemm_rows_kernel=8, block_n=128, threads=256,
                     split_k=2, k_unroll=2)




@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("m", [1, 4, 16, 100])
def test_forward_matches_the_reference(m: int, act: bool) -> None:
    t = layer(4096, 1024, 4, 128, act, seed=m)
    bias = torch.randn(1024, dtype=torch.float16)
    q = QuantLinear.from_gptq_tensors(t, bias, config="exllamav2-0.0.12").cuda()
    assert q.lookup_result is not None and q.config == PRESETS["exllamav2-0.0.12"]
    a = activations(m, 4096, seed=100 + m)
    y = q(a.view(1, m, 4096))
    assert y.shape == (1, m, 1024) and y.dtype == torch.float16
    want = reference_product(a, t) + bias.cuda().float()
    assert reference.relative_error(y.view(m, 1024), want) < reference.fp16_tolerance(4096)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_shape_and_dtype_are_those_of_nn_linear(dtype: torch.dtype) -> None:
    t = layer(1024, 512, 4, 64, False, seed=7)
    q = QuantLinear.from_gptq_tensors(t, torch.randn(512, dtype=torch.float16)).cuda()
    lin = nn.Linear(1024, 512, device="cuda", dtype=dtype)
    x = torch.randn(2, 3, 1024, device="cuda", dtype=dtype)
    y = q(x)
    assert (y.shape, y.dtype, y.device) == (lin(x).shape, lin(x).dtype, lin(x).device)
    want = reference_product(x.to(torch.float16), t) + q.bias.float()
    assert reference.relative_error(y.view(6, 512), want) < 2e-2


def test_cuda_graph_capture_replays_correctly() -> None:
    t = layer(4096, 2048, 4, 128, True, seed=11)
    q = QuantLinear.from_gptq_tensors(t, torch.randn(2048, dtype=torch.float16)).cuda()
    static_in = activations(4, 4096, seed=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(static_in)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = q(static_in)
    for seed in (2, 3):
        a = activations(4, 4096, seed=seed)
        static_in.copy_(a)
        g.replay()
        torch.cuda.synchronize()
        want = reference_product(a, t) + q.bias.float()
        assert reference.relative_error(static_out, want) < reference.fp16_tolerance(4096)


def test_moving_between_devices_prepares_and_invalidates() -> None:
    t = layer(1024, 256, 4, 128, False, seed=13)
    q = QuantLinear.from_gptq_tensors(t)
    x = torch.randn(5, 1024)
    cpu_out = q(x)
    q.cuda()
    assert q.lookup_result is not None and q.qweight.is_cuda
    gpu_out = q(x.cuda().half())
    assert reference.relative_error(gpu_out, cpu_out) < 1e-2
    q.cpu()
    assert q.lookup_result is None
    torch.testing.assert_close(q(x), cpu_out, rtol=0, atol=0)


def test_lookup_from_a_profile_picks_the_tuned_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sqlalchemy")
    from gemmtune.db.profiles import Profile, ProfileEntry
    from gemmtune.kernels.device import query_device
    from gemmtune.kernels.sources import kernel_hash

    t = layer(4096, 1024, 4, 128, False, seed=17)
    p = t.problem
    lat = {1: 5.0, 2: 5.5}
    entry = ProfileEntry(
        problem={"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size, "act_order": p.act_order},
        problem_key=p.key(), workload={"name": "custom", "ms": [1, 2], "weights": [1.0, 1.0]},
        workload_key="1:1,2:1", config=TUNED.to_dict(), config_key=TUNED.key(),
        objective_us=sum(lat.values()), default_objective_us=sum(v * 1.1 for v in lat.values()),
        latencies_us=lat, default_latencies_us={m: v * 1.1 for m, v in lat.items()},
        provenance="test", created_at=datetime.now(UTC))
    prof = Profile(device=query_device().to_dict(), kernel_hash=kernel_hash(), entries=[entry])
    path = tmp_path / "p.json"
    path.write_text(prof.dumps())
    monkeypatch.setenv("GEMMTUNE_PROFILE", str(path))
    model = nn.Sequential(QuantLinear.from_gptq_tensors(t)).cuda()
    q = model[0]
    assert q.config == TUNED and q.config_source == "profile"
    assert f"config={TUNED.key()} (source: profile)" in repr(q)
    assert [r.source for r in describe(model)] == ["profile"]
    a = activations(16, 4096, seed=5)  # fused (16 <= max_q_gemm_rows=24); M=100 reconstructs
    assert reference.relative_error(q(a), reference_product(a, t)) < reference.fp16_tolerance(4096)
    b = activations(100, 4096, seed=6)
    assert reference.relative_error(q(b), reference_product(b, t)) < reference.fp16_tolerance(4096)


def test_patch_on_cuda_resolves_configs_now() -> None:
    t = layer(1024, 512, 4, 128, False, seed=19)

    class Foreign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bits, self.group_size = 4, 128
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                self.register_buffer(name, getattr(t, name).clone())

    model = nn.Sequential(Foreign()).cuda()
    report = patch(model)
    assert [r.source for r in report] == ["default"] and report.layers[0].config_key == PRESETS["default"].key()
    a = activations(3, 1024, seed=9)
    assert reference.relative_error(model(a), reference_product(a, t)) < reference.fp16_tolerance(1024)


def test_decode_sized_calls_use_the_decode_tuned_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        make_entry) -> None:
    """A database with a `decode` and a `mixed` entry: M <= 8 runs the decode config's kernel,
    larger M the mixed one, and both give the right product (also inside one CUDA graph)."""
    from gemmtune.db.store import Store
    from gemmtune.kernels.device import query_device

    decode_cfg = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8, block_n=128, threads=128,
                              split_k=4, k_unroll=4)
    t = layer(4096, 1024, 4, 128, False, seed=23)
    p = t.problem
    dev = query_device().to_dict()
    path = tmp_path / "t.db"
    with Store.open(f"sqlite:///{path}") as store:
        store.put_result(make_entry(p.k, p.n, config=TUNED, workload="mixed", device=dev))
        store.put_result(make_entry(p.k, p.n, config=decode_cfg, workload="decode", device=dev))
    monkeypatch.setenv("GEMMTUNE_DB", str(path))
    q = QuantLinear.from_gptq_tensors(t).cuda()
    assert q.config == TUNED and q.small_lookup_result is not None
    assert q.small_lookup_result.config == decode_cfg
    assert f"M<=8: {decode_cfg.key()}" in repr(q)
    used: list[KernelConfig] = []
    for plan in (q._plan, q._small_plan):
        real = plan.run_fused
        monkeypatch.setattr(plan, "run_fused", lambda *a, _r=real, _c=plan.config: (used.append(_c), _r(*a))[1])
    for m in (1, 8, 9, 16, 64):
        a = activations(m, 4096, seed=200 + m)
        assert reference.relative_error(q(a), reference_product(a, t)) < reference.fp16_tolerance(4096)
    assert used == [decode_cfg, decode_cfg, TUNED, TUNED]  # M=64 > 24: reconstruct path
