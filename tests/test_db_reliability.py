"""The database under stress and abuse: concurrent writers, a writer killed mid-transaction, a held
lock, and files that are not databases. Each failure must be a typed one-line error that
changed nothing; each success must have kept every committed result."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gemmtune.db.errors import (
    DatabaseCorruptError,
    DatabaseError,
    DatabaseLockedError,
    DatabasePathError,
    DatabaseReadOnlyError,
)
from gemmtune.db.store import Store

# Worker processes build entries from the real core objects; each result is one short write.
WORKER = r'''
import sys
from datetime import UTC, datetime
from gemmtune.db.store import Store, TunedEntry
from gemmtune.kernels import WORKLOADS, DeviceInfo, KernelConfig, Problem

url, worker, count, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dev = DeviceInfo("nvidia", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30).to_dict()
w = WORKLOADS["decode"]

def entry(i):
    p = Problem(128 * (1 + worker * 1000 + i), 4096)
    lat = {m: 10.0 + worker + i / 1000 for m in w.ms}
    return TunedEntry(
        device=dev, kernel_hash="f" * 64,
        problem={"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
                 "act_order": p.act_order},
        problem_key=p.key(), workload={"name": w.name, "ms": list(w.ms), "weights": list(w.weights)},
        workload_key=w.key(), config=KernelConfig().to_dict(), objective_us=w.objective(lat),
        default_objective_us=w.objective(lat) * 1.2, latencies_us=lat,
        default_latencies_us={m: v * 1.2 for m, v in lat.items()},
        provenance=f"worker {worker}", created_at=datetime.now(UTC))

store = Store.open(url)
if mode == "write":
    run = store.start_run(dev, "f" * 64, "tpe", entry(0).problem_key, "decode")
    for i in range(count):
        store.put_result(entry(i))
    store.finish_run(run, "finished", count)
elif mode == "die-mid-transaction":
    for i in range(count):
        store.put_result(entry(i))
    print("COMMITTED", count, flush=True)
    with store._write_session() as session:
        for i in range(count, count + 50):
            store._upsert(session, entry(i), replace=True)
        session.flush()
        print("MID-TRANSACTION", flush=True)
        import time
        time.sleep(120)
elif mode == "write-forever":
    i = 0
    while True:
        store.put_result(entry(i))
        i += 1
        print("COMMITTED", i, flush=True)
elif mode == "hold-lock":
    with store._write_session() as session:
        store._upsert(session, entry(0), replace=True)
        session.flush()
        print("LOCKED", flush=True)
        import time
        time.sleep(float(sys.argv[5]))
    print("RELEASED", flush=True)
'''


def _spawn(url: str, worker: int, count: int, mode: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(worker), str(count), mode, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(proc: subprocess.Popen[str], marker: str, timeout: float = 60) -> list[str]:
    """Read the worker's stdout until a line starting with `marker`; return lines seen."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"worker ended before {marker!r}: {err[-2000:]}")
        lines.append(line.strip())
        if line.startswith(marker):
            return lines
    raise AssertionError(f"worker never printed {marker!r}")


def test_four_processes_writing_at_once_all_land(db_url):
    """Four workers open a fresh database at the same moment (racing the schema creation) and
    each writes its results one short transaction at a time."""
    per_worker = 30
    procs = [_spawn(db_url, w, per_worker, "write") for w in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "locked" not in err.lower(), err[-3000:]
    with Store.open(db_url) as store:
        entries = store.list_results()
        runs = store.list_runs()
    assert len(entries) == 4 * per_worker
    assert {e.provenance for e in entries} == {f"worker {w}" for w in range(4)}
    assert len({e.problem_key for e in entries}) == 4 * per_worker
    assert sorted(r["trials"] for r in runs) == [per_worker] * 4
    assert {r["status"] for r in runs} == {"finished"}


def test_writer_killed_mid_transaction_loses_only_that_transaction(db_url):
    committed = 12
    proc = _spawn(db_url, 0, committed, "die-mid-transaction")
    try:
        _wait_for(proc, "MID-TRANSACTION")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Store.open(db_url, lock_timeout_s=10) as store:
        entries = store.list_results()
        assert len(entries) == committed  # earlier results intact, the open transaction gone
        # the lock died with the writer: a new write goes through
        proc2 = _spawn(db_url, 1, 3, "write")
        assert proc2.wait(timeout=60) == 0, proc2.stderr.read() if proc2.stderr else ""
        assert len(store.list_results()) == committed + 3
    path = Path(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None
    if path is not None:
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()


def test_writer_killed_at_a_random_moment_keeps_every_reported_commit(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    proc = _spawn(url, 0, 0, "write-forever")
    try:
        lines = _wait_for(proc, "COMMITTED 25")
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    reported = int(lines[-1].split()[1])
    with Store.open(url) as store:
        assert len(store.list_results()) >= reported


def test_a_held_lock_is_waited_out_not_reported(tmp_path, make_entry):
    url = f"sqlite:///{tmp_path / 't.db'}"
    Store.open(url).close()
    holder = _spawn(url, 0, 0, "hold-lock", "1.5")
    try:
        _wait_for(holder, "LOCKED")
        t0 = time.monotonic()
        with Store.open(url) as store:  # default patience: waits for the holder to finish
            store.put_result(make_entry())
            assert len(store.list_results()) == 2
        assert time.monotonic() - t0 > 0.5
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0


def test_a_lock_held_past_the_timeout_is_a_typed_error_that_changed_nothing(tmp_path, make_entry):
    url = f"sqlite:///{tmp_path / 't.db'}"
    Store.open(url).close()
    holder = _spawn(url, 0, 0, "hold-lock", "2.0")
    try:
        _wait_for(holder, "LOCKED")
        store = Store.open(url, lock_timeout_s=0.3)
        with pytest.raises(DatabaseLockedError) as info:
            store.put_result(make_entry())
        store.close()
        assert "locked" in str(info.value) and "\n" not in str(info.value)
    finally:
        holder.wait(timeout=30)
    with Store.open(url) as store:
        assert [e.provenance for e in store.list_results()] == ["worker 0"]


# -- files that are not (usable) databases --------------------------------------------------


def _valid_db(path: Path, make_entry) -> None:
    with Store.open(str(path)) as store:
        for k in (4096, 8192, 11008 // 32 * 32):
            store.put_result(make_entry(k, 4096))
    con = sqlite3.connect(path)  # fold the WAL in, so the file alone is the database
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "readonly"])
@pytest.mark.parametrize("damage", ["garbage", "text", "truncated-half", "truncated-header",
                                    "header-only"])
def test_damaged_files_are_refused_and_left_alone(tmp_path, make_entry, damage, readonly):
    path = tmp_path / "t.db"
    if damage in ("garbage", "text"):
        path.write_bytes(os.urandom(8192) if damage == "garbage" else b"hello, not a db\n" * 50)
    else:
        _valid_db(path, make_entry)
        data = path.read_bytes()
        cut = {"truncated-half": len(data) // 2, "truncated-header": 60,
               "header-only": 100}[damage]
        path.write_bytes(data[:cut])
    before = path.read_bytes()
    with pytest.raises(DatabaseCorruptError) as info, \
            Store.open(str(path), readonly=readonly) as store:
        store.list_results()
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "nothing was changed" in msg
    assert path.read_bytes() == before


def test_damage_inside_the_pages_is_reported_on_use(tmp_path, make_entry):
    """A file with an intact header but scrambled pages: whatever SQLite notices surfaces as a
    typed error, never as a raw driver exception, and the file is not rewritten."""
    path = tmp_path / "t.db"
    _valid_db(path, make_entry)
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(page, len(data), page):  # scribble over every page but the first
        data[off:off + page] = os.urandom(page)
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as info, Store.open(str(path)) as store:
        store.list_results()
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_a_directory_where_the_file_should_be(tmp_path):
    d = tmp_path / "tuning.db"
    d.mkdir()
    (d / "keep").write_text("x")
    for readonly in (False, True):
        with pytest.raises(DatabasePathError, match="is a directory"):
            Store.open(str(d), readonly=readonly)
    assert sorted(p.name for p in d.iterdir()) == ["keep"]


def test_a_read_only_file_is_refused_for_writing_and_readable(tmp_path, make_entry):
    path = tmp_path / "t.db"
    _valid_db(path, make_entry)
    for f in tmp_path.iterdir():
        f.chmod(0o444)
    before = path.read_bytes()
    try:
        with pytest.raises(DatabaseReadOnlyError) as info:
            Store.open(str(path))
        assert "read-only" in str(info.value) and str(path) in str(info.value)
        with Store.open(str(path), readonly=True) as store:
            assert len(store.list_results()) == 3
    finally:
        for f in tmp_path.iterdir():
            f.chmod(0o644)
    assert path.read_bytes() == before


def test_unreachable_server_is_one_typed_line():
    from gemmtune.db.errors import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError) as info:
        Store.open("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    msg = str(info.value)
    assert "\n" not in msg and "secret" not in msg and "127.0.0.1" in msg
