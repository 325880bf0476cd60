"""The search logic on CPU, against a synthetic landscape with a known optimum."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from gemmtune.autotune import objective, session, winner
from gemmtune.autotune import study as st
from gemmtune.autotune.evaluator import Measurement, TrialFailure
from gemmtune.autotune.space import GROUPS, STANDARD, Space
from gemmtune.kernels.config import PRESETS, KernelConfig
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.workload import WORKLOADS, Workload
from optuna.trial import TrialState

from tests.synthetic import FAKE_DEVICE, FAKE_KERNEL_HASH, Landscape, SyntheticEvaluator

PROBLEM = Problem(4096, 4096)
MIXED = WORKLOADS["mixed"]
DECODE = WORKLOADS["decode"]
OPTIMUM = Landscape().optimum

# 6 rows x unroll, 2 tiles, 2 split_k = 24 variants; holds the presets and the optimum.
SMALL = Space.build("small", {
    "max_q_gemm_rows_kernel": (4, 8, 32), "k_unroll": (2, 4),
    "tile": ((64, 64), (128, 256)), "split_k": (0, 2), "recon_chunk_n": (0, 4096),
}, GROUPS)


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A SQLite file: for what must persist across sessions (resume) or be read back."""
    return f"sqlite:///{tmp_path / 'tuning.db'}"


@pytest.fixture
def mem() -> optuna.storages.BaseStorage:
    """In-memory storage: the search logic alone, without SQLite's fsync per write."""
    return optuna.storages.InMemoryStorage()


def variant(cfg: KernelConfig) -> str:
    return cfg.variant_key()


def settings(**kw: Any) -> st.TuneSettings:
    return st.TuneSettings(**{"space": SMALL, "seed": 0, **kw})


def brute_force(ev: SyntheticEvaluator, v: KernelConfig, space: Space) -> tuple[float, int, int]:
    """(objective, r, chunk) by trying every threshold and chunk: the oracle for complete_variant."""
    wl = ev.workload
    best = None
    for r in [0, *sorted(wl.ms)]:
        for chunk in space.recon_chunk_n:
            cfg = v.replace(max_q_gemm_rows=r, recon_chunk_n=chunk)
            obj = wl.objective({m: ev.landscape.dispatch(cfg, m) for m in wl.ms})
            if best is None or obj < best[0] - 1e-9:
                best = (obj, r, chunk)
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# the per-trial completion: threshold and chunk chosen exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wl", [MIXED, DECODE, WORKLOADS["prefill"], Workload.parse("1:4,24:2,40:1")],
                         ids=lambda w: w.key())
def test_threshold_and_chunk_are_exact(wl: Workload) -> None:
    ev = SyntheticEvaluator(PROBLEM, wl)
    for v in itertools.islice(STANDARD.variants(), 0, None, 37):
        a = objective.complete_variant(ev, v, STANDARD, fused_cutoff=None)
        obj, r, chunk = brute_force(ev, v, STANDARD)
        assert a.objective_us == pytest.approx(obj)
        assert a.config.max_q_gemm_rows == r
        if r < max(wl.ms):
            assert a.config.recon_chunk_n == chunk
        else:  # no M left for reconstruct: keep the chunk that is best for it overall
            assert a.config.recon_chunk_n == 4096
        assert a.config.variant_key() == v.variant_key()
        # The cutoff only skips measurements; on a landscape with one crossover it changes nothing.
        assert objective.complete_variant(ev, v, STANDARD).config == a.config


class Flat:
    """Fused and reconstruct equally fast everywhere: every threshold ties."""

    problem, device, kernel_hash = PROBLEM, FAKE_DEVICE, FAKE_KERNEL_HASH

    def __init__(self, wl: Workload) -> None:
        self.workload = wl

    def fused(self, config: KernelConfig, m: int) -> Measurement:
        return Measurement(10.0, 0.0, 1)

    recon = fused


def test_ties_choose_the_smaller_threshold() -> None:
    a = objective.complete_variant(Flat(MIXED), KernelConfig(), STANDARD)  # type: ignore[arg-type]
    assert a.config.max_q_gemm_rows == 0
    assert a.config.recon_chunk_n == 0


def test_failing_chunk_is_left_out_and_failing_fused_fails_the_variant() -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED, fail_chunks=frozenset({4096}))
    a = objective.complete_variant(ev, OPTIMUM, STANDARD)
    assert a.config.recon_chunk_n == 0
    ev = SyntheticEvaluator(PROBLEM, MIXED, fail=lambda c: "ptxas: too many resources")
    with pytest.raises(TrialFailure, match="too many resources"):
        objective.complete_variant(ev, OPTIMUM, STANDARD)


def test_fused_is_not_measured_far_past_the_crossover() -> None:
    ev = SyntheticEvaluator(PROBLEM, WORKLOADS["prefill"])
    a = objective.complete_variant(ev, KernelConfig(), STANDARD)
    assert a.config.max_q_gemm_rows == 0
    assert [m for _, m in ev.fused_measured] == [128]  # 512+ would cost the most, never win


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------


def test_search_finds_the_optimum(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED, noise=0.01)
    out = st.tune_problem(ev, mem, settings(trials=30))
    assert out.status == "accepted"
    assert variant(out.best_config) == variant(OPTIMUM)
    assert out.objective_us < out.default_objective_us
    assert out.trials_total == out.trials_run == 30 == out.trials_target


def test_tpe_finds_the_optimum_of_the_standard_space(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED)
    out = st.tune_problem(ev, mem, settings(space="standard", trials=60))
    assert variant(out.best_config) == variant(OPTIMUM)


def test_grid_equals_exhaustive(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED, noise=0.05, seed=7)  # noise: the optimum is not obvious
    exhaustive = min((objective.complete_variant(SyntheticEvaluator(PROBLEM, MIXED, noise=0.05, seed=7), v, SMALL)
                      for v in SMALL.variants()), key=lambda a: a.objective_us)
    out = st.tune_problem(ev, mem, settings(sampler="grid"))
    assert out.best_config == exhaustive.config
    assert out.search_objective_us == pytest.approx(exhaustive.objective_us)
    # every variant measured, each exactly once (the presets' grid points are not re-measured)
    assert len({k for k, _ in ev.fused_measured}) == SMALL.size
    assert len(ev.fused_measured) == len(set(ev.fused_measured))
    assert out.trials_total == SMALL.size  # the presets are points of it, not visited twice


def test_presets_are_enqueued_first(url: str) -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED)
    out = st.tune_problem(ev, url, settings(trials=5))
    study = optuna.load_study(study_name=out.study_name, storage=url)
    first = sorted(study.trials, key=lambda t: t.number)[:3]
    assert [t.user_attrs["preset"] for t in first] == list(PRESETS)
    for t, cfg in zip(first, PRESETS.values(), strict=True):
        assert t.params == SMALL.params(cfg)
        stored = KernelConfig.from_dict(t.user_attrs["config"])  # completed with r and chunk
        assert stored.variant_key() == cfg.variant_key()


def test_failed_trials_do_not_stop_the_study(url: str) -> None:
    def fail(c: KernelConfig) -> str | None:
        return "ptxas: uses too many registers" if c.k_unroll == 4 and c.split_k == 2 else None

    ev = SyntheticEvaluator(PROBLEM, MIXED, fail=fail)
    out = st.tune_problem(ev, url, settings(sampler="random", trials=20))
    assert out.trials_total == 20
    assert out.failures > 0
    assert out.fail_reasons == {"ptxas: uses too many registers": out.failures}
    assert out.status == "accepted" and fail(out.best_config) is None
    study = optuna.load_study(study_name=out.study_name, storage=url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == out.failures
    assert all(t.user_attrs["fail_reason"] == "ptxas: uses too many registers" for t in failed)


def test_every_trial_failing_gives_no_result(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, DECODE, fail=lambda c: "nvrtc: error")
    out = st.tune_problem(ev, mem, settings(trials=6))
    assert out.status == "no-result" and out.best_config is None
    assert "nvrtc: error" in out.message
    assert not session.store_outcome(RecordingStore(), out, FAKE_DEVICE, FAKE_KERNEL_HASH)


def test_interrupted_study_resumes_without_repeating_finished_trials(url: str) -> None:
    flag = session.StopFlag()

    def stop_after_7(event: st.TrialEvent) -> None:
        if event.finished >= 7:
            flag.set()

    first = SyntheticEvaluator(PROBLEM, MIXED)
    out = st.tune_problem(first, url, settings(sampler="random", trials=16),
                          stop=flag, on_trial=stop_after_7)
    assert out.status == "interrupted"
    assert out.trials_total == 7 and out.objective_us is None
    assert first.calls["interleaved"] == 0  # nothing checked, nothing to store

    second = SyntheticEvaluator(PROBLEM, MIXED)
    out2 = st.tune_problem(second, url, settings(sampler="random", trials=16))
    assert out2.status == "accepted"
    assert out2.trials_total == 16 and out2.trials_run == 9  # the target is a total
    assert not {k for k, _ in first.fused_measured} & {k for k, _ in second.fused_measured}

    third = SyntheticEvaluator(PROBLEM, MIXED)  # target reached: no trial, only the final check
    out3 = st.tune_problem(third, url, settings(sampler="random", trials=16))
    assert out3.trials_run == 0 and third.calls["fused"] == 0
    assert out3.best_config == out2.best_config


def test_forced_interrupt_mid_trial_is_redone_on_resume(url: str) -> None:
    seen: list[str] = []

    def second_ctrl_c(cfg: KernelConfig, m: int) -> None:
        if cfg.variant_key() not in seen:
            seen.append(cfg.variant_key())
        if len(seen) == 4:
            raise KeyboardInterrupt

    first = SyntheticEvaluator(PROBLEM, MIXED, on_fused=second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        st.tune_problem(first, url, settings(sampler="grid"))
    cut = seen[3]

    second = SyntheticEvaluator(PROBLEM, MIXED)
    out = st.tune_problem(second, url, settings(sampler="grid"))
    assert cut in {k for k, _ in second.fused_measured}  # the cut-short variant is measured
    assert out.failures == 0  # and the cut is not counted as a failed variant
    assert len({k for k, _ in first.fused_measured} | {k for k, _ in second.fused_measured}) == SMALL.size
    assert out.best_config.variant_key() == OPTIMUM.variant_key()


def test_duplicates_are_answered_from_the_study(mem: optuna.storages.BaseStorage) -> None:
    tiny = Space.build("tiny", {"max_q_gemm_rows_kernel": (8, 32), "k_unroll": (2,),
                                "tile": ((64, 64),), "split_k": (0, 2), "recon_chunk_n": (0,)}, GROUPS)
    ev = SyntheticEvaluator(PROBLEM, DECODE)
    out = st.tune_problem(ev, mem, settings(space=tiny, sampler="random", trials=15))
    assert out.trials_total == 15
    assert len({k for k, _ in ev.fused_measured}) == len(ev.fused_measured) / len(DECODE.ms) <= 4


@pytest.mark.parametrize("sampler", st.SAMPLERS)
def test_every_sampler_runs(mem: optuna.storages.BaseStorage, sampler: str) -> None:
    ev = SyntheticEvaluator(PROBLEM, DECODE)
    out = st.tune_problem(ev, mem, settings(sampler=sampler, trials=12))
    assert out.trials_total == 12 and out.status == "accepted"
    assert out.objective_us <= out.default_objective_us


def test_timeout_bounds_the_search(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, DECODE)
    out = st.tune_problem(ev, mem, settings(trials=10_000, timeout_s=0.5))
    assert 0 < out.trials_total < 10_000
    assert out.status == "accepted"  # a timeout is a budget, not an interruption


def test_unknown_sampler_is_refused(mem: optuna.storages.BaseStorage) -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        st.tune_problem(SyntheticEvaluator(PROBLEM, DECODE), mem, settings(sampler="cmaes"))


def test_study_name_and_storage(url: str) -> None:
    name = st.study_name(FAKE_DEVICE.fingerprint, FAKE_KERNEL_HASH, PROBLEM, MIXED)
    assert name == f"gemmtune:{FAKE_DEVICE.fingerprint}:{FAKE_KERNEL_HASH[:16]}:4096x4096-b4-g128:mixed"
    other = st.tune_problem(SyntheticEvaluator(PROBLEM, DECODE), url,
                            settings(space="standard", trials=3)).study_name
    # the synthetic card is an sm_90 one, whose standard space holds the wgmma family
    assert other.endswith(":decode:standard+wgmma") and other != name
    assert st.make_storage(url) is st.make_storage(url)


def test_another_space_is_another_study(url: str) -> None:
    # Optuna refuses a parameter whose choices change within a study: --space full after a
    # standard search of the same shape must not collide with it.
    ev = SyntheticEvaluator(PROBLEM, DECODE)
    a = st.tune_problem(ev, url, settings(space="standard", trials=3))
    b = st.tune_problem(ev, url, settings(space="full", trials=3))
    assert a.study_name.endswith(":standard+wgmma")  # the synthetic card is an sm_90 one
    assert b.study_name == a.study_name.replace(":standard+wgmma", ":full+wgmma")
    assert a.status == b.status == "accepted"


# ---------------------------------------------------------------------------------------------
# storing
# ---------------------------------------------------------------------------------------------


class RecordingStore:
    def __init__(self) -> None:
        self.puts: list[Any] = []

    def put_result(self, entry: Any) -> None:
        self.puts.append(entry)


def test_winner_slower_than_default_is_not_stored(mem: optuna.storages.BaseStorage) -> None:
    ev = SyntheticEvaluator(PROBLEM, MIXED, interleave_penalty=3.0)  # re-measured 3x slower
    out = st.tune_problem(ev, mem, settings(trials=10))
    assert out.status == "rejected" and not out.accepted
    assert out.objective_us > out.default_objective_us
    store = RecordingStore()
    assert session.store_outcome(store, out, FAKE_DEVICE, FAKE_KERNEL_HASH) is False
    assert store.puts == []


def test_accepted_outcome_is_stored_with_both_latency_sets(url: str) -> None:
    from gemmtune.db.store import Store

    ev = SyntheticEvaluator(PROBLEM, MIXED)
    out = st.tune_problem(ev, url, settings(trials=10))
    store = Store.open(url)  # the same database file as the studies
    try:
        assert session.store_outcome(store, out, FAKE_DEVICE, FAKE_KERNEL_HASH, "test")
        entry = store.get_result(FAKE_DEVICE.fingerprint, FAKE_KERNEL_HASH, PROBLEM.key(), MIXED.key())
        assert entry is not None
        assert KernelConfig.from_dict(entry.config) == out.best_config
        assert entry.objective_us == pytest.approx(out.objective_us)
        assert entry.default_objective_us == pytest.approx(out.default_objective_us)
        assert {int(m) for m in entry.latencies_us} == set(MIXED.ms)
        assert {int(m) for m in entry.default_latencies_us} == set(MIXED.ms)
    finally:
        store.close()
    assert out.study_name in optuna.get_all_study_names(url)


def test_a_queued_trial_is_claimed_by_one_worker_only(db_url: str) -> None:
    """Workers asking at the same moment for the one enqueued variant: one gets it, the other a
    new trial. (SQLite has no row locks; the storage takes the write lock when a transaction
    begins, or both would claim it, measure it twice and one would fail telling it.)"""
    storage = st.make_storage(db_url)
    for round_ in range(8):
        name = f"claim-{round_}"
        study = optuna.create_study(study_name=name, storage=storage)
        study.enqueue_trial({"x": 0.5})
        gate = threading.Barrier(2, timeout=60)
        got: list[int] = []

        def ask(name: str = name, gate: threading.Barrier = gate, got: list[int] = got) -> None:
            mine = optuna.load_study(study_name=name, storage=storage)
            gate.wait()
            got.append(mine.ask().number)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == [0, 1], f"round {round_}: trials claimed {got}"


def test_workers_on_one_database_cooperate_on_one_study(db_url: str) -> None:
    """Two workers (threads here; processes or hosts in production) on one database URL share
    the study: together they run the target, and neither measures what the other finished."""
    # A measurement takes time on a GPU. Neither worker goes past its first trial before the
    # other has finished one: with fake measurements a few ms long, the first to get going can
    # otherwise finish all 12 trials while the other is still on its baseline measurement of the
    # default, or waiting for SQLite's write lock behind the busy worker's commits (seen on a
    # loaded 2-core machine: a 12-to-0 split). A barrier at the first measurement did not hold:
    # that is the default's, which both may take before any trial (neither finds it stored yet).
    ran_one = threading.Barrier(2, timeout=60)

    def measuring(c: KernelConfig, m: int) -> None:
        time.sleep(0.003)

    def after_first_trial() -> Any:
        waited = [False]

        def on_trial(event: st.TrialEvent) -> None:
            if not waited[0]:
                waited[0] = True
                ran_one.wait()
        return on_trial

    evs = [SyntheticEvaluator(PROBLEM, MIXED, on_fused=measuring) for _ in range(2)]
    outs: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            outs[i] = st.tune_problem(evs[i], db_url, settings(sampler="random", trials=12, seed=i),
                                      on_trial=after_first_trial())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    study = optuna.load_study(study_name=outs[0].study_name, storage=db_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 12 <= len(finished) <= 13  # each stops at the target; one may be mid-trial then
    assert all(o.status == "accepted" for o in outs)
    # Claiming a queued trial is atomic on every backend (SQLite: BEGIN IMMEDIATE), so no trial
    # is run, or told, by both workers.
    assert sum(o.trials_run for o in outs) == len(finished)
    assert all(o.trials_run > 0 for o in outs)
    # Only races can make both measure one variant: the presets both may enqueue at the start
    # (enqueueing checks, then inserts), and at most a trial that both began before either
    # finished.
    overlap = {k for k, _ in evs[0].fused_measured} & {k for k, _ in evs[1].fused_measured}
    assert len(overlap - {c.variant_key() for c in PRESETS.values()}) <= 1


class _OneMWorse(Landscape):
    """The landscape's optimum wins the weighted sum but is 30 % slower than the default at M=1."""

    def fused(self, c: KernelConfig, m: int) -> float:
        t = super().fused(c, m)
        if m == 1 and c.variant_key() == self.optimum.variant_key():
            return 1.3 * super().fused(KernelConfig(), 1)
        return t


@pytest.mark.parametrize("max_bands", [1, 4])
def test_winner_is_never_slower_than_the_default_at_any_m(mem: optuna.storages.BaseStorage,
                                                          max_bands: int) -> None:
    land = _OneMWorse()
    ev = SyntheticEvaluator(PROBLEM, DECODE, land)
    out = st.tune_problem(ev, mem, settings(space=SMALL, sampler="grid", max_bands=max_bands))
    assert out.accepted and out.best_config is not None
    optimum = land.optimum.variant_key()
    if max_bands == 1:  # one config: the optimum is out, it loses M=1
        assert out.bands == () and out.best_config.variant_key() != optimum
    else:  # a plan: M=1 gets a band of another variant, the optimum serves M >= 2
        (m_hi, first), (top, last) = out.bands
        assert (m_hi, top) == (1, None)
        assert first.variant_key() != optimum and last.variant_key() == optimum
    for m in DECODE.ms:
        assert out.latencies_us[m] <= out.default_latencies_us[m] * (1 + winner.FINAL_SLACK)
    # ... and it still beats the default overall.
    assert out.objective_us < out.default_objective_us


# ---------------------------------------------------------------------------------------------
# the plan over M bands
# ---------------------------------------------------------------------------------------------

GEMV = PRESETS["exllamav2-0.0.12"]  # 4 rows per block: the small-M regime's variant here


class _TwoRegimes(Landscape):
    """The landscape, but GEMV's variant is twice as fast as the optimum at M <= 4."""

    def fused(self, c: KernelConfig, m: int) -> float:
        if c.variant_key() == GEMV.variant_key() and m <= 4:
            return 0.5 * super().fused(self.optimum, m)
        return super().fused(c, m)


def test_a_tuned_plan_has_a_band_per_regime_and_is_stored(url: str) -> None:
    from gemmtune.db.store import Store

    ev = SyntheticEvaluator(PROBLEM, MIXED, _TwoRegimes())
    out = st.tune_problem(ev, url, settings(sampler="grid"))
    assert out.accepted
    (e0, c0), (e1, c1) = out.bands
    assert (e0, c0.variant_key(), c0.max_q_gemm_rows) == (4, GEMV.variant_key(), 4)
    assert e1 is None and c1 == out.best_config
    assert c1.variant_key() == OPTIMUM.variant_key()
    # the reconstruct edge is where it was for the optimum alone: the landscape's crossover
    alone = objective.complete_variant(SyntheticEvaluator(PROBLEM, MIXED), OPTIMUM, SMALL)
    assert c1.max_q_gemm_rows == alone.config.max_q_gemm_rows
    # the final check measured every M once, with its band's config
    checked = ev.interleaved_ms[-len(MIXED.ms):]
    assert sorted(m for _c, m in checked) == sorted(MIXED.ms)
    assert all(c == (c0 if m <= 4 else c1) for c, m in checked)
    assert out.latencies_us == {m: ev.landscape.dispatch(c0 if m <= 4 else c1, m) for m in MIXED.ms}
    # planning measured nothing: every fused measurement is one (variant, M) of a trial
    assert len(set(ev.fused_measured)) == len(ev.fused_measured)
    with Store.open(url) as store:
        assert session.store_outcome(store, out, FAKE_DEVICE, FAKE_KERNEL_HASH, "test")
        entry = store.get_result(FAKE_DEVICE.fingerprint, FAKE_KERNEL_HASH, PROBLEM.key(),
                                 MIXED.key())
    assert entry is not None
    assert entry.bands == ((4, c0.to_dict()), (None, c1.to_dict()))
    assert entry.config == c1.to_dict()
    assert entry.objective_us == pytest.approx(MIXED.objective(out.latencies_us))


def test_one_regime_gives_one_band(mem: optuna.storages.BaseStorage) -> None:
    out = st.tune_problem(SyntheticEvaluator(PROBLEM, MIXED), mem, settings(sampler="grid"))
    assert out.accepted and out.bands == ()
    assert out.best_config is not None and out.best_config.variant_key() == OPTIMUM.variant_key()


def test_a_plan_slower_when_re_measured_falls_back_to_single_configs(
        mem: optuna.storages.BaseStorage) -> None:
    """The first candidate is the plan; when the interleaved check rejects it, the single-config
    candidates follow (here every candidate is re-measured 3x slower: all rejected, in order)."""
    ev = SyntheticEvaluator(PROBLEM, MIXED, _TwoRegimes(), interleave_penalty=3.0)
    out = st.tune_problem(ev, mem, settings(sampler="grid"))
    assert out.status == "rejected" and out.bands == ()
    n = len(MIXED.ms)
    blocks = [ev.interleaved_ms[i:i + n] for i in range(0, len(ev.interleaved_ms), n)]
    assert len(blocks) == winner.FINAL_CANDIDATES and all(len(b) == n for b in blocks)
    assert len({c for c, _m in blocks[0]}) == 2  # the plan, band by band
    assert all(len({c for c, _m in b}) == 1 for b in blocks[1:])  # then one config each


# ---------------------------------------------------------------------------------------------
# both kernel families in one search: decode band, tiled band, reconstruct
# ---------------------------------------------------------------------------------------------

TWO_FAMILIES = Space.build("two-families", {
    "kernel": (0, 1),
    "max_q_gemm_rows_kernel": (4, 8, 32), "k_unroll": (2,), "tile": ((64, 64), (128, 256)),
    "tiled_tile": ((16, 128, 64, 4), (64, 128, 64, 4), (64, 256, 64, 3)),
    "split_k": (0, 2), "recon_chunk_n": (0, 4096),
}, GROUPS)
TILED_BEST = KernelConfig(kernel=1, tile_m=64, tile_n=256, tile_k=64, stages=3, split_k=2)


class _Families(Landscape):
    """Decode variants as the landscape has them (cheap rows, steep in M); tiled variants pay a
    fixed cost but little per row, the best of them (TILED_BEST) 20 % under the others. The
    decode optimum (4 + M) wins below M = 13, TILED_BEST (16 + 0.08 M) from there to M = 200,
    reconstruct with its best chunk (0.8 (30 + 0.05 M)) above: the three paths' order as the H200
    measured it (BENCHMARKS.md)."""

    def fused(self, c: KernelConfig, m: int) -> float:
        if c.tiled:
            return (0.8 if c.variant_key() == TILED_BEST.variant_key() else 1.0) * (20.0 + 0.1 * m)
        return super().fused(c, m)


def test_one_search_over_both_families_stores_a_plan_with_a_band_for_each(
        mem: optuna.storages.BaseStorage) -> None:
    """What the GEMM issue's plan promises: the tuner chooses per band among decode kernel,
    tiled kernel and reconstruct + cuBLAS, with exact edges from the memo."""
    wl = Workload.parse("1:8,2:4,4:2,8:2,16:1,32:1,64:1,128:1,512:0.5")
    ev = SyntheticEvaluator(PROBLEM, wl, _Families())
    out = st.tune_problem(ev, mem, settings(space=TWO_FAMILIES, sampler="grid"))
    assert out.accepted
    (e0, c0), (e1, c1) = out.bands
    assert (e0, c0.variant_key(), c0.max_q_gemm_rows) == (8, OPTIMUM.variant_key(), 8)
    assert e1 is None and c1.variant_key() == TILED_BEST.variant_key()
    assert c1.max_q_gemm_rows == 128  # the workload's last M under 200: 512 reconstructs
    lat = {m: ev.landscape.dispatch(c0 if m <= 8 else c1, m) for m in wl.ms}
    assert out.latencies_us == pytest.approx(lat)
    # per M, nothing in the space is faster than what the plan runs
    for m in wl.ms:
        best = min([ev.landscape.fused(v, m) for v in TWO_FAMILIES.variants()]
                   + [ev.landscape.recon(KernelConfig(recon_chunk_n=c), m) for c in (0, 4096)])
        assert lat[m] == pytest.approx(best)


def test_flipping_the_wgmma_switch_is_another_study(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On an sm_90 card GEMMTUNE_WGMMA=0 takes a choice out of the `kernel` parameter; resuming the
    # same study with it flipped made Optuna raise ("does not support dynamic value space").
    ev = SyntheticEvaluator(PROBLEM, DECODE)
    monkeypatch.setenv("GEMMTUNE_WGMMA", "0")
    a = st.tune_problem(ev, url, settings(space="standard", trials=3))
    monkeypatch.delenv("GEMMTUNE_WGMMA")
    b = st.tune_problem(ev, url, settings(space="standard", trials=3))
    assert b.study_name == a.study_name + ":standard+wgmma"
    assert a.status == b.status == "accepted"
