"""`gemmtune bench` and `gemmtune compare`: measuring sources and the regression gate."""

from __future__ import annotations

import sys
from typing import Any

import click

from gemmtune.cli._common import (
    CONFIG_LEGEND,
    F,
    _config_short,
    _db_option,
    _friendly,
    _friendly_exit,
    _shape_options,
    _table,
    _tune_problems,
    console,
    err_console,
    fail,
)

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
  gemmtune bench default --model llama-3-8b --layout fused    # qkv, o, gate_up, down shapes
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
  gemmtune compare exllamav2-0.0.12 tuned --model llama-3-8b --layout fused   # engines' fused shapes
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


def _bench_problems(model: str | None, config_path: str | None, layout: str,
                    shapes: tuple[str, ...], bits: str | None, group: str | None,
                    act_order: bool | None) -> dict[Any, list[str]]:
    """Problems named on the command line ({} when none: a results file may supply them)."""
    if not (model or config_path or shapes):
        from gemmtune.autotune.models import parse_layout

        parse_layout(layout)  # a bad --layout is an error even where no model is named
        return {}
    return dict(_tune_problems(model, config_path, layout, shapes, int(bits) if bits else None,
                               int(group) if group else None, act_order, "measure"))


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
    """One row per (shape, M); a config is named where its M band starts, unwrapped (the other
    columns are narrow or may wrap, so it fits 80 columns)."""
    from rich.markup import escape

    d = results.device
    table = _table(f"{results.label} on {d.get('name', '?')} · kernel {results.kernel_hash[:12]}",
                   "shape (layers)~", "M>", "path", "µs>", "config",
                   caption="µs per call: median±interquartile range; " + CONFIG_LEGEND)
    for pb in results.problems:
        first, shown = True, None
        for m in sorted(pb.points):
            p = pb.points[m]
            name = pb.problem.key() + (f"\n[dim]{escape(', '.join(pb.layers))}[/]" if pb.layers else "")
            cfg = pb.config_at(m)  # a new M band: say its config
            table.add_row(name if first else "", str(m), p.path,
                          f"{p.median_us:.2f}±{p.spread_us:.2f}",
                          _config_short(cfg) if cfg != shown else "")
            first, shown = False, cfg
    return table


@click.command(epilog=_BENCH_EPILOG)
@click.argument("source")
@_problem_options
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check each path against the CPU reference before timing it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the results JSON here (input for `gemmtune compare`).")
@_friendly
def bench(source: str, model: str | None, config_path: str | None, layout: str,
          shapes: tuple[str, ...],
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

    if output:
        cmp.check_output(output, "-o")  # before minutes of measuring, not after
    problems = _bench_problems(model, config_path, layout, shapes, bits, group, act_order)
    ms = cmp.parse_ms(m_text, workload_text)
    if cmp.classify_source(source) == "results":
        results = cmp.load_results(source)
        if problems or m_text or workload_text:
            results = results.restrict({p.key() for p in problems} or None,
                                       set(ms) if (m_text or workload_text) else None)
            if not results.problems:
                fail(f"{source}: no (shape, M) of it matches the --shape/--model/--m filters")
        console.print(_bench_table(results))
        if output:  # the filtered subset, itself a results file `compare` reads
            results.save(output)
            console.print(f"results written to {escape(output)}", highlight=False)
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


@click.command(epilog=_COMPARE_EPILOG)
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
def compare(a: str, b: str, model: str | None, config_path: str | None, layout: str,
            shapes: tuple[str, ...],
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
    problems = _bench_problems(model, config_path, layout, shapes, bits, group, act_order)
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
