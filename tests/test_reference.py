"""The CPU reference: dequantize, the float64 GEMM oracle, the fp16 model and its tolerance."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from gemmtune.kernels import InvalidTensorError
from gemmtune.kernels.gptq import (
    GPTQTensors,
    pack_cols,
    quantize,
    random_gptq,
    unpack_cols,
    unpack_rows,
    zeros,
)
from gemmtune.kernels.reference import (
    dequantize,
    fp16_tolerance,
    fp32_accum_tolerance,
    gemm,
    gemm_fp16_like,
    relative_error,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dequant_by_definition(t: GPTQTensors) -> torch.Tensor:
    """W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n], element-wise in float64."""
    q = unpack_rows(t.qweight, t.bits, t.k).double()
    g = t.g_idx.long() if t.g_idx is not None else t.trivial_g_idx().long()
    z = zeros(t).double()[g]
    s = t.scales.double()[g]
    return (q - z) * s


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order", "zero_format"),
    [(4, 128, False, "v1"), (4, 32, True, "v2"), (8, 64, True, "v1"), (3, -1, False, "v2"),
     (2, 128, True, "v1")],
)
def test_dequantize_matches_the_definition(
    bits: int, group_size: int, act_order: bool, zero_format: str
) -> None:
    t = random_gptq(256, 96 if bits != 3 else 64, bits, group_size, act_order, zero_format,
                    generator=gen(bits + group_size))
    ref = dequant_by_definition(t)
    assert torch.equal(dequantize(t, torch.float64), ref)
    assert torch.equal(dequantize(t), ref.float())  # float32 is exact for these products
    assert torch.equal(dequantize(t, torch.float16), ref.half())  # correctly rounded


def test_dequantize_without_g_idx_equals_trivial_g_idx() -> None:
    t = random_gptq(256, 64, 4, 64, act_order=False, generator=gen(1))
    assert torch.equal(dequantize(replace(t, g_idx=None)), dequantize(t))


def test_act_order_dequantize_equals_grouped_quantization_permuted_back() -> None:
    k, n, gs = 512, 64, 64
    w = torch.randn(k, n, generator=gen(2)) * 0.02
    act = quantize(w, 4, gs, act_order=True, generator=gen(3))
    assert act.act_order
    # Rows sorted by group form the same groups contiguously: quantize them without act-order.
    order = torch.sort(act.g_idx.long(), stable=True).indices
    plain = quantize(w[order], 4, gs, act_order=False)
    assert torch.equal(dequantize(act)[order], dequantize(plain))
    # And ignoring g_idx (a kernel bug) would give a different weight.
    assert not torch.equal(dequantize(replace(act, g_idx=None)), dequantize(act))


def test_gemm_is_a_float64_matmul_of_the_float64_dequantized_weight() -> None:
    t = random_gptq(384, 128, 4, 128, act_order=True, generator=gen(4))
    a = torch.randn(5, 384, generator=gen(5)).half()
    out = gemm(a, t)
    assert out.dtype == torch.float64 and tuple(out.shape) == (5, 128)
    expected = a.double() @ dequant_by_definition(t)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert gemm(a, t, torch.float32).dtype == torch.float32


def test_gemm_fp16_like_is_fp16_and_within_the_fp32_accumulation_tolerance() -> None:
    t = random_gptq(1024, 128, 4, 128, act_order=True, generator=gen(6))
    a = torch.randn(4, 1024, generator=gen(7)).half()
    out = gemm_fp16_like(a, t)
    assert out.dtype == torch.float16
    err = relative_error(out, gemm(a, t))
    assert 0 < err <= fp32_accum_tolerance(1024)


def sequential_fp16_gemm(a: torch.Tensor, w16: torch.Tensor) -> torch.Tensor:
    """Worst realistic engine: every product and every partial sum rounded to fp16, in K order."""
    acc = torch.zeros(a.shape[0], w16.shape[1], dtype=torch.float16)
    for j in range(a.shape[1]):
        acc = acc + a[:, j : j + 1] * w16[j : j + 1, :]
    return acc


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_tolerance_accepts_fp16_accumulation_and_rejects_format_bugs(bits: int) -> None:
    k = 1024
    t = random_gptq(k, 64, bits, 128, act_order=True, generator=gen(8))
    a = torch.randn(4, k, generator=gen(9)).half()
    ref = gemm(a, t)
    tol = fp16_tolerance(k)
    assert relative_error(sequential_fp16_gemm(a, dequantize(t, torch.float16)), ref) <= tol
    # Typical kernel bugs land far outside: dropping act-order, swapping row order in a word.
    assert relative_error(gemm(a, replace(t, g_idx=None)), ref) > 5 * tol
    swapped = replace(t, qweight=t.qweight.view(-1, 2, 64).flip(1).reshape(-1, 64).contiguous())
    assert relative_error(gemm(a, swapped), ref) > 5 * tol
    if bits == 4:  # reading v1 zeros as v2 (off by one) is caught at 4 bits
        assert relative_error(gemm(a, replace(t, zero_format="v2")), ref) > tol
    # At 8 bits an off-by-one zero needs the fp32-accumulation tolerance.
    stored = unpack_cols(t.qzeros, bits, 64)
    off = replace(t, qzeros=pack_cols(stored - (stored > 0).int(), bits))
    assert relative_error(gemm(a, off), ref) > fp32_accum_tolerance(k)


def test_tolerances_grow_with_k_and_reject_nonsense() -> None:
    values = [fp16_tolerance(k) for k in (32, 1024, 4096, 28672)]
    assert values == sorted(values) and values[0] > 2 * 2.0**-11 and values[-1] < 0.1
    assert fp32_accum_tolerance(4096) < fp16_tolerance(32)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InvalidTensorError):
            fp16_tolerance(bad)  # type: ignore[arg-type]


def test_relative_error() -> None:
    ref = torch.randn(3, 7, generator=gen(10), dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(2 * ref, ref) == pytest.approx(1.0)
    assert relative_error(ref.half(), ref) < 1e-3
    nan = ref.clone()
    nan[1, 1] = float("nan")
    assert relative_error(nan, ref) == math.inf
    inf = ref.clone()
    inf[0, 0] = float("inf")
    assert relative_error(inf, ref) == math.inf
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == math.inf
    with pytest.raises(InvalidTensorError, match="shape"):
        relative_error(ref[:2], ref)


def test_gemm_rejects_bad_activations() -> None:
    t = random_gptq(128, 64, 4, 64, generator=gen(11))
    with pytest.raises(InvalidTensorError, match="K=128"):
        gemm(torch.randn(2, 64), t)
    with pytest.raises(InvalidTensorError, match="floating"):
        gemm(torch.ones(2, 128, dtype=torch.int32), t)
    with pytest.raises(InvalidTensorError, match="CPU"):
        gemm(torch.randn(2, 128, device="meta"), t)
    with pytest.raises(InvalidTensorError, match="CPU"):
        dequantize(t.to("meta"))
