"""Schema migrations: our own version table beside Optuna's, upgrade of older databases, refusal
of newer ones, and migrations that produce exactly the models the code uses."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from gemmtune.db import migrate
from gemmtune.db.errors import SchemaTooNewError, SchemaUpgradeRequiredError
from gemmtune.db.models import VERSION_TABLE, Base
from gemmtune.db.store import Store


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url)


def test_migrations_create_exactly_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    Store.open(db_url).close()
    engine = _engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True, "version_table": VERSION_TABLE,
            "include_name": lambda name, type_, _p: type_ != "table" or name.startswith("gemmtune_"),
        })
        diff = compare_metadata(ctx, Base.metadata)
        tables = set(sa.inspect(conn).get_table_names())
        rev = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    assert diff == []
    assert {t.name for t in Base.metadata.sorted_tables} <= tables
    assert all(t.startswith("gemmtune_") for t in tables)
    assert "alembic_version" not in tables  # Optuna's version table is not ours to create
    assert rev == migrate.head_revision()


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "gemmtune-first"])
def test_optuna_shares_the_database(db_url, make_entry, optuna_first):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def optuna_side() -> None:
        study = optuna.create_study(storage=db_url, study_name="shared", load_if_exists=True)
        study.optimize(lambda t: (t.suggest_int("x", 0, 10) - 3) ** 2, n_trials=3)

    if optuna_first:
        optuna_side()
    with Store.open(db_url) as store:
        store.put_result(make_entry())
    if not optuna_first:
        optuna_side()
    with Store.open(db_url) as store:  # reopening sees both, migrates nothing
        assert len(store.list_results()) == 1
        assert store.revision == migrate.head_revision()
    study = optuna.load_study(study_name="shared", storage=db_url)
    assert len(study.trials) == 3
    engine = _engine(db_url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        optuna_rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert {"alembic_version", VERSION_TABLE, "studies", "trials"} <= tables
    assert optuna_rev and optuna_rev != migrate.head_revision()


def _stamp(url: str, revision: str) -> None:
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision})
    engine.dispose()


def test_a_database_newer_than_the_code_is_refused_untouched(tmp_path, make_entry):
    path = tmp_path / "t.db"
    with Store.open(str(path)) as store:
        store.put_result(make_entry())
    _stamp(f"sqlite:///{path}", "9999_from_the_future")
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(SchemaTooNewError) as info:
            Store.open(str(path), readonly=readonly)
        msg = str(info.value)
        assert "9999_from_the_future" in msg and "upgrade gemmtune" in msg and "\n" not in msg
    assert path.read_bytes() == before


@pytest.mark.postgres
def test_a_newer_postgres_database_is_refused(pg_url, make_entry):
    with Store.open(pg_url) as store:
        store.put_result(make_entry())
    _stamp(pg_url, "9999_from_the_future")
    with pytest.raises(SchemaTooNewError, match="9999_from_the_future"):
        Store.open(pg_url)


def _scripts_with_extra_revision(tmp_path: Path) -> Path:
    """The shipped migrations plus a later revision adding a column: stands in for the next
    release, to check that opening an older database upgrades it in place."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts,
                    ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head_revision()
    (scripts / "versions" / "9000_add_note.py").write_text(textwrap.dedent(f'''
        import sqlalchemy as sa
        from alembic import op

        revision = "9000"
        down_revision = "{head}"
        branch_labels = None
        depends_on = None

        def upgrade():
            with op.batch_alter_table("gemmtune_devices") as batch:
                batch.add_column(sa.Column("note", sa.Text(), nullable=True))

        def downgrade():
            with op.batch_alter_table("gemmtune_devices") as batch:
                batch.drop_column("note")
    '''))
    return scripts


def test_opening_an_older_database_upgrades_it_and_keeps_the_data(db_url, tmp_path, make_entry):
    e = make_entry()
    with Store.open(db_url) as store:
        store.put_result(e)
    scripts = _scripts_with_extra_revision(tmp_path)
    if db_url.startswith("sqlite"):
        # read-only opening cannot upgrade: it says so instead of half-working
        with pytest.raises(SchemaUpgradeRequiredError, match="needs an upgrade"):
            Store.open(db_url, readonly=True, _script_location=scripts)
    with Store.open(db_url, _script_location=scripts) as store:
        assert store.revision == "9000"
        got = store.get_result(e.device_fingerprint, e.kernel_hash, e.problem_key, "decode")
    assert got is not None and got.objective_us == e.objective_us
    engine = _engine(db_url)
    with engine.connect() as conn:
        cols = {c["name"] for c in sa.inspect(conn).get_columns("gemmtune_devices")}
    engine.dispose()
    assert "note" in cols
    # and the shipped code now meets a newer database: refused
    with pytest.raises(SchemaTooNewError):
        Store.open(db_url)


def test_developer_alembic_ini_runs_the_same_migrations(tmp_path, monkeypatch):
    from alembic import command
    from alembic.config import Config

    ini = Path(migrate.__file__).with_name("alembic.ini")
    path = tmp_path / "dev.db"
    monkeypatch.setenv("GEMMTUNE_DB", str(path))
    command.upgrade(Config(str(ini)), "head")
    with Store.open(str(path)) as store:
        assert store.revision == migrate.head_revision()
