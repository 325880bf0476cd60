"""Store API: what the tuner writes is what the runtime reads, for exactly the kernel hash it was
measured with; URL resolution; runs. Runs against SQLite and (marked) PostgreSQL."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from gemmtune.db.errors import DatabaseError, DatabasePathError, DatabaseReadOnlyError
from gemmtune.db.store import Store
from gemmtune.kernels import KernelConfig, Workload


def test_put_then_get_returns_the_same_entry(db_url, make_entry):
    e = make_entry(8192, 4096, workload="mixed")
    with Store.open(db_url) as store:
        store.put_result(e)
        got = store.get_result(e.device_fingerprint, e.kernel_hash, e.problem_key, e.workload_key)
    assert got is not None
    for f in ("device", "kernel_hash", "problem", "problem_key", "workload", "workload_key",
              "config", "objective_us", "default_objective_us", "latencies_us",
              "default_latencies_us", "source", "provenance"):
        assert getattr(got, f) == getattr(e, f), f
    assert all(isinstance(m, int) for m in got.latencies_us)  # M keys survive JSON as ints
    assert got.created_at is not None and abs(got.created_at - e.created_at) < timedelta(seconds=1)
    assert got.stale is False


def test_put_is_an_upsert_on_device_hash_problem_workload(db_url, make_entry):
    first = make_entry(config=KernelConfig(max_q_gemm_rows=16))
    second = make_entry(config=KernelConfig(max_q_gemm_rows=64), base_us=7.0)
    with Store.open(db_url) as store:
        store.put_result(first)
        store.put_result(second)
        results = store.list_results()
        got = store.get_result(first.device_fingerprint, first.kernel_hash, first.problem_key,
                               "decode")
    assert len(results) == 1
    assert got is not None and got.config["max_q_gemm_rows"] == 64
    assert got.objective_us == second.objective_us


def test_stale_entries_are_listed_but_never_served(db_url, make_entry):
    old, new = "a" * 64, "b" * 64
    e = make_entry(kh=old)
    with Store.open(db_url) as store:
        store.put_result(e)
        assert store.get_result(e.device_fingerprint, new, e.problem_key, "decode") is None
        assert store.get_result(e.device_fingerprint, new, e.problem_key) is None
        listed = store.list_results(current_kernel_hash=new)
        assert [x.stale for x in listed] == [True]
        assert store.stale_count(new) == 1
        assert store.stale_count(old) == 0
        # still served to the build that measured it
        assert store.get_result(e.device_fingerprint, old, e.problem_key, "decode") is not None


def test_get_without_workload_serves_the_most_recent_entry(db_url, make_entry, make_device):
    with Store.open(db_url) as store:
        store.put_result(make_entry(workload="prefill"))
        time.sleep(0.01)
        store.put_result(make_entry(workload="decode"))
        got = store.get_result(make_device()["fingerprint"], make_entry().kernel_hash,
                               "4096x4096-b4-g128")
        assert got is not None and got.workload_key == "decode"
        time.sleep(0.01)
        store.put_result(make_entry(workload="prefill", base_us=3.0))
        got = store.get_result(make_device()["fingerprint"], make_entry().kernel_hash,
                               "4096x4096-b4-g128")
        assert got is not None and got.workload_key == "prefill"


def test_entries_are_separated_by_device_and_problem(db_url, make_entry, make_device):
    other = make_device(name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", sm_count=108)
    with Store.open(db_url) as store:
        store.put_result(make_entry(4096, 4096))
        store.put_result(make_entry(4096, 4096, device=other, base_us=20.0))
        store.put_result(make_entry(4096, 11008))
        assert len(store.list_results()) == 3
        assert len(store.list_results(other["fingerprint"])) == 1
        assert store.get_result(other["fingerprint"], make_entry().kernel_hash,
                                "4096x11008-b4-g128") is None
        assert {d["fingerprint"] for d in store.devices()} == {
            other["fingerprint"], make_device()["fingerprint"]}


def test_custom_workload_round_trips(db_url, make_entry):
    w = Workload("custom", (1, 4, 512), (4.0, 1.0, 0.5))
    e = make_entry(workload=w)
    with Store.open(db_url) as store:
        store.put_result(e)
        got = store.get_result(e.device_fingerprint, e.kernel_hash, e.problem_key, w.key())
    assert got is not None
    assert Workload(got.workload["name"], tuple(got.workload["ms"]),
                    tuple(got.workload["weights"])) == w


def test_runs_record_sampler_trials_status_and_times(db_url, make_entry):
    e = make_entry()
    with Store.open(db_url) as store:
        run = store.start_run(e.device, e.kernel_hash, "tpe", e.problem_key, e.workload_key)
        (started,) = store.list_runs()
        assert started["status"] == "running" and started["finished_at"] is None
        store.finish_run(run, "finished", 60)
        store.put_result(dataclasses.replace(e, run_id=run))
        (done,) = store.list_runs()
        got = store.get_result(e.device_fingerprint, e.kernel_hash, e.problem_key, "decode")
        with pytest.raises(DatabaseError, match="status"):
            store.finish_run(run, "exploded", 1)
        with pytest.raises(DatabaseError, match="no tuning run"):
            store.finish_run(run + 1000, "failed", 1)
    assert done["id"] == run and done["sampler"] == "tpe" and done["trials"] == 60
    assert done["status"] == "finished" and done["finished_at"] >= done["started_at"]
    assert done["tool_version"]
    assert got is not None and got.run_id == run


def test_device_descriptive_fields_follow_the_latest_driver(db_url, make_entry, make_device):
    with Store.open(db_url) as store:
        store.put_result(make_entry(device=make_device(driver_version="12.4")))
        store.put_result(make_entry(4096, 11008, device=make_device(driver_version="13.0")))
        (dev,) = store.devices()
    assert dev["driver_version"] == "13.0"


def test_import_entries_is_all_or_nothing(db_url, make_entry):
    good = make_entry()
    bad = dataclasses.replace(make_entry(8192, 4096), source="stolen")
    with Store.open(db_url) as store:
        with pytest.raises(DatabaseError, match="source"):
            store.import_entries([good, bad])
        assert store.list_results() == []
        res = store.import_entries([good, make_entry(8192, 4096)])
        assert (res.added, res.replaced, res.kept) == (2, 0, 0)
        changed = make_entry(base_us=1.0)
        res = store.import_entries([changed])
        assert (res.added, res.replaced, res.kept) == (0, 0, 1)
        assert store.get_result(good.device_fingerprint, good.kernel_hash, good.problem_key,
                                "decode").objective_us == good.objective_us
        res = store.import_entries([changed], replace=True)
        assert (res.added, res.replaced, res.kept) == (0, 1, 0)
        assert store.get_result(good.device_fingerprint, good.kernel_hash, good.problem_key,
                                "decode").objective_us == changed.objective_us


def test_readonly_store_reads_and_refuses_writes(tmp_path, make_entry):
    path = tmp_path / "t.db"
    with Store.open(str(path)) as store:
        store.put_result(make_entry())
    before = path.read_bytes()
    with Store.open(str(path), readonly=True) as ro:
        assert len(ro.list_results()) == 1
        with pytest.raises(DatabaseReadOnlyError):
            ro.put_result(make_entry(8192, 4096))
    assert path.read_bytes() == before


def test_readonly_open_of_a_missing_file_reads_empty_and_creates_nothing(tmp_path):
    path = tmp_path / "absent.db"
    with Store.open(str(path), readonly=True) as ro:
        assert ro.list_results() == [] and ro.revision is None
    assert not path.exists()


def test_url_resolution_argument_env_default(tmp_path, monkeypatch, make_entry):
    from gemmtune.db.paths import default_db_path, resolve_url

    # default: the platformdirs user-data path (redirected into tmp by conftest)
    assert resolve_url(None) == f"sqlite:///{default_db_path()}"
    assert str(default_db_path()).startswith(str(Path(str(tmp_path)).parents[1]))
    with Store.open() as store:  # creates the default folder on demand
        store.put_result(make_entry())
    assert default_db_path().is_file()
    # env var beats the default, argument beats the env var; a bare path means SQLite
    env_db = tmp_path / "env.db"
    monkeypatch.setenv("GEMMTUNE_DB", str(env_db))
    with Store.open() as store:
        assert store.path == env_db and store.list_results() == []
    arg_db = tmp_path / "arg.db"
    with Store.open(f"sqlite:///{arg_db}") as store:
        assert store.path == arg_db


def test_explicit_path_into_a_missing_folder_is_an_error_not_a_new_tree(tmp_path):
    with pytest.raises(DatabasePathError, match="does not exist"):
        Store.open(str(tmp_path / "typo" / "tuning.db"))
    assert not (tmp_path / "typo").exists()


def test_timestamps_are_utc_aware(db_url, make_entry):
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(microseconds=123)
    with Store.open(db_url) as store:
        store.put_result(make_entry(created_at=when))
        (got,) = store.list_results()
    assert got.created_at == when and got.created_at.tzinfo is not None
