"""SQLAlchemy 2 typed models of the tuning database.

Every table carries the `gemmtune_` prefix because Optuna's tables (and its own
`alembic_version`) share the same file or schema. The schema itself is created by the Alembic
migrations in `migrations/versions`, never by `metadata.create_all`, so the two cannot drift:
`tests/test_db_schema.py` compares them.

A tuned config is one answer per (device, kernel build, problem, workload): that tuple is unique,
which is what lets `Store.get_result` be a single-row lookup and `put_result` an upsert.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PREFIX = "gemmtune_"
VERSION_TABLE = "gemmtune_alembic_version"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Device(Base):
    """A kind of GPU. `fingerprint` identifies interchangeable cards; the descriptive fields and
    versions are those last seen (drivers update, the fingerprint does not change)."""

    __tablename__ = "gemmtune_devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    vendor: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    compute_capability: Mapped[str] = mapped_column(String(16))
    sm_count: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    driver_version: Mapped[str] = mapped_column(String(64), default="")
    runtime_version: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class KernelBuild(Base):
    """One `kernel_hash` (sources + flags + compiler): results are valid for exactly one."""

    __tablename__ = "gemmtune_kernel_builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kernel_hash: Mapped[str] = mapped_column(String(128), unique=True)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ProblemRow(Base):
    """A layer shape. The fields are filled when known (a run may start from its key alone)."""

    __tablename__ = "gemmtune_problems"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    k: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    group_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    act_order: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class WorkloadRow(Base):
    """A weighting over M. `ms`/`weights` are JSON lists, filled when known."""

    __tablename__ = "gemmtune_workloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(512), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    ms: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    weights: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)


class TuningRun(Base):
    """One `gemmtune tune` invocation for one problem/workload: who searched how, and how it ended."""

    __tablename__ = "gemmtune_tuning_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_devices.id"))
    kernel_build_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_kernel_builds.id"))
    problem_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_problems.id"))
    workload_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_workloads.id"))
    sampler: Mapped[str] = mapped_column(String(64))
    trials: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    tool_version: Mapped[str] = mapped_column(String(64), default="")


class TunedConfig(Base):
    """The answer: for this device, kernel build, problem and workload, use `config` (or, when
    `bands` is set, that plan over M bands, whose last band's config `config` is)."""

    __tablename__ = "gemmtune_tuned_configs"
    __table_args__ = (
        UniqueConstraint("device_id", "kernel_build_id", "problem_id", "workload_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_devices.id"), index=True)
    kernel_build_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_kernel_builds.id"))
    problem_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_problems.id"))
    workload_id: Mapped[int] = mapped_column(ForeignKey("gemmtune_workloads.id"))
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("gemmtune_tuning_runs.id", ondelete="SET NULL"), nullable=True
    )
    config: Mapped[dict[str, int]] = mapped_column(JSON)
    bands: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    """The plan over M bands (`entry.bands_to_json`) when it has more than one band; NULL: one
    band of `config` (rows from before revision 0002, and every one-band answer since)."""
    config_key: Mapped[str] = mapped_column(Text)  # every field spelled out: no length cap (0003)
    objective_us: Mapped[float] = mapped_column(Float)
    default_objective_us: Mapped[float] = mapped_column(Float)
    latencies_us: Mapped[dict[str, float]] = mapped_column(JSON)
    default_latencies_us: Mapped[dict[str, float]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16), default="tuned")
    provenance: Mapped[str] = mapped_column(Text, default="")
    origin: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    device: Mapped[Device] = relationship(lazy="joined")
    kernel_build: Mapped[KernelBuild] = relationship(lazy="joined")
    problem: Mapped[ProblemRow] = relationship(lazy="joined")
    workload: Mapped[WorkloadRow] = relationship(lazy="joined")


TABLES = tuple(Base.metadata.sorted_tables)
