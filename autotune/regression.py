"""The comparison and its regression rule (`is_regression`), per (problem, M):

    B/A > 1 + threshold   AND   (B - A) > spread_A + spread_B

The ratio test says the slowdown matters; the spread test says it is not noise (the spreads are
interquartile ranges of the repeats, so two runs of one config rarely differ by more than both
spreads together). Both must hold for a flag. The mirror image is reported as `faster`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gemmtune.autotune.results import SCHEMA_VERSION, BenchResults, CompareError, Point

COMPARISON_FORMAT = "gemmtune-compare"
DEFAULT_THRESHOLD = 0.03



def geomean(values: Iterable[float]) -> float:
    """Geometric mean (the right average of ratios: 2x slower and 2x faster cancel)."""
    xs = list(values)
    if not xs:
        return float("nan")
    if any(x <= 0 for x in xs):
        raise ValueError("geometric mean of non-positive values")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def is_regression(a: Point, b: Point, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """B is slower than A by more than `threshold` (relative) AND by more than both measured
    spreads together (absolute): a difference inside the noise is never flagged."""
    return b.median_us / a.median_us > 1 + threshold and \
        (b.median_us - a.median_us) > a.spread_us + b.spread_us


def is_improvement(a: Point, b: Point, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """The mirror of `is_regression` (reported, never fails the run)."""
    return a.median_us / b.median_us > 1 + threshold and \
        (a.median_us - b.median_us) > a.spread_us + b.spread_us


@dataclass(frozen=True)
class Row:
    problem_key: str
    layers: tuple[str, ...]
    m: int
    a: Point
    b: Point
    regression: bool
    improvement: bool

    @property
    def ratio(self) -> float:
        return self.b.median_us / self.a.median_us

    @property
    def flag(self) -> str:
        return "REGRESSION" if self.regression else ("faster" if self.improvement else "")


@dataclass
class Comparison:
    a: BenchResults
    b: BenchResults
    rows: list[Row]
    threshold: float
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    @property
    def improvements(self) -> list[Row]:
        return [r for r in self.rows if r.improvement]

    @property
    def geomean(self) -> float:
        return geomean(r.ratio for r in self.rows)

    def geomean_by_problem(self) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for r in self.rows:
            groups.setdefault(r.problem_key, []).append(r.ratio)
        return {k: geomean(v) for k, v in groups.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": COMPARISON_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "threshold": self.threshold,
            "rule": "regression: B/A > 1 + threshold and B - A > spread_A + spread_B",
            "geomean_ratio": self.geomean,
            "geomean_ratio_by_problem": self.geomean_by_problem(),
            "regressions": len(self.regressions),
            "warnings": list(self.warnings),
            "left_out": list(self.left_out),
            "rows": [{"problem_key": r.problem_key, "m": r.m, "a_us": r.a.median_us,
                      "a_spread_us": r.a.spread_us, "b_us": r.b.median_us,
                      "b_spread_us": r.b.spread_us, "a_path": r.a.path, "b_path": r.b.path,
                      "ratio": r.ratio, "flag": r.flag} for r in self.rows],
            "a": self.a.to_json(),
            "b": self.b.to_json(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


def _describe(r: BenchResults) -> str:
    return f"{r.label} ({r.device.get('name', '?')}, {r.fingerprint[:8]}, kernel {r.kernel_hash[:12]})"


def compare_results(a: BenchResults, b: BenchResults,
                    threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Per (problem, M) present in both, in A's order. Different cards or kernel builds are a
    warning (the comparison still runs: that may be the point); what only one side has is
    listed in `left_out`."""
    if not threshold >= 0 or not math.isfinite(threshold):
        raise CompareError(f"threshold must be a non-negative number, got {threshold!r}")
    warnings = []
    if a.fingerprint != b.fingerprint:
        warnings.append(f"A and B were measured on different cards: {_describe(a)} vs {_describe(b)}")
    if a.kernel_hash != b.kernel_hash:
        warnings.append(f"A and B were measured with different kernel builds: "
                        f"{a.kernel_hash[:12]} vs {b.kernel_hash[:12]}")
    bmap = b.by_key()
    amap = a.by_key()
    rows: list[Row] = []
    left_out: list[str] = []
    only_a = [k for k in amap if k not in bmap]
    only_b = [k for k in bmap if k not in amap]
    if only_a:
        left_out.append(f"only in A: {', '.join(only_a)}")
    if only_b:
        left_out.append(f"only in B: {', '.join(only_b)}")
    for key, pa in amap.items():
        pb = bmap.get(key)
        if pb is None:
            continue
        ms_a, ms_b = set(pa.points), set(pb.points)
        if ms_a - ms_b:
            left_out.append(f"{key}: M {','.join(map(str, sorted(ms_a - ms_b)))} only in A")
        if ms_b - ms_a:
            left_out.append(f"{key}: M {','.join(map(str, sorted(ms_b - ms_a)))} only in B")
        layers = pa.layers or pb.layers
        for m in sorted(ms_a & ms_b):
            x, y = pa.points[m], pb.points[m]
            rows.append(Row(key, layers, m, x, y, is_regression(x, y, threshold),
                            is_improvement(x, y, threshold)))
    if not rows:
        raise CompareError("A and B have no (shape, M) in common: nothing to compare")
    return Comparison(a, b, rows, threshold, warnings, left_out)
