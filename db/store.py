"""The store: the one API through which the tuner writes results and the runtime reads them.

Why it looks like this:
- A result is valid only for the kernel build that measured it, so `get_result` serves exactly the
  requested `kernel_hash`; other hashes are *stale*: listed (with `.stale`), never served.
- Tuning workers write while models load and other workers tune. SQLite is therefore opened in
  WAL mode with a busy timeout, every write is one short `BEGIN IMMEDIATE` transaction (taking
  the write lock up front avoids the deadlock-like SQLITE_BUSY of a reader upgrading to a writer),
  and a write that still meets a lock is retried with backoff; only after `lock_timeout_s` does a
  typed `DatabaseLockedError` surface. "database is locked" never reaches the user raw.
- Every driver error is translated into a typed `DatabaseError` with one line naming the database
  (password hidden), so the CLI prints it and the runtime can degrade to defaults with one warning.
- A file that is not an intact SQLite database, a directory, or a read-only file is recognised
  *before* SQLite gets a chance to write anything to it.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from . import migrate
from .errors import (
    DatabaseCorruptError,
    DatabaseError,
    DatabaseLockedError,
    DatabasePathError,
    DatabaseReadOnlyError,
    DatabaseUnavailableError,
)
from .models import Device, KernelBuild, ProblemRow, TunedConfig, TuningRun, WorkloadRow, utcnow
from .paths import default_db_path, resolve_url, sqlite_path

T = TypeVar("T")

BUSY_TIMEOUT_S = 15.0
"""SQLite waits this long inside one statement for a lock before reporting busy."""

LOCK_TIMEOUT_S = 120.0
"""Total time a write keeps retrying a locked database before `DatabaseLockedError`."""

LAST_SEEN_RESOLUTION = timedelta(minutes=10)
"""`Device.last_seen` is refreshed at most this often (it is informational)."""

RUN_STATUSES = ("running", "finished", "failed", "interrupted")
SOURCES = ("tuned", "imported")

_SQLITE_MAGIC = b"SQLite format 3\x00"


def tool_version() -> str:
    """Version of the installed gemmtune distribution (db may not import the top package)."""
    try:
        return metadata.version("gemmtune")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


@dataclass
class TunedEntry:
    """One stored answer, in plain data (the db layer does not know the kernel objects)."""

    device: dict[str, Any]
    kernel_hash: str
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


@dataclass(frozen=True)
class ImportResult:
    """What a bulk write did: counts of added, replaced and kept (existing local won) entries."""

    added: int = 0
    replaced: int = 0
    kept: int = 0
    kept_keys: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# error translation
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    msg = str(orig).strip().splitlines()
    return msg[0].strip() if msg else type(orig).__name__


def _is_locked(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    msg = str(orig or exc).lower()
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


class _Translator:
    """Maps driver exceptions to typed DatabaseErrors naming `where`."""

    def __init__(self, where: str, path: Path | None) -> None:
        self.where = where
        self.path = path

    def __call__(self, exc: BaseException) -> DatabaseError:
        if isinstance(exc, DatabaseError):
            return exc
        line = _first_line(exc)
        low = line.lower()
        w = self.where
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return DatabaseCorruptError(
                f"database {w} is damaged ({line}); nothing was changed: move the file away "
                "(gemmtune starts a fresh one) or pass another --db"
            )
        if "readonly" in low or "read-only" in low or "read only" in low:
            return DatabaseReadOnlyError(f"database {w} is read-only ({line}); nothing was changed")
        if _is_locked(exc):
            return DatabaseLockedError(
                f"database {w} stayed locked by another process ({line}); retry when the other "
                "writer is done"
            )
        if "unable to open database file" in low:
            return DatabasePathError(f"cannot open database {w} ({line})")
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) and self.path is None:
            return DatabaseUnavailableError(f"cannot use database {w}: {line}")
        return DatabaseError(f"database {w}: {line}")


# --------------------------------------------------------------------------------------------
# SQLite file checks (before SQLite may write anything)
# --------------------------------------------------------------------------------------------


def _check_sqlite_file(path: Path, *, readonly: bool, create_parent: bool) -> bool:
    """Validate the path of a SQLite database. Returns True when the file exists."""
    if path.is_dir():
        raise DatabasePathError(
            f"{path} is a directory, not a database file; pass a file path with --db or GEMMTUNE_DB"
        )
    parent = path.parent
    if not parent.exists():
        if create_parent and not readonly:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabasePathError(f"cannot create folder {parent} for the database: "
                                        f"{exc.strerror or exc}") from None
        else:
            if readonly:
                return False
            raise DatabasePathError(f"folder {parent} does not exist (database {path})")
    elif not parent.is_dir():
        raise DatabasePathError(f"{parent} is not a folder (database {path})")
    if not path.exists():
        if not readonly and not os.access(parent, os.W_OK | os.X_OK):
            raise DatabaseReadOnlyError(f"cannot create database {path}: folder {parent} is not writable")
        return False
    if not path.is_file():
        raise DatabasePathError(f"{path} is not a regular file")
    _check_sqlite_header(path)
    if not readonly:
        mode = path.stat().st_mode
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
            raise DatabaseReadOnlyError(
                f"database {path} is read-only; nothing was changed (make it writable or pass "
                "another --db)"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DatabaseReadOnlyError(
                f"database {path}: folder {parent} is not writable (SQLite needs its -wal and "
                "-shm files there); nothing was changed"
            )
    return True


def _check_sqlite_header(path: Path) -> None:
    """Reject files that are not SQLite, and SQLite files shorter than their header says.

    An empty file is a valid empty database to SQLite, and we treat it the same way."""
    try:
        size = path.stat().st_size
        if size == 0:
            return
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise DatabasePathError(f"cannot read database {path}: {exc.strerror or exc}") from None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise DatabaseCorruptError(
            f"{path} is not a SQLite database (bad header); nothing was changed: move the file "
            "away (gemmtune starts a fresh one) or pass another --db"
        )
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    wal = path.with_name(path.name + "-wal")
    wal_pending = wal.exists() and wal.stat().st_size > 0
    if pages and valid_for == change_counter and not wal_pending and size < pages * page_size:
        raise DatabaseCorruptError(
            f"database {path} is truncated ({size} bytes, its header says {pages * page_size}); "
            "nothing was changed: restore it or move it away"
        )


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


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
        self._translate = _Translator(display_url(url), path)
        self.revision: str | None = None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | None = None, *, readonly: bool = False,
             lock_timeout_s: float = LOCK_TIMEOUT_S,
             _script_location: Path | None = None) -> Store:
        """Open (creating and migrating as needed) the database at `url`.

        `url`: a SQLAlchemy URL or a file path; None means `GEMMTUNE_DB`, else the default file.
        `readonly=True` never writes (no schema creation or upgrade, SQLite opened `mode=ro`);
        a missing file then reads as an empty database. Raises typed `DatabaseError`s."""
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
            exists = _check_sqlite_file(path, readonly=readonly,
                                        create_parent=path == default_path)
            if readonly and not exists:
                return cls(resolved, None, readonly=True, path=path, lock_timeout_s=lock_timeout_s)
        translate = _Translator(where, path)
        try:
            engine = _make_engine(u, path, readonly, min(BUSY_TIMEOUT_S, lock_timeout_s))
        except (ImportError, sa_exc.NoSuchModuleError) as exc:
            raise DatabaseUnavailableError(
                f"cannot use database {where}: its driver is not installed ({exc}); for "
                "PostgreSQL: pip install 'gemmtune[postgres]'"
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
                if not _is_locked(exc) or time.monotonic() + delay > deadline:
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

    # -- dimension rows --------------------------------------------------------------------
    @staticmethod
    def _get_or_create(session: Session, model: Any, key_attr: str, key: Any,
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

    def _device(self, session: Session, device: dict[str, Any]) -> Device:
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
        row = self._get_or_create(session, Device, "fingerprint", fp,
                                  {**fields, "first_seen": now, "last_seen": now})
        for name, value in fields.items():
            if value and getattr(row, name) != value:
                setattr(row, name, value)
        # Touch the shared device row only when it says something new: every worker of a
        # fleet writes results for the same device, and a row update is a row lock.
        if now - row.last_seen > LAST_SEEN_RESOLUTION:
            row.last_seen = now
        return row

    def _kernel_build(self, session: Session, kernel_hash: str) -> KernelBuild:
        if not kernel_hash:
            raise DatabaseError("empty kernel_hash")
        return self._get_or_create(session, KernelBuild, "kernel_hash", kernel_hash,
                                   {"first_seen": utcnow()})

    def _problem(self, session: Session, key: str, problem: dict[str, Any] | None) -> ProblemRow:
        p = problem or {}
        vals = {f: p.get(f) for f in ("k", "n", "bits", "group_size", "act_order")}
        return self._get_or_create(session, ProblemRow, "key", key, vals, update=vals)

    def _workload(self, session: Session, key: str, workload: dict[str, Any] | None) -> WorkloadRow:
        w = workload or {}
        vals = {"name": str(w.get("name", "")),
                "ms": list(w["ms"]) if "ms" in w else None,
                "weights": list(w["weights"]) if "weights" in w else None}
        return self._get_or_create(session, WorkloadRow, "key", key, vals,
                                   update={k: v for k, v in vals.items() if v})

    # -- results ---------------------------------------------------------------------------
    def put_result(self, entry: TunedEntry) -> None:
        """Insert or replace the answer for (device, kernel hash, problem, workload)."""
        _check_entry(entry)
        self._write(lambda s: self._upsert(s, entry, replace=True))

    def _upsert(self, session: Session, entry: TunedEntry, *, replace: bool) -> str:
        """Returns 'added', 'replaced' or 'kept'."""
        dev = self._device(session, entry.device)
        kb = self._kernel_build(session, entry.kernel_hash)
        prob = self._problem(session, entry.problem_key, entry.problem)
        wl = self._workload(session, entry.workload_key, entry.workload)
        session.flush()
        where = (TunedConfig.device_id == dev.id, TunedConfig.kernel_build_id == kb.id,
                 TunedConfig.problem_id == prob.id, TunedConfig.workload_id == wl.id)
        row = session.scalars(select(TunedConfig).where(*where)).one_or_none()
        now = utcnow()
        values = {
            "config": dict(entry.config),
            "config_key": entry.config_key or _config_key(entry.config),
            "objective_us": float(entry.objective_us),
            "default_objective_us": float(entry.default_objective_us),
            "latencies_us": _lat_to_json(entry.latencies_us),
            "default_latencies_us": _lat_to_json(entry.default_latencies_us),
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

    def import_entries(self, entries: Iterable[TunedEntry], *, replace: bool = False) -> ImportResult:
        """Write many entries in ONE transaction: all land or none. Existing entries for the same
        (device, kernel hash, problem, workload) are kept unless `replace`."""
        items = list(entries)
        for e in items:
            _check_entry(e)

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
            return _to_entry(row, kernel_hash) if row is not None else None

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
            return [_to_entry(r, current_kernel_hash) for r in session.scalars(q).unique()]

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
            return [_device_dict(d) for d in rows]

        return self._read(work, [])

    # -- runs ------------------------------------------------------------------------------
    def start_run(self, device: dict[str, Any], kernel_hash: str, sampler: str,
                  problem_key: str, workload_key: str) -> int:
        """Record that a tuning run began; returns its id for `finish_run`."""
        def work(session: Session) -> int:
            run = TuningRun(
                device_id=self._device(session, device).id,
                kernel_build_id=self._kernel_build(session, kernel_hash).id,
                problem_id=self._problem(session, problem_key, None).id,
                workload_id=self._workload(session, workload_key, None).id,
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
                _check_sqlite_file(self.path, readonly=False, create_parent=False)
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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def display_url(url: str) -> str:
    """The URL without its password; for SQLite files, just the path."""
    try:
        u = make_url(url)
    except sa_exc.ArgumentError:
        return url
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    return u.render_as_string(hide_password=True)


def _make_engine(u: URL, path: Path | None, readonly: bool, busy_timeout_s: float) -> Engine:
    if u.get_backend_name() != "sqlite":
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if u.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 10}
        return create_engine(u, **kwargs)
    connect_args: dict[str, Any] = {"timeout": busy_timeout_s, "check_same_thread": False}
    if path is not None and readonly:
        u = make_url(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true")
    engine = create_engine(u, connect_args=connect_args)
    wal = path is not None and not readonly

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite (which would not BEGIN before DDL), so that
        # migrations are atomic and writes can BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if wal:
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("gemmtune_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write and not readonly else "BEGIN")

    return engine


def serialize_sqlite_transactions(engine: Engine) -> None:
    """Make every transaction on a SQLite `engine` made elsewhere (Optuna's storage) take the
    write lock when it begins (`BEGIN IMMEDIATE`).

    SQLite has no `SELECT ... FOR UPDATE`: two processes sharing one study could both read an
    enqueued trial as waiting, both claim it and measure it twice, and the second to finish then
    fails on a trial that is already complete. Optuna's transactions are a few milliseconds
    against seconds per trial, so serializing them costs nothing measurable. Connections
    already pooled are dropped so that every later one gets the hooks. Other backends lock
    rows and are left alone. The busy timeout is the caller's (pysqlite's `timeout`).
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # BEGIN is ours, not pysqlite's

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def _lat_to_json(lat: dict[int, float]) -> dict[str, float]:
    return {str(int(m)): float(v) for m, v in sorted(lat.items(), key=lambda kv: int(kv[0]))}


def _lat_from_json(lat: dict[str, Any] | None) -> dict[int, float]:
    return {int(m): float(v) for m, v in (lat or {}).items()}


def _config_key(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


def _device_dict(d: Device) -> dict[str, Any]:
    return {
        "vendor": d.vendor, "name": d.name, "compute_capability": d.compute_capability,
        "sm_count": d.sm_count, "memory_bytes": d.memory_bytes,
        "driver_version": d.driver_version, "runtime_version": d.runtime_version,
        "fingerprint": d.fingerprint,
    }


def _to_entry(row: TunedConfig, current_kernel_hash: str | None) -> TunedEntry:
    p, w = row.problem, row.workload
    problem = {"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
               "act_order": p.act_order}
    workload = {"name": w.name, "ms": list(w.ms or []), "weights": list(w.weights or [])}
    kh = row.kernel_build.kernel_hash
    return TunedEntry(
        device=_device_dict(row.device),
        kernel_hash=kh,
        problem=problem,
        problem_key=p.key,
        workload=workload,
        workload_key=w.key,
        config=dict(row.config),
        objective_us=row.objective_us,
        default_objective_us=row.default_objective_us,
        latencies_us=_lat_from_json(row.latencies_us),
        default_latencies_us=_lat_from_json(row.default_latencies_us),
        source=row.source,
        provenance=row.provenance,
        created_at=row.created_at,
        stale=current_kernel_hash is not None and kh != current_kernel_hash,
        run_id=row.run_id,
        origin=row.origin,
        config_key=row.config_key,
    )


def _check_entry(e: TunedEntry) -> None:
    """Cheap sanity checks of what callers hand the store (the domain checks live upstream)."""
    if e.source not in SOURCES:
        raise DatabaseError(f"entry source {e.source!r} is not one of {', '.join(SOURCES)}")
    if not e.problem_key or not e.workload_key or not e.kernel_hash:
        raise DatabaseError("entry needs problem_key, workload_key and kernel_hash")
    if not e.device_fingerprint:
        raise DatabaseError("entry device has no 'fingerprint' (pass DeviceInfo.to_dict())")
