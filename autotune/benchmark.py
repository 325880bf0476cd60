"""Measuring a source per (problem, M) on this GPU: the only GPU part of bench/compare (through
`study.make_evaluator`, looked up at call time so tests can replace it; imports are lazy)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gemmtune.autotune.results import BenchResults, Point, ProblemBench, path_for
from gemmtune.autotune.sources import ResolvedSource
from gemmtune.db.resolve import Resolution
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload

ProgressFn = Callable[[int, int, str], None]
"""on_progress(done, total, what): problems finished so far, of total, and what runs next."""


def _points(config: KernelConfig, ms: Mapping[int, Any]) -> dict[int, Point]:
    return {m: Point(m, float(x.median_us), float(x.spread_us), int(x.repeats), path_for(config, m))
            for m, x in ms.items()}


def _bench(problem: Problem, config: KernelConfig, points: dict[int, Point],
           layers: tuple[str, ...], res: Resolution[KernelConfig], provenance: str) -> ProblemBench:
    bands = res.bands if len(res.bands) > 1 else ()
    return ProblemBench(problem, config, points, layers, provenance, bands)


def _segments(ms: Sequence[int], *sides: Resolution[KernelConfig]
              ) -> list[tuple[tuple[int, ...], tuple[KernelConfig, ...]]]:
    """`ms` in runs over which every side's config stays the same: each run is measured with
    its own evaluator (one workload of those Ms), so every M runs the config its band serves."""
    runs: list[tuple[list[int], tuple[KernelConfig, ...]]] = []
    for m in sorted(set(ms)):
        configs = tuple(r.config_at(m) for r in sides)
        if runs and runs[-1][1] == configs:
            runs[-1][0].append(m)
        else:
            runs.append(([m], configs))
    return [(tuple(run), configs) for run, configs in runs]


def _workload(ms: Sequence[int]) -> Workload:
    return Workload("bench", tuple(ms), tuple(1.0 for _ in ms))


def measure_dispatch(
    label: str,
    problems: Mapping[Problem, Sequence[str]],
    source: ResolvedSource,
    ms: Sequence[int],
    *,
    device_index: int = 0,
    check: bool = True,
    on_progress: ProgressFn | None = None,
) -> BenchResults:
    """Whole-dispatch time of the source's config per (problem, M) -- at each M the config of
    the band that serves it -- each path checked against the reference first when `check` (the
    tuner's harness: `CudaEvaluator.dispatch`)."""
    from gemmtune.autotune import study

    device, khash = study.device_identity(device_index)
    out: list[ProblemBench] = []
    order = list(problems)
    for i, problem in enumerate(order):
        if on_progress:
            on_progress(i, len(order), problem.key())
        res = source.bands[problem]
        points: dict[int, Point] = {}
        for run, (cfg,) in _segments(ms, res):
            ev = study.make_evaluator(problem, _workload(run), device_index)
            try:
                device, khash = ev.device, ev.kernel_hash
                points.update(_points(cfg, ev.dispatch(cfg, check=check)))
            finally:
                ev.close()
        out.append(_bench(problem, res.bands[-1].config, points, tuple(problems[problem]), res,
                          source.provenance.get(problem, "")))
    if on_progress:
        on_progress(len(order), len(order), "")
    return BenchResults(label, device.to_dict(), khash, out, provenance=_provenance_summary(source))


def measure_interleaved(
    labels: tuple[str, str],
    problems: Mapping[Problem, Sequence[str]],
    a: ResolvedSource,
    b: ResolvedSource,
    ms: Sequence[int],
    *,
    device_index: int = 0,
    rounds: int = 15,
    on_progress: ProgressFn | None = None,
) -> tuple[BenchResults, BenchResults]:
    """A and B per (problem, M), measured A B A B ... on the same card with the same weights
    and activations: drift between two separate runs cannot masquerade as a regression. At
    each M each side runs the config of the band that serves it."""
    from gemmtune.autotune import study

    device, khash = study.device_identity(device_index)
    out_a: list[ProblemBench] = []
    out_b: list[ProblemBench] = []
    order = list(problems)
    for i, problem in enumerate(order):
        if on_progress:
            on_progress(i, len(order), problem.key())
        ra, rb = a.bands[problem], b.bands[problem]
        pa: dict[int, Point] = {}
        pb: dict[int, Point] = {}
        for run, (ca, cb) in _segments(ms, ra, rb):
            ev = study.make_evaluator(problem, _workload(run), device_index)
            try:
                device, khash = ev.device, ev.kernel_hash
                ta, tb = ev.interleaved(ca, cb, rounds=rounds)
            finally:
                ev.close()
            pa.update(_points(ca, ta))
            pb.update(_points(cb, tb))
        layers = tuple(problems[problem])
        out_a.append(_bench(problem, ra.bands[-1].config, pa, layers, ra,
                            a.provenance.get(problem, "")))
        out_b.append(_bench(problem, rb.bands[-1].config, pb, layers, rb,
                            b.provenance.get(problem, "")))
    if on_progress:
        on_progress(len(order), len(order), "")
    d = device.to_dict()
    return (BenchResults(labels[0], d, khash, out_a, _provenance_summary(a), mode="interleaved"),
            BenchResults(labels[1], d, khash, out_b, _provenance_summary(b), mode="interleaved"))


def _provenance_summary(src: ResolvedSource) -> str:
    if src.kind == "preset":
        return f"built-in preset {src.label}"
    kinds = {"tuned": "tuning database", "profile": f"profile {src.label}"}
    text = kinds.get(src.kind, src.label)
    return text + (f" ({src.note})" if src.note else "")
