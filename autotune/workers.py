"""`gemmtune tune --device all`: one worker process per GPU, all on one database.

Why problems are *distributed* (each problem tuned by one worker) rather than every worker
joining every study: the per-problem work that does not parallelise (compiling variants,
allocating the rotated weight copies, the final interleaved check and the store write) would be
repeated on every GPU, and two workers finishing the same study would race to check and store
it. Distribution needs no coordination beyond a queue.

GPUs are grouped by fingerprint: identical cards share one queue (a result measured on any of
them serves all of them), while a different card in the same host gets every problem for
itself, since its results are stored under its own fingerprint.

Each worker is a `spawn`ed process with `CUDA_VISIBLE_DEVICES` set to its GPU before CUDA is
initialised, so it sees exactly one device (index 0). Workers report coarse progress (problem
started, trials, result) through an event queue; Ctrl-C reaches every process of the terminal's
group, and each stops after its trial in flight, exactly as a single-GPU run does.

Hosts cooperate differently: several hosts (or several `gemmtune tune` runs) pointing `--db`
at one PostgreSQL URL share the Optuna studies themselves, because a study's name is the same
for the same device fingerprint, kernel hash, problem and workload.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gemmtune.autotune import session as ss
from gemmtune.autotune import study as st
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload


@dataclass(frozen=True)
class WorkerJob:
    """What every worker needs (picklable: it crosses the spawn boundary)."""

    db_url: str
    problems: tuple[Problem, ...]
    workload: Workload
    settings: st.TuneSettings
    retune: bool = False


@dataclass(frozen=True)
class WorkerEvent:
    """kind: `start` (problem index), `trial` (a `TrialEvent`), `result` (a `ProblemResult`),
    `error` (message), `exit` (the worker is done)."""

    kind: str
    gpu: int
    index: int = -1
    payload: Any = None


def physical_gpu(index: int) -> str:
    """The `CUDA_VISIBLE_DEVICES` entry for visible device `index`, honouring a restriction the
    user already set (`CUDA_VISIBLE_DEVICES=2,3` makes index 0 mean GPU 2)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index < len(entries):
            return entries[index]
    return str(index)


def worker_loop(
    job: WorkerJob,
    gpu: int,
    jobs: Any,
    events: Callable[[WorkerEvent], None],
    stop: Callable[[], bool],
    device_index: int = 0,
) -> None:
    """Take problem indices from `jobs` until it is empty or the user stops; tune each into the
    store. Runs in the worker process (and in-process in tests)."""
    from gemmtune.db.store import Store

    store = Store.open(job.db_url)
    try:
        while not stop():
            try:
                index = jobs.get(timeout=1.0)  # not get_nowait: a fresh mp.Queue may lag its puts
            except queue.Empty:
                break
            problem = job.problems[index]
            events(WorkerEvent("start", gpu, index))
            try:
                result = ss.tune_or_report(
                    store, job.db_url, problem, job.workload, job.settings,
                    device_index=device_index, report_index=gpu, retune=job.retune, stop=stop,
                    on_trial=lambda e, i=index: events(WorkerEvent("trial", gpu, i, e)),
                )
            except KeyboardInterrupt:
                events(WorkerEvent("result", gpu, index, ss.ProblemResult(
                    problem, "interrupted", message="aborted mid-trial", device_index=gpu)))
                raise
            events(WorkerEvent("result", gpu, index, result))
    finally:
        store.close()


def _worker_main(job: WorkerJob, gpu: int, visible: str, jobs: Any, events: Any, stop_event: Any) -> None:
    # Before anything can initialise CUDA: this process sees its one GPU as device 0.
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    flag = ss.StopFlag(stop_event.is_set)
    try:
        with ss.graceful_sigint(flag):
            worker_loop(job, gpu, jobs, events.put, flag, device_index=0)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        events.put(WorkerEvent("error", gpu, payload=f"{type(exc).__name__}: {exc}"))
    finally:
        events.put(WorkerEvent("exit", gpu))


def run_workers(
    job: WorkerJob,
    gpu_groups: list[list[int]],
    on_event: Callable[[WorkerEvent], None],
    stop: Callable[[], bool],
    poll_s: float = 0.2,
) -> None:
    """Start one worker per GPU (`gpu_groups`: GPUs of one fingerprint share a queue of every
    problem) and relay their events until all have exited. When `stop()` turns true the
    workers are told to stop after their trial in flight."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop_event = ctx.Event()
    procs: dict[int, Any] = {}
    for group in gpu_groups:
        jobs = ctx.Queue()
        for i in range(len(job.problems)):
            jobs.put(i)
        for gpu in group:
            p = ctx.Process(target=_worker_main, name=f"gemmtune-gpu{gpu}",
                            args=(job, gpu, physical_gpu(gpu), jobs, events, stop_event),
                            daemon=True)
            p.start()
            procs[gpu] = p
    try:
        _relay(procs, events, stop_event, on_event, stop, poll_s)
    except KeyboardInterrupt:
        # A second Ctrl-C: the workers got it too and abort their trial in flight; give them a
        # moment to record that, then make sure none outlives us.
        stop_event.set()
        deadline = time.monotonic() + 10
        for p in procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
        raise
    for p in procs.values():
        p.join(timeout=10)


def _relay(procs: dict[int, Any], events: Any, stop_event: Any,
           on_event: Callable[[WorkerEvent], None], stop: Callable[[], bool], poll_s: float) -> None:
    running = set(procs)
    dead_since: dict[int, float] = {}
    while running:
        if stop() and not stop_event.is_set():
            stop_event.set()
        try:
            event = events.get(timeout=poll_s)
        except queue.Empty:
            now = time.monotonic()
            for gpu in list(running):
                if procs[gpu].is_alive():
                    continue
                # Dead: its last events may still be in the pipe, so give them a moment before
                # calling it a crash (killed by the OOM killer, a driver fault).
                if now - dead_since.setdefault(gpu, now) > 2.0:
                    running.discard(gpu)
                    on_event(WorkerEvent("error", gpu,
                                         payload=f"worker exited with code {procs[gpu].exitcode}"))
            continue
        if event.kind == "exit":
            running.discard(event.gpu)
        on_event(event)
