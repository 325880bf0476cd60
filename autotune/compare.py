"""`gemmtune bench` / `gemmtune compare`: measure configurations per (layer shape, M) and catch
regressions before users do.

Why: the ExLlamaV2 0.0.11 -> 0.0.12 change (fused threshold 50 -> 32, rows per block 8 -> 4)
shipped a 30-50 % decode slowdown that users found and the project bisected by hand. Comparing
two configurations per (problem, M) on the same card says at once *which* shapes and batch sizes
got slower, and `compare` exits 1 on a regression so it can gate an engine's CI.

The pieces, one module each (GPU imports stay inside the two `measure_*` functions, so
everything else runs on CPU); this module is their one public face (`cmp.X`) and holds the
command-line parsing of thresholds and Ms:

- `results.py`: results files (`BenchResults`), versioned JSON, validated field by field.
- `sources.py`: what a SOURCE means (`resolve_source`): tuned, a preset, a profile, a results file.
- `benchmark.py`: measuring a source per (problem, M), each M with the config of its band.
- `regression.py`: the comparison (`compare_results`) and the regression rule (`is_regression`).
- `reports.py`: Markdown (`render_markdown`) and the PNG plot (`plot`).
"""

from __future__ import annotations

import math

from gemmtune.autotune.benchmark import ProgressFn, measure_dispatch, measure_interleaved
from gemmtune.autotune.regression import (
    COMPARISON_FORMAT,
    DEFAULT_THRESHOLD,
    Comparison,
    Row,
    compare_results,
    geomean,
    is_improvement,
    is_regression,
)
from gemmtune.autotune.reports import (
    PLOT_INSTALL_HINT,
    check_output,
    check_plot,
    pct,
    plot,
    render_markdown,
)
from gemmtune.autotune.results import (
    PATHS,
    PROFILE_FORMAT,
    RESULTS_FORMAT,
    SCHEMA_VERSION,
    BenchResults,
    CompareError,
    Point,
    ProblemBench,
    command_line,
    load_results,
    path_for,
    results_from_json,
    write_text_atomically,
)
from gemmtune.autotune.sources import (
    SOURCE_KINDS,
    ResolvedSource,
    classify_source,
    compare_inputs,
    resolve_source,
)
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.workload import Workload

__all__ = [
    "COMPARISON_FORMAT", "DEFAULT_MS", "DEFAULT_THRESHOLD", "PATHS", "PLOT_INSTALL_HINT", "PROFILE_FORMAT",
    "RESULTS_FORMAT", "SCHEMA_VERSION", "SOURCE_KINDS", "BenchResults", "CompareError",
    "Comparison", "Point", "ProblemBench", "ProgressFn", "ResolvedSource", "Row",
    "check_output", "check_plot", "classify_source", "command_line", "compare_inputs", "compare_results", "geomean", "is_improvement",
    "is_regression", "load_results", "measure_dispatch", "measure_interleaved", "parse_ms",
    "parse_threshold", "path_for", "pct", "plot", "render_markdown", "resolve_source",
    "results_from_json", "write_text_atomically",
]

DEFAULT_MS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
"""Decode (1..8), batched decode and speculative steps (12..64), prefill chunks (128..512): dense
where the fused/reconstruct switch of real configs lies (32, 50, 64)."""


def parse_threshold(text: str) -> float:
    """`3%`, `3 %` or `0.03` -> 0.03. A bare number must be a fraction below 1: `5` is far more
    likely a percentage without its sign than a 500 % threshold, and read as the latter it would
    turn a CI gate off without a word."""
    t = str(text).strip()
    percent = t.endswith("%")
    try:
        value = float(t[:-1].strip()) / 100 if percent else float(t)
    except ValueError:
        raise CompareError(f"threshold {text!r}: expected a fraction (0.03) or a percentage (3%)") from None
    if not percent and value >= 1:
        raise CompareError(f"threshold {text!r}: a bare number is a fraction below 1 (0.05); "
                           f"for a percentage write {t}%")
    if not math.isfinite(value) or value < 0 or value >= 10:
        raise CompareError(f"threshold {text!r} is out of range (0 to 1000 %)")
    return value


def parse_ms(text: str | None, workload: str | None = None) -> tuple[int, ...]:
    """`--m` (a list `1,2,4`, weighted `1:4,512:1` whose weights are ignored, or a workload name)
    or `--workload decode|prefill|mixed`; neither: DEFAULT_MS."""
    if text and workload:
        raise CompareError("give --m or --workload, not both")
    spec = text or workload
    if not spec:
        return DEFAULT_MS
    try:
        wl = Workload.parse(spec)
    except GemmtuneError as exc:
        raise CompareError(str(exc)) from None
    return tuple(sorted(wl.ms))
