"""`gemmtune resolve`: what each layer shape of a model will run with on a card, before loading it.

No GPU is needed: the card is named by its fingerprint (or found in the database or profile),
and the answer is exactly the runtime's (`lookup.resolve`, the one resolver behind it), with
the warnings a model load would print collected instead of printed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmtune.db.resolve import Resolution
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.errors import GemmtuneError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload

from .lookup import GemmtuneWarning, clear_cache, resolve

_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Card:
    """The card resolved for: its fingerprint, a name when known, and how it was found."""

    fingerprint: str
    name: str = ""
    found: str = ""


@dataclass(frozen=True)
class LayerAnswer:
    problem: Problem
    layers: tuple[str, ...]
    resolution: Resolution[KernelConfig]


@dataclass
class Explanation:
    card: Card
    kernel_hash: str
    workload: str | None
    answers: list[LayerAnswer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _known_devices(db_url: str | None, profile: str) -> list[dict[str, Any]]:
    """Cards the database and the profile know (unreadable sources just know none)."""
    found: dict[str, dict[str, Any]] = {}
    try:
        from gemmtune.db.store import Store

        with Store.open(db_url, readonly=True) as store:
            for d in store.devices():
                found.setdefault(d["fingerprint"], d)
    except Exception:  # a broken database is reported by the resolution's warnings
        pass
    if profile:
        try:
            from gemmtune.db.profiles import read_profile
            from gemmtune.kernels.validate import KernelValidator

            dev = read_profile(Path(profile).expanduser(), KernelValidator()).device
            found.setdefault(dev["fingerprint"], dev)
        except Exception:
            pass
    return sorted(found.values(), key=lambda d: (d.get("name", ""), d["fingerprint"]))


def find_card(spec: str | None, db_url: str | None, profile: str) -> Card:
    """`spec` (a fingerprint, its prefix, or part of a card's name among the cards the database
    and profile know; a full unknown fingerprint is taken as is), else this machine's GPU 0,
    else the one card the database and profile know."""
    known = _known_devices(db_url, profile)
    if spec:
        s = spec.strip().lower()
        hits = [d for d in known if d["fingerprint"] == s] or \
               [d for d in known if d["fingerprint"].startswith(s) or s in d.get("name", "").lower()]
        if len(hits) == 1:
            return Card(hits[0]["fingerprint"], hits[0].get("name", ""), "--fingerprint")
        if not hits and _FINGERPRINT.match(s):
            return Card(s, "", "--fingerprint")
        names = "; ".join(f"{d.get('name', '?')} {d['fingerprint']}" for d in (hits or known))
        raise GemmtuneError(f"--fingerprint {spec!r} matches {len(hits)} known card(s)"
                            + (f" ({names})" if names else "")
                            + ("" if hits else "; give the 16-hex fingerprint `gemmtune devices` shows"))
    from gemmtune.kernels.device import device_count, query_device

    if device_count() > 0:
        d = query_device(0)
        return Card(d.fingerprint, d.name, "GPU 0")
    if len(known) == 1:
        return Card(known[0]["fingerprint"], known[0].get("name", ""), "the only tuned card")
    if not known:
        raise GemmtuneError("no GPU here and no tuned card in the database or profile: give "
                            "--fingerprint (as `gemmtune devices` shows it on that machine)")
    names = "; ".join(f"{d.get('name', '?')} {d['fingerprint']}" for d in known)
    raise GemmtuneError(f"{len(known)} cards are tuned ({names}): pick one with --fingerprint")


def explain(problems: Mapping[Problem, Sequence[str]], card: Card, *,
            workload: Workload | str | None = None, profile: str = "",
            db_url: str | None = None) -> Explanation:
    """The runtime's resolution of every problem on `card`, and the warnings it gave."""
    from gemmtune.db.paths import resolve_url

    from .lookup import current_kernel_hash

    wkey = workload.key() if isinstance(workload, Workload) else workload
    out = Explanation(card, current_kernel_hash(), wkey)
    clear_cache()  # answer from the files as they are now, and warn again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GemmtuneWarning)
        for problem, layers in problems.items():
            res = resolve(card.fingerprint, problem, workload, profile=profile,
                          db_url=resolve_url(db_url))
            out.answers.append(LayerAnswer(problem, tuple(layers), res))
    clear_cache()
    out.warnings = [str(w.message) for w in caught if issubclass(w.category, GemmtuneWarning)]
    return out
