"""Profiles: export -> import round trips; every malformed profile is rejected with the field named
and the database untouched; kernel-hash mismatches import as stale; the C header compiles."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gemmtune.db.errors import ProfileError
from gemmtune.db.profiles import (
    MAX_PROFILE_BYTES,
    build_profile,
    import_profile,
    parse_profile,
    read_profile,
)
from gemmtune.db.store import Store
from gemmtune.kernels import KernelConfig, Workload

from gemmtune.cli import _profile_validator, main

CURRENT = "c0" * 32
"""This build's kernel hash, pinned: the real one changes whenever a .cu file does, and these tests
are about what happens relative to it, not about its value."""


@pytest.fixture(autouse=True)
def _pin_kernel_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    import gemmtune.kernels.sources as sources

    monkeypatch.setattr(sources, "kernel_hash", lambda compiler=None: CURRENT)


def _fill(store: Store, make_entry, **kw: Any) -> None:
    store.put_result(make_entry(4096, 4096, **kw))
    store.put_result(make_entry(4096, 4096, workload="prefill", bands=(  # a plan of two bands
        (256, KernelConfig(max_q_gemm_rows=256, max_q_gemm_rows_kernel=16)),
        (None, KernelConfig(max_q_gemm_rows=128, block_n=128, threads=256))), **kw))
    store.put_result(make_entry(8192, 28672, act_order=True, group_size=64, **kw))
    store.put_result(make_entry(4096, 14336, bits=8, group_size=-1,
                                workload=Workload("custom", (1, 3, 640), (4.0, 2.0, 0.25)),
                                **kw))


def _export(store: Store) -> dict[str, Any]:
    (dev,) = store.devices()
    return build_profile(store, dev, current_kernel_hash=CURRENT).to_json()


def _entries_only(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "created_at"}


def test_export_import_export_gives_the_same_entries(db_url, tmp_path, make_entry):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry)
        first = _export(src)
    text = json.dumps(first)
    profile = parse_profile(text, _profile_validator(), name="h100.json")
    with Store.open(db_url) as dst:
        report = import_profile(dst, profile, current_kernel_hash=CURRENT, source_name="h100.json")
        assert (report.result.added, report.stale) == (4, False)
        second = _export(dst)
        imported = dst.list_results(current_kernel_hash=CURRENT)
    assert _entries_only(second) == _entries_only(first)
    assert len(first["entries"]) == 4
    assert {e.source for e in imported} == {"imported"}
    assert {e.provenance for e in imported} == {"imported from h100.json"}
    assert not any(e.stale for e in imported)


def test_a_schema_1_profile_still_imports_each_entry_as_one_band(tmp_path, valid_doc):
    doc = copy.deepcopy(valid_doc)
    doc["schema_version"] = 1  # as gemmtune wrote profiles before plans over M bands
    for e in doc["entries"]:
        del e["bands"]
    profile = parse_profile(json.dumps(doc), _profile_validator())
    assert profile.schema_version == 1
    configs = [e["config"] for e in doc["entries"]]
    assert [e.plan for e in profile.entries] == [((None, c),) for c in configs]
    with Store.open(f"sqlite:///{tmp_path / 't.db'}") as store:
        import_profile(store, profile, current_kernel_hash=CURRENT)
        got = store.list_results()
    assert sorted((e.workload_key, e.plan == ((None, e.config),)) for e in got) == [
        ("decode", True), ("mixed", True)]
    assert sorted(map(str, (e.config for e in got))) == sorted(map(str, configs))
    again = json.loads(profile.dumps())  # written out in the current schema
    assert again["schema_version"] == 2
    assert [e["bands"] for e in again["entries"]] == [[{"m_hi": None, "config": c}]
                                                      for c in configs]


def test_the_last_band_equals_config_by_its_canonical_key(valid_doc):
    """A config spelled without the fields added after it was stored (the tiled kernel's) is
    the same config as its full spelling in the plan's last band."""
    from gemmtune.kernels.config import LATE_FIELDS

    doc = copy.deepcopy(valid_doc)
    entry = doc["entries"][1]
    assert entry["bands"][-1]["config"] == entry["config"]
    for name in LATE_FIELDS:
        del entry["config"][name]
    (_, mixed) = parse_profile(json.dumps(doc), _profile_validator()).entries
    assert len(mixed.bands) == 2
    entry["bands"][-1]["config"]["split_k"] += 1  # a real difference still fails
    with pytest.raises(ProfileError, match="entry's config"):
        parse_profile(json.dumps(doc), _profile_validator())


def test_a_plan_over_m_bands_travels_through_export_and_import(tmp_path, make_entry):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry)
        doc = _export(src)
    (prefill,) = [e for e in doc["entries"] if e["workload"]["name"] == "prefill"]
    assert [b["m_hi"] for b in prefill["bands"]] == [256, None]
    assert prefill["bands"][-1]["config"] == prefill["config"]
    profile = parse_profile(json.dumps(doc), _profile_validator())
    with Store.open(f"sqlite:///{tmp_path / 'dst.db'}") as dst:
        import_profile(dst, profile, current_kernel_hash=CURRENT)
        (got,) = [e for e in dst.list_results() if e.workload_key == "prefill"]
    assert got.bands == tuple((b["m_hi"], b["config"]) for b in prefill["bands"])


def test_imported_entries_are_served_like_tuned_ones(tmp_path, make_entry):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry)
        doc = _export(src)
        want = src.list_results()
    profile = parse_profile(json.dumps(doc), _profile_validator())
    with Store.open(f"sqlite:///{tmp_path / 'dst.db'}") as dst:
        import_profile(dst, profile, current_kernel_hash=CURRENT)
        for e in want:
            got = dst.get_result(e.device_fingerprint, CURRENT, e.problem_key, e.workload_key)
            assert got is not None
            assert (got.config, got.latencies_us, got.objective_us) == (
                e.config, e.latencies_us, e.objective_us)


def test_kernel_hash_mismatch_imports_as_stale_unless_forced(db_url, tmp_path, make_entry):
    other = "0" * 64
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry, kh=other)
        doc = _export(src)
    assert doc["kernel_hash"] == other
    profile = parse_profile(json.dumps(doc), _profile_validator())
    first = doc["entries"][0]
    fp = doc["device"]["fingerprint"]
    pk = _profile_validator().problem(first["problem"])
    wk = _profile_validator().workload(first["workload"])
    with Store.open(db_url) as dst:
        report = import_profile(dst, profile, current_kernel_hash=CURRENT)
        assert report.stale and report.stored_kernel_hash == other
        assert dst.get_result(fp, CURRENT, pk, wk) is None  # never served
        assert all(e.stale for e in dst.list_results(current_kernel_hash=CURRENT))
        report = import_profile(dst, profile, current_kernel_hash=CURRENT, force=True)
        assert report.forced and report.result.added == 4
        got = dst.get_result(fp, CURRENT, pk, wk)
        assert got is not None and "forced" in got.provenance


def test_existing_local_entries_win_unless_replace(db_url, tmp_path, make_entry):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry, base_us=50.0)
        profile = parse_profile(json.dumps(_export(src)), _profile_validator())
    local = make_entry(4096, 4096, base_us=5.0)
    with Store.open(db_url) as dst:
        dst.put_result(local)
        r = import_profile(dst, profile, current_kernel_hash=CURRENT).result
        assert (r.added, r.replaced, r.kept) == (3, 0, 1)
        got = dst.get_result(local.device_fingerprint, CURRENT, local.problem_key, "decode")
        assert got is not None and got.source == "tuned" and got.objective_us == local.objective_us
        r = import_profile(dst, profile, current_kernel_hash=CURRENT, replace=True).result
        assert (r.added, r.replaced, r.kept) == (0, 4, 0)
        got = dst.get_result(local.device_fingerprint, CURRENT, local.problem_key, "decode")
        assert got is not None and got.source == "imported" and got.objective_us > local.objective_us


def test_import_is_one_transaction(tmp_path, make_entry, monkeypatch):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry)
        profile = parse_profile(json.dumps(_export(src)), _profile_validator())
    with Store.open(f"sqlite:///{tmp_path / 'dst.db'}") as dst:
        dst.put_result(make_entry(1024, 1024))
        before = dst.list_results()
        real = Store._upsert
        calls = {"n": 0}

        def flaky(self, session, entry, *, replace):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("disk vanished")
            return real(self, session, entry, replace=replace)

        monkeypatch.setattr(Store, "_upsert", flaky)
        with pytest.raises(Exception, match="disk vanished"):
            import_profile(dst, profile, current_kernel_hash=CURRENT)
        monkeypatch.setattr(Store, "_upsert", real)
        assert dst.list_results() == before


# -- validation: every field, type and range ------------------------------------------------


SMALL_M_CFG = KernelConfig(max_q_gemm_rows=8, max_q_gemm_rows_kernel=8, block_n=128, threads=128)


@pytest.fixture(scope="module")
def valid_doc(tmp_path_factory, request) -> dict[str, Any]:
    from datetime import UTC, datetime

    from gemmtune.db.store import TunedEntry
    from gemmtune.kernels import WORKLOADS, DeviceInfo, Problem

    dev = DeviceInfo("nvidia", "NVIDIA H100 80GB HBM3", "9.0", 132, 80 * 2**30, "13.0", "13.0")
    path = tmp_path_factory.mktemp("valid") / "v.db"
    with Store.open(str(path)) as store:
        for k, wl in ((4096, "decode"), (8192, "mixed")):
            p, w = Problem(k, 4096), WORKLOADS[wl]
            lat = {m: 3.0 + m / 10 for m in w.ms}
            # the mixed entry is a plan of two bands: M 1-8, then M >= 9
            bands = () if wl == "decode" else ((8, SMALL_M_CFG.to_dict()),
                                               (None, KernelConfig(max_q_gemm_rows=24).to_dict()))
            store.put_result(TunedEntry(bands=bands,
                device=dev.to_dict(), kernel_hash=CURRENT,
                problem={"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
                         "act_order": p.act_order}, problem_key=p.key(),
                workload={"name": w.name, "ms": list(w.ms), "weights": list(w.weights)},
                workload_key=w.key(), config=KernelConfig(max_q_gemm_rows=24).to_dict(),
                objective_us=w.objective(lat), default_objective_us=w.objective(lat) * 1.1,
                latencies_us=lat, default_latencies_us={m: v * 1.1 for m, v in lat.items()},
                provenance="tuned", created_at=datetime.now(UTC)))
        return _export(store)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    cur: Any = doc
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    last = parts[-1]
    if value is _DELETE:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


_DELETE = object()

# (mutation path, value, field named in the error, words the message must contain)
BAD_FIELDS: list[tuple[str, Any, str, str]] = [
    ("format", "something-else", "format", "not a gemmtune profile"),
    ("schema_version", 3, "schema_version", "not supported"),
    ("schema_version", 1, "entries[0].bands", "unknown"),  # schema 1 has no bands
    ("schema_version", "1", "schema_version", "integer"),
    ("schema_version", True, "schema_version", "integer"),
    ("schema_version", None, "schema_version", "integer, got null"),
    ("schema_version", _DELETE, "schema_version", "missing field"),
    ("format", _DELETE, "format", "missing field"),
    ("tool_version", _DELETE, "tool_version", "missing"),
    ("device", _DELETE, "device", "missing"),
    ("evil", "rm -rf /", "evil", "unknown"),
    ("created_at", "yesterday", "created_at", "ISO 8601"),
    ("created_at", "2024-05-01T12:00:00", "created_at", "time zone"),
    ("kernel_hash", "abc", "kernel_hash", "length"),
    ("kernel_hash", "Z" * 64, "kernel_hash", "expected form"),
    ("kernel_hash", 12, "kernel_hash", "string"),
    ("device.sm_count", "132", "device.sm_count", "integer"),
    ("device.sm_count", 0, "device.sm_count", "outside"),
    ("device.sm_count", True, "device.sm_count", "integer"),
    ("device.memory_bytes", -1, "device.memory_bytes", "outside"),
    ("device.compute_capability", "nine", "device.compute_capability", "expected form"),
    ("device.extra", 1, "device.extra", "unknown"),
    ("device.fingerprint", "0123456789abcdef", "device.fingerprint", "does not match"),
    ("device.name", "NVIDIA A100", "device.fingerprint", "does not match"),
    ("entries", {}, "entries", "array"),
    ("entries.0", [], "entries[0]", "object"),
    ("entries.0.config", _DELETE, "entries[0].config", "missing"),
    ("entries.0.surprise", 1, "entries[0].surprise", "unknown"),
    ("entries.0.config.max_q_gemm_rows_kernel", 10**9, "entries[0].config", "max_q_gemm_rows_kernel"),
    ("entries.0.config.max_q_gemm_rows", -5, "entries[0].config", "max_q_gemm_rows"),
    ("entries.0.config.threads", "128", "entries[0].config", "threads"),
    ("entries.0.config.evil", 1, "entries[0].config", "evil"),
    ("entries.0.config", "r32-mk4", "entries[0].config", "object"),
    ("entries.0.problem.k", 4097, "entries[0].problem", "multiple"),
    ("entries.0.problem.k", 4096.0, "entries[0].problem", "int"),
    ("entries.0.problem.bits", 5, "entries[0].problem", "bits"),
    ("entries.0.problem.act_order", "yes", "entries[0].problem", "act_order"),
    ("entries.0.problem.m", 1, "entries[0].problem.m", "unknown"),
    ("entries.0.workload.ms", [-1, 2, 3, 4, 5, 6, 7, 8], "entries[0].workload", "M=-1"),
    ("entries.0.workload.ms", "1,2", "entries[0].workload.ms", "array"),
    ("entries.0.workload.weights", [1, 1, 1, 1, 1, 1, 1, -1], "entries[0].workload", "weight"),
    ("entries.0.workload.name", "", "entries[0].workload.name", "length"),
    ("entries.0.objective_us", -1.0, "entries[0].objective_us", "outside"),
    ("entries.0.objective_us", "fast", "entries[0].objective_us", "number"),
    ("entries.0.objective_us", 1e300, "entries[0].objective_us", "outside"),
    ("entries.0.default_objective_us", None, "entries[0].default_objective_us", "number"),
    ("entries.0.latencies_us.-1", 3.0, "entries[0].latencies_us['-1']", "not an M"),
    ("entries.0.latencies_us.99999999", 3.0, "entries[0].latencies_us['99999999']", "not an M"),
    ("entries.0.latencies_us.1", 0, "entries[0].latencies_us['1']", "outside"),
    ("entries.0.latencies_us.1", _DELETE, "entries[0].latencies_us", "M=1"),
    ("entries.0.default_latencies_us", [], "entries[0].default_latencies_us", "object"),
    ("entries.0.provenance", "x" * 5000, "entries[0].provenance", "length"),
    ("entries.0.created_at", 1714564800, "entries[0].created_at", "string"),
    ("entries.0.bands", _DELETE, "entries[0].bands", "missing"),
    ("entries.1.bands", "M1-8", "entries[1].bands", "array"),
    ("entries.1.bands", [], "entries[1].bands", "at least one band"),
    ("entries.1.bands.0.extra", 1, "entries[1].bands[0].extra", "unknown"),
    ("entries.1.bands.0.m_hi", 3, "entries[1].bands[0]", "not one of the workload's Ms"),
    ("entries.1.bands.0.m_hi", "8", "entries[1].bands[0].m_hi", "integer"),
    ("entries.1.bands.0.m_hi", None, "entries[1].bands[0]", "only the last band's is null"),
    ("entries.1.bands.1.m_hi", 64, "entries[1].bands[1]", "must be null"),
    ("entries.1.bands.0.config.max_q_gemm_rows", 4, "entries[1].bands[0]",
     "only the last band may reconstruct"),
    ("entries.1.bands.0.config.block_n", 48, "entries[1].bands[0].config", "block_n"),
    ("entries.1.bands.0.config", [], "entries[1].bands[0].config", "object"),
    ("entries.1.bands.1.config.split_k", 3, "entries[1].bands[1]", "entry's config"),
]


def _bad_cases() -> list[Any]:
    return [pytest.param(p, v, f, w, id=f"{p}={str(v)[:20]}") for p, v, f, w in BAD_FIELDS]


@pytest.mark.parametrize(("path", "value", "field", "words"), _bad_cases())
def test_bad_field_is_rejected_naming_it(valid_doc, path, value, field, words):
    doc = copy.deepcopy(valid_doc)
    _set(doc, path, value)
    with pytest.raises(ProfileError) as info:
        parse_profile(json.dumps(doc), _profile_validator(), name="p.json")
    assert info.value.field == field
    msg = str(info.value)
    assert field in msg and words in msg and "\n" not in msg


def test_duplicated_entries_are_rejected(valid_doc):
    doc = copy.deepcopy(valid_doc)
    doc["entries"].append(copy.deepcopy(doc["entries"][0]))
    doc["entries"][-1]["config"]["max_q_gemm_rows"] = 8  # same key, other answer
    doc["entries"][-1]["bands"][-1]["config"]["max_q_gemm_rows"] = 8
    with pytest.raises(ProfileError, match=r"duplicates entries\[0\]") as info:
        parse_profile(json.dumps(doc), _profile_validator())
    assert info.value.field == "entries[2]"


@pytest.mark.parametrize("text, words", [
    (b"{", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "must be an object"),
    (b'{"format": "gemmtune-profile", "format": "x"}', "duplicated key"),
    (b'{"format": "gemmtune-profile", "schema_version": 1, "x": NaN}', "NaN"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
], ids=["truncated", "empty", "binary", "array", "dup-key", "nan", "deep"])
def test_not_a_profile_at_all(text, words):
    with pytest.raises(ProfileError, match=words):
        parse_profile(text, _profile_validator())


def test_size_limit_is_checked_before_reading(tmp_path, valid_doc):
    path = tmp_path / "big.json"
    body = json.dumps(valid_doc)
    path.write_text(body + " " * (MAX_PROFILE_BYTES - len(body) + 1))
    with pytest.raises(ProfileError, match="over the") as info:
        read_profile(path, _profile_validator())
    assert str(MAX_PROFILE_BYTES) in str(info.value)
    small = tmp_path / "ok.json"
    small.write_text(body)
    assert len(read_profile(small, _profile_validator()).entries) == 2


# -- the same through the CLI: one line, exit 1, database unchanged ----------------------------


def _db_snapshot(url: str) -> list[Any]:
    with Store.open(url, readonly=True) as s:
        return [(e.problem_key, e.workload_key, e.config, e.objective_us, e.source)
                for e in s.list_results()]


@pytest.mark.parametrize("case", [0, 4, 6, 13, 19, 24, 34, 41, 42])
def test_cli_import_of_a_bad_profile_changes_nothing(tmp_path, valid_doc, make_entry, case):
    path, value, field, _words = BAD_FIELDS[case]
    db = f"sqlite:///{tmp_path / 'local.db'}"
    with Store.open(db) as s:
        s.put_result(make_entry(2048, 2048))
    before = _db_snapshot(db)
    raw = (tmp_path / "local.db").read_bytes()
    doc = copy.deepcopy(valid_doc)
    _set(doc, path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["import", str(bad), "--db", db, "--replace", "--force"])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.output
    assert _db_snapshot(db) == before
    assert (tmp_path / "local.db").read_bytes() == raw


# -- what this build can run, and what was actually measured ----------------------------------
# Each rule: (mutation path, value, field named in the error, words the message must contain).
# entries[0] is 4096x4096 / decode (Ms 1..8), entries[1] is 8192x4096 / mixed (Ms 1..512).

MEASURED_RULES: list[tuple[str, Any, str, str]] = [
    # bit widths the CUDA kernels do not build cannot have been tuned (KERNEL_BITS)
    ("entries.0.problem.bits", 2, "entries[0].problem", "no CUDA kernel"),
    ("entries.1.problem.bits", 3, "entries[1].problem", "no CUDA kernel"),
    # latencies only at the workload's Ms: M=16 is not a decode M
    ("entries.0.latencies_us.16", 3.0, "entries[0].latencies_us['16']", "not one of the workload"),
    ("entries.0.default_latencies_us.512", 3.0, "entries[0].default_latencies_us['512']",
     "not one of the workload"),
    # objectives are derived: the workload's weighted sum of the latencies
    ("entries.0.objective_us", 1.0, "entries[0].objective_us", "weighted sum of latencies_us"),
    ("entries.1.default_objective_us", 123.0, "entries[1].default_objective_us",
     "weighted sum of default_latencies_us"),
    ("entries.0.latencies_us.1", 30.0, "entries[0].objective_us", "weighted sum"),
    # a preset's name means the preset's Ms and weights
    ("entries.0.workload.name", "prefill", "entries[0].workload", "preset"),
    ("entries.1.workload.weights", [1, 1, 1, 1, 1, 1, 1, 1, 1], "entries[1].workload", "preset"),
    ("entries.0.workload.ms", [1, 2, 3, 4, 5, 6, 7, 9], "entries[0].workload", "preset"),
]

_NUM = "@@number@@"

# Non-finite numbers, spelled as JSON text (json.dumps cannot write 1e999): named with their path.
NON_FINITE: list[tuple[str, str, str]] = [
    ("entries.1.latencies_us.16", "NaN", "entries[1].latencies_us['16']"),
    ("entries.0.objective_us", "Infinity", "entries[0].objective_us"),
    ("entries.0.default_latencies_us.3", "-Infinity", "entries[0].default_latencies_us['3']"),
    ("entries.1.workload.weights.3", "1e999", "entries[1].workload.weights[3]"),
    ("device.sm_count", "NaN", "device.sm_count"),
    ("entries.0.config.split_k", "Infinity", "entries[0].config.split_k"),
]


def _mutated(valid_doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(valid_doc)
    _set(doc, path, value)
    return doc


def _non_finite_text(valid_doc: dict[str, Any], path: str, spelling: str) -> str:
    return json.dumps(_mutated(valid_doc, path, _NUM)).replace(f'"{_NUM}"', spelling)


def test_the_measured_rules_hold_for_a_valid_export(valid_doc):
    """The rules below reject only the mutation: the unmutated export passes all of them."""
    profile = parse_profile(json.dumps(valid_doc), _profile_validator())
    assert [e.problem["bits"] for e in profile.entries] == [4, 4]
    assert [e.workload_key for e in profile.entries] == ["decode", "mixed"]


@pytest.mark.parametrize(("path", "value", "field", "words"),
                         [pytest.param(*r, id=f"{r[0]}={r[1]}") for r in MEASURED_RULES])
def test_only_what_this_build_runs_and_what_was_measured(valid_doc, path, value, field, words):
    with pytest.raises(ProfileError) as info:
        parse_profile(json.dumps(_mutated(valid_doc, path, value)), _profile_validator(),
                      name="p.json")
    assert info.value.field == field
    msg = str(info.value)
    assert msg.startswith(f"p.json: {field}: ") and words in msg and "\n" not in msg


@pytest.mark.parametrize(("path", "spelling", "field"), NON_FINITE,
                         ids=[f"{p}={t}" for p, t, _ in NON_FINITE])
def test_non_finite_numbers_are_named_with_their_position(valid_doc, path, spelling, field):
    with pytest.raises(ProfileError) as info:
        parse_profile(_non_finite_text(valid_doc, path, spelling), _profile_validator(),
                      name="p.json")
    assert info.value.field == field
    assert str(info.value) == (f"p.json: {field}: {spelling} is not a finite number (JSON has "
                               "no NaN or Infinity; a measurement is finite)")


def test_non_finite_numbers_from_python_are_named_too(valid_doc):
    from gemmtune.db.profiles import validate_profile

    doc = _mutated(valid_doc, "entries.1.latencies_us.64", float("nan"))
    with pytest.raises(ProfileError) as info:
        validate_profile(doc, _profile_validator())
    assert info.value.field == "entries[1].latencies_us['64']"


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the database and any -wal/-shm beside it: a write that sat in the WAL counts."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("local.db*"))}


_CLI_CASES = ([pytest.param("rule", i, id=f"{r[0]}={r[1]}") for i, r in enumerate(MEASURED_RULES)]
              + [pytest.param("non-finite", i, id=f"{n[0]}={n[1]}")
                 for i, n in enumerate(NON_FINITE)])


@pytest.mark.parametrize(("kind", "index"), _CLI_CASES)
def test_rejected_import_leaves_a_fresh_database_byte_for_byte(tmp_path, valid_doc, make_entry,
                                                               kind, index):
    folder = tmp_path / "db"
    folder.mkdir()
    db = f"sqlite:///{folder / 'local.db'}"
    with Store.open(db) as s:  # fresh: the schema and one local entry
        s.put_result(make_entry(2048, 2048))
    before = _file_hashes(folder)
    assert "local.db" in before
    bad = tmp_path / "bad.json"
    if kind == "rule":
        path, value, field, _words = MEASURED_RULES[index]
        bad.write_text(json.dumps(_mutated(valid_doc, path, value)))
    else:
        path, spelling, field = NON_FINITE[index]
        bad.write_text(_non_finite_text(valid_doc, path, spelling))
    result = CliRunner().invoke(main, ["import", str(bad), "--db", db, "--replace", "--force"])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{field}: " in lines[0] and "Traceback" not in result.output
    assert "imported" not in result.output
    assert _file_hashes(folder) == before


# -- C header ---------------------------------------------------------------------------------


def test_header_blocks_compile_and_carry_the_config(tmp_path, make_entry, make_device):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check the header with")
    from gemmtune.db.header import render_header, selector

    weird = make_device(name='Evil */ #define MAX_Q_GEMM_ROWS 1 /* "card"')
    with Store.open(f"sqlite:///{tmp_path / 't.db'}") as store:
        store.put_result(make_entry(4096, 4096, config=KernelConfig(max_q_gemm_rows=96,
                                                                    max_q_gemm_rows_kernel=12)))
        store.put_result(make_entry(4096, 4096, workload=Workload("custom", (1, 7), (2.0, 0.5)),
                                    config=KernelConfig(max_q_gemm_rows=8, split_k=3)))
        store.put_result(make_entry(4096, 4096, device=weird,
                                    config=KernelConfig(max_q_gemm_rows=2)))
        profiles = [build_profile(store, d, current_kernel_hash=CURRENT) for d in store.devices()]
        entries = store.list_results()
    header = tmp_path / "tuned.h"
    header.write_text(render_header(profiles, tool_version="test"))
    main_c = tmp_path / "main.c"
    main_c.write_text('#include <stdio.h>\n#include "tuned.h"\nint main(void) {\n'
                      '  printf("%d %d %d\\n", MAX_Q_GEMM_ROWS, MAX_Q_GEMM_ROWS_KERNEL, '
                      'GEMMTUNE_SPLIT_K);\n  return 0;\n}\n')
    for e in entries:
        sel = selector(e.device_fingerprint, e.problem_key, e.workload_key)
        exe = tmp_path / "a.out"
        subprocess.run([cc, f"-D{sel}", "-I", str(tmp_path), str(main_c), "-o", str(exe)],
                       check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
        c = e.config
        assert out.split() == [str(c["max_q_gemm_rows"]), str(c["max_q_gemm_rows_kernel"]),
                               str(c["split_k"])]
    sels = [f"-D{selector(e.device_fingerprint, e.problem_key, e.workload_key)}"
            for e in entries[:2]]
    both = subprocess.run([cc, *sels, "-I", str(tmp_path), str(main_c), "-o",
                           str(tmp_path / "b.out")], capture_output=True, text=True)
    assert both.returncode != 0 and "more than one" in both.stderr
    assert len({selector(e.device_fingerprint, e.problem_key, e.workload_key)
                for e in entries}) == len(entries)


def test_header_exports_every_band_of_a_plan(tmp_path, make_entry):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check the header with")
    from gemmtune.db.header import render_header, selector

    plan = ((4, KernelConfig(max_q_gemm_rows=4, max_q_gemm_rows_kernel=4, split_k=6)),
            (32, KernelConfig(max_q_gemm_rows=32, max_q_gemm_rows_kernel=16, block_n=128,
                              threads=128)),
            (None, KernelConfig(max_q_gemm_rows=64, max_q_gemm_rows_kernel=32)))
    with Store.open(f"sqlite:///{tmp_path / 't.db'}") as store:
        store.put_result(make_entry(workload="mixed", bands=plan))
        store.put_result(make_entry(workload="decode", config=KernelConfig(max_q_gemm_rows=8)))
        profiles = [build_profile(store, d, current_kernel_hash=CURRENT) for d in store.devices()]
        entries = {e.workload_key: e for e in store.list_results()}
    (tmp_path / "tuned.h").write_text(render_header(profiles, tool_version="test"))
    main_c = tmp_path / "main.c"
    main_c.write_text(
        '#include <stdio.h>\n#include "tuned.h"\n'
        "#define P(i) printf(\" %d %d %d\", GEMMTUNE_BAND##i##_MAX_Q_GEMM_ROWS, "
        "GEMMTUNE_BAND##i##_MAX_Q_GEMM_ROWS_KERNEL, GEMMTUNE_BAND##i##_SPLIT_K)\n"
        "int main(void) {\n  printf(\"%d %d\", GEMMTUNE_BANDS, MAX_Q_GEMM_ROWS);\n"
        "#if GEMMTUNE_BANDS == 3\n  printf(\" %d %d\", GEMMTUNE_BAND0_M_HI, GEMMTUNE_BAND1_M_HI);\n"
        "  P(0); P(1); P(2);\n#else\n  P(0);\n#endif\n"
        "#if defined(GEMMTUNE_BAND2_M_HI) || defined(GEMMTUNE_BAND1_M_HI) && GEMMTUNE_BANDS == 1\n"
        '#  error "the last band has no upper edge"\n#endif\n'
        "#if defined(GEMMTUNE_BAND0_M_HI) && GEMMTUNE_BANDS == 1\n"
        '#  error "a one-band plan has no edge"\n#endif\n'
        '  printf("\\n");\n  return 0;\n}\n')
    got = {}
    for key, e in entries.items():
        exe = tmp_path / f"{key}.out"
        subprocess.run([cc, f"-D{selector(e.device_fingerprint, e.problem_key, key)}", "-I",
                        str(tmp_path), str(main_c), "-o", str(exe)], check=True,
                       capture_output=True)
        got[key] = subprocess.run([str(exe)], check=True, capture_output=True,
                                  text=True).stdout.split()
    want = ["3", str(plan[-1][1].max_q_gemm_rows), "4", "32"]
    for _m_hi, c in plan:
        want += [str(c.max_q_gemm_rows), str(c.max_q_gemm_rows_kernel), str(c.split_k)]
    assert got["mixed"] == want
    d = entries["decode"].config
    assert got["decode"] == ["1", "8", "8", str(d["max_q_gemm_rows_kernel"]), str(d["split_k"])]


def test_profile_file_from_disk_round_trips(tmp_path, make_entry):
    with Store.open(f"sqlite:///{tmp_path / 'src.db'}") as src:
        _fill(src, make_entry)
        (dev,) = src.devices()
        prof = build_profile(src, dev, current_kernel_hash=CURRENT)
    path = Path(tmp_path / "p.json")
    path.write_text(prof.dumps())
    again = read_profile(path, _profile_validator())
    assert again.to_json() == prof.to_json()
