"""AWQ's GEMM weight format as AutoAWQ and transformers store it, and its conversion to GPTQ's.

Why this module exists: most 4-bit checkpoints people download are AWQ or GPTQ. Both describe
``W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]`` with ``g = k // group_size``; they differ only
in where each 4-bit value sits. The CUDA kernels read GPTQ's layout, so an AWQ layer is repacked
once, at load, by :func:`to_gptq` (a bit-exact permutation of the same integers: the kernels and
their tuned configs stay as they are), and the CPU reference (`reference.dequantize_awq`) reads
AWQ's tensors directly so the conversion has an independent oracle.

The tensors of one layer (K = in_features, N = out_features, G = K / group_size):

* ``qweight int32[K, N/8]``: packed along N (GPTQ packs along K: ``int32[K/8, N]``);
* ``qzeros int32[G, N/8]``: packed along N in the same order;
* ``scales fp16[G, N]``;
* zeros are stored as they are (GPTQ v1 stores zero - 1), bits 4 only, groups 32/64/128;
  there is no ``g_idx`` (AWQ does not reorder rows).

**Packing order.** Word ``j`` of a row holds columns ``8j .. 8j+7``, but not in order: nibble
``i`` (bits ``4i .. 4i+3``) holds column ``8j + AWQ_ORDER[i]`` with
``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``: even columns in the low half-word, odd ones in the high
half-word, which lets AWQ's kernel turn a word into fp16 pairs with few shifts. Inversely, column
``8j + c`` is in nibble ``AWQ_NIBBLE[c]`` with ``AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)``. (Source:
AutoAWQ's ``WQLinear_GEMM.from_linear`` packs with the order map [0, 2, 4, 6, 1, 3, 5, 7] and its
``packing_utils`` undoes it with the reverse order [0, 4, 1, 5, 2, 6, 3, 7]; transformers loads
AWQ checkpoints through those modules (AutoAWQ's, later GPTQModel's, which define the same two
orders), so the files on the Hub follow it.)

Worked example: one row whose 8 columns hold the values 1, 2, ..., 8 (column c holds c + 1)::

    nibble i          7  6  5  4  3  2  1  0
    column AWQ_ORDER  7  5  3  1  6  4  2  0
    value             8  6  4  2  7  5  3  1    ->  word 0x86427531 = -2042464975 as int32

GPTQ packs the same 8 values, were they consecutive along its packed axis, in natural order:
``0x87654321``. Reading an AWQ word in GPTQ's order would swap columns 1..6 around: wrong outputs,
not an error, which is why AWQ layers are recognised (by their shapes) and converted explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InvalidProblemError, InvalidTensorError
from .gptq import GPTQTensors, pack_cols, pack_rows, quantize, random_gptq, unpack_rows, zeros
from .problem import Problem

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of a word holds column ``8j + AWQ_ORDER[i]``."""

AWQ_NIBBLE: tuple[int, ...] = tuple(AWQ_ORDER.index(c) for c in range(8))
"""Column ``8j + c`` sits in nibble ``AWQ_NIBBLE[c]``: the inverse of AWQ_ORDER, (0, 4, 1, 5, 2, 6, 3, 7)."""

AWQ_BITS = 4
PACK = 32 // AWQ_BITS  # values per int32 word
AWQ_GROUPS: tuple[int, ...] = (32, 64, 128)


def _check_values(v: torch.Tensor, what: str) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 2:
        raise InvalidTensorError(f"{what} must be a 2-D tensor, got {getattr(v, 'shape', type(v).__name__)}")
    if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
        raise InvalidTensorError(f"{what} must be an integer tensor, got dtype {v.dtype}")
    if v.shape[1] % PACK:
        raise InvalidTensorError(f"{what} has N={v.shape[1]} columns; AWQ packing needs a multiple of {PACK}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise InvalidTensorError(f"{what} values must lie in 0..15, found {int(v.min())}..{int(v.max())}")


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values ``[R, N]`` along N in AWQ's order into ``int32[R, N/8]``."""
    _check_values(values, "values")
    r, n = values.shape
    v = values.to(torch.int32).reshape(r, n // PACK, PACK)
    out = torch.zeros((r, n // PACK), dtype=torch.int32, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):  # 8 whole-tensor steps, not a loop over elements
        out |= v[:, :, column] << (AWQ_BITS * nibble)  # int32 shifts wrap into the sign bit as wanted
    return out


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: ``int32[R, N/8]`` -> ``int32[R, N]`` values."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 2:
        raise InvalidTensorError(
            f"packed AWQ words must be a 2-D int32 tensor, got "
            f"{getattr(words, 'dtype', type(words).__name__)} {tuple(getattr(words, 'shape', ()))}")
    shifts = torch.arange(0, 32, AWQ_BITS, dtype=torch.int32, device=words.device)
    # Arithmetic shift of a negative word only sign-fills above bit 31: masking is exact.
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [R, N/8, nibble]
    index = torch.tensor(AWQ_NIBBLE, dtype=torch.int64, device=words.device)
    return nibbles.index_select(2, index).reshape(words.shape[0], -1)


@dataclass(frozen=True, eq=False)
class AWQTensors:
    """One AWQ GEMM linear layer's tensors as a checkpoint stores them (module docstring)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int = 128
    bits: int = AWQ_BITS

    @property
    def k(self) -> int:
        return self.qweight.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[1] * PACK

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def problem(self) -> Problem:
        """The GPTQ problem the layer runs as after :func:`to_gptq` (never act-order)."""
        return Problem(self.k, self.n, self.bits, self.group_size, False)

    def to(self, device: torch.device | str) -> AWQTensors:
        return replace(self, qweight=self.qweight.to(device), qzeros=self.qzeros.to(device),
                       scales=self.scales.to(device))

    def validate(self, require_cpu: bool = False) -> AWQTensors:
        """Check every field; raise a typed error naming the offending one. Returns self."""
        if isinstance(self.bits, bool) or self.bits != AWQ_BITS:
            raise InvalidProblemError(f"bits={self.bits!r}: AWQ GEMM layers are {AWQ_BITS}-bit only")
        if isinstance(self.group_size, bool) or self.group_size not in AWQ_GROUPS:
            raise InvalidProblemError(f"group_size={self.group_size!r} is not supported for AWQ "
                                      f"(choose from {AWQ_GROUPS})")
        named = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        want = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}
        for name, t in named.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidTensorError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != want[name]:
                raise InvalidTensorError(f"{name} must be {want[name]}, got {t.dtype}")
            if t.dim() != 2:
                raise InvalidTensorError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
            if not t.is_contiguous():
                raise InvalidTensorError(f"{name} must be contiguous")
            if t.device != self.qweight.device:
                raise InvalidTensorError(f"{name} is on {t.device} but qweight is on {self.qweight.device}")
        if require_cpu and self.qweight.device.type != "cpu":
            raise InvalidTensorError(f"qweight is on {self.qweight.device}; the reference needs CPU tensors")
        k, n = self.k, self.n
        if k == 0 or n == 0 or k % self.group_size:
            raise InvalidTensorError(
                f"qweight shape {tuple(self.qweight.shape)}: K={k} must be a positive multiple of "
                f"group_size={self.group_size} (AWQ qweight is [K, N/8])")
        Problem(k, n, self.bits, self.group_size, False)  # K, N limits of the kernels
        g = self.groups
        if tuple(self.qzeros.shape) != (g, n // PACK):
            raise InvalidTensorError(f"qzeros shape {tuple(self.qzeros.shape)} != expected ({g}, {n // PACK}) "
                                     f"for AWQ K={k} N={n} group_size={self.group_size}")
        if tuple(self.scales.shape) != (g, n):
            raise InvalidTensorError(f"scales shape {tuple(self.scales.shape)} != expected ({g}, {n}) "
                                     f"for AWQ K={k} N={n} group_size={self.group_size}")
        if not bool(torch.isfinite(self.scales).all()):
            raise InvalidTensorError("scales contain NaN or inf")
        return self


def is_awq_layout(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> bool:
    """True when three tensors have AWQ's shapes: qweight [K, N/8], qzeros [G, N/8], scales
    [G, N]. GPTQ's qweight is [K*bits/32, N], as wide as scales, so the two never both match."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (qweight, qzeros, scales)):
        return False
    n8 = qweight.shape[1]
    return n8 > 0 and scales.shape[1] == n8 * PACK and tuple(qzeros.shape) == (scales.shape[0], n8)


def to_gptq(a: AWQTensors) -> GPTQTensors:
    """The same layer in the GPTQ layout the kernels read: qweight repacked along K, zeros
    repacked in natural order and kept as they are (``gptq_v2``), no g_idx. Bit-exact: every
    (q, zero, scale) of the layer is unchanged, only moved."""
    a.validate()
    q = unpack_awq(a.qweight)
    z = unpack_awq(a.qzeros)
    return GPTQTensors(pack_rows(q, a.bits), pack_cols(z, a.bits), a.scales, None, a.bits,
                       a.group_size, "v2")


def from_gptq(t: GPTQTensors) -> AWQTensors:
    """The AWQ form of a 4-bit GPTQ layer without act-order (its inverse is :func:`to_gptq`).
    A v1 layer whose real zero is 16 has no AWQ form: InvalidTensorError."""
    t.validate()
    if t.bits != AWQ_BITS:
        raise InvalidProblemError(f"bits={t.bits}: AWQ GEMM layers are {AWQ_BITS}-bit only")
    if t.act_order:
        raise InvalidProblemError("an act-order GPTQ layer (permuted g_idx) has no AWQ form")
    if t.group_size not in AWQ_GROUPS:
        raise InvalidProblemError(f"group_size={t.group_size} is not supported for AWQ (choose from {AWQ_GROUPS})")
    z = zeros(t)
    if int(z.max()) > 15:
        raise InvalidTensorError(f"a real zero of {int(z.max())} does not fit AWQ's 4-bit zeros")
    q = unpack_rows(t.qweight, t.bits, t.k)
    return AWQTensors(pack_awq(q), pack_awq(z), t.scales.contiguous(), t.group_size, t.bits)


def quantize_awq(w: torch.Tensor, group_size: int = 128) -> AWQTensors:
    """Round-to-nearest quantisation of ``w[K, N]`` (in_features x out_features) to AWQ GEMM.

    The rounding rule is GPTQ's asymmetric one (:func:`gemmtune.kernels.gptq.quantize` with
    zeros stored as they are): per group and column the range ``[min(x, 0), max(x, 0)]``, scale
    rounded up to fp16, zero ``round(-min / scale)`` in 0..15, so every element is within half a
    step. AWQ's activation-aware search only rescales the weights before this rounding step; for
    tests and benchmarks RTN on the weights is the format's contract.
    """
    if isinstance(group_size, bool) or group_size not in AWQ_GROUPS:
        raise InvalidProblemError(f"group_size={group_size!r} is not supported for AWQ (choose from {AWQ_GROUPS})")
    return from_gptq(quantize(w, AWQ_BITS, group_size, act_order=False, sym=False, zero_format="v2"))


def random_awq(k: int, n: int, group_size: int = 128,
               generator: torch.Generator | None = None) -> AWQTensors:
    """A realistic random AWQ layer (uniform q and zeros 0..15, log-uniform scales), CPU."""
    if isinstance(group_size, bool) or group_size not in AWQ_GROUPS:
        raise InvalidProblemError(f"group_size={group_size!r} is not supported for AWQ (choose from {AWQ_GROUPS})")
    return from_gptq(random_gptq(k, n, AWQ_BITS, group_size, False, "v2", generator=generator))


def unpack_zeros(a: AWQTensors) -> torch.Tensor:
    """Real zero points ``int32[G, N]`` (AWQ stores them as they are)."""
    return unpack_awq(a.qzeros)


__all__ = [
    "AWQ_GROUPS",
    "AWQ_NIBBLE",
    "AWQ_ORDER",
    "AWQTensors",
    "from_gptq",
    "is_awq_layout",
    "pack_awq",
    "quantize_awq",
    "random_awq",
    "to_gptq",
    "unpack_awq",
    "unpack_zeros",
]
