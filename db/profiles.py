"""Profiles: tuned results as a versioned JSON file, to share between identical machines.

A profile holds one device and one kernel hash (results are valid for exactly that pair):

    {
      "format": "gemmtune-profile", "schema_version": 2,
      "tool_version": "0.1.0", "created_at": "2025-05-01T12:00:00+00:00",
      "kernel_hash": "<64 hex>",
      "device": {DeviceInfo.to_dict(), incl. "fingerprint"},
      "entries": [{"problem": {...}, "workload": {...}, "config": {...},
                   "bands": [{"m_hi": 8, "config": {...}}, {"m_hi": null, "config": {...}}],
                   "objective_us": 41.2, "default_objective_us": 55.0,
                   "latencies_us": {"1": 4.1, ...}, "default_latencies_us": {...},
                   "provenance": "tuned here by gemmtune 0.1.0, tpe, 60 trials",
                   "created_at": "..."}]
    }

Import is the dangerous direction (files come from elsewhere), so `parse_profile` checks every
field: exact key sets, types (a bool is not an int, NaN is not a number: named with its path),
ranges, duplicated keys and entries, a size limit; the domain objects are checked by the
caller's `ProfileValidator` (the db layer may not import the kernel package). Fields that
derive from each other must agree: the fingerprint with the device fields, the latencies with
the workload's Ms (no more, no fewer), each objective with the weighted sum of its latencies. Nothing is written until the whole file
passed, and then in one transaction. Nothing in a profile is ever executed.

Schema 2 added `bands` to every entry: the plan over M bands (`entry.Bands`; one band of
`config` for a one-config answer), checked by the one band rule (`entry.bands_problem`) and each
band's config by the domain validator. Schema 1 files (no `bands`) still import, each entry as
one band of its `config`. Export always writes the current schema.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .entry import ImportResult, ProfileEntry, TunedEntry, bands_problem, iso_utc
from .errors import ProfileError
from .store import Store, tool_version

PROFILE_FORMAT = "gemmtune-profile"
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MAX_PROFILE_BYTES = 16 * 2**20
MAX_ENTRIES = 50_000
MAX_M = 65536
MAX_US = 1e9  # 1000 s per GEMM: anything above is a broken measurement

TOP_KEYS = ("format", "schema_version", "tool_version", "created_at", "kernel_hash", "device",
            "entries")
DEVICE_KEYS = ("vendor", "name", "compute_capability", "sm_count", "memory_bytes",
               "driver_version", "runtime_version", "fingerprint")
ENTRY_KEYS_V1 = ("problem", "workload", "config", "objective_us", "default_objective_us",
                 "latencies_us", "default_latencies_us", "provenance", "created_at")
ENTRY_KEYS = (*ENTRY_KEYS_V1[:3], "bands", *ENTRY_KEYS_V1[3:])
"""Schema 2's entry fields: schema 1's plus `bands`."""
BAND_KEYS = ("m_hi", "config")
PROBLEM_KEYS = ("k", "n", "bits", "group_size", "act_order")
WORKLOAD_KEYS = ("name", "ms", "weights")

_HEX = re.compile(r"^[0-9a-f]+$")
_CC = re.compile(r"^\d{1,2}\.\d{1,2}$")
_M_KEY = re.compile(r"^[1-9]\d{0,5}$")


class ProfileValidator(Protocol):
    """Domain validation the caller supplies (built from `gemmtune.kernels` by the CLI/runtime).

    Each method raises (any exception; its message is reported with the field path) when the
    data is not valid, and returns the canonical key of the object otherwise."""

    def problem(self, data: dict[str, Any]) -> str: ...      # Problem(**data).key()
    def workload(self, data: dict[str, Any]) -> str: ...     # Workload(...).key()
    def config(self, data: dict[str, Any]) -> str: ...       # KernelConfig.from_dict(data).key()
    def device(self, data: dict[str, Any]) -> str: ...       # DeviceInfo.from_dict(data).fingerprint
    def objective(self, workload: dict[str, Any],            # Workload(...).objective(latencies)
                  latencies_us: dict[int, float]) -> float: ...


@dataclass
class Profile:
    device: dict[str, Any]
    kernel_hash: str
    entries: list[ProfileEntry]
    tool_version: str = field(default_factory=tool_version)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    schema_version: int = SCHEMA_VERSION
    """The schema the profile was read as (`to_json` always writes SCHEMA_VERSION)."""

    def __post_init__(self) -> None:
        # A profile's entries are of its device and kernel build.
        self.entries = [e if e.device and e.kernel_hash else
                        dataclasses.replace(e, device=e.device or dict(self.device),
                                kernel_hash=e.kernel_hash or self.kernel_hash)
                        for e in self.entries]

    @property
    def fingerprint(self) -> str:
        return str(self.device["fingerprint"])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "tool_version": self.tool_version,
            "created_at": iso_utc(self.created_at),
            "kernel_hash": self.kernel_hash,
            "device": dict(self.device),
            "entries": [e.to_json() for e in self.entries],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


@dataclass(frozen=True)
class ImportReport:
    """Outcome of `import_profile`: counts, and under which kernel hash entries were stored."""

    total: int
    result: ImportResult
    stored_kernel_hash: str
    profile_kernel_hash: str
    stale: bool
    forced: bool


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def select_device(store: Store, spec: str | None) -> list[dict[str, Any]]:
    """Devices that hold entries and match `spec` (fingerprint prefix or name substring, case
    insensitive); all devices with entries when `spec` is None."""
    with_entries = {e.device_fingerprint: e.device for e in store.list_results()}
    devices = sorted(with_entries.values(), key=lambda d: (d["name"], d["fingerprint"]))
    if spec is None:
        return devices
    s = spec.strip().lower()
    exact = [d for d in devices if d["fingerprint"].lower() == s]
    if exact:
        return exact
    return [d for d in devices
            if d["fingerprint"].lower().startswith(s) or s in d["name"].lower()]


def build_profile(store: Store, device: dict[str, Any], *, current_kernel_hash: str,
                  kernel_hash: str | None = None) -> Profile:
    """The profile of one device. Kernel hash: the given one, else the current one when the device
    has entries for it, else the hash of the device's most recently written entry."""
    entries = store.list_results(device["fingerprint"], current_kernel_hash)
    if not entries:
        raise ProfileError(f"nothing to export: no tuned entries for device {device['name']} "
                           f"({device['fingerprint']})")
    hashes = {e.kernel_hash for e in entries}
    if kernel_hash is None:
        if current_kernel_hash in hashes:
            kernel_hash = current_kernel_hash
        else:
            newest = max(entries, key=lambda e: e.created_at or datetime.min.replace(tzinfo=UTC))
            kernel_hash = newest.kernel_hash
    else:
        matches = sorted(h for h in hashes if h.startswith(kernel_hash))
        if len(matches) != 1:
            raise ProfileError(
                f"kernel hash {kernel_hash!r} matches {len(matches)} of the device's hashes "
                f"({', '.join(h[:12] for h in sorted(hashes))})", "kernel_hash")
        kernel_hash = matches[0]
    chosen = [e for e in entries if e.kernel_hash == kernel_hash]
    return Profile(device=chosen[0].device, kernel_hash=kernel_hash,
                   entries=[_entry_to_profile(e) for e in chosen])


def _entry_to_profile(e: TunedEntry) -> ProfileEntry:
    # An imported entry travels on with the provenance it came with, so that export -> import
    # -> export reproduces the same entries instead of growing "imported from" chains.
    provenance = e.origin if e.source == "imported" and e.origin else e.provenance
    return dataclasses.replace(
        e, problem=dict(e.problem),
        workload={"name": e.workload["name"], "ms": list(e.workload["ms"]),
                  "weights": [float(w) for w in e.workload["weights"]]},
        config=dict(e.config), bands=tuple((m, dict(c)) for m, c in e.bands),
        objective_us=float(e.objective_us),
        default_objective_us=float(e.default_objective_us),
        latencies_us=dict(e.latencies_us), default_latencies_us=dict(e.default_latencies_us),
        provenance=provenance, created_at=e.created_at or datetime.now(UTC),
    )


# --------------------------------------------------------------------------------------------
# parse + validate
# --------------------------------------------------------------------------------------------


OBJECTIVE_REL_TOL = 1e-6
"""How closely a stored objective must equal the weighted sum of its latencies (the tuner stores
exactly that sum; the slack only absorbs summation order in other writers)."""


class _NonFinite:
    """A `NaN`, `Infinity` or overflowing number (`1e999`) in the JSON text, kept as its
    spelling. `json.loads` cannot say where it met one, so it is parsed into this marker and
    the validator reports it with the field's path (`entries[3].latencies_us['16']`)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _parse_float(text: str) -> float | _NonFinite:
    f = float(text)
    return f if math.isfinite(f) else _NonFinite(text)


def _child(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _first_non_finite(doc: Any) -> tuple[str, str] | None:
    """(path, spelling) of the first non-finite number in document order, else None. Iterative,
    so that a deeply nested document built in Python cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NonFinite):
            return path or "(top level)", value.text
        if isinstance(value, float) and not math.isfinite(value):
            return path or "(top level)", repr(value)
        if isinstance(value, dict):
            stack.extend(reversed([(_child(path, str(k)), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(value)]))
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicated key {k!r}")
        out[k] = v
    return out


def read_profile(path: str | Path, validator: ProfileValidator, *,
                 max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    """Read and fully validate a profile file (raises ProfileError naming the field at fault)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ProfileError(f"profile {p} is a directory, not a file")
        size = p.stat().st_size
        if size > max_bytes:
            raise ProfileError(f"profile {p} is {size} bytes, over the {max_bytes}-byte limit")
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {p}: {exc.strerror or exc}") from None
    return parse_profile(data, validator, name=str(p), max_bytes=max_bytes)


def parse_profile(data: bytes | str, validator: ProfileValidator, *, name: str = "profile",
                  max_bytes: int = MAX_PROFILE_BYTES) -> Profile:
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ProfileError(f"{name} is over the {max_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{name} is not UTF-8 text (byte {exc.start})") from None
    try:
        doc = json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float,
                         object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ProfileError(f"{name} is not valid JSON: {exc}") from None
    return validate_profile(doc, validator, name=name)


class _V:
    """Field checks that raise ProfileError with the JSON path of the field."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, path: str, msg: str) -> ProfileError:
        return ProfileError(f"{self.name}: {path}: {msg}", path)

    def obj(self, value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path or "(top level)", f"must be an object, got {_tname(value)}")
        missing = [k for k in keys if k not in value]
        extra = sorted(k for k in value if k not in keys)
        prefix = f"{path}." if path else ""
        if missing:
            raise self.fail(prefix + missing[0], "missing field"
                            + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
        if extra:
            raise self.fail(prefix + extra[0], "unknown field"
                            + (f" (also unknown: {', '.join(extra[1:])})" if extra[1:] else ""))
        return value

    def string(self, value: Any, path: str, *, min_len: int = 0, max_len: int = 256,
               pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_tname(value)}")
        if not min_len <= len(value) <= max_len:
            raise self.fail(path, f"length {len(value)} is outside {min_len}..{max_len}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(path, f"{value[:80]!r} is not of the expected form")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_tname(value)}")
        if not lo <= value <= hi:
            raise self.fail(path, f"{value} is outside {lo}..{hi}")
        return value

    def number(self, value: Any, path: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"must be a number, got {_tname(value)}")
        f = float(value)
        if not math.isfinite(f) or not lo < f <= hi:
            raise self.fail(path, f"{value} is outside ({lo:g}, {hi:g}]")
        return f

    def timestamp(self, value: Any, path: str) -> datetime:
        s = self.string(value, path, max_len=64)
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise self.fail(path, f"{s!r} is not an ISO 8601 timestamp") from None
        if dt.tzinfo is None:
            raise self.fail(path, f"{s!r} has no time zone (expected e.g. +00:00)")
        return dt.astimezone(UTC)

    def domain(self, fn: Any, data: dict[str, Any], path: str) -> str:
        try:
            key = fn(data)
        except Exception as exc:  # the caller's validator: any failure means invalid data
            raise self.fail(path, str(exc) or type(exc).__name__) from None
        return str(key)

    def latencies(self, value: Any, path: str, ms: list[int]) -> dict[int, float]:
        """Exactly one positive finite latency per M of the workload: a missing M was not
        measured, and an M outside the workload was not part of what was tuned."""
        if not isinstance(value, dict):
            raise self.fail(path, f"must be an object of M -> microseconds, got {_tname(value)}")
        out: dict[int, float] = {}
        for k, v in value.items():
            if not _M_KEY.match(k) or int(k) > MAX_M:
                raise self.fail(f"{path}[{k!r}]", f"key {k!r} is not an M in 1..{MAX_M}")
            if int(k) not in ms:
                raise self.fail(f"{path}[{k!r}]", f"M={k} is not one of the workload's Ms "
                                f"({', '.join(map(str, ms))}): only measured Ms belong here")
            out[int(k)] = self.number(v, f"{path}[{k!r}]", 0.0, MAX_US)
        missing = [m for m in ms if m not in out]
        if missing:
            raise self.fail(path, f"no latency for workload M={missing[0]}")
        return out

    def bands(self, value: Any, path: str, config: dict[str, Any], ms: list[int],
              check_config: Any) -> tuple[tuple[int | None, dict[str, int]], ...]:
        """The plan over M bands of a schema-2 entry (the rule is `entry.bands_problem`); one
        band reads as no bands (the entry's `config` alone)."""
        if not isinstance(value, list):
            raise self.fail(path, f"must be an array of bands, got {_tname(value)}")
        out: list[tuple[int | None, dict[str, int]]] = []
        for i, raw in enumerate(value):
            at = f"{path}[{i}]"
            b = self.obj(raw, at, BAND_KEYS)
            m_hi = b["m_hi"]
            if m_hi is not None:
                m_hi = self.integer(m_hi, f"{at}.m_hi", 1, MAX_M)
            if not isinstance(b["config"], dict):
                raise self.fail(f"{at}.config", f"must be an object, got {_tname(b['config'])}")
            self.domain(check_config, b["config"], f"{at}.config")
            out.append((m_hi, dict(b["config"])))
        why = bands_problem(tuple(out), config, ms, identity=check_config)
        if why is not None:
            raise self.fail(path if why[0] is None else f"{path}[{why[0]}]", why[1])
        return tuple(out) if len(out) > 1 else ()

    def objective(self, value: float, path: str, derived: float, of: str) -> float:
        """A stored objective must be what its latencies give (the workload's weighted sum)."""
        if not math.isclose(value, derived, rel_tol=OBJECTIVE_REL_TOL, abs_tol=1e-9):
            raise self.fail(path, f"{value:g} is not the workload's weighted sum of {of} "
                            f"({derived:g})")
        return value


def _tname(value: Any) -> str:
    if isinstance(value, _NonFinite):
        return f"the non-finite number {value.text}"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def validate_profile(doc: Any, validator: ProfileValidator, *, name: str = "profile") -> Profile:
    """Check a decoded profile document completely; return it as a Profile."""
    v = _V(name)
    if not isinstance(doc, dict):
        raise v.fail("(top level)", f"must be an object, got {_tname(doc)}")
    # Identify the format and version first: an unknown version gets that message, not a
    # list of fields it happens to lack.
    # A field that is absent is named as missing (as `obj` does), not as a null of a wrong type.
    for key in ("format", "schema_version"):
        if key not in doc:
            raise v.fail(key, "missing field" + (" (not a gemmtune profile)"
                                                 if key == "format" else ""))
    if doc["format"] != PROFILE_FORMAT:
        raise v.fail("format", f"must be {PROFILE_FORMAT!r}, got {doc['format']!r} "
                     "(not a gemmtune profile)")
    sv = doc["schema_version"]
    if isinstance(sv, bool) or not isinstance(sv, int):
        raise v.fail("schema_version", f"must be an integer, got {_tname(sv)}")
    if sv not in SUPPORTED_SCHEMA_VERSIONS:
        raise v.fail("schema_version", f"version {sv} is not supported (this gemmtune reads "
                     f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}; upgrade gemmtune)")
    bad = _first_non_finite(doc)
    if bad is not None:
        raise v.fail(bad[0], f"{bad[1]} is not a finite number (JSON has no NaN or Infinity; "
                     "a measurement is finite)")
    v.obj(doc, "", TOP_KEYS)
    tv = v.string(doc["tool_version"], "tool_version", min_len=1, max_len=64)
    created = v.timestamp(doc["created_at"], "created_at")
    kh = v.string(doc["kernel_hash"], "kernel_hash", min_len=64, max_len=64, pattern=_HEX)

    dev = v.obj(doc["device"], "device", DEVICE_KEYS)
    v.string(dev["vendor"], "device.vendor", min_len=1, max_len=32)
    v.string(dev["name"], "device.name", min_len=1, max_len=256)
    v.string(dev["compute_capability"], "device.compute_capability", pattern=_CC)
    v.integer(dev["sm_count"], "device.sm_count", 1, 100_000)
    v.integer(dev["memory_bytes"], "device.memory_bytes", 0, 2**50)
    v.string(dev["driver_version"], "device.driver_version", max_len=64)
    v.string(dev["runtime_version"], "device.runtime_version", max_len=64)
    fp = v.string(dev["fingerprint"], "device.fingerprint", min_len=8, max_len=64, pattern=_HEX)
    expected_fp = v.domain(validator.device, dev, "device")
    if expected_fp != fp:
        raise v.fail("device.fingerprint", f"{fp} does not match the device fields "
                     f"(they give {expected_fp})")

    raw_entries = doc["entries"]
    if not isinstance(raw_entries, list):
        raise v.fail("entries", f"must be an array, got {_tname(raw_entries)}")
    if len(raw_entries) > MAX_ENTRIES:
        raise v.fail("entries", f"{len(raw_entries)} entries, over the limit of {MAX_ENTRIES}")
    entries: list[ProfileEntry] = []
    seen: dict[tuple[str, str], int] = {}
    entry_keys = ENTRY_KEYS_V1 if sv == 1 else ENTRY_KEYS
    for i, raw in enumerate(raw_entries):
        at = f"entries[{i}]"
        e = v.obj(raw, at, entry_keys)
        problem = v.obj(e["problem"], f"{at}.problem", PROBLEM_KEYS)
        problem_key = v.domain(validator.problem, problem, f"{at}.problem")
        workload = v.obj(e["workload"], f"{at}.workload", WORKLOAD_KEYS)
        v.string(workload["name"], f"{at}.workload.name", min_len=1, max_len=64)
        for part in ("ms", "weights"):
            if not isinstance(workload[part], list):
                raise v.fail(f"{at}.workload.{part}", f"must be an array, got "
                             f"{_tname(workload[part])}")
        workload_key = v.domain(validator.workload, workload, f"{at}.workload")
        config = e["config"]
        if not isinstance(config, dict):
            raise v.fail(f"{at}.config", f"must be an object, got {_tname(config)}")
        config_key = v.domain(validator.config, config, f"{at}.config")
        ms = [int(m) for m in workload["ms"]]
        bands = (v.bands(e["bands"], f"{at}.bands", config, ms, validator.config)
                 if "bands" in entry_keys else ())
        objective_us = v.number(e["objective_us"], f"{at}.objective_us", 0.0, MAX_US)
        default_objective_us = v.number(e["default_objective_us"], f"{at}.default_objective_us",
                                        0.0, MAX_US)
        latencies_us = v.latencies(e["latencies_us"], f"{at}.latencies_us", ms)
        default_latencies_us = v.latencies(e["default_latencies_us"],
                                           f"{at}.default_latencies_us", ms)
        v.objective(objective_us, f"{at}.objective_us",
                    validator.objective(workload, latencies_us), "latencies_us")
        v.objective(default_objective_us, f"{at}.default_objective_us",
                    validator.objective(workload, default_latencies_us), "default_latencies_us")
        entry = ProfileEntry(
            device=dict(dev), kernel_hash=kh,
            problem=dict(problem), problem_key=problem_key,
            workload={"name": workload["name"], "ms": ms,
                      "weights": [float(w) for w in workload["weights"]]},
            workload_key=workload_key,
            config=dict(config), config_key=config_key, bands=bands,
            objective_us=objective_us, default_objective_us=default_objective_us,
            latencies_us=latencies_us, default_latencies_us=default_latencies_us,
            provenance=v.string(e["provenance"], f"{at}.provenance", max_len=2000),
            created_at=v.timestamp(e["created_at"], f"{at}.created_at"),
        )
        dup = seen.get((problem_key, workload_key))
        if dup is not None:
            raise v.fail(at, f"duplicates entries[{dup}] (problem {problem_key}, workload "
                         f"{workload_key})")
        seen[(problem_key, workload_key)] = i
        entries.append(entry)
    return Profile(device=dict(dev), kernel_hash=kh, entries=entries, tool_version=tv,
                   created_at=created, schema_version=sv)


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------


def import_profile(store: Store, profile: Profile, *, current_kernel_hash: str,
                   replace: bool = False, force: bool = False, source_name: str = "profile",
                   dry_run: bool = False) -> ImportReport:
    """Write a validated profile in one transaction.

    A profile measured with another kernel hash is stored under its own hash, i.e. as stale
    (listed, never served), unless `force` stores it under `current_kernel_hash`. An entry that
    already exists locally for the same (device, hash, problem, workload) is kept unless
    `replace`."""
    mismatch = profile.kernel_hash != current_kernel_hash
    stored_hash = current_kernel_hash if (mismatch and force) else profile.kernel_hash
    note = f"imported from {source_name}"
    if mismatch and force:
        note += f" (forced from kernel hash {profile.kernel_hash[:12]})"
    entries = [
        dataclasses.replace(e, device=dict(profile.device), kernel_hash=stored_hash, source="imported",
                provenance=note, origin=e.provenance, run_id=None, stale=False)
        for e in profile.entries
    ]
    result = ImportResult() if dry_run else store.import_entries(entries, replace=replace)
    return ImportReport(total=len(entries), result=result, stored_kernel_hash=stored_hash,
                        profile_kernel_hash=profile.kernel_hash,
                        stale=mismatch and not force, forced=mismatch and force)
