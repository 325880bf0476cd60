"""The `gemmtune` command line (click + rich).

Why one file of ~1100 lines: it holds only option declarations (each once: `_shape_options`,
`_problem_options`, `_db_option`) and rendering (rich tables, the one-line errors) for twelve
commands; the product logic lives with its owner (`autotune.session.tune_or_report`,
`autotune.sources.compare_inputs`, `runtime.explain`, `db.resolve`). Splitting the commands
into a `gemmtune/cli/` package is a pure move left for after issue 9, which edits `import` and
`compare` here at the same time.

Errors a user can cause end as one red line and a non-zero exit, never a traceback: every command
body runs under `_friendly`, which turns `GemmtuneError` (and the few OS errors a bad path gives)
into that line. Heavy imports (torch, CuPy, SQLAlchemy, Optuna) happen inside the commands so
`gemmtune --help` stays instant.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from gemmtune import __version__
from gemmtune.kernels.errors import GemmtuneError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print one clear error line and exit non-zero."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _friendly_exit(code: int) -> Callable[[F], F]:
    """Run a command body so that every error a user can cause is one line and exit `code`:
    `GemmtuneError`, the database layer's `DatabaseError` / `ProfileError` (not GemmtuneErrors:
    db may not import kernels), and the OS errors a bad path gives."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from gemmtune.db.errors import DatabaseError, ProfileError

            try:
                return func(*args, **kwargs)
            except (GemmtuneError, DatabaseError, ProfileError) as exc:
                # An error may carry its own exit code (UnsupportedFormatError: 2).
                fail(str(exc), getattr(exc, "exit_code", code))
            except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
                fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), code)
            except KeyboardInterrupt:
                fail("interrupted", 130)

        return wrapper  # type: ignore[return-value]

    return decorate


_friendly = _friendly_exit(1)
"""Most commands: an error exits 1 (`compare` keeps 1 for "regression found" and exits 2)."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gemmtune")
def main() -> None:
    """Tune 4/8-bit GPTQ GEMM kernels for this GPU and keep the results.

    \b
    Typical use:
      gemmtune devices                       # what GPUs are here
      gemmtune tune --model llama-3-8b       # once per machine (minutes)
      gemmtune show                          # what is tuned
      gemmtune export -o h100.json           # share with identical machines
      gemmtune import h100.json              # ... on the other machine

    The database lives at the platform's user-data dir (see `gemmtune doctor`);
    override with --db URL or GEMMTUNE_DB.
    """


# ---------------------------------------------------------------------------------------------
# devices / kernels
# ---------------------------------------------------------------------------------------------


@main.command()
@_friendly
def devices() -> None:
    """List the CUDA GPUs visible here with their tuning fingerprint."""
    from rich.table import Table

    from gemmtune.kernels.device import device_count, query_device

    n = device_count()
    if n == 0:
        fail("no CUDA GPU is visible on this machine")
    table = Table(title="CUDA devices")
    for col in ("#", "name", "cc", "SMs", "memory", "driver", "fingerprint"):
        table.add_column(col)
    for i in range(n):
        d = query_device(i)
        table.add_row(str(i), d.name, d.compute_capability, str(d.sm_count),
                      f"{d.memory_bytes / 2**30:.0f} GiB", d.driver_version, d.fingerprint)
    console.print(table)


@main.group()
def kernels() -> None:
    """Inspect and statically build the CUDA kernels."""


@kernels.command("check")
@click.option("--arch", default="sm_90", show_default=True,
              help="Comma-separated targets, e.g. sm_80,sm_86,sm_89,sm_90.")
@click.option("--bits", default="4,8", show_default=True, help="Bit widths to build.")
@click.option("--jobs", "-j", type=int, default=os.cpu_count() or 1, show_default=True,
              help="Parallel nvcc processes.")
@click.option("--quick", is_flag=True, help="Build only the preset and a corner sample of the space.")
@_friendly
def kernels_check(arch: str, bits: str, jobs: int, quick: bool) -> None:
    """Build every kernel variant with nvcc (no GPU needed) and report registers, spills and
    shared memory. Exits 1 on any build failure or spill."""
    from gemmtune.kernels.buildcheck import run_check

    ok = run_check(
        archs=[a.strip() for a in arch.split(",") if a.strip()],
        bits=[int(b) for b in bits.split(",") if b.strip()],
        jobs=jobs,
        quick=quick,
        console=console,
    )
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# database commands: show / export / import / doctor   (db area)
# ---------------------------------------------------------------------------------------------

# (db commands are added below this line)

_DB_HELP = ("Tuning database: a SQLAlchemy URL (sqlite:///…, postgresql+psycopg://…) or a file path. "
            "Default: $GEMMTUNE_DB, else the user-data path (see `gemmtune doctor`).")


def _db_option(func: F) -> F:
    return click.option("--db", "db_url", metavar="URL", default=None, help=_DB_HELP)(func)  # type: ignore[return-value]


def _open_for_reading(db_url: str | None) -> Any:
    """Read-only open (nothing is created or changed); an older schema is upgraded when the file
    allows it, since every later command would do the same."""
    from gemmtune.db.errors import SchemaUpgradeRequiredError
    from gemmtune.db.store import Store

    try:
        return Store.open(db_url, readonly=True)
    except SchemaUpgradeRequiredError:
        return Store.open(db_url)


def _profile_validator() -> Any:
    from gemmtune.kernels.validate import KernelValidator

    return KernelValidator()


def _config_label(config: dict[str, Any]) -> str:
    from gemmtune.kernels import KernelConfig

    try:
        return KernelConfig.from_dict(config).key()
    except GemmtuneError:
        return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


def _age(created: Any) -> str:
    from datetime import UTC, datetime

    if created is None:
        return "?"
    seconds = max(0.0, (datetime.now(UTC) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _device_label(device: dict[str, Any]) -> str:
    from rich.markup import escape

    return escape(f"{device['name']} ({device['fingerprint'][:8]})")


def _table(title: str, *columns: str) -> Any:
    """A left-titled table; a column name ending in `>` is right-aligned, in `~` may wrap
    (folded), any other never wraps."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD)
    for col in columns:
        name = col.rstrip(">~")
        if col.endswith("~"):
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right" if col.endswith(">") else "left", no_wrap=True)
    return table


@main.command()
@_db_option
@click.option("--device", "device_spec", metavar="FP|NAME",
              help="Only this device: fingerprint (prefix) or part of the name.")
@click.option("--stale/--no-stale", "include_stale", default=True, show_default=True,
              help="Include stale entries (measured with another kernel build; never served).")
@_friendly
def show(db_url: str | None, device_spec: str | None, include_stale: bool) -> None:
    """Show what is tuned: device, shape, workload, config, speedup vs the default, age, stale."""
    from rich.markup import escape

    from gemmtune.db.profiles import select_device
    from gemmtune.db.resolve import serving
    from gemmtune.db.store import display_url
    from gemmtune.kernels.sources import kernel_hash

    current = kernel_hash()
    with _open_for_reading(db_url) as store:
        where = escape(display_url(store.url))
        entries = store.list_results(current_kernel_hash=current)
        serves = serving(entries, current)
        if device_spec is not None:
            fps = {d["fingerprint"] for d in select_device(store, device_spec)}
            if not fps:
                fail(f"no tuned device matches {escape(repr(device_spec))} in {where}")
            entries = [e for e in entries if e.device_fingerprint in fps]
    if not include_stale:
        entries = [e for e in entries if not e.stale]
    if not entries:
        console.print(f"nothing tuned yet in {where} (run `gemmtune tune` or `gemmtune import`)",
                      highlight=False, soft_wrap=True)
        return
    by_device: dict[str, list[Any]] = {}
    for e in entries:
        by_device.setdefault(e.device_fingerprint, []).append(e)
    for group in by_device.values():
        d = group[0].device
        table = _table(f"{d['name']} (sm_{d['compute_capability'].replace('.', '')}, "
                       f"{d['sm_count']} SMs) · fingerprint {d['fingerprint']}",
                       "shape", "workload", "config~", "speedup>", "age>", "serves", "note~")
        for e in group:
            notes = [n for n in ("imported" if e.source == "imported" else "",
                                 "[yellow]stale[/]" if e.stale else "") if n]
            band = serves.get(id(e))
            table.add_row(e.problem_key, e.workload_key, _config_label(e.config),
                          f"{e.speedup:.2f}×", _age(e.created_at),
                          band.span if band is not None else "–", ", ".join(notes))
        console.print(table)
    console.print(f"database {where}; speedup = default's objective / tuned objective over the "
                  "workload; serves = the Ms a layer loaded without a workload runs this entry "
                  "for (`gemmtune resolve` shows a model's)", highlight=False, soft_wrap=True,
                  style="dim")
    n_stale = sum(e.stale for e in entries)
    if n_stale:
        console.print(f"{n_stale} stale entr{'y' if n_stale == 1 else 'ies'}: measured with another "
                      f"kernel build (this one is {current[:12]}), listed but never served; "
                      "re-tune or import with --force.", highlight=False, soft_wrap=True)


@main.command()
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
    from gemmtune.kernels.sources import kernel_hash

    current = kernel_hash()
    with _open_for_reading(db_url) as store:
        where = escape(display_url(store.url))
        devices = select_device(store, device_spec)
        if not devices:
            fail(f"nothing to export: no tuned device in {where}"
                 + (f" matches {escape(repr(device_spec))}" if device_spec else ""))
        if fmt == "json" and len(devices) > 1:
            names = escape("; ".join(f"{d['name']} {d['fingerprint']}" for d in devices))
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


@main.command("import")
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
    from gemmtune.kernels.sources import kernel_hash

    profile = read_profile(file, _profile_validator())
    current = kernel_hash()
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
    elif report.forced:
        err_console.print(
            f"[yellow]note:[/] kernel hash {report.profile_kernel_hash[:12]} differs from this "
            f"build's {current[:12]}; --force stored the entries under this build's hash",
            highlight=False, soft_wrap=True)


@main.command()
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
    from gemmtune.kernels.sources import compiler_version, kernel_hash

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
            entries = store.list_results(current_kernel_hash=current)
            n_stale = sum(e.stale for e in entries)
            row("entries", f"{len(entries)} ({n_stale} stale)")
    except DatabaseError as exc:
        db_error = str(exc)
        row("database", "unusable (see below)", False)
    row("kernel hash", current)

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


# ---------------------------------------------------------------------------------------------
# tune   (autotune area)
# ---------------------------------------------------------------------------------------------

# (tune is added below this line)

_TUNE_EPILOG = """\b
Examples:
  gemmtune tune --model llama-3-8b                     # every layer shape of the model, mixed workload
  gemmtune tune --config ./Llama-3-8B-GPTQ/config.json # shapes and bits/group from the checkpoint
  gemmtune tune --shape 4096x4096 --shape 4096x14336 --bits 4 --group 128
  gemmtune tune --model llama-2-70b --workload decode --trials 100
  gemmtune tune --model mistral-7b --workload 1:8,2:4,16:1,512:0.5
  gemmtune tune --model llama-3-8b --sampler grid      # exhaustive: the true optimum of the space
  gemmtune tune --model llama-3-8b --device all        # one worker per GPU, one database
  gemmtune tune --model llama-3-8b --db postgresql+psycopg://tuner@db/gemmtune   # share with a fleet

\b
Workloads (the objective is the weighted sum of per-M latencies):
  decode   M = 1..8, equal weights            prefill  M = 128..2048, equal weights
  mixed    1..512, mostly decode (default)    1,2,4    these Ms, equal weights
  1:4,512:1  these Ms with these weights

\b
Each (GPU model, kernel build, shape, workload) is one Optuna study in the database: an
interrupted run (Ctrl-C, a crash) resumes where it stopped, and --trials is the total.
Shapes already tuned for this GPU and kernel build are skipped unless --retune.
"""


def _shape_options(func: F) -> F:
    """--model/--config/--shape/--bits/--group/--act-order: which layer shapes (tune, bench,
    compare and resolve spell them alike)."""
    opts = [
        click.option("--model", metavar="NAME|PATH",
                     help="Model preset (llama-3-8b, llama-2-70b, mistral-7b, qwen2.5-7b, …) or a "
                          "folder / config.json."),
        click.option("--config", "config_path", metavar="PATH",
                     help="A Hugging Face config.json (its quantization_config supplies "
                          "bits/group/act-order)."),
        click.option("--shape", "shapes", metavar="KxN", multiple=True,
                     help="An explicit layer shape, K = in_features (repeatable)."),
        click.option("--bits", type=click.Choice(["4", "8"]), default=None,
                     help="Weight bits [default: from the config, else 4]."),
        click.option("--group", type=click.Choice(["-1", "32", "64", "128"]), default=None,
                     help="GPTQ group size, -1 = per column [default: from the config, else 128]."),
        click.option("--act-order/--no-act-order", default=None,
                     help="GPTQ act-order (desc_act) weights [default: from the config, else off]."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _tune_problems(model: str | None, config_path: str | None, shapes: tuple[str, ...],
                   bits: int | None, group: int | None, act_order: bool | None,
                   what: str = "tune") -> Any:
    """Distinct problems to tune, each with the layer names that use it (first-seen order)."""
    from gemmtune.autotune.models import model_layers, shape_layers

    layers = []
    for source in (model, config_path):
        if source:
            layers += model_layers(source, bits, group, act_order)
    if shapes:
        layers += shape_layers(shapes, bits if bits is not None else 4,
                               group if group is not None else 128, bool(act_order))
    if not layers:
        fail(f"nothing to {what}: give --model NAME, --config PATH/config.json or --shape KxN")
    names: dict[Any, list[str]] = {}
    for layer in layers:
        names.setdefault(layer.problem, []).append(f"{layer.name}×{layer.count}")
    return names


def _config_short(config: Any) -> str:
    """Compact config spelling for the table: threshold, rows per block, tile, split-K, unroll,
    reconstruct chunk (spaces let it wrap in a narrow terminal)."""
    c = config
    return (f"≤{c.max_q_gemm_rows} fused, {c.max_q_gemm_rows_kernel} rows, {c.block_n}x{c.threads} "
            f"sk{c.split_k} u{c.k_unroll} rc{c.recon_chunk_n}")


def _tune_table(title: str, results: list[Any], layer_names: dict[Any, list[str]]) -> Any:
    from rich import box
    from rich.table import Table

    style = {"accepted": "green", "skipped": "cyan", "rejected": "yellow", "interrupted": "yellow",
             "no-result": "red", "error": "red", "pending": "dim"}
    label = {"accepted": "tuned", "rejected": "default kept", "skipped": "stored"}
    table = Table(title=title, box=box.SIMPLE_HEAD, caption="µs: weighted sum of per-M latencies; "
                  "default = built-in config, re-measured interleaved with the tuned one")
    table.add_column("shape (layers)", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("default", "tuned", "speedup"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("config", overflow="fold", min_width=14)
    for r in results:
        speed = r.speedup
        layers = ", ".join(layer_names.get(r.problem, []))
        table.add_row(
            r.problem.key() + (f"\n[dim]{layers}[/]" if layers else ""),
            f"[{style.get(r.status, '')}]{label.get(r.status, r.status)}[/]"
            + (f"\n[dim]{r.trials} trials[/]" if r.trials else ""),
            f"{r.default_us:.1f}" if r.default_us is not None else "–",
            f"{r.tuned_us:.1f}" if r.tuned_us is not None else "–",
            f"{speed:.2f}×" if speed else "–",
            _config_short(r.config) if r.config is not None else "–",
        )
    return table


@main.command(epilog=_TUNE_EPILOG)
@_shape_options
@click.option("--workload", "workload_text", default="mixed", show_default=True,
              metavar="decode|prefill|mixed|M,M|M:W,…", help="Which Ms to optimise for, with weights.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Total trials per shape, earlier sessions included [default: 60; grid: the whole space].")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Stop searching a shape after this long (its best so far is still checked and stored).")
@click.option("--sampler", type=click.Choice(["tpe", "gp", "random", "grid"]), default="tpe",
              show_default=True, help="tpe: model-based, good in few trials; gp: Gaussian process, "
              "best per trial, slower to ask; random; grid: every variant (exhaustive).")
@click.option("--space", "space_name", type=click.Choice(["standard", "full"]), default="standard",
              show_default=True, help="standard: 360 kernel variants; full: every valid choice (2916).")
@click.option("--device", "device_spec", default="0", show_default=True, metavar="N|all",
              help="GPU index, or `all`: one worker process per GPU sharing the database.")
@_db_option
@click.option("--retune", is_flag=True, help="Tune shapes that already have a result (a finished "
              "search starts over; an unfinished one resumes).")
@click.option("--seed", type=int, default=None, help="Sampler seed (reproducible proposals).")
@_friendly
def tune(model: str | None, config_path: str | None, shapes: tuple[str, ...], bits: str | None,
         group: str | None, act_order: bool | None, workload_text: str, trials: int | None,
         timeout_s: float | None, sampler: str, space_name: str, device_spec: str,
         db_url: str | None, retune: bool, seed: int | None) -> None:
    """Search kernel parameters for each layer shape on this GPU and store the winners.

    Per shape, the sampler proposes kernel variants; for each, the fused/reconstruct threshold
    (MAX_Q_GEMM_ROWS) is chosen exactly from per-M timings. The best is re-measured against
    the default, interleaved, and stored only if it is not slower. Ctrl-C stops after the trial
    in flight and keeps every finished trial; run the same command again to resume.
    """
    from gemmtune.autotune import study as st
    from gemmtune.db.errors import DatabaseError
    from gemmtune.kernels.workload import Workload

    workload = Workload.parse(workload_text)
    problems = _tune_problems(model, config_path, shapes, int(bits) if bits else None,
                              int(group) if group else None, act_order)
    n_gpus = st.gpu_count()
    if n_gpus == 0:
        fail("no CUDA GPU is visible here: tuning times kernels on a GPU (check `gemmtune devices`)")
    if device_spec.strip().lower() == "all":
        gpus = list(range(n_gpus))
    else:
        try:
            gpus = [int(device_spec)]
        except ValueError:
            fail(f"--device must be a GPU index or `all`, got {device_spec!r}")
        if not 0 <= gpus[0] < n_gpus:
            fail(f"GPU {gpus[0]} does not exist ({n_gpus} visible: 0..{n_gpus - 1})")
    settings = st.TuneSettings(sampler=sampler, space=space_name, trials=trials,
                               timeout_s=timeout_s, seed=seed)
    try:
        _run_tune(list(problems), problems, workload, settings, gpus, db_url, retune)
    except DatabaseError as exc:
        fail(str(exc))


def _run_tune(order: list[Any], layer_names: dict[Any, list[str]], workload: Any, settings: Any,
              gpus: list[int], db_url: str | None, retune: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gemmtune.autotune import session as ss
    from gemmtune.autotune import study as st
    from gemmtune.autotune import workers as wk
    from gemmtune.db.errors import DatabaseError
    from gemmtune.db.store import Store, display_url

    # GPUs of one fingerprint are interchangeable: each group tunes every shape once.
    groups: dict[str, list[int]] = {}
    for g in gpus:
        groups.setdefault(st.device_identity(g)[0].fingerprint, []).append(g)
    group_of = {g: gi for gi, members in enumerate(groups.values()) for g in members}

    store = Store.open(db_url)  # creates/migrates the database; Optuna's tables join it
    url = store.url
    results: dict[tuple[int, int], Any] = {}
    flag = ss.StopFlag()
    n = len(order)
    where = ("GPUs " + ",".join(map(str, gpus))) if len(gpus) > 1 else f"GPU {gpus[0]}"
    console.print(f"tuning {n} shape{'s' * (n != 1)} for workload [bold]{workload.key()}[/] on "
                  f"{where} ({settings.sampler}, {settings.space} space) → {display_url(url)}",
                  highlight=False)

    def best_line(e: Any) -> str:
        if e.best_us is None:
            return "no successful trial yet"
        line = f"best {e.best_us:.1f} µs"
        if e.default_us:
            line += f" vs default {e.default_us:.1f} µs ({e.default_us / e.best_us:.2f}×)"
        return line

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    interrupted = False
    try:
        with ss.graceful_sigint(flag, on_first=lambda: console.print(
                "[yellow]stopping after the trial in flight (Ctrl-C again to abort it)…[/]")), progress:
            if len(gpus) == 1:
                shapes_task = progress.add_task("shapes", total=n, note="")
                trial_task = progress.add_task("trials", total=None, note="")
                for i, problem in enumerate(order):
                    if flag():
                        break
                    progress.update(shapes_task, completed=i,
                                    note=f"shape {i + 1} of {n}: {problem.key()}")
                    progress.reset(trial_task, total=None, note="")

                    def on_trial(e: Any) -> None:
                        progress.update(trial_task, completed=e.finished, total=e.target,
                                        note=best_line(e))

                    results[0, i] = ss.tune_or_report(
                        store, url, problem, workload, settings, device_index=gpus[0],
                        retune=retune, stop=flag, on_trial=on_trial, fatal=(DatabaseError,))
                    if results[0, i].status == "skipped":
                        progress.update(trial_task, total=1, completed=1, note="already tuned")
                    progress.update(shapes_task, completed=i + 1)
            else:
                job = wk.WorkerJob(url, tuple(order), workload, settings, retune)
                tasks = {g: progress.add_task(f"GPU {g}", total=None, note="starting") for g in gpus}

                def on_event(ev: Any) -> None:
                    if ev.kind == "start":
                        progress.reset(tasks[ev.gpu], total=None,
                                       note=f"shape {ev.index + 1} of {n}: {order[ev.index].key()}")
                    elif ev.kind == "trial":
                        e = ev.payload
                        progress.update(tasks[ev.gpu], completed=e.finished, total=e.target,
                                        note=f"{order[ev.index].key()}: {best_line(e)}")
                    elif ev.kind == "result":
                        results[group_of[ev.gpu], ev.index] = ev.payload
                    elif ev.kind == "error":
                        console.print(f"[red]GPU {ev.gpu} worker failed:[/] {ev.payload}",
                                      highlight=False)
                    elif ev.kind == "exit":
                        progress.update(tasks[ev.gpu], note="done")

                wk.run_workers(job, list(groups.values()), on_event, flag)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        store.close()
    interrupted = interrupted or flag()

    for gi, members in enumerate(groups.values()):
        rows = [results.get((gi, i)) or ss.ProblemResult(p, "pending", device_index=members[0])
                for i, p in enumerate(order)]
        title = f"workload {workload.key()}"
        if len(groups) > 1:
            title += f" — GPU {','.join(map(str, members))}"
        console.print(_tune_table(title, rows, layer_names))
        for r in rows:
            if r.message and r.status not in ("accepted", "skipped", "pending"):
                console.print(f"  {r.problem.key()}: {r.message}", highlight=False)
    skipped = sum(r.status == "skipped" for r in results.values())
    if skipped:
        console.print(f"{skipped} shape{'s were' if skipped != 1 else ' was'} already tuned for this "
                      "GPU and kernel build (status `stored`) and not searched again; --retune does "
                      "that.", highlight=False)
    if interrupted:
        console.print("[yellow]interrupted:[/] every finished trial is kept; run the same command "
                      "again to resume.", highlight=False)
        sys.exit(130)
    if any(r.status in ("error", "no-result", "pending") for r in results.values()) or \
            len(results) < n * len(groups):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# bench / compare
# ---------------------------------------------------------------------------------------------

# (bench and compare are added below this line)

_BENCH_EPILOG = """\b
SOURCE is one of:
  default, exllamav2-0.0.11, exllamav2-0.0.12   a built-in preset
  tuned                                        this GPU's entries in the tuning database (--db)
  PROFILE.json                                 a profile written by `gemmtune export`
  RESULTS.json                                 a results file of `gemmtune bench -o` (shown, not measured)

\b
Examples:
  gemmtune bench default --model llama-3-8b -o default.json
  gemmtune bench tuned --model llama-2-70b --m 1,2,4,8 -o tuned.json
  gemmtune bench exllamav2-0.0.12 --shape 8192x8192 --workload decode
"""

_COMPARE_EPILOG = """\b
A and B are sources as for `gemmtune bench`. Two sources are measured now, interleaved
A B A B on the same card; two results files are compared without a GPU; a results file and a
source: the source is measured here on the file's shapes and Ms.

\b
Regression rule, per (shape, M):  B/A > 1 + threshold  and  B - A > spread A + spread B
(spread = interquartile range of the repeats). Exit status: 0 no regression, 1 regression,
2 any error (bad option or file, unusable source or database, no GPU, --plot without
matplotlib), reported before anything is measured: usable as a CI gate.

\b
Examples:
  gemmtune compare exllamav2-0.0.11 exllamav2-0.0.12 --model llama-2-70b --plot cmp.png
  gemmtune compare exllamav2-0.0.12 tuned --model llama-3-8b --report cmp.md
  gemmtune compare main.json pr.json --threshold 5%      # CI: results of two builds
"""


def _problem_options(func: F) -> F:
    """The shapes (as `tune` spells them), the Ms, the tuned workload, the GPU and the database
    of `bench` and `compare`."""
    opts = [
        _shape_options,
        click.option("--m", "m_text", metavar="M,M,…", default=None,
                     help="Ms to measure: a list (1,2,4), weighted Ms (weights ignored) or a "
                          "workload name [default: 1,2,3,4,6,8,12,16,24,32,48,64,128,256,512]."),
        click.option("--workload", "workload_text", type=click.Choice(["decode", "prefill", "mixed"]),
                     default=None, help="Measure the Ms of this workload instead of --m."),
        click.option("--tuned-workload", metavar="KEY", default=None,
                     help="For `tuned` and profiles: the entries tuned for exactly this workload "
                          "[default: what the runtime serves a layer loaded without a workload: "
                          "the decode entry up to M = 8 beside a larger workload's entry]."),
        click.option("--device", "device_index", type=click.IntRange(min=0), default=0,
                     show_default=True, help="GPU index to measure on."),
        _db_option,
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _bench_problems(model: str | None, config_path: str | None, shapes: tuple[str, ...],
                    bits: str | None, group: str | None, act_order: bool | None) -> dict[Any, list[str]]:
    """Problems named on the command line ({} when none: a results file may supply them)."""
    if not (model or config_path or shapes):
        return {}
    return dict(_tune_problems(model, config_path, shapes, int(bits) if bits else None,
                               int(group) if group else None, act_order))


def _require_gpu(device_index: int, code: int = 1) -> None:
    from gemmtune.autotune import study as st

    n = st.gpu_count()
    if n == 0:
        fail("no CUDA GPU is visible here: measuring a source needs one (results files compare "
             "without a GPU)", code)
    if device_index >= n:
        fail(f"GPU {device_index} does not exist ({n} visible: 0..{n - 1})", code)


def _progress_fn(progress: Any, label: str) -> Any:
    task = progress.add_task(label, total=None, note="")

    def on_progress(done: int, total: int, what: str) -> None:
        progress.update(task, completed=done, total=total, note=what)

    return on_progress


def _new_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                    transient=True)


def _bench_table(results: Any) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    d = results.device
    table = Table(title=escape(f"{results.label} on {d.get('name', '?')} · kernel "
                               f"{results.kernel_hash[:12]}"), title_justify="left",
                  box=box.SIMPLE_HEAD, caption="µs per call: median ± interquartile range")
    for col, just in (("shape (layers)", "left"), ("M", "right"), ("path", "left"),
                      ("µs", "right"), ("config", "left")):
        table.add_column(col, justify=just, no_wrap=col != "config", overflow="fold")  # type: ignore[arg-type]
    for pb in results.problems:
        first, shown = True, None
        for m in sorted(pb.points):
            p = pb.points[m]
            name = pb.problem.key() + (f"\n[dim]{escape(', '.join(pb.layers))}[/]" if pb.layers else "")
            cfg = pb.config_at(m)  # a new M band: say its config
            table.add_row(name if first else "", str(m), p.path,
                          f"{p.median_us:.2f} ± {p.spread_us:.2f}",
                          _config_short(cfg) if cfg != shown else "")
            first, shown = False, cfg
    return table


@main.command(epilog=_BENCH_EPILOG)
@click.argument("source")
@_problem_options
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check each path against the CPU reference before timing it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the results JSON here (input for `gemmtune compare`).")
@_friendly
def bench(source: str, model: str | None, config_path: str | None, shapes: tuple[str, ...],
          bits: str | None, group: str | None, act_order: bool | None, m_text: str | None,
          workload_text: str | None, tuned_workload: str | None, device_index: int,
          db_url: str | None, check: bool, output: str | None) -> None:
    """Measure the whole dispatch of SOURCE per layer shape and M on this GPU.

    Each (shape, M) is timed with the tuner's harness (CUDA-graph replays, weights rotated past
    L2, median of repeats); the results file records card, fingerprint, kernel hash, config,
    path (fused / reconstruct) and spread.
    """
    from rich.markup import escape

    from gemmtune.autotune import compare as cmp
    from gemmtune.autotune import study as st

    problems = _bench_problems(model, config_path, shapes, bits, group, act_order)
    ms = cmp.parse_ms(m_text, workload_text)
    if cmp.classify_source(source) == "results":
        results = cmp.load_results(source)
        if problems or m_text or workload_text:
            results = results.restrict({p.key() for p in problems} or None,
                                       set(ms) if (m_text or workload_text) else None)
        console.print(_bench_table(results))
        return
    if not problems:
        fail("nothing to measure: give --model NAME, --config PATH/config.json or --shape KxN")
    _require_gpu(device_index)
    device, khash = st.device_identity(device_index)
    src = cmp.resolve_source(source, problems, device=device, kernel_hash=khash,
                             workload=tuned_workload, db_url=db_url)
    if src.note:
        err_console.print(f"[yellow]note:[/] {escape(src.note)}", highlight=False, soft_wrap=True)
    with _new_progress() as progress:
        results = cmp.measure_dispatch(source, problems, src, ms, device_index=device_index,
                                       check=check, on_progress=_progress_fn(progress, source))
    console.print(_bench_table(results))
    if output:
        results.save(output)
        console.print(f"results written to {escape(output)}", highlight=False)


COMPARE_ERROR_EXIT = 2
"""`compare`'s status for every error; 1 is reserved for "a regression was found"."""


def _compare_table(c: Any) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"A = {c.a.label}   B = {c.b.label}   on {c.a.device.get('name', '?')}"),
                  title_justify="left", box=box.SIMPLE_HEAD,
                  caption="µs per call: median±IQR · path f = fused, r = reconstruct + cuBLAS")
    table.add_column("shape (layers)", overflow="fold", min_width=8)
    table.add_column("M", justify="right")
    table.add_column("path", no_wrap=True)
    table.add_column("A µs", justify="right", no_wrap=True)
    table.add_column("B µs", justify="right", no_wrap=True)
    table.add_column("B/A", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=10)  # the flag must never be cut
    last = None
    for r in c.rows:
        name = ""
        if r.problem_key != last:
            name = r.problem_key + (f"\n[dim]{escape(', '.join(r.layers))}[/]" if r.layers else "")
            last = r.problem_key
        style = "red" if r.regression else ("green" if r.improvement else "")
        flag = "[bold red]REGRESSION[/]" if r.regression else ("[green]faster[/]" if r.improvement else "")
        table.add_row(name, str(r.m), f"{r.a.path[0]}→{r.b.path[0]}",
                      f"{r.a.median_us:.2f}±{r.a.spread_us:.2f}",
                      f"{r.b.median_us:.2f}±{r.b.spread_us:.2f}",
                      f"[{style}]{r.ratio:.3f}[/]" if style else f"{r.ratio:.3f}", flag)
    return table


@main.command(epilog=_COMPARE_EPILOG)
@click.argument("a")
@click.argument("b")
@_problem_options
@click.option("--threshold", "threshold_text", default="3%", show_default=True, metavar="PCT",
              help="Relative slowdown to flag: 3% or 0.03 (and it must exceed the spreads).")
@click.option("--rounds", type=click.IntRange(min=3), default=15, show_default=True,
              help="A B rounds per (shape, M) when measuring now.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="FILE.png", help="Latency against M per shape, both configs, switch points.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              default=None, metavar="FILE.md", help="Write the table as Markdown.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="FILE.json", help="Write the comparison (rows and both results) as JSON.")
@_friendly_exit(COMPARE_ERROR_EXIT)
def compare(a: str, b: str, model: str | None, config_path: str | None, shapes: tuple[str, ...],
            bits: str | None, group: str | None, act_order: bool | None, m_text: str | None,
            workload_text: str | None, tuned_workload: str | None, device_index: int,
            db_url: str | None, threshold_text: str, rounds: int, plot_path: str | None,
            report_path: str | None, json_path: str | None) -> None:
    """Compare two configurations per layer shape and M; exit 1 on a regression of B vs A.

    Exit 1 means "regression found" and nothing else: every error exits 2, so a CI gate can
    tell a slower build from a broken job. Everything that can fail is checked before the first
    measurement (options, files, sources, the database, matplotlib for --plot, output paths)."""

    from rich.markup import escape

    from gemmtune.autotune import compare as cmp
    from gemmtune.autotune import study as st

    threshold = cmp.parse_threshold(threshold_text)
    if plot_path:
        cmp.check_plot(plot_path)
    for what, out in (("--report", report_path), ("--json", json_path)):
        if out:
            cmp.check_output(out, what)
    problems = _bench_problems(model, config_path, shapes, bits, group, act_order)
    ms_given = bool(m_text or workload_text)
    ms = cmp.parse_ms(m_text, workload_text)
    kinds, loaded, problems, ms = cmp.compare_inputs(a, b, problems, ms, ms_given)
    if len(loaded) == 2:
        ra, rb = loaded[0], loaded[1]
    else:
        if not problems:
            fail("nothing to measure: give --model NAME, --config PATH/config.json or --shape KxN",
                 COMPARE_ERROR_EXIT)
        _require_gpu(device_index, COMPARE_ERROR_EXIT)
        device, khash = st.device_identity(device_index)
        srcs = {}
        for i, (text, kind) in enumerate(zip((a, b), kinds, strict=True)):
            if kind != "results":
                srcs[i] = cmp.resolve_source(text, problems, device=device, kernel_hash=khash,
                                             workload=tuned_workload, db_url=db_url)
                if srcs[i].note:
                    err_console.print(f"[yellow]note:[/] {escape(srcs[i].note)}", highlight=False,
                                      soft_wrap=True)
        with _new_progress() as progress:
            if len(srcs) == 2:
                ra, rb = cmp.measure_interleaved(
                    (a, b), problems, srcs[0], srcs[1], ms, device_index=device_index,
                    rounds=rounds, on_progress=_progress_fn(progress, f"{a} vs {b}"))
            else:
                i = next(iter(srcs))
                live = cmp.measure_dispatch((a, b)[i], problems, srcs[i], ms,
                                            device_index=device_index,
                                            on_progress=_progress_fn(progress, (a, b)[i]))
                ra, rb = (live, loaded[1]) if i == 0 else (loaded[0], live)
    c = cmp.compare_results(ra, rb, threshold)
    console.print(_compare_table(c))
    console.print(f"regression: B/A > {1 + c.threshold:.4g} and B − A > spread A + spread B",
                  highlight=False, style="dim")
    for w in c.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for lo in c.left_out:
        console.print(f"[dim]left out ({escape(lo)})[/]", highlight=False, soft_wrap=True)
    layers = {r.problem_key: r.layers for r in c.rows}
    for key, g in c.geomean_by_problem().items():
        names = ", ".join(layers.get(key, ()))
        console.print(f"geomean B/A {key}{escape(f' ({names})') if names else ''}: {g:.3f} "
                      f"({cmp.pct(g)})", highlight=False)
    console.print(f"[bold]geomean B/A overall: {c.geomean:.3f} ({cmp.pct(c.geomean)})[/] over "
                  f"{len(c.rows)} points", highlight=False)
    if report_path:
        cmp.write_text_atomically(report_path, cmp.render_markdown(c))
    if json_path:
        cmp.write_text_atomically(json_path, c.dumps())
    if plot_path:
        cmp.plot(c, plot_path)
    written = [p for p in (report_path, json_path, plot_path) if p]
    if written:
        console.print(f"wrote {escape(', '.join(written))}", highlight=False)
    n = len(c.regressions)
    if n:
        console.print(f"[bold red]{n} regression{'s' if n != 1 else ''}[/] of B ({escape(c.b.label)}) "
                      f"vs A ({escape(c.a.label)}) beyond {c.threshold * 100:g} % and the spread",
                      highlight=False)
        sys.exit(1)
    console.print(f"no regression of B vs A beyond {c.threshold * 100:g} %", highlight=False)


# ---------------------------------------------------------------------------------------------
# resolve   (runtime area)
# ---------------------------------------------------------------------------------------------

_RESOLVE_EPILOG = """\b
Examples:
  gemmtune resolve --model llama-2-13b                   # this GPU, or the one tuned card
  gemmtune resolve --model llama-2-70b --fingerprint 2c0ad6e0 --db tuning.db
  gemmtune resolve --shape 4096x4096 --profile h100.json --json

\b
As a model load would (QuantLinear without a workload): explicit config > profile
($GEMMTUNE_PROFILE or --profile) > database > default; a decode-tuned entry serves M up to 8
beside a larger workload's entry. Stale entries (another kernel build) are listed, never used.
"""


def _band_source(band: Any) -> str:
    """Where a band's config came from, in words."""
    if band.source == "default":
        return f"default ({band.detail})"
    if band.entry is None:
        return f"{band.source} ({band.detail})"
    e = band.entry
    return f"{band.source} {band.detail}: {e.workload_key} entry, {_age(e.created_at)} old"


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
            "layers": [{"problem": a.problem.to_dict(), "problem_key": a.problem.key(),
                        "layers": list(a.layers), "bands": [band(b) for b in a.resolution.bands],
                        "skipped": [skip(s) for s in a.resolution.skipped]}
                       for a in ex.answers],
            "warnings": list(ex.warnings)}


@main.command("resolve", epilog=_RESOLVE_EPILOG)
@_shape_options
@click.option("--workload", "workload_text", default=None, metavar="decode|prefill|mixed|M:W,…",
              help="Resolve for layers loaded with this workload [default: none, as `patch` loads "
                   "them: the M bands of the decode/larger split].")
@click.option("--fingerprint", "fingerprint_spec", metavar="F",
              help="The card: a fingerprint, its prefix or part of a tuned card's name [default: "
                   "GPU 0 here, else the one card the database and profile know].")
@click.option("--profile", "profile_path", metavar="PATH", envvar="GEMMTUNE_PROFILE",
              default="", help="A profile to consult before the database [default: "
                               "$GEMMTUNE_PROFILE].")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_friendly
def resolve_cmd(model: str | None, config_path: str | None, shapes: tuple[str, ...],
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

    problems = _tune_problems(model, config_path, shapes, int(bits) if bits else None,
                              int(group) if group else None, act_order, "resolve")
    workload = Workload.parse(workload_text) if workload_text else None
    card = find_card(fingerprint_spec, db_url, profile_path)
    ex = explain(problems, card, workload=workload, profile=profile_path, db_url=db_url)
    if as_json:
        click.echo(json.dumps(_resolve_json(ex), indent=2))
        return
    table = _table(f"{card.name or 'card'} · fingerprint {card.fingerprint} ({card.found}) · "
                   f"kernel {ex.kernel_hash[:12]}", "shape (layers)", "M", "config~", "from~")
    for a in ex.answers:
        for i, b in enumerate(a.resolution.bands):
            name = a.problem.key() + (f"\n[dim]{escape(', '.join(a.layers))}[/]" if a.layers else "")
            table.add_row(name if i == 0 else "", b.span, _config_short(b.config),
                          escape(_band_source(b)))
        for sk in a.resolution.skipped:
            what = f"{sk.entry.workload_key} entry" if sk.entry is not None else "profile"
            table.add_row("", "", "[yellow]skipped[/]",
                          escape(f"{sk.kind} {sk.where}: {what} {sk.detail}"
                                 if sk.entry is None else f"{sk.kind} {sk.where}: {sk.detail}"))
    console.print(table)
    for w in ex.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    main()
