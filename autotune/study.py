"""Optuna studies over the kernel space: one per (device, kernel hash, problem, workload).

How a problem is tuned (`tune_problem`):

1. The study `gemmtune:{device fingerprint}:{kernel_hash[:16]}:{problem key}:{workload key}` is
   created or loaded from RDB storage on the *same* URL as the gemmtune store, so an interrupted
   run resumes and workers on several GPUs or hosts pointing at one PostgreSQL URL cooperate on it.
2. The default and the ExLlamaV2 presets are enqueued first (once per study), so the first
   trials say how good the starting point is and model-based samplers start from it.
3. Each trial samples a kernel *variant* (`space.Space`) and `complete_variant` (`objective.py`)
   computes the best
   fused/reconstruct threshold and reconstruct chunk for it exactly from memoised per-M
   measurements. A variant that fails (compile, launch, wrong result) is a FAIL trial whose reason
   is stored as the user attr `fail_reason`; the study goes on.
4. `--trials` is a total target: finished trials (COMPLETE or FAIL) of earlier sessions and other
   workers count toward it. A variant measured before in the study is not measured again.
5. The answer is a plan over M bands computed exactly from every finished trial's memoised
   measurements (`bands.py`: each band its own variant, the reconstruct edge the last band's
   threshold; one band when more do not pay). It is re-measured interleaved against the
   default, each M with its band's config (`Evaluator.interleaved`); the winner rule is
   `winner.py`. It is accepted only if it is not slower; `session.store_outcome` writes only
   accepted outcomes, and `session.tune_into_store` is the session around one problem.

The search never touches CUDA: it sees kernels through `Evaluator` only. `make_evaluator`,
`device_identity` and `gpu_count` are the seams to the GPU (tests replace them; callers look
them up on this module at call time so that the replacement is seen).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from gemmtune.autotune.bands import MAX_BANDS
from gemmtune.autotune.evaluator import Evaluator, TrialFailure
from gemmtune.autotune.objective import FUSED_CUTOFF, complete_variant, dispatch_latencies
from gemmtune.autotune.space import Space, get_space, warm_start_configs
from gemmtune.autotune.winner import candidates, config_of, interleaved_check
from gemmtune.autotune.winner import ranked as _ranked
from gemmtune.kernels.config import KernelConfig
from gemmtune.kernels.device import DeviceInfo
from gemmtune.kernels.errors import GemmtuneError, InvalidConfigError
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import Workload
from optuna.trial import FrozenTrial, TrialState

SAMPLERS: tuple[str, ...] = ("tpe", "gp", "random", "grid")
DEFAULT_TRIALS = 60
_INTERRUPTED = "interrupted"

# ---------------------------------------------------------------------------------------------
# seams to the GPU (replaced in tests)
# ---------------------------------------------------------------------------------------------


def make_evaluator(problem: Problem, workload: Workload, device_index: int = 0) -> Evaluator:
    """The one place the search gets an evaluator. Imported lazily so the search (and its tests)
    import without CuPy or a GPU."""
    from gemmtune.autotune.measure import CudaEvaluator

    return CudaEvaluator(problem, workload, device_index=device_index)


def device_identity(device_index: int = 0) -> tuple[DeviceInfo, str]:
    """(DeviceInfo, kernel_hash) of a GPU, known before any evaluator exists: enough to decide
    whether a problem is already tuned without allocating anything on the card."""
    from gemmtune.kernels.device import query_device
    from gemmtune.kernels.sources import kernel_hash

    return query_device(device_index), kernel_hash()


def gpu_count() -> int:
    from gemmtune.kernels.device import device_count

    return device_count()


# ---------------------------------------------------------------------------------------------
# storage, names, samplers
# ---------------------------------------------------------------------------------------------

_STORAGES: dict[str, optuna.storages.RDBStorage] = {}
_STORAGE_LOCK = threading.Lock()


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage on the gemmtune database URL, one per URL per process.

    SQLite gets a long busy timeout so workers of `--device all` (one file, several processes)
    wait for each other's short write transactions instead of failing with "database is locked",
    and transactions that take the write lock as they begin, so that two workers cannot both
    claim one enqueued trial.
    """
    from gemmtune.db.store import serialize_sqlite_transactions

    with _STORAGE_LOCK:
        storage = _STORAGES.get(url)
        if storage is None:
            kwargs: dict[str, Any] = {}
            engine_url = url
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"timeout": 120}
            else:
                kwargs["pool_pre_ping"] = True
                engine_url = _postgres_driver(url)
            storage = optuna.storages.RDBStorage(engine_url, engine_kwargs=kwargs)
            serialize_sqlite_transactions(storage.engine)  # no-op on other backends
            _STORAGES[url] = storage
        return storage


def _postgres_driver(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; use psycopg 3 (the `postgres` extra) when
    psycopg2 is absent, as the store does, so one URL works for both."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def study_name(device_fingerprint: str, kernel_hash: str, problem: Problem, workload: Workload,
               space: str = "standard") -> str:
    """`gemmtune:{fingerprint}:{kernel_hash[:16]}:{problem}:{workload}`, plus `:{space}` for a
    space other than `standard`: Optuna ties a parameter name to one set of choices per study,
    so a search over another space is another study."""
    name = f"gemmtune:{device_fingerprint}:{kernel_hash[:16]}:{problem.key()}:{workload.key()}"
    return name if space == "standard" else f"{name}:{space}"


class ExhaustiveSampler(optuna.samplers.BruteForceSampler):
    """`--sampler grid`: Optuna's BruteForceSampler, which walks the tree of define-by-run
    parameters (the space is conditional on `kernel`, so not the product `GridSampler` needs),
    told the space so that it can say when every variant has a finished trial.

    BruteForceSampler stops the study itself once no unvisited branch is left besides those
    other workers are running; `is_exhausted` is the same question asked from the study's
    trials before a session starts, so a finished grid asks nothing more."""

    def __init__(self, space: Space, seed: int | None = None) -> None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.1: no such line in the CLI
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(seed=seed)
        self.space = space

    def is_exhausted(self, study: optuna.Study) -> bool:
        """Every variant of the space has a trial that counts (complete or failed)."""
        covered = set()
        for t in _finished(study):
            with contextlib.suppress(KeyError, InvalidConfigError):
                cfg = self.space.from_params(t.params)
                if self.space.contains(cfg, check_chunk=False):
                    covered.add(cfg.variant_key())
        return len(covered) >= self.space.size


def make_sampler(name: str, space: Space, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """`tpe` (default; multivariate and grouped, for the space's conditional parameters:
    a family's parameters are modelled jointly with the trials that have them; constant liar so
    cooperating workers spread out), `gp` (Gaussian process; better per trial, slower per ask),
    `random`, `grid` (exhaustive over the conditional space: `ExhaustiveSampler`)."""
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True
            )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return ExhaustiveSampler(space, seed=seed)
    raise InvalidConfigError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


# ---------------------------------------------------------------------------------------------
# outcome and progress
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSettings:
    """How to search. `trials=None` means DEFAULT_TRIALS, or the whole grid for `grid`."""

    sampler: str = "tpe"
    space: str | Space = "standard"
    """A named space (`standard`, `full`) or a `Space` object."""
    trials: int | None = None
    timeout_s: float | None = None
    seed: int | None = None
    fused_cutoff: float | None = FUSED_CUTOFF
    interleave_rounds: int = 5
    max_bands: int = MAX_BANDS
    """Most M bands of the stored plan (1: one config for every M, the answer before plans)."""


@dataclass(frozen=True)
class TrialEvent:
    """Progress after each finished trial (for the CLI's progress bar)."""

    problem: Problem
    number: int
    state: str  # "complete" | "fail"
    value_us: float | None
    finished: int
    target: int
    best_us: float | None
    default_us: float | None
    fail_reason: str = ""


@dataclass(frozen=True)
class TuneOutcome:
    """What tuning one (problem, workload) produced.

    status: `accepted` (best not slower than the default in the interleaved re-measurement),
    `rejected` (it was slower: nothing is stored), `no-result` (every trial failed),
    `interrupted` (stopped by the user: trials are kept, nothing is stored, rerun to resume).
    """

    problem: Problem
    workload: Workload
    study_name: str
    status: str
    best_config: KernelConfig | None
    """The config of the plan's last band (the whole answer when the plan has one band)."""
    default_config: KernelConfig
    objective_us: float | None
    default_objective_us: float | None
    latencies_us: dict[int, float] = field(default_factory=dict)
    default_latencies_us: dict[int, float] = field(default_factory=dict)
    search_objective_us: float | None = None
    search_default_us: float | None = None
    trials_run: int = 0
    trials_total: int = 0
    trials_target: int = 0
    failures: int = 0
    fail_reasons: dict[str, int] = field(default_factory=dict)
    message: str = ""
    bands: tuple[tuple[int | None, KernelConfig], ...] = ()
    """The plan over M bands `(m_hi, config)` when it has more than one band; empty: one band
    of `best_config`."""

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @property
    def speedup(self) -> float | None:
        if self.objective_us and self.default_objective_us:
            return self.default_objective_us / self.objective_us
        return None


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial (and a traceback per failed one) at INFO/WARNING; the CLI shows
    its own progress, and failures are stored with their reasons."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    return tuple(sorted(params.items())) if params else None


def _counts(trial: FrozenTrial) -> bool:
    """Whether a trial counts toward the target: finished, and not cut short by the user."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(_INTERRUPTED)


def _finished(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if _counts(t)]


def _target(settings: TuneSettings, space: Space, n_warm: int) -> int:
    if settings.trials is not None:
        if settings.trials < 1:
            raise InvalidConfigError(f"--trials must be at least 1, got {settings.trials}")
        return settings.trials
    if settings.sampler == "grid":
        # Every variant once: the warm-start configs are points of the space, and the
        # exhaustive sampler does not visit a point again (n_warm is not added).
        return space.size
    return DEFAULT_TRIALS


def _best(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and "config" in t.user_attrs]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def _search_done(study: optuna.Study, sampler: optuna.samplers.BaseSampler, target: int) -> bool:
    if len(_finished(study)) >= target:
        return True
    if isinstance(sampler, ExhaustiveSampler):
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return sampler.is_exhausted(study) and not waiting
    return False


def _requeue_interrupted(study: optuna.Study) -> None:
    """Trials cut short by a forced Ctrl-C are FAIL with `interrupted`; enqueue their variants
    again (once) so a grid stays exhaustive and nothing the user started is silently lost."""
    trials = study.get_trials(deepcopy=False)
    covered = {_params_key(t.params) for t in trials if _counts(t)}
    covered |= {_params_key(t.params) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
    for t in trials:
        key = _params_key(t.params)
        if t.state == TrialState.FAIL and t.user_attrs.get(_INTERRUPTED) and key and key not in covered:
            study.enqueue_trial(dict(t.params), skip_if_exists=False)
            covered.add(key)


def tune_problem(
    evaluator: Evaluator,
    storage: optuna.storages.BaseStorage | str,
    settings: TuneSettings | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    on_trial: Callable[[TrialEvent], None] | None = None,
    fresh: bool = False,
) -> TuneOutcome:
    """Search the space for `evaluator`'s problem and workload, then check the best against
    the default. Resumes the study if it exists. `fresh` discards a study that already reached
    its target (`--retune`); an unfinished one is resumed either way. Stores nothing: see
    `store_outcome`."""
    settings = settings or TuneSettings()
    space = settings.space if isinstance(settings.space, Space) else get_space(settings.space)
    # The card decides which kernel families exist (wgmma: sm_90 only).
    space = space.for_device(evaluator.device.compute_capability)
    if settings.sampler not in SAMPLERS:
        raise InvalidConfigError(f"unknown sampler {settings.sampler!r} (known: {', '.join(SAMPLERS)})")
    if isinstance(storage, str):
        storage = make_storage(storage)
    stop = stop or (lambda: False)
    problem, workload = evaluator.problem, evaluator.workload
    name = study_name(evaluator.device.fingerprint, evaluator.kernel_hash, problem, workload,
                      space.study_label)
    warm = warm_start_configs(space)
    target = _target(settings, space, len(warm))
    sampler = make_sampler(settings.sampler, space, settings.seed)
    default = KernelConfig()

    with _quiet_optuna():
        if fresh:
            with contextlib.suppress(KeyError):
                old = optuna.load_study(study_name=name, storage=storage)
                if _search_done(old, make_sampler(settings.sampler, space, settings.seed), target):
                    optuna.delete_study(study_name=name, storage=storage)
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, direction="minimize",
            load_if_exists=True,
        )
        if not study.user_attrs:
            study.set_user_attr("problem", problem.key())
            study.set_user_attr("workload", workload.key())
            study.set_user_attr("space", space.name)
        # No more start points than the trials asked for: one enqueued past the budget would
        # wait in the study as a trial nobody runs (a later, longer run enqueues the rest).
        for preset_name, cfg in warm[:target]:
            study.enqueue_trial(space.params(cfg), user_attrs={"preset": preset_name},
                                skip_if_exists=True)
        _requeue_interrupted(study)

        # Variants already measured in this study (any session, any worker) are answered from
        # the study instead of the GPU.
        seen: dict[tuple[tuple[str, Any], ...], FrozenTrial] = {}
        for t in study.get_trials(deepcopy=False):
            key = _params_key(t.params)
            if key is not None and _counts(t):
                seen.setdefault(key, t)

        # The default as the runtime would dispatch it (its own threshold and chunk): the
        # baseline of the progress display. Kept in the study so a resumed run measures nothing
        # it measured before.
        default_us: float | None = study.user_attrs.get("default_objective_us")
        if default_us is None:
            try:
                default_us = workload.objective(dispatch_latencies(evaluator, default))
                study.set_user_attr("default_objective_us", default_us)
            except (TrialFailure, GemmtuneError):
                default_us = None

        state: dict[str, Any] = {"run": 0}

        def objective(trial: optuna.Trial) -> float:
            variant = space.suggest(trial)
            key = _params_key(trial.params)
            if key is not None and key not in seen:
                # Other workers on the same study may have measured it meanwhile.
                for t in trial.study.get_trials(deepcopy=False):
                    if t.number != trial.number and _counts(t):
                        seen.setdefault(_params_key(t.params), t)  # type: ignore[arg-type]
            prior = seen.get(key) if key is not None else None
            if prior is not None:
                trial.set_user_attr("duplicate_of", prior.number)
                for k, v in prior.user_attrs.items():
                    if k not in ("preset", "duplicate_of"):
                        trial.set_user_attr(k, v)
                if prior.state == TrialState.FAIL:
                    raise TrialFailure(str(prior.user_attrs.get("fail_reason", "failed before")))
                assert prior.value is not None
                return prior.value
            try:
                a = complete_variant(evaluator, variant, space, settings.fused_cutoff)
            except (TrialFailure, GemmtuneError) as exc:
                reason = exc.reason if isinstance(exc, TrialFailure) else f"{type(exc).__name__}: {exc}"
                trial.set_user_attr("fail_reason", reason)
                raise TrialFailure(reason) from exc
            except KeyboardInterrupt:
                trial.set_user_attr(_INTERRUPTED, True)
                raise
            # Two attributes, not five: each is a commit (an fsync on SQLite).
            trial.set_user_attr("config", a.config.to_dict())
            trial.set_user_attr("measured", {
                "config_key": a.config.key(),
                "fused_us": {str(m): v for m, v in a.fused_us.items()},
                "recon_us": {str(m): v for m, v in a.recon_us.items()},
                # every chunk's row, for the plan over M bands (bands.measured_from_trials)
                "recon_by_chunk": {str(c): {str(m): v for m, v in row.items()}
                                   for c, row in (a.recon_by_chunk or {}).items()},
                "worker": socket.gethostname(),
            })
            return a.objective_us

        def callback(study: optuna.Study, trial: FrozenTrial) -> None:
            state["run"] += 1
            key = _params_key(trial.params)
            if key is not None and _counts(trial):
                seen.setdefault(key, trial)
            finished = len(_finished(study))
            if on_trial is not None:
                best = _best(study)
                on_trial(TrialEvent(
                    problem=problem, number=trial.number,
                    state="complete" if trial.state == TrialState.COMPLETE else "fail",
                    value_us=trial.value if trial.state == TrialState.COMPLETE else None,
                    finished=finished, target=target,
                    best_us=best.value if best else None, default_us=default_us,
                    fail_reason=str(trial.user_attrs.get("fail_reason", "")),
                ))
            if stop() or finished >= target:
                study.stop()

        deadline = None if settings.timeout_s is None else time.monotonic() + settings.timeout_s
        for _attempt in range(10):
            if stop() or _search_done(study, sampler, target):
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                study.optimize(
                    objective, n_trials=None, timeout=remaining,
                    catch=(TrialFailure,), callbacks=[callback], gc_after_trial=False,
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another worker finished the trial this one was on (which make_storage's
                # locking should prevent): that trial is done, carry on.
                continue
            except ValueError as exc:
                # The same race seen from `tell`: "Cannot tell a COMPLETE trial".
                if "Cannot tell" not in str(exc):
                    raise
                continue
            break

        finished = _finished(study)
        failures = [t for t in finished if t.state == TrialState.FAIL]
        reasons = Counter(str(t.user_attrs.get("fail_reason", "unknown")) for t in failures)
        best_trial = _best(study)
        common: dict[str, Any] = dict(
            problem=problem, workload=workload, study_name=name, default_config=default,
            search_default_us=default_us, trials_run=state["run"],
            trials_total=len(finished), trials_target=target, failures=len(failures),
            fail_reasons=dict(reasons.most_common(5)),
        )

        if stop():
            return TuneOutcome(
                status="interrupted",
                best_config=config_of(best_trial), objective_us=None, default_objective_us=None,
                search_objective_us=best_trial.value if best_trial else None,
                message="stopped by the user; finished trials are kept, run again to resume",
                **common,
            )
        if best_trial is None:
            first = reasons.most_common(1)[0][0] if reasons else "no trial finished"
            return TuneOutcome(
                status="no-result", best_config=None, objective_us=None,
                default_objective_us=default_us, message=f"every trial failed ({first})", **common,
            )

        # The winner must not make any M of the workload slower than the default: a better
        # weighted sum that costs one M (say decode at M = 1) is a regression for someone.
        # Candidates (winner.candidates): the plan over M bands of every trial's memo, then
        # single configs screened per M; each re-measured interleaved against the default
        # (each M with its band's config); the first that holds is stored.
        ranked = _ranked(study)
        last: TuneOutcome | None = None
        for plan in candidates(ranked, best_trial, evaluator, default, workload,
                               settings.max_bands):
            search_us = None if math.isnan(plan.objective_us) else plan.objective_us
            try:
                v = interleaved_check(evaluator, plan, default, workload,
                                      settings.interleave_rounds)
            except (TrialFailure, GemmtuneError) as exc:
                reason = exc.reason if isinstance(exc, TrialFailure) else str(exc)
                last = TuneOutcome(
                    status="no-result", best_config=plan.config, objective_us=None,
                    default_objective_us=None, search_objective_us=search_us,
                    message=f"final interleaved check failed: {reason}",
                    bands=plan.bands if len(plan.bands) > 1 else (), **common,
                )
                continue
            last = TuneOutcome(
                status="accepted" if v.accepted else "rejected",
                best_config=plan.config, objective_us=v.objective_us,
                default_objective_us=v.default_objective_us,
                latencies_us=v.latencies_us, default_latencies_us=v.default_latencies_us,
                search_objective_us=search_us,
                message="" if v.accepted else f"{v.why}; nothing stored",
                bands=plan.bands if len(plan.bands) > 1 else (),
                **common,
            )
            if v.accepted:
                return last
        assert last is not None
        return last
