"""The one entry type: a stored answer (database row or profile entry) in plain data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import DatabaseError

SOURCES = ("tuned", "imported")
"""How an entry got into the database."""

MAX_STORED_BANDS = 16
"""Most bands a stored entry may hold: a reader's bound (each band is a plan the runtime builds
at load and a block of header macros), well above the few bands the tuner makes
(`gemmtune.autotune.bands.MAX_BANDS`), so a profile cannot make a model load build hundreds."""

Bands = tuple[tuple[int | None, dict[str, int]], ...]
"""A plan over M bands: `(m_hi, config)` in M order, `m_hi` the band's largest M (None for the
last band, which serves every larger M); a band starts one above the previous band's `m_hi`."""


@dataclass(kw_only=True)
class TunedEntry:
    """One stored answer, in plain data (the db layer does not know the kernel objects).

    The one entry type of the database and of profiles: a profile entry is an entry whose
    device and kernel hash are the profile's (`Profile` fills them in), so it has no fields of
    its own and needs no conversion on export or import."""

    device: dict[str, Any] = field(default_factory=dict)
    kernel_hash: str = ""
    problem: dict[str, Any]
    problem_key: str
    workload: dict[str, Any]
    workload_key: str
    config: dict[str, int]
    objective_us: float
    default_objective_us: float
    latencies_us: dict[int, float]
    default_latencies_us: dict[int, float]
    source: str = "tuned"
    provenance: str = ""
    created_at: datetime | None = None
    stale: bool = False
    run_id: int | None = None
    """The tuning run that produced it, when known (added to the contract; optional)."""
    origin: str = ""
    """For imported entries: the provenance the entry carried in the profile."""
    config_key: str = ""
    """`KernelConfig.key()` of `config` when the writer knew it; informational."""
    bands: Bands = ()
    """The tuned plan over M bands when it has more than one (see `Bands`); empty: one band of
    `config` serves every M (every entry written before plans existed). When set, `config` is
    the *last* band's config, so a reader that knows only `config` still gets the plan's
    `MAX_Q_GEMM_ROWS` (the last band's threshold, where reconstruct + cuBLAS takes over) and a
    kernel variant the plan itself runs."""

    @property
    def device_fingerprint(self) -> str:
        return str(self.device.get("fingerprint", ""))

    @property
    def plan(self) -> Bands:
        """The bands this entry serves, always at least one: `bands`, or one band of `config`."""
        return self.bands or ((None, self.config),)

    @property
    def speedup(self) -> float:
        """Default's objective over the tuned one (>1: the tuned config is faster)."""
        return self.default_objective_us / self.objective_us if self.objective_us > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The entry as a profile spells it (device and kernel hash are the profile's)."""
        return {
            "problem": dict(self.problem),
            "workload": dict(self.workload),
            "config": dict(self.config),
            "bands": bands_to_json(self.plan),
            "objective_us": self.objective_us,
            "default_objective_us": self.default_objective_us,
            "latencies_us": {str(m): v for m, v in sorted(self.latencies_us.items())},
            "default_latencies_us": {str(m): v for m, v in sorted(self.default_latencies_us.items())},
            "provenance": self.provenance,
            "created_at": iso_utc(self.created_at or datetime.now(UTC)),
        }


ProfileEntry = TunedEntry
"""The name profiles use for the same type."""


def iso_utc(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat()



@dataclass(frozen=True)
class ImportResult:
    """What a bulk write did: counts of added, replaced and kept (existing local won) entries."""

    added: int = 0
    replaced: int = 0
    kept: int = 0
    kept_keys: tuple[str, ...] = field(default_factory=tuple)


def lat_to_json(lat: dict[int, float]) -> dict[str, float]:
    return {str(int(m)): float(v) for m, v in sorted(lat.items(), key=lambda kv: int(kv[0]))}


def lat_from_json(lat: dict[str, Any] | None) -> dict[int, float]:
    return {int(m): float(v) for m, v in (lat or {}).items()}


def config_key(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


def bands_to_json(bands: Bands) -> list[dict[str, Any]]:
    """`[{"m_hi": 8, "config": {...}}, ..., {"m_hi": null, "config": {...}}]`: the spelling of
    profiles (schema 2) and of the database's `bands` column."""
    return [{"m_hi": m_hi, "config": dict(cfg)} for m_hi, cfg in bands]


def bands_from_json(doc: list[dict[str, Any]] | None) -> Bands:
    """The database column back to `Bands` (None, or a single band, reads as no bands)."""
    bands = tuple((None if b["m_hi"] is None else int(b["m_hi"]), dict(b["config"]))
                  for b in doc or ())
    return bands if len(bands) > 1 else ()


def band_spans(bands: Bands) -> list[tuple[int, int | None, dict[str, int]]]:
    """`(m_lo, m_hi, config)` of each band: a band starts one above the previous band's m_hi."""
    out, lo = [], 1
    for m_hi, cfg in bands:
        out.append((lo, m_hi, cfg))
        lo = (m_hi or 0) + 1
    return out


def bands_problem(bands: Bands, config: dict[str, Any], ms: list[int] | tuple[int, ...],
                  identity: Callable[[dict[str, Any]], Any] | None = None
                  ) -> tuple[int | None, str] | None:
    """Why `bands` is not a plan an entry with `config` and workload Ms `ms` may store, as
    (index of the band at fault or None, reason), or None when it is one. The one statement of
    the rule, for the store and the profile validator (configs themselves are checked by the
    caller's domain validator):

    - at least one band and at most MAX_STORED_BANDS; every `m_hi` but the last's an int, the
      last's None, strictly ascending;
    - each `m_hi` is one of the workload's Ms: edges are where measured Ms were split, and each
      band then serves at least one measured M (the last band: those above the last edge);
    - `config` is the last band's config (what a reader of `config` alone gets), compared as
      `identity` spells them (the profile validator passes the canonical `KernelConfig` key,
      so a config written without fields added later still equals its full spelling);
    - every band but the last runs its fused kernel at every M it serves (its
      `max_q_gemm_rows` >= its `m_hi`): reconstruct + cuBLAS serves only the top of the last
      band, so the plan's `MAX_Q_GEMM_ROWS` is that band's threshold, one edge.
    """
    if not bands:
        return None, "a plan needs at least one band"
    if len(bands) > MAX_STORED_BANDS:
        return None, f"{len(bands)} bands, over the limit of {MAX_STORED_BANDS}"
    measured = set(ms)
    prev = 0
    for i, (m_hi, cfg) in enumerate(bands):
        last = i == len(bands) - 1
        if last:
            if m_hi is not None:
                return i, f"the last band's m_hi must be null (it serves every M above {prev}), got {m_hi}"
            if not any(m > prev for m in measured):
                return i, f"the last band serves no workload M (every M is <= {prev})"
            same = identity or (lambda c: c)
            if same(cfg) != same(config):
                return i, "the last band's config must be the entry's config"
            continue
        if isinstance(m_hi, bool) or not isinstance(m_hi, int):
            return i, f"m_hi must be an integer (only the last band's is null), got {m_hi!r}"
        if m_hi <= prev:
            return i, f"m_hi={m_hi} must be above the previous band's ({prev})"
        if m_hi not in measured:
            return i, (f"m_hi={m_hi} is not one of the workload's Ms "
                       f"({', '.join(map(str, sorted(measured)))}): band edges split measured Ms")
        rows = cfg.get("max_q_gemm_rows") if isinstance(cfg, dict) else None
        if not isinstance(rows, int) or rows < m_hi:
            return i, (f"max_q_gemm_rows={rows!r} is below the band's m_hi={m_hi}: only the last "
                       "band may reconstruct")
        prev = m_hi
    return None



def check_entry(e: TunedEntry) -> None:
    """Cheap sanity checks of what callers hand the store (the domain checks live upstream)."""
    if e.source not in SOURCES:
        raise DatabaseError(f"entry source {e.source!r} is not one of {', '.join(SOURCES)}")
    if not e.problem_key or not e.workload_key or not e.kernel_hash:
        raise DatabaseError("entry needs problem_key, workload_key and kernel_hash")
    if not e.device_fingerprint:
        raise DatabaseError("entry device has no 'fingerprint' (pass DeviceInfo.to_dict())")
    if e.bands:
        why = bands_problem(e.bands, e.config, list(e.workload.get("ms", ())))
        if why is not None:
            at = "" if why[0] is None else f" band {why[0]}:"
            raise DatabaseError(f"entry {e.problem_key}/{e.workload_key}:{at} {why[1]}")
