"""The `gemmtune` command line (click + rich).

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
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _friendly(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GemmtuneError as exc:
            fail(str(exc))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


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


# ---------------------------------------------------------------------------------------------
# tune   (autotune area)
# ---------------------------------------------------------------------------------------------

# (tune is added below this line)


# ---------------------------------------------------------------------------------------------
# bench / compare
# ---------------------------------------------------------------------------------------------

# (bench and compare are added below this line)


if __name__ == "__main__":  # pragma: no cover
    main()
