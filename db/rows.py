"""Rows of the tuning database and the entries they make: the store's session-level work.

Dimension rows (device, kernel build, problem, workload) are found or created inside the
caller's transaction; a concurrent writer that inserts the same key first is not an error
(PostgreSQL: the unique constraint fires, the row is read back).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from .entry import (
    TunedEntry,
    bands_from_json,
    bands_to_json,
    config_key,
    lat_from_json,
    lat_to_json,
)
from .errors import DatabaseError
from .models import Device, KernelBuild, ProblemRow, TunedConfig, WorkloadRow, utcnow

LAST_SEEN_RESOLUTION = timedelta(minutes=10)
"""`Device.last_seen` is refreshed at most this often (it is informational)."""


def get_or_create(session: Session, model: Any, key_attr: str, key: Any,
                   values: dict[str, Any], update: dict[str, Any] | None = None) -> Any:
    col = getattr(model, key_attr)
    row = session.scalars(select(model).where(col == key)).one_or_none()
    if row is None:
        try:
            with session.begin_nested():
                row = model(**{key_attr: key}, **values)
                session.add(row)
                session.flush()
            return row
        except sa_exc.IntegrityError:  # another writer inserted it meanwhile (PostgreSQL)
            row = session.scalars(select(model).where(col == key)).one()
    for name, value in (update or {}).items():
        if value is not None and getattr(row, name) != value:
            setattr(row, name, value)
    return row

def device_row(session: Session, device: dict[str, Any]) -> Device:
    fp = str(device.get("fingerprint") or "")
    if not fp:
        raise DatabaseError("device dict has no 'fingerprint' (pass DeviceInfo.to_dict())")
    fields = {
        "vendor": str(device.get("vendor", "")),
        "name": str(device.get("name", "")),
        "compute_capability": str(device.get("compute_capability", "")),
        "sm_count": int(device.get("sm_count", 0)),
        "memory_bytes": int(device.get("memory_bytes", 0)),
        "driver_version": str(device.get("driver_version", "")),
        "runtime_version": str(device.get("runtime_version", "")),
    }
    now = utcnow()
    row = get_or_create(session, Device, "fingerprint", fp,
                              {**fields, "first_seen": now, "last_seen": now})
    for name, value in fields.items():
        if value and getattr(row, name) != value:
            setattr(row, name, value)
    # Touch the shared device row only when it says something new: every worker of a
    # fleet writes results for the same device, and a row update is a row lock.
    if now - row.last_seen > LAST_SEEN_RESOLUTION:
        row.last_seen = now
    return row

def kernel_build_row(session: Session, kernel_hash: str) -> KernelBuild:
    if not kernel_hash:
        raise DatabaseError("empty kernel_hash")
    return get_or_create(session, KernelBuild, "kernel_hash", kernel_hash,
                               {"first_seen": utcnow()})

def problem_row(session: Session, key: str, problem: dict[str, Any] | None) -> ProblemRow:
    p = problem or {}
    vals = {f: p.get(f) for f in ("k", "n", "bits", "group_size", "act_order")}
    return get_or_create(session, ProblemRow, "key", key, vals, update=vals)

def workload_row(session: Session, key: str, workload: dict[str, Any] | None) -> WorkloadRow:
    w = workload or {}
    vals = {"name": str(w.get("name", "")),
            "ms": list(w["ms"]) if "ms" in w else None,
            "weights": list(w["weights"]) if "weights" in w else None}
    return get_or_create(session, WorkloadRow, "key", key, vals,
                               update={k: v for k, v in vals.items() if v})


def upsert_entry(session: Session, entry: TunedEntry, *, replace: bool) -> str:
    """Returns 'added', 'replaced' or 'kept'."""
    dev = device_row(session, entry.device)
    kb = kernel_build_row(session, entry.kernel_hash)
    prob = problem_row(session, entry.problem_key, entry.problem)
    wl = workload_row(session, entry.workload_key, entry.workload)
    session.flush()
    where = (TunedConfig.device_id == dev.id, TunedConfig.kernel_build_id == kb.id,
             TunedConfig.problem_id == prob.id, TunedConfig.workload_id == wl.id)
    row = session.scalars(select(TunedConfig).where(*where)).one_or_none()
    now = utcnow()
    values = {
        "config": dict(entry.config),
        "bands": bands_to_json(entry.bands) if len(entry.bands) > 1 else None,
        "config_key": entry.config_key or config_key(entry.config),
        "objective_us": float(entry.objective_us),
        "default_objective_us": float(entry.default_objective_us),
        "latencies_us": lat_to_json(entry.latencies_us),
        "default_latencies_us": lat_to_json(entry.default_latencies_us),
        "source": entry.source,
        "provenance": entry.provenance,
        "origin": entry.origin,
        "run_id": entry.run_id,
        "created_at": entry.created_at or now,
        "updated_at": now,
    }
    if row is None:
        try:
            with session.begin_nested():
                session.add(TunedConfig(device_id=dev.id, kernel_build_id=kb.id,
                                        problem_id=prob.id, workload_id=wl.id, **values))
                session.flush()
            return "added"
        except sa_exc.IntegrityError:  # a concurrent writer won the insert (PostgreSQL)
            row = session.scalars(select(TunedConfig).where(*where)).one()
    if not replace:
        return "kept"
    for name, value in values.items():
        setattr(row, name, value)
    return "replaced"


def device_dict(d: Device) -> dict[str, Any]:
    return {
        "vendor": d.vendor, "name": d.name, "compute_capability": d.compute_capability,
        "sm_count": d.sm_count, "memory_bytes": d.memory_bytes,
        "driver_version": d.driver_version, "runtime_version": d.runtime_version,
        "fingerprint": d.fingerprint,
    }


def to_entry(row: TunedConfig, current_kernel_hash: str | None) -> TunedEntry:
    p, w = row.problem, row.workload
    problem = {"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
               "act_order": p.act_order}
    workload = {"name": w.name, "ms": list(w.ms or []), "weights": list(w.weights or [])}
    kh = row.kernel_build.kernel_hash
    return TunedEntry(
        device=device_dict(row.device),
        kernel_hash=kh,
        problem=problem,
        problem_key=p.key,
        workload=workload,
        workload_key=w.key,
        config=dict(row.config),
        bands=bands_from_json(row.bands),
        objective_us=row.objective_us,
        default_objective_us=row.default_objective_us,
        latencies_us=lat_from_json(row.latencies_us),
        default_latencies_us=lat_from_json(row.default_latencies_us),
        source=row.source,
        provenance=row.provenance,
        created_at=row.created_at,
        stale=current_kernel_hash is not None and kh != current_kernel_hash,
        run_id=row.run_id,
        origin=row.origin,
        config_key=row.config_key,
    )
