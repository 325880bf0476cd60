"""The search space, declared once: which `KernelConfig` values the tuner may try.

`KernelConfig` (with its `TUNABLES` table and its validation) says what the kernels *can* run
with; a `Space` says what the tuner *tries*. Two named spaces exist:

- `standard` (the default): 360 kernel variants, small enough that `--sampler grid` (exhaustive)
  finishes in minutes on a GPU (a trial costs ~0.2-1 s), and a model-based sampler sees a good
  share of it in ~60 trials.
- `full`: every choice of `TUNABLES` that passes `KernelConfig` validation: 2916 variants.

What Optuna samples, and what it does not:

- The fused-kernel variant fields are sampled, as *factors*: fields that KernelConfig's
  validation couples are sampled together as one categorical parameter whose choices are only
  the valid combinations, so an invalid config is never proposed (and a grid over factors is
  exactly the valid set). Today two pairs are coupled:
  `tile` = (block_n, threads), spelled `"64x128"` (threads a power-of-two multiple of block_n,
  at most 1024), and `rows_unroll` = (max_q_gemm_rows_kernel, k_unroll), spelled `"16x4"`
  (k_unroll * ceil(rows / 8) <= 8 activation tiles in registers). `split_k` stands alone.
  Construction checks every point of the product, so a future constraint across factors fails
  loudly here instead of proposing configs the kernels reject.
- `max_q_gemm_rows` and `recon_chunk_n` are *not* sampled. Measurements are memoised per
  (variant, M) and per (recon_chunk_n, M), and the workload objective separates into a fused part
  and a reconstruct part, so for each sampled variant the best threshold and the best chunk are
  computed exactly (`gemmtune.autotune.objective.complete_variant`). Sampling them would spend trials
  on what arithmetic settles. The space still declares the chunk choices.

The ExLlamaV2 presets and `default` lie in both named spaces (`Space.contains`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from gemmtune.kernels.config import LATE_FIELDS, PRESETS, TUNABLES, KernelConfig
from gemmtune.kernels.errors import InvalidConfigError

_TUNABLE = {t.name: t for t in TUNABLES}

COMPUTED_FIELDS = ("max_q_gemm_rows", "recon_chunk_n")
"""Chosen exactly per trial from the measurements, never sampled."""

# The tiled kernel's fields are not searched yet (they stay at their defaults: decode kernel).
VARIANT_FIELDS = tuple(f.name for f in fields(KernelConfig)
                       if f.name not in COMPUTED_FIELDS and f.name not in LATE_FIELDS)


def _why_invalid(**values: int) -> str | None:
    """KernelConfig's objection to these values (others at defaults), or None if valid (the
    rules themselves are `kernels.config.launch_violation`)."""
    try:
        KernelConfig(**values)
    except InvalidConfigError as exc:
        return str(exc)
    return None


def _valid(**values: int) -> bool:
    return _why_invalid(**values) is None


@dataclass(frozen=True)
class Factor:
    """One Optuna parameter: a field, or fields sampled together because validation couples
    them. `combos` are the allowed value tuples, in `fields` order."""

    name: str
    fields: tuple[str, ...]
    combos: tuple[tuple[int, ...], ...]

    def label(self, combo: tuple[int, ...]) -> int | str:
        """A single field's value as is; a coupled pair as `"64x128"`."""
        return combo[0] if len(self.fields) == 1 else "x".join(str(v) for v in combo)

    def parse(self, label: Any) -> tuple[int, ...]:
        try:
            combo = (int(label),) if len(self.fields) == 1 else tuple(int(v) for v in str(label).split("x"))
        except ValueError:
            combo = ()
        if combo not in self.combos:
            raise InvalidConfigError(f"{self.name}={label!r} is not a choice of this space")
        return combo

    @property
    def choices(self) -> list[int | str]:
        return [self.label(c) for c in self.combos]

    def of(self, config: KernelConfig) -> tuple[int, ...]:
        return tuple(getattr(config, f) for f in self.fields)


@dataclass(frozen=True)
class Space:
    """A product of factors (plus the reconstruct chunk choices), every point a valid config.

    Build one with `Space.build`, which derives each factor's valid combinations from
    `KernelConfig` validation.
    """

    name: str
    factors: tuple[Factor, ...]
    recon_chunk_n: tuple[int, ...]

    def __post_init__(self) -> None:
        covered = [f for factor in self.factors for f in factor.fields]
        if sorted(covered) != sorted(VARIANT_FIELDS):
            raise InvalidConfigError(
                f"space {self.name!r}: factors must cover each of {VARIANT_FIELDS} exactly once"
            )
        if len({f.name for f in self.factors}) != len(self.factors):
            raise InvalidConfigError(f"space {self.name!r}: factor names repeat")
        for factor in self.factors:
            if not factor.combos or len(set(factor.combos)) != len(factor.combos):
                raise InvalidConfigError(f"space {self.name!r}: {factor.name} empty or repeated")
        if not self.recon_chunk_n or len(set(self.recon_chunk_n)) != len(self.recon_chunk_n):
            raise InvalidConfigError(f"space {self.name!r}: recon_chunk_n empty or repeated")
        for chunk in self.recon_chunk_n:
            if isinstance(chunk, bool) or not isinstance(chunk, int):
                raise InvalidConfigError(f"space {self.name!r}: recon_chunk_n={chunk!r} is not an int")
            KernelConfig(recon_chunk_n=chunk)  # range and multiple-of-256 check
        for values in itertools.product(*(f.combos for f in self.factors)):
            kw = {name: v for factor, combo in zip(self.factors, values, strict=True)
                  for name, v in zip(factor.fields, combo, strict=True)}
            why = _why_invalid(**kw)
            if why is not None:
                raise InvalidConfigError(
                    f"space {self.name!r}: {kw} is not a valid config ({why}); if a constraint "
                    "couples fields of different factors, sample them together (GROUPS)"
                )

    @classmethod
    def build(
        cls,
        name: str,
        choices: Mapping[str, Iterable[Any]],
        groups: Mapping[str, tuple[str, ...]] | None = None,
    ) -> Space:
        """Per-field choices -> factors. `groups` names coupled fields (parameter name ->
        fields); their combinations are the valid ones (by `KernelConfig` validation, other
        fields at their defaults) of the product of the fields' choices, or, when `choices`
        has an entry under the group's own name, exactly those combinations (checked)."""
        groups = dict(groups or {})
        grouped = {f for fs in groups.values() for f in fs}
        factors: list[Factor] = []
        for pname, fs in groups.items():
            if pname in choices:
                combos = tuple(tuple(c) for c in choices[pname])
                bad = [c for c in combos if not _valid(**dict(zip(fs, c, strict=True)))]
                if bad:
                    raise InvalidConfigError(f"space {name!r}: {pname} combinations {bad} are not valid")
            else:
                combos = tuple(c for c in itertools.product(*(tuple(choices[f]) for f in fs))
                               if _valid(**dict(zip(fs, c, strict=True))))
            factors.append(Factor(pname, tuple(fs), combos))
        for f in VARIANT_FIELDS:
            if f not in grouped:
                values = tuple(choices[f])
                t = _TUNABLE[f]
                bad = [v for v in values
                       if isinstance(v, bool) or not isinstance(v, int) or not t.lo <= v <= t.hi]
                if bad:
                    raise InvalidConfigError(
                        f"space {name!r}: {f} choices {bad} are outside {t.lo}..{t.hi}")
                factors.append(Factor(f, (f,), tuple((v,) for v in values)))
        return cls(name, tuple(factors), tuple(choices["recon_chunk_n"]))

    # -- size and enumeration ------------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors)

    @property
    def size(self) -> int:
        """Number of kernel variants (grid points). Chunk and threshold are not multiplied in:
        they are computed per trial."""
        return math.prod(len(f.combos) for f in self.factors)

    def grid(self) -> dict[str, list[Any]]:
        """The search space in `optuna.samplers.GridSampler`'s format."""
        return {f.name: f.choices for f in self.factors}

    def variants(self) -> Iterator[KernelConfig]:
        """Every kernel variant of the space (threshold and chunk at their defaults)."""
        names = self.param_names
        for labels in itertools.product(*(f.choices for f in self.factors)):
            yield self.from_params(dict(zip(names, labels, strict=True)))

    # -- Optuna glue ---------------------------------------------------------------------------
    def suggest(self, trial: Any) -> KernelConfig:
        """Ask an Optuna trial for one variant. Every answer is valid by construction."""
        return self.from_params({f.name: trial.suggest_categorical(f.name, f.choices)
                                 for f in self.factors})

    def from_params(self, params: Mapping[str, Any], base: KernelConfig | None = None) -> KernelConfig:
        """Trial parameters -> `KernelConfig` (computed fields come from `base`)."""
        values: dict[str, int] = {}
        for factor in self.factors:
            values.update(zip(factor.fields, factor.parse(params[factor.name]), strict=True))
        return (base or KernelConfig()).replace(**values)

    def params(self, config: KernelConfig) -> dict[str, Any]:
        """`KernelConfig` -> the trial parameters naming its variant (for `enqueue_trial`).
        Raises if the variant is not in the space."""
        if not self.contains(config, check_chunk=False):
            raise InvalidConfigError(f"{config.key()} is not in the {self.name!r} space")
        return {f.name: f.label(f.of(config)) for f in self.factors}

    def contains(self, config: KernelConfig, check_chunk: bool = True) -> bool:
        """Whether the tuner can reach `config`: its variant is a grid point and its chunk is a
        choice. Any valid `max_q_gemm_rows` is reachable (it is computed, not sampled)."""
        if check_chunk and config.recon_chunk_n not in self.recon_chunk_n:
            return False
        return all(f.of(config) in f.combos for f in self.factors)

    def describe(self) -> str:
        """One line for logs and `--help`."""
        parts = [f"{f.name} ({'/'.join(str(c) for c in f.choices)})" for f in self.factors]
        return (f"{self.name}: {self.size} variants over " + ", ".join(parts)
                + f"; recon_chunk_n {self.recon_chunk_n} and the fused/reconstruct threshold "
                "chosen exactly per trial")


GROUPS: dict[str, tuple[str, ...]] = {
    "rows_unroll": ("max_q_gemm_rows_kernel", "k_unroll"),
    "tile": ("block_n", "threads"),
}
"""Fields KernelConfig's validation couples: sampled together (labels `"16x4"`, `"64x128"`)."""

STANDARD = Space.build(
    "standard",
    {
        # ExLlamaV2's 4 and 8 rows per block, 16, the default 32, and 64 (measured on an H100 to
        # win from M = 48 on the 70B shapes). Fewer than 4 rows change nothing at M <= 8 (a block
        # holds every row anyway) and only lose above; they stay in `full`.
        "max_q_gemm_rows_kernel": (4, 8, 16, 32, 64),
        "k_unroll": (1, 2, 4),
        # (block_n, threads): 64 and 128 wide with 1, 2 or 4 (64) / 1 or 2 (128) warps along K,
        # and 32 wide (many small blocks, for narrow N) with 4 warps along K. 64x128 is default.
        "tile": ((32, 128), (64, 64), (64, 128), (64, 256), (128, 128), (128, 256)),
        # 0 lets the launcher choose from the SM count; 1 = no split; 2..8 explicit.
        "split_k": (0, 1, 2, 4, 8),
        "recon_chunk_n": (0, 4096),
    },
    GROUPS,
)
"""rows_unroll 12 (32 rows with unroll <= 2, 64 with 1) x tile 6 x split_k 5 = 360 variants; 2 chunks
resolved per trial."""

FULL = Space.build("full", {t.name: t.choices for t in TUNABLES}, GROUPS)
"""Every TUNABLES choice that is a valid config: rows_unroll 36 x tile 9 x split_k 9 = 2916
variants; 6 chunks resolved per trial."""

SPACES: dict[str, Space] = {"standard": STANDARD, "full": FULL}


def get_space(name: str) -> Space:
    try:
        return SPACES[name]
    except KeyError:
        raise InvalidConfigError(f"unknown space {name!r} (known: {', '.join(SPACES)})") from None


def warm_start_configs(space: Space) -> list[tuple[str, KernelConfig]]:
    """Presets the study tries first (`default` first) whose variant lies in the space. A
    preset outside a custom space is left out rather than failing the run."""
    return [(n, c) for n, c in PRESETS.items() if space.contains(c, check_chunk=False)]
