"""The plan over M bands on CPU: the DP against brute force on random memo tables, its rules
(margin, band limit, per-M cap, only the last band reconstructs, Ms between workload Ms), the
stored form and the band rule of entries, the plan read back from a study's trials, and the
runtime's band lookup and kernel preparation per band."""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_left
from types import SimpleNamespace
from typing import Any

import pytest
from gemmtune.autotune.bands import (
    BAND_MARGIN,
    MAX_BANDS,
    BandPlan,
    Measured,
    measured_from_trials,
    plan_bands,
)
from gemmtune.autotune.space import STANDARD
from gemmtune.db.entry import bands_problem
from gemmtune.db.resolve import Band
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.dispatch import Plan
from gemmtune.kernels.workload import Workload
from gemmtune.runtime.quant_linear import _band_ms, band_edges

VARIANTS = list(itertools.islice(STANDARD.variants(), 0, None, 29))[:5]
CHUNKS = (0, 4096)


def _table(seed: int, ms: tuple[int, ...], n_variants: int, holes: bool = True
           ) -> tuple[list[Measured], dict[int, dict[int, float]]]:
    """Random memo: fused times that roughly grow with M (some Ms past a cutoff missing),
    reconstruct times roughly flat."""
    rng = random.Random(seed)
    rows = []
    for v in VARIANTS[:n_variants]:
        base, slope = rng.uniform(3, 10), rng.uniform(0.05, 2.0)
        fused = {m: base + slope * m * rng.uniform(0.7, 1.3) for m in ms}
        if holes and rng.random() < 0.4:  # the fused cutoff stopped this variant early
            stop = rng.randrange(1, len(ms))
            fused = {m: t for m, t in fused.items() if m < sorted(ms)[stop]}
        rows.append(Measured(v, fused))
    recon = {c: {m: rng.uniform(20, 40) + 0.01 * m for m in ms} for c in CHUNKS}
    return rows, recon


def _brute(rows: list[Measured], recon: dict[int, dict[int, float]], wl: Workload, k: int,
           cap: dict[int, float] | None = None) -> float:
    """Cost of the cheapest plan with exactly k bands (the oracle of plan_bands)."""
    return _brute_plan(rows, recon, wl, k, cap)[0]


def _brute_plan(rows: list[Measured], recon: dict[int, dict[int, float]], wl: Workload, k: int,
                cap: dict[int, float] | None = None) -> tuple[float, dict[int, float]]:
    """Cheapest plan with exactly k bands by enumeration: fused prefix, cut points, a variant
    per band, a chunk for the rest; its cost and its latency at each M."""
    w = dict(wl.pairs)
    ms = sorted(w)
    n = len(ms)

    def ok(m: int, t: float | None) -> bool:
        return t is not None and (cap is None or t <= cap[m])

    best: tuple[float, dict[int, float]] = (math.inf, {})
    for t in range(0 if k == 1 else k, n + 1):
        tails = [(sum(w[m] * recon[c][m] for m in ms[t:]), c) for c in recon
                 if all(ok(m, recon[c][m]) for m in ms[t:])]
        if not tails:
            continue
        tail, chunk = min(tails)
        tail_lat = {m: recon[chunk][m] for m in ms[t:]}
        if t == 0:
            if tail < best[0]:
                best = (tail, tail_lat)
            continue
        for cuts in itertools.combinations(range(1, t), k - 1):
            edges = (0, *cuts, t)
            total, lat = tail, dict(tail_lat)
            for a, b in itertools.pairwise(edges):
                seg = [(sum(w[m] * r.fused_us[m] for m in ms[a:b]), i)
                       for i, r in enumerate(rows) if all(ok(m, r.fused_us.get(m)) for m in ms[a:b])]
                cost, i = min(seg, default=(math.inf, -1))
                total += cost
                if i >= 0:
                    lat.update({m: rows[i].fused_us[m] for m in ms[a:b]})
            if total < best[0]:
                best = (total, lat)
    return best


def _check_plan(plan: BandPlan, rows: list[Measured], recon: dict[int, dict[int, float]],
                wl: Workload) -> None:
    """The plan's latencies are the memo's numbers for the path its config takes at each M,
    and its structure is a storable plan."""
    fused = {r.config.variant_key(): r.fused_us for r in rows}
    for m in wl.ms:
        cfg = plan.config_at(m)
        want = (fused[cfg.variant_key()][m] if m <= cfg.max_q_gemm_rows
                else recon[cfg.recon_chunk_n][m])
        assert plan.latencies_us[m] == pytest.approx(want)
    assert plan.objective_us == pytest.approx(wl.objective(plan.latencies_us))
    stored = tuple((m_hi, c.to_dict()) for m_hi, c in plan.bands)
    assert bands_problem(stored, plan.config.to_dict(), list(wl.ms)) is None


WORKLOADS = [Workload.parse("1:8,2:4,4:4,8:2,16:1,64:1,512:0.5"), Workload.parse("1,3,7,20,90"),
             Workload.parse("1:3,2:1,4:1,8:1")]


@pytest.mark.parametrize("seed", range(12))
def test_each_band_count_is_exactly_the_cheapest_plan(seed: int) -> None:
    wl = WORKLOADS[seed % len(WORKLOADS)]
    rows, recon = _table(seed, wl.ms, 4)
    for k in range(1, 4):
        plan = plan_bands(rows, recon, wl, max_bands=k, margin=0.0)
        best = min(_brute(rows, recon, wl, j) for j in range(1, k + 1))
        assert plan is not None and plan.objective_us == pytest.approx(best)
        assert len(plan.bands) <= k
        _check_plan(plan, rows, recon, wl)


@pytest.mark.parametrize("seed", range(8))
def test_a_band_is_added_only_when_it_gains_more_than_the_margin(seed: int) -> None:
    wl = WORKLOADS[seed % len(WORKLOADS)]
    w = dict(wl.pairs)
    rows, recon = _table(100 + seed, wl.ms, 5)
    by_k = [_brute_plan(rows, recon, wl, k) for k in range(1, MAX_BANDS + 1)]
    # The rule, stated on the oracle: more bands must beat the kept plan by the margin of what
    # the kept plan spends on the Ms they change.
    kept = 0
    for k in range(1, MAX_BANDS):
        (cost, lat), (kcost, klat) = by_k[k], by_k[kept]
        stake = sum(w[m] * klat[m] for m in wl.ms if lat[m] != klat[m])
        if stake > 0 and kcost - cost > BAND_MARGIN * stake:
            kept = k
    plan = plan_bands(rows, recon, wl)
    assert plan is not None
    assert plan.objective_us == pytest.approx(by_k[kept][0])
    assert len(plan.bands) == kept + 1


def test_a_band_that_fixes_one_m_of_many_is_kept() -> None:
    """A variant 20 % faster at M = 1 alone earns its band although M = 1 is one fifteenth of the
    objective (a margin on the whole objective would need it some 30 % faster)."""
    wl = Workload.parse(",".join(str(m) for m in range(1, 16)))
    gemm = Measured(VARIANTS[1], {m: 100.0 for m in wl.ms})
    gemv = Measured(VARIANTS[0], {1: 80.0, **{m: 120.0 for m in wl.ms if m > 1}})
    plan = plan_bands([gemm, gemv], {0: {m: 1e4 for m in wl.ms}}, wl)
    assert plan is not None and len(plan.bands) == 2
    assert plan.latencies_us[1] == 80.0 and plan.bands[0][0] == 1
    # within the noise (1 % faster) it is not
    gemv = Measured(VARIANTS[0], {1: 99.0, **{m: 120.0 for m in wl.ms if m > 1}})
    assert len(plan_bands([gemm, gemv], {0: {m: 1e4 for m in wl.ms}}, wl).bands) == 1  # type: ignore[union-attr]


def test_a_cap_keeps_every_m_at_or_under_it() -> None:
    wl = WORKLOADS[0]
    rows, recon = _table(7, wl.ms, 5, holes=False)
    # the cap: what the first variant alone costs at each M, as the default's memo would be
    cap = {m: min(rows[0].fused_us[m], recon[0][m]) * 1.02 for m in wl.ms}
    plan = plan_bands(rows, recon, wl, cap=cap, margin=0.0)
    assert plan is not None
    assert all(plan.latencies_us[m] <= cap[m] for m in wl.ms)
    assert plan.objective_us == pytest.approx(
        min(_brute(rows, recon, wl, k, cap) for k in range(1, MAX_BANDS + 1)))
    assert plan_bands(rows, recon, wl, cap={m: 0.1 for m in wl.ms}) is None  # nothing fits


def _two_regimes() -> tuple[list[Measured], dict[int, dict[int, float]], Workload]:
    """A GEMV-like variant fastest at M <= 4, a GEMM-like one at 8..64, reconstruct above."""
    wl = Workload.parse("1,2,4,8,16,64,256")
    gemv, gemm = VARIANTS[0], VARIANTS[1]
    rows = [Measured(gemv, {m: 4.0 + 2.0 * m for m in wl.ms}),
            Measured(gemm, {m: 12.0 + 0.2 * m for m in wl.ms})]
    recon = {0: {m: 30.0 + 0.01 * m for m in wl.ms}, 4096: {m: 31.0 for m in wl.ms}}
    return rows, recon, wl


def test_bands_edges_and_the_reconstruct_tail() -> None:
    rows, recon, wl = _two_regimes()
    plan = plan_bands(rows, recon, wl)
    assert plan is not None
    (e0, c0), (e1, c1) = plan.bands
    # M <= 4: gemv (fused throughout), then gemm fused up to 64, reconstruct above
    assert (e0, c0.variant_key(), c0.max_q_gemm_rows) == (4, VARIANTS[0].variant_key(), 4)
    assert (e1, c1.variant_key(), c1.max_q_gemm_rows) == (None, VARIANTS[1].variant_key(), 64)
    tail_chunk = min(recon, key=lambda c: recon[c][256])  # the tail is M = 256 alone
    assert c1.recon_chunk_n == c0.recon_chunk_n == tail_chunk
    # Ms between workload Ms belong to the band of the next workload M above
    assert plan.config_at(3) == plan.config_at(4) == c0 and plan.config_at(5) == c1
    assert plan.config_at(100) == c1 and c1.max_q_gemm_rows < 100  # reconstructs, like 256
    assert [ms for _cfg, ms in plan.groups(wl.ms)] == [(1, 2, 4), (8, 16, 64, 256)]
    assert plan.stored() == ((4, c0.to_dict()), (None, c1.to_dict()))
    one = plan_bands(rows, recon, wl, max_bands=1)
    assert one is not None and len(one.bands) == 1 and one.stored() == ()
    assert one.objective_us > plan.objective_us * (1 + BAND_MARGIN)
    # a margin larger than the gain on the Ms the second band changes keeps one band
    w = dict(wl.pairs)
    changed = [m for m in wl.ms if plan.latencies_us[m] != one.latencies_us[m]]
    gain = (one.objective_us - plan.objective_us) / sum(w[m] * one.latencies_us[m] for m in changed)
    assert len(plan_bands(rows, recon, wl, margin=gain + 0.01).bands) == 1  # type: ignore[union-attr]
    assert len(plan_bands(rows, recon, wl, margin=gain - 0.01).bands) == 2  # type: ignore[union-attr]


def test_when_reconstruct_wins_everywhere_the_plan_is_one_reconstructing_band() -> None:
    wl = Workload.parse("64,512")
    rows = [Measured(VARIANTS[0], {64: 90.0, 512: 900.0})]
    plan = plan_bands(rows, {0: {64: 30.0, 512: 40.0}}, wl)
    assert plan is not None and len(plan.bands) == 1
    assert plan.config.max_q_gemm_rows == 0 and plan.latencies_us == {64: 30.0, 512: 40.0}


def test_the_plan_is_read_from_the_studys_trials() -> None:
    rows, recon, wl = _two_regimes()

    def trial(r: Measured, chunks: bool) -> Any:
        measured = {"fused_us": {str(m): v for m, v in r.fused_us.items()},
                    "recon_us": {str(m): v for m, v in recon[0].items()}}
        if chunks:
            measured["recon_by_chunk"] = {str(c): {str(m): v for m, v in row.items()}
                                          for c, row in recon.items()}
        return SimpleNamespace(user_attrs={"config": r.config.replace(recon_chunk_n=0).to_dict(),
                                           "measured": measured})

    # a trial from before recon_by_chunk (its own chunk only), a duplicate of its variant,
    # and a trial with every chunk
    got_rows, got_recon = measured_from_trials([trial(rows[0], False), trial(rows[0], True),
                                                trial(rows[1], True)])
    assert [r.config.variant_key() for r in got_rows] == [r.config.variant_key() for r in rows]
    assert [dict(r.fused_us) for r in got_rows] == [dict(r.fused_us) for r in rows]
    assert got_recon == recon
    assert plan_bands(got_rows, got_recon, wl) == plan_bands(rows, recon, wl)


# -- the band rule of stored entries -------------------------------------------------------------


def test_the_band_rule_of_stored_entries() -> None:
    small = KernelConfig(max_q_gemm_rows=8).to_dict()
    top = KernelConfig(max_q_gemm_rows=64).to_dict()
    ms = [1, 2, 4, 8, 16, 64]
    assert bands_problem(((8, small), (None, top)), top, ms) is None
    assert bands_problem(((None, top),), top, ms) is None
    cases = [
        ((), "at least one band"),
        (((16, small), (None, top)), "only the last band may reconstruct"),
        (((8, small), (8, small), (None, top)), "above the previous"),
        (((64, top), (None, top)), "serves no workload M"),
        (((3, small), (None, top)), "not one of the workload's Ms"),
        (((8, small), (None, small)), "entry's config"),
        (((8, small), (16, top)), "must be null"),
        (tuple((m, small) for m in range(1, 18)) + ((None, top),), "over the limit"),
    ]
    for bands, words in cases:
        why = bands_problem(bands, top, ms)
        assert why is not None and words in why[1], (bands, why)


# -- the runtime's band lookup -------------------------------------------------------------------


def _bands(*spans: tuple[int | None, KernelConfig]) -> tuple[Band[KernelConfig], ...]:
    out, lo = [], 1
    for m_hi, cfg in spans:
        out.append(Band(lo, m_hi, cfg, "database"))
        lo = (m_hi or 0) + 1
    return tuple(out)


def test_the_band_of_every_m_is_one_bisect_over_the_edges() -> None:
    cfgs = [KernelConfig(max_q_gemm_rows=r) for r in (4, 8, 64, 128)]
    bands = _bands((4, cfgs[0]), (8, cfgs[1]), (64, cfgs[2]), (None, cfgs[3]))
    edges = band_edges(bands)
    assert edges == (4, 8, 64)
    for m in range(0, 300):
        want = next(b for b in bands if b.covers(max(m, 1)))
        assert bands[bisect_left(edges, m)] is want
    assert band_edges(bands[-1:]) == ()
    with pytest.raises(ValueError):
        band_edges(bands[:-1])  # the last band must be open


@pytest.mark.parametrize("mk,threshold,span", [
    (32, 64, (1, None)), (8, 64, (9, None)), (4, 16, (5, 8)), (32, 2, (3, None)),
    (16, 256, (65, 300)), (48, 8192, (1, 40)),
])
def test_each_band_compiles_the_row_instances_of_every_m_it_serves(mk: int, threshold: int,
                                                                   span: tuple[int, int | None]
                                                                   ) -> None:
    band = Band(span[0], span[1], KernelConfig(max_q_gemm_rows=threshold,
                                               max_q_gemm_rows_kernel=mk, k_unroll=1), "database")
    plan = SimpleNamespace(m_count=mk)
    fused_top = threshold if span[1] is None else min(span[1], threshold)
    needed = {Plan.rows_for(plan, m) for m in range(span[0], fused_top + 1)}  # type: ignore[arg-type]
    got = {Plan.rows_for(plan, m) for m in _band_ms(band) if m <= threshold}  # type: ignore[arg-type]
    assert got == needed
    assert all(span[0] <= m and (span[1] is None or m <= span[1]) for m in _band_ms(band))
