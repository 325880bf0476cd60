"""The GPTQ format: bit positions, zero conventions, quantizer, random layers, validation.

Bit positions are checked against the layout written out with Python integers (the contract the
CUDA kernels and real checkpoints rely on), not against the packing code itself.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from gemmtune.kernels import InvalidProblemError, InvalidTensorError, Problem
from gemmtune.kernels.gptq import (
    GPTQTensors,
    act_order_g_idx,
    pack_cols,
    pack_rows,
    quantize,
    random_gptq,
    to_v1,
    to_v2,
    unpack_cols,
    unpack_rows,
    zeros,
)
from gemmtune.kernels.reference import dequantize

ALL_BITS = (2, 3, 4, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def field(words: list[int], bits: int, i: int) -> int:
    """Value i of a packed block: bits bits*i.. of the little-endian concatenation of words."""
    stream = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(words))
    return (stream >> (bits * i)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_rows_round_trip_and_bit_positions(bits: int) -> None:
    k, n = 128, 40
    q = torch.randint(0, 1 << bits, (k, n), generator=gen(bits))
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (k * bits // 32, n)
    assert torch.equal(unpack_rows(packed, bits, k), q.to(torch.int32))
    rows = packed.tolist()
    for kk, nn in [(0, 0), (1, 3), (10, 5), (11, 7), (21, 9), (31, 39), (77, 21), (127, 1)]:
        block = kk // 32
        words = [rows[block * bits + j][nn] for j in range(bits)]
        assert field(words, bits, kk % 32) == int(q[kk, nn]), (kk, nn)
        if bits in (2, 4, 8):  # the per-word spelling of the same layout
            per = 32 // bits
            word = rows[kk // per][nn]
            assert (word >> ((kk % per) * bits)) & ((1 << bits) - 1) == int(q[kk, nn])


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_cols_round_trip_and_bit_positions(bits: int) -> None:
    g, n = 5, 64
    z = torch.randint(0, 1 << bits, (g, n), generator=gen(10 + bits))
    packed = pack_cols(z, bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (g, n * bits // 32)
    assert torch.equal(unpack_cols(packed, bits, n), z.to(torch.int32))
    rows = packed.tolist()
    for gg, nn in [(0, 0), (1, 10), (2, 21), (3, 33), (4, 63)]:
        block = nn // 32
        words = [rows[gg][block * bits + j] for j in range(bits)]
        assert field(words, bits, nn % 32) == int(z[gg, nn]), (gg, nn)


def test_pack_rejects_values_outside_bit_range() -> None:
    q = torch.randint(0, 16, (32, 8), generator=gen(1))
    q[3, 2] = 16
    with pytest.raises(InvalidTensorError, match="0..15"):
        pack_rows(q, 4)
    with pytest.raises(InvalidTensorError, match="0..15"):
        pack_cols(-q[:2], 4)
    with pytest.raises(InvalidProblemError, match="bits"):
        pack_rows(q, 5)
    with pytest.raises(InvalidTensorError, match="multiple of 32"):
        pack_rows(q[:16] % 16, 4)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_v1_v2_conversion_keeps_real_zeros(bits: int) -> None:
    t1 = random_gptq(64, 64, bits, 32, zero_format="v1", generator=gen(bits))
    t2 = to_v2(t1)
    assert t2.zero_format == "v2"
    assert torch.equal(zeros(t2), zeros(t1))
    # stored values differ by exactly one between the conventions
    assert torch.equal(unpack_cols(t1.qzeros, bits, 64) + 1, unpack_cols(t2.qzeros, bits, 64))
    assert torch.equal(to_v1(t2).qzeros, t1.qzeros)
    assert torch.equal(dequantize(t1), dequantize(t2))


def test_v1_zero_is_read_without_masking_and_conversions_refuse_lossy_values() -> None:
    t = random_gptq(64, 32, 4, 32, zero_format="v1", generator=gen(3))
    stored = unpack_cols(t.qzeros, 4, 32)
    stored[0, 5] = 15  # real zero 16, as engines read it
    t16 = replace(t, qzeros=pack_cols(stored, 4))
    assert int(zeros(t16)[0, 5]) == 16
    with pytest.raises(InvalidTensorError, match="v2"):
        to_v2(t16)
    t2 = random_gptq(64, 32, 4, 32, zero_format="v2", generator=gen(4))
    z = unpack_cols(t2.qzeros, 4, 32)
    z[1, 1] = 0
    with pytest.raises(InvalidTensorError, match="v1"):
        to_v1(replace(t2, qzeros=pack_cols(z, 4)))


def weight_with_edge_groups(k: int, n: int, seed: int) -> torch.Tensor:
    w = torch.randn(k, n, generator=gen(seed)) * 0.05
    w[:, 0] = w[:, 0].abs()  # all-positive column: v1 must widen instead of clamping the zero
    w[:, 1] = -w[:, 1].abs()  # all-negative column
    w[:, 2] = 0.0  # flat column
    w[:32, 3] = 1e-9  # tiny values underflowing fp16 scales
    return w


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "zero_format", "act_order"),
    [
        (4, 128, False, "v1", False),
        (4, 32, False, "v2", True),
        (4, 64, True, "v1", False),
        (8, -1, False, "v1", False),
        (8, 128, True, "v2", True),
        (2, 32, False, "v1", True),
        (3, 64, False, "v1", False),
        (3, 128, False, "v2", True),
    ],
)
def test_quantizer_error_is_within_half_a_step(
    bits: int, group_size: int, sym: bool, zero_format: str, act_order: bool
) -> None:
    k, n = 256, 64
    w = weight_with_edge_groups(k, n, seed=bits * 7 + group_size)
    t = quantize(w, bits, group_size, act_order=act_order, sym=sym, zero_format=zero_format,
                 generator=gen(5))
    t.validate()
    assert t.problem == Problem(k, n, bits, group_size, act_order and group_size != -1)
    step = t.scales.float().index_select(0, t.g_idx.long())  # scale of each row's group
    err = (dequantize(t) - w).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-9).all()), float((err / step).max())
    z = zeros(t)
    maxq = (1 << bits) - 1
    if sym:
        assert bool((z == 1 << (bits - 1)).all())
    else:
        assert int(z.min()) >= (1 if zero_format == "v1" else 0) and int(z.max()) <= maxq


def test_quantize_rejects_bad_input() -> None:
    w = torch.randn(128, 64, generator=gen(6))
    with pytest.raises(InvalidProblemError, match="group_size"):
        quantize(w[:96], 4, 64)
    bad = w.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(InvalidTensorError, match="NaN"):
        quantize(bad)
    with pytest.raises(InvalidTensorError, match="2-D"):
        quantize(w[0])


def test_act_order_g_idx_follows_the_permutation() -> None:
    perm = torch.randperm(256, generator=gen(7))
    g_idx = act_order_g_idx(perm, 64)
    assert g_idx.dtype == torch.int32
    for i in range(256):
        assert int(g_idx[perm[i]]) == i // 64


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_act_order_groups_have_exactly_group_size_scattered_rows(group_size: int) -> None:
    k = 512
    t = quantize(torch.randn(k, 32, generator=gen(8)), 4, group_size, act_order=True,
                 generator=gen(9))
    counts = torch.bincount(t.g_idx.long(), minlength=k // group_size)
    assert counts.tolist() == [group_size] * (k // group_size)
    assert t.act_order and t.problem.act_order
    trivial = torch.arange(k) // group_size
    assert not torch.equal(t.g_idx.long(), trivial)
    plain = quantize(torch.randn(k, 32, generator=gen(8)), 4, group_size)
    assert torch.equal(plain.g_idx.long(), trivial) and not plain.act_order


def test_quantize_and_random_gptq_are_reproducible_from_the_generator() -> None:
    w = torch.randn(128, 32, generator=gen(11))
    a = quantize(w, act_order=True, generator=gen(12))
    b = quantize(w, act_order=True, generator=gen(12))
    assert torch.equal(a.g_idx, b.g_idx) and torch.equal(a.qweight, b.qweight)
    r1 = random_gptq(256, 64, 4, 64, True, generator=gen(13))
    r2 = random_gptq(256, 64, 4, 64, True, generator=gen(13))
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(r1, name), getattr(r2, name))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_random_gptq_is_a_valid_realistic_layer(bits: int, zero_format: str) -> None:
    t = random_gptq(512, 128, bits, 128, act_order=True, zero_format=zero_format,
                    generator=gen(bits))
    assert t.validate() is t
    assert t.problem == Problem(512, 128, bits, 128, True)
    s = t.scales.float()
    assert float(s.min()) >= 0.0099 and float(s.max()) <= 0.101 and float(s.std()) > 0
    z = zeros(t)
    assert int(z.min()) >= (1 if zero_format == "v1" else 0) and int(z.max()) <= (1 << bits) - 1
    q = unpack_rows(t.qweight, bits, t.k)
    assert int(q.min()) == 0 and int(q.max()) == (1 << bits) - 1  # the whole code range occurs
    assert torch.bincount(t.g_idx.long()).tolist() == [128] * 4


def test_properties_and_to() -> None:
    t = random_gptq(256, 64, 4, -1, generator=gen(14))
    assert (t.k, t.n, t.groups) == (256, 64, 1)
    assert t.problem == Problem(256, 64, 4, -1, False)
    assert not replace(t, g_idx=None).act_order
    c = t.to("cpu")
    assert torch.equal(c.qweight, t.qweight) and c.bits == t.bits and c.group_size == -1


# --- validate(): every rejection is typed and names the field ----------------------------------


@pytest.fixture
def layer() -> GPTQTensors:
    return random_gptq(256, 64, 4, 64, act_order=True, generator=gen(15))


def test_validate_rejects_wrong_dtype(layer: GPTQTensors) -> None:
    with pytest.raises(InvalidTensorError, match="qweight"):
        replace(layer, qweight=layer.qweight.float()).validate()
    with pytest.raises(InvalidTensorError, match="scales"):
        replace(layer, scales=layer.scales.float()).validate()
    with pytest.raises(InvalidTensorError, match="g_idx"):
        replace(layer, g_idx=layer.g_idx.long()).validate()
    with pytest.raises(InvalidTensorError, match="qzeros"):
        replace(layer, qzeros=layer.qzeros.to(torch.int64)).validate()


def test_validate_rejects_wrong_shapes(layer: GPTQTensors) -> None:
    with pytest.raises(InvalidTensorError, match="scales"):
        replace(layer, scales=layer.scales[:3].contiguous()).validate()
    with pytest.raises(InvalidTensorError, match="qzeros"):
        replace(layer, qzeros=layer.qzeros[:, :4].contiguous()).validate()
    with pytest.raises(InvalidTensorError, match="g_idx"):
        replace(layer, g_idx=layer.g_idx[:128].contiguous()).validate()
    with pytest.raises(InvalidTensorError, match="qweight"):
        replace(layer, qweight=layer.qweight.t()).validate()  # not contiguous


def test_validate_rejects_k_not_a_multiple_of_the_group() -> None:
    t = random_gptq(96, 64, 4, 32, generator=gen(16))
    with pytest.raises(InvalidProblemError, match="group_size=64"):
        replace(t, group_size=64, g_idx=None).validate()


def test_validate_rejects_g_idx_out_of_range(layer: GPTQTensors) -> None:
    g_idx = layer.g_idx.clone()
    g_idx[17] = layer.groups
    with pytest.raises(InvalidTensorError, match="g_idx"):
        replace(layer, g_idx=g_idx).validate()
    g_idx[17] = -1
    with pytest.raises(InvalidTensorError, match="g_idx"):
        replace(layer, g_idx=g_idx).validate()


def test_validate_rejects_unsupported_bits_and_formats(layer: GPTQTensors) -> None:
    with pytest.raises(InvalidProblemError, match="bits"):
        replace(layer, bits=5).validate()
    with pytest.raises(InvalidProblemError, match="group_size"):
        replace(layer, group_size=48).validate()
    with pytest.raises(InvalidProblemError, match="zero_format"):
        replace(layer, zero_format="v3").validate()  # type: ignore[arg-type]


def test_validate_rejects_bad_values_and_devices(layer: GPTQTensors) -> None:
    scales = layer.scales.clone()
    scales[0, 0] = float("inf")
    with pytest.raises(InvalidTensorError, match="scales"):
        replace(layer, scales=scales).validate()
    with pytest.raises(InvalidTensorError, match="scales is on meta"):
        replace(layer, scales=layer.scales.to("meta")).validate()
    with pytest.raises(InvalidTensorError, match="CPU"):
        layer.to("meta").validate(require_cpu=True)
