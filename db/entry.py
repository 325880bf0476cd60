"""The one entry type: a stored answer (database row or profile entry) in plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import DatabaseError

SOURCES = ("tuned", "imported")
"""How an entry got into the database."""


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

    @property
    def device_fingerprint(self) -> str:
        return str(self.device.get("fingerprint", ""))

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



def check_entry(e: TunedEntry) -> None:
    """Cheap sanity checks of what callers hand the store (the domain checks live upstream)."""
    if e.source not in SOURCES:
        raise DatabaseError(f"entry source {e.source!r} is not one of {', '.join(SOURCES)}")
    if not e.problem_key or not e.workload_key or not e.kernel_hash:
        raise DatabaseError("entry needs problem_key, workload_key and kernel_hash")
    if not e.device_fingerprint:
        raise DatabaseError("entry device has no 'fingerprint' (pass DeviceInfo.to_dict())")
