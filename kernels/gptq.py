"""The GPTQ weight format exactly as AutoGPTQ / GPTQModel checkpoints store it.

Why this module exists: every CUDA kernel, the CPU reference (the tuner's correctness oracle) and
the runtime's checkpoint loader must agree bit for bit on where a quantized value lives. The
conventions are written down once here:

* ``qweight int32[K*bits/32, N]`` packs K (rows, in_features). Every 32 consecutive rows form a
  little-endian bit stream of ``bits`` words; value ``i`` of the 32 sits at stream bits
  ``bits*i .. bits*i+bits-1``. For bits 2/4/8 that is simply word row ``k // (32//bits)`` at bit
  offset ``(k % (32//bits)) * bits``; for 3 bits it is AutoGPTQ's 3-words-per-32-values layout
  (values 10 and 21 straddle a word boundary).
* ``qzeros int32[G, N*bits/32]`` packs the same way along N (columns).
* ``scales fp16[G, N]``; ``g_idx int32[K]`` gives the group of each row (act-order scatters them).
* Zero convention: ``"v1"`` (AutoGPTQ's ``gptq``) stores ``zero - 1`` and readers add one back
  without masking; ``"v2"`` (GPTQModel's ``gptq_v2``) stores the zero itself.
* ``W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``, shape ``[K, N]``.

Everything is vectorised torch (no Python loops over elements) so the reference stays fast enough
to check every tuner trial on fresh data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from .errors import InvalidProblemError, InvalidTensorError
from .problem import SUPPORTED_BITS, SUPPORTED_GROUPS, Problem

ZeroFormat = Literal["v1", "v2"]
ZERO_FORMATS: tuple[str, ...] = ("v1", "v2")

_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise InvalidProblemError(f"bits={bits!r} is not supported (choose from {SUPPORTED_BITS})")


def _stream_layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word index, bit shift and 'spills into the next word' flag of each of 32 values."""
    pos = torch.arange(32, dtype=torch.int64) * bits
    return pos // 32, pos % 32, (pos % 32) + bits > 32


# --- packing along rows (qweight) -------------------------------------------------------------


def _to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits (two's complement)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _check_values(q: torch.Tensor, bits: int, what: str) -> None:
    if not isinstance(q, torch.Tensor):
        raise InvalidTensorError(f"{what} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise InvalidTensorError(f"{what} must be an integer tensor, got dtype {q.dtype}")
    if q.dim() != 2:
        raise InvalidTensorError(f"{what} must be 2-D, got shape {tuple(q.shape)}")
    if q.numel():
        lo, hi = int(q.min()), int(q.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise InvalidTensorError(
                f"{what} values must lie in 0..{(1 << bits) - 1} for {bits}-bit packing, "
                f"found {lo}..{hi}"
            )


def _per_word(bits: int) -> int:
    """Values per whole packing unit: 32//bits for 2/4/8, 32 (three words) for 3 bits."""
    return 32 if bits == 3 else 32 // bits


def _pack_dim0(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``q[L, C]`` along dim 0 into ``int32[L*bits/32, C]`` (L a multiple of _per_word)."""
    length, c = q.shape
    if bits in (2, 4, 8):
        per = 32 // bits
        qv = q.to(torch.int32).reshape(length // per, per, c)
        out = torch.zeros((length // per, c), dtype=torch.int32, device=q.device)
        for i in range(per):  # loop over bit positions in a word, not over elements
            out |= qv[:, i, :] << (i * bits)  # int32 shifts wrap into the sign bit as wanted
        return out
    # Generic bit stream (3 bits): 32 values -> `bits` words, values may straddle two words.
    word, shift, spill = _stream_layout(bits)
    qv = q.to(torch.int64).reshape(length // 32, 32, c)
    out = torch.zeros((length // 32, bits, c), dtype=torch.int64, device=q.device)
    for i in range(32):
        v = qv[:, i, :]
        out[:, int(word[i]), :] |= (v << int(shift[i])) & _MASK32
        if spill[i]:
            out[:, int(word[i]) + 1, :] |= v >> (32 - int(shift[i]))
    return _to_int32_bits(out.reshape(length // 32 * bits, c))


def _unpack_dim0(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of _pack_dim0: ``int32[L*bits/32, C]`` -> ``int32[L, C]``."""
    c = words.shape[1]
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, per, 1)
        # Arithmetic shift of a negative word only sign-fills above bit 31: masking is exact.
        return ((words.unsqueeze(1) >> shifts) & mask).reshape(length, c)
    word, shift, spill = _stream_layout(bits)
    w64 = words.to(torch.int64).reshape(length // 32, bits, c) & _MASK32
    out = torch.empty((length // 32, 32, c), dtype=torch.int32, device=words.device)
    for i in range(32):  # loop over the 32 stream positions, each a whole [L/32, C] slice
        v = w64[:, int(word[i]), :] >> int(shift[i])
        if spill[i]:
            v = v | (w64[:, int(word[i]) + 1, :] << (32 - int(shift[i])))
        out[:, i, :] = v & mask
    return out.reshape(length, c)


def _check_packed(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.dim() != 2:
        raise InvalidTensorError(
            f"{name} must be a 2-D int32 tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    return x


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values ``q[K, N]`` (0..2**bits-1) along K into ``int32[K*bits/32, N]``."""
    _check_bits(bits)
    _check_values(q, bits, "q")
    if q.shape[0] % 32:
        raise InvalidTensorError(f"q has K={q.shape[0]} rows; packing needs a multiple of 32")
    return _pack_dim0(q, bits)


def unpack_rows(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``int32[K*bits/32, N]`` -> ``int32[K, N]`` values."""
    _check_bits(bits)
    _check_packed(qweight, "qweight")
    if k <= 0 or k % 32 or qweight.shape[0] != k * bits // 32:
        raise InvalidTensorError(
            f"qweight has {qweight.shape[0]} rows; K={k} at {bits} bits needs {k * bits // 32} "
            "(and K a positive multiple of 32)"
        )
    return _unpack_dim0(qweight, bits, k)


def pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values ``z[G, N]`` along N into ``int32[G, N*bits/32]`` (qzeros layout)."""
    _check_bits(bits)
    _check_values(z, bits, "zeros")
    per = _per_word(bits)
    if z.shape[1] % per:
        raise InvalidTensorError(
            f"zeros have N={z.shape[1]} columns; {bits}-bit packing needs a multiple of {per}"
        )
    return _pack_dim0(z.t(), bits).t().contiguous()


def unpack_cols(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: ``int32[G, N*bits/32]`` -> ``int32[G, N]`` stored values."""
    _check_bits(bits)
    _check_packed(qzeros, "qzeros")
    per = _per_word(bits)
    if n <= 0 or n % per or qzeros.shape[1] != n * bits // 32:
        raise InvalidTensorError(
            f"qzeros has {qzeros.shape[1]} columns; N={n} at {bits} bits needs {n * bits // 32} "
            f"(and N a positive multiple of {per})"
        )
    return _unpack_dim0(qzeros.t(), bits, n).t().contiguous()


# --- the tensors of one layer -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GPTQTensors:
    """One GPTQ linear layer's tensors as a checkpoint stores them (see the module docstring).

    Frozen so a layer's identity cannot drift after validation; the tensors themselves stay
    ordinary (mutable) torch tensors.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    zero_format: ZeroFormat = "v1"

    @property
    def k(self) -> int:
        """in_features, derived from qweight (``rows * 32 / bits``)."""
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def n(self) -> int:
        """out_features."""
        return self.qweight.shape[1]

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.k // self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def trivial_g_idx(self) -> torch.Tensor:
        """The g_idx of a layer without act-order: ``k // group_size`` (all zero for -1)."""
        rows = torch.arange(self.k, dtype=torch.int32, device=self.qweight.device)
        return torch.zeros_like(rows) if self.group_size == -1 else rows // self.group_size

    @property
    def act_order(self) -> bool:
        """True when g_idx is present and differs from the trivial ``k // group_size``."""
        if self.g_idx is None:
            return False
        return not torch.equal(self.g_idx.to(torch.int32), self.trivial_g_idx())

    @property
    def problem(self) -> Problem:
        return Problem(self.k, self.n, self.bits, self.group_size, self.act_order)

    def to(self, device: torch.device | str) -> GPTQTensors:
        """Copy of the layer with every tensor on ``device``."""
        return replace(
            self,
            qweight=self.qweight.to(device),
            qzeros=self.qzeros.to(device),
            scales=self.scales.to(device),
            g_idx=None if self.g_idx is None else self.g_idx.to(device),
        )

    def validate(self, require_cpu: bool = False) -> GPTQTensors:
        """Check every field; raise a typed error naming the offending field. Returns self.

        Checks types, dtypes, shapes, contiguity, one common device (CPU when ``require_cpu``),
        the Problem rules (bits, group size, K/N divisibility), g_idx range and finite scales.
        """
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise InvalidProblemError(f"bits={self.bits!r} is not supported (choose from {SUPPORTED_BITS})")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size not in SUPPORTED_GROUPS
        ):
            raise InvalidProblemError(
                f"group_size={self.group_size!r} is not supported (choose from {SUPPORTED_GROUPS})"
            )
        if self.zero_format not in ZERO_FORMATS:
            raise InvalidProblemError(f"zero_format={self.zero_format!r} must be one of {ZERO_FORMATS}")
        named = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.g_idx is not None:
            named["g_idx"] = self.g_idx
        for name, t in named.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidTensorError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        expected_dtype = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16,
                          "g_idx": torch.int32}
        for name, t in named.items():
            if t.dtype != expected_dtype[name]:
                raise InvalidTensorError(f"{name} must be {expected_dtype[name]}, got {t.dtype}")
            if t.dim() != (1 if name == "g_idx" else 2):
                raise InvalidTensorError(
                    f"{name} must be {1 if name == 'g_idx' else 2}-D, got shape {tuple(t.shape)}"
                )
            if not t.is_contiguous():
                raise InvalidTensorError(f"{name} must be contiguous")
            if t.device != self.qweight.device:
                raise InvalidTensorError(
                    f"{name} is on {t.device} but qweight is on {self.qweight.device}"
                )
        if require_cpu and self.qweight.device.type != "cpu":
            raise InvalidTensorError(f"qweight is on {self.qweight.device}; the reference needs CPU tensors")
        rows = self.qweight.shape[0]
        if rows == 0 or (rows * 32) % self.bits:
            raise InvalidTensorError(
                f"qweight has {rows} rows, not a whole number of {self.bits}-bit 32-row blocks"
            )
        k, n = self.k, self.n
        if self.g_idx is not None and self.g_idx.shape[0] != k:
            raise InvalidTensorError(f"g_idx has {self.g_idx.shape[0]} entries but qweight holds K={k} rows")
        problem = Problem(k, n, self.bits, self.group_size, False)  # K, N and group rules
        g = problem.groups
        if tuple(self.qzeros.shape) != (g, n * self.bits // 32):
            raise InvalidTensorError(
                f"qzeros shape {tuple(self.qzeros.shape)} != expected ({g}, {n * self.bits // 32}) "
                f"for K={k} N={n} bits={self.bits} group_size={self.group_size}"
            )
        if tuple(self.scales.shape) != (g, n):
            raise InvalidTensorError(
                f"scales shape {tuple(self.scales.shape)} != expected ({g}, {n}) "
                f"for K={k} N={n} group_size={self.group_size}"
            )
        if self.g_idx is not None:
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= g:
                raise InvalidTensorError(f"g_idx values must lie in 0..{g - 1}, found {lo}..{hi}")
        if not bool(torch.isfinite(self.scales).all()):
            raise InvalidTensorError("scales contain NaN or inf")
        return self


# --- zero conventions -------------------------------------------------------------------------


def zeros(t: GPTQTensors) -> torch.Tensor:
    """Real zero points ``int32[G, N]`` (v1: stored + 1 without masking, as engines read it)."""
    stored = unpack_cols(t.qzeros, t.bits, t.n)
    if t.zero_format == "v1":
        return stored + 1
    if t.zero_format == "v2":
        return stored
    raise InvalidProblemError(f"zero_format={t.zero_format!r} must be one of {ZERO_FORMATS}")


def to_v2(t: GPTQTensors) -> GPTQTensors:
    """Same layer with zeros stored as-is (``gptq_v2``). A v1 stored value of 2**bits-1 means a
    real zero of 2**bits, which v2 cannot hold: that raises InvalidTensorError."""
    if t.zero_format == "v2":
        return t
    z = zeros(t)
    top = (1 << t.bits) - 1
    if int(z.max()) > top:
        raise InvalidTensorError(
            f"qzeros hold a real zero of {int(z.max())} (v1 stored {top}), not representable in "
            f"{t.bits}-bit v2 zeros"
        )
    return replace(t, qzeros=pack_cols(z, t.bits), zero_format="v2")


def to_v1(t: GPTQTensors) -> GPTQTensors:
    """Same layer with zeros stored minus one (``gptq``). A real zero of 0 would be stored as -1
    and read back as 2**bits, so it raises InvalidTensorError instead."""
    if t.zero_format == "v1":
        return t
    z = zeros(t)
    if int(z.min()) < 1:
        raise InvalidTensorError(
            "qzeros hold a real zero of 0, which the v1 convention (stored = zero - 1) cannot represent"
        )
    return replace(t, qzeros=pack_cols(z - 1, t.bits), zero_format="v1")


# --- quantizer and random layers --------------------------------------------------------------


def act_order_g_idx(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """g_idx of an act-order layer: rows visited in ``perm`` order, groups formed over permuted
    positions, so ``g_idx[perm[i]] = i // group_size``."""
    k = perm.shape[0]
    g_idx = torch.empty(k, dtype=torch.int32, device=perm.device)
    pos = torch.arange(k, dtype=torch.int32, device=perm.device)
    g_idx[perm] = torch.zeros_like(pos) if group_size == -1 else pos // group_size
    return g_idx


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= x (x > 0): a stored scale never shrinks the grid below the range."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = False,
    zero_format: ZeroFormat = "v1",
    generator: torch.Generator | None = None,
) -> GPTQTensors:
    """Round-to-nearest GPTQ quantisation of ``w[K, N]`` (in_features x out_features).

    Per group and column, like GPTQ's quantizer: the range is ``[min(x, 0), max(x, 0)]``,
    ``scale = range / (2**bits - 1)`` rounded *up* to fp16 (so every element stays within half a
    step of the grid), ``zero = round(-min / scale)``; ``sym`` uses ``+-max|x|`` and
    ``zero = 2**(bits-1)``. For v1 the zero must be at least 1 (stored = zero - 1 >= 0): a group
    whose zero would round to 0 gets a widened scale with zero 1 instead, keeping the half-step
    bound. ``act_order`` visits rows in a random permutation drawn from ``generator``.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
        raise InvalidTensorError(
            f"w must be a 2-D floating tensor [K, N], got "
            f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}"
        )
    if zero_format not in ZERO_FORMATS:
        raise InvalidProblemError(f"zero_format={zero_format!r} must be one of {ZERO_FORMATS}")
    k, n = w.shape
    problem = Problem(k, n, bits, group_size, bool(act_order))
    x = w.detach().to(torch.float32)
    maxq = (1 << bits) - 1
    gs = problem.effective_group
    g = problem.groups

    if act_order:
        perm = torch.randperm(k, generator=generator, device="cpu").to(x.device)
        g_idx = act_order_g_idx(perm, group_size)
    else:
        perm = None
        g_idx = torch.arange(k, dtype=torch.int32, device=x.device)
        g_idx = torch.zeros_like(g_idx) if group_size == -1 else g_idx // group_size
    xp = x if perm is None else x[perm]
    xg = xp.reshape(g, gs, n)
    xmin, xmax = xg.amin(dim=1), xg.amax(dim=1)  # both propagate NaN
    if not bool(torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        raise InvalidTensorError("w contains NaN or inf")
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if sym:
        # Always +-max|x| (GPTQ keeps xmin = 0 for all-positive groups and then cannot reach
        # half the range with a mid-range zero).
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = _round_up_fp16((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(xmin, float(1 << (bits - 1)))
    else:
        zero = torch.round(-xmin / scale.float())
        if zero_format == "v1":
            # Grid [-s, (maxq-1)s] must still reach xmax; -xmin < s/2 here so the low end holds.
            low = zero < 1
            wide = _round_up_fp16(xmax / (maxq - 1))
            scale = torch.where(low, torch.maximum(scale, wide), scale)
            zero = torch.clamp(zero, min=1.0)
        zero = torch.clamp(zero, max=float(maxq))
    if not bool(torch.isfinite(scale).all()):
        raise InvalidTensorError("w is too large: a group's scale overflows fp16")
    s = scale.float().unsqueeze(1)
    qp = torch.clamp(torch.round(xg / s) + zero.unsqueeze(1), 0, maxq).to(torch.int32).reshape(k, n)
    q = qp if perm is None else torch.empty_like(qp).index_copy_(0, perm, qp)
    z = zero.to(torch.int32)
    stored = z - 1 if zero_format == "v1" else z
    return GPTQTensors(
        qweight=pack_rows(q, bits),
        qzeros=pack_cols(stored, bits),
        scales=scale.contiguous(),
        g_idx=g_idx.contiguous(),
        bits=bits,
        group_size=group_size,
        zero_format=zero_format,
    )


def random_gptq(
    k: int,
    n: int,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    zero_format: ZeroFormat = "v1",
    generator: torch.Generator | None = None,
) -> GPTQTensors:
    """A realistic random layer, fast at any size (CPU tensors; ``.to(device)`` for GPU tests).

    Uniform random 32-bit words are exactly uniform q values in every packed field, so qweight is
    drawn directly. Zeros are uniform over what the quantizer can emit (v1: 1..2**bits-1, v2:
    0..2**bits-1), scales log-uniform in [1e-2, 1e-1], g_idx from a random permutation with
    ``act_order`` (always present, as AutoGPTQ stores it).
    """
    if zero_format not in ZERO_FORMATS:
        raise InvalidProblemError(f"zero_format={zero_format!r} must be one of {ZERO_FORMATS}")
    problem = Problem(k, n, bits, group_size, bool(act_order))
    g = problem.groups
    maxq = (1 << bits) - 1
    qweight = torch.randint(-(1 << 31), 1 << 31, (k * bits // 32, n), dtype=torch.int64,
                            generator=generator).to(torch.int32)
    lo = 1 if zero_format == "v1" else 0
    z = torch.randint(lo, maxq + 1, (g, n), dtype=torch.int32, generator=generator)
    stored = z - 1 if zero_format == "v1" else z
    scales = torch.exp(torch.empty((g, n)).uniform_(-2.0, -1.0, generator=generator)
                       * torch.log(torch.tensor(10.0))).to(torch.float16)
    if act_order:
        g_idx = act_order_g_idx(torch.randperm(k, generator=generator), group_size)
    else:
        g_idx = torch.arange(k, dtype=torch.int32)
        g_idx = torch.zeros_like(g_idx) if group_size == -1 else g_idx // group_size
    return GPTQTensors(qweight, pack_cols(stored, bits), scales, g_idx, bits, group_size, zero_format)
