"""Schema migrations: our own version table beside Optuna's, upgrade of older databases, refusal
of newer ones, and migrations that produce exactly the models the code uses."""

from __future__ import annotations

import dataclasses
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


def _schema_diff(url: str) -> list:
    """What autogenerate would change to make the database the models (empty: identical)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True, "version_table": VERSION_TABLE,
            "include_name": lambda name, type_, _p: type_ != "table" or name.startswith("gemmtune_"),
        })
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


def test_migrations_create_exactly_the_models(db_url):
    Store.open(db_url).close()
    diff = _schema_diff(db_url)
    engine = _engine(db_url)
    with engine.connect() as conn:
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


# -- 0002: the plan over M bands -----------------------------------------------------------------


def _alembic(url: str, verb: str, revision: str) -> None:
    """`alembic upgrade|downgrade REVISION` on `url`, as the store's own migration runs it."""
    from alembic import command

    engine = _engine(url)
    with engine.begin() as conn:
        cfg = migrate.alembic_config()
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)
    engine.dispose()


def _insert_at_0001(url: str, e) -> None:
    """One tuned row written the way the 0001 code wrote it (its tables, no `bands` column)."""
    engine = _engine(url)
    meta = sa.MetaData()
    meta.reflect(engine, only=lambda name, _m: name.startswith("gemmtune_"))
    t = meta.tables
    assert "bands" not in t["gemmtune_tuned_configs"].c
    now = e.created_at
    d = e.device
    with engine.begin() as conn:
        dev = conn.execute(t["gemmtune_devices"].insert().values(
            fingerprint=d["fingerprint"], vendor=d["vendor"], name=d["name"],
            compute_capability=d["compute_capability"], sm_count=d["sm_count"],
            memory_bytes=d["memory_bytes"], driver_version=d["driver_version"],
            runtime_version=d["runtime_version"], first_seen=now, last_seen=now)).inserted_primary_key[0]
        kb = conn.execute(t["gemmtune_kernel_builds"].insert().values(
            kernel_hash=e.kernel_hash, first_seen=now)).inserted_primary_key[0]
        prob = conn.execute(t["gemmtune_problems"].insert().values(
            key=e.problem_key, **e.problem)).inserted_primary_key[0]
        wl = conn.execute(t["gemmtune_workloads"].insert().values(
            key=e.workload_key, **e.workload)).inserted_primary_key[0]
        conn.execute(t["gemmtune_tuned_configs"].insert().values(
            device_id=dev, kernel_build_id=kb, problem_id=prob, workload_id=wl, run_id=None,
            config=e.config, config_key="k", objective_us=e.objective_us,
            default_objective_us=e.default_objective_us,
            latencies_us={str(m): v for m, v in e.latencies_us.items()},
            default_latencies_us={str(m): v for m, v in e.default_latencies_us.items()},
            source="tuned", provenance=e.provenance, origin="", created_at=now, updated_at=now))
    engine.dispose()


def _bands_column(url: str) -> bool:
    engine = _engine(url)
    with engine.connect() as conn:
        cols = {c["name"] for c in sa.inspect(conn).get_columns("gemmtune_tuned_configs")}
    engine.dispose()
    return "bands" in cols


def test_0002_upgrades_an_0001_database_with_its_rows_and_downgrades_back(db_url, make_entry):
    from gemmtune.kernels import KernelConfig

    old = make_entry(workload="mixed", config=KernelConfig(max_q_gemm_rows=32))
    _alembic(db_url, "upgrade", "0001")
    _insert_at_0001(db_url, old)

    # upgrade: the old row reads as one band of its config, nothing else changed
    with Store.open(db_url) as store:
        assert store.revision == migrate.head_revision() and _bands_column(db_url)
        (got,) = store.list_results()
        assert got.bands == () and got.plan == ((None, old.config),)
        assert (got.config, got.latencies_us, got.objective_us) == (
            old.config, old.latencies_us, old.objective_us)
        top = KernelConfig(max_q_gemm_rows=64, block_n=128, threads=128).to_dict()
        small = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8).to_dict()
        store.put_result(dataclasses.replace(
            make_entry(workload="decode", config=KernelConfig.from_dict(top)),
            bands=((4, small), (None, top))))
        banded = store.get_result(old.device_fingerprint, old.kernel_hash, old.problem_key,
                                  "decode")
        assert banded is not None and banded.bands == ((4, small), (None, top))

    # downgrade: the column goes, every row stays and keeps `config` (the last band's)
    _alembic(db_url, "downgrade", "0001")
    assert not _bands_column(db_url)
    engine = _engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT config FROM gemmtune_tuned_configs")).all()
        rev = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    engine.dispose()
    assert rev == "0001" and len(rows) == 2

    # and up again: both entries served, the banded one now as its last band alone
    with Store.open(db_url) as store:
        got = {e.workload_key: e for e in store.list_results()}
    assert got["mixed"].config == old.config and got["decode"].config == top
    assert got["decode"].bands == () and got["decode"].plan == ((None, top),)
    assert _schema_diff(db_url) == []  # the batch copy of SQLite kept every name and index


# -- 0003: config_key is TEXT ----------------------------------------------------------------------


def _config_key_length(url: str) -> int | None:
    engine = _engine(url)
    with engine.connect() as conn:
        col = next(c for c in sa.inspect(conn).get_columns("gemmtune_tuned_configs")
                   if c["name"] == "config_key")
    engine.dispose()
    return getattr(col["type"], "length", None)


def test_0003_stores_a_config_whose_key_is_longer_than_256(db_url, make_entry):
    """Every config of today spells past 256 characters (twenty fields since the wgmma and
    stream families); PostgreSQL refused them all under VARCHAR(256)."""
    from gemmtune.autotune.space import STREAM_START
    from gemmtune.db.entry import config_key

    entry = make_entry(workload="decode", config=STREAM_START)
    assert len(config_key(STREAM_START.to_dict())) > 256
    _alembic(db_url, "upgrade", "0002")
    assert _config_key_length(db_url) == 256
    with Store.open(db_url) as store:  # upgrades to head
        assert _config_key_length(db_url) is None
        store.put_result(entry)
        (got,) = store.list_results()
        assert got.config == entry.config and got.config_key == config_key(entry.config)
    _alembic(db_url, "downgrade", "0002")  # the row stays, its derived key cut to fit
    assert _config_key_length(db_url) == 256
    with Store.open(db_url) as store:
        (got,) = store.list_results()
        assert got.config == entry.config
