"""`lookup(device, problem, workload)`: which KernelConfig a layer runs with, and why.

Resolution order (DESIGN, "Runtime"): explicit argument > ``GEMMTUNE_PROFILE`` file > tuning
database (``GEMMTUNE_DB`` or the default path) > built-in ``default`` preset. ``GEMMTUNE_DISABLE=1``
skips the profile and the database (an explicit argument is the caller's own code and still wins).

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

from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import WORKLOADS, Workload

PROFILE_ENV = "GEMMTUNE_PROFILE"
DB_ENV = "GEMMTUNE_DB"
DISABLE_ENV = "GEMMTUNE_DISABLE"

DB_LOCK_TIMEOUT_S = 1.0
"""How long a model load waits for a locked database before taking the defaults: a busy tuner
must not stall inference for the store's two-minute write timeout."""

SOURCES = ("argument", "profile", "database", "default")


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


# ------------------------------------------------------------------------------------------------
# process-wide state (cleared by clear_cache)
# ------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_CACHE: dict[tuple[Any, ...], LookupResult] = {}
_STORES: dict[str, Any] = {}  # url -> Store | None (None: unusable, warned)
_PROFILES: dict[str, _ProfileIndex | None] = {}
_INDEX: dict[tuple[str, str], list[Any]] = {}  # (url, fingerprint) -> that device's entries
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
# profiles
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProfileIndex:
    path: str
    fingerprint: str
    kernel_hash: str
    # problem key -> [(workload key, created_at iso, config)], newest first
    entries: dict[str, list[tuple[str, str, KernelConfig]]]


def _load_profile(path: str) -> _ProfileIndex | None:
    if path in _PROFILES:
        return _PROFILES[path]
    index: _ProfileIndex | None = None
    try:
        from gemmtune.db.profiles import read_profile
        from gemmtune.kernels.validate import KernelValidator

        prof = read_profile(Path(path).expanduser(), KernelValidator())
        by_problem: dict[str, list[tuple[str, str, KernelConfig]]] = {}
        for e in prof.entries:
            by_problem.setdefault(e.problem_key, []).append(
                (e.workload_key, e.created_at.isoformat(), KernelConfig.from_dict(e.config)))
        for lst in by_problem.values():
            lst.sort(key=lambda t: t[1], reverse=True)
        index = _ProfileIndex(path, str(prof.device.get("fingerprint", "")), prof.kernel_hash,
                              by_problem)
    except Exception as exc:  # ProfileError, OSError, anything: the model must still load
        _warn_once(f"profile:{path}", f"gemmtune: {PROFILE_ENV} profile is not usable, using "
                   f"the tuning database or defaults: {exc}")
    _PROFILES[path] = index
    return index


def _from_profile(path: str, fingerprint: str, problem_key: str,
                  workload_key: str | None) -> LookupResult | None:
    index = _load_profile(path)
    if index is None:
        return None
    if index.fingerprint != fingerprint:
        _warn_once(f"profile-device:{path}:{fingerprint}",
                   f"gemmtune: profile {path} was tuned on another device (fingerprint "
                   f"{index.fingerprint}, this one is {fingerprint}); not used")
        return None
    if index.kernel_hash != current_kernel_hash():
        _warn_once(f"profile-stale:{path}",
                   f"gemmtune: profile {path} was measured with another kernel build (hash "
                   f"{index.kernel_hash[:12]}, current {current_kernel_hash()[:12]}); stale "
                   "results are never used: re-tune or export a fresh profile")
        return None
    for wk, _created, config in index.entries.get(problem_key, ()):
        if workload_key is None or wk == workload_key:
            return LookupResult(config, "profile", path, wk)
    return None


# ------------------------------------------------------------------------------------------------
# database
# ------------------------------------------------------------------------------------------------


def _open_store(url: str) -> Any:
    """The read-only Store for `url`, opened once per process; None when unusable (warned)."""
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
                _warn_once(f"db:{url}", f"gemmtune: tuning database {path} ({DB_ENV}) does "
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


def _db_index(store: Any, url: str, fingerprint: str) -> list[Any]:
    """Every entry of this device in the database, read with one query per process: a model load
    resolves all its layers from memory (the stale flag is set against this build's hash)."""
    key = (url, fingerprint)
    got = _INDEX.get(key)
    if got is None:
        got = _INDEX[key] = list(store.list_results(fingerprint, current_kernel_hash()))
    return got


def _from_db(fingerprint: str, problem_key: str, workload_key: str | None) -> LookupResult | None:
    from gemmtune.db.paths import resolve_url

    url = resolve_url(None)
    store = _open_store(url)
    if store is None:
        return None
    try:
        entries = [e for e in _db_index(store, url, fingerprint) if e.problem_key == problem_key]
        served = [e for e in entries if not e.stale
                  and (workload_key is None or e.workload_key == workload_key)]
        if not served:
            if any(e.stale for e in entries) and not any(not e.stale for e in entries):
                _warn_once(f"db-stale:{url}",
                           f"gemmtune: the tuning database {_where(store)} holds results for "
                           "this device measured with another kernel build (stale, never "
                           "used); using default configs — re-run `gemmtune tune`")
            return None
        entry = max(served, key=lambda e: (e.created_at is not None, e.created_at))
        config = KernelConfig.from_dict(entry.config)
    except Exception as exc:  # DatabaseError mid-load, an entry this version cannot read, ...
        _warn_once(f"db:{url}", f"gemmtune: tuning database not usable, using default kernel "
                   f"configs: {exc}")
        _STORES[url] = None
        with contextlib.suppress(Exception):
            store.close()
        return None
    return LookupResult(config, "database", _where(store), entry.workload_key)


def _where(store: Any) -> str:
    try:
        from gemmtune.db.store import display_url

        return display_url(store.url)
    except Exception:
        return str(getattr(store, "url", "database"))


# ------------------------------------------------------------------------------------------------
# the lookup
# ------------------------------------------------------------------------------------------------


def lookup(device: DeviceInfo | str | None, problem: Problem,
           workload: Workload | str | None = None, *,
           config: KernelConfig | str | dict[str, Any] | None = None) -> LookupResult:
    """Resolve the config of `problem` on `device` (a DeviceInfo or its fingerprint).

    `workload`: None serves the most recent tuned entry of the problem, otherwise the entry tuned
    for exactly that workload (a Workload, a preset name or an ``m:w`` list). `config` (a
    KernelConfig, preset name or dict) is the explicit argument that wins over everything.
    `device=None` (no GPU) resolves to the default. Never raises for tuning-data problems; bad
    arguments (an unknown preset, a malformed workload) do raise.
    """
    if config is not None:
        return LookupResult(_as_config(config), "argument", "explicit config")
    wkey = _workload_key(workload)
    fingerprint = device.fingerprint if isinstance(device, DeviceInfo) else device
    pkey = problem.key()
    env = (os.environ.get(PROFILE_ENV, "").strip(), os.environ.get(DB_ENV, "").strip(),
           _disabled())
    key = (fingerprint, pkey, wkey, env)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        result = _resolve(fingerprint, pkey, wkey, env[0], env[2])
        _CACHE[key] = result
        return result


DECODE_MAX_M = max(WORKLOADS["decode"].ms)
"""Largest M of the `decode` workload: up to it a decode-tuned config serves (see lookup_split)."""


def lookup_split(device: DeviceInfo | str | None, problem: Problem, *,
                 config: KernelConfig | str | dict[str, Any] | None = None
                 ) -> tuple[LookupResult, LookupResult | None]:
    """(main, small) for a layer whose caller gave no workload: `small` serves M <= DECODE_MAX_M.

    One config per layer must serve token-by-token decode and prompt chunks alike, and the best
    kernel variant for M = 1 is rarely the best for M = 64. When this GPU has a config tuned for
    the `decode` workload *and* one tuned for a larger workload (`mixed`, then `prefill`, then the
    newest other entry), decode-sized calls use the first and the rest the second. Otherwise
    `small` is None and `main` is what `lookup(device, problem)` serves.
    """
    if config is not None:
        return lookup(device, problem, config=config), None
    small = lookup(device, problem, "decode")
    if small.source == "default":
        return lookup(device, problem), None
    for name in ("mixed", "prefill"):
        big = lookup(device, problem, name)
        if big.source != "default":
            return big, small
    newest = lookup(device, problem)
    if newest.source != "default" and newest.workload_key != small.workload_key:
        return newest, small
    return small, None


def _resolve(fingerprint: str | None, pkey: str, wkey: str | None, profile: str,
             disabled: bool) -> LookupResult:
    default = PRESETS["default"]
    if disabled:
        return LookupResult(default, "default", f"{DISABLE_ENV}=1")
    if not fingerprint:
        return LookupResult(default, "default", "no CUDA device")
    if profile:
        got = _from_profile(profile, fingerprint, pkey, wkey)
        if got is not None:
            return got
    got = _from_db(fingerprint, pkey, wkey)
    if got is not None:
        return got
    return LookupResult(default, "default", "not tuned")


@functools.cache
def device_info(index: int) -> DeviceInfo:
    """DeviceInfo of CUDA device `index`, queried once per process (used by QuantLinear)."""
    from gemmtune.kernels.device import query_device

    return query_device(index)
