"""Results files of `gemmtune bench` (`BenchResults`): versioned JSON (`format: gemmtune-bench`)
with the card, its fingerprint, the kernel hash, the source label and provenance, the command
line, and per problem the config (per M band when Ms ran with different configs) and per M
`median_us`, `spread_us`, `repeats` and the dispatch path (`fused` when M <= max_q_gemm_rows,
else `recon`). Loading validates every field; a bad file is one `CompareError` line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemmtune.db.resolve import Band
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.problem import PROBLEM_FIELDS, Problem
from gemmtune.kernels.workload import MAX_M

RESULTS_FORMAT = "gemmtune-bench"
PROFILE_FORMAT = "gemmtune-profile"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MAX_FILE_BYTES = 64 * 2**20
MAX_US = 1e9
PATHS = ("fused", "recon")

TOP_KEYS = ("format", "schema_version", "tool_version", "created_at", "command", "mode",
            "device", "kernel_hash", "source", "problems")
PROBLEM_KEYS = ("problem", "problem_key", "layers", "config", "config_key", "provenance", "points")
OPTIONAL_PROBLEM_KEYS = ("bands",)
"""Written only when a shape ran with more than one config (one per M band)."""
BAND_KEYS = ("m_lo", "m_hi", "config", "config_key", "source", "detail")
POINT_KEYS = ("m", "median_us", "spread_us", "repeats", "path")


class CompareError(GemmtuneError):
    """A source, results file or option that bench/compare cannot use (one clear line)."""


def path_for(config: KernelConfig, m: int) -> str:
    """Which path the dispatch takes at M: the fused kernel at or below the threshold."""
    return "fused" if m <= config.max_q_gemm_rows else "recon"


@dataclass(frozen=True)
class Point:
    """Whole-dispatch GPU time of one call at M rows (µs), as the harness measured it."""

    m: int
    median_us: float
    spread_us: float
    repeats: int
    path: str

    def to_json(self) -> dict[str, Any]:
        return {"m": self.m, "median_us": self.median_us, "spread_us": self.spread_us,
                "repeats": self.repeats, "path": self.path}


@dataclass
class ProblemBench:
    """One layer shape: the config it ran with, why that config, and its points per M.

    `bands` is set when Ms ran with different configs (a decode band below a larger workload's,
    as the runtime serves them); `config` is then the top band's. Empty: `config` ran every M."""

    problem: Problem
    config: KernelConfig
    points: dict[int, Point]
    layers: tuple[str, ...] = ()
    provenance: str = ""
    bands: tuple[Band[KernelConfig], ...] = ()

    def config_at(self, m: int) -> KernelConfig:
        for band in self.bands:
            if band.covers(m):
                return band.config
        return self.config

    def to_json(self) -> dict[str, Any]:
        p = self.problem
        doc = {
            "problem": p.to_dict(),
            "problem_key": p.key(),
            "layers": list(self.layers),
            "config": self.config.to_dict(),
            "config_key": self.config.key(),
            "provenance": self.provenance,
            "points": [self.points[m].to_json() for m in sorted(self.points)],
        }
        if self.bands:
            doc["bands"] = [{"m_lo": b.m_lo, "m_hi": b.m_hi, "config": b.config.to_dict(),
                             "config_key": b.config.key(), "source": b.source,
                             "detail": b.detail} for b in self.bands]
        return doc


def _now() -> datetime:
    return datetime.now(UTC)


def _tool_version() -> str:
    from gemmtune import __version__

    return __version__


def command_line() -> str:
    """The command as the user typed it (program name shortened), for the record."""
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


@dataclass
class BenchResults:
    """Everything one measured source produced; what a results file holds."""

    label: str
    device: dict[str, Any]
    kernel_hash: str
    problems: list[ProblemBench]
    provenance: str = ""
    mode: str = "dispatch"  # dispatch (bench) | interleaved (compare, measured A B A B)
    command: str = field(default_factory=command_line)
    created_at: datetime = field(default_factory=_now)
    tool_version: str = field(default_factory=_tool_version)

    @property
    def fingerprint(self) -> str:
        return str(self.device.get("fingerprint", ""))

    def by_key(self) -> dict[str, ProblemBench]:
        return {pb.problem.key(): pb for pb in self.problems}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "tool_version": self.tool_version,
            "created_at": self.created_at.isoformat(),
            "command": self.command,
            "mode": self.mode,
            "device": dict(self.device),
            "kernel_hash": self.kernel_hash,
            "source": {"label": self.label, "provenance": self.provenance},
            "problems": [pb.to_json() for pb in self.problems],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    def restrict(self, keys: set[str] | None, ms: set[int] | None) -> BenchResults:
        """Only the named shapes and Ms (None: all); shapes left without a point are dropped
        (filters, not errors)."""
        probs = []
        for pb in self.problems:
            if keys is not None and pb.problem.key() not in keys:
                continue
            pts = {m: p for m, p in pb.points.items() if ms is None or m in ms}
            if pts:
                probs.append(dataclasses.replace(pb, points=pts))
        return dataclasses.replace(self, problems=probs)

    def save(self, path: str | Path) -> None:
        write_text_atomically(path, self.dumps())


def write_text_atomically(path: str | Path, text: str) -> None:
    """Never leave half a file behind: a CI job reading it must see the old one or the new one."""
    import tempfile

    target = Path(path)
    if target.is_dir():
        raise CompareError(f"{target} is a directory; give a file name")
    tmp = ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; reports are meant to be shared
        os.replace(tmp, target)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise CompareError(f"cannot write {target}: {exc.strerror or exc}") from None


# -- validation --------------------------------------------------------------------------------


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _obj(v: Any, where: str, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CompareError(f"{where}: expected an object, got {_tname(v)}")
    missing = [k for k in keys if k not in v]
    extra = sorted(set(v) - set(keys) - set(optional))
    if missing:
        raise CompareError(f"{where}: missing field(s) {', '.join(missing)}")
    if extra:
        raise CompareError(f"{where}: unknown field(s) {', '.join(extra)}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise CompareError(f"{where}: expected a string, got {_tname(v)}")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CompareError(f"{where}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _us(v: Any, where: str, positive: bool) -> float:
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v > 0 if positive else v >= 0) and v <= MAX_US)
    if not ok:
        kind = "a positive" if positive else "a non-negative"
        raise CompareError(f"{where}: expected {kind} finite number of µs, got {v!r}")
    return float(v)


def results_from_json(doc: Any, name: str = "results") -> BenchResults:
    """Strict validation of a results document (exact key sets, types, ranges, domain objects)."""
    if not isinstance(doc, dict):
        raise CompareError(f"{name}: expected a JSON object, got {_tname(doc)}")
    fmt = doc.get("format")
    if fmt == PROFILE_FORMAT:
        raise CompareError(f"{name}: is a tuning profile, not a results file (as a source it is "
                           "measured on this GPU)")
    if fmt != RESULTS_FORMAT:
        raise CompareError(f"{name}: not a gemmtune results file (format is {fmt!r}, expected "
                           f"{RESULTS_FORMAT!r}; write one with `gemmtune bench -o`)")
    version = doc.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CompareError(f"{name}: schema_version {version!r} is not supported (this gemmtune "
                           f"reads {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
    _obj(doc, name, TOP_KEYS)
    try:
        created = datetime.fromisoformat(_str(doc["created_at"], f"{name}: created_at"))
    except ValueError:
        raise CompareError(f"{name}: created_at is not an ISO date: {doc['created_at']!r}") from None
    mode = _str(doc["mode"], f"{name}: mode")
    if mode not in ("dispatch", "interleaved"):
        raise CompareError(f"{name}: mode must be dispatch or interleaved, got {mode!r}")
    device = doc["device"]
    if not isinstance(device, dict):
        raise CompareError(f"{name}: device: expected an object, got {_tname(device)}")
    try:
        info = DeviceInfo.from_dict(device)
    except (TypeError, KeyError) as exc:
        raise CompareError(f"{name}: device: {exc}") from None
    fp = device.get("fingerprint")
    if fp != info.fingerprint:
        raise CompareError(f"{name}: device fingerprint {fp!r} does not match its fields "
                           f"({info.fingerprint})")
    khash = _str(doc["kernel_hash"], f"{name}: kernel_hash")
    source = _obj(doc["source"], f"{name}: source", ("label", "provenance"))
    problems_doc = doc["problems"]
    if not isinstance(problems_doc, list) or not problems_doc:
        raise CompareError(f"{name}: problems: expected a non-empty list")
    problems: list[ProblemBench] = []
    seen: set[str] = set()
    for i, entry in enumerate(problems_doc):
        where = f"{name}: problems[{i}]"
        e = _obj(entry, where, PROBLEM_KEYS, OPTIONAL_PROBLEM_KEYS)
        try:
            pd = _obj(e["problem"], f"{where}.problem", PROBLEM_FIELDS)
            problem = Problem.from_dict(pd)
            config = KernelConfig.from_dict(e["config"])
        except GemmtuneError as exc:
            raise CompareError(f"{where}: {exc}") from None
        if e["problem_key"] != problem.key():
            raise CompareError(f"{where}: problem_key {e['problem_key']!r} does not match the "
                               f"problem ({problem.key()})")
        if problem.key() in seen:
            raise CompareError(f"{where}: problem {problem.key()} appears twice")
        seen.add(problem.key())
        layers = e["layers"]
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise CompareError(f"{where}.layers: expected a list of strings")
        if not isinstance(e["points"], list) or not e["points"]:
            raise CompareError(f"{where}.points: expected a non-empty list")
        bands = _bands_from_json(e.get("bands", []), f"{where}.bands")
        points: dict[int, Point] = {}
        for j, pt in enumerate(e["points"]):
            pw = f"{where}.points[{j}]"
            p = _obj(pt, pw, POINT_KEYS)
            m = _int(p["m"], f"{pw}.m", 1, MAX_M)
            if m in points:
                raise CompareError(f"{pw}: M={m} appears twice")
            path = p["path"]
            if path not in PATHS:
                raise CompareError(f"{pw}.path: expected fused or recon, got {path!r}")
            points[m] = Point(m, _us(p["median_us"], f"{pw}.median_us", True),
                              _us(p["spread_us"], f"{pw}.spread_us", False),
                              _int(p["repeats"], f"{pw}.repeats", 1, 1 << 20), path)
        problems.append(ProblemBench(problem, config, points, tuple(layers),
                                     _str(e["provenance"], f"{where}.provenance"), bands))
    return BenchResults(
        label=_str(source["label"], f"{name}: source.label"),
        provenance=_str(source["provenance"], f"{name}: source.provenance"),
        device=dict(device), kernel_hash=khash, problems=problems, mode=mode,
        command=_str(doc["command"], f"{name}: command"), created_at=created,
        tool_version=_str(doc["tool_version"], f"{name}: tool_version"),
    )


def _bands_from_json(doc: Any, where: str) -> tuple[Band[KernelConfig], ...]:
    if not isinstance(doc, list):
        raise CompareError(f"{where}: expected a list")
    bands = []
    for i, raw in enumerate(doc):
        bw = f"{where}[{i}]"
        b = _obj(raw, bw, BAND_KEYS)
        m_hi = None if b["m_hi"] is None else _int(b["m_hi"], f"{bw}.m_hi", 1, MAX_M)
        try:
            config = KernelConfig.from_dict(b["config"])
        except GemmtuneError as exc:
            raise CompareError(f"{bw}: {exc}") from None
        bands.append(Band(_int(b["m_lo"], f"{bw}.m_lo", 1, MAX_M), m_hi, config,
                          _str(b["source"], f"{bw}.source"), _str(b["detail"], f"{bw}.detail")))
    return tuple(bands)


def read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CompareError(f"{p}: {size} bytes is larger than the {MAX_FILE_BYTES >> 20} MiB "
                               "a results file may have")
        data = p.read_bytes()
    except OSError as exc:
        raise CompareError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CompareError(f"{p}: not a text (UTF-8) file") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_results(path: str | Path) -> BenchResults:
    """Read and validate a results file (`gemmtune bench -o`)."""
    return results_from_json(read_json(path), str(path))
