"""QuantLinear on the GPU: kernel results, nn.Linear parity, CUDA graphs, tuned-config lookup.

Run on the GPU machine: `python -m pytest -q -m gpu tests/test_runtime_gpu.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from gemmtune.kernels import PRESETS, KernelConfig, reference
from gemmtune.runtime import QuantLinear, describe, patch
from torch import nn

from tests.gpu_util import activations, capture, layer, reference_product, requires_gpu

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
    g, static_out = capture(lambda: q(static_in))
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
    assert q.lookup_result is not None and q.device.type == "cuda"
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
    assert q.config == TUNED and [(b.m_lo, b.m_hi, b.config) for b in q.bands] == [
        (1, 8, decode_cfg), (9, None, TUNED)]
    assert f"M 1-8: {decode_cfg.key()}" in repr(q)
    used: list[KernelConfig] = []
    for plan in q._plans:
        real = plan.run_fused
        monkeypatch.setattr(plan, "run_fused", lambda *a, _r=real, _c=plan.config: (used.append(_c), _r(*a))[1])
    for m in (1, 8, 9, 16, 64):
        a = activations(m, 4096, seed=200 + m)
        assert reference.relative_error(q(a), reference_product(a, t)) < reference.fp16_tolerance(4096)
    assert used == [decode_cfg, decode_cfg, TUNED, TUNED]  # M=64 > 24: reconstruct path


# -- a plan over M bands -----------------------------------------------------------------------

# decode's plan: M 1-2 a GEMV-like variant, M 3-8 another that reconstructs above M = 6
DECODE_PLAN = ((2, KernelConfig(max_q_gemm_rows=2, max_q_gemm_rows_kernel=2, block_n=32,
                                threads=128, split_k=8, k_unroll=1)),
               (None, KernelConfig(max_q_gemm_rows=6, max_q_gemm_rows_kernel=8, block_n=64,
                                   threads=64, split_k=0, k_unroll=4)))
# mixed's plan: its first band falls below decode's edge (dropped), then M 9-32, then M >= 33
# fused up to 64 and reconstruct above
MIXED_PLAN = ((4, KernelConfig(max_q_gemm_rows=4, max_q_gemm_rows_kernel=4, block_n=64,
                               threads=128, split_k=4, k_unroll=2)),
              (32, KernelConfig(max_q_gemm_rows=32, max_q_gemm_rows_kernel=16, block_n=128,
                                threads=256, split_k=2, k_unroll=2)),
              (None, KernelConfig(max_q_gemm_rows=64, max_q_gemm_rows_kernel=8, block_n=128,
                                  threads=256, split_k=2, k_unroll=2)))


@pytest.fixture
def banded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_entry) -> tuple[QuantLinear, Any]:
    """A layer whose database holds a decode plan and a mixed plan: four M bands, one of them
    (decode's last, clipped to M 3-8) reconstructing at its top."""
    from gemmtune.db.store import Store
    from gemmtune.kernels.device import query_device

    t = layer(4096, 1024, 4, 128, False, seed=29)
    dev = query_device().to_dict()
    path = tmp_path / "t.db"
    with Store.open(f"sqlite:///{path}") as store:
        store.put_result(make_entry(t.k, t.n, bands=DECODE_PLAN, workload="decode", device=dev))
        store.put_result(make_entry(t.k, t.n, bands=MIXED_PLAN, workload="mixed", device=dev))
    monkeypatch.setenv("GEMMTUNE_DB", str(path))
    q = QuantLinear.from_gptq_tensors(t, torch.randn(1024, dtype=torch.float16)).cuda()
    assert [(b.m_lo, b.m_hi, b.config) for b in q.bands] == [
        (1, 2, DECODE_PLAN[0][1]), (3, 8, DECODE_PLAN[1][1]), (9, 32, MIXED_PLAN[1][1]),
        (33, None, MIXED_PLAN[2][1])]
    (row,) = describe(nn.Sequential(q))  # the patch report names every band
    assert row.source == "database" and row.config_key == "; ".join(
        f"{b.span}: {b.config.key()}" for b in q.bands)
    return q, t


def _edge_ms(q: QuantLinear) -> list[int]:
    """Every band edge and every band's fused/reconstruct threshold, each +- 1."""
    edges = {b.m_hi for b in q.bands if b.m_hi is not None}
    edges |= {b.config.max_q_gemm_rows for b in q.bands}
    return sorted({m for e in edges for m in (e - 1, e, e + 1) if m >= 1})


def _serving(q: QuantLinear, m: int) -> tuple[KernelConfig, str]:
    """The config and path the plan promises at M (the CPU statement of the rule)."""
    band = next(b for b in q.bands if b.covers(m))
    return band.config, "fused" if m <= band.config.max_q_gemm_rows else "recon"


def test_banded_dispatch_matches_the_reference_at_every_band_edge(
        banded: tuple[QuantLinear, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    q, t = banded
    used: list[tuple[KernelConfig, str]] = []
    for plan in set(q._plans):
        for path, name in (("fused", "run_fused"), ("recon", "run_recon")):
            real = getattr(plan, name)
            monkeypatch.setattr(plan, name, lambda *a, _r=real, _c=plan.config, _p=path:
                                (used.append((_c, _p)), _r(*a))[1])
    w_ref = reference.dequantize(t, torch.float32).cuda()
    ms = _edge_ms(q)
    assert {1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65} <= set(ms)
    for m in ms:
        a = activations(m, 4096, seed=300 + m)  # fresh random data per M
        # poison: the output allocation reuses this freed NaN block of the same size, so an
        # element the kernel does not write stays NaN
        torch.full((m, 1024), float("nan"), dtype=torch.float16, device="cuda")
        used.clear()
        y = q(a)
        torch.cuda.synchronize()
        assert used == [_serving(q, m)], m
        assert not torch.isnan(y).any(), f"M={m}: unwritten outputs"
        want = reference_product(a, t, w_ref) + q.bias.float()
        assert reference.relative_error(y, want) < reference.fp16_tolerance(4096), m


def test_banded_dispatch_replays_correctly_under_cuda_graph_capture(
        banded: tuple[QuantLinear, Any]) -> None:
    q, t = banded
    w_ref = reference.dequantize(t, torch.float32).cuda()
    ms = _edge_ms(q)
    graphs = []
    for m in ms:  # one graph per M (static shapes), each captured after a warm-up
        static_in = activations(m, 4096, seed=400 + m)
        g, static_out = capture(lambda x=static_in: q(x))
        graphs.append((m, g, static_in, static_out))
    for seed in (1, 2):
        for m, g, static_in, static_out in graphs:
            a = activations(m, 4096, seed=500 + 10 * seed + m)
            static_in.copy_(a)
            static_out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert not torch.isnan(static_out).any(), f"M={m}: unwritten outputs"
            want = reference_product(a, t, w_ref) + q.bias.float()
            assert reference.relative_error(static_out, want) < reference.fp16_tolerance(4096), m


def test_the_tuners_final_check_measures_a_plan_band_by_band_on_the_gpu() -> None:
    """`CudaEvaluator.interleaved(..., ms=)` measures exactly the band's Ms, and the winner
    rule's final check of a two-band plan gets one measurement per M and side."""
    from gemmtune.autotune.bands import BandPlan
    from gemmtune.autotune.measure import CudaEvaluator
    from gemmtune.autotune.winner import interleaved_check
    from gemmtune.kernels import Problem, Workload

    wl = Workload.parse("1,2,8,32")
    ev = CudaEvaluator(Problem(1024, 512), wl)
    try:
        a, b = ev.interleaved(MIXED_PLAN[0][1], PRESETS["default"], rounds=3, ms=(2, 8))
        assert set(a) == set(b) == {2, 8}
        assert all(x.median_us > 0 for x in (*a.values(), *b.values()))
        plan = BandPlan(((2, MIXED_PLAN[0][1].replace(max_q_gemm_rows=2)),
                         (None, MIXED_PLAN[1][1])))
        v = interleaved_check(ev, plan, PRESETS["default"], wl, rounds=3)
        assert set(v.latencies_us) == set(v.default_latencies_us) == set(wl.ms)
        assert v.objective_us == pytest.approx(wl.objective(v.latencies_us))
    finally:
        ev.close()
