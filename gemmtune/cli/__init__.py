"""The `gemmtune` command line (click + rich): the group `main` and its commands.

The commands live by area: `kernels` (devices, kernels check), `db` (show, export, import,
doctor), `tune`, `bench` (bench, compare) and `resolve`; `_common` holds what they share: the
consoles, the one-line errors, the options declared once (`_shape_options`, `_db_option`; the
`bench`/`compare` `_problem_options` live in `bench`) and the table helpers. The modules hold only
option declarations and rendering; the product logic lives with its owner
(`autotune.session.tune_or_report`, `autotune.sources.compare_inputs`, `runtime.explain`,
`db.resolve`).

Errors a user can cause end as one red line and a non-zero exit, never a traceback: every command
body runs under `_friendly`, which turns `GemmtuneError` (and the few OS errors a bad path gives)
into that line. Heavy imports (torch, CuPy, SQLAlchemy, Optuna) happen inside the commands so
`gemmtune --help` stays instant.
"""

from __future__ import annotations

import click

from gemmtune import __version__
from gemmtune.cli import bench, db, kernels, resolve, tune
from gemmtune.cli._common import console, err_console, fail
from gemmtune.cli.bench import COMPARE_ERROR_EXIT
from gemmtune.cli.db import _profile_validator

__all__ = ["COMPARE_ERROR_EXIT", "_profile_validator", "console", "err_console", "fail", "main"]


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


for _command in (kernels.devices, kernels.kernels, db.show, db.export, db.import_cmd, db.doctor,
                 tune.tune, bench.bench, bench.compare, resolve.resolve_cmd):
    main.add_command(_command)
del _command
