"""Alembic environment of gemmtune.

Run two ways: programmatically by `gemmtune.db.migrate` (which hands over an open connection
already inside the transaction that holds the migration lock), or by a developer's `alembic -c
db/alembic.ini ...` (URL from the ini, else GEMMTUNE_DB / the default path).

Optuna keeps its tables and its own `alembic_version` in the same database, so this environment
uses the `gemmtune_alembic_version` table and only ever looks at `gemmtune_*` tables.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from gemmtune.db.models import PREFIX, VERSION_TABLE, Base
from sqlalchemy import create_engine


def _ours(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "table":
        return bool(name) and name.startswith(PREFIX)  # type: ignore[union-attr]
    return True


def _configure(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
    )


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from gemmtune.db.paths import resolve_url

    url = context.config.get_main_option("sqlalchemy.url") or resolve_url(None)
    engine = create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():  # pragma: no cover - SQL script generation for DBAs
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
