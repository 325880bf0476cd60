"""`Problem`: one quantized linear layer shape, the unit everything is tuned for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidProblemError

SUPPORTED_BITS = (2, 3, 4, 8)
"""Bit widths the GPTQ format code (pack/unpack/reference) handles."""

KERNEL_BITS = (4, 8)
"""Bit widths the CUDA kernels handle (2/3-bit layers take the CPU reference path only)."""

PROBLEM_FIELDS = ("k", "n", "bits", "group_size", "act_order")
"""A problem's fields, as `to_dict` spells them."""

SUPPORTED_GROUPS = (-1, 32, 64, 128)
"""Group sizes; -1 means one group per column (per-channel scales)."""


@dataclass(frozen=True, order=True)
class Problem:
    """A GEMM `C[M,N] = A[M,K] @ dequant(W)[K,N]` with GPTQ weights; M varies at run time."""

    k: int
    n: int
    bits: int = 4
    group_size: int = 128
    act_order: bool = False

    @property
    def has_kernel(self) -> bool:
        """Whether the CUDA kernels run this problem; a layer without one (2/3 bits) takes the
        dense reference path everywhere (dequantized once, then `F.linear`), so no config,
        tuned or default, ever applies to it."""
        return self.bits in KERNEL_BITS

    def __post_init__(self) -> None:
        for name in ("k", "n", "bits", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidProblemError(f"Problem.{name} must be an int, got {value!r}")
        if not isinstance(self.act_order, bool):
            raise InvalidProblemError(f"Problem.act_order must be a bool, got {self.act_order!r}")
        if self.bits not in SUPPORTED_BITS:
            raise InvalidProblemError(f"bits={self.bits} is not supported (choose from {SUPPORTED_BITS})")
        if self.group_size not in SUPPORTED_GROUPS:
            raise InvalidProblemError(
                f"group_size={self.group_size} is not supported (choose from {SUPPORTED_GROUPS})"
            )
        if self.k <= 0 or self.n <= 0:
            raise InvalidProblemError(f"K and N must be positive, got K={self.k} N={self.n}")
        if self.k > 1 << 20 or self.n > 1 << 20:
            raise InvalidProblemError(f"K={self.k} N={self.n} exceeds the supported 2**20")
        if self.k % 32:
            raise InvalidProblemError(f"K={self.k} must be a multiple of 32 (qweight packs 32 bits of K)")
        if self.group_size != -1 and self.k % self.group_size:
            raise InvalidProblemError(f"K={self.k} is not a multiple of group_size={self.group_size}")
        per_word = 32 // self.bits if self.bits != 3 else 32
        if self.n % per_word:
            raise InvalidProblemError(
                f"N={self.n} must be a multiple of {per_word} for {self.bits}-bit qzeros packing"
            )

    @property
    def groups(self) -> int:
        """Number of quantisation groups along K."""
        return 1 if self.group_size == -1 else self.k // self.group_size

    @property
    def effective_group(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    def key(self) -> str:
        """Stable string used by the database, profiles and caches."""
        act = "-act" if self.act_order else ""
        return f"{self.k}x{self.n}-b{self.bits}-g{self.group_size}{act}"

    @classmethod
    def from_key(cls, key: str) -> Problem:
        try:
            shape, bits, group, *rest = key.split("-")
            k, n = shape.split("x")
            if not bits.startswith("b") or not group.startswith("g") or rest not in ([], ["act"]):
                raise ValueError
            return cls(int(k), int(n), int(bits[1:]), int(group[1:]), rest == ["act"])
        except (ValueError, TypeError):
            raise InvalidProblemError(f"not a problem key: {key!r} (expected e.g. 4096x4096-b4-g128)") from None

    def to_dict(self) -> dict[str, Any]:
        """The problem as the database, profiles and results files spell it."""
        return {"k": self.k, "n": self.n, "bits": self.bits, "group_size": self.group_size,
                "act_order": self.act_order}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        """Strict: exactly the fields of `to_dict`, validated as the constructor does."""
        if not isinstance(data, Mapping):
            raise InvalidProblemError(f"a problem must be an object, got {type(data).__name__}")
        names = set(PROBLEM_FIELDS)
        if set(data) != names:
            extra, missing = sorted(set(data) - names), sorted(names - set(data))
            raise InvalidProblemError("problem fields: " + "; ".join(
                part for part in (f"unknown {', '.join(extra)}" if extra else "",
                                  f"missing {', '.join(missing)}" if missing else "") if part))
        return cls(**data)

    def weight_bytes(self) -> int:
        """Bytes of qweight + scales + qzeros as stored in a checkpoint."""
        q = self.k * self.n * self.bits // 8
        return q + self.groups * self.n * 2 + self.groups * self.n * self.bits // 8

    def __str__(self) -> str:
        return self.key()
