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
from gemmtune.runtime import clear_cache

from gemmtune.cli import main
from gemmtune.cli._common import _config_short
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


GEMV_CFG = KernelConfig(max_q_gemm_rows=4, max_q_gemm_rows_kernel=4, split_k=8)
GEMM_CFG = KernelConfig(max_q_gemm_rows=32, max_q_gemm_rows_kernel=32, block_n=128, threads=128)
DECODE_PLAN = ((4, GEMV_CFG), (None, DECODE_CFG))  # decode Ms 1..8
MIXED_PLAN = ((4, GEMV_CFG), (32, GEMM_CFG), (None, MIXED_CFG))  # mixed Ms 1..512


def _spans(res: Any) -> list[tuple[int, int | None, Any, str | None]]:
    return [(b.m_lo, b.m_hi, b.config, b.workload_key) for b in res.bands]


def test_an_entrys_plan_is_the_answers_bands(make_entry) -> None:
    mixed = make_entry(workload="mixed", bands=MIXED_PLAN)
    want = [(1, 4, GEMV_CFG.to_dict(), "mixed"), (5, 32, GEMM_CFG.to_dict(), "mixed"),
            (33, None, MIXED_CFG.to_dict(), "mixed")]
    assert _spans(_resolve([mixed])) == want
    assert _spans(_resolve([mixed], "mixed")) == want
    assert _spans(_resolve([mixed], split=False)) == want
    assert all(b.entry is mixed and b.source == "database" for b in _resolve([mixed]).bands)


def test_the_decode_split_clips_each_plan_to_its_side_of_the_edge(make_entry) -> None:
    """decode's bands cut to M 1..8 (its largest M), the larger entry's to M 9..: the
    decode/mixed split is two plans merged at one edge."""
    decode = make_entry(workload="decode", bands=DECODE_PLAN, created_at=T0)
    mixed = make_entry(workload="mixed", bands=MIXED_PLAN, created_at=T0)
    assert _spans(_resolve([decode, mixed])) == [
        (1, 4, GEMV_CFG.to_dict(), "decode"), (5, 8, DECODE_CFG.to_dict(), "decode"),
        (9, 32, GEMM_CFG.to_dict(), "mixed"), (33, None, MIXED_CFG.to_dict(), "mixed")]
    # a one-band decode entry beside a plan: the plan's bands below the edge are dropped
    one = make_entry(workload="decode", config=DECODE_CFG, created_at=T0)
    assert _spans(_resolve([one, mixed])) == [
        (1, 8, DECODE_CFG.to_dict(), "decode"), (9, 32, GEMM_CFG.to_dict(), "mixed"),
        (33, None, MIXED_CFG.to_dict(), "mixed")]
    # and a decode plan whose last band reconstructs keeps its config up to the edge
    recon_top = KernelConfig(max_q_gemm_rows=6, max_q_gemm_rows_kernel=8)
    d2 = make_entry(workload="decode", bands=((2, GEMV_CFG), (None, recon_top)), created_at=T0)
    big = make_entry(workload="prefill", config=PREFILL_CFG, created_at=T0)
    assert _spans(_resolve([d2, big])) == [
        (1, 2, GEMV_CFG.to_dict(), "decode"), (3, 8, recon_top.to_dict(), "decode"),
        (9, None, PREFILL_CFG.to_dict(), "prefill")]


def test_show_serves_one_span_per_entry(make_entry) -> None:
    from gemmtune.db.resolve import serving

    decode = make_entry(workload="decode", bands=DECODE_PLAN, created_at=T0)
    mixed = make_entry(workload="mixed", bands=MIXED_PLAN, created_at=T0)
    serves = serving([decode, mixed], kernel_hash())
    assert (serves[id(decode)].m_lo, serves[id(decode)].m_hi) == (1, 8)
    assert (serves[id(mixed)].m_lo, serves[id(mixed)].m_hi) == (9, None)


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
    "decode-plan+mixed-plan": (("decode", DECODE_PLAN), ("mixed", MIXED_PLAN)),
    "mixed-plan": (("mixed", MIXED_PLAN),),
}
ALL_MS = tuple(range(1, 521))


def _database(tmp_path: Path, make_entry, tunes: tuple[tuple[str, Any], ...]) -> str:
    """Entries of (workload, config or plan over M bands)."""
    path = tmp_path / "tuning.db"
    with Store.open(f"sqlite:///{path}") as store:
        for i, (workload, cfg) in enumerate(tunes):
            kw = {"bands": cfg} if isinstance(cfg, tuple) else {"config": cfg}
            store.put_result(make_entry(workload=workload, device=DEV.to_dict(),
                                        created_at=T0 + timedelta(hours=i), **kw))
    return str(path)


def _runtime_launches(db: str, monkeypatch: pytest.MonkeyPatch) -> dict[int, KernelConfig]:
    """Per M the config a QuantLinear with no workload launches: the plan of the band that
    `bisect_left(band_edges(bands), M)` names, as its forward picks it (runtime/quant_linear.py)."""
    from bisect import bisect_left

    from gemmtune.runtime.lookup import resolve as runtime_resolve
    from gemmtune.runtime.quant_linear import band_edges

    monkeypatch.setenv("GEMMTUNE_DB", db)
    clear_cache()
    bands = runtime_resolve(DEV, P).bands
    clear_cache()
    edges = band_edges(bands)
    return {m: bands[bisect_left(edges, m)].config for m in ALL_MS}


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


# -- `gemmtune resolve` on CPU --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`resolve` takes GPU 0 when there is one: these tests name the card themselves."""
    import gemmtune.kernels.device as device

    monkeypatch.setattr(device, "device_count", lambda: 0)


def _resolve_cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["resolve", *args])


def _profile(tmp_path: Path, make_entry, workload: str, cfg: KernelConfig) -> str:
    from gemmtune.db.profiles import build_profile

    url = f"sqlite:///{tmp_path / 'export.db'}"
    with Store.open(url) as store:
        store.put_result(make_entry(config=cfg, workload=workload, device=DEV.to_dict()))
        prof = build_profile(store, DEV.to_dict(), current_kernel_hash=kernel_hash())
    path = tmp_path / "h100.json"
    path.write_text(prof.dumps())
    return str(path)


def test_resolve_shows_bands_sources_and_stale_entries_from_a_database(tmp_path: Path, make_entry) -> None:
    import json

    db = _database(tmp_path, make_entry, TUNES["decode+mixed"])
    with Store.open(f"sqlite:///{db}") as store:
        store.put_result(make_entry(4096, 14336, config=MIXED_CFG, workload="mixed",
                                    kh="ab" * 32, device=DEV.to_dict()))
    r = _resolve_cli("--shape", "4096x4096", "--shape", "4096x14336", "--db", db, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["card"]["fingerprint"] == DEV.fingerprint and doc["kernel_hash"] == kernel_hash()
    first, second = doc["layers"]
    assert first["path"] == second["path"] == "kernel"
    assert [(b["m_lo"], b["m_hi"], b["config_key"], b["source"], b["workload"])
            for b in first["bands"]] == [(1, 8, DECODE_CFG.key(), "database", "decode"),
                                         (9, None, MIXED_CFG.key(), "database", "mixed")]
    assert first["bands"][0]["created_at"].startswith("2026-01-01")
    assert [(b["source"], b["config_key"]) for b in second["bands"]] == [
        ("default", PRESETS["default"].key())]
    assert [(s["reason"], s["workload"]) for s in second["skipped"]] == [("stale", "mixed")]
    assert any("stale" in w for w in doc["warnings"])
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--fingerprint", DEV.fingerprint[:6])
    assert r.exit_code == 0, r.output
    assert "M 1-8" in r.output and "decode entry" in r.output and "M >= 9" in r.output
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--workload", "mixed", "--json")
    bands = json.loads(r.stdout)["layers"][0]["bands"]
    assert [(b["m_lo"], b["m_hi"], b["workload"]) for b in bands] == [(1, None, "mixed")]


def test_resolve_asks_the_profile_first_and_names_a_foreign_card(tmp_path: Path, make_entry) -> None:
    import json

    profile = _profile(tmp_path, make_entry, "decode", CUSTOM_CFG)
    db = _database(tmp_path, make_entry, TUNES["decode+mixed"])
    r = _resolve_cli("--model", "llama-2-7b", "--layout", "separate", "--db", db, "--profile", profile,
                     "--json")
    assert r.exit_code == 0, r.output
    layer = next(x for x in json.loads(r.stdout)["layers"] if x["problem_key"] == P.key())
    assert [(b["source"], b["config_key"]) for b in layer["bands"]] == [
        ("profile", CUSTOM_CFG.key()), ("database", MIXED_CFG.key())]
    assert layer["layers"] == ["q_proj×32", "k_proj×32", "v_proj×32", "o_proj×32"]  # no GQA
    # the same profile seen from another card: skipped as a whole, nothing tuned there
    other = "0123456789abcdef"
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--profile", profile, "--fingerprint",
                     other, "--json")
    doc = json.loads(r.stdout)
    assert doc["card"]["fingerprint"] == other
    assert [b["source"] for b in doc["layers"][0]["bands"]] == ["default"]
    assert [(s["source"], s["reason"]) for s in doc["layers"][0]["skipped"]] == [("profile", "device")]
    assert len(doc["warnings"]) == 1 and "another card" in doc["warnings"][0]


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "not-a-profile"])
def test_a_profile_named_with_the_option_that_cannot_be_read_is_an_error(
        tmp_path: Path, make_entry, kind: str) -> None:
    """--profile is the user's explicit choice: unreadable, it is one line naming the option and
    exit 1, before any table (not the defaults and a GEMMTUNE_PROFILE warning). The same file
    from GEMMTUNE_PROFILE keeps the runtime's fallback, which is what a model load would do."""
    bad = tmp_path / "h100.json"
    if kind == "directory":
        bad.mkdir()
    elif kind == "garbage":
        bad.write_bytes(b"\x00garbage{")
    elif kind == "not-a-profile":
        bad.write_text('{"format": "gemmtune-bench-results"}')
    db = _database(tmp_path, make_entry, TUNES["decode"])
    args = ("--shape", "4096x4096", "--db", db, "--fingerprint", DEV.fingerprint)
    r = _resolve_cli(*args, "--profile", str(bad))
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --profile: "), r.stderr
    assert str(bad) in lines[0] and "GEMMTUNE_PROFILE" not in r.output
    assert r.stdout == ""  # no table of defaults
    r = CliRunner().invoke(main, ["resolve", *args], env={"GEMMTUNE_PROFILE": str(bad)})
    assert r.exit_code == 0, r.output
    assert "GEMMTUNE_PROFILE profile is not usable" in r.stderr


def test_resolve_without_a_gpu_needs_a_card_it_can_name(tmp_path: Path, make_entry) -> None:
    empty = str(tmp_path / "none.db")
    r = _resolve_cli("--shape", "4096x4096", "--db", empty)
    assert r.exit_code == 1 and "--fingerprint" in r.output
    db = _database(tmp_path, make_entry, TUNES["decode"])
    with Store.open(f"sqlite:///{db}") as store:
        a100 = DeviceInfo(**{**TEST_DEVICE, "name": "NVIDIA A100-SXM4-80GB", "sm_count": 108})
        store.put_result(make_entry(config=MIXED_CFG, device=a100.to_dict()))
    r = _resolve_cli("--shape", "4096x4096", "--db", db)
    assert r.exit_code == 1 and "2 cards are tuned" in r.output
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--fingerprint", "a100", "--json")
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["layers"][0]["bands"][0]["config_key"] == MIXED_CFG.key()
    r = _resolve_cli("--db", db)
    assert r.exit_code == 1 and "nothing to resolve: give --model" in r.output


def test_resolve_reads_an_awq_checkpoint_and_refuses_exl2_in_one_line(tmp_path: Path) -> None:
    import json

    def config(qc: dict[str, Any]) -> str:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"hidden_size": 4096, "intermediate_size": 11008,
                                    "num_attention_heads": 32, "num_hidden_layers": 32,
                                    "quantization_config": qc}))
        return str(path)

    db = str(tmp_path / "none.db")
    awq = config({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"})
    r = _resolve_cli("--config", awq, "--db", db, "--fingerprint", "0123456789abcdef", "--json")
    assert r.exit_code == 0, r.output
    assert {x["problem_key"] for x in json.loads(r.stdout)["layers"]} == {  # q/k/v/o, gate/up, down
        "4096x4096-b4-g64", "4096x11008-b4-g64", "11008x4096-b4-g64"}
    r = _resolve_cli("--config", awq, "--layout", "fused", "--db", db, "--fingerprint",
                     "0123456789abcdef", "--json")
    assert {x["problem_key"] for x in json.loads(r.stdout)["layers"]} == {
        "4096x12288-b4-g64", "4096x4096-b4-g64", "4096x22016-b4-g64", "11008x4096-b4-g64"}
    r = _resolve_cli("--config", awq, "--layout", "qkv", "--db", db, "--fingerprint",
                     "0123456789abcdef")
    assert r.exit_code == 1 and r.output.strip() == "error: unknown layout 'qkv': choose " \
        "transformers, separate, fused"
    exl2 = config({"quant_method": "exl2", "bits": 4.65})
    r = _resolve_cli("--config", exl2, "--db", db, "--fingerprint", "0123456789abcdef")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "quantization_config.quant_method='exl2' is not supported" in r.output


def test_resolve_lists_every_band_of_a_plan(tmp_path: Path, make_entry) -> None:
    import json

    db = _database(tmp_path, make_entry, TUNES["decode-plan+mixed-plan"])
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--fingerprint", DEV.fingerprint, "--json")
    assert r.exit_code == 0, r.output
    bands = json.loads(r.stdout)["layers"][0]["bands"]
    want = [(1, 4, GEMV_CFG, "decode"), (5, 8, DECODE_CFG, "decode"),
            (9, 32, GEMM_CFG, "mixed"), (33, None, MIXED_CFG, "mixed")]
    assert [(b["m_lo"], b["m_hi"], b["config"], b["workload"]) for b in bands] == [
        (lo, hi, c.to_dict(), w) for lo, hi, c, w in want]
    # the table at a terminal's default width: each band one line, its Ms beside its config
    # spelled as every table spells it (unwrapped), where it came from on the line below
    r = CliRunner().invoke(main, ["resolve", "--model", "llama-2-7b", "--db", db,
                                  "--fingerprint", DEV.fingerprint], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    for span, (_lo, _hi, cfg, workload) in zip(("M 1-4", "M 5-8", "M 9-32", "M >= 33"), want,
                                               strict=True):
        at = next(i for i, ln in enumerate(lines) if span in ln)
        assert _config_short(cfg) in lines[at], r.output
        assert f"database: {workload} entry" in lines[at + 1], r.output
    assert db in lines[-1]  # the database, named once


def test_build_hash_matches_these_sources_under_any_compiler_only_where_nvrtc_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gemmtune.kernels import sources

    gpu = kernel_hash("nvrtc-13.2")  # these sources, as a GPU machine with NVRTC 13.2 hashes them
    monkeypatch.setattr(sources, "compiler_version", lambda: sources.NO_COMPILER)
    assert sources.build_hash([gpu, "ab" * 32]) == gpu
    assert sources.build_hash(["ab" * 32]) == sources.kernel_hash()  # other sources: not ours
    # two compilers' results of these sources: ambiguous, so neither is taken for this build
    assert sources.build_hash([gpu, kernel_hash("nvrtc-12.8")]) == sources.kernel_hash()
    monkeypatch.setattr(sources, "compiler_version", lambda: "nvrtc-13.0")
    assert sources.build_hash([gpu]) == kernel_hash("nvrtc-13.0")  # with NVRTC: its own only


def test_without_nvrtc_resolve_and_show_serve_a_gpu_machines_results_of_these_sources(
        tmp_path: Path, make_entry, monkeypatch: pytest.MonkeyPatch) -> None:
    # What README's "resolve needs no GPU" promises: a laptop without NVRTC reading the database
    # of a GPU machine that ran this very code. Results of other code stay stale.
    import json

    from gemmtune.kernels import sources

    monkeypatch.setattr(sources, "compiler_version", lambda: sources.NO_COMPILER)
    db = str(tmp_path / "gpu.db")
    with Store.open(f"sqlite:///{db}") as store:
        store.put_result(make_entry(config=MIXED_CFG, workload="mixed", device=DEV.to_dict(),
                                    kh=kernel_hash("nvrtc-13.2")))
        store.put_result(make_entry(4096, 14336, config=MIXED_CFG, workload="mixed",
                                    kh="ab" * 32, device=DEV.to_dict()))
    r = _resolve_cli("--shape", "4096x4096", "--shape", "4096x14336", "--db", db,
                     "--fingerprint", DEV.fingerprint, "--json")
    assert r.exit_code == 0, r.output
    first, second = json.loads(r.stdout)["layers"]
    assert [(b["source"], b["config_key"]) for b in first["bands"]] == [("database", MIXED_CFG.key())]
    assert [s["reason"] for s in second["skipped"]] == ["stale"]
    r = CliRunner().invoke(main, ["show", "--db", db])
    assert r.exit_code == 0 and "1 stale entry" in r.output, r.output
    # with NVRTC another compiler's results are another build, as before
    monkeypatch.setattr(sources, "compiler_version", lambda: "nvrtc-13.0")
    r = _resolve_cli("--shape", "4096x4096", "--db", db, "--fingerprint", DEV.fingerprint, "--json")
    assert [s["reason"] for s in json.loads(r.stdout)["layers"][0]["skipped"]] == ["stale"]
