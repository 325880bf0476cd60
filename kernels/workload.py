"""`Workload`: how often each M occurs; the tuning objective is the weighted latency sum."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidProblemError

MAX_M = 65536

GRAPHED_MAX_M = 128
"""The largest M assumed to run inside a CUDA graph. Decode steps, up to 128 sequences a batch,
replay one (torch.compile's reduce-overhead mode, the serving engines); a larger call is a chunk
of a prompt, and prompts vary in length, so users run them eagerly and every launch pays its
host cost. The tuner times Ms above this eagerly (`autotune/timing.py`)."""


@dataclass(frozen=True)
class Workload:
    name: str
    ms: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.ms:
            raise InvalidProblemError("a workload needs at least one M")
        if len(self.ms) != len(self.weights):
            raise InvalidProblemError("workload ms and weights differ in length")
        if len(set(self.ms)) != len(self.ms):
            raise InvalidProblemError(f"workload {self.name!r} repeats an M")
        for m in self.ms:
            if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_M:
                raise InvalidProblemError(f"workload M={m!r} must be an int in 1..{MAX_M}")
        for w in self.weights:
            if not isinstance(w, (int, float)) or not w > 0 or w != w or w == float("inf"):
                raise InvalidProblemError(f"workload weight {w!r} must be a positive finite number")

    def key(self) -> str:
        """`decode`, `prefill`, `mixed`, or the explicit `m1:1,m4:0.5` spelling."""
        if self.name in WORKLOADS and WORKLOADS[self.name] == self:
            return self.name
        return ",".join(f"{m}:{w:g}" for m, w in zip(self.ms, self.weights, strict=True))

    @property
    def pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(zip(self.ms, self.weights, strict=True))

    @staticmethod
    def eager(m: int) -> bool:
        """Whether calls of M rows run eagerly (prefill) rather than inside a CUDA graph."""
        return m > GRAPHED_MAX_M

    def objective(self, latency_us: dict[int, float]) -> float:
        """Weighted sum of per-M latencies (µs)."""
        return sum(w * latency_us[m] for m, w in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        """The workload as the database, profiles and results files spell it."""
        return {"name": self.name, "ms": list(self.ms), "weights": [float(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workload:
        try:
            return cls(data["name"], tuple(data["ms"]), tuple(data["weights"]))
        except (KeyError, TypeError) as exc:
            raise InvalidProblemError(f"a workload needs name, ms and weights ({exc})") from None

    @classmethod
    def parse(cls, text: str) -> Workload:
        """A preset name, a list of Ms (`1,2,4`), or weighted Ms (`1:4,512:1`)."""
        text = text.strip()
        if text in WORKLOADS:
            return WORKLOADS[text]
        ms: list[int] = []
        weights: list[float] = []
        try:
            for part in text.split(","):
                part = part.strip()
                if not part:
                    continue
                m, _, w = part.partition(":")
                ms.append(int(m))
                weights.append(float(w) if w else 1.0)
        except ValueError:
            raise InvalidProblemError(
                f"workload {text!r}: expected {', '.join(WORKLOADS)} or a list like 1,2,4 or 1:4,512:1"
            ) from None
        wl = cls("custom", tuple(ms), tuple(weights))
        return wl


def _even(name: str, ms: tuple[int, ...]) -> Workload:
    return Workload(name, ms, tuple(1.0 for _ in ms))


WORKLOADS: dict[str, Workload] = {
    # Token-by-token generation with a batch of 1..8 sequences.
    "decode": _even("decode", (1, 2, 3, 4, 5, 6, 7, 8)),
    # Prompt processing in chunks.
    "prefill": _even("prefill", (128, 256, 512, 1024, 2048)),
    # Serving: mostly decode steps, some batched decode, occasional prefill chunks. Weights are
    # per-call frequencies, so a 512-row prefill call counts as often as one decode step.
    "mixed": Workload(
        "mixed",
        (1, 2, 4, 8, 16, 32, 64, 128, 512),
        (8.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5),
    ),
}
