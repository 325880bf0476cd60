"""`gemmtune show / export / import / doctor`: what a user sees, and that every failure is one
red line with a non-zero exit that left the database as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from gemmtune.db.store import Store
from gemmtune.kernels import KernelConfig
from gemmtune.kernels.config import TILED

from gemmtune.cli import main
from gemmtune.cli._common import _config_short

CURRENT = "c0" * 32
"""This build's kernel hash, pinned: the real one changes whenever a .cu file does, and these tests
are about what happens relative to it, not about its value."""


@pytest.fixture(autouse=True)
def _pin_kernel_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    import gemmtune.kernels.sources as sources

    monkeypatch.setattr(sources, "kernel_hash", lambda compiler=None: CURRENT)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


@pytest.fixture
def filled(tmp_path, make_entry, make_device) -> str:
    """A database with two devices, a stale entry and a custom workload."""
    url = f"sqlite:///{tmp_path / 'tuning.db'}"
    a100 = make_device(name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", sm_count=108)
    with Store.open(url) as s:
        s.put_result(make_entry(4096, 4096))
        s.put_result(make_entry(8192, 4096, workload="prefill"))
        s.put_result(make_entry(4096, 11008, kh="e" * 64))  # measured by an older build
        s.put_result(make_entry(4096, 4096, device=a100, base_us=20.0))
    return url


def test_show_lists_what_is_tuned(filled):
    r = run("show", "--db", filled)
    assert r.exit_code == 0, r.stderr
    out = r.output
    for text in ("4096x4096-b4-g128", "8192x4096-b4-g128", "4096x11008-b4-g128", "prefill",
                 "decode", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "1.25×", "stale",
                 _config_short(KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8))):
        assert text in out, text
    assert "1 stale entry" in out


def test_show_lists_every_band_of_a_plan_unwrapped_at_80_columns(tmp_path, make_entry):
    """Each band is one line, its Ms beside its config as every table spells it, at a
    terminal's default width; the full keys (which wrapped a few characters a line there) are
    what `show --keys` prints, one tab-separated line per band, for copying."""
    plan = ((4, KernelConfig(max_q_gemm_rows=4, max_q_gemm_rows_kernel=4, split_k=8)),
            (32, KernelConfig(max_q_gemm_rows=32, kernel=TILED, tile_m=16, tile_n=128, tile_k=64,
                              stages=4)),
            (None, KernelConfig(max_q_gemm_rows=64, max_q_gemm_rows_kernel=16,
                                recon_chunk_n=4096)))
    decode = KernelConfig(max_q_gemm_rows=8, block_n=128, threads=128, split_k=2)
    url = f"sqlite:///{tmp_path / 'tuning.db'}"
    with Store.open(url) as s:
        s.put_result(make_entry(4096, 14336, workload="mixed", bands=plan))
        s.put_result(make_entry(4096, 14336, workload="decode", config=decode))
    r = CliRunner().invoke(main, ["show", "--db", url], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.stderr
    lines = r.output.splitlines()
    bands = [(span, cfg) for span, (_m_hi, cfg) in zip(("M 1-4", "M 5-32", "M >= 33"), plan,
                                                         strict=True)] + [("every M", decode)]
    for span, cfg in bands:
        assert any(span in ln and _config_short(cfg) in ln for ln in lines), (span, r.output)
        assert cfg.key() not in r.output  # one spelling
    assert sum("4096x14336-b4-g128" in ln for ln in lines) == 2, r.output  # the shape unfolded
    # under each entry's shape: its workload, then the Ms it serves a layer loaded without one
    for workload, serves in (("mixed", "serves M >= 9"), ("decode", "serves M 1-8")):
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"{workload} · "))
        assert lines[at + 1].startswith(serves), r.output

    r = CliRunner().invoke(main, ["show", "--db", url, "--keys"])
    assert r.exit_code == 0, r.stderr
    rows = [ln.split("\t") for ln in r.output.splitlines()]
    fp = make_entry().device_fingerprint
    assert sorted(rows) == sorted([fp, "4096x14336-b4-g128", workload, span, cfg.key()]
                                  for workload, (span, cfg) in
                                  [("mixed", b) for b in bands[:3]] + [("decode", bands[3])])


def test_show_filters_by_device_and_hides_stale(filled, make_device):
    r = run("show", "--db", filled, "--device", "a100", "--no-stale")
    assert r.exit_code == 0
    assert "A100" in r.output and "H100" not in r.output
    r = run("show", "--db", filled, "--device", make_device()["fingerprint"][:6], "--no-stale")
    assert "4096x11008" not in r.output and "8192x4096" in r.output
    assert "no tuned device matches" in one_error_line(run("show", "--db", filled,
                                                           "--device", "mi300"))


def test_show_on_a_fresh_machine_creates_nothing(tmp_path):
    r = run("show")  # default path (in a temp XDG dir, see conftest)
    assert r.exit_code == 0 and "nothing tuned yet" in r.output
    from gemmtune.db.paths import default_db_path

    assert not default_db_path().exists()


@pytest.mark.parametrize("args", [["show"], ["export"], ["doctor"], ["import", "--dry-run"]],
                         ids=lambda a: "-".join(a))
@pytest.mark.parametrize("how", ["option", "env"])
def test_a_database_in_a_missing_folder_is_an_error_not_an_empty_database(
        tmp_path, filled, args, how):
    """A typo in --db's folder must not read as "nothing tuned yet": every command that only
    reads says the folder does not exist, exit 1, and creates nothing."""
    missing = tmp_path / "no" / "such" / "t.db"
    if args[0] == "import":
        profile = tmp_path / "p.json"
        assert run("export", "--db", filled, "--device", "A100", "-o", str(profile)).exit_code == 0
        args = ["import", str(profile), "--dry-run"]
    r = (run(*args, "--db", str(missing)) if how == "option"
         else run(*args, env={"GEMMTUNE_DB": str(missing)}))
    line = one_error_line(r)
    assert f"folder {missing.parent} does not exist" in line, line
    assert "nothing tuned" not in r.output
    assert not (tmp_path / "no").exists()


def test_db_env_var_is_used_without_option(filled):
    r = run("show", env={"GEMMTUNE_DB": filled})
    assert r.exit_code == 0 and "4096x4096-b4-g128" in r.output


def test_export_import_export_through_the_cli(filled, tmp_path, make_device):
    h100 = make_device()["fingerprint"]
    p1, p2 = tmp_path / "h100.json", tmp_path / "again.json"
    r = run("export", "--db", filled, "--device", h100, "-o", str(p1))
    assert r.exit_code == 0, r.stderr
    assert "exported 2 entries" in r.stderr
    fresh = f"sqlite:///{tmp_path / 'other-machine.db'}"
    r = run("import", str(p1), "--db", fresh)
    assert r.exit_code == 0, r.stderr
    assert "2 added" in r.output
    r = run("export", "--db", fresh, "-o", str(p2))
    assert r.exit_code == 0, r.stderr
    a, b = json.loads(p1.read_text()), json.loads(p2.read_text())
    a.pop("created_at"), b.pop("created_at")
    assert a == b
    # importing again: local entries win, nothing changes
    r = run("import", str(p1), "--db", fresh)
    assert r.exit_code == 0 and "0 added" in r.output and "2 kept" in r.output
    r = run("import", str(p1), "--db", fresh, "--replace")
    assert r.exit_code == 0 and "2 replaced" in r.output


def test_import_says_imported_only_for_what_it_wrote(filled, tmp_path, make_device, make_entry):
    p = tmp_path / "h100.json"
    assert run("export", "--db", filled, "--device", make_device()["fingerprint"],
               "-o", str(p)).exit_code == 0
    fresh = f"sqlite:///{tmp_path / 'other.db'}"
    with Store.open(fresh) as s:  # one of the two shapes is already tuned here
        s.put_result(make_entry(4096, 4096, base_us=3.0))
    r = run("import", str(p), "--db", fresh)
    assert r.exit_code == 0, r.stderr
    assert r.output.startswith("imported 1 of 2 entries") and "1 added, 0 replaced, 1 kept" in r.output
    assert "local entries win" in r.output
    r = run("import", str(p), "--db", fresh)  # everything is there now: nothing is written
    assert r.exit_code == 0
    assert r.output.startswith("nothing imported") and "imported 2" not in r.output
    assert "0 added, 0 replaced, 2 kept" in r.output
    r = run("import", str(p), "--db", fresh, "--replace")
    assert r.output.startswith("imported 2 of 2 entries") and "2 replaced" in r.output


def test_export_to_stdout_and_header(filled, make_device):
    r = run("export", "--db", filled, "--device", "A100")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["device"]["name"] == "NVIDIA A100-SXM4-80GB" and len(doc["entries"]) == 1
    r = run("export", "--db", filled, "--format", "header")
    assert r.exit_code == 0
    assert r.stdout.count("#  define MAX_Q_GEMM_ROWS ") == 3  # both devices, current hash only
    assert make_device()["fingerprint"].upper() in r.stdout


def test_export_needs_a_device_when_several_match(filled):
    line = one_error_line(run("export", "--db", filled))
    assert "2 devices match" in line and "--device" in line


def test_export_of_an_empty_database_is_an_error(tmp_path):
    assert "nothing to export" in one_error_line(
        run("export", "--db", str(tmp_path / "empty.db")))


def test_error_lines_show_bracketed_paths_as_they_are(tmp_path):
    """fail() escapes rich markup once: a path with brackets must not come out as `\\[`."""
    folder = tmp_path / "runs[red]"
    folder.mkdir()
    for args in (("export", "--db", str(folder / "empty.db")),
                 ("show", "--db", str(folder / "empty.db"), "--device", "nope")):
        line = one_error_line(run(*args))
        assert "runs[red]" in line and "\\[" not in line, line


def test_export_selects_the_stale_hash_explicitly(filled, tmp_path, make_device):
    out = tmp_path / "old.json"
    r = run("export", "--db", filled, "--device", make_device()["fingerprint"],
            "--kernel-hash", "eeee", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert "stale for this build" in r.stderr
    doc = json.loads(out.read_text())
    assert doc["kernel_hash"] == "e" * 64 and len(doc["entries"]) == 1
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    r = run("import", str(out), "--db", fresh)
    assert r.exit_code == 0 and "stale" in r.stderr and "--force" in r.stderr
    with Store.open(fresh) as s:
        assert [e.stale for e in s.list_results(current_kernel_hash=CURRENT)] == [True]
    # only stale entries: --no-stale says they are hidden, not that nothing was ever tuned
    r = run("show", "--db", fresh, "--no-stale")
    assert r.exit_code == 0 and "1 stale entry hidden by --no-stale" in r.output, r.output
    r = run("import", str(out), "--db", fresh, "--force")
    assert r.exit_code == 0 and "--force stored" in r.stderr
    with Store.open(fresh) as s:
        assert sorted(e.stale for e in s.list_results(current_kernel_hash=CURRENT)) == [False, True]
    r = run("import", str(out), "--db", fresh, "--force")  # already there: nothing is stored
    assert r.exit_code == 0 and "nothing imported" in r.output and "--force stored" not in r.stderr


def test_import_dry_run_writes_nothing(filled, tmp_path):
    p = tmp_path / "a.json"
    assert run("export", "--db", filled, "--device", "A100", "-o", str(p)).exit_code == 0
    target = tmp_path / "untouched.db"
    r = run("import", str(p), "--db", str(target), "--dry-run")
    assert r.exit_code == 0 and "valid profile" in r.output
    assert not target.exists()


def test_import_of_a_profile_without_schema_version_says_it_is_missing(filled, tmp_path):
    good = tmp_path / "a.json"
    assert run("export", "--db", filled, "--device", "A100", "-o", str(good)).exit_code == 0
    doc = json.loads(good.read_text())
    del doc["schema_version"]
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps(doc))
    target = tmp_path / "untouched.db"
    line = one_error_line(run("import", str(bad), "--db", str(target)))
    assert "schema_version" in line and "missing" in line and "null" not in line, line
    assert not target.exists()


def test_doctor_reports_database_and_environment(filled):
    r = run("doctor", "--db", filled)
    assert r.exit_code == 0, r.stderr
    out = r.output
    path = filled.removeprefix("sqlite:///")
    assert Path(path).name in out
    from gemmtune.db.migrate import head_revision

    assert f"{head_revision()} (current)" in out
    assert "4 (1 stale)" in out
    for label in ("writable", "CUDA", "CuPy", "NVRTC", "GPUs", "kernel hash"):
        assert label in out


# -- broken databases: one line, exit 1, nothing overwritten --------------------------------


def _damage(kind: str, path: Path, filled: str) -> None:
    src = Path(filled.removeprefix("sqlite:///"))
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        Store.open(str(src)).close()
        import sqlite3

        con = sqlite3.connect(src)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        data = src.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "directory":
        path.mkdir()
    elif kind == "readonly":
        path.write_bytes(src.read_bytes())
        path.chmod(0o444)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "directory", "readonly"])
@pytest.mark.parametrize("command", ["show", "export", "import", "doctor"])
def test_broken_database_is_one_line_and_left_alone(tmp_path, filled, kind, command):
    target = tmp_path / "broken.db"
    _damage(kind, target, filled)
    profile = tmp_path / "p.json"
    assert run("export", "--db", filled, "--device", "A100", "-o", str(profile)).exit_code == 0
    before = target.read_bytes() if target.is_file() else None
    args = {"show": ["show"], "export": ["export", "--device", "H100"],
            "import": ["import", str(profile)], "doctor": ["doctor"]}[command]
    r = run(*args, "--db", str(target))
    if kind == "readonly" and command in ("show", "export"):
        assert r.exit_code == 0, r.stderr  # reading a read-only database is fine
    elif kind == "readonly" and command == "doctor":
        assert r.exit_code == 0 and "read-only" in r.output
    else:
        line = one_error_line(r)
        assert str(target) in line
        words = {"garbage": "not a SQLite database", "truncated": "truncated",
                 "directory": "is a directory", "readonly": "read-only"}[kind]
        assert words in line
    if before is not None:
        assert target.read_bytes() == before
    else:
        assert target.is_dir() and list(target.iterdir()) == []
    if kind == "readonly":
        target.chmod(0o644)


def test_reading_commands_upgrade_an_older_schema_once_and_say_so_when_they_cannot(
        tmp_path, make_entry):
    """As the README's "Where it is" says: `show` opens read-only, except that a database at an
    older schema revision is upgraded in place first; a read-only one is refused in one line
    that says why a reading command wanted to write, and is left as it was."""
    from gemmtune.db.migrate import head_revision

    from tests.test_db_migrations import _alembic, _insert_at_0001

    old = make_entry(config=KernelConfig(max_q_gemm_rows=32))
    writable, readonly = tmp_path / "old.db", tmp_path / "old-ro.db"
    for path in (writable, readonly):
        _alembic(f"sqlite:///{path}", "upgrade", "0001")
        _insert_at_0001(f"sqlite:///{path}", old)
    readonly.chmod(0o444)
    before = readonly.read_bytes()
    try:
        line = one_error_line(run("show", "--db", str(readonly)))
        assert "read-only" in line and "older schema revision" in line, line
        assert readonly.read_bytes() == before
    finally:
        readonly.chmod(0o644)
    r = run("show", "--db", str(writable))
    assert r.exit_code == 0, r.stderr
    assert _config_short(KernelConfig(max_q_gemm_rows=32)) in r.output
    with Store.open(str(writable), readonly=True) as store:
        assert store.revision == head_revision() != "0001"


def test_a_newer_database_is_refused_by_every_command(tmp_path, filled):
    import sqlalchemy as sa

    engine = sa.create_engine(filled)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE gemmtune_alembic_version SET version_num = '7777'"))
    engine.dispose()
    for args in (["show"], ["export"], ["doctor"]):
        line = one_error_line(run(*args, "--db", filled))
        assert "7777" in line and "newer" in line


def test_unreachable_postgres_is_one_line_without_password():
    line = one_error_line(run("show", "--db", "postgresql+psycopg://me:hunter2@127.0.0.1:1/x"))
    assert "hunter2" not in line and "cannot use database" in line


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "gemmtune-profile", '
                                     b'"schema_version": 99}'], ids=["not-json", "version"])
def test_the_real_executable_prints_one_line_no_traceback(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    env = {**os.environ, "GEMMTUNE_DB": str(tmp_path / "x.db")}
    proc = subprocess.run([sys.executable, "-m", "gemmtune.cli", "import", str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.postgres
def test_cli_against_postgres(pg_url, tmp_path, make_entry):
    with Store.open(pg_url) as s:
        s.put_result(make_entry())
    r = run("show", "--db", pg_url)
    assert r.exit_code == 0 and "4096x4096-b4-g128" in r.output
    p = tmp_path / "pg.json"
    assert run("export", "--db", pg_url, "-o", str(p)).exit_code == 0
    r = run("import", str(p), "--db", f"sqlite:///{tmp_path / 'copy.db'}")
    assert r.exit_code == 0 and "1 added" in r.output
    r = run("doctor", "--db", pg_url)
    assert r.exit_code == 0 and "postgresql" in r.output and "1 (0 stale)" in r.output
