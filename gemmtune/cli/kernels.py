"""`gemmtune devices` and `gemmtune kernels check`: the GPUs seen and the static kernel build."""

from __future__ import annotations

import os
import sys

import click

from gemmtune.cli._common import _friendly, console, fail


@click.command()
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


@click.group()
def kernels() -> None:
    """Inspect and statically build the CUDA kernels."""


@kernels.command("check")
@click.option("--arch", default="sm_90", show_default=True,
              help="Comma-separated targets, e.g. sm_80,sm_86,sm_89,sm_90.")
@click.option("--bits", default="4,8", show_default=True, help="Bit widths to build.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Parallel nvcc processes.")
@click.option("--quick", is_flag=True, help="Build only the preset and a corner sample of the space.")
@_friendly
def kernels_check(arch: str, bits: str, jobs: int, quick: bool) -> None:
    """Build every kernel variant with nvcc (no GPU needed) and report registers, spills and
    shared memory. Exits 1 on any build failure or spill."""
    from gemmtune.kernels.buildcheck import run_check
    from gemmtune.kernels.errors import KernelBuildError

    widths = [b.strip() for b in bits.split(",") if b.strip()]
    if not all(b.isdigit() for b in widths):
        raise KernelBuildError(f"--bits {bits!r}: expected comma-separated bit widths, e.g. 4,8")
    ok = run_check(
        archs=[a.strip() for a in arch.split(",") if a.strip()],
        bits=[int(b) for b in widths],
        jobs=jobs,
        quick=quick,
        console=console,
    )
    if not ok:
        sys.exit(1)
