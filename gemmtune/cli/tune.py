"""`gemmtune tune`: the search per layer shape, one GPU or one worker per GPU, and its table."""

from __future__ import annotations

import sys
from typing import Any

import click

from gemmtune.cli._common import (
    CONFIG_LEGEND,
    _config_short,
    _db_option,
    _friendly,
    _shape_options,
    _table,
    _tune_problems,
    console,
    fail,
)

_TUNE_EPILOG = """\b
Examples:
  gemmtune tune --model llama-3-8b                     # the GEMMs patch(model) runs, mixed workload
  gemmtune tune --config ./Llama-3-8B-GPTQ/config.json # shapes and bits/group from the checkpoint
  gemmtune tune --model llama-3-8b --layout fused      # qkv, o, gate_up, down (ExLlamaV2, vLLM)
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
Layouts (--layout, for --model / --config): transformers (default) tunes the GEMMs gemmtune's
patch / load_quantized run: o and down, and q+k+v and gate+up as one GEMM each where the
architecture shares their input (Llama, Mistral, Qwen2, ...; the runtime's own rule), else
separately; separate tunes every projection alone (patch(model, fuse=False)); fused tunes the
qkv and gate_up GEMMs of engines that fuse projections (and of the C header export).

\b
Each (GPU model, kernel build, shape, workload) is one Optuna study in the database: an
interrupted run (Ctrl-C, a crash) resumes where it stopped, and --trials is the total.
Shapes already tuned for this GPU and kernel build are skipped unless --retune.
"""


def _tune_table(title: str, results: list[Any], layer_names: dict[Any, list[str]]) -> Any:
    """One row per shape: the plan's M bands and configs beside it, and under the shape its
    layers, status and times (four columns, so that the configs fit 80 columns unwrapped)."""
    from rich.markup import escape

    from gemmtune.db.entry import band_spans
    from gemmtune.db.resolve import Band

    style = {"accepted": "green", "skipped": "cyan", "rejected": "yellow", "interrupted": "yellow",
             "no-result": "red", "error": "red", "pending": "dim"}
    label = {"accepted": "tuned", "rejected": "default kept", "skipped": "stored"}
    table = _table(title, "shape (layers)~", "M", "config", "speedup>",
                   caption="µs: weighted sum of per-M latencies, default → tuned; default = "
                           "built-in config, re-measured interleaved with the tuned one; "
                           + CONFIG_LEGEND)
    for r in results:
        about = [escape(r.problem.key())]
        layers = ", ".join(layer_names.get(r.problem, []))
        if layers:
            about.append(f"[dim]{escape(layers)}[/]")
        about.append(f"[{style.get(r.status, '')}]{label.get(r.status, r.status)}[/]"
                     + (f" [dim]· {r.trials} trials[/]" if r.trials else ""))
        if r.default_us is not None or r.tuned_us is not None:
            about.append("[dim]µs " + " → ".join(f"{us:.1f}" if us is not None else "–"
                                                 for us in (r.default_us, r.tuned_us)) + "[/]")
        if r.config is None:
            spans, configs = "", "–"
        else:
            plan = band_spans(r.bands) if r.bands else [(1, None, r.config)]
            spans = "\n".join(Band(lo, hi, cfg, "").span for lo, hi, cfg in plan)
            configs = "\n".join(_config_short(cfg) for _lo, _hi, cfg in plan)
        table.add_row("\n".join(about), spans, configs,
                      f"{r.speedup:.2f}×" if r.speedup else "–", end_section=True)
    return table


@click.command(epilog=_TUNE_EPILOG)
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
              show_default=True, help="standard: 555 kernel variants (decode kernel 360, tiled "
              "kernel 115, stream kernel 45, wgmma kernel 35 on sm_90 cards); "
              "full: every valid "
              "choice (4581).")
@click.option("--device", "device_spec", default="0", show_default=True, metavar="N|all",
              help="GPU index, or `all`: one worker process per GPU sharing the database.")
@_db_option
@click.option("--retune", is_flag=True, help="Tune shapes that already have a result (a finished "
              "search starts over; an unfinished one resumes).")
@click.option("--seed", type=int, default=None, help="Sampler seed (reproducible proposals).")
@_friendly
def tune(model: str | None, config_path: str | None, layout: str, shapes: tuple[str, ...],
         bits: str | None, group: str | None, act_order: bool | None, workload_text: str, trials: int | None,
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
    problems = _tune_problems(model, config_path, layout, shapes, int(bits) if bits else None,
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
