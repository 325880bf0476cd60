"""`lookup(device, problem, workload)`: which KernelConfig a layer runs with, and why.

Resolution order (DESIGN, "Runtime"): explicit argument > ``GEMMTUNE_PROFILE`` file > tuning
database (``GEMMTUNE_DB`` or the default path) > built-in ``default`` preset. ``GEMMTUNE_DISABLE=1``
skips the profile and the database (an explicit argument is the caller's own code and still wins).
Which stored entry serves which Ms is decided by `gemmtune.db.resolve` (the one rule, shared with
bench, compare, show and `gemmtune resolve`); this module only gathers its inputs (the profile and
the database, each read once per process), caches its answers and turns trouble into warnings.

Why it is shaped like this:

- A model load resolves every layer, but a 70B model has only four distinct problems: results are
  cached per (device fingerprint, problem, workload, environment) in a module dict, the database is
  opened once per URL and a profile parsed once per path, so a load costs a handful of queries.
- Inference must never fail because of tuning data. A missing (explicitly named), read-only,
  locked, corrupt, future-schema or stale database, or an unreadable/foreign profile, yields the
  default config and ONE :class:`GemmtuneWarning` per reason per process, never an exception.
  A missing *default* database file just means nothing was tuned yet: that is silent.
- Stale results (another kernel hash) are never served: the store serves exactly the current
  hash, and profiles for another hash are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmtune.db.paths import ENV_VAR as DB_ENV
from gemmtune.db.resolve import SOURCES as SOURCES  # re-exported: LookupResult.source
from gemmtune.db.resolve import Band, Offer, Resolution
from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import WORKLOADS, Workload

PROFILE_ENV = "GEMMTUNE_PROFILE"
DISABLE_ENV = "GEMMTUNE_DISABLE"

DB_LOCK_TIMEOUT_S = 1.0
"""How long a model load waits for a locked database before taking the defaults: a busy tuner
must not stall inference for the store's two-minute write timeout."""


class GemmtuneWarning(UserWarning):
    """Tuning data could not be used; the layer runs with the default config instead."""


@dataclass(frozen=True)
class LookupResult:
    """A resolved config and where it came from.

    ``source`` is one of :data:`SOURCES`; ``detail`` names the profile path, database or the reason
    the default was taken; ``workload_key`` is the workload of the stored entry that was served.
    """

    config: KernelConfig
    source: str
    detail: str = ""
    workload_key: str | None = None

    @property
    def label(self) -> str:
        """``config-key (source)``, as extra_repr and patch reports print it."""
        return f"{self.config.key()} ({self.source})"

    @classmethod
    def of(cls, band: Band[KernelConfig]) -> LookupResult:
        return cls(band.config, band.source, band.detail, band.workload_key)


# ------------------------------------------------------------------------------------------------
# process-wide state (cleared by clear_cache)
# ------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_CACHE: dict[tuple[Any, ...], Resolution[KernelConfig]] = {}
_STORES: dict[str, Any] = {}  # url -> Store | None (None: unusable, warned)
_PROFILES: dict[str, Offer | None] = {}
_INDEX: dict[tuple[str, str], Offer] = {}  # (url, fingerprint) -> that device's entries
_WARNED: set[str] = set()


def clear_cache() -> None:
    """Forget every resolution, open database, parsed profile and issued warning (tests, or after
    tuning in the same process)."""
    with _LOCK:
        for store in _STORES.values():
            if store is not None:
                with contextlib.suppress(Exception):  # a broken store must not raise either
                    store.close()
        _STORES.clear()
        _CACHE.clear()
        _PROFILES.clear()
        _INDEX.clear()
        _WARNED.clear()
        current_kernel_hash.cache_clear()


def _warn_once(reason: str, message: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(message, GemmtuneWarning, stacklevel=4)


@functools.cache
def current_kernel_hash() -> str:
    """The kernel hash of this installation (sources + flags + compiler), computed once."""
    from gemmtune.kernels.sources import kernel_hash

    return kernel_hash()


def _build_hash(offers: list[Offer]) -> str:
    """The hash `offers` are judged against (`kernels.sources.build_hash`): this build's, or
    where NVRTC does not load the offered one that is these very sources. The offered hashes
    are a generator: only a machine without NVRTC walks the entries."""
    from gemmtune.kernels.sources import build_hash

    stored = (h for o in offers  # a profile's one hash covers all its entries
              for h in ((o.kernel_hash,) if o.kernel_hash else (e.kernel_hash for e in o.entries)))
    return build_hash(stored, here=current_kernel_hash())


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _workload_key(workload: Workload | str | None) -> str | None:
    if workload is None:
        return None
    if isinstance(workload, Workload):
        return workload.key()
    return Workload.parse(workload).key()


def _as_config(config: KernelConfig | str | dict[str, Any]) -> KernelConfig:
    if isinstance(config, KernelConfig):
        return config
    if isinstance(config, str):
        from gemmtune.kernels.config import preset

        return preset(config)
    return KernelConfig.from_dict(config)


# ------------------------------------------------------------------------------------------------
# where stored entries come from: a profile, the database (each read once per process)
# ------------------------------------------------------------------------------------------------


def _profile_offer(path: str) -> Offer | None:
    """The profile at `path` as an offer, parsed once per process; None when unusable (warned)."""
    if path in _PROFILES:
        return _PROFILES[path]
    offer: Offer | None = None
    try:
        from gemmtune.db.profiles import read_profile
        from gemmtune.kernels.validate import KernelValidator

        prof = read_profile(Path(path).expanduser(), KernelValidator())
        offer = Offer("profile", path, tuple(prof.entries), prof.fingerprint, prof.kernel_hash)
    except Exception as exc:  # ProfileError, OSError, anything: the model must still load
        _warn_once(f"profile:{path}", f"gemmtune: {PROFILE_ENV} profile is not usable, using "
                   f"the tuning database or defaults: {exc}")
    _PROFILES[path] = offer
    return offer


def _open_store(url: str, from_env: bool = True) -> Any:
    """The read-only Store for `url`, opened once per process; None when unusable (warned;
    the warning names ``GEMMTUNE_DB`` only when `url` came from it)."""
    if url in _STORES:
        return _STORES[url]
    store = None
    try:
        from gemmtune.db.errors import DatabaseError, SchemaUpgradeRequiredError
        from gemmtune.db.paths import default_url, sqlite_path
        from gemmtune.db.store import Store

        path = sqlite_path(url)
        if path is not None and not path.exists():
            if url != default_url():
                origin = f" ({DB_ENV})" if from_env else ""
                _warn_once(f"db:{url}", f"gemmtune: tuning database {path}{origin} does "
                           "not exist; using default kernel configs")
            # The default file missing just means nothing was tuned on this machine yet.
            _STORES[url] = None
            return None
        try:
            store = Store.open(url, readonly=True, lock_timeout_s=DB_LOCK_TIMEOUT_S)
        except SchemaUpgradeRequiredError as exc:
            _warn_once(f"db:{url}", f"gemmtune: {exc}; run `gemmtune show` once to upgrade "
                       "it. Using default kernel configs")
            store = None
        except DatabaseError as exc:
            _warn_once(f"db:{url}", f"gemmtune: tuning database not usable, using default "
                       f"kernel configs: {exc}")
            store = None
    except Exception as exc:  # driver missing, anything unexpected: never fail the load
        _warn_once(f"db:{url}", f"gemmtune: tuning database {url} not usable, using default "
                   f"kernel configs: {type(exc).__name__}: {exc}")
        store = None
    _STORES[url] = store
    return store


def _db_offer(url: str, fingerprint: str, from_env: bool = True) -> Offer | None:
    """Every entry of this device in the database, read with one query per process: a model load
    resolves all its layers from memory. None when the database is unusable (warned)."""
    store = _open_store(url, from_env)
    if store is None:
        return None
    key = (url, fingerprint)
    got = _INDEX.get(key)
    if got is None:
        try:
            entries = tuple(store.list_results(fingerprint, current_kernel_hash()))
        except Exception as exc:  # DatabaseError mid-load, an entry this version cannot read, ...
            _warn_once(f"db:{url}", f"gemmtune: tuning database not usable, using default kernel "
                       f"configs: {exc}")
            _STORES[url] = None
            with contextlib.suppress(Exception):
                store.close()
            return None
        got = _INDEX[key] = Offer("database", _where(store), entries)
    return got


def _where(store: Any) -> str:
    try:
        from gemmtune.db.store import display_url

        return display_url(store.url)
    except Exception:
        return str(getattr(store, "url", "database"))


def _warn_skips(res: Resolution[Any], fingerprint: str) -> None:
    """One warning per reason for stored data the resolver passed over."""
    defaulted = any(b.source == "default" for b in res.bands)
    for s in res.skipped:
        if s.kind == "profile" and s.entry is None:
            if s.reason == "device":
                _warn_once(f"profile-device:{s.where}:{fingerprint}",
                           f"gemmtune: profile {s.where} was {s.detail}; not used")
            else:
                _warn_once(f"profile-stale:{s.where}",
                           f"gemmtune: profile {s.where} was {s.detail}; stale results are never "
                           "used: re-tune or export a fresh profile")
        elif s.kind == "database" and s.reason == "stale" and defaulted:
            _warn_once(f"db-stale:{s.where}",
                       f"gemmtune: the tuning database {s.where} holds results for this device "
                       "measured with another kernel build (stale, never used); using default "
                       "configs — re-run `gemmtune tune`")


# ------------------------------------------------------------------------------------------------
# the lookup
# ------------------------------------------------------------------------------------------------


def resolve(device: DeviceInfo | str | None, problem: Problem,
            workload: Workload | str | None = None, *,
            config: KernelConfig | str | dict[str, Any] | None = None, split: bool = True,
            profile: str | None = None, db_url: str | None = None) -> Resolution[KernelConfig]:
    """The M bands `problem` runs with on `device` (a DeviceInfo or its fingerprint), each with
    its config and source: `gemmtune.db.resolve` over the profile (`profile`, else
    ``GEMMTUNE_PROFILE``) and the database (`db_url`, else ``GEMMTUNE_DB``, else the default
    file). Resolved once per process per question. Never raises for tuning-data problems (they
    are warned once and the default serves); bad arguments (an unknown preset, a malformed
    workload) do raise. `split=False` with no workload: one band, the newest entry."""
    if config is not None:
        cfg = _as_config(config)
        return Resolution((Band(1, None, cfg, "argument", "explicit config"),))
    wkey = _workload_key(workload)
    fingerprint = device.fingerprint if isinstance(device, DeviceInfo) else device
    profile = os.environ.get(PROFILE_ENV, "").strip() if profile is None else profile
    db_env = os.environ.get(DB_ENV, "").strip() if db_url is None else db_url
    key = (fingerprint, problem.key(), wkey, split, profile, db_env, _disabled())
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _CACHE[key] = _resolve(fingerprint, problem.key(), wkey, split, profile,
                                         db_url)
        return hit


def _resolve(fingerprint: str | None, pkey: str, wkey: str | None, split: bool, profile: str,
             db_url: str | None) -> Resolution[KernelConfig]:
    """`db_url` as the caller gave it: None reads ``GEMMTUNE_DB`` (and a refusal names it)."""
    default = PRESETS["default"]
    if _disabled():  # the runtime's own switch, not a rule of picking entries
        return Resolution((Band(1, None, default, "default", f"{DISABLE_ENV}=1"),))
    offers: list[Offer] = []
    if fingerprint:
        from gemmtune.db.paths import resolve_url

        got = _profile_offer(profile) if profile else None
        if got is not None:
            offers.append(got)
        from gemmtune.db.errors import DatabaseError

        try:
            url: str | None = resolve_url(db_url)
        except DatabaseError as exc:  # a value GEMMTUNE_DB cannot mean (paths.py lists them)
            what = os.environ.get(DB_ENV, "") if db_url is None else db_url
            _warn_once(f"db-url:{what}", f"gemmtune: {exc}; using default kernel configs")
            url = None
        got = _db_offer(url, fingerprint, db_url is None) if url is not None else None
        if got is not None:
            offers.append(got)
    from gemmtune.db.resolve import resolve as resolve_bands

    try:
        res = resolve_bands(offers, fingerprint, _build_hash(offers), pkey, wkey,
                            default=default.to_dict(), split=split).map(KernelConfig.from_dict)
    except GemmtuneError as exc:  # an entry this version cannot read: never fail the load
        _warn_once(f"entry:{pkey}", f"gemmtune: a stored config for {pkey} is not usable, using "
                   f"the default: {exc}")
        return Resolution((Band(1, None, default, "default", "stored config not usable"),))
    if fingerprint:
        _warn_skips(res, fingerprint)
    return res


def lookup(device: DeviceInfo | str | None, problem: Problem,
           workload: Workload | str | None = None, *,
           config: KernelConfig | str | dict[str, Any] | None = None) -> LookupResult:
    """Resolve the one config of `problem` on `device` (a DeviceInfo or its fingerprint).

    `workload`: None serves the most recent tuned entry of the problem, otherwise the entry tuned
    for exactly that workload (a Workload, a preset name or an ``m:w`` list). `config` (a
    KernelConfig, preset name or dict) is the explicit argument that wins over everything.
    `device=None` (no GPU) resolves to the default. Never raises for tuning-data problems; bad
    arguments (an unknown preset, a malformed workload) do raise.

    A stored plan over M bands answers with its last band, the entry's `config` (its
    `max_q_gemm_rows` is the plan's reconstruct edge): the one config a caller of this
    single-config API can use for every M. `resolve` gives every band (what QuantLinear runs).
    """
    return LookupResult.of(resolve(device, problem, workload, config=config, split=False).bands[-1])


DECODE_MAX_M = max(WORKLOADS["decode"].ms)
"""Largest M of the `decode` workload: up to it a decode-tuned config serves (see lookup_split)."""


def lookup_split(device: DeviceInfo | str | None, problem: Problem, *,
                 config: KernelConfig | str | dict[str, Any] | None = None
                 ) -> tuple[LookupResult, LookupResult | None]:
    """(main, small) for a layer whose caller gave no workload: the last and the first of the
    M bands of `resolve(device, problem)`, `small` None when there is one band.

    The two-band view from before plans over M bands (a decode entry below a larger workload's:
    then `small` serves M <= DECODE_MAX_M). With a tuned plan there may be more bands, and the
    ones between the first and the last are not in this view: ask `resolve` for the bands
    (what QuantLinear runs). Kept for callers of the two-band API.
    """
    bands = resolve(device, problem, config=config).bands
    if len(bands) == 1:
        return LookupResult.of(bands[0]), None
    return LookupResult.of(bands[-1]), LookupResult.of(bands[0])


@functools.cache
def device_info(index: int) -> DeviceInfo:
    """DeviceInfo of CUDA device `index`, queried once per process (used by QuantLinear)."""
    from gemmtune.kernels.device import query_device

    return query_device(index)
