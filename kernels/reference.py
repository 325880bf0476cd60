"""CPU reference math for GPTQ and AWQ layers: the oracle of every GPU test and of the tuner's gate.

Why it is shaped like this: a tuned variant is only stored if it agrees with this module on fresh
random data, so the reference must be exact (no fp16 anywhere in :func:`gemm`) and quick enough to
run per trial (vectorised torch; the grouped fast path avoids a [K, N] gather when rows are not
act-ordered). :func:`gemm_fp16_like` and :func:`fp16_tolerance` describe what a correct fp16 engine
may legitimately differ by, so the gate neither rejects good kernels nor accepts broken ones.
"""

from __future__ import annotations

import math

import torch

from .awq import AWQTensors, unpack_awq
from .errors import InvalidTensorError
from .gptq import GPTQTensors, unpack_rows, zeros

FP16_UNIT_ROUNDOFF = 2.0**-11
"""Unit roundoff u of IEEE half precision (10 stored mantissa bits, round to nearest)."""


def dequantize(t: GPTQTensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]`` as ``dtype[K, N]``.

    Computed in float32 (float64 when asked): ``q - zero`` is a small integer and the fp16 scale
    has 11 significant bits, so every product is exact there; a float16 result is therefore the
    correctly rounded product.
    """
    t.validate(require_cpu=True)
    if not dtype.is_floating_point:
        raise InvalidTensorError(f"dequantize needs a floating dtype, got {dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    k, n, g = t.k, t.n, t.groups
    q = unpack_rows(t.qweight, t.bits, k)
    z = zeros(t)
    s = t.scales.to(work)
    if t.g_idx is None or not t.act_order:
        # Rows of a group are contiguous: broadcast [G, 1, N] instead of gathering [K, N].
        gs = k // g
        qg = q.view(g, gs, n).to(work)
        w = (qg - z.to(work).unsqueeze(1)) * s.unsqueeze(1)
        w = w.view(k, n)
    else:
        gi = t.g_idx.to(torch.int64)
        w = (q - z.index_select(0, gi)).to(work) * s.index_select(0, gi)
    return w if w.dtype == dtype else w.to(dtype)


def dequantize_awq(a: AWQTensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W[k, n] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]`` from AWQ's
    own tensors (nibbles in AWQ's order, zeros as stored), as ``dtype[K, N]``.

    Deliberately not via `awq.to_gptq`: this is the oracle that conversion is checked against.
    Exact for the same reason as :func:`dequantize`.
    """
    a.validate(require_cpu=True)
    if not dtype.is_floating_point:
        raise InvalidTensorError(f"dequantize_awq needs a floating dtype, got {dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    k, n, g = a.k, a.n, a.groups
    q = unpack_awq(a.qweight).view(g, k // g, n).to(work)
    z = unpack_awq(a.qzeros).to(work).unsqueeze(1)
    w = ((q - z) * a.scales.to(work).unsqueeze(1)).view(k, n)
    return w if w.dtype == dtype else w.to(dtype)


def _check_a(a: torch.Tensor, t: GPTQTensors) -> None:
    if not isinstance(a, torch.Tensor):
        raise InvalidTensorError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if not a.dtype.is_floating_point:
        raise InvalidTensorError(f"a must be a floating tensor, got {a.dtype}")
    if a.dim() != 2 or a.shape[1] != t.k:
        raise InvalidTensorError(f"a must have shape [M, K={t.k}], got {tuple(a.shape)}")
    if a.device.type != "cpu":
        raise InvalidTensorError(f"a is on {a.device}; the reference needs CPU tensors")


def gemm(a: torch.Tensor, t: GPTQTensors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The oracle: ``C[M, N] = a[M, K] @ dequantize(t)`` entirely in ``dtype`` (float64 default)."""
    _check_a(a, t)
    return a.to(dtype) @ dequantize(t, dtype)


def gemm_fp16_like(a: torch.Tensor, t: GPTQTensors) -> torch.Tensor:
    """What an fp16 engine returns: activations and dequantized weight in fp16, products summed
    in fp32, the result rounded to fp16. A model of correct output, not the oracle."""
    _check_a(a, t)
    w16 = dequantize(t, torch.float16)
    return (a.to(torch.float16).float() @ w16.float()).to(torch.float16)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius, in float64). Any NaN/inf in ``out`` gives inf, so
    a broken kernel can never pass a tolerance check; ``ref == 0`` gives 0 or inf."""
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise InvalidTensorError("relative_error takes two tensors")
    if out.shape != ref.shape:
        raise InvalidTensorError(f"shapes differ: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(o).all()):
        return math.inf
    num = float(torch.linalg.vector_norm(o - r))
    den = float(torch.linalg.vector_norm(r))
    if math.isnan(num) or math.isnan(den):
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def fp16_tolerance(k: int) -> float:
    """Largest :func:`relative_error` (against the float64 :func:`gemm`) a *correct* fp16 kernel
    may show for reduction length ``k``.

    Budget, with u = 2**-11: the fp16 weight and fp16 output each round once (<= u each, relative,
    in norm), and the worst realistic accumulation, a sequential fp16 sum over all of K (as
    ExLlama's half2 dot products plus fp16 atomics do), adds rounding errors that grow like a
    random walk: at most about ``u * sqrt(k / 3)`` (~0.58 u sqrt(k)) relative, measured ~0.3 u
    sqrt(k) on random layers (tests/test_reference.py simulates it). We allow ``4u + u*sqrt(k)``:
    ~0.033 at k=4096, ~0.085 at k=28672. A wrong layout, group mapping or act-order gives O(1)
    error and a v1/v2 zero mix-up ~0.2 at 4 bits, both far outside; at 8 bits an off-by-one zero
    is only ~1.5 % and needs :func:`fp32_accum_tolerance` to be caught, so hold kernels that
    accumulate in fp32 to that one.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InvalidTensorError(f"k must be a positive int, got {k!r}")
    u = FP16_UNIT_ROUNDOFF
    return 4 * u + u * math.sqrt(k)


def fp32_accum_tolerance(k: int) -> float:
    """Tolerance for kernels that accumulate in fp32 and round to fp16 once (or a few times).

    fp16 weight and output rounding (<= u each) plus fp32 accumulation (negligible), with a 4x
    margin: ``8u`` ~ 3.9e-3 regardless of ``k`` (``k`` kept for a uniform signature).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InvalidTensorError(f"k must be a positive int, got {k!r}")
    return 8 * FP16_UNIT_ROUNDOFF
