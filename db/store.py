"""The store: the one API through which the tuner writes results and the runtime reads them.

Why it looks like this:
- A result is valid only for the kernel build that measured it, so `get_result` serves exactly the
  requested `kernel_hash`; other hashes are *stale*: listed (with `.stale`), never served.
- Tuning workers write while models load and other workers tune: every write is one short
  `BEGIN IMMEDIATE` transaction (engine set-up in `engine.py`), and a write that still meets a
  lock is retried with backoff; only after `lock_timeout_s` does a typed `DatabaseLockedError`
  surface. "database is locked" never reaches the user raw.
- Each method is a few lines inside `_read` / `_write` (one wrapper for the transaction, the
  retries and the error translation, as Optuna's `_create_scoped_session`).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from . import migrate
from .engine import (
    Translator,
    check_sqlite_file,
    display_url,
    is_locked,
    make_engine,
    serialize_sqlite_transactions,
)
from .entry import ImportResult, TunedEntry, check_entry
from .errors import (
    DatabaseError,
    DatabasePathError,
    DatabaseReadOnlyError,
    DatabaseUnavailableError,
)
from .models import Device, KernelBuild, ProblemRow, TunedConfig, TuningRun, WorkloadRow, utcnow
from .paths import default_db_path, resolve_url, sqlite_path
from .rows import (
    device_dict,
    device_row,
    kernel_build_row,
    problem_row,
    to_entry,
    upsert_entry,
    workload_row,
)

__all__ = ["BUSY_TIMEOUT_S", "LOCK_TIMEOUT_S", "ImportResult", "Store", "TunedEntry",
           "display_url", "serialize_sqlite_transactions", "tool_version"]

T = TypeVar("T")

BUSY_TIMEOUT_S = 15.0
"""SQLite waits this long inside one statement for a lock before reporting busy."""

LOCK_TIMEOUT_S = 120.0
"""Total time a write keeps retrying a locked database before `DatabaseLockedError`."""

RUN_STATUSES = ("running", "finished", "failed", "interrupted")


def tool_version() -> str:
    """Version of the installed gemmtune distribution, read as `gemmtune.__version__` reads it
    (pyproject.toml owns it; db may not import the top package)."""
    try:
        return metadata.version("gemmtune")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


class Store:
    """Tuned results in a SQLAlchemy database. Open with `Store.open(url)`; close when done.

    Thread-safe for the runtime's use (one engine, sessions per call)."""

    url: str

    def __init__(self, url: str, engine: Engine | None, *, readonly: bool, path: Path | None,
                 lock_timeout_s: float) -> None:
        self.url = url
        self.readonly = readonly
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self._engine = engine
        self._translate = Translator(display_url(url), path)
        self.revision: str | None = None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | None = None, *, readonly: bool = False,
             lock_timeout_s: float = LOCK_TIMEOUT_S,
             _script_location: Path | None = None) -> Store:
        """Open (creating and migrating as needed) the database at `url`.

        `url`: a SQLAlchemy URL or a file path; None means `GEMMTUNE_DB`, else the default file.
        `readonly=True` never writes (no schema creation or upgrade, SQLite opened `mode=ro`);
        a missing file then reads as an empty database, but a folder that does not exist is
        still an error (except the default location's). Raises typed `DatabaseError`s."""
        resolved = resolve_url(url)
        where = display_url(resolved)
        try:
            u = make_url(resolved)
        except sa_exc.ArgumentError:
            raise DatabasePathError(f"not a database URL or path: {where}") from None
        if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("", "psycopg2"):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                u = u.set(drivername="postgresql+psycopg")
        path = sqlite_path(resolved)
        default_path = default_db_path()
        if path is not None:
            exists = check_sqlite_file(path, readonly=readonly,
                                        create_parent=path == default_path)
            if readonly and not exists:
                return cls(resolved, None, readonly=True, path=path, lock_timeout_s=lock_timeout_s)
        translate = Translator(where, path)
        try:
            engine = make_engine(u, path, readonly, min(BUSY_TIMEOUT_S, lock_timeout_s))
        except (ImportError, sa_exc.NoSuchModuleError) as exc:
            hint = ("; for PostgreSQL: pip install -e '.[postgres]' in the gemmtune checkout"
                    if u.get_backend_name() == "postgresql" else "")
            raise DatabaseUnavailableError(
                f"cannot use database {where}: its driver is not installed ({exc}){hint}"
            ) from None
        except sa_exc.ArgumentError as exc:
            raise DatabasePathError(f"not a usable database URL {where}: {exc}") from None
        store = cls(resolved, engine, readonly=readonly, path=path, lock_timeout_s=lock_timeout_s)
        try:
            store._retry(lambda: store._migrate(_script_location))
        except DatabaseError:
            engine.dispose()
            raise
        except Exception as exc:
            engine.dispose()
            raise translate(exc) from None
        return store

    def _migrate(self, script_location: Path | None) -> None:
        assert self._engine is not None
        with self._engine.connect() as conn:
            self.revision = migrate.ensure_schema(
                conn, display_url(self.url), readonly=self.readonly,
                script_location=script_location,
            )
            if self.readonly and self.revision is None:
                self._engine.dispose()
                self._engine = None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    # -- transactions ----------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T]) -> T:
        """Run `fn` (one whole transaction), retrying with backoff while the database is locked."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            try:
                return fn()
            except DatabaseError:
                raise
            except sa_exc.DBAPIError as exc:
                if not is_locked(exc) or time.monotonic() + delay > deadline:
                    raise self._translate(exc) from None
            except sa_exc.SQLAlchemyError as exc:
                raise self._translate(exc) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def _write(self, fn: Callable[[Session], T]) -> T:
        if self.readonly:
            raise DatabaseReadOnlyError(
                f"database {display_url(self.url)} was opened read-only; nothing was changed"
            )
        engine = self._require_engine()

        def attempt() -> T:
            with Session(engine.execution_options(gemmtune_write=True),
                         expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._retry(attempt)

    def _read(self, fn: Callable[[Session], T], empty: T) -> T:
        if self._engine is None:
            if self.readonly:
                return empty
            self._require_engine()
        engine = self._engine
        assert engine is not None

        def attempt() -> T:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._retry(attempt)

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise DatabaseError(f"database {display_url(self.url)} is closed")
        return self._engine

    @contextlib.contextmanager
    def _write_session(self) -> Iterator[Session]:
        """A raw write transaction (tests use it to die mid-transaction). No retries."""
        engine = self._require_engine()
        with Session(engine.execution_options(gemmtune_write=True)) as session, session.begin():
            yield session

    def _upsert(self, session: Session, entry: TunedEntry, *, replace: bool) -> str:
        """One entry inside an open write transaction: 'added', 'replaced' or 'kept' (the seam
        tests use to die mid-transaction)."""
        return upsert_entry(session, entry, replace=replace)

    # -- results ---------------------------------------------------------------------------
    def put_result(self, entry: TunedEntry) -> None:
        """Insert or replace the answer for (device, kernel hash, problem, workload)."""
        check_entry(entry)
        self._write(lambda s: self._upsert(s, entry, replace=True))

    def import_entries(self, entries: Iterable[TunedEntry], *, replace: bool = False) -> ImportResult:
        """Write many entries in ONE transaction: all land or none. Existing entries for the same
        (device, kernel hash, problem, workload) are kept unless `replace`."""
        items = list(entries)
        for e in items:
            check_entry(e)

        def work(session: Session) -> ImportResult:
            counts = {"added": 0, "replaced": 0, "kept": 0}
            kept: list[str] = []
            for e in items:
                what = self._upsert(session, e, replace=replace)
                counts[what] += 1
                if what == "kept":
                    kept.append(f"{e.problem_key}/{e.workload_key}")
            return ImportResult(counts["added"], counts["replaced"], counts["kept"], tuple(kept))

        return self._write(work)

    def get_result(self, device_fingerprint: str, kernel_hash: str, problem_key: str,
                   workload_key: str | None = None) -> TunedEntry | None:
        """The answer for exactly this kernel hash (stale entries are never served). Without a
        workload key: the most recently written entry for the problem."""
        def work(session: Session) -> TunedEntry | None:
            q = (select(TunedConfig)
                 .join(TunedConfig.device).join(TunedConfig.kernel_build)
                 .join(TunedConfig.problem).join(TunedConfig.workload)
                 .where(Device.fingerprint == device_fingerprint,
                        KernelBuild.kernel_hash == kernel_hash,
                        ProblemRow.key == problem_key))
            if workload_key is not None:
                q = q.where(WorkloadRow.key == workload_key)
            q = q.order_by(TunedConfig.updated_at.desc(), TunedConfig.id.desc()).limit(1)
            row = session.scalars(q).unique().one_or_none()
            return to_entry(row, kernel_hash) if row is not None else None

        return self._read(work, None)

    def list_results(self, device_fingerprint: str | None = None,
                     current_kernel_hash: str | None = None) -> list[TunedEntry]:
        """Every stored entry (optionally of one device); `.stale` is set for entries whose
        kernel hash differs from `current_kernel_hash` (left False when that is None)."""
        def work(session: Session) -> list[TunedEntry]:
            q = (select(TunedConfig).join(TunedConfig.device).join(TunedConfig.problem)
                 .join(TunedConfig.workload)
                 .order_by(Device.name, Device.fingerprint, ProblemRow.key, WorkloadRow.key,
                           TunedConfig.id))
            if device_fingerprint is not None:
                q = q.where(Device.fingerprint == device_fingerprint)
            return [to_entry(r, current_kernel_hash) for r in session.scalars(q).unique()]

        return self._read(work, [])

    def kernel_hashes(self) -> list[str]:
        """The kernel hashes stored entries were measured with."""
        def work(session: Session) -> list[str]:
            q = (select(KernelBuild.kernel_hash).join(TunedConfig, TunedConfig.kernel_build_id == KernelBuild.id)
                 .distinct().order_by(KernelBuild.kernel_hash))
            return list(session.scalars(q))

        return self._read(work, [])

    def stale_count(self, current_kernel_hash: str) -> int:
        def work(session: Session) -> int:
            q = (select(func.count(TunedConfig.id)).join(TunedConfig.kernel_build)
                 .where(KernelBuild.kernel_hash != current_kernel_hash))
            return int(session.scalar(q) or 0)

        return self._read(work, 0)

    def devices(self) -> list[dict[str, Any]]:
        """Every device known (with at least one run or result), as DeviceInfo-style dicts."""
        def work(session: Session) -> list[dict[str, Any]]:
            rows = session.scalars(select(Device).order_by(Device.name, Device.fingerprint))
            return [device_dict(d) for d in rows]

        return self._read(work, [])

    # -- runs ------------------------------------------------------------------------------
    def start_run(self, device: dict[str, Any], kernel_hash: str, sampler: str,
                  problem_key: str, workload_key: str) -> int:
        """Record that a tuning run began; returns its id for `finish_run`."""
        def work(session: Session) -> int:
            run = TuningRun(
                device_id=device_row(session, device).id,
                kernel_build_id=kernel_build_row(session, kernel_hash).id,
                problem_id=problem_row(session, problem_key, None).id,
                workload_id=workload_row(session, workload_key, None).id,
                sampler=sampler, trials=0, status="running", started_at=utcnow(),
                tool_version=tool_version(),
            )
            session.add(run)
            session.flush()
            return int(run.id)

        return self._write(work)

    def finish_run(self, run_id: int, status: str, trials: int) -> None:
        if status not in RUN_STATUSES:
            raise DatabaseError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")

        def work(session: Session) -> None:
            run = session.get(TuningRun, run_id)
            if run is None:
                raise DatabaseError(f"no tuning run with id {run_id}")
            run.status = status
            run.trials = int(trials)
            run.finished_at = utcnow()

        self._write(work)

    def list_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        def work(session: Session) -> list[dict[str, Any]]:
            q = (select(TuningRun, Device.fingerprint, KernelBuild.kernel_hash, ProblemRow.key,
                        WorkloadRow.key)
                 .join(Device, TuningRun.device_id == Device.id)
                 .join(KernelBuild, TuningRun.kernel_build_id == KernelBuild.id)
                 .join(ProblemRow, TuningRun.problem_id == ProblemRow.id)
                 .join(WorkloadRow, TuningRun.workload_id == WorkloadRow.id)
                 .order_by(TuningRun.id.desc()).limit(limit))
            return [
                {"id": r.id, "device_fingerprint": fp, "kernel_hash": kh, "problem_key": pk,
                 "workload_key": wk, "sampler": r.sampler, "trials": r.trials,
                 "status": r.status, "started_at": r.started_at, "finished_at": r.finished_at,
                 "tool_version": r.tool_version}
                for r, fp, kh, pk, wk in session.execute(q)
            ]

        return self._read(work, [])

    # -- introspection (doctor) ------------------------------------------------------------
    def schema_revision(self) -> str | None:
        if self._engine is None:
            return None
        engine = self._engine

        def work() -> str | None:
            with engine.connect() as conn:
                return migrate.current_revision(conn)

        return self._retry(work)

    @staticmethod
    def head_revision() -> str:
        return migrate.head_revision()

    def table_names(self) -> list[str]:
        if self._engine is None:
            return []
        engine = self._engine
        return self._retry(lambda: sorted(inspect(engine).get_table_names()))

    def is_writable(self) -> tuple[bool, str]:
        """Whether writes would succeed, with the reason when not (checked without writing)."""
        if self.path is not None:
            if not self.path.exists() and self.path == default_db_path():
                # The default folder is created on first write: its nearest ancestor decides.
                ancestor = self.path.parent
                while not ancestor.exists():
                    ancestor = ancestor.parent
                if ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK):
                    return True, ""
                return False, f"cannot create {self.path.parent}: {ancestor} is not writable"
            try:
                check_sqlite_file(self.path, readonly=False, create_parent=False)
            except DatabaseError as exc:
                return False, str(exc)
            return True, ""
        if self._engine is None:
            return False, "closed"
        engine = self._engine

        def work() -> tuple[bool, str]:
            with engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    ro = conn.execute(text("SHOW transaction_read_only")).scalar()
                    ok = conn.execute(text(
                        "SELECT has_table_privilege('gemmtune_tuned_configs', 'INSERT')")).scalar()
                    if ro == "on":
                        return False, "server session is read-only"
                    return bool(ok), "" if ok else "no INSERT privilege on gemmtune tables"
                return True, ""

        return self._retry(work)
