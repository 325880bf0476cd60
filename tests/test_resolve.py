"""The one resolver (`gemmtune.db.resolve`): its rules on plain data, and the promise it exists
for: `bench tuned` and `compare ... tuned` measure, at every M, exactly the config the runtime
would launch for that M (fake evaluator, no GPU)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gemmtune.autotune import compare as cmp
from gemmtune.autotune.evaluator import Measurement
from gemmtune.db.resolve import Offer, resolve
from gemmtune.db.store import Store
from gemmtune.kernels import PRESETS, DeviceInfo, KernelConfig, Problem
from gemmtune.kernels.sources import kernel_hash
from gemmtune.runtime import clear_cache, lookup_split
from gemmtune.runtime.lookup import DECODE_MAX_M

from gemmtune.cli import main
from tests.conftest import TEST_DEVICE

DEV = DeviceInfo(**TEST_DEVICE)
P = Problem(4096, 4096)
DECODE_CFG = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8, block_n=128, threads=128)
MIXED_CFG = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=16)
PREFILL_CFG = KernelConfig(max_q_gemm_rows=0, recon_chunk_n=4096)
CUSTOM_CFG = KernelConfig(max_q_gemm_rows=24, max_q_gemm_rows_kernel=4)
DEFAULT = PRESETS["default"].to_dict()
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _resolve(entries: list[Any], workload: str | None = None, **kw: Any) -> Any:
    offer = Offer("database", "t.db", entries)
    return resolve([offer], DEV.fingerprint, kernel_hash(), P.key(), workload, default=DEFAULT,
                   **kw)


# -- the rules on plain data ---------------------------------------------------------------------


def test_decode_beside_mixed_is_two_bands_split_at_the_decode_workloads_largest_m(make_entry) -> None:
    res = _resolve([make_entry(config=MIXED_CFG, workload="mixed", created_at=T0),
                    make_entry(config=DECODE_CFG, workload="decode", created_at=T0)])
    assert [(b.m_lo, b.m_hi, b.workload_key) for b in res.bands] == [(1, 8, "decode"),
                                                                    (9, None, "mixed")]
    assert res.config_at(8) == DECODE_CFG.to_dict() and res.config_at(9) == MIXED_CFG.to_dict()
    assert {b.source for b in res.bands} == {"database"} and res.bands[0].span == "M 1-8"


def test_mixed_is_preferred_over_prefill_and_prefill_over_a_newer_custom(make_entry) -> None:
    d = make_entry(config=DECODE_CFG, workload="decode", created_at=T0)
    p = make_entry(config=PREFILL_CFG, workload="prefill", created_at=T0 + timedelta(days=1))
    m = make_entry(config=MIXED_CFG, workload="mixed", created_at=T0)
    from gemmtune.kernels import Workload

    c = make_entry(config=CUSTOM_CFG, workload=Workload.parse("1,16"), created_at=T0 + timedelta(days=2))
    assert _resolve([d, p, m, c]).bands[1].workload_key == "mixed"
    assert _resolve([d, p, c]).bands[1].workload_key == "prefill"
    assert _resolve([d, c]).bands[1].workload_key == "1:1,16:1"
    assert len(_resolve([d]).bands) == 1 and _resolve([d]).bands[0].m_hi is None


def test_a_named_workload_is_exact_and_no_split_means_the_newest(make_entry) -> None:
    entries = [make_entry(config=DECODE_CFG, workload="decode", created_at=T0),
               make_entry(config=PREFILL_CFG, workload="prefill", created_at=T0 + timedelta(1))]
    assert _resolve(entries, "decode").bands[0].config == DECODE_CFG.to_dict()
    assert _resolve(entries, "mixed").bands[0].source == "default"
    assert _resolve(entries, split=False).bands[0].workload_key == "prefill"
    only = _resolve(entries, "mixed", argument=CUSTOM_CFG.to_dict())
    assert only.bands[0].source == "argument" and only.bands[0].config == CUSTOM_CFG.to_dict()


def test_stale_entries_are_skipped_with_the_reason_and_never_served(make_entry) -> None:
    res = _resolve([make_entry(config=MIXED_CFG, workload="mixed", kh="ab" * 32)])
    assert res.bands[0].source == "default"
    assert [(s.reason, s.entry.workload_key) for s in res.skipped] == [("stale", "mixed")]


def test_the_first_offer_with_an_entry_wins_per_band(make_entry) -> None:
    profile = Offer("profile", "p.json", [make_entry(config=DECODE_CFG, workload="decode")],
                    DEV.fingerprint, kernel_hash())
    db = Offer("database", "t.db", [make_entry(config=MIXED_CFG, workload="mixed"),
                                    make_entry(config=CUSTOM_CFG, workload="decode")])
    res = resolve([profile, db], DEV.fingerprint, kernel_hash(), P.key(), default=DEFAULT)
    assert [(b.source, b.config) for b in res.bands] == [("profile", DECODE_CFG.to_dict()),
                                                        ("database", MIXED_CFG.to_dict())]
    foreign = Offer("profile", "p.json", profile.entries, "0" * 16, kernel_hash())
    res = resolve([foreign, db], DEV.fingerprint, kernel_hash(), P.key(), default=DEFAULT)
    assert res.bands[0].config == CUSTOM_CFG.to_dict()
    assert [(s.kind, s.reason, s.entry) for s in res.skipped] == [("profile", "device", None)]


# -- bench and compare measure what the runtime launches -----------------------------------------


class RecordingEvaluator:
    """Records which config each M was measured with (dispatch: side A only)."""

    def __init__(self, log: dict[str, dict[int, KernelConfig]], workload: Any) -> None:
        self.log, self.workload = log, workload
        self.device, self.kernel_hash = DEV, kernel_hash()

    def _times(self, cfg: KernelConfig, side: str) -> dict[int, Measurement]:
        for m in self.workload.ms:
            assert m not in self.log[side], f"M={m} measured twice"
            self.log[side][m] = cfg
        return {m: Measurement(10.0 + m / cfg.max_q_gemm_rows_kernel, 0.1, 5) for m in self.workload.ms}

    def dispatch(self, cfg: KernelConfig, check: bool = True) -> dict[int, Measurement]:
        return self._times(cfg, "a")

    def interleaved(self, a: KernelConfig, b: KernelConfig, rounds: int = 5) -> Any:
        return self._times(a, "a"), self._times(b, "b")

    def close(self) -> None:
        pass


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[int, KernelConfig]]:
    from gemmtune.autotune import study as st

    log: dict[str, dict[int, KernelConfig]] = {"a": {}, "b": {}}
    monkeypatch.setattr(st, "make_evaluator", lambda p, w, i=0: RecordingEvaluator(log, w))
    monkeypatch.setattr(st, "device_identity", lambda i=0: (DEV, kernel_hash()))
    monkeypatch.setattr(st, "gpu_count", lambda: 1)
    return log


TUNES = {
    "decode+mixed": (("decode", DECODE_CFG), ("mixed", MIXED_CFG)),
    "decode+mixed+prefill": (("decode", DECODE_CFG), ("mixed", MIXED_CFG), ("prefill", PREFILL_CFG)),
    "decode+prefill": (("decode", DECODE_CFG), ("prefill", PREFILL_CFG)),
    "mixed+prefill": (("mixed", MIXED_CFG), ("prefill", PREFILL_CFG)),
    "decode": (("decode", DECODE_CFG),),
}
ALL_MS = tuple(range(1, 521))


def _database(tmp_path: Path, make_entry, tunes: tuple[tuple[str, KernelConfig], ...]) -> str:
    path = tmp_path / "tuning.db"
    with Store.open(f"sqlite:///{path}") as store:
        for i, (workload, cfg) in enumerate(tunes):
            store.put_result(make_entry(config=cfg, workload=workload, device=DEV.to_dict(),
                                        created_at=T0 + timedelta(hours=i)))
    return str(path)


def _runtime_launches(db: str, monkeypatch: pytest.MonkeyPatch) -> dict[int, KernelConfig]:
    """Per M the config a QuantLinear with no workload launches: the decode band's plan for
    M <= DECODE_MAX_M when there is one, else the main plan (runtime/quant_linear.py)."""
    monkeypatch.setenv("GEMMTUNE_DB", db)
    clear_cache()
    main_res, small = lookup_split(DEV, P)
    clear_cache()
    return {m: small.config if small is not None and m <= DECODE_MAX_M else main_res.config
            for m in ALL_MS}


@pytest.mark.parametrize("tunes", list(TUNES), ids=list(TUNES))
def test_bench_and_compare_tuned_measure_what_the_runtime_launches_at_every_m(
        tunes: str, recording: dict[str, dict[int, KernelConfig]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, make_entry) -> None:
    db = _database(tmp_path, make_entry, TUNES[tunes])
    launched = _runtime_launches(db, monkeypatch)
    monkeypatch.delenv("GEMMTUNE_DB")

    # the API bench and compare run on
    tuned = cmp.resolve_source("tuned", [P], device=DEV, kernel_hash=kernel_hash(), db_url=db)
    r = cmp.measure_dispatch("tuned", {P: ["qkv×40"]}, tuned, ALL_MS)
    assert recording["a"] == launched
    assert {m: r.problems[0].config_at(m) for m in ALL_MS} == launched
    assert all(r.problems[0].points[m].path == cmp.path_for(launched[m], m) for m in ALL_MS)
    recording["a"].clear()
    default = cmp.resolve_source("default", [P])
    cmp.measure_interleaved(("default", "tuned"), {P: []}, default, tuned, ALL_MS)
    assert recording["b"] == launched and set(recording["a"].values()) == {PRESETS["default"]}

    # the commands, at their default Ms; the results file keeps the bands
    for side in recording.values():
        side.clear()
    out = tmp_path / "tuned.json"
    res = CliRunner().invoke(main, ["bench", "tuned", "--shape", "4096x4096", "--db", db,
                                    "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert recording["a"] == {m: launched[m] for m in cmp.DEFAULT_MS}
    back = cmp.load_results(out).problems[0]
    assert {m: back.config_at(m) for m in cmp.DEFAULT_MS} == recording["a"]
    for side in recording.values():
        side.clear()
    res = CliRunner().invoke(main, ["compare", "exllamav2-0.0.12", "tuned", "--shape",
                                    "4096x4096", "--db", db], catch_exceptions=False)
    assert res.exit_code in (0, 1), res.output
    assert recording["b"] == {m: launched[m] for m in cmp.DEFAULT_MS}
