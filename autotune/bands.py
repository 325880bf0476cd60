"""The tuned answer as a plan over M bands, computed exactly from the study's memoised timings.

Why: the best fused-kernel variant for M = 1 (a GEMV: wide split-K, few rows per block) is
rarely the best for M = 64 (a small GEMM), so one config for every M leaves time on the table
wherever the workload spans both. A plan splits the workload's sorted Ms into contiguous bands,
each run by its own variant; within a band the config dispatches as always (fused kernel at
M <= its `max_q_gemm_rows`, reconstruct + cuBLAS above).

What the plan is made of (`plan_bands`):

- Every finished trial measured its variant's fused time at the workload's Ms (up to its
  `FUSED_CUTOFF`) and the reconstruct time of every chunk at every M, memoised per (variant, M)
  and (chunk, M). Fused time depends on the variant alone and reconstruct time on the chunk
  alone, so any assignment of variants to Ms is priced by arithmetic on those numbers: the plan
  costs no measurement beyond the trials' (nothing extra is measured for it until the winner's
  interleaved re-measurement, which measures each M once per side, with its band's config).
- The fused Ms are a prefix of the sorted Ms, m_1..m_t, cut into at most `max_bands`
  contiguous bands, each one variant; the Ms above m_t reconstruct with one chunk and belong to
  the last band, whose config's `max_q_gemm_rows` is m_t: the plan's `MAX_Q_GEMM_ROWS`, the one
  edge where reconstruct + cuBLAS takes over. Every band before the last is fused throughout
  (`max_q_gemm_rows` = its largest M). A small dynamic programme over (bands, prefix) finds the
  cheapest plan for each band count exactly: O(bands * n^2 + variants * n^2) for n workload Ms.
- A band's edge (`m_hi`) is its largest workload M; Ms between two workload Ms belong to the
  band of the next workload M above (the runtime serves them with that band's config), since
  that M is the nearest measurement that speaks for them from above.
- More bands win only by more than `BAND_MARGIN` of what the plan with fewer bands spends on
  the Ms whose latency they change (the noise of those Ms' measurements), and never more than
  `MAX_BANDS`. A margin on the whole objective would ask a band that fixes one M of fifteen to
  make that M some 30 % faster: the bench's plans kept M = 1 of 8192x57344 at 99 µs beside a
  78 µs variant that way (H200).
- `cap` (the winner rule's screen: the default's memoised latency per M, plus slack) removes
  every option slower than it at that M, so the plan is built to pass the per-M check rather
  than filtered by it afterwards.
- Ties go to the smaller threshold (as `complete_variant`), then to the better-ranked trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemmtune.autotune.objective import MAX_ROWS
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.workload import Workload

MAX_BANDS = 4
"""Most bands the tuner makes. Each band is a plan the runtime builds and compiles at load and
a block of header macros, and each extra band is one more place for measurement noise to buy a
split: the DESIGN's plan names three regimes (decode kernel, GEMM kernel, reconstruct, which
shares the last band), and one spare band covers a workload with a second GEMV/GEMM turn."""

BAND_MARGIN = 0.02
"""A plan with more bands must beat the kept plan with fewer by more than this fraction of what
the kept plan spends on the Ms the new one changes. The plan is priced on single memoised
measurements, whose noise the winner rule's screen allows for with the same 2 %
(`winner.SEARCH_SLACK`); a smaller gain is not evidence."""


@dataclass(frozen=True)
class Measured:
    """One variant's memoised fused times (Ms past its fused cutoff absent) and the trial that
    measured it (`config`: the trial's completed config; its variant is what the row times)."""

    config: KernelConfig
    fused_us: Mapping[int, float]


@dataclass(frozen=True)
class BandPlan:
    """A plan over M bands: `(m_hi, config)` in M order, the last `m_hi` None, and its
    per-M dispatch latency and objective over the workload as priced from the memo."""

    bands: tuple[tuple[int | None, KernelConfig], ...]
    latencies_us: dict[int, float] = field(default_factory=dict)
    objective_us: float = math.nan

    @classmethod
    def single(cls, config: KernelConfig, latencies_us: Mapping[int, float] | None = None,
               objective_us: float = math.nan) -> BandPlan:
        return cls(((None, config),), dict(latencies_us or {}), objective_us)

    @property
    def config(self) -> KernelConfig:
        """The last band's config: what a reader of one config gets (its `max_q_gemm_rows` is
        the plan's `MAX_Q_GEMM_ROWS`)."""
        return self.bands[-1][1]

    def band_index(self, m: int) -> int:
        for i, (m_hi, _cfg) in enumerate(self.bands):
            if m_hi is None or m <= m_hi:
                return i
        raise AssertionError("the last band has no upper edge")

    def config_at(self, m: int) -> KernelConfig:
        return self.bands[self.band_index(m)][1]

    def groups(self, ms: Iterable[int]) -> list[tuple[KernelConfig, tuple[int, ...]]]:
        """`ms` grouped by the band that serves them, in M order; bands without any left out."""
        by_band: dict[int, list[int]] = {}
        for m in sorted(set(ms)):
            by_band.setdefault(self.band_index(m), []).append(m)
        return [(self.bands[i][1], tuple(group)) for i, group in by_band.items()]

    def stored(self) -> tuple[tuple[int | None, dict[str, int]], ...]:
        """The plan as an entry stores it (`TunedEntry.bands`): empty for one band."""
        if len(self.bands) == 1:
            return ()
        return tuple((m_hi, cfg.to_dict()) for m_hi, cfg in self.bands)


def measured_from_trials(trials: Sequence[Any]) -> tuple[list[Measured], dict[int, dict[int, float]]]:
    """The memo as the study keeps it, from finished trials in rank order (best first): one
    `Measured` per variant (its first trial's) and reconstruct times per chunk (the first trial
    that recorded a chunk speaks for it: the chunk's times do not depend on the variant).

    Trials record `measured = {fused_us, recon_us, recon_by_chunk}` (study.py); trials from
    before `recon_by_chunk` existed contribute their chosen chunk's `recon_us`."""
    rows: list[Measured] = []
    seen: set[str] = set()
    recon: dict[int, dict[int, float]] = {}
    for t in trials:
        attrs = t.user_attrs
        if "config" not in attrs:
            continue
        cfg = KernelConfig.from_dict(dict(attrs["config"]))
        measured = attrs.get("measured") or {}
        chunks = measured.get("recon_by_chunk") or {str(cfg.recon_chunk_n): measured.get("recon_us", {})}
        for chunk, row in chunks.items():
            if row and int(chunk) not in recon:
                recon[int(chunk)] = {int(m): float(v) for m, v in row.items()}
        if cfg.variant_key() in seen:
            continue
        seen.add(cfg.variant_key())
        rows.append(Measured(cfg, {int(m): float(v) for m, v in measured.get("fused_us", {}).items()}))
    return rows, recon


def plan_bands(
    rows: Sequence[Measured],
    recon: Mapping[int, Mapping[int, float]],
    workload: Workload,
    *,
    cap: Mapping[int, float] | None = None,
    max_bands: int = MAX_BANDS,
    margin: float = BAND_MARGIN,
) -> BandPlan | None:
    """The cheapest plan over M bands for `workload` from the memo (see the module docstring):
    `rows` one per variant in rank order, `recon` chunk -> M -> µs in the space's chunk order.
    None when no plan serves every M (every option at some M failed or is over `cap`)."""
    if not rows or max_bands < 1:
        return None
    w = dict(workload.pairs)
    ms = sorted(w)
    n = len(ms)
    inf = math.inf

    def allowed(m: int, t: float | None) -> float:
        if t is None or not math.isfinite(t) or (cap is not None and t > cap.get(m, math.inf)):
            return inf
        return t

    fused = [[allowed(m, r.fused_us.get(m)) if m <= MAX_ROWS else inf for m in ms] for r in rows]
    chunks = list(recon)
    rec = {c: [allowed(m, recon[c].get(m)) for m in ms] for c in chunks}

    # band[j][i]: cheapest single variant over ms[j:i] fused, and which.
    band: list[list[tuple[float, int]]] = [[(inf, -1)] * (n + 1) for _ in range(n + 1)]
    for v, f in enumerate(fused):
        for j in range(n):
            acc = 0.0
            for i in range(j + 1, n + 1):
                acc += w[ms[i - 1]] * f[i - 1]
                if acc == inf:
                    break
                if acc < band[j][i][0]:
                    band[j][i] = (acc, v)

    # tail[t]: ms[t:] reconstructed with the best chunk (ties: best over all Ms, then order).
    overall = {c: sum(w[m] * rec[c][k] for k, m in enumerate(ms)) for c in chunks}
    tie = {c: (overall[c], i) for i, c in enumerate(chunks)}
    tail: list[tuple[float, int | None]] = []
    for t in range(n + 1):
        costs = {c: sum(w[ms[k]] * rec[c][k] for k in range(t, n)) for c in chunks}
        best = min(chunks, key=lambda c: (costs[c], tie[c]), default=None)
        tail.append((costs[best], best) if best is not None else (0.0 if t == n else inf, None))

    # cover[k][i]: ms[:i] fused in exactly k bands (back pointer: where the last band starts).
    cover = [[(inf, -1)] * (n + 1) for _ in range(max_bands + 1)]
    cover[0][0] = (0.0, -1)
    for k in range(1, max_bands + 1):
        for i in range(1, n + 1):
            for j in range(i):
                c = cover[k - 1][j][0] + band[j][i][0]
                if c < cover[k][i][0]:
                    cover[k][i] = (c, j)

    def build(k: int, t: int, total: float) -> BandPlan:
        """The cheapest plan of k bands fusing ms[:t] (from the back pointers)."""
        chunk = tail[t][1]
        if chunk is None:  # every M fused and no chunk measured: keep the best trial's chunk
            chunk = rows[0].config.recon_chunk_n
        spans: list[tuple[int, int, int]] = []  # (j, i, variant)
        i, kk = t, k
        while i > 0:
            j = cover[kk][i][1]
            spans.append((j, i, band[j][i][1]))
            i, kk = j, kk - 1
        spans.reverse()
        bands: list[tuple[int | None, KernelConfig]] = []
        lat: dict[int, float] = {}
        for idx, (j, i, v) in enumerate(spans):
            last = idx == len(spans) - 1
            cfg = rows[v].config.replace(max_q_gemm_rows=ms[i - 1], recon_chunk_n=chunk)
            bands.append((None if last else ms[i - 1], cfg))
            for q in range(j, i):
                lat[ms[q]] = fused[v][q]
        if not spans:  # every M reconstructs: one band, the best-ranked variant
            bands.append((None, rows[0].config.replace(max_q_gemm_rows=0, recon_chunk_n=chunk)))
        for q in range(t, n):
            lat[ms[q]] = rec[chunk][q]
        return BandPlan(tuple(bands), lat, total)

    kept: BandPlan | None = None
    for k in range(1, max_bands + 1):
        best_k: tuple[float, int] | None = None  # (objective, fused prefix t)
        for t in range(0 if k == 1 else 1, n + 1):
            fused_part = 0.0 if t == 0 else cover[k][t][0]
            total = fused_part + tail[t][0]
            if math.isfinite(total) and (best_k is None or total < best_k[0]):
                best_k = (total, t)
        if best_k is None:
            continue
        if kept is None:
            kept = build(k, best_k[1], best_k[0])
            continue
        if best_k[0] >= kept.objective_us:
            continue
        cand = build(k, best_k[1], best_k[0])
        stake = sum(w[m] * kept.latencies_us[m] for m in ms
                    if cand.latencies_us[m] != kept.latencies_us[m])
        if stake > 0 and kept.objective_us - cand.objective_us > margin * stake:
            kept = cand  # (stake 0: the same latencies cut into more bands; no gain)
    return kept
