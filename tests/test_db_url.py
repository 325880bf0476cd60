"""`GEMMTUNE_DB` / `--db`: every value has one outcome (db/paths.py lists them). Used: empty (=
unset), URLs with a known scheme, paths. Refused with one line naming the value, by the CLI
(exit 1) and with one warning by the runtime (defaults served): in-memory databases, unknown
schemes, URLs without `//`, bare words. Never a traceback, never a file created."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from gemmtune.db.errors import DatabasePathError
from gemmtune.db.paths import default_db_path, default_url, resolve_url
from gemmtune.db.store import Store
from gemmtune.kernels import DeviceInfo, Problem
from gemmtune.runtime import GemmtuneWarning, clear_cache, lookup

from gemmtune.cli import main
from tests.conftest import TEST_DEVICE

# (value, words the one-line refusal must contain)
REFUSED: list[tuple[str, str]] = [
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    (":memory:", "in-memory"),
    ("sqlite:///file:tuned?mode=memory&uri=true", "in-memory"),
    ("foo://host/db", "unknown database scheme 'foo'"),
    ("postgres://me@127.0.0.1/gemmtune", "postgresql://"),
    ("postgresql+nosuchdriver://me@127.0.0.1/gemmtune", "unknown database scheme"),
    ("sqlite:/tmp/x.db", "lacks '//'"),
    ("tuning", "neither a URL nor a file path"),
    ("postgres", "neither a URL nor a file path"),
]
REFUSED_IDS = [v for v, _ in REFUSED]


@pytest.fixture
def in_empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder: a refused value must leave it (and the default path) empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _nothing_created(cwd: Path) -> None:
    assert sorted(os.listdir(cwd)) == []
    assert not default_db_path().exists()


@pytest.mark.parametrize(("value", "words"), REFUSED, ids=REFUSED_IDS)
def test_refused_values_raise_one_typed_line(value: str, words: str, in_empty_cwd: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatabasePathError) as info:
        resolve_url(value)
    msg = str(info.value)
    assert words in msg and repr(value) in msg and "\n" not in msg
    monkeypatch.setenv("GEMMTUNE_DB", value)
    with pytest.raises(DatabasePathError, match="GEMMTUNE_DB="):
        Store.open()
    with pytest.raises(DatabasePathError):
        Store.open(readonly=True)
    _nothing_created(in_empty_cwd)


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A valid profile outside the watched folder (import must fail on the database, not on it)."""
    import json

    from gemmtune.db.profiles import build_profile
    from gemmtune.db.store import TunedEntry
    from gemmtune.kernels import WORKLOADS, KernelConfig
    from gemmtune.kernels.sources import kernel_hash

    d = tmp_path_factory.mktemp("profile")
    dev = DeviceInfo(**TEST_DEVICE).to_dict()
    w, p = WORKLOADS["decode"], Problem(4096, 4096)
    lat = {m: 2.0 + m for m in w.ms}
    with Store.open(str(d / "src.db")) as store:
        store.put_result(TunedEntry(
            device=dev, kernel_hash=kernel_hash(),
            problem={"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
                     "act_order": p.act_order}, problem_key=p.key(),
            workload={"name": w.name, "ms": list(w.ms), "weights": list(w.weights)},
            workload_key=w.key(), config=KernelConfig().to_dict(),
            objective_us=w.objective(lat), default_objective_us=w.objective(lat),
            latencies_us=lat, default_latencies_us=lat, provenance="test"))
        doc = build_profile(store, dev, current_kernel_hash=kernel_hash()).to_json()
    path = d / "p.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _one_line(r: Result) -> str:
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


@pytest.mark.parametrize("command", ["show", "export", "import", "doctor"])
@pytest.mark.parametrize(("value", "words"), REFUSED, ids=REFUSED_IDS)
def test_cli_refuses_with_one_line_and_creates_nothing(value: str, words: str, command: str,
                                                       in_empty_cwd: Path,
                                                       profile_file: str) -> None:
    args = {"show": ["show"], "export": ["export"], "import": ["import", profile_file],
            "doctor": ["doctor"]}[command]
    for how in ("env", "option"):
        if how == "env":
            r = CliRunner().invoke(main, args, env={"GEMMTUNE_DB": value})
        else:
            r = CliRunner().invoke(main, [*args, "--db", value])
        line = _one_line(r)
        assert words in line and (("GEMMTUNE_DB=" in line) == (how == "env")), line
    _nothing_created(in_empty_cwd)


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_means_unset(value: str, in_empty_cwd: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMTUNE_DB", value)
    assert resolve_url(None) == resolve_url(value) == default_url()
    r = CliRunner().invoke(main, ["show"], env={"GEMMTUNE_DB": value})
    assert r.exit_code == 0 and "nothing tuned yet" in r.output
    r = CliRunner().invoke(main, ["doctor", "--db", value])
    assert "(default)" in r.output
    _nothing_created(in_empty_cwd)


@pytest.mark.parametrize("value", ["tuning.db", "./tuning.db", "sub/tuning.db", "x.sqlite3"])
def test_paths_in_the_current_folder_are_sqlite_files(value: str, in_empty_cwd: Path) -> None:
    (in_empty_cwd / "sub").mkdir()
    url = resolve_url(value)
    assert url == f"sqlite:///{(in_empty_cwd / value).absolute()}"
    with Store.open(value) as store:
        assert store.path == (in_empty_cwd / value).absolute()
    assert (in_empty_cwd / value).is_file()


def test_urls_with_a_known_scheme_pass_unchanged() -> None:
    for url in ("sqlite:////srv/gemmtune.db", "postgresql+psycopg://u:p@db.example/gemmtune",
                "postgresql://u@db.example/gemmtune"):
        assert resolve_url(url) == url


@pytest.mark.parametrize(("value", "words"), REFUSED, ids=REFUSED_IDS)
def test_runtime_serves_defaults_with_one_warning(value: str, words: str, in_empty_cwd: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMTUNE_DB", value)
    clear_cache()
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            dev = DeviceInfo(**TEST_DEVICE)
            results = [lookup(dev, Problem(4096, n)) for n in (4096, 14336, 4096)]
        assert {r.source for r in results} == {"default"}
        msgs = [str(w.message) for w in rec if issubclass(w.category, GemmtuneWarning)]
        assert len(msgs) == 1 and words in msgs[0] and "GEMMTUNE_DB" in msgs[0], msgs
    finally:
        clear_cache()
    _nothing_created(in_empty_cwd)


def test_a_missing_driver_gets_the_install_hint_of_its_own_database_only() -> None:
    # The PostgreSQL extra is the only driver gemmtune ships an extra for: a MySQL URL must not be
    # told to install psycopg.
    from gemmtune.db.errors import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError, match="driver is not installed") as got:
        Store.open("mysql://u@localhost/db")
    assert "postgres" not in str(got.value).lower()
