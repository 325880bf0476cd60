"""The winner rule: which plan over M bands is stored.

The winner must not make any M of the workload slower than the default: a better weighted sum
that costs one M (say decode at M = 1) is a regression for someone. The rule applies to the
plan's dispatch latencies (each M with its band's config). Candidates (`candidates`): first the
plan over M bands of all finished trials' memoised measurements (`bands.plan_bands`, built
under a per-M cap of the default's memoised latency plus SEARCH_SLACK, so it passes the screen
by construction), then the single-config candidates of the ranked trials screened per M on the
memo (`screen`, one band each: the answer before plans, kept as the fallback). Each is
re-measured interleaved against the default (`interleaved_check`, each M with its band's
config); the first that holds is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from gemmtune.autotune.bands import MAX_BANDS, BandPlan, measured_from_trials, plan_bands
from gemmtune.autotune.evaluator import Evaluator, Measurement, TrialFailure
from gemmtune.autotune.objective import dispatch_latencies
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.workload import Workload
from optuna.trial import FrozenTrial, TrialState

SEARCH_SLACK = 0.02
"""Screening on memoised (single-shot) measurements: a candidate may be this much slower than
the default at one M and still go to the final, interleaved check."""

FINAL_SLACK = 0.03
"""Final check: slower than the default by more than this *and* more than the two measured
spreads at any M rejects a candidate."""

FINAL_CANDIDATES = 3
"""Candidates re-measured interleaved before giving up (each costs one pass over the workload)."""


def default_memo(candidates: list[FrozenTrial], evaluator: Evaluator, default: KernelConfig,
                 workload: Workload) -> dict[int, float] | None:
    """The default's own dispatch (its threshold) per M from what the enqueued default trial
    recorded, else from the evaluator's memo; None when it cannot be measured. The final
    interleaved check is the authority; this only screens."""
    got = next((trial_latencies(t, default, workload) for t in candidates
                if t.user_attrs.get("preset") == "default"), None)
    if got is None:  # the default is not a point of this space
        try:
            got = dispatch_latencies(evaluator, default)
        except (TrialFailure, GemmtuneError):
            got = None
    return got


def screen(candidates: list[FrozenTrial], best: FrozenTrial, evaluator: Evaluator,
           default: KernelConfig, workload: Workload,
           dlat_memo: dict[int, float] | None = None) -> list[tuple[FrozenTrial, KernelConfig]]:
    """Up to FINAL_CANDIDATES of the ranked trials no slower than the default at any M (within
    SEARCH_SLACK) on what they recorded; `best` alone when none passes. `dlat_memo`: the
    default's memoised latencies when the caller has them (`default_memo`)."""
    if dlat_memo is None:
        dlat_memo = default_memo(candidates, evaluator, default, workload)
    screened: list[tuple[FrozenTrial, KernelConfig]] = []
    for t in candidates:
        cfg = config_of(t)
        assert cfg is not None
        if dlat_memo is not None:
            lat_memo = trial_latencies(t, cfg, workload)
            if lat_memo is None or not per_m_ok(lat_memo, dlat_memo, SEARCH_SLACK):
                continue
        screened.append((t, cfg))
        if len(screened) >= FINAL_CANDIDATES:
            break
    if not screened:
        screened = [(best, config_of(best))]  # type: ignore[list-item]
    return screened


def candidates(ranked_trials: list[FrozenTrial], best: FrozenTrial, evaluator: Evaluator,
               default: KernelConfig, workload: Workload, max_bands: int = MAX_BANDS
               ) -> list[BandPlan]:
    """What the final check tries, in order (at most FINAL_CANDIDATES, distinct): the plan over
    M bands of every finished trial's memo, then the screened single-config candidates. Each
    plan's `objective_us` is its objective on the memo (the search's figure)."""
    dlat = default_memo(ranked_trials, evaluator, default, workload)
    rows, recon = measured_from_trials(ranked_trials)
    cap = None if dlat is None else {m: v * (1 + SEARCH_SLACK) for m, v in dlat.items()}
    out: list[BandPlan] = []
    plan = plan_bands(rows, recon, workload, cap=cap, max_bands=max_bands)
    if plan is not None:
        out.append(plan)
    for t, cfg in screen(ranked_trials, best, evaluator, default, workload, dlat):
        one = BandPlan.single(cfg, trial_latencies(t, cfg, workload),
                              float(t.value) if t.value is not None else math.nan)
        if all(p.bands != one.bands for p in out):
            out.append(one)
    return out[:FINAL_CANDIDATES]


@dataclass(frozen=True)
class Verdict:
    """The final check of one candidate against the default, re-measured interleaved."""

    accepted: bool
    latencies_us: dict[int, float]
    default_latencies_us: dict[int, float]
    objective_us: float
    default_objective_us: float
    why: str = ""


def interleaved_check(evaluator: Evaluator, candidate: BandPlan | KernelConfig,
                      default: KernelConfig, workload: Workload, rounds: int) -> Verdict:
    """Accept `candidate` (a plan, or one config) when its objective is not above the default's
    and no M is slower by more than FINAL_SLACK and the two spreads. Each band is measured on
    its own Ms, interleaved with the default at the same Ms, so every M is measured once per
    side. Raises TrialFailure/GemmtuneError when it cannot be measured."""
    plan = candidate if isinstance(candidate, BandPlan) else BandPlan.single(candidate)
    a_meas: dict[int, Measurement] = {}
    b_meas: dict[int, Measurement] = {}
    groups = plan.groups(workload.ms)
    for cfg, ms in groups:
        a, b = (evaluator.interleaved(cfg, default, rounds) if len(groups) == 1 else
                evaluator.interleaved(cfg, default, rounds, ms=ms))
        a_meas.update({m: a[m] for m in ms})
        b_meas.update({m: b[m] for m in ms})
    lat = {m: a_meas[m].median_us for m in workload.ms}
    dlat = {m: b_meas[m].median_us for m in workload.ms}
    obj, dobj = workload.objective(lat), workload.objective(dlat)
    noise = {m: a_meas[m].spread_us + b_meas[m].spread_us for m in workload.ms}
    slower = [m for m in workload.ms
              if lat[m] > dlat[m] * (1 + FINAL_SLACK) and lat[m] - dlat[m] > noise[m]]
    accepted = obj <= dobj and not slower
    why = ""
    if not accepted:
        why = (f"best ({obj:.1f} µs) was slower than the default ({dobj:.1f} µs) when "
               "re-measured interleaved" if obj > dobj else
               f"slower than the default at M = {', '.join(map(str, slower))}")
    return Verdict(accepted, lat, dlat, obj, dobj, why)


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and "config" in t.user_attrs]
    done.sort(key=lambda t: (t.value, t.number))
    seen: set[str] = set()
    out = []
    for t in done:  # duplicates of one variant are one candidate
        key = str(t.user_attrs["config"])
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def trial_latencies(t: FrozenTrial, cfg: KernelConfig, workload: Workload) -> dict[int, float] | None:
    """Per-M dispatch latency of a finished trial from what it recorded (no measurement)."""
    measured = t.user_attrs.get("measured") or {}
    fused, recon = measured.get("fused_us", {}), measured.get("recon_us", {})
    out = {}
    for m in workload.ms:
        v = fused.get(str(m)) if m <= cfg.max_q_gemm_rows else recon.get(str(m))
        if v is None:
            return None
        out[m] = float(v)
    return out


def per_m_ok(lat: dict[int, float], dlat: dict[int, float], slack: float) -> bool:
    return all(lat[m] <= dlat[m] * (1 + slack) for m in dlat)


def config_of(trial: FrozenTrial | None) -> KernelConfig | None:
    if trial is None or "config" not in trial.user_attrs:
        return None
    return KernelConfig.from_dict(dict(trial.user_attrs["config"]))
