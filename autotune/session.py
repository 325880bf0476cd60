"""One problem tuned against the database: the session around a search (Ctrl-C, the tuning
run's record, storing an accepted outcome, one problem's failure reported, not fatal). Shared
by `gemmtune tune` on one GPU and the `--device all` workers."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from gemmtune.autotune import study
from gemmtune.autotune.study import TrialEvent, TuneOutcome, TuneSettings, tune_problem
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload

if TYPE_CHECKING:  # the store is another area's; imported lazily where used
    from gemmtune.db.store import Store, TunedEntry


# ---------------------------------------------------------------------------------------------
# stop flag / Ctrl-C
# ---------------------------------------------------------------------------------------------


class StopFlag:
    """Set when the user asked to stop; the study stops after the trial in flight."""

    def __init__(self, *others: Callable[[], bool]) -> None:
        self._event = threading.Event()
        self._others = others

    def set(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set() or any(o() for o in self._others)


@contextlib.contextmanager
def graceful_sigint(flag: StopFlag, on_first: Callable[[], None] | None = None) -> Iterator[StopFlag]:
    """First Ctrl-C sets `flag` (finish the trial in flight, keep everything); a second one
    raises KeyboardInterrupt at once. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag():
            raise KeyboardInterrupt
        flag.set()
        if on_first is not None:
            on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# storing
# ---------------------------------------------------------------------------------------------


def store_outcome(
    store: Store,
    outcome: TuneOutcome,
    device: DeviceInfo,
    kernel_hash: str,
    provenance: str = "",
    run_id: int | None = None,
) -> bool:
    """Write an accepted outcome as the tuned entry for (device, kernel hash, problem, workload).
    Anything else is not written (returns False): a winner slower than the default, an
    interrupted search or one without result must never be served."""
    if not outcome.accepted or outcome.best_config is None:
        return False
    assert outcome.objective_us is not None and outcome.default_objective_us is not None
    from gemmtune.db.store import TunedEntry

    p, w = outcome.problem, outcome.workload
    store.put_result(TunedEntry(
        device=device.to_dict(),
        kernel_hash=kernel_hash,
        problem=p.to_dict(),
        problem_key=p.key(),
        workload=w.to_dict(),
        workload_key=w.key(),
        config=outcome.best_config.to_dict(),
        bands=tuple((m_hi, cfg.to_dict()) for m_hi, cfg in outcome.bands),
        objective_us=outcome.objective_us,
        default_objective_us=outcome.default_objective_us,
        latencies_us=dict(outcome.latencies_us),
        default_latencies_us=dict(outcome.default_latencies_us),
        source="tuned",
        provenance=provenance,
        run_id=run_id,
        config_key=outcome.best_config.key(),
    ))
    return True


def provenance_line(settings: TuneSettings, outcome: TuneOutcome) -> str:
    from gemmtune import __version__

    return (f"gemmtune {__version__} tune on {socket.gethostname()}: sampler={settings.sampler} "
            f"space={getattr(settings.space, 'name', settings.space)} trials={outcome.trials_total}/{outcome.trials_target} "
            f"failures={outcome.failures} study={outcome.study_name}")


# ---------------------------------------------------------------------------------------------
# one problem against the database
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemResult:
    """One row of the final table: picklable, so workers can send it to the parent."""

    problem: Problem
    status: str  # accepted | rejected | no-result | interrupted | skipped | error
    default_us: float | None = None
    tuned_us: float | None = None
    config: KernelConfig | None = None
    trials: str = ""
    failures: int = 0
    message: str = ""
    device_index: int = 0
    bands: tuple[tuple[int | None, KernelConfig], ...] = ()
    """The plan over M bands when it has more than one (`config` is its last band's)."""

    @property
    def speedup(self) -> float | None:
        if self.default_us and self.tuned_us:
            return self.default_us / self.tuned_us
        return None


def tune_into_store(
    store: Store,
    storage: optuna.storages.BaseStorage | str,
    problem: Problem,
    workload: Workload,
    settings: TuneSettings,
    *,
    device_index: int = 0,
    retune: bool = False,
    stop: Callable[[], bool] | None = None,
    on_trial: Callable[[TrialEvent], None] | None = None,
) -> ProblemResult:
    """Skip if already tuned (unless `retune`), else tune, store if accepted, and record the run
    (`finished`, `interrupted`, or `failed` when an exception escaped)."""
    device, khash = study.device_identity(device_index)
    if not retune:
        entry: TunedEntry | None = store.get_result(device.fingerprint, khash, problem.key(),
                                                    workload.key())
        if entry is not None and not entry.stale:
            return ProblemResult(
                problem=problem, status="skipped", default_us=entry.default_objective_us,
                tuned_us=entry.objective_us, config=KernelConfig.from_dict(dict(entry.config)),
                message="already tuned (use --retune to tune again)", device_index=device_index,
                bands=tuple((m_hi, KernelConfig.from_dict(dict(c))) for m_hi, c in entry.bands),
            )
    run_id = store.start_run(device.to_dict(), khash, settings.sampler, problem.key(), workload.key())
    status, trials = "failed", 0
    try:
        evaluator = study.make_evaluator(problem, workload, device_index)
        try:
            outcome = tune_problem(evaluator, storage, settings, stop=stop, on_trial=on_trial,
                                   fresh=retune)
        finally:
            evaluator.close()
        trials = outcome.trials_run
        status = "interrupted" if outcome.status == "interrupted" else "finished"
        if outcome.accepted:
            store_outcome(store, outcome, evaluator.device, evaluator.kernel_hash,
                          provenance_line(settings, outcome), run_id=run_id)
        return ProblemResult(
            problem=problem, status=outcome.status, default_us=outcome.default_objective_us
            if outcome.default_objective_us is not None else outcome.search_default_us,
            tuned_us=outcome.objective_us if outcome.objective_us is not None
            else outcome.search_objective_us,
            config=outcome.best_config, trials=f"{outcome.trials_total}/{outcome.trials_target}",
            failures=outcome.failures, message=outcome.message, device_index=device_index,
            bands=outcome.bands if outcome.accepted else (),
        )
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        store.finish_run(run_id, status, trials)


def tune_or_report(store: Store, storage: optuna.storages.BaseStorage | str, problem: Problem,
                   workload: Workload, settings: TuneSettings, *, report_index: int | None = None,
                   fatal: tuple[type[BaseException], ...] = (), **options: Any) -> ProblemResult:
    """`tune_into_store` (`options` are its keywords), with one problem's failure reported as its
    `error` result instead of ending the others (exceptions in `fatal`, and KeyboardInterrupt,
    still propagate). The result names GPU `report_index` (default: the device index)."""
    label = options.get("device_index", 0) if report_index is None else report_index
    try:
        result = tune_into_store(store, storage, problem, workload, settings, **options)
    except fatal:
        raise
    except Exception as exc:  # one problem's failure must not end the others
        return ProblemResult(problem, "error", message=f"{type(exc).__name__}: {exc}",
                             device_index=label)
    return result if result.device_index == label else dataclasses.replace(result, device_index=label)
