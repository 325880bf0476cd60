"""`gemmtune.autotune.compare` on CPU: the results format, source resolution, the comparison
math (ratios, geometric means, the threshold-and-spread rule) and the reports."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gemmtune.autotune import compare as cmp
from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem

from tests.conftest import FakeEvaluator
from tests.synthetic import FAKE_DEVICE, FAKE_KERNEL_HASH

P1 = Problem(4096, 6144)
P2 = Problem(14336, 4096)


def results(label: str, times: dict[Problem, dict[int, tuple[float, float]]],
            config: KernelConfig | None = None, device: DeviceInfo = FAKE_DEVICE,
            kernel_hash: str = FAKE_KERNEL_HASH) -> cmp.BenchResults:
    cfg = config or PRESETS["default"]
    probs = [cmp.ProblemBench(p, cfg, {m: cmp.Point(m, t, s, 15, cmp.path_for(cfg, m))
                                       for m, (t, s) in pts.items()}, ("qkv×32",), f"preset {label}")
             for p, pts in times.items()]
    return cmp.BenchResults(label, device.to_dict(), kernel_hash, probs, provenance=label,
                            command="gemmtune bench", created_at=datetime(2025, 5, 1, tzinfo=UTC))


# -- the rule ----------------------------------------------------------------------------------


def pt(us: float, spread: float = 0.0) -> cmp.Point:
    return cmp.Point(1, us, spread, 15, "fused")


@pytest.mark.parametrize(("a", "b", "threshold", "flag"), [
    (pt(10.0, 0.1), pt(10.5, 0.1), 0.03, True),    # 5 % slower, far outside the spreads
    (pt(10.0, 0.1), pt(10.2, 0.1), 0.03, False),   # 2 %: under the threshold
    (pt(10.0, 0.1), pt(10.5, 0.1), 0.06, False),   # 5 % under a 6 % threshold
    (pt(10.0, 0.4), pt(10.5, 0.2), 0.03, False),   # 0.5 µs slower, spreads add up to 0.6: noise
    (pt(10.0, 0.2), pt(10.5, 0.2), 0.03, True),    # 0.5 > 0.4: real
    (pt(10.0, 0.0), pt(9.0, 0.0), 0.03, False),    # faster is never a regression
    (pt(10.0, 0.0), pt(10.3, 0.0), 0.03, False),   # exactly 3 %: not beyond it
])
def test_regression_needs_ratio_beyond_threshold_and_difference_beyond_spreads(
        a: cmp.Point, b: cmp.Point, threshold: float, flag: bool) -> None:
    assert cmp.is_regression(a, b, threshold) is flag


def test_improvement_is_the_mirror_and_never_a_regression() -> None:
    assert cmp.is_improvement(pt(10.0, 0.1), pt(9.0, 0.1))
    assert not cmp.is_regression(pt(10.0, 0.1), pt(9.0, 0.1))
    assert not cmp.is_improvement(pt(10.0, 0.6), pt(9.0, 0.6))  # inside the noise


def test_geomean_of_ratios_cancels_twice_and_half() -> None:
    assert cmp.geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert cmp.geomean([1.1, 1.1, 1.1]) == pytest.approx(1.1)
    assert math.isnan(cmp.geomean([]))
    with pytest.raises(ValueError):
        cmp.geomean([1.0, 0.0])


def test_comparison_ratios_geomeans_and_flags() -> None:
    a = results("A", {P1: {1: (10.0, 0.1), 4: (20.0, 0.1)}, P2: {1: (40.0, 0.1), 4: (40.0, 0.1)}})
    b = results("B", {P1: {1: (12.0, 0.1), 4: (20.0, 0.1)}, P2: {1: (20.0, 0.1), 4: (40.4, 0.1)}})
    c = cmp.compare_results(a, b, 0.03)
    ratios = {(r.problem_key, r.m): r.ratio for r in c.rows}
    assert ratios == {(P1.key(), 1): pytest.approx(1.2), (P1.key(), 4): pytest.approx(1.0),
                      (P2.key(), 1): pytest.approx(0.5), (P2.key(), 4): pytest.approx(1.01)}
    assert [(r.problem_key, r.m) for r in c.regressions] == [(P1.key(), 1)]
    assert [(r.problem_key, r.m) for r in c.improvements] == [(P2.key(), 1)]
    by = c.geomean_by_problem()
    assert by[P1.key()] == pytest.approx(math.sqrt(1.2))
    assert by[P2.key()] == pytest.approx(math.sqrt(0.5 * 1.01))
    assert c.geomean == pytest.approx((1.2 * 1.0 * 0.5 * 1.01) ** 0.25)
    assert not c.warnings and not c.left_out


def test_mismatched_sets_compare_the_intersection_and_say_what_was_left_out() -> None:
    a = results("A", {P1: {1: (10.0, 0.1), 2: (11.0, 0.1)}, P2: {1: (5.0, 0.1)}})
    b = results("B", {P1: {1: (10.0, 0.1), 8: (12.0, 0.1)}})
    c = cmp.compare_results(a, b)
    assert [(r.problem_key, r.m) for r in c.rows] == [(P1.key(), 1)]
    text = " | ".join(c.left_out)
    assert P2.key() in text and "only in A" in text
    assert "M 2 only in A" in text and "M 8 only in B" in text


def test_no_common_point_is_an_error() -> None:
    a = results("A", {P1: {1: (10.0, 0.1)}})
    b = results("B", {P2: {1: (10.0, 0.1)}})
    with pytest.raises(cmp.CompareError, match="nothing to compare"):
        cmp.compare_results(a, b)


def test_different_card_or_kernel_build_warns_but_compares() -> None:
    other = DeviceInfo("nvidia", "NVIDIA A100-SXM4-80GB", "8.0", 108, 80 * 2**30)
    a = results("A", {P1: {1: (10.0, 0.1)}})
    b = results("B", {P1: {1: (10.0, 0.1)}}, device=other, kernel_hash="f" * 64)
    c = cmp.compare_results(a, b)
    assert len(c.rows) == 1
    assert any("different cards" in w for w in c.warnings)
    assert any("different kernel builds" in w for w in c.warnings)


def test_threshold_parsing() -> None:
    assert cmp.parse_threshold("3%") == pytest.approx(0.03)
    assert cmp.parse_threshold("0.05") == pytest.approx(0.05)
    assert cmp.parse_threshold(" 10 % ") == pytest.approx(0.10)
    for bad in ("abc", "-1%", "nan", "5000%"):
        with pytest.raises(cmp.CompareError):
            cmp.parse_threshold(bad)
    # `--threshold 5` in a CI script means 5 %, not 500 %: refused with the spelling that works,
    # rather than read as a gate that never fires.
    for bare in ("5", "1", "3.0"):
        with pytest.raises(cmp.CompareError, match=f"write {bare}%"):
            cmp.parse_threshold(bare)
    assert cmp.parse_threshold("150%") == pytest.approx(1.5)


def test_m_lists() -> None:
    assert cmp.parse_ms(None) == cmp.DEFAULT_MS
    assert len(cmp.DEFAULT_MS) == 15
    assert cmp.parse_ms("8,1,4") == (1, 4, 8)
    assert cmp.parse_ms("1:4,512:1") == (1, 512)
    assert cmp.parse_ms(None, "decode") == tuple(range(1, 9))
    with pytest.raises(cmp.CompareError):
        cmp.parse_ms("1,x")
    with pytest.raises(cmp.CompareError):
        cmp.parse_ms("1", "decode")


def test_path_follows_the_fused_threshold() -> None:
    cfg = PRESETS["exllamav2-0.0.12"]  # fused up to 32 rows
    assert cmp.path_for(cfg, 32) == "fused"
    assert cmp.path_for(cfg, 33) == "recon"
    assert cmp.path_for(KernelConfig(max_q_gemm_rows=0), 1) == "recon"


# -- results files -----------------------------------------------------------------------------


def test_results_round_trip(tmp_path: Path) -> None:
    r = results("exllamav2-0.0.12", {P1: {1: (10.0, 0.1), 64: (30.0, 0.5)}},
                config=PRESETS["exllamav2-0.0.12"])
    path = tmp_path / "r.json"
    r.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "gemmtune-bench" and doc["schema_version"] == 1
    assert doc["device"]["fingerprint"] == FAKE_DEVICE.fingerprint
    assert doc["kernel_hash"] == FAKE_KERNEL_HASH
    assert doc["source"]["label"] == "exllamav2-0.0.12"
    entry = doc["problems"][0]
    assert entry["config_key"] == PRESETS["exllamav2-0.0.12"].key()
    assert [p["path"] for p in entry["points"]] == ["fused", "recon"]
    back = cmp.load_results(path)
    assert back.to_json() == r.to_json()


def _doc() -> dict[str, Any]:
    return results("A", {P1: {1: (10.0, 0.1)}}).to_json()


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    cur: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    last = parts[-1]
    if value is _DELETE:
        del cur[last]
    else:
        cur[int(last) if last.isdigit() else last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "message"), [
    ("format", "gemmtune-profile", "tuning profile"),
    ("format", "something", "not a gemmtune results file"),
    ("schema_version", 99, "schema_version 99"),
    ("kernel_hash", _DELETE, "missing field"),
    ("extra", 1, "unknown field"),
    ("device.fingerprint", "0" * 16, "does not match"),
    ("problems", [], "non-empty"),
    ("problems.0.problem.k", 100, "multiple of 32"),
    ("problems.0.config.block_n", 33, "block_n"),
    ("problems.0.problem_key", "1x1-b4-g128", "does not match"),
    ("problems.0.points.0.median_us", float("nan"), "median_us"),
    ("problems.0.points.0.median_us", -1.0, "median_us"),
    ("problems.0.points.0.median_us", True, "median_us"),
    ("problems.0.points.0.spread_us", "0.1", "spread_us"),
    ("problems.0.points.0.m", 0, ".m"),
    ("problems.0.points.0.path", "magic", "fused or recon"),
    ("created_at", "yesterday", "ISO date"),
])
def test_bad_results_are_rejected_with_one_line(path: str, value: Any, message: str) -> None:
    doc = _set(_doc(), path, value)
    with pytest.raises(cmp.CompareError, match=message) as info:
        cmp.results_from_json(doc, "r.json")
    assert "\n" not in str(info.value)


def test_duplicate_m_and_problem_rejected() -> None:
    doc = _doc()
    doc["problems"][0]["points"].append(dict(doc["problems"][0]["points"][0]))
    with pytest.raises(cmp.CompareError, match="M=1 appears twice"):
        cmp.results_from_json(doc)
    doc = _doc()
    doc["problems"].append(json.loads(json.dumps(doc["problems"][0])))
    with pytest.raises(cmp.CompareError, match="appears twice"):
        cmp.results_from_json(doc)


def test_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(cmp.CompareError, match="not valid JSON"):
        cmp.load_results(bad)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(cmp.CompareError, match="UTF-8"):
        cmp.load_results(binary)
    with pytest.raises(cmp.CompareError, match="cannot read"):
        cmp.load_results(tmp_path / "missing.json")


# -- sources -----------------------------------------------------------------------------------


def test_preset_and_unknown_sources(tmp_path: Path) -> None:
    src = cmp.resolve_source("exllamav2-0.0.11", [P1, P2])
    assert src.kind == "preset"
    assert src.configs == {P1: PRESETS["exllamav2-0.0.11"], P2: PRESETS["exllamav2-0.0.11"]}
    with pytest.raises(cmp.CompareError, match="unknown source 'fastest'"):
        cmp.resolve_source("fastest", [P1])
    with pytest.raises(cmp.CompareError, match="not a file"):
        cmp.resolve_source(str(tmp_path), [P1])
    with pytest.raises(cmp.CompareError, match="missing.json: no such file"):
        cmp.resolve_source(str(tmp_path / "missing.json"), [P1])
    other = tmp_path / "other.json"
    other.write_text('{"format": "x"}')
    with pytest.raises(cmp.CompareError, match="neither a results file"):
        cmp.resolve_source(str(other), [P1])


def test_results_file_source_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    results("A", {P1: {1: (10.0, 0.1)}}).save(path)
    src = cmp.resolve_source(str(path), [P2])
    assert src.kind == "results" and src.measured
    assert src.results is not None and src.results.problems[0].problem == P1


def _store_entry(db: str, problem: Problem, config: KernelConfig, workload: str = "mixed",
                 kernel_hash: str = FAKE_KERNEL_HASH) -> None:
    from gemmtune.db.store import Store, TunedEntry
    from gemmtune.kernels.workload import WORKLOADS

    wl = WORKLOADS[workload]
    lat, dlat = {m: 1.0 for m in wl.ms}, {m: 1.2 for m in wl.ms}
    with Store.open(db) as store:
        store.put_result(TunedEntry(
            device=FAKE_DEVICE.to_dict(), kernel_hash=kernel_hash,
            problem={"k": problem.k, "n": problem.n, "bits": problem.bits,
                     "group_size": problem.group_size, "act_order": problem.act_order},
            problem_key=problem.key(),
            workload={"name": wl.name, "ms": list(wl.ms), "weights": list(wl.weights)},
            workload_key=wl.key(), config=config.to_dict(), objective_us=wl.objective(lat),
            default_objective_us=wl.objective(dlat), latencies_us=lat, default_latencies_us=dlat,
            provenance="test", config_key=config.key()))


def test_tuned_source_reads_the_database_for_this_card_and_build(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 't.db'}"
    tuned = KernelConfig(max_q_gemm_rows=48, max_q_gemm_rows_kernel=8)
    _store_entry(db, P1, tuned)
    _store_entry(db, P2, PRESETS["default"], kernel_hash="e" * 64)  # stale: never used
    src = cmp.resolve_source("tuned", [P1], device=FAKE_DEVICE, kernel_hash=FAKE_KERNEL_HASH,
                             db_url=db)
    assert src.configs == {P1: tuned}
    assert "mixed" in src.provenance[P1]
    with pytest.raises(cmp.CompareError, match=f"no tuned entry for {P2.key()}") as info:
        cmp.resolve_source("tuned", [P1, P2], device=FAKE_DEVICE, kernel_hash=FAKE_KERNEL_HASH,
                           db_url=db)
    assert "gemmtune tune" in str(info.value)


def test_profile_source(tmp_path: Path) -> None:
    from gemmtune.db.profiles import build_profile
    from gemmtune.db.store import Store

    db = f"sqlite:///{tmp_path / 't.db'}"
    tuned = KernelConfig(max_q_gemm_rows=24, max_q_gemm_rows_kernel=4)
    _store_entry(db, P1, tuned)
    with Store.open(db) as store:
        prof = build_profile(store, FAKE_DEVICE.to_dict(), current_kernel_hash=FAKE_KERNEL_HASH)
    path = tmp_path / "h100.json"
    path.write_text(prof.dumps())
    src = cmp.resolve_source(str(path), [P1])
    assert src.kind == "profile" and src.configs == {P1: tuned}
    with pytest.raises(cmp.CompareError, match=f"no entry for {P2.key()}"):
        cmp.resolve_source(str(path), [P1, P2])


# -- measuring through the seams (fake evaluator) ------------------------------------------------


def test_interleaved_measurement_shows_the_0_0_12_regression(fake_gpu: list[FakeEvaluator]) -> None:
    problems = {P1: ["qkv×80"], P2: ["down×80"]}
    a = cmp.resolve_source("exllamav2-0.0.11", problems)
    b = cmp.resolve_source("exllamav2-0.0.12", problems)
    ra, rb = cmp.measure_interleaved(("exllamav2-0.0.11", "exllamav2-0.0.12"), problems, a, b,
                                     (1, 4, 48))
    assert all(ev.closed for ev in fake_gpu) and len(fake_gpu) == 2
    assert ra.mode == rb.mode == "interleaved"
    c = cmp.compare_results(ra, rb)
    flagged = {(r.problem_key, r.m) for r in c.regressions}
    # 4 rows per block costs more everywhere; at M=48 0.0.12 has left the fused kernel
    assert flagged == {(p.key(), m) for p in (P1, P2) for m in (1, 4, 48)}
    assert {r.b.path for r in c.rows if r.m == 48} == {"recon"}
    assert ra.problems[0].layers == ("qkv×80",)


def test_dispatch_measurement_records_config_and_provenance(fake_gpu: list[FakeEvaluator]) -> None:
    src = cmp.resolve_source("default", [P1])
    r = cmp.measure_dispatch("default", {P1: ["o×32"]}, src, (1, 128))
    assert r.mode == "dispatch" and r.fingerprint == FAKE_DEVICE.fingerprint
    pb = r.problems[0]
    assert pb.config == PRESETS["default"] and pb.provenance == "preset default"
    assert [pb.points[m].path for m in (1, 128)] == ["fused", "recon"]


# -- reports -----------------------------------------------------------------------------------


def _comparison() -> cmp.Comparison:
    a = results("exllamav2-0.0.11", {P1: {m: (10.0 + m * 0.1, 0.1) for m in cmp.DEFAULT_MS},
                                     P2: {m: (20.0 + m * 0.1, 0.1) for m in cmp.DEFAULT_MS}},
                config=PRESETS["exllamav2-0.0.11"])
    b = results("exllamav2-0.0.12", {P1: {m: (12.0 + m * 0.1, 0.1) for m in cmp.DEFAULT_MS},
                                     P2: {m: (20.0 + m * 0.1, 0.1) for m in cmp.DEFAULT_MS}},
                config=PRESETS["exllamav2-0.0.12"])
    return cmp.compare_results(a, b)


def test_markdown_report_has_table_geomeans_and_rule() -> None:
    c = _comparison()
    md = cmp.render_markdown(c)
    assert md.startswith("# exllamav2-0.0.11 vs exllamav2-0.0.12")
    assert "| shape | M | path A→B | A µs | B µs | B/A | |" in md
    assert md.count("**REGRESSION**") == len(c.regressions) == 15
    assert f"**{c.geomean:.3f}" in md
    assert "B − A > spread A + spread B" in md
    assert FAKE_DEVICE.fingerprint in md


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "cmp.png"
    cmp.plot(_comparison(), out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_comparison_json_holds_rows_and_both_results() -> None:
    c = _comparison()
    doc = json.loads(c.dumps())
    assert doc["format"] == "gemmtune-compare" and doc["regressions"] == 15
    assert len(doc["rows"]) == 30
    assert cmp.results_from_json(doc["a"]).label == "exllamav2-0.0.11"
    assert cmp.results_from_json(doc["b"]).label == "exllamav2-0.0.12"
