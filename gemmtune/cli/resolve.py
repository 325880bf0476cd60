"""`gemmtune resolve`: the M bands a model gets on a card and where each band's config comes from."""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from gemmtune.cli._common import (
    _age,
    _config_short,
    _db_option,
    _friendly,
    _shape_options,
    _table,
    _tune_problems,
    console,
    err_console,
    fail,
)

_RESOLVE_EPILOG = """\b
Examples:
  gemmtune resolve --model llama-2-13b                   # this GPU, or the one tuned card
  gemmtune resolve --model llama-2-70b --fingerprint 2c0ad6e0 --db tuning.db
  gemmtune resolve --model llama-3-8b --layout fused     # an engine's fused qkv / gate_up shapes
  gemmtune resolve --shape 4096x4096 --profile h100.json --json

\b
As a model load would (QuantLinear without a workload): explicit config > profile
($GEMMTUNE_PROFILE or --profile) > database > default; a decode-tuned entry serves M up to 8
beside a larger workload's entry. Stale entries (another kernel build) are listed, never used.
"""


def _check_named_profile(path: str) -> None:
    """A profile named with --profile is one the user asked for: one that cannot be read is an
    error naming the option (as a bad --db is), not the load-time fallback to the database with
    a GEMMTUNE_PROFILE warning. The environment's profile keeps the runtime's behaviour, which
    `resolve` reports as a model load would meet it."""
    from pathlib import Path

    from gemmtune.cli.db import _profile_validator
    from gemmtune.db.errors import ProfileError
    from gemmtune.db.profiles import read_profile

    try:
        read_profile(Path(path).expanduser(), _profile_validator())
    except ProfileError as exc:
        fail(f"--profile: {exc}")


def _band_source(band: Any) -> str:
    """Where a band's config came from, in words (the file or database a stored entry came
    from is named once, under the table: a path on every row would not fit 80 columns)."""
    if band.entry is None:
        return f"{band.source} ({band.detail})"
    e = band.entry
    return f"{band.source}: {e.workload_key} entry, {_age(e.created_at)} old"


def _resolve_json(ex: Any) -> dict[str, Any]:
    def band(b: Any) -> dict[str, Any]:
        e = b.entry
        return {"m_lo": b.m_lo, "m_hi": b.m_hi, "config": b.config.to_dict(),
                "config_key": b.config.key(), "source": b.source, "detail": b.detail,
                "workload": b.workload_key,
                "created_at": e.created_at.isoformat() if e is not None and e.created_at else None}

    def skip(s: Any) -> dict[str, Any]:
        return {"source": s.kind, "where": s.where, "reason": s.reason, "detail": s.detail,
                "workload": None if s.entry is None else s.entry.workload_key}

    return {"format": "gemmtune-resolve", "card": {"fingerprint": ex.card.fingerprint,
                                                   "name": ex.card.name, "found": ex.card.found},
            "kernel_hash": ex.kernel_hash, "workload": ex.workload,
            # path "dense reference": no CUDA kernel for these bits, so no band applies
            "layers": [{"problem": a.problem.to_dict(), "problem_key": a.problem.key(),
                        "layers": list(a.layers),
                        "path": "kernel" if a.problem.has_kernel else "dense reference",
                        "bands": [band(b) for b in a.resolution.bands] if a.problem.has_kernel else [],
                        "skipped": [skip(s) for s in a.resolution.skipped]}
                       for a in ex.answers],
            "warnings": list(ex.warnings)}


@click.command("resolve", epilog=_RESOLVE_EPILOG)
@_shape_options
@click.option("--workload", "workload_text", default=None, metavar="decode|prefill|mixed|M:W,…",
              help="Resolve for layers loaded with this workload [default: none, as `patch` loads "
                   "them: the M bands of the decode/larger split].")
@click.option("--fingerprint", "fingerprint_spec", metavar="F",
              help="The card: a fingerprint, its prefix or part of a tuned card's name [default: "
                   "GPU 0 here, else the one card the database and profile know].")
@click.option("--profile", "profile_path", metavar="PATH", envvar="GEMMTUNE_PROFILE",
              default="", help="A profile to consult before the database; named here, one "
                               "that cannot be read is an error [default: $GEMMTUNE_PROFILE, "
                               "used as a model load uses it].")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_friendly
def resolve_cmd(model: str | None, config_path: str | None, layout: str, shapes: tuple[str, ...],
                bits: str | None, group: str | None, act_order: bool | None,
                workload_text: str | None, fingerprint_spec: str | None, profile_path: str,
                db_url: str | None, as_json: bool) -> None:
    """Show, per layer shape, the M bands a model gets on a card and where each band's config
    comes from: profile, database entry (workload, age), or the default, and any stale entry
    skipped. No GPU needed."""
    import json

    from rich.markup import escape

    from gemmtune.kernels.workload import Workload
    from gemmtune.runtime.explain import explain, find_card

    problems = _tune_problems(model, config_path, layout, shapes, int(bits) if bits else None,
                              int(group) if group else None, act_order, "resolve")
    workload = Workload.parse(workload_text) if workload_text else None
    if profile_path.strip() and click.get_current_context().get_parameter_source(
            "profile_path") is ParameterSource.COMMANDLINE:
        _check_named_profile(profile_path)
    card = find_card(fingerprint_spec, db_url, profile_path)
    ex = explain(problems, card, workload=workload, profile=profile_path, db_url=db_url)
    if as_json:
        click.echo(json.dumps(_resolve_json(ex), indent=2))
        return
    table = _table(f"{card.name or 'card'} · fingerprint {card.fingerprint} ({card.found}) · "
                   f"kernel {ex.kernel_hash[:12]}", "shape (layers)~", "M", "config (from)")
    where: dict[str, str] = {}  # "database" / "profile": the one it names
    for a in ex.answers:
        name = a.problem.key() + (f"\n[dim]{escape(', '.join(a.layers))}[/]" if a.layers else "")
        if not a.problem.has_kernel:
            # What the runtime runs for it at every M; a band's config would never apply.
            table.add_row(name, "all", f"dense reference\n[dim]no CUDA kernel for {a.problem.bits}-bit "
                                       "weights: dequantized once, then torch's matmul[/]")
            continue
        for i, b in enumerate(a.resolution.bands):
            if b.entry is not None:
                where[b.source] = b.detail
            # where it came from under the config, not in a column of its own: at 80 columns
            # a fourth column would leave a few characters a line for either
            table.add_row(name if i == 0 else "", b.span,
                          f"{_config_short(b.config)}\n[dim]{escape(_band_source(b))}[/]")
        for sk in a.resolution.skipped:
            where[sk.kind] = sk.where
            # In brief (the full reason is in the warnings and --json): what, and why.
            what = "all" if sk.entry is None else f"{sk.entry.workload_key} entry"
            why = {"stale": "another kernel build", "device": "another card"}.get(sk.reason,
                                                                                 sk.reason)
            table.add_row("", "", f"[yellow]skipped[/] [dim]{escape(f'{sk.kind}: {what}, {why}')}[/]")
    console.print(table)
    if where:
        console.print("; ".join(f"{kind}: {escape(path)}" for kind, path in where.items()),
                      highlight=False, soft_wrap=True, style="dim")
    for w in ex.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
