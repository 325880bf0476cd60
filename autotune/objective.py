"""The objective of one trial: a kernel variant, completed with the best fused/reconstruct
threshold and reconstruct chunk, and what it costs over the workload (memoised measurements)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemmtune.autotune.evaluator import Evaluator, TrialFailure
from gemmtune.autotune.space import STANDARD, Space
from gemmtune.kernels.config import TUNABLES, KernelConfig

MAX_ROWS = {t.name: t for t in TUNABLES}["max_q_gemm_rows"].hi
"""Largest threshold a config can hold: fused measurements above it are never needed."""

FUSED_CUTOFF = 4.0
"""Once the fused kernel is this many times slower than the best reconstruct at some M, larger
Ms are not measured fused (and the threshold stays below that M). The fused kernel's cost grows
with M while reconstruct + cuBLAS is nearly flat, so past such a crossover fused never wins
back; skipping saves the slowest measurements of a trial (large M with few rows per block)."""


@dataclass(frozen=True)
class Assessment:
    """One variant, completed: the best threshold and chunk for it and what they cost."""

    config: KernelConfig
    objective_us: float
    fused_us: dict[int, float]
    """Fused time per measured M (Ms past the fused cutoff are absent)."""
    recon_us: dict[int, float]
    """Reconstruct time per M with the chosen chunk."""
    recon_by_chunk: dict[int, dict[int, float]] | None = None
    """Reconstruct time per M of every chunk that ran (chunk -> M -> µs): what the plan over M
    bands (`bands.py`) needs to place the reconstruct edge across variants."""


def complete_variant(
    evaluator: Evaluator,
    variant: KernelConfig,
    space: Space = STANDARD,
    fused_cutoff: float | None = FUSED_CUTOFF,
) -> Assessment:
    """Pick `max_q_gemm_rows` and `recon_chunk_n` for `variant` exactly.

    objective(r, c) = sum_{M <= r} w_M fused(M) + sum_{M > r} w_M recon_c(M), scanned over
    r in {0} + workload Ms (ties: the smaller r) and every chunk c of the space (ties: the chunk
    best over all Ms, then the first). Fused measurements depend on the variant only and
    reconstruct ones on the chunk only, so the scan costs no extra measurements beyond one per
    (path, M). A fused failure fails the variant; a chunk that fails is left out.
    """
    wl = evaluator.workload
    weights = dict(wl.pairs)
    ms = sorted(weights)

    recon: dict[int, dict[int, float]] = {}  # chunk -> M -> µs
    recon_errors: list[str] = []
    for chunk in space.recon_chunk_n:
        cfg = variant.replace(recon_chunk_n=chunk)
        row: dict[int, float] = {}
        try:
            for m in ms:
                row[m] = evaluator.recon(cfg, m).median_us
        except TrialFailure as exc:
            recon_errors.append(f"recon chunk {chunk}: {exc.reason}")
            continue
        recon[chunk] = row

    best_recon = {m: min((r[m] for r in recon.values()), default=math.inf) for m in ms}
    fused: dict[int, float] = {}
    for m in ms:
        if m > MAX_ROWS:
            break
        t = evaluator.fused(variant, m).median_us  # TrialFailure propagates: variant unusable
        fused[m] = t
        if fused_cutoff is not None and t > fused_cutoff * best_recon[m]:
            break

    # Thresholds: 0, then each M as long as every M up to it has a fused time.
    candidates = [0]
    for m in ms:
        if m not in fused:
            break
        candidates.append(m)

    overall = {c: sum(weights[m] * row[m] for m in ms) for c, row in recon.items()}
    order = list(space.recon_chunk_n)
    best: tuple[float, int, int] | None = None  # (objective, r, chunk)
    for r in candidates:
        fused_part = sum(weights[m] * fused[m] for m in ms if m <= r)
        tail = [m for m in ms if m > r]
        if not tail:
            chunk_choices = sorted(recon, key=lambda c: (overall[c], order.index(c)))
            chunk = chunk_choices[0] if chunk_choices else space.recon_chunk_n[0]
            total = fused_part
        else:
            if not recon:
                continue
            chunk = min(recon, key=lambda c: (sum(weights[m] * recon[c][m] for m in tail),
                                              overall[c], order.index(c)))
            total = fused_part + sum(weights[m] * recon[chunk][m] for m in tail)
        if best is None or total < best[0]:
            best = (total, r, chunk)
    if best is None or not math.isfinite(best[0]):
        raise TrialFailure("no usable dispatch: " + ("; ".join(recon_errors) or "every path failed"))
    total, r, chunk = best
    config = variant.replace(max_q_gemm_rows=r, recon_chunk_n=chunk)
    return Assessment(config, total, fused, dict(recon.get(chunk, {})),
                      {c: dict(row) for c, row in recon.items()})


def dispatch_latencies(evaluator: Evaluator, config: KernelConfig) -> dict[int, float]:
    """Per-M latency of `config` exactly as given (its own threshold and chunk), from the
    memoised per-path measurements: how the runtime would dispatch with it."""
    return {
        m: (evaluator.fused(config, m) if m <= config.max_q_gemm_rows else evaluator.recon(config, m)).median_us
        for m in evaluator.workload.ms
    }
