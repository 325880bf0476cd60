"""Shared pytest fixtures. Each area keeps its fixtures in its own clearly marked group."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

# =============================================================================================
# db area (gemmtune.db): isolated user-data dir, database URLs (SQLite, PostgreSQL), entries
# =============================================================================================

PG_ENV = "GEMMTUNE_TEST_PG_URL"


@pytest.fixture(autouse=True)
def _isolated_user_data(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may read or write the real tuning database (~/.local/share/gemmtune): the
    platformdirs user-data dir points into a temp folder and GEMMTUNE_DB / GEMMTUNE_PROFILE are
    cleared. Tests that want a database set GEMMTUNE_DB or pass a URL themselves."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    monkeypatch.delenv("GEMMTUNE_DB", raising=False)
    monkeypatch.delenv("GEMMTUNE_PROFILE", raising=False)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """Base URL of the PostgreSQL server the suite may use; skips (with the reason shown in the
    summary) when GEMMTUNE_TEST_PG_URL is unset or the server does not answer."""
    url = os.environ.get(PG_ENV, "").strip()
    if not url:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (.ci/run starts a server and sets it)")
    try:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(url)
        with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username,
                             password=u.password, dbname=u.database, connect_timeout=3):
            pass
    except Exception as exc:  # unreachable server, bad login, missing driver
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"PostgreSQL at {PG_ENV} is unreachable: {first}")
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty schema on the test server (dropped afterwards), as a SQLAlchemy URL whose
    search_path points at it: every test sees an empty database without CREATE DATABASE cost."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(pg_server_url)
    schema = f"gt_{uuid.uuid4().hex[:12]}"
    conninfo = dict(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
                    dbname=u.database, autocommit=True)
    with psycopg.connect(**conninfo) as conn:  # type: ignore[arg-type]
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = u.set(drivername="postgresql+psycopg").update_query_dict(
        {"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**conninfo) as conn:  # type: ignore[arg-type]
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sqlite_db_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'tuning.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Run a test against an empty SQLite file and an empty PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuning.db'}"
    return str(request.getfixturevalue("pg_url"))


TEST_DEVICE: dict[str, Any] = {
    "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
    "sm_count": 132, "memory_bytes": 80 * 2**30, "driver_version": "13.0",
    "runtime_version": "13.0",
}


def device_dict(**changes: Any) -> dict[str, Any]:
    """DeviceInfo.to_dict() of a test card (fingerprint computed by the real DeviceInfo)."""
    from gemmtune.kernels import DeviceInfo

    return DeviceInfo(**{**TEST_DEVICE, **changes}).to_dict()


@pytest.fixture
def make_device() -> Callable[..., dict[str, Any]]:
    """Factory of device dicts: the test H100 with any field changed."""
    return device_dict


@pytest.fixture
def make_entry() -> Callable[..., Any]:
    """Factory of valid `TunedEntry`s built from the real core objects (so keys and configs are
    what the tuner would store). Latencies derive from the arguments, not from constants."""
    from gemmtune.db.store import TunedEntry
    from gemmtune.kernels import WORKLOADS, KernelConfig, Problem, Workload
    from gemmtune.kernels.sources import kernel_hash

    def make(k: int = 4096, n: int = 4096, *, bits: int = 4, group_size: int = 128,
             act_order: bool = False, workload: str | Workload = "decode",
             device: dict[str, Any] | None = None, kh: str | None = None,
             config: KernelConfig | None = None, base_us: float = 10.0,
             provenance: str = "tuned here by gemmtune (test)",
             created_at: datetime | None = None,
             bands: tuple[tuple[int | None, KernelConfig], ...] = ()) -> TunedEntry:
        """`bands`: a plan over M bands, (m_hi, config) with the last m_hi None; `config` is
        then its last band's."""
        p = Problem(k, n, bits, group_size, act_order)
        w = WORKLOADS[workload] if isinstance(workload, str) else workload
        c = config or (bands[-1][1] if bands else
                       KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8))
        lat = {m: base_us + 0.5 * m + k / 4096 for m in w.ms}
        dlat = {m: v * 1.25 for m, v in lat.items()}
        return TunedEntry(
            device=device or device_dict(),
            kernel_hash=kh or kernel_hash(),
            problem={"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
                     "act_order": p.act_order},
            problem_key=p.key(),
            workload={"name": w.name, "ms": list(w.ms), "weights": list(w.weights)},
            workload_key=w.key(),
            config=c.to_dict(),
            bands=tuple((m_hi, b.to_dict()) for m_hi, b in bands),
            objective_us=w.objective(lat),
            default_objective_us=w.objective(dlat),
            latencies_us=lat,
            default_latencies_us=dlat,
            provenance=provenance,
            created_at=created_at or datetime.now(UTC),
        )

    return make


# =============================================================================================
# autotune area (bench / compare): a fake GPU behind the study's seams
# =============================================================================================


class FakeEvaluator:
    """Dispatch time = 10 µs + 0.1 µs per row fused, 40 µs reconstruct; rows per block add cost."""

    def __init__(self, problem: Any, workload: Any, device_index: int = 0) -> None:
        self.problem, self.workload = problem, workload
        from tests.synthetic import FAKE_DEVICE, FAKE_KERNEL_HASH

        self.device, self.kernel_hash = FAKE_DEVICE, FAKE_KERNEL_HASH
        self.closed = False

    @staticmethod
    def t(cfg: Any, m: int) -> float:
        if m > cfg.max_q_gemm_rows:
            return 40.0
        return 10.0 + 0.1 * m + 8.0 / cfg.max_q_gemm_rows_kernel

    def dispatch(self, cfg: Any, check: bool = True) -> dict[int, Any]:
        from gemmtune.autotune.evaluator import Measurement

        return {m: Measurement(self.t(cfg, m), 0.05, 15) for m in self.workload.ms}

    def interleaved(self, a: Any, b: Any, rounds: int = 5) -> Any:
        from gemmtune.autotune.evaluator import Measurement

        return ({m: Measurement(self.t(a, m), 0.05, rounds) for m in self.workload.ms},
                {m: Measurement(self.t(b, m), 0.05, rounds) for m in self.workload.ms})

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[FakeEvaluator]:
    """The GPU seams of `autotune.study` replaced by `FakeEvaluator`s (kept in the list)."""
    from gemmtune.autotune import study as st

    from tests.synthetic import FAKE_DEVICE, FAKE_KERNEL_HASH

    made: list[FakeEvaluator] = []

    def make(problem: Any, workload: Any, device_index: int = 0) -> FakeEvaluator:
        ev = FakeEvaluator(problem, workload, device_index)
        made.append(ev)
        return ev

    monkeypatch.setattr(st, "make_evaluator", make)
    monkeypatch.setattr(st, "device_identity", lambda i=0: (FAKE_DEVICE, FAKE_KERNEL_HASH))
    monkeypatch.setattr(st, "gpu_count", lambda: 1)
    return made


# =============================================================================================
# runtime area: a fresh lookup state per test
# =============================================================================================


@pytest.fixture
def fresh_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GEMMTUNE_DISABLE, and no resolution, open database or warning left from another
    test (before and after)."""
    from gemmtune.runtime import clear_cache

    monkeypatch.delenv("GEMMTUNE_DISABLE", raising=False)
    clear_cache()
    yield
    clear_cache()


# =============================================================================================
# (other areas' fixtures go below, each in its own group)
# =============================================================================================
