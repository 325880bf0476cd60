"""The search space: every point launchable, presets reachable, both kernel families searched as a
conditional space, grid small enough to run."""

from __future__ import annotations

import itertools
import warnings
import zlib

import optuna
import pytest
from gemmtune.autotune import study as st
from gemmtune.autotune.space import (
    FULL,
    GROUPS,
    STANDARD,
    TILED_START,
    Space,
    get_space,
    warm_start_configs,
)
from gemmtune.kernels.config import (
    DECODE,
    DECODE_FIELDS,
    PRESETS,
    STREAM,
    STREAM_FIELDS,
    TILED,
    TILED_FIELDS,
    TUNABLES,
    WGMMA,
    WGMMA_FIELDS,
    KernelConfig,
    tiled_violation,
    wgmma_violation,
)
from gemmtune.kernels.errors import InvalidConfigError
from gemmtune.kernels.problem import KERNEL_BITS, Problem
from gemmtune.kernels.workload import WORKLOADS

from tests.synthetic import SyntheticEvaluator

SPACES = [STANDARD, FULL]
BY = {t.name: t.choices for t in TUNABLES}

# Both families, small enough for an exhaustive search in a test: 2 + 3 tiled points x 2 splits.
TWO = Space.build("two", {
    "kernel": (DECODE, TILED),
    "max_q_gemm_rows_kernel": (8, 32), "k_unroll": (2,), "tile": ((64, 64),),
    "tiled_tile": ((16, 128, 64, 3), (64, 128, 64, 4), (128, 256, 64, 2)),
    "split_k": (0, 2), "recon_chunk_n": (0, 4096),
}, GROUPS)


def _family_names(space: Space, kernel: int) -> set[str]:
    return {"kernel", *(f.name for f in space.trial_factors(kernel))}


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_every_point_is_a_valid_distinct_config(space: Space) -> None:
    keys = set()
    per_family = dict.fromkeys((DECODE, TILED, WGMMA, STREAM), 0)
    for cfg in space.variants():  # KernelConfig construction validates each one
        assert space.contains(cfg)
        if cfg.tiled:  # the dispatch accepts it for a weight of any bit width
            assert all(tiled_violation(b, cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages) is None
                       for b in KERNEL_BITS)
        elif cfg.wgmma:
            assert all(wgmma_violation(b, cfg.wgmma_m, cfg.wgmma_n, cfg.wgmma_k, cfg.wgmma_stages)
                       is None for b in KERNEL_BITS)
        else:
            assert cfg.threads <= 1024
        per_family[cfg.kernel] += 1
        keys.add(cfg.variant_key())
    assert len(keys) == space.size == sum(per_family.values())
    assert per_family == {k: space.family_size(k) for k in (DECODE, TILED, WGMMA, STREAM)}
    assert all(per_family.values())


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_lie_inside_and_round_trip(space: Space, name: str) -> None:
    cfg = PRESETS[name]
    assert space.contains(cfg)
    assert space.from_params(space.params(cfg), base=cfg) == cfg


@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_warm_start_is_the_presets_then_the_tiled_default(space: Space) -> None:
    names = [n for n, _ in warm_start_configs(space)]
    assert names == [*PRESETS, "tiled-default", "wgmma-default", "stream-default"]  # wgmma: sm_90 only
    assert [n for n, _ in warm_start_configs(space.for_device("8.9"))] == [*PRESETS, "tiled-default",
                                                                            "stream-default"]
    assert TILED_START.tiled and space.contains(TILED_START)
    assert space.from_params(space.params(TILED_START)) == TILED_START
    # A space without the tiled family starts from the presets alone.
    decode_only = Space.build("d", {**{f: (getattr(KernelConfig(), f),) for f in DECODE_FIELDS},
                                    "split_k": (0,), "recon_chunk_n": (0,)}, GROUPS)
    assert [n for n, _ in warm_start_configs(decode_only)] == ["default"]


def test_standard_is_small_enough_for_grid() -> None:
    # A trial costs ~0.2-1 s on a GPU: an exhaustive grid must stay within minutes.
    assert STANDARD.size <= 600
    assert STANDARD.family_size(WGMMA) < STANDARD.family_size(TILED) < STANDARD.family_size(DECODE)
    assert STANDARD.family_size(STREAM) < STANDARD.family_size(TILED)


def _valid_everywhere(kernel: int, values: dict[str, int]) -> KernelConfig | None:
    try:
        cfg = KernelConfig(kernel=kernel, **values)
    except InvalidConfigError:
        return None
    if cfg.tiled and any(tiled_violation(b, cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages)
                         for b in KERNEL_BITS):
        return None
    if cfg.wgmma and any(wgmma_violation(b, cfg.wgmma_m, cfg.wgmma_n, cfg.wgmma_k, cfg.wgmma_stages)
                         for b in KERNEL_BITS):
        return None
    return cfg


def test_full_is_every_valid_tunable_choice() -> None:
    expected: set[str] = set()
    for kernel, own in ((DECODE, DECODE_FIELDS), (TILED, TILED_FIELDS), (WGMMA, WGMMA_FIELDS),
                        (STREAM, STREAM_FIELDS)):
        names = (*own, "split_k")
        for values in itertools.product(*(BY[f] for f in names)):
            cfg = _valid_everywhere(kernel, dict(zip(names, values, strict=True)))
            if cfg is not None:
                expected.add(cfg.variant_key())
    assert {c.variant_key() for c in FULL.variants()} == expected
    assert FULL.size == len(expected)
    assert FULL.recon_chunk_n == BY["recon_chunk_n"]


def test_a_tiled_point_valid_only_at_4_bits_is_left_out() -> None:
    # 8-bit 32x256x128 spills (sm_80), 4-bit does not: KernelConfig (4-bit) accepts it, but the
    # tuner would propose it for 8-bit layers too, where the dispatch refuses it.
    cfg = KernelConfig(kernel=TILED, tile_m=32, tile_n=256, tile_k=128, stages=3)
    assert tiled_violation(4, 32, 256, 128, 3) is None
    assert tiled_violation(8, 32, 256, 128, 3) is not None
    assert not FULL.contains(cfg) and not STANDARD.contains(cfg)
    assert FULL.contains(cfg.replace(tile_k=64))


def test_standard_is_inside_full() -> None:
    assert all(FULL.contains(cfg) for cfg in STANDARD.variants())


def test_standard_tiled_pipelines_are_the_deepest_that_fit() -> None:
    tiles = {(c.tile_m, c.tile_n, c.tile_k) for c in STANDARD.variants() if c.tiled}
    for tm, tn, tk in tiles:
        stages = {c.stages for c in STANDARD.variants()
                  if c.tiled and (c.tile_m, c.tile_n, c.tile_k) == (tm, tn, tk)}
        deep = {s for s in (3, 4) if _valid_everywhere(TILED, dict(tile_m=tm, tile_n=tn, tile_k=tk, stages=s))}
        assert stages == (deep or {2}), (tm, tn, tk)


def test_outside_points_are_not_contained() -> None:
    assert not STANDARD.contains(KernelConfig(max_q_gemm_rows_kernel=2, k_unroll=4))
    assert not STANDARD.contains(KernelConfig(recon_chunk_n=1024))
    assert not STANDARD.contains(KernelConfig(block_n=256, threads=512))
    assert not STANDARD.contains(KernelConfig(kernel=TILED, tile_m=16, tile_n=64))
    assert not STANDARD.contains(KernelConfig(kernel=TILED, split_k=3))
    with pytest.raises(InvalidConfigError):
        STANDARD.params(KernelConfig(split_k=3))
    decode_only = Space.build("d", {"max_q_gemm_rows_kernel": (32,), "k_unroll": (2,),
                                    "tile": ((64, 64),), "split_k": (0,), "recon_chunk_n": (0,)}, GROUPS)
    assert not decode_only.contains(TILED_START)
    with pytest.raises(InvalidConfigError, match="no tiled kernel family"):
        decode_only.family(TILED)


def test_parameters_are_conditional_on_the_family() -> None:
    for cfg in (KernelConfig(), TILED_START):
        params = STANDARD.params(cfg)
        assert list(params)[0] == "kernel" and params["kernel"] == ("tiled" if cfg.tiled else "decode")
        assert set(params) == _family_names(STANDARD, cfg.kernel)
    assert not _family_names(STANDARD, DECODE) & _family_names(STANDARD, TILED) - {"kernel", "split_k"}
    assert STANDARD.params(TILED_START)["tiled_tile"] == "64x128x64x4"
    # Parameters of the family `kernel` does not pick are not read; the threshold and chunk
    # come from `base` alone.
    mixed = {**STANDARD.params(KernelConfig(block_n=128, threads=256)), **STANDARD.params(TILED_START)}
    base = PRESETS["exllamav2-0.0.11"].replace(recon_chunk_n=4096)
    got = STANDARD.from_params(mixed, base=base)
    assert got.variant_key() == TILED_START.variant_key()
    assert (got.max_q_gemm_rows, got.recon_chunk_n) == (base.max_q_gemm_rows, 4096)
    with pytest.raises(InvalidConfigError, match="kernel='cuda'"):
        STANDARD.from_params({**mixed, "kernel": "cuda"})


def test_coupled_fields_are_sampled_together() -> None:
    decode = {f.name: f for f in STANDARD.family(DECODE).factors}
    # k_unroll * ceil(rows/8) <= 8 couples rows and unroll: 32 rows allows unroll 2, not 4.
    assert (32, 2) in decode["rows_unroll"].combos and (32, 4) not in decode["rows_unroll"].combos
    assert all(t % bn == 0 for bn, t in decode["tile"].combos)
    tiled = {f.name: f for f in STANDARD.family(TILED).factors}
    assert set(tiled) == {"tiled_tile"}  # shared memory and registers couple all four fields
    assert (128, 256, 64, 2) in tiled["tiled_tile"].combos
    assert (128, 256, 64, 3) not in tiled["tiled_tile"].combos  # spills


def test_describe_names_both_families() -> None:
    text = STANDARD.describe()
    assert text.startswith(f"standard: {STANDARD.size} variants")
    for kernel, name in ((DECODE, "decode"), (TILED, "tiled")):
        assert f"{name} {STANDARD.family_size(kernel)} over" in text
    assert "tiled_tile (16x128x64x3/" in text and "split_k (0/1/2/4/8)" in text


def test_invalid_spaces_are_refused() -> None:
    ok: dict = {"max_q_gemm_rows_kernel": (4,), "k_unroll": (4,), "block_n": (64,),
                "threads": (128,), "split_k": (0,), "recon_chunk_n": (0,)}
    assert Space.build("x", ok, GROUPS).size == 1
    with pytest.raises(InvalidConfigError, match="not valid"):
        Space.build("x", {**ok, "tile": ((64, 192),)}, GROUPS)  # 3 warps along K
    with pytest.raises(InvalidConfigError, match="outside"):
        Space.build("x", {**ok, "split_k": (65,)}, GROUPS)  # outside TUNABLES range
    with pytest.raises(InvalidConfigError):
        Space.build("x", {**ok, "recon_chunk_n": (1000,)}, GROUPS)  # not a multiple of 256
    # Sampling coupled fields independently would propose invalid configs: refused.
    with pytest.raises(InvalidConfigError, match="couples"):
        Space.build("x", {**ok, "max_q_gemm_rows_kernel": (8, 32), "k_unroll": (2, 4)}, {})
    tiled = {**ok, "kernel": (DECODE, TILED), "tile_m": (16, 128), "tile_n": (256,),
             "tile_k": (64,), "stages": (2, 3)}
    assert Space.build("x", tiled, GROUPS).family_size(TILED) == 3  # 128x256x64x3 dropped
    with pytest.raises(InvalidConfigError, match="tiled .* couples"):
        Space.build("x", tiled, {})  # 128x256x64 with 3 stages spills
    with pytest.raises(InvalidConfigError, match="no choices for tile_m"):
        Space.build("x", {**ok, "kernel": (DECODE, TILED)}, GROUPS)
    with pytest.raises(InvalidConfigError, match="mixes"):
        Space.build("x", tiled, {"odd": ("block_n", "tile_n")})
    with pytest.raises(InvalidConfigError, match="not a kernel family"):
        Space.build("x", {**ok, "kernel": (7,)}, GROUPS)
    with pytest.raises(InvalidConfigError, match="unknown space"):
        get_space("huge")


def _fake(space: Space, seen: list[KernelConfig]):  # noqa: ANN202
    """An objective with structure for a model to chase (a fixed pseudo-random value per
    variant), recording what was proposed."""
    def objective(trial: optuna.Trial) -> float:
        cfg = space.suggest(trial)  # would raise for an invalid combination
        assert space.contains(cfg)
        assert set(trial.params) == _family_names(space, cfg.kernel)
        seen.append(cfg)
        return zlib.crc32(cfg.variant_key().encode()) / 2**32 + (0.5 if cfg.tiled else 0.0)
    return objective


@pytest.mark.parametrize("sampler,trials", [("tpe", 150), ("random", 150), ("grid", 150),
                                            ("gp", 20)])  # gp: ~0.3 s an ask
def test_samplers_only_propose_valid_points(sampler: str, trials: int) -> None:
    seen: list[KernelConfig] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)  # none leaks out
        study = optuna.create_study(sampler=st.make_sampler(sampler, FULL, seed=3))
    study.optimize(_fake(FULL, seen), n_trials=trials)
    assert len(seen) == trials
    assert {c.kernel for c in seen} == {DECODE, TILED, WGMMA, STREAM}  # every family is searched
    if sampler == "grid":
        assert len({c.variant_key() for c in seen}) == trials  # never a point twice


def test_grid_visits_each_variant_once_and_stops() -> None:
    sampler = st.make_sampler("grid", STANDARD, seed=0)
    study = optuna.create_study(sampler=sampler)
    seen: list[KernelConfig] = []
    for name, cfg in warm_start_configs(STANDARD):
        study.enqueue_trial(STANDARD.params(cfg), user_attrs={"preset": name})
    assert not sampler.is_exhausted(study)
    study.optimize(_fake(STANDARD, seen), n_trials=STANDARD.size + 10)
    assert len(seen) == STANDARD.size  # the sampler stopped the study itself
    assert sorted(c.variant_key() for c in seen) == sorted(c.variant_key() for c in STANDARD.variants())
    assert sampler.is_exhausted(study)


def test_the_tuner_searches_both_families_exhaustively() -> None:
    ev = SyntheticEvaluator(Problem(4096, 4096), WORKLOADS["decode"])
    storage = optuna.storages.InMemoryStorage()
    settings = st.TuneSettings(space=TWO, sampler="grid", seed=0, trials=TWO.size + 5)
    out = st.tune_problem(ev, storage, settings)
    measured = [k for k, m in ev.fused_measured if m == 1]
    assert sorted(measured) == sorted(c.variant_key() for c in TWO.variants())
    assert any(k.startswith("tiled") for k in measured)
    assert out.trials_total == TWO.size  # stopped when covered, though 5 more were allowed
    again = st.tune_problem(SyntheticEvaluator(ev.problem, ev.workload), storage, settings)
    assert again.trials_run == 0  # a finished grid asks for nothing more


def test_the_cli_and_readme_state_the_space_sizes() -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from gemmtune.cli import main

    text = " ".join(CliRunner().invoke(main, ["tune", "--help"]).output.split())
    assert (f"standard: {STANDARD.size} kernel variants (decode kernel "
            f"{STANDARD.family_size(DECODE)}, tiled kernel {STANDARD.family_size(TILED)}, stream "
            f"kernel {STANDARD.family_size(STREAM)}, wgmma kernel {STANDARD.family_size(WGMMA)} on "
            f"sm_90 cards)") in text
    assert f"full: every valid choice ({FULL.size})" in text
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"from the `standard` space ({STANDARD.size})" in readme
    assert f"decode kernel ({STANDARD.family_size(DECODE)}:" in readme
    assert f"tiled kernel ({STANDARD.family_size(TILED)}:" in readme
    assert f"stream kernel ({STANDARD.family_size(STREAM)}:" in readme
    assert (f"{FULL.family_size(DECODE)} + {FULL.family_size(TILED)} + {FULL.family_size(WGMMA)} "
            f"+ {FULL.family_size(STREAM)} = {FULL.size}") in readme
    assert f"({STANDARD.size} trials for `standard`" in readme
