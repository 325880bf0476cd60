"""runtime.lookup: resolution order, caching, and degrading to defaults with one warning."""

from __future__ import annotations

import importlib
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import pytest
from gemmtune.db.store import Store
from gemmtune.kernels import PRESETS, DeviceInfo, KernelConfig, Problem
from gemmtune.kernels.sources import kernel_hash
from gemmtune.runtime import GemmtuneWarning, clear_cache, lookup

from tests.conftest import TEST_DEVICE

pytestmark = pytest.mark.usefixtures("fresh_runtime")

DEV = DeviceInfo(**TEST_DEVICE)
P = Problem(4096, 4096, 4, 128)
P2 = Problem(4096, 14336, 4, 128)
TUNED = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8, block_n=128, threads=256)
OTHER = KernelConfig(max_q_gemm_rows=12, max_q_gemm_rows_kernel=4, block_n=32, threads=64)




def _db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *entries: Any, name: str = "t.db") -> Path:
    path = tmp_path / name
    with Store.open(f"sqlite:///{path}") as store:
        for e in entries:
            store.put_result(e)
    monkeypatch.setenv("GEMMTUNE_DB", str(path))
    return path


def _gemmtune_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GemmtuneWarning)]


def test_nothing_tuned_gives_the_default_silently() -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = lookup(DEV, P)
    assert r.config == PRESETS["default"] and r.source == "default"
    assert _gemmtune_warnings(rec) == []  # a missing *default* database is not an error


def test_a_missing_database_warning_names_where_the_path_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GEMMTUNE_DB is named only when the path came from it: `resolve --db` passes db_url, and a
    warning blaming the environment sent the user to the wrong place."""
    from gemmtune.runtime.lookup import resolve

    missing = tmp_path / "absent.db"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        resolve(DEV, P, db_url=f"sqlite:///{missing}")
    said = _gemmtune_warnings(rec)
    assert len(said) == 1 and str(missing) in said[0] and "GEMMTUNE_DB" not in said[0], said
    clear_cache()
    monkeypatch.setenv("GEMMTUNE_DB", str(tmp_path / "also-absent.db"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        resolve(DEV, P)
    said = _gemmtune_warnings(rec)
    assert len(said) == 1 and "also-absent.db (GEMMTUNE_DB)" in said[0], said


def test_explicit_argument_wins_over_everything(tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=TUNED))
    r = lookup(DEV, P, config="exllamav2-0.0.11")
    assert r.source == "argument" and r.config == PRESETS["exllamav2-0.0.11"]
    assert lookup(DEV, P, config=OTHER).config == OTHER
    assert lookup(DEV, P).config == TUNED  # the argument did not poison the cache


def test_database_serves_the_tuned_config_for_its_device_problem_and_workload(
        tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch,
        make_entry(config=TUNED, workload="decode"),
        make_entry(config=OTHER, workload="prefill"),
        make_entry(14336, 4096, config=OTHER))
    r = lookup(DEV, P, "decode")
    assert (r.config, r.source, r.workload_key) == (TUNED, "database", "decode")
    assert lookup(DEV, P, "prefill").config == OTHER
    assert lookup(DEV, P).config == OTHER  # no workload: the most recently written entry
    assert lookup(DEV, P, "mixed").source == "default"  # that workload was never tuned
    assert lookup(DEV, Problem(14336, 4096)).config == OTHER
    other_card = DeviceInfo(**{**TEST_DEVICE, "name": "NVIDIA A100-SXM4-80GB", "sm_count": 108})
    assert lookup(other_card, P, "decode").source == "default"
    assert lookup(None, P).source == "default"  # no GPU: nothing to look up


def test_a_model_load_opens_and_reads_the_database_once(tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=TUNED), make_entry(4096, 14336, config=OTHER))
    reads: list[str] = []
    real_list, real_get = Store.list_results, Store.get_result
    monkeypatch.setattr(Store, "list_results", lambda self, *a, **k: reads.append("list") or real_list(self, *a, **k))
    monkeypatch.setattr(Store, "get_result", lambda self, *a, **k: reads.append("get") or real_get(self, *a, **k))
    opens: list[str] = []
    real_open = Store.open.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Store, "open", classmethod(lambda cls, *a, **k: opens.append("o") or real_open(cls, *a, **k)))
    layers = [P, P2, Problem(14336, 4096), Problem(4096, 6144)] * 80
    results = [lookup(DEV, p, wl) for p in layers for wl in (None, "decode", "mixed")]
    assert reads == ["list"] and len(opens) == 1
    assert results[0].config == TUNED and results[3].config == OTHER and results[6].source == "default"


def test_disable_forces_defaults(tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=TUNED))
    monkeypatch.setenv("GEMMTUNE_DISABLE", "1")
    r = lookup(DEV, P)
    assert r.source == "default" and r.config == PRESETS["default"] and "DISABLE" in r.detail
    monkeypatch.setenv("GEMMTUNE_DISABLE", "0")
    assert lookup(DEV, P).config == TUNED


def test_stale_results_are_never_served_and_warn_once(tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=TUNED, kh="ab" * 32),
        make_entry(4096, 14336, config=TUNED, kh="ab" * 32))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert lookup(DEV, P).source == "default"
        assert lookup(DEV, P2).source == "default"
    msgs = _gemmtune_warnings(rec)
    assert len(msgs) == 1 and "stale" in msgs[0]


# -- broken databases: default config, one warning, never an exception --------------------------


def _corrupt(tmp_path: Path, monkeypatch, make_entry) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database at all" * 200)
    monkeypatch.setenv("GEMMTUNE_DB", str(path))


def _missing(tmp_path: Path, monkeypatch, make_entry) -> None:
    monkeypatch.setenv("GEMMTUNE_DB", str(tmp_path / "nowhere" / "t.db"))


def _truncated(tmp_path: Path, monkeypatch, make_entry) -> None:
    path = _db(tmp_path, monkeypatch, make_entry(config=TUNED))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _future(tmp_path: Path, monkeypatch, make_entry) -> None:
    path = _db(tmp_path, monkeypatch, make_entry(config=TUNED))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE gemmtune_alembic_version SET version_num = '9999_from_the_future'")


def _locked(tmp_path: Path, monkeypatch, make_entry) -> None:
    from gemmtune.db.errors import DatabaseLockedError

    _db(tmp_path, monkeypatch, make_entry(config=TUNED))

    def locked(*_a: Any, **_k: Any) -> Any:
        raise DatabaseLockedError("database t.db stayed locked by another process")

    monkeypatch.setattr(Store, "list_results", locked)


def _unreachable_server(tmp_path: Path, monkeypatch, make_entry) -> None:
    monkeypatch.setenv("GEMMTUNE_DB", "postgresql+psycopg://u:secret@127.0.0.1:1/none?connect_timeout=1")


@pytest.mark.parametrize("breakage", [_corrupt, _missing, _truncated, _future, _locked, _unreachable_server])
def test_a_broken_database_gives_defaults_and_exactly_one_warning(
        breakage: Any, tmp_path: Path, monkeypatch, make_entry) -> None:
    breakage(tmp_path, monkeypatch, make_entry)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        results = [lookup(DEV, p) for p in (P, P2, Problem(14336, 4096), P)]
    assert all(r.source == "default" and r.config == PRESETS["default"] for r in results)
    msgs = _gemmtune_warnings(rec)
    assert len(msgs) == 1, msgs
    assert "default" in msgs[0] and "secret" not in msgs[0]


def test_a_read_only_database_is_served(tmp_path: Path, monkeypatch, make_entry) -> None:
    path = _db(tmp_path, monkeypatch, make_entry(config=TUNED))
    path.chmod(0o444)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            r = lookup(DEV, P)
        assert (r.config, r.source) == (TUNED, "database") and _gemmtune_warnings(rec) == []
        assert path.stat().st_mode & 0o777 == 0o444
    finally:
        path.chmod(0o644)


# -- profiles --------------------------------------------------------------------------------------


def _profile(tmp_path: Path, make_entry, *entries_cfg: tuple[Problem, KernelConfig],
             device: dict[str, Any] | None = None, kh: str | None = None) -> Path:
    from gemmtune.db.profiles import build_profile

    url = f"sqlite:///{tmp_path / 'export.db'}"
    with Store.open(url) as store:
        for p, c in entries_cfg:
            store.put_result(make_entry(p.k, p.n, config=c, device=device, kh=kh))
        dev = store.list_results()[0].device
        prof = build_profile(store, dev, current_kernel_hash=kh or kernel_hash())
    out = tmp_path / "profile.json"
    out.write_text(prof.dumps())
    return out


def test_profile_wins_over_the_database(tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=OTHER), make_entry(4096, 14336, config=OTHER))
    monkeypatch.setenv("GEMMTUNE_PROFILE", str(_profile(tmp_path, make_entry, (P, TUNED))))
    r = lookup(DEV, P)
    assert (r.config, r.source) == (TUNED, "profile") and r.detail.endswith("profile.json")
    assert lookup(DEV, P2).source == "database"  # not in the profile: the database answers


@pytest.mark.parametrize("what", ["device", "stale", "garbage"])
def test_an_unusable_profile_falls_through_with_one_warning(
        what: str, tmp_path: Path, monkeypatch, make_entry) -> None:
    _db(tmp_path, monkeypatch, make_entry(config=OTHER))
    if what == "device":
        from tests.conftest import device_dict

        path = _profile(tmp_path, make_entry, (P, TUNED), device=device_dict(name="AMD Radeon RX 7900 XTX"))
    elif what == "stale":
        path = _profile(tmp_path, make_entry, (P, TUNED), kh="cd" * 32)
    else:
        path = tmp_path / "profile.json"
        path.write_text('{"format": "gemmtune-profile", "schema_version": 99}')
    monkeypatch.setenv("GEMMTUNE_PROFILE", str(path))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        results = [lookup(DEV, P), lookup(DEV, P2)]
    assert results[0].config == OTHER and results[0].source == "database"
    assert results[1].source == "default"
    assert len(_gemmtune_warnings(rec)) == 1


def test_clear_cache_sees_new_results(tmp_path: Path, monkeypatch, make_entry) -> None:
    path = _db(tmp_path, monkeypatch, make_entry(config=OTHER))
    assert lookup(DEV, P).config == OTHER
    with Store.open(f"sqlite:///{path}") as store:
        store.put_result(make_entry(config=TUNED))
    assert lookup(DEV, P).config == OTHER  # resolved once per process
    clear_cache()
    assert lookup(DEV, P).config == TUNED
    assert importlib.import_module("gemmtune.runtime.lookup").current_kernel_hash() == kernel_hash()


def test_split_serves_a_decode_config_beside_a_larger_workloads_config(
        tmp_path: Path, monkeypatch, make_entry) -> None:
    from gemmtune.runtime import lookup_split

    _db(tmp_path, monkeypatch, make_entry(config=OTHER, workload="mixed"),
        make_entry(config=TUNED, workload="decode"))
    main, small = lookup_split(DEV, P)
    assert (main.config, main.workload_key) == (OTHER, "mixed")
    assert small is not None and (small.config, small.workload_key) == (TUNED, "decode")
    # Only a decode entry: it serves every M (no split); nothing tuned: the default, no split.
    assert lookup_split(DEV, P2) == (lookup(DEV, P2), None)
    clear_cache()
    _db(tmp_path, monkeypatch, make_entry(config=TUNED, workload="decode"), name="only-decode.db")
    main, small = lookup_split(DEV, P)
    assert main.config == TUNED and small is None
    # An explicit config is never split.
    assert lookup_split(DEV, P, config=OTHER) == (lookup(DEV, P, config=OTHER), None)


def test_a_plan_over_m_bands_is_resolved_band_by_band_and_looked_up_as_its_last_band(
        tmp_path: Path, monkeypatch, make_entry) -> None:
    from gemmtune.runtime.lookup import resolve

    small = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8)
    _db(tmp_path, monkeypatch, make_entry(workload="mixed", bands=((8, small), (None, OTHER))))
    assert [(b.m_lo, b.m_hi, b.config) for b in resolve(DEV, P).bands] == [
        (1, 8, small), (9, None, OTHER)]
    got = lookup(DEV, P)
    assert (got.config, got.source, got.workload_key) == (OTHER, "database", "mixed")
    assert lookup(DEV, P, "mixed").config == OTHER
