"""AWQ's GEMM format: nibble order, conversion to the GPTQ layout, quantizer, CPU reference.

The expected int32 words are written out by hand from the layout (nibble i of a word holds
column 8j + (0, 2, 4, 6, 1, 3, 5, 7)[i]; the derivation is in each comment), not computed with
the project's packer, so a packer and unpacker that agree with each other but not with AutoAWQ's
files cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from gemmtune.kernels import InvalidProblemError, InvalidTensorError, reference
from gemmtune.kernels.awq import (
    AWQ_NIBBLE,
    AWQ_ORDER,
    AWQTensors,
    from_gptq,
    is_awq_layout,
    pack_awq,
    quantize_awq,
    random_awq,
    to_gptq,
    unpack_awq,
)
from gemmtune.kernels.formats import QuantFormat
from gemmtune.kernels.gptq import quantize, unpack_cols, unpack_rows, zeros
from gemmtune.runtime import QuantLinear

from tests.gpu_util import activations, reference_product, requires_gpu


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def i32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 a checkpoint stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def test_the_order_constants_are_autoawqs() -> None:
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert AWQ_NIBBLE == (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's "reverse order"


def test_the_docstring_example_packs_to_0x86427531() -> None:
    # Columns 0..7 hold 1..8. Nibbles 0..7 hold columns 0,2,4,6,1,3,5,7 = values 1,3,5,7,2,4,6,8;
    # written from nibble 7 down to nibble 0: 8 6 4 2 7 5 3 1.
    row = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_awq(row).tolist() == [[-2042464975]]
    assert i32(0x86427531) == -2042464975
    assert unpack_awq(torch.tensor([[-2042464975]], dtype=torch.int32)).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


# Column c alone set to 15: the word is 0xF in nibble (0, 4, 1, 5, 2, 6, 3, 7)[c].
ONE_HOT = [0x0000000F, 0x000F0000, 0x000000F0, 0x00F00000,
           0x00000F00, 0x0F000000, 0x0000F000, i32(0xF0000000)]


@pytest.mark.parametrize("column", range(8))
def test_each_column_lands_in_its_nibble(column: int) -> None:
    row = torch.zeros(1, 8, dtype=torch.int32)
    row[0, column] = 15
    assert pack_awq(row).tolist() == [[ONE_HOT[column]]]
    assert unpack_awq(torch.tensor([[ONE_HOT[column]]], dtype=torch.int32)).tolist() == row.tolist()


def test_two_words_per_row() -> None:
    # Column c holds c for c in 0..15. Word 0: nibbles 7..0 = columns 7,5,3,1,6,4,2,0 = 0x75316420.
    # Word 1: columns 15,13,11,9,14,12,10,8 = 0xFDB9ECA8.
    row = torch.arange(16).view(1, 16)
    words = [0x75316420, i32(0xFDB9ECA8)]
    assert words == [1966171168, -38146904]
    assert pack_awq(row).tolist() == [words]
    assert unpack_awq(torch.tensor([words], dtype=torch.int32)).tolist() == row.tolist()


def test_random_round_trips_both_ways() -> None:
    v = torch.randint(0, 16, (37, 64), generator=gen(1))
    assert torch.equal(unpack_awq(pack_awq(v)), v.to(torch.int32))
    words = torch.randint(-(1 << 31), 1 << 31, (5, 9), generator=gen(2), dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack_awq(unpack_awq(words)), words)  # every bit pattern is a valid word


def test_packing_rejects_bad_input() -> None:
    with pytest.raises(InvalidTensorError, match="0..15"):
        pack_awq(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 16]]))
    with pytest.raises(InvalidTensorError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(InvalidTensorError, match="integer"):
        pack_awq(torch.zeros(2, 8))
    with pytest.raises(InvalidTensorError, match="int32"):
        unpack_awq(torch.zeros(2, 1, dtype=torch.int64))


def hand_layer() -> tuple[AWQTensors, torch.Tensor, torch.Tensor]:
    """K=32, N=8, one group: q[k, n] = (k + n) % 16, zero[n] = n + 1, scale 0.5 everywhere.
    The AWQ words are spelled with the nibble table written out here, not with pack_awq."""
    nibble_of_column = (0, 4, 1, 5, 2, 6, 3, 7)
    q = [[(k + n) % 16 for n in range(8)] for k in range(32)]
    z = [n + 1 for n in range(8)]

    def word(values: list[int]) -> int:
        return i32(sum(v << (4 * nibble_of_column[c]) for c, v in enumerate(values)))

    qweight = torch.tensor([[word(row)] for row in q], dtype=torch.int32)
    qzeros = torch.tensor([[word(z)]], dtype=torch.int32)
    assert qzeros.item() == -2042464975  # zeros 1..8: the docstring's word
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    return AWQTensors(qweight, qzeros, scales, 32), torch.tensor(q), torch.tensor([z])


def test_conversion_to_gptq_on_a_hand_worked_layer() -> None:
    a, q, z = hand_layer()
    t = to_gptq(a)
    assert (t.bits, t.group_size, t.zero_format, t.g_idx) == (4, 32, "v2", None)
    assert tuple(t.qweight.shape) == (4, 8) and tuple(t.qzeros.shape) == (1, 1)
    # GPTQ packs K: word [r, n] holds q[8r + i, n] in nibble i.
    # n=0, r=0: q[0..7, 0] = 0..7 -> 0x76543210.
    assert t.qweight[0, 0].item() == 0x76543210
    # n=1, r=1: q[8..15, 1] = 9, 10, ..., 15, 0 -> nibbles 7..0 = 0 F E D C B A 9 = 0x0FEDCBA9.
    assert t.qweight[1, 1].item() == 0x0FEDCBA9 == 267242409
    # GPTQ qzeros pack N in natural order: zeros 1..8 -> 0x87654321; v2 stores them as they are.
    assert t.qzeros.item() == i32(0x87654321) == -2023406815
    w = reference.dequantize(t)
    # W[3, 5] = (q=(3+5)%16=8 - zero=6) * 0.5 = 1.0; W[0, 7] = (7 - 8) * 0.5 = -0.5.
    assert w[3, 5].item() == 1.0 and w[0, 7].item() == -0.5
    assert torch.equal(w, (q - z).float() * 0.5)
    assert torch.equal(reference.dequantize_awq(a), w)


def test_conversion_is_bit_exact_both_ways() -> None:
    for group in (32, 64, 128):
        a = random_awq(256, 96, group, gen(group))
        t = to_gptq(a)
        assert torch.equal(unpack_rows(t.qweight, 4, 256), unpack_awq(a.qweight))
        assert torch.equal(zeros(t), unpack_awq(a.qzeros))
        assert torch.equal(t.scales, a.scales)
        back = from_gptq(t)
        assert torch.equal(back.qweight, a.qweight) and torch.equal(back.qzeros, a.qzeros)
        # The reference reads AWQ's tensors directly: it must agree with GPTQ's to the bit.
        assert torch.equal(reference.dequantize_awq(a, torch.float64), reference.dequantize(t, torch.float64))


def test_reading_awq_words_in_gptq_order_would_be_wrong() -> None:
    # What the issue reported: an AWQ file read as if its words were in natural order.
    # GPTQ's natural order (its qzeros packing) sees nibble i as column i; AWQ's column c is
    # nibble (0, 4, 1, 5, 2, 6, 3, 7)[c] of the same word: 6 of every 8 columns move.
    a = random_awq(128, 64, 64, gen(3))
    natural = unpack_cols(a.qweight, 4, 64).view(128, 8, 8)
    awq = unpack_awq(a.qweight).view(128, 8, 8)
    assert not torch.equal(natural, awq)
    assert torch.equal(natural[:, :, [0, 4, 1, 5, 2, 6, 3, 7]], awq)


def test_from_gptq_refuses_what_awq_cannot_hold() -> None:
    with pytest.raises(InvalidProblemError, match="4-bit"):
        from_gptq(quantize(torch.randn(128, 32), 8, 64))
    with pytest.raises(InvalidProblemError, match="act-order"):
        from_gptq(quantize(torch.randn(128, 32), 4, 64, act_order=True, generator=gen(4)))
    with pytest.raises(InvalidProblemError, match="group_size"):
        from_gptq(quantize(torch.randn(128, 32), 4, -1))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_awq_is_round_to_nearest(group: int) -> None:
    w = torch.randn(256, 64, generator=gen(group)) * 0.02
    a = quantize_awq(w, group)
    assert a.validate() is a
    assert tuple(a.qweight.shape) == (256, 8) and tuple(a.qzeros.shape) == (256 // group, 8)
    assert tuple(a.scales.shape) == (256 // group, 64) and a.scales.dtype == torch.float16
    z = unpack_awq(a.qzeros)
    assert int(z.min()) >= 0 and int(z.max()) <= 15
    err = (reference.dequantize_awq(a) - w).abs()
    half_step = a.scales.float().repeat_interleave(group, dim=0) / 2
    assert bool((err <= half_step * (1 + 1e-6)).all())


def test_quantize_awq_rejects_other_groups() -> None:
    for bad in (-1, 16, 100, True):
        with pytest.raises(InvalidProblemError, match="group_size"):
            quantize_awq(torch.randn(256, 64), bad)  # type: ignore[arg-type]


def test_validate_names_the_bad_field() -> None:
    a = random_awq(128, 64, 64, gen(5))
    cases = [
        (AWQTensors(a.qweight, a.qzeros, a.scales.float(), 64), "scales must be torch.float16"),
        (AWQTensors(a.qweight, a.qzeros[:1], a.scales, 64), "qzeros shape"),
        (AWQTensors(a.qweight, a.qzeros, a.scales[:, :32].contiguous(), 64), "scales shape"),
        (AWQTensors(a.qweight, a.qzeros, a.scales, 64, bits=8), "4-bit"),
        (AWQTensors(a.qweight[:100].contiguous(), a.qzeros, a.scales, 64), "multiple of group_size"),
    ]
    for bad, match in cases:
        with pytest.raises((InvalidTensorError, InvalidProblemError), match=match):
            bad.validate()
    nan = a.scales.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InvalidTensorError, match="NaN"):
        AWQTensors(a.qweight, a.qzeros, nan, 64).validate()


def test_layouts_are_told_apart_by_shape() -> None:
    a = random_awq(256, 64, 128, gen(6))
    t = to_gptq(a)
    assert is_awq_layout(a.qweight, a.qzeros, a.scales)
    assert not is_awq_layout(t.qweight, t.qzeros, t.scales)
    # A square-ish GPTQ layer: K/8 x N qweight never has N/8 columns.
    g = quantize(torch.randn(64, 64), 4, 32)
    assert not is_awq_layout(g.qweight, g.qzeros, g.scales)


# -- QuantLinear built from AWQ tensors (CPU reference path) ----------------------------------


def test_quant_linear_from_awq_matches_the_awq_reference() -> None:
    a = random_awq(256, 128, 64, gen(7))
    bias = torch.randn(128, dtype=torch.float16)
    m = QuantLinear.from_awq_tensors(a, bias)
    assert m.problem.key() == "256x128-b4-g64" and m.zero_format == "v2"
    x = torch.randn(3, 256, generator=gen(8), dtype=torch.float64)
    want = x @ reference.dequantize_awq(a, torch.float64) + bias.double()
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_checkpoint_tensors_must_match_the_named_format() -> None:
    a = random_awq(256, 128, 64, gen(9))
    t = to_gptq(a)
    awq_fmt = QuantFormat(4, 64, method="awq", zero_format="v2", sym=False)
    gptq_fmt = QuantFormat(4, 64, sym=False, zero_format="v2")
    ok = QuantLinear.from_checkpoint_tensors(
        {"qweight": a.qweight, "qzeros": a.qzeros, "scales": a.scales}, awq_fmt)
    assert torch.equal(ok.qweight, t.qweight)
    with pytest.raises(InvalidTensorError, match="quant_method=awq but the tensors have not AWQ's"):
        QuantLinear.from_checkpoint_tensors(
            {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales}, awq_fmt)
    with pytest.raises(InvalidTensorError, match="quant_method=gptq but the tensors have AWQ's"):
        QuantLinear.from_checkpoint_tensors(
            {"qweight": a.qweight, "qzeros": a.qzeros, "scales": a.scales}, gptq_fmt)


# -- GPU (run with `pytest -m gpu` on the GPU machine) ----------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 8, 33, 200])
def test_gpu_awq_layer_matches_the_awq_reference(m: int) -> None:
    a = random_awq(4096, 1024, 128, gen(10 + m))
    bias = torch.randn(1024, dtype=torch.float16)
    q = QuantLinear.from_awq_tensors(a, bias, config="default").cuda()
    assert q.lookup_result is not None
    x = activations(m, 4096, seed=20 + m)
    y = q(x)
    assert y.shape == (m, 1024) and y.dtype == torch.float16
    w_ref = reference.dequantize_awq(a, torch.float32).cuda()
    want = reference_product(x, to_gptq(a), w_ref) + bias.cuda().float()
    assert reference.relative_error(y, want) < reference.fp16_tolerance(4096)
