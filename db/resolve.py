"""The one answer to "which stored config serves this layer at this M on this card".

The runtime (`gemmtune.runtime.lookup`), `bench`/`compare` (`tuned` and profiles), `show` and
`resolve` all ask `resolve`; nobody else picks among stored entries. It needs only plain data
(this layer of the code does not know the kernel objects): the stored entries in the order they
are asked (`Offer`s: a profile file, then the database), a device fingerprint, a kernel hash, a
problem key and an optional workload preference.

The answer is a list of M bands `(m_lo, m_hi, config, source)` covering every M from 1 up. A
stored entry is itself a plan over M bands (`TunedEntry.plan`: one band for an entry tuned
before plans existed), and its bands become the answer's. When a layer's caller names no
workload and the card has an entry tuned for `decode` *beside* one tuned for a larger workload
(`mixed`, then `prefill`, then the newest other), the two plans are merged at the decode
workload's largest M (the edge): the decode entry's bands clipped to M 1..edge, then the larger
entry's bands clipped to M edge+1.., because the best kernel variant for M = 1 is rarely the
best for M = 64 and the decode entry measured those Ms itself. Otherwise one entry's plan
serves every M. Clipping drops bands left empty and shortens the rest; a clipped band keeps
its config (so a decode entry's last band, which may reconstruct above its threshold, still
does at the Ms it keeps).

The rules, in one place:

- Each pick (one workload preference) asks the offers in order and takes the first that has a
  usable entry for the problem; of several, the most recently created. A profile that is as a
  whole of another card or another kernel build is skipped (with the reason); in a database,
  entries of another kernel build are *stale*: skipped, never served.
- `workload_key` given: exactly that workload's entry, else the default (one band).
- No workload and `split`: the decode/larger split above; `split=False`: the newest entry.
- Nothing usable: one band with the caller's default config, source `default`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

C = TypeVar("C")
D = TypeVar("D")

SOURCES = ("argument", "profile", "database", "default")
"""Where a band's config came from, in the order they win."""

DECODE = "decode"
"""The workload whose entry serves the small-M band beside a larger workload's entry."""

LARGER = ("mixed", "prefill")
"""Workloads preferred (in this order) for the band above decode; then the newest other."""

SKIP_REASONS = ("device", "stale")
"""Why stored data was passed over: tuned on another card, or measured by another kernel build."""


class Entry(Protocol):
    """What the resolver reads of a stored entry (a `TunedEntry`)."""

    problem_key: str
    workload_key: str
    workload: dict[str, Any]
    config: dict[str, int]
    kernel_hash: str
    created_at: datetime | None

    @property
    def device_fingerprint(self) -> str: ...

    @property
    def plan(self) -> tuple[tuple[int | None, dict[str, int]], ...]: ...


@dataclass(frozen=True)
class Offer:
    """Stored entries from one place, asked in order: a profile (`kind="profile"`) or a database.

    A profile holds one card and one kernel build: give them as `fingerprint`/`kernel_hash` and
    the profile is checked as a whole. Without them each entry is checked on its own fields."""

    kind: str
    where: str
    entries: Sequence[Any]
    fingerprint: str | None = None
    kernel_hash: str | None = None


@dataclass(frozen=True)
class Skip:
    """Stored data passed over: `reason` is one of SKIP_REASONS; `entry` None means a whole
    profile was passed over."""

    kind: str
    where: str
    reason: str
    detail: str
    entry: Any = None


@dataclass(frozen=True)
class Band(Generic[C]):
    """Ms `m_lo..m_hi` (`m_hi` None: no upper edge) run with `config`, from `source`."""

    m_lo: int
    m_hi: int | None
    config: C
    source: str
    detail: str = ""
    """The profile path or database that served it, or why the default was taken."""
    entry: Any = None
    """The stored entry that served it (None for an argument or the default)."""

    @property
    def workload_key(self) -> str | None:
        return None if self.entry is None else str(self.entry.workload_key)

    @property
    def created_at(self) -> datetime | None:
        return None if self.entry is None else self.entry.created_at

    def covers(self, m: int) -> bool:
        return self.m_lo <= m and (self.m_hi is None or m <= self.m_hi)

    @property
    def span(self) -> str:
        """`M 1-8`, `M >= 9`, `every M`: for reports."""
        if self.m_hi is None:
            return "every M" if self.m_lo <= 1 else f"M >= {self.m_lo}"
        return f"M {self.m_lo}" if self.m_lo == self.m_hi else f"M {self.m_lo}-{self.m_hi}"

    def with_config(self, convert: Callable[[C], D]) -> Band[D]:
        return Band(self.m_lo, self.m_hi, convert(self.config), self.source, self.detail,
                    self.entry)


@dataclass(frozen=True)
class Resolution(Generic[C]):
    """The bands of one layer, in M order and covering every M >= 1, and what was skipped."""

    bands: tuple[Band[C], ...]
    skipped: tuple[Skip, ...] = field(default_factory=tuple)

    def band_at(self, m: int) -> Band[C]:
        for band in self.bands:
            if band.covers(m):
                return band
        raise ValueError(f"M={m} is not covered by any band")  # bands cover every M >= 1

    def config_at(self, m: int) -> C:
        return self.band_at(m).config

    def map(self, convert: Callable[[C], D]) -> Resolution[D]:
        """The same bands with each config converted (plain dict -> `KernelConfig`)."""
        return Resolution(tuple(b.with_config(convert) for b in self.bands), self.skipped)

    def split(self, ms: Iterable[int]) -> list[tuple[Band[C], tuple[int, ...]]]:
        """`ms` grouped by the band that serves them (bands without any M left out)."""
        out = []
        ms = sorted(set(ms))
        for band in self.bands:
            mine = tuple(m for m in ms if band.covers(m))
            if mine:
                out.append((band, mine))
        return out


def _newest(entries: Iterable[Any]) -> Any | None:
    """The most recently created entry (the first of equals; undated entries lose)."""
    best = None
    for e in entries:
        if best is None or _age_key(e) > _age_key(best):
            best = e
    return best


def _age_key(e: Any) -> tuple[bool, datetime | int]:
    return (e.created_at is not None, e.created_at or 0)


class _Picker:
    """Asks the offers for one problem, recording what it passes over (once per item)."""

    def __init__(self, offers: Sequence[Offer], fingerprint: str, kernel_hash: str,
                 problem_key: str) -> None:
        self.fingerprint, self.kernel_hash = fingerprint, kernel_hash
        self.skipped: list[Skip] = []
        self._usable: list[tuple[Offer, list[Any]]] = []
        for offer in offers:
            self._usable.append((offer, self._admit(offer, problem_key)))

    def _skip(self, skip: Skip) -> None:
        if skip not in self.skipped:
            self.skipped.append(skip)

    def _admit(self, offer: Offer, problem_key: str) -> list[Any]:
        fp, kh = self.fingerprint, self.kernel_hash
        if offer.fingerprint is not None and offer.fingerprint != fp:
            self._skip(Skip(offer.kind, offer.where, "device",
                            f"tuned on another card (fingerprint {offer.fingerprint}, this one "
                            f"is {fp})"))
            return []
        if offer.kernel_hash is not None and offer.kernel_hash != kh:
            self._skip(Skip(offer.kind, offer.where, "stale",
                            f"measured with another kernel build (hash {offer.kernel_hash[:12]}, "
                            f"current {kh[:12]})"))
            return []
        out = []
        for e in offer.entries:
            if e.problem_key != problem_key:
                continue
            if offer.fingerprint is None and e.device_fingerprint != fp:
                continue  # another card's entry is not this card's answer (nor its skip)
            if offer.kernel_hash is None and e.kernel_hash != kh:
                self._skip(Skip(offer.kind, offer.where, "stale",
                                f"{e.workload_key} entry measured with another kernel build "
                                f"(hash {e.kernel_hash[:12]}, current {kh[:12]})", e))
                continue
            out.append(e)
        return out

    def pick(self, workload_key: str | None) -> tuple[Offer, Any] | None:
        """The first offer's newest entry for `workload_key` (None: any workload)."""
        for offer, entries in self._usable:
            e = _newest(x for x in entries if workload_key is None or x.workload_key == workload_key)
            if e is not None:
                return offer, e
        return None


def _bands(m_lo: int, m_hi: int | None, got: tuple[Offer, Any]) -> list[Band[dict[str, int]]]:
    """The entry's plan clipped to Ms `m_lo..m_hi` (None: no upper edge)."""
    offer, entry = got
    out = []
    lo = 1
    for hi, config in entry.plan:
        a = max(lo, m_lo)
        b = hi if m_hi is None else (m_hi if hi is None else min(hi, m_hi))
        if b is None or a <= b:
            out.append(Band(a, b, dict(config), offer.kind, offer.where, entry))
        if hi is None or (m_hi is not None and hi >= m_hi):
            break
        lo = hi + 1
    return out


def _top_m(entry: Any) -> int:
    """Largest M an entry was tuned for: the upper edge of the band it serves."""
    return max(int(m) for m in entry.workload["ms"])


def resolve(
    offers: Sequence[Offer],
    fingerprint: str | None,
    kernel_hash: str,
    problem_key: str,
    workload_key: str | None = None,
    *,
    default: Mapping[str, int],
    default_detail: str = "not tuned",
    argument: Mapping[str, int] | None = None,
    split: bool = True,
) -> Resolution[dict[str, int]]:
    """The bands that serve `problem_key` on the card `fingerprint` with kernel build
    `kernel_hash` (see the module docstring for the rules). `argument`, when given, is the
    caller's explicit config and wins over everything; `default` serves what nothing else does
    (`default_detail` says why). No fingerprint (no GPU) resolves to the default."""
    if argument is not None:
        return Resolution((Band(1, None, dict(argument), "argument", "explicit config"),))
    if not fingerprint:
        return Resolution((Band(1, None, dict(default), "default", "no CUDA device"),))
    picker = _Picker(offers, fingerprint, kernel_hash, problem_key)

    def done(*bands: Band[dict[str, int]]) -> Resolution[dict[str, int]]:
        return Resolution(bands, tuple(picker.skipped))

    def one(got: tuple[Offer, Any] | None) -> Resolution[dict[str, int]]:
        return done(*_bands(1, None, got)) if got else done(fallback)

    fallback = Band(1, None, dict(default), "default", default_detail)
    if workload_key is not None or not split:
        return one(picker.pick(workload_key))
    small = picker.pick(DECODE)
    if small is None:
        return one(picker.pick(None))
    big = next((got for got in map(picker.pick, LARGER) if got is not None), None)
    if big is None:
        newest = picker.pick(None)
        big = newest if newest is not None and newest[1].workload_key != DECODE else None
    if big is None:
        return one(small)
    edge = _top_m(small[1])
    return done(*_bands(1, edge, small), *_bands(edge + 1, None, big))


def serving(entries: Sequence[Any], kernel_hash: str, where: str = "database"
            ) -> dict[int, Band[dict[str, int]]]:
    """For listings (`show`): of database `entries` (any devices and problems), the Ms each
    entry serves a layer that names no workload, as one band spanning them (an entry's served
    bands are contiguous), keyed by `id(entry)`; entries absent from the result serve nothing
    (stale, or passed over for another entry)."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for e in entries:
        groups.setdefault((e.device_fingerprint, e.problem_key), []).append(e)
    out: dict[int, Band[dict[str, int]]] = {}
    for (fp, pkey), group in groups.items():
        res = resolve([Offer("database", where, group)], fp, kernel_hash, pkey, default={})
        for band in res.bands:
            if band.entry is None:
                continue
            first = out.get(id(band.entry))
            out[id(band.entry)] = band if first is None else Band(
                first.m_lo, band.m_hi, band.config, band.source, band.detail, band.entry)
    return out
