"""`gemmtune bench` / `gemmtune compare`: measure configurations per (layer shape, M) and catch
regressions before users do.

Why: the ExLlamaV2 0.0.11 -> 0.0.12 change (fused threshold 50 -> 32, rows per block 8 -> 4)
shipped a 30-50 % decode slowdown that users found and the project bisected by hand. Comparing
two configurations per (problem, M) on the same card says at once *which* shapes and batch sizes
got slower, and `compare` exits 1 on a regression so it can gate an engine's CI.

Pieces (GPU imports stay inside the two `measure_*` functions, so everything else runs on CPU):

- **Results files** (`BenchResults`): versioned JSON (`format: gemmtune-bench`) with the card,
  its fingerprint, the kernel hash, the source label and provenance, the command line, and per
  problem the config and per M `median_us`, `spread_us`, `repeats` and the dispatch path
  (`fused` when M <= max_q_gemm_rows, else `recon`). Loading validates every field; a bad file is
  one `CompareError` line.
- **Sources** (`resolve_source`): `tuned` (the tuning database, exact device fingerprint and
  kernel hash), `default` or another preset name, a profile file (`gemmtune export`), or a
  results file (already measured: no GPU needed).
- **Comparison** (`compare_results`): per (problem, M) the ratio B/A, geometric means overall and
  per problem, and the regression rule (`is_regression`):

      B/A > 1 + threshold   AND   (B - A) > spread_A + spread_B

  The ratio test says the slowdown matters; the spread test says it is not noise (the spreads
  are interquartile ranges of the repeats, so two runs of one config rarely differ by more than
  both spreads together). Both must hold for a flag. The mirror image is reported as `faster`.
- **Output**: Markdown (`render_markdown`) and a PNG plot (`plot`): latency against M per
  problem, log-x, both curves, a vertical marker at each config's fused/reconstruct switch.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemmtune.db.resolve import Band, Offer, Resolution, resolve
from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import MAX_M, Workload

RESULTS_FORMAT = "gemmtune-bench"
PROFILE_FORMAT = "gemmtune-profile"
COMPARISON_FORMAT = "gemmtune-compare"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MAX_FILE_BYTES = 64 * 2**20
MAX_US = 1e9

DEFAULT_MS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
"""Decode (1..8), batched decode and speculative steps (12..64), prefill chunks (128..512): dense
where the fused/reconstruct switch of real configs lies (32, 50, 64)."""

DEFAULT_THRESHOLD = 0.03
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


# ---------------------------------------------------------------------------------------------
# results model
# ---------------------------------------------------------------------------------------------


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
            "problem": {"k": p.k, "n": p.n, "bits": p.bits, "group_size": p.group_size,
                        "act_order": p.act_order},
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
            pd = _obj(e["problem"], f"{where}.problem", ("k", "n", "bits", "group_size", "act_order"))
            problem = Problem(**pd)
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


def _read_json(path: str | Path) -> Any:
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
    return results_from_json(_read_json(path), str(path))


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------

SOURCE_KINDS = ("tuned", "preset", "profile", "results")


@dataclass
class ResolvedSource:
    """What a SOURCE argument means: per problem the M bands to measure (each band's config and
    where it came from, as `gemmtune.db.resolve` answers the runtime), or results already
    measured."""

    label: str
    kind: str
    bands: dict[Problem, Resolution[KernelConfig]] = field(default_factory=dict)
    results: BenchResults | None = None
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.results is not None

    @property
    def configs(self) -> dict[Problem, KernelConfig]:
        """The config of each problem's top band (the one config when there is one band)."""
        return {p: r.bands[-1].config for p, r in self.bands.items()}

    @property
    def provenance(self) -> dict[Problem, str]:
        return {p: "; ".join(self._why(b, len(r.bands) > 1) for b in r.bands)
                for p, r in self.bands.items()}

    def _why(self, band: Band[KernelConfig], banded: bool) -> str:
        e = band.entry
        if e is None:
            text = band.detail
        elif self.kind == "profile":
            text = f"profile {self.label} ({e.workload_key}): {e.provenance}"
        else:
            text = (f"tuned ({e.workload_key}, {e.source}) in {band.detail}"
                    + (f": {e.provenance}" if e.provenance else ""))
        return f"{band.span}: {text}" if banded else text


def classify_source(text: str) -> str:
    """`tuned`, `preset`, `profile` or `results`, without touching a GPU or a database; an
    unknown name or unusable file raises one CompareError line."""
    if text == "tuned":
        return "tuned"
    if text in PRESETS:
        return "preset"
    p = Path(text)
    if p.is_file():
        doc = _read_json(p)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt == RESULTS_FORMAT:
            return "results"
        if fmt == PROFILE_FORMAT:
            return "profile"
        raise CompareError(f"{text}: neither a results file ({RESULTS_FORMAT}) nor a profile "
                           f"({PROFILE_FORMAT}); format is {fmt!r}")
    if p.exists():
        raise CompareError(f"{text} is not a file")
    if p.suffix.lower() == ".json" or "/" in text:
        raise CompareError(f"{text}: no such file (a source is tuned, a preset, a profile or a "
                           "results file)")
    raise CompareError(f"unknown source {text!r}: expected tuned, a preset "
                       f"({', '.join(PRESETS)}), a profile or a results file")


def resolve_source(
    text: str,
    problems: Iterable[Problem],
    *,
    device: DeviceInfo | None = None,
    kernel_hash: str | None = None,
    workload: Workload | str | None = None,
    db_url: str | None = None,
) -> ResolvedSource:
    """Turn a SOURCE argument into M bands per problem (or loaded results).

    `tuned` reads the tuning database (`db_url`, else GEMMTUNE_DB, else the default file) for
    exactly this device fingerprint and kernel hash and serves each shape the bands the runtime
    would (`gemmtune.db.resolve`: for `workload` exactly that workload's entry, without one the
    decode entry for decode-sized M beside a larger workload's entry); it fails naming every
    shape the database has no entry for. A profile is resolved the same way as if on the card
    it came from (the note says when that is not this one). A preset is one band of that config.
    A results file is loaded and validated; `problems` does not apply to it.
    """
    kind = classify_source(text)
    problems = list(problems)
    wkey = workload.key() if isinstance(workload, Workload) else workload
    if kind == "results":
        return ResolvedSource(text, kind, results=load_results(text))
    if kind == "preset":
        cfg = PRESETS[text]
        one = Resolution((Band(1, None, cfg, "argument", f"preset {text}"),))
        return ResolvedSource(text, kind, {p: one for p in problems})
    if kind == "profile":
        from gemmtune.db.errors import ProfileError
        from gemmtune.db.profiles import read_profile
        from gemmtune.kernels.validate import KernelValidator

        try:
            prof = read_profile(text, KernelValidator())
        except ProfileError as exc:
            raise CompareError(str(exc)) from None
        name = Path(text).name
        src = _resolve_all(ResolvedSource(name, kind), problems,
                           Offer("profile", name, tuple(prof.entries), prof.fingerprint,
                                 prof.kernel_hash), prof.fingerprint, prof.kernel_hash, wkey)
        missing = [p.key() for p in problems if p not in src.bands]
        if missing:
            raise CompareError(f"profile {text} has no entry for {', '.join(missing)}")
        if device is not None and prof.fingerprint != device.fingerprint:
            src.note = (f"profile {name} was tuned on {prof.device.get('name')} "
                        f"({prof.fingerprint}), measured here on {device.name} ({device.fingerprint})")
        return src
    # tuned
    if device is None or kernel_hash is None:
        raise CompareError("`tuned` needs the GPU's identity (device and kernel hash)")
    from gemmtune.db.errors import DatabaseError
    from gemmtune.db.store import Store, display_url

    try:
        with Store.open(db_url, readonly=True) as store:
            where = display_url(store.url)
            offer = Offer("database", where,
                          tuple(store.list_results(device.fingerprint, kernel_hash)))
    except DatabaseError as exc:
        raise CompareError(str(exc)) from None
    src = _resolve_all(ResolvedSource("tuned", kind), problems, offer, device.fingerprint,
                       kernel_hash, wkey)
    missing = [p.key() for p in problems if p not in src.bands]
    if missing:
        raise CompareError(
            f"no tuned entry for {', '.join(missing)} on {device.name} ({device.fingerprint}) "
            f"with kernel hash {kernel_hash[:12]} in {where}: run `gemmtune tune` for these "
            "shapes first (same --db)")
    return src


def _resolve_all(src: ResolvedSource, problems: Sequence[Problem], offer: Offer,
                 fingerprint: str, kernel_hash: str, workload_key: str | None) -> ResolvedSource:
    """Fill `src.bands` with the resolver's answer for each problem that has stored entries
    (a problem it would serve the default is left out: the caller names it)."""
    for p in problems:
        res = resolve([offer], fingerprint, kernel_hash, p.key(), workload_key,
                      default=PRESETS["default"].to_dict())
        if all(b.entry is not None for b in res.bands):
            src.bands[p] = res.map(KernelConfig.from_dict)
    return src


# ---------------------------------------------------------------------------------------------
# measuring (the only GPU part; imports are lazy)
# ---------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, str], None]
"""on_progress(done, total, what): problems finished so far, of total, and what runs next."""


def _points(config: KernelConfig, ms: Mapping[int, Any]) -> dict[int, Point]:
    return {m: Point(m, float(x.median_us), float(x.spread_us), int(x.repeats), path_for(config, m))
            for m, x in ms.items()}


def _close(evaluator: Any) -> None:
    close = getattr(evaluator, "close", None)
    if callable(close):
        close()


def _bench(problem: Problem, config: KernelConfig, points: dict[int, Point],
           layers: tuple[str, ...], res: Resolution[KernelConfig], provenance: str) -> ProblemBench:
    bands = res.bands if len(res.bands) > 1 else ()
    return ProblemBench(problem, config, points, layers, provenance, bands)


def _segments(ms: Sequence[int], *sides: Resolution[KernelConfig]
              ) -> list[tuple[tuple[int, ...], tuple[KernelConfig, ...]]]:
    """`ms` in runs over which every side's config stays the same: each run is measured with
    its own evaluator (one workload of those Ms), so every M runs the config its band serves."""
    runs: list[tuple[list[int], tuple[KernelConfig, ...]]] = []
    for m in sorted(set(ms)):
        configs = tuple(r.config_at(m) for r in sides)
        if runs and runs[-1][1] == configs:
            runs[-1][0].append(m)
        else:
            runs.append(([m], configs))
    return [(tuple(run), configs) for run, configs in runs]


def _workload(ms: Sequence[int]) -> Workload:
    return Workload("bench", tuple(ms), tuple(1.0 for _ in ms))


def measure_dispatch(
    label: str,
    problems: Mapping[Problem, Sequence[str]],
    source: ResolvedSource,
    ms: Sequence[int],
    *,
    device_index: int = 0,
    check: bool = True,
    on_progress: ProgressFn | None = None,
) -> BenchResults:
    """Whole-dispatch time of the source's config per (problem, M) -- at each M the config of
    the band that serves it -- each path checked against the reference first when `check` (the
    tuner's harness: `CudaEvaluator.dispatch`)."""
    from gemmtune.autotune import study

    device, khash = study.device_identity(device_index)
    out: list[ProblemBench] = []
    order = list(problems)
    for i, problem in enumerate(order):
        if on_progress:
            on_progress(i, len(order), problem.key())
        res = source.bands[problem]
        points: dict[int, Point] = {}
        for run, (cfg,) in _segments(ms, res):
            ev = study.make_evaluator(problem, _workload(run), device_index)
            try:
                device, khash = ev.device, ev.kernel_hash
                points.update(_points(cfg, ev.dispatch(cfg, check=check)))
            finally:
                _close(ev)
        out.append(_bench(problem, res.bands[-1].config, points, tuple(problems[problem]), res,
                          source.provenance.get(problem, "")))
    if on_progress:
        on_progress(len(order), len(order), "")
    return BenchResults(label, device.to_dict(), khash, out, provenance=_provenance_summary(source))


def measure_interleaved(
    labels: tuple[str, str],
    problems: Mapping[Problem, Sequence[str]],
    a: ResolvedSource,
    b: ResolvedSource,
    ms: Sequence[int],
    *,
    device_index: int = 0,
    rounds: int = 15,
    on_progress: ProgressFn | None = None,
) -> tuple[BenchResults, BenchResults]:
    """A and B per (problem, M), measured A B A B ... on the same card with the same weights
    and activations: drift between two separate runs cannot masquerade as a regression. At
    each M each side runs the config of the band that serves it."""
    from gemmtune.autotune import study

    device, khash = study.device_identity(device_index)
    out_a: list[ProblemBench] = []
    out_b: list[ProblemBench] = []
    order = list(problems)
    for i, problem in enumerate(order):
        if on_progress:
            on_progress(i, len(order), problem.key())
        ra, rb = a.bands[problem], b.bands[problem]
        pa: dict[int, Point] = {}
        pb: dict[int, Point] = {}
        for run, (ca, cb) in _segments(ms, ra, rb):
            ev = study.make_evaluator(problem, _workload(run), device_index)
            try:
                device, khash = ev.device, ev.kernel_hash
                ta, tb = ev.interleaved(ca, cb, rounds=rounds)
            finally:
                _close(ev)
            pa.update(_points(ca, ta))
            pb.update(_points(cb, tb))
        layers = tuple(problems[problem])
        out_a.append(_bench(problem, ra.bands[-1].config, pa, layers, ra,
                            a.provenance.get(problem, "")))
        out_b.append(_bench(problem, rb.bands[-1].config, pb, layers, rb,
                            b.provenance.get(problem, "")))
    if on_progress:
        on_progress(len(order), len(order), "")
    d = device.to_dict()
    return (BenchResults(labels[0], d, khash, out_a, _provenance_summary(a), mode="interleaved"),
            BenchResults(labels[1], d, khash, out_b, _provenance_summary(b), mode="interleaved"))


def _provenance_summary(src: ResolvedSource) -> str:
    if src.kind == "preset":
        return f"built-in preset {src.label}"
    kinds = {"tuned": "tuning database", "profile": f"profile {src.label}"}
    text = kinds.get(src.kind, src.label)
    return text + (f" ({src.note})" if src.note else "")


# ---------------------------------------------------------------------------------------------
# comparison math
# ---------------------------------------------------------------------------------------------


def geomean(values: Iterable[float]) -> float:
    """Geometric mean (the right average of ratios: 2x slower and 2x faster cancel)."""
    xs = list(values)
    if not xs:
        return float("nan")
    if any(x <= 0 for x in xs):
        raise ValueError("geometric mean of non-positive values")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def is_regression(a: Point, b: Point, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """B is slower than A by more than `threshold` (relative) AND by more than both measured
    spreads together (absolute): a difference inside the noise is never flagged."""
    return b.median_us / a.median_us > 1 + threshold and \
        (b.median_us - a.median_us) > a.spread_us + b.spread_us


def is_improvement(a: Point, b: Point, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """The mirror of `is_regression` (reported, never fails the run)."""
    return a.median_us / b.median_us > 1 + threshold and \
        (a.median_us - b.median_us) > a.spread_us + b.spread_us


@dataclass(frozen=True)
class Row:
    problem_key: str
    layers: tuple[str, ...]
    m: int
    a: Point
    b: Point
    regression: bool
    improvement: bool

    @property
    def ratio(self) -> float:
        return self.b.median_us / self.a.median_us

    @property
    def flag(self) -> str:
        return "REGRESSION" if self.regression else ("faster" if self.improvement else "")


@dataclass
class Comparison:
    a: BenchResults
    b: BenchResults
    rows: list[Row]
    threshold: float
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    @property
    def improvements(self) -> list[Row]:
        return [r for r in self.rows if r.improvement]

    @property
    def geomean(self) -> float:
        return geomean(r.ratio for r in self.rows)

    def geomean_by_problem(self) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for r in self.rows:
            groups.setdefault(r.problem_key, []).append(r.ratio)
        return {k: geomean(v) for k, v in groups.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": COMPARISON_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "threshold": self.threshold,
            "rule": "regression: B/A > 1 + threshold and B - A > spread_A + spread_B",
            "geomean_ratio": self.geomean,
            "geomean_ratio_by_problem": self.geomean_by_problem(),
            "regressions": len(self.regressions),
            "warnings": list(self.warnings),
            "left_out": list(self.left_out),
            "rows": [{"problem_key": r.problem_key, "m": r.m, "a_us": r.a.median_us,
                      "a_spread_us": r.a.spread_us, "b_us": r.b.median_us,
                      "b_spread_us": r.b.spread_us, "a_path": r.a.path, "b_path": r.b.path,
                      "ratio": r.ratio, "flag": r.flag} for r in self.rows],
            "a": self.a.to_json(),
            "b": self.b.to_json(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


def _describe(r: BenchResults) -> str:
    return f"{r.label} ({r.device.get('name', '?')}, {r.fingerprint[:8]}, kernel {r.kernel_hash[:12]})"


def compare_results(a: BenchResults, b: BenchResults,
                    threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Per (problem, M) present in both, in A's order. Different cards or kernel builds are a
    warning (the comparison still runs: that may be the point); what only one side has is
    listed in `left_out`."""
    if not threshold >= 0 or not math.isfinite(threshold):
        raise CompareError(f"threshold must be a non-negative number, got {threshold!r}")
    warnings = []
    if a.fingerprint != b.fingerprint:
        warnings.append(f"A and B were measured on different cards: {_describe(a)} vs {_describe(b)}")
    if a.kernel_hash != b.kernel_hash:
        warnings.append(f"A and B were measured with different kernel builds: "
                        f"{a.kernel_hash[:12]} vs {b.kernel_hash[:12]}")
    bmap = b.by_key()
    amap = a.by_key()
    rows: list[Row] = []
    left_out: list[str] = []
    only_a = [k for k in amap if k not in bmap]
    only_b = [k for k in bmap if k not in amap]
    if only_a:
        left_out.append(f"only in A: {', '.join(only_a)}")
    if only_b:
        left_out.append(f"only in B: {', '.join(only_b)}")
    for key, pa in amap.items():
        pb = bmap.get(key)
        if pb is None:
            continue
        ms_a, ms_b = set(pa.points), set(pb.points)
        if ms_a - ms_b:
            left_out.append(f"{key}: M {','.join(map(str, sorted(ms_a - ms_b)))} only in A")
        if ms_b - ms_a:
            left_out.append(f"{key}: M {','.join(map(str, sorted(ms_b - ms_a)))} only in B")
        layers = pa.layers or pb.layers
        for m in sorted(ms_a & ms_b):
            x, y = pa.points[m], pb.points[m]
            rows.append(Row(key, layers, m, x, y, is_regression(x, y, threshold),
                            is_improvement(x, y, threshold)))
    if not rows:
        raise CompareError("A and B have no (shape, M) in common: nothing to compare")
    return Comparison(a, b, rows, threshold, warnings, left_out)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def pct(ratio: float) -> str:
    """`+8.3 %` slower / `-4.1 %` faster, as B relative to A."""
    return f"{(ratio - 1) * 100:+.1f} %"


def _config_line(r: BenchResults) -> str:
    keys = sorted({pb.config.key() for pb in r.problems})
    return ", ".join(f"`{k}`" for k in keys)


def render_markdown(c: Comparison, title: str | None = None) -> str:
    """The comparison as a Markdown document: what was compared, on what, the table, geomeans."""
    a, b = c.a, c.b
    lines = [f"# {title or f'{a.label} vs {b.label}'}", ""]
    lines.append(f"- **A**: `{a.label}` — {a.provenance or a.label}; configs {_config_line(a)}")
    lines.append(f"- **B**: `{b.label}` — {b.provenance or b.label}; configs {_config_line(b)}")
    dev = a.device
    lines.append(f"- **Card**: {dev.get('name', '?')} (sm_{str(dev.get('compute_capability', '?')).replace('.', '')}, "
                 f"{dev.get('sm_count', '?')} SMs, driver {dev.get('driver_version') or '?'}), "
                 f"fingerprint `{a.fingerprint}`")
    lines.append(f"- **Kernel hash**: `{a.kernel_hash[:16]}`")
    how = ("interleaved A B A B on the same card" if a.mode == b.mode == "interleaved"
           else "separate runs (results files)")
    lines.append(f"- **Measured**: {a.created_at.strftime('%Y-%m-%d %H:%M UTC')}, {how}; "
                 "whole dispatch per call, CUDA-graph replays, median ± interquartile range")
    lines.append(f"- **Command**: `{b.command if a.mode == 'interleaved' else a.command}`")
    lines.append(f"- **Rule**: regression when B/A > {1 + c.threshold:.3g} and B − A > spread A + "
                 "spread B")
    for w in c.warnings:
        lines.append(f"- **Warning**: {w}")
    for lo in c.left_out:
        lines.append(f"- **Left out**: {lo}")
    lines += ["", "| shape | M | path A→B | A µs | B µs | B/A | |", "|---|---:|---|---:|---:|---:|---|"]
    for r in c.rows:
        lines.append(
            f"| {r.problem_key} | {r.m} | {r.a.path}→{r.b.path} | {r.a.median_us:.2f} ± "
            f"{r.a.spread_us:.2f} | {r.b.median_us:.2f} ± {r.b.spread_us:.2f} | {r.ratio:.3f} | "
            f"{'**REGRESSION**' if r.regression else r.flag} |")
    lines += ["", "| shape (layers) | geomean B/A |", "|---|---:|"]
    layers = {r.problem_key: r.layers for r in c.rows}
    for key, g in c.geomean_by_problem().items():
        names = ", ".join(layers.get(key, ()))
        lines.append(f"| {key}{f' ({names})' if names else ''} | {g:.3f} ({pct(g)}) |")
    lines.append(f"| **all** | **{c.geomean:.3f} ({pct(c.geomean)})** |")
    lines.append("")
    n = len(c.regressions)
    lines.append(f"{n} regression{'s' if n != 1 else ''} and {len(c.improvements)} "
                 f"improvement{'s' if len(c.improvements) != 1 else ''} of {len(c.rows)} points "
                 f"(threshold {c.threshold * 100:g} %).")
    return "\n".join(lines) + "\n"


def plot(c: Comparison, path: str | Path, title: str | None = None) -> None:
    """Latency against M (log-x) per problem, both curves, dashed verticals where each config
    switches from the fused kernel to reconstruct + cuBLAS (its max_q_gemm_rows)."""
    try:
        import matplotlib
    except ImportError:
        raise CompareError("--plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups: dict[str, list[Row]] = {}
    for r in c.rows:
        groups.setdefault(r.problem_key, []).append(r)
    cfg_a, cfg_b = c.a.by_key(), c.b.by_key()
    n = len(groups)
    cols = 2 if n > 1 else 1
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.0 * cols, 3.6 * rows_n), squeeze=False)
    colors = ("tab:blue", "tab:orange")
    for idx, (key, rows) in enumerate(groups.items()):
        ax = axes[idx // cols][idx % cols]
        ms = [r.m for r in rows]
        for side, (label, pts, cmap, color) in enumerate((
                (c.a.label, [r.a for r in rows], cfg_a, colors[0]),
                (c.b.label, [r.b for r in rows], cfg_b, colors[1]))):
            ys = [p.median_us for p in pts]
            es = [p.spread_us / 2 for p in pts]
            ax.errorbar(ms, ys, yerr=es, marker="o" if side == 0 else "s", ms=3.5, lw=1.4,
                        color=color, label=f"{'AB'[side]}: {label}", capsize=2)
            pb = cmap.get(key)
            if pb is not None and min(ms) <= pb.config.max_q_gemm_rows < max(ms):
                # B's marker a hair to the right, so equal thresholds show both colours
                ax.axvline(pb.config.max_q_gemm_rows * (1 + 0.03 * side), color=color, ls="--",
                           lw=1.0, alpha=0.8)
                ax.annotate(f"fused ≤ {pb.config.max_q_gemm_rows}", (pb.config.max_q_gemm_rows, 1),
                            xycoords=("data", "axes fraction"), xytext=(3, -12 - 11 * side),
                            textcoords="offset points", fontsize=7, color=color)
        bad = [r for r in rows if r.regression]
        if bad:
            ax.scatter([r.m for r in bad], [r.b.median_us for r in bad], s=70, facecolors="none",
                       edgecolors="red", lw=1.3, zorder=5, label="regression")
        layers = ", ".join(rows[0].layers)
        ax.set_title(key + (f"  ({layers})" if layers else ""), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2**i for i in range(20) if min(ms) <= 2**i <= max(ms)])
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("M (rows of A)")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
    for idx in range(n, rows_n * cols):
        axes[idx // cols][idx % cols].axis("off")
    dev = c.a.device.get("name", "?")
    fig.suptitle(title or f"{c.a.label} vs {c.b.label} on {dev} (geomean B/A {c.geomean:.3f})",
                 fontsize=11)
    fig.tight_layout()
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
    except OSError as exc:
        raise CompareError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def parse_threshold(text: str) -> float:
    """`3%`, `3 %` or `0.03` -> 0.03."""
    t = str(text).strip()
    try:
        value = float(t[:-1].strip()) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CompareError(f"threshold {text!r}: expected a fraction (0.03) or a percentage (3%)") from None
    if not math.isfinite(value) or value < 0 or value >= 10:
        raise CompareError(f"threshold {text!r} is out of range (0 to 1000 %)")
    return value


def parse_ms(text: str | None, workload: str | None = None) -> tuple[int, ...]:
    """`--m` (a list `1,2,4`, weighted `1:4,512:1` whose weights are ignored, or a workload name)
    or `--workload decode|prefill|mixed`; neither: DEFAULT_MS."""
    if text and workload:
        raise CompareError("give --m or --workload, not both")
    spec = text or workload
    if not spec:
        return DEFAULT_MS
    try:
        wl = Workload.parse(spec)
    except GemmtuneError as exc:
        raise CompareError(str(exc)) from None
    return tuple(sorted(wl.ms))
