"""What a SOURCE argument of `bench`/`compare` means: `tuned` (the tuning database, exact device
fingerprint and kernel hash), `default` or another preset name, a profile file (`gemmtune
export`), or a results file (already measured: no GPU needed). Stored entries are chosen by the
one resolver (`gemmtune.db.resolve`), per M band, exactly as the runtime serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gemmtune.autotune.results import (
    PROFILE_FORMAT,
    RESULTS_FORMAT,
    BenchResults,
    CompareError,
    load_results,
    read_json,
)
from gemmtune.db.resolve import Band, Offer, Resolution, resolve
from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload

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
        doc = read_json(p)
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


def compare_inputs(a: str, b: str, problems: Mapping[Problem, Sequence[str]], ms: tuple[int, ...],
                   ms_given: bool) -> tuple[tuple[str, str], dict[int, BenchResults],
                                            dict[Problem, list[str]], tuple[int, ...]]:
    """What `compare A B` works on: the kinds of A and B; the results files among them (by side,
    0 or 1) loaded and kept to the named shapes and Ms (two files of one label are named by their
    file); and the shapes and Ms to measure -- the named ones, else a results file's own when it
    meets a source."""
    kinds = (classify_source(a), classify_source(b))
    loaded = {i: load_results(t) for i, (t, k) in enumerate(zip((a, b), kinds, strict=True))
              if k == "results"}
    keys = {p.key() for p in problems} or None
    for i, res in list(loaded.items()):
        loaded[i] = res.restrict(keys, set(ms) if ms_given else None)
    todo = {p: list(layers) for p, layers in problems.items()}
    if len(loaded) == 2:
        ra, rb = loaded[0], loaded[1]
        if ra.label == rb.label:  # e.g. two builds' `default`: name them by file
            ra.label, rb.label = Path(a).stem, Path(b).stem
    elif not todo and loaded:  # the file decides what to measure
        ref = next(iter(loaded.values()))
        todo = {pb.problem: list(pb.layers) for pb in ref.problems}
        if not ms_given:
            ms = tuple(sorted({m for pb in ref.problems for m in pb.points}))
    return kinds, loaded, todo, ms
