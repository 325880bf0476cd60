"""Bring a database to this code's schema revision, or refuse it.

Called by `Store.open` on every writable open. The common case (already at head) costs one read
of the version table. Otherwise the upgrade runs inside one transaction that first takes the
database's write lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL advisory lock), so several processes
opening a fresh database at once migrate it exactly once, and a crash mid-upgrade leaves the
previous revision. A revision this code does not know means a newer gemmtune wrote the database:
it is refused, never downgraded or touched.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from .errors import SchemaTooNewError, SchemaUpgradeRequiredError
from .models import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
PG_LOCK_KEY = 0x67656D6D74756E65  # "gemmtune": the advisory lock that serialises migrations


def alembic_config(script_location: Path | None = None) -> Config:
    """Alembic configured in code, so an installed package needs no ini file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location or MIGRATIONS_DIR))
    return cfg


@functools.lru_cache(maxsize=8)
def _script(script_location: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(Path(script_location)))


def head_revision(script_location: Path | None = None) -> str:
    head = _script(str(script_location or MIGRATIONS_DIR)).get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def known_revisions(script_location: Path | None = None) -> set[str]:
    return {r.revision for r in _script(str(script_location or MIGRATIONS_DIR)).walk_revisions()}


def current_revision(conn: Connection) -> str | None:
    """Revision stamped in `gemmtune_alembic_version`, None for a database we never migrated."""
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def check_not_newer(revision: str | None, where: str, script_location: Path | None = None) -> None:
    if revision is not None and revision not in known_revisions(script_location):
        raise SchemaTooNewError(
            f"database {where} has schema revision {revision}, newer than this gemmtune knows "
            f"(up to {head_revision(script_location)}); upgrade gemmtune to use it "
            "(nothing was changed)"
        )


def ensure_schema(
    conn: Connection, where: str, *, readonly: bool = False,
    script_location: Path | None = None,
) -> str | None:
    """Upgrade to head if needed; return the revision the database is at afterwards (None: a
    read-only database without our tables, which reads as empty).

    `conn` must not be in a transaction. The version check runs in a plain read transaction; only
    an upgrade marks the connection as a writer (for SQLite the store's `begin` hook then issues
    BEGIN IMMEDIATE), so opening an up-to-date database never waits for another writer.
    """
    head = head_revision(script_location)
    with conn.begin():
        rev = current_revision(conn)
    check_not_newer(rev, where, script_location)
    if rev == head:
        return rev
    if readonly and rev is None:
        return None
    if readonly:
        raise SchemaUpgradeRequiredError(
            f"database {where} is at schema revision {rev} and needs an upgrade to {head}, but "
            "it is opened read-only; any write (e.g. `gemmtune import`) upgrades it"
        )
    write_conn = conn.execution_options(gemmtune_write=True)
    with write_conn.begin():
        if write_conn.dialect.name == "postgresql":
            write_conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
        rev = current_revision(write_conn)  # someone may have migrated while we waited
        check_not_newer(rev, where, script_location)
        if rev != head:
            cfg = alembic_config(script_location)
            cfg.attributes["connection"] = write_conn
            command.upgrade(cfg, "head")
    return head
