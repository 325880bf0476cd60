"""What every command shares: the consoles, the one-line errors, the options declared once, tables."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from gemmtune.autotune.models import DEFAULT_LAYOUT, LAYOUTS
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


_DB_HELP = ("Tuning database: a SQLAlchemy URL (sqlite:///…, postgresql+psycopg://…) or a file path. "
            "Default: $GEMMTUNE_DB, else the user-data path (see `gemmtune doctor`).")


def _db_option(func: F) -> F:
    return click.option("--db", "db_url", metavar="URL", default=None, help=_DB_HELP)(func)  # type: ignore[return-value]


_LAYOUT_HELP = ("Which linears --model / --config derive: "
                + "; ".join(f"{name}: {what}" for name, what in LAYOUTS.items())
                + f" [default: {DEFAULT_LAYOUT}].")


def _shape_options(func: F) -> F:
    """--model/--config/--layout/--shape/--bits/--group/--act-order: which layer shapes (tune,
    bench, compare and resolve spell them alike). `--layout` is a plain string checked by
    `models.parse_layout` in the command body, so a bad value is one `error:` line with the
    command's exit status, as a bad --model is."""
    opts = [
        click.option("--model", metavar="NAME|PATH",
                     help="Model preset (llama-3-8b, llama-2-70b, mistral-7b, qwen2.5-7b, …) or a "
                          "folder / config.json."),
        click.option("--config", "config_path", metavar="PATH",
                     help="A Hugging Face config.json (its quantization_config supplies "
                          "bits/group/act-order)."),
        click.option("--layout", metavar="|".join(LAYOUTS), default=DEFAULT_LAYOUT,
                     help=_LAYOUT_HELP),
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


def _tune_problems(model: str | None, config_path: str | None, layout: str,
                   shapes: tuple[str, ...], bits: int | None, group: int | None,
                   act_order: bool | None, what: str = "tune") -> Any:
    """Distinct problems to tune, each with the layer names that use it (first-seen order).
    The layout is checked even when only --shape is given: a typo is never silently ignored."""
    from gemmtune.autotune.models import model_layers, parse_layout, shape_layers

    kind = parse_layout(layout)
    layers = []
    for source in (model, config_path):
        if source:
            layers += model_layers(source, bits, group, act_order, layout=kind)
    if shapes:
        layers += shape_layers(shapes, bits if bits is not None else 4,
                               group if group is not None else 128, bool(act_order))
    if not layers:
        fail(f"nothing to {what}: give --model NAME, --config PATH/config.json or --shape KxN")
    names: dict[Any, list[str]] = {}
    for layer in layers:
        names.setdefault(layer.problem, []).append(f"{layer.name}×{layer.count}")
    if what != "resolve":  # resolve still shows what such a layer gets: the CPU reference path
        from gemmtune.kernels.problem import KERNEL_BITS

        cpu_only = sorted({p.bits for p in names if not p.has_kernel})
        if cpu_only:
            fail(f"{'/'.join(map(str, cpu_only))}-bit layers have no CUDA kernel (kernels: "
                 f"{', '.join(map(str, KERNEL_BITS))}-bit); gemmtune runs them on its CPU "
                 f"reference path, so there is nothing to {what}")
    return names


def _config_short(config: Any) -> str:
    """The one spelling of a config in every table (`show`, `resolve`, `tune`, `bench`): the
    fused/reconstruct threshold, then the fused kernel's own factors (decode: rows per block,
    block_n x threads, K-unroll; tiled and wgmma: block tile and stages; stream: warps, chunk,
    slots), then split-K and the reconstruct
    chunk only where they are not the defaults (0: split from the SM count, whole matrix at
    once). Short enough that a table of them fits 80 columns without wrapping one; the full key
    (`KernelConfig.key()`) is what `show --keys` and `resolve --json` print, for copying."""
    c = config
    if c.tiled:
        own = f"tiled {c.tile_m}x{c.tile_n}x{c.tile_k} st{c.stages}"
    elif c.wgmma:
        own = f"wgmma {c.wgmma_m}x{c.wgmma_n}x{c.wgmma_k} st{c.wgmma_stages}"
    elif c.stream:
        own = f"stream {c.stream_warps_n}x{c.stream_warps_k} ch{c.stream_chunk} sl{c.stream_slots}"
    else:
        own = f"{c.max_q_gemm_rows_kernel} rows, {c.block_n}x{c.threads} u{c.k_unroll}"
    extra = "".join(f" {tag}{value}" for tag, value in (("sk", c.split_k), ("rc", c.recon_chunk_n))
                    if value)
    return f"≤{c.max_q_gemm_rows} fused, {own}{extra}"


CONFIG_LEGEND = ("config: ≤N fused = the fused kernel up to M = N, reconstruct + cuBLAS above; "
                 "decode kernel: rows per block, block_n x threads, uK = K-unroll; tiled kernel: "
                 "block tile M x N x K, stN = pipeline stages; wgmma kernel (sm_90): the same; "
                 "stream kernel: warps along N x K, "
                 "chN = K steps a copy, slN = copies in flight a warp; skN = split-K (absent: from "
                 "the SM count; the stream kernel's is a cluster), rcN = reconstruct chunk (absent: "
                 "whole matrix)")
"""What `_config_short`'s abbreviations mean, for the tables that print it."""


def _age(created: Any) -> str:
    from datetime import UTC, datetime

    if created is None:
        return "?"
    seconds = max(0.0, (datetime.now(UTC) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _table(title: str, *columns: str, caption: str | None = None) -> Any:
    """A left-titled table; a column name ending in `>` is right-aligned, in `~` may wrap
    (words first, then folded), any other never wraps. Tables that show configs keep the
    config column unwrapped and let the others wrap: at 80 columns rich narrows only those."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    # No edge padding: two more columns for the cells at 80 columns.
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, caption=caption, caption_justify="left")
    for col in columns:
        name = col.rstrip(">~")
        if col.endswith("~"):
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right" if col.endswith(">") else "left", no_wrap=True)
    return table
