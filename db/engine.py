"""SQLAlchemy engines for the store, SQLite's file checks and driver-error translation.

Why it looks like this (see also `store.py`):
- SQLite is opened in WAL mode with a busy timeout, and gemmtune takes transaction control from
  pysqlite so that writes can `BEGIN IMMEDIATE` (taking the write lock up front avoids the
  deadlock-like SQLITE_BUSY of a reader upgrading to a writer) and migrations are atomic.
- Every driver error is translated into a typed `errors.DatabaseError` with one line naming the database
  (password hidden), so the CLI prints it and the runtime can degrade to defaults with one warning.
- A file that is not an intact SQLite database, a directory, or a read-only file is recognised
  *before* SQLite gets a chance to write anything to it.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from . import errors
from .paths import sqlite_path

_SQLITE_MAGIC = b"SQLite format 3\x00"


# --------------------------------------------------------------------------------------------
# error translation
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    msg = str(orig).strip().splitlines()
    return msg[0].strip() if msg else type(orig).__name__


def is_locked(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    msg = str(orig or exc).lower()
    return "database is locked" in msg or "database table is locked" in msg or "busy" in msg


class Translator:
    """Maps driver exceptions to typed DatabaseErrors naming `where`."""

    def __init__(self, where: str, path: Path | None) -> None:
        self.where = where
        self.path = path

    def __call__(self, exc: BaseException) -> errors.DatabaseError:
        if isinstance(exc, errors.DatabaseError):
            return exc
        line = _first_line(exc)
        low = line.lower()
        w = self.where
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return errors.DatabaseCorruptError(
                f"database {w} is damaged ({line}); nothing was changed: move the file away "
                "(gemmtune starts a fresh one) or pass another --db"
            )
        if "readonly" in low or "read-only" in low or "read only" in low:
            return errors.DatabaseReadOnlyError(f"database {w} is read-only ({line}); nothing was changed")
        if is_locked(exc):
            return errors.DatabaseLockedError(
                f"database {w} stayed locked by another process ({line}); retry when the other "
                "writer is done"
            )
        if "unable to open database file" in low:
            return errors.DatabasePathError(f"cannot open database {w} ({line})")
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) and self.path is None:
            return errors.DatabaseUnavailableError(f"cannot use database {w}: {line}")
        return errors.DatabaseError(f"database {w}: {line}")


# --------------------------------------------------------------------------------------------
# SQLite file checks (before SQLite may write anything)
# --------------------------------------------------------------------------------------------


def check_sqlite_file(path: Path, *, readonly: bool, create_parent: bool) -> bool:
    """Validate the path of a SQLite database. Returns True when the file exists.

    `create_parent` marks the default location, whose folder appears on first write: reading
    it before then is reading an empty database. Any other path into a missing folder is an
    error, read-only or not (a typo must not read as "nothing tuned yet")."""
    if path.is_dir():
        raise errors.DatabasePathError(
            f"{path} is a directory, not a database file; pass a file path with --db or GEMMTUNE_DB"
        )
    parent = path.parent
    if not parent.exists():
        if create_parent and not readonly:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise errors.DatabasePathError(f"cannot create folder {parent} for the database: "
                                        f"{exc.strerror or exc}") from None
        else:
            if readonly and create_parent:
                return False
            raise errors.DatabasePathError(f"folder {parent} does not exist (database {path})")
    elif not parent.is_dir():
        raise errors.DatabasePathError(f"{parent} is not a folder (database {path})")
    if not path.exists():
        if not readonly and not os.access(parent, os.W_OK | os.X_OK):
            raise errors.DatabaseReadOnlyError(f"cannot create database {path}: folder {parent} is not writable")
        return False
    if not path.is_file():
        raise errors.DatabasePathError(f"{path} is not a regular file")
    check_sqlite_header(path)
    if not readonly:
        mode = path.stat().st_mode
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
            raise errors.DatabaseReadOnlyError(
                f"database {path} is read-only; nothing was changed (make it writable or pass "
                "another --db)"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise errors.DatabaseReadOnlyError(
                f"database {path}: folder {parent} is not writable (SQLite needs its -wal and "
                "-shm files there); nothing was changed"
            )
    return True


def check_sqlite_header(path: Path) -> None:
    """Reject files that are not SQLite, and SQLite files shorter than their header says.

    An empty file is a valid empty database to SQLite, and we treat it the same way."""
    try:
        size = path.stat().st_size
        if size == 0:
            return
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise errors.DatabasePathError(f"cannot read database {path}: {exc.strerror or exc}") from None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise errors.DatabaseCorruptError(
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
        raise errors.DatabaseCorruptError(
            f"database {path} is truncated ({size} bytes, its header says {pages * page_size}); "
            "nothing was changed: restore it or move it away"
        )


# --------------------------------------------------------------------------------------------
# engines
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


def make_engine(u: URL, path: Path | None, readonly: bool, busy_timeout_s: float) -> Engine:
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
