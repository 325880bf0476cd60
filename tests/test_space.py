"""The search space: every point launchable, presets reachable, grid small enough to run."""

from __future__ import annotations

import itertools

import optuna
import pytest
from gemmtune.autotune.space import (
    FULL,
    GROUPS,
    STANDARD,
    VARIANT_FIELDS,
    Space,
    get_space,
    warm_start_configs,
)
from gemmtune.kernels.config import PRESETS, TUNABLES, KernelConfig
from gemmtune.kernels.errors import InvalidConfigError


@pytest.mark.parametrize("space", [STANDARD, FULL], ids=lambda s: s.name)
def test_every_point_is_a_valid_distinct_config(space: Space) -> None:
    keys = set()
    for cfg in space.variants():  # KernelConfig construction validates each one
        assert cfg.threads <= 1024
        assert space.contains(cfg)
        keys.add(cfg.variant_key())
    assert len(keys) == space.size


@pytest.mark.parametrize("space", [STANDARD, FULL], ids=lambda s: s.name)
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_lie_inside_and_round_trip(space: Space, name: str) -> None:
    cfg = PRESETS[name]
    assert space.contains(cfg)
    assert space.from_params(space.params(cfg), base=cfg) == cfg
    assert [n for n, _ in warm_start_configs(space)][0] == "default"


def test_standard_is_small_enough_for_grid() -> None:
    # A trial costs ~0.2-1 s on a GPU: an exhaustive grid must stay within minutes.
    assert STANDARD.size == 360 <= 400


def test_full_is_every_valid_tunable_choice() -> None:
    by = {t.name: t.choices for t in TUNABLES}
    expected = set()
    for values in itertools.product(*(by[f] for f in VARIANT_FIELDS)):
        try:
            cfg = KernelConfig(**dict(zip(VARIANT_FIELDS, values, strict=True)))
        except InvalidConfigError:
            continue
        expected.add(cfg.variant_key())
    assert {c.variant_key() for c in FULL.variants()} == expected
    assert FULL.size == len(expected) == 2916
    assert FULL.recon_chunk_n == by["recon_chunk_n"]


def test_standard_is_inside_full() -> None:
    assert all(FULL.contains(cfg) for cfg in STANDARD.variants())


def test_outside_points_are_not_contained() -> None:
    assert not STANDARD.contains(KernelConfig(max_q_gemm_rows_kernel=2, k_unroll=4))
    assert not STANDARD.contains(KernelConfig(recon_chunk_n=1024))
    assert not STANDARD.contains(KernelConfig(block_n=256, threads=512))
    with pytest.raises(InvalidConfigError):
        STANDARD.params(KernelConfig(split_k=3))


def test_coupled_fields_are_sampled_together() -> None:
    # k_unroll * ceil(rows/8) <= 8 couples rows and unroll: 32 rows allows unroll 2, not 4.
    rows = dict(zip(STANDARD.param_names, STANDARD.factors, strict=True))["rows_unroll"]
    assert (32, 2) in rows.combos and (32, 4) not in rows.combos
    tile = dict(zip(STANDARD.param_names, STANDARD.factors, strict=True))["tile"]
    assert all(t % bn == 0 for bn, t in tile.combos)


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
    with pytest.raises(InvalidConfigError, match="unknown space"):
        get_space("huge")


def test_optuna_only_proposes_valid_points() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(200):
        trial = study.ask()
        cfg = FULL.suggest(trial)  # would raise for an invalid combination
        assert FULL.contains(cfg)
        assert set(trial.params) == set(FULL.param_names)
        study.tell(trial, 1.0)


def test_grid_covers_the_space_exactly() -> None:
    grid = STANDARD.grid()
    assert set(grid) == set(STANDARD.param_names)
    points = {STANDARD.from_params(dict(zip(grid, v, strict=True))).variant_key()
              for v in itertools.product(*grid.values())}
    assert len(points) == STANDARD.size
