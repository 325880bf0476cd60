"""The database commands: `show`, `export`, `import` and `doctor`."""

from __future__ import annotations

import os
from typing import Any

import click

from gemmtune import __version__
from gemmtune.cli._common import (
    CONFIG_LEGEND,
    _age,
    _config_short,
    _db_option,
    _friendly,
    _table,
    console,
    err_console,
    fail,
)
from gemmtune.kernels.errors import GemmtuneError


def _open_for_reading(db_url: str | None) -> Any:
    """Read-only open (nothing is created or changed); an older schema is upgraded when the file
    allows it, since every later command would do the same."""
    from gemmtune.db.errors import DatabaseReadOnlyError, SchemaUpgradeRequiredError
    from gemmtune.db.store import Store

    try:
        return Store.open(db_url, readonly=True)
    except SchemaUpgradeRequiredError:
        try:
            return Store.open(db_url)
        except DatabaseReadOnlyError as exc:  # say why a reading command wanted to write
            raise DatabaseReadOnlyError(f"{exc}; it is at an older schema revision, which is "
                                        "upgraded once before it can be read") from None


def _profile_validator() -> Any:
    from gemmtune.kernels.validate import KernelValidator

    return KernelValidator()


def _config_label(config: dict[str, Any], full: bool = False) -> str:
    """A stored config as the tables spell it (`_config_short`), or its full key (`full`);
    one this build cannot read is listed field by field."""
    from gemmtune.kernels import KernelConfig

    try:
        cfg = KernelConfig.from_dict(config)
    except GemmtuneError:
        return ",".join(f"{k}={v}" for k, v in sorted(config.items()))
    return cfg.key() if full else _config_short(cfg)


def _device_label(device: dict[str, Any]) -> str:
    from rich.markup import escape

    return escape(f"{device['name']} ({device['fingerprint'][:8]})")


@click.command()
@_db_option
@click.option("--device", "device_spec", metavar="FP|NAME",
              help="Only this device: fingerprint (prefix) or part of the name.")
@click.option("--stale/--no-stale", "include_stale", default=True, show_default=True,
              help="Include stale entries (measured with another kernel build; never served).")
@click.option("--keys", "full_keys", is_flag=True,
              help="Instead of the tables, one tab-separated line per band with the config's "
                   "full key (fingerprint, shape, workload, Ms, key, and `stale` if so): for "
                   "copying and scripts.")
@_friendly
def show(db_url: str | None, device_spec: str | None, include_stale: bool,
         full_keys: bool) -> None:
    """Show what is tuned: per device, each shape and workload with its plan (the M bands and
    each band's config), speedup vs the default, age, and the Ms it serves."""
    from rich.markup import escape

    from gemmtune.db.entry import band_spans
    from gemmtune.db.profiles import select_device
    from gemmtune.db.resolve import Band, serving
    from gemmtune.db.store import display_url
    from gemmtune.kernels.sources import build_hash

    with _open_for_reading(db_url) as store:
        where = escape(display_url(store.url))
        current = build_hash(store.kernel_hashes())
        entries = store.list_results(current_kernel_hash=current)
        serves = serving(entries, current)
        if device_spec is not None:
            fps = {d["fingerprint"] for d in select_device(store, device_spec)}
            if not fps:
                fail(f"no tuned device matches {device_spec!r} in {display_url(store.url)}")
            entries = [e for e in entries if e.device_fingerprint in fps]
    hidden = 0
    if not include_stale:
        hidden = sum(e.stale for e in entries)
        entries = [e for e in entries if not e.stale]
    if full_keys:
        for e in entries:
            for lo, hi, cfg in band_spans(e.plan):
                click.echo("\t".join([e.device_fingerprint, e.problem_key, e.workload_key,
                                      Band(lo, hi, cfg, "").span, _config_label(cfg, full=True)]
                                     + (["stale"] if e.stale else [])))
        return
    if not entries:
        if hidden:
            console.print(f"no current entries in {where}: {hidden} stale "
                          f"{'entry' if hidden == 1 else 'entries'} hidden by --no-stale",
                          highlight=False, soft_wrap=True)
        else:
            console.print(f"nothing tuned yet in {where} (run `gemmtune tune` or `gemmtune import`)",
                          highlight=False, soft_wrap=True)
        return
    by_device: dict[str, list[Any]] = {}
    for e in entries:
        by_device.setdefault(e.device_fingerprint, []).append(e)
    for group in by_device.values():
        d = group[0].device
        # Four columns, so that a plan's configs fit 80 columns unwrapped: what describes the
        # entry (workload, age, the Ms it serves, notes) stands under its shape.
        table = _table(f"{d['name']} (sm_{d['compute_capability'].replace('.', '')}, "
                       f"{d['sm_count']} SMs) · fingerprint {d['fingerprint']}",
                       "shape~", "M", "config", "speedup>")
        for e in group:
            band = serves.get(id(e))
            about = [escape(e.problem_key),
                     f"[dim]{escape(e.workload_key)} · {_age(e.created_at)} old[/]"]
            if e.stale:
                about.append("[yellow]stale[/]")
            else:
                about.append(f"[dim]serves {band.span if band is not None else 'no M'}[/]")
            if e.source == "imported":
                about.append("[dim]imported[/]")
            spans = band_spans(e.plan)
            table.add_row("\n".join(about),
                          "\n".join(Band(lo, hi, cfg, "").span for lo, hi, cfg in spans),
                          "\n".join(_config_label(cfg) for _lo, _hi, cfg in spans),
                          f"{e.speedup:.2f}×", end_section=True)
        console.print(table)
        console.print()
    console.print(f"database {where}; speedup = default's objective / tuned objective over the "
                  "workload; serves = the Ms a layer loaded without a workload runs this entry "
                  f"for (`gemmtune resolve` shows a model's); {CONFIG_LEGEND}; `--keys` prints "
                  "the full keys", highlight=False, soft_wrap=True, style="dim")
    n_stale = sum(e.stale for e in entries)
    if n_stale:
        console.print(f"{n_stale} stale entr{'y' if n_stale == 1 else 'ies'}: measured with another "
                      f"kernel build (this one is {current[:12]}), listed but never served; "
                      "re-tune or import with --force.", highlight=False, soft_wrap=True)


@click.command()
@_db_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write to FILE instead of stdout.")
@click.option("--device", "device_spec", metavar="FP|NAME",
              help="Device to export: fingerprint (prefix) or part of the name. Needed for JSON "
                   "when the database holds several.")
@click.option("--format", "fmt", type=click.Choice(["json", "header"]), default="json",
              show_default=True, help="json: a profile for `gemmtune import`; header: C #defines.")
@click.option("--kernel-hash", "kernel_hash_opt", metavar="HASH", default=None,
              help="Export entries of this kernel hash (prefix). Default: this build's hash if the "
                   "device has entries for it, else the device's newest.")
@_friendly
def export(db_url: str | None, output: str | None, device_spec: str | None, fmt: str,
           kernel_hash_opt: str | None) -> None:
    """Export tuned configs as a profile (JSON) or a C header."""
    from rich.markup import escape

    from gemmtune.db.header import render_header
    from gemmtune.db.profiles import build_profile, select_device
    from gemmtune.db.store import display_url, tool_version
    from gemmtune.kernels.sources import build_hash

    with _open_for_reading(db_url) as store:
        current = build_hash(store.kernel_hashes())
        devices = select_device(store, device_spec)
        if not devices:
            # fail() escapes rich markup itself: give it the plain text.
            fail(f"nothing to export: no tuned device in {display_url(store.url)}"
                 + (f" matches {device_spec!r}" if device_spec else ""))
        if fmt == "json" and len(devices) > 1:
            names = "; ".join(f"{d['name']} {d['fingerprint']}" for d in devices)
            fail(f"{len(devices)} devices match ({names}): pick one with --device")
        profiles = [build_profile(store, d, current_kernel_hash=current,
                                  kernel_hash=kernel_hash_opt) for d in devices]
    text = profiles[0].dumps() if fmt == "json" else render_header(profiles, tool_version=tool_version())
    if output is None or output == "-":
        click.echo(text, nl=False)
    else:
        from gemmtune.autotune.results import write_text_atomically

        write_text_atomically(output, text)
    for prof in profiles:
        note = "" if prof.kernel_hash == current else " [yellow](stale for this build)[/]"
        err_console.print(
            f"exported {len(prof.entries)} entr{'y' if len(prof.entries) == 1 else 'ies'} of "
            f"{_device_label(prof.device)}, kernel hash {prof.kernel_hash[:12]}{note}"
            + (f" to {escape(output)}" if output and output != "-" else ""), highlight=False,
            soft_wrap=True)


@click.command("import")
@click.argument("file", type=click.Path(path_type=str))
@_db_option
@click.option("--replace", is_flag=True,
              help="Overwrite local entries for the same device, kernel hash, shape and workload "
                   "(default: local entries win).")
@click.option("--force", is_flag=True,
              help="Entries measured with another kernel hash are stored under this build's hash "
                   "and served (default: imported as stale, never served).")
@click.option("--dry-run", is_flag=True, help="Validate the profile and report; write nothing.")
@_friendly
def import_cmd(file: str, db_url: str | None, replace: bool, force: bool, dry_run: bool) -> None:
    """Import a profile exported on an identical machine. Every field is validated before
    anything is written; the import is one transaction."""
    from pathlib import Path

    from rich.markup import escape

    from gemmtune.db.profiles import import_profile, read_profile
    from gemmtune.db.store import Store, display_url
    from gemmtune.kernels.sources import build_hash

    profile = read_profile(file, _profile_validator())
    current = build_hash([profile.kernel_hash])
    if dry_run:
        with _open_for_reading(db_url) as store:
            where = escape(display_url(store.url))
    else:
        with Store.open(db_url) as store:
            where = escape(display_url(store.url))
            report = import_profile(store, profile, current_kernel_hash=current, replace=replace,
                                    force=force, source_name=Path(file).name)
    n = len(profile.entries)
    what = f"{n} entr{'y' if n == 1 else 'ies'} of {_device_label(profile.device)}"
    if dry_run:
        console.print(f"{escape(file)}: valid profile, {what}, kernel hash {profile.kernel_hash[:12]}"
                      f"{'' if profile.kernel_hash == current else ' (differs from this build)'}; "
                      "nothing written (--dry-run)", highlight=False, soft_wrap=True)
        return
    # "imported" counts only what was written: an entry that was already there and stayed
    # (local entries win without --replace) is "kept", never "imported".
    r = report.result
    written = r.added + r.replaced
    counts = f"{r.added} added, {r.replaced} replaced, {r.kept} kept"
    kept_note = " (local entries win; --replace overwrites them)" if r.kept else ""
    if written:
        console.print(f"imported {written} of {what} into {where}: {counts}{kept_note}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"nothing imported into {where}: {counts} of {what}{kept_note}",
                      highlight=False, soft_wrap=True)
    if report.stale:
        err_console.print(
            f"[yellow]warning:[/] the profile's kernel hash {report.profile_kernel_hash[:12]} is not "
            f"this build's {current[:12]}: its entries are stored as stale and will not be served "
            "(re-import with --force to serve them anyway)", highlight=False, soft_wrap=True)
    elif report.forced and written:
        err_console.print(
            f"[yellow]note:[/] kernel hash {report.profile_kernel_hash[:12]} differs from this "
            f"build's {current[:12]}; --force stored the entries under this build's hash",
            highlight=False, soft_wrap=True)


@click.command()
@_db_option
@_friendly
def doctor(db_url: str | None) -> None:
    """Check the installation: database location, schema version, writability, stale entries,
    CUDA / CuPy / NVRTC and the GPUs seen. Exits 1 when the database is unusable."""
    from rich.markup import escape

    from gemmtune.db.errors import DatabaseError
    from gemmtune.db.migrate import head_revision
    from gemmtune.db.paths import ENV_VAR, resolve_url
    from gemmtune.db.store import display_url
    from gemmtune.kernels.sources import NO_COMPILER, build_hash, compiler_version, kernel_hash

    # Plain "label  value" lines rather than a table: paths stay whole (copyable) at any
    # terminal width, and the output pastes cleanly into a bug report.
    def row(label: str, value: str, good: bool | None = None) -> None:
        mark = {True: "[green]ok[/] ", False: "[red]problem[/] ", None: ""}[good]
        console.print(f"{label:<13} {mark}{value}", highlight=False, soft_wrap=True)

    origin = ("--db" if db_url and db_url.strip()
              else ENV_VAR if os.environ.get(ENV_VAR, "").strip() else "default")
    row("gemmtune", __version__)
    current = kernel_hash()
    db_error: str | None = None
    try:
        url = resolve_url(db_url)
        row("database", f"{escape(display_url(url))}  [dim]({origin})[/]")
        with _open_for_reading(db_url) as store:
            rev, head = store.revision, head_revision()
            if rev is None:
                row("schema", f"none yet (created on first write; this code is at {head})")
            else:
                row("schema", f"{rev} ({'current' if rev == head else 'code head is ' + head})")
            writable, why = store.is_writable()
            row("writable", "" if writable else escape(why), writable)
            entries = store.list_results(current_kernel_hash=build_hash(store.kernel_hashes()))
            n_stale = sum(e.stale for e in entries)
            row("entries", f"{len(entries)} ({n_stale} stale)")
    except DatabaseError as exc:
        db_error = str(exc)
        row("database", "unusable (see below)", False)
    row("kernel hash", current if compiler_version() != NO_COMPILER else
        f"{current} (no NVRTC here: stored results count as current when they were measured "
        "with these sources and flags under any NVRTC version)")

    try:
        import torch

        cuda = torch.cuda.is_available()
        row("CUDA (torch)", f"CUDA {torch.version.cuda}" if cuda
            else f"not available (torch {torch.__version__})", True if cuda else None)
    except ImportError:
        cuda = False
        row("CUDA (torch)", "torch is not installed", False)
    try:
        import cupy

        row("CuPy", cupy.__version__, True)
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        row("CuPy", f"missing ({type(exc).__name__})")
    nvrtc = compiler_version()
    row("NVRTC", nvrtc if nvrtc != "unknown" else "not found", True if nvrtc != "unknown" else None)
    gpus: list[str] = []
    if cuda:
        from gemmtune.kernels.device import device_count, query_device

        try:
            gpus = [f"{d.name} ({d.fingerprint})" for d in
                    (query_device(i) for i in range(device_count()))]
        except GemmtuneError as exc:
            gpus = [f"error: {exc}"]
    row("GPUs", escape("; ".join(gpus)) if gpus else "none")
    if db_error:
        fail(db_error)
