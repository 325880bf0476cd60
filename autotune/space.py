"""The search space, declared once: which `KernelConfig` values the tuner may try.

`KernelConfig` (with its `TUNABLES` table and its validation) says what the kernels *can* run
with; a `Space` says what the tuner *tries*. Two named spaces exist:

- `standard` (the default): 555 kernel variants on an sm_90 card (decode 360, tiled 115, stream
  45, wgmma 35; 520 elsewhere, where the wgmma family is absent), small enough that `--sampler
  grid` (exhaustive) finishes in minutes on a GPU (a trial costs ~0.2-1 s), and a model-based
  sampler sees a good share of it in ~60 trials.
- `full`: every choice of `TUNABLES` that passes validation (`Space.size` says how many).

What Optuna samples, and what it does not:

- The space is *conditional* (define-by-run): the `kernel` parameter comes first and picks the
  fused-kernel family (`"decode"`, `"tiled"`, `"stream"`, `"wgmma"`); only that family's
  parameters are sampled after it (the other families' fields stay at their defaults, which
  `KernelConfig` requires), then the parameters all families share. A family's variants are the
  product of its factors and the shared ones; the space's variants are the sum over its families.
- The fused-kernel variant fields are sampled as *factors*: fields that validation couples are
  sampled together as one categorical parameter whose choices are only the valid combinations,
  so an invalid config is never proposed (and exhausting the factors visits exactly the valid
  set). Decode kernel: `tile` = (block_n, threads), spelled `"64x128"` (threads a power-of-two
  multiple of block_n, at most 1024), and `rows_unroll` = (max_q_gemm_rows_kernel, k_unroll),
  spelled `"16x4"` (k_unroll * ceil(rows / 8) <= 8 activation tiles in registers). Tiled kernel:
  `tiled_tile` = (tile_m, tile_n, tile_k, stages), spelled `"64x128x64x4"` (M x N x K of the
  block tile, then the pipeline depth): shared memory and the register bound
  (`kernels.config.tiled_violation`) couple all four. Shared: `split_k`.
- One space serves every problem, so a tiled point must pass the tiled rule at every bit width
  the kernels handle (`KERNEL_BITS`), not only at the 4 bits `KernelConfig` checks: otherwise the
  tuner would propose, for an 8-bit layer, a config the dispatch refuses when it binds the weight.
  Construction checks every point of every family, so a future constraint across factors fails
  loudly here instead of proposing configs the kernels reject.
- `max_q_gemm_rows` and `recon_chunk_n` are *not* sampled. Measurements are memoised per
  (variant, M) and per (recon_chunk_n, M), and the workload objective separates into a fused part
  and a reconstruct part, so for each sampled variant the best threshold and the best chunk are
  computed exactly (`gemmtune.autotune.objective.complete_variant`). Sampling them would spend trials
  on what arithmetic settles. The space still declares the chunk choices.

Because the space is not a product, `--sampler grid` is Optuna's `BruteForceSampler` (it walks
the tree of conditional parameters), not `GridSampler`. The ExLlamaV2 presets and `default`
lie in both named spaces (`Space.contains`); the tiled kernel's default (`TILED_START`) is tried
right after them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from gemmtune.kernels.config import (
    DECODE,
    FAMILY_FIELDS,
    FAMILY_LABELS,
    PRESETS,
    STREAM,
    STREAM_FIELDS,
    TILED,
    TUNABLES,
    WGMMA,
    WGMMA_CAPABILITY,
    WGMMA_FIELDS,
    WGMMA_TILES,
    KernelConfig,
    tiled_violation,
    wgmma_violation,
)
from gemmtune.kernels.errors import InvalidConfigError
from gemmtune.kernels.problem import KERNEL_BITS

_TUNABLE = {t.name: t for t in TUNABLES}

COMPUTED_FIELDS = ("max_q_gemm_rows", "recon_chunk_n")
"""Chosen exactly per trial from the measurements, never sampled."""

VARIANT_FIELDS = tuple(f.name for f in fields(KernelConfig) if f.name not in COMPUTED_FIELDS)
"""Every field that names the fused-kernel launch: `kernel`, each family's own, the shared."""

SHARED_FIELDS = tuple(f for f in VARIANT_FIELDS
                      if f != "kernel" and all(f not in fs for fs in FAMILY_FIELDS.values()))
"""Fields both families read (`split_k`): sampled after the family's own."""


def _why_invalid(kernel: int, **values: int) -> str | None:
    """Why these values (others at defaults) are not a point the tuner may propose, or None.
    The rules themselves are `kernels.config`'s: `KernelConfig` validation, and for the tiled
    kernel `tiled_violation` at each bit width the kernels handle (one space serves them all)."""
    try:
        cfg = KernelConfig(kernel=kernel, **values)
    except InvalidConfigError as exc:
        return str(exc)
    if cfg.tiled:
        for bits in KERNEL_BITS:
            why = tiled_violation(bits, cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages)
            if why is not None:
                return why
    if cfg.wgmma:
        for bits in KERNEL_BITS:
            why = wgmma_violation(bits, cfg.wgmma_m, cfg.wgmma_n, cfg.wgmma_k, cfg.wgmma_stages)
            if why is not None:
                return why
    return None


WGMMA_SWITCH = "GEMMTUNE_WGMMA"
"""Set to 0 to keep the wgmma family out of the space on sm_90 cards, where it is offered by
default (to compare tunes with and without it, or to rule it out if a driver misbehaves)."""


def families_on(compute_capability: str, *, wgmma: bool | None = None) -> tuple[int, ...]:
    """The kernel families a card of this compute capability ("9.0") can run: decode, tiled and
    stream everywhere, wgmma only on sm_90 (it is built for sm_90a) unless switched off
    (`wgmma=False`, else the ``GEMMTUNE_WGMMA=0`` environment variable; see `WGMMA_SWITCH`)."""
    major, _, minor = compute_capability.partition(".")
    try:
        cc = (int(major), int(minor or 0))
    except ValueError:
        raise InvalidConfigError(f"compute capability {compute_capability!r} is not of the form 9.0") from None
    if wgmma is None:
        wgmma = os.environ.get(WGMMA_SWITCH, "").strip() != "0"
    # The stream family runs from sm_80 (its clusters, sm_90 only, are checked when bound).
    return (DECODE, TILED, WGMMA, STREAM) if cc == WGMMA_CAPABILITY and wgmma else (DECODE, TILED, STREAM)


def _valid(kernel: int, **values: int) -> bool:
    return _why_invalid(kernel, **values) is None


@dataclass(frozen=True)
class Factor:
    """One Optuna parameter: a field, or fields sampled together because validation couples
    them. `combos` are the allowed value tuples, in `fields` order; `names`, when given, are the
    labels of the combos (the `kernel` parameter's `"decode"` / `"tiled"`)."""

    name: str
    fields: tuple[str, ...]
    combos: tuple[tuple[int, ...], ...]
    names: tuple[str, ...] = ()

    def label(self, combo: tuple[int, ...]) -> int | str:
        """A single field's value as is; coupled fields as `"64x128"`; a named combo by name."""
        if self.names:
            return self.names[self.combos.index(combo)]
        return combo[0] if len(self.fields) == 1 else "x".join(str(v) for v in combo)

    def parse(self, label: Any) -> tuple[int, ...]:
        if self.names:
            combo = self.combos[self.names.index(label)] if label in self.names else ()
        else:
            try:
                combo = ((int(label),) if len(self.fields) == 1
                         else tuple(int(v) for v in str(label).split("x")))
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
class Family:
    """The factors one fused-kernel family samples when the `kernel` parameter picks it."""

    kernel: int
    factors: tuple[Factor, ...]

    @property
    def name(self) -> str:
        return FAMILY_LABELS[self.kernel]


@dataclass(frozen=True)
class Space:
    """Kernel families, each a product of its own factors and the shared ones (plus the
    reconstruct chunk choices), every point a valid config.

    Build one with `Space.build`, which derives each factor's valid combinations from
    `KernelConfig` validation.
    """

    name: str
    families: tuple[Family, ...]
    shared: tuple[Factor, ...]
    recon_chunk_n: tuple[int, ...]

    def __post_init__(self) -> None:
        kernels = [fam.kernel for fam in self.families]
        if not kernels or len(set(kernels)) != len(kernels) or not set(kernels) <= set(FAMILY_FIELDS):
            raise InvalidConfigError(
                f"space {self.name!r}: families must be distinct kernels of {sorted(FAMILY_FIELDS)}")
        for fam in self.families:
            covered = [f for factor in fam.factors for f in factor.fields]
            if sorted(covered) != sorted(FAMILY_FIELDS[fam.kernel]):
                raise InvalidConfigError(
                    f"space {self.name!r}: the {fam.name} factors must cover each of "
                    f"{FAMILY_FIELDS[fam.kernel]} exactly once")
        if sorted(f for factor in self.shared for f in factor.fields) != sorted(SHARED_FIELDS):
            raise InvalidConfigError(
                f"space {self.name!r}: shared factors must cover each of {SHARED_FIELDS} exactly once")
        names = self.param_names
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"space {self.name!r}: factor names repeat")
        for factor in self.all_factors:
            if not factor.combos or len(set(factor.combos)) != len(factor.combos):
                raise InvalidConfigError(f"space {self.name!r}: {factor.name} empty or repeated")
        if not self.recon_chunk_n or len(set(self.recon_chunk_n)) != len(self.recon_chunk_n):
            raise InvalidConfigError(f"space {self.name!r}: recon_chunk_n empty or repeated")
        for chunk in self.recon_chunk_n:
            if isinstance(chunk, bool) or not isinstance(chunk, int):
                raise InvalidConfigError(f"space {self.name!r}: recon_chunk_n={chunk!r} is not an int")
            KernelConfig(recon_chunk_n=chunk)  # range and multiple-of-256 check
        for fam in self.families:
            for kw in self._points(fam):
                why = _why_invalid(fam.kernel, **kw)
                if why is not None:
                    raise InvalidConfigError(
                        f"space {self.name!r}: {fam.name} {kw} is not a valid config ({why}); if a "
                        "constraint couples fields of different factors, sample them together "
                        "(GROUPS)"
                    )

    @classmethod
    def build(
        cls,
        name: str,
        choices: Mapping[str, Iterable[Any]],
        groups: Mapping[str, tuple[str, ...]] | None = None,
    ) -> Space:
        """Per-field choices -> families of factors.

        `choices["kernel"]` lists the families (`DECODE`, `TILED`; absent: the decode kernel
        alone, what every space was before the tiled kernel); each family needs choices for its
        own fields, and `split_k` is shared. `groups` names coupled fields (parameter name ->
        fields of one family); their combinations are the valid ones (by `KernelConfig`
        validation and the tiled rule at every bit width, other fields at their defaults) of the
        product of the fields' choices, or, when `choices` has an entry under the group's own
        name, exactly those combinations (checked). A group of a family the space leaves out is
        ignored."""
        groups = dict(groups or {})
        kernels = tuple(choices.get("kernel", (DECODE,)))
        families: list[Family] = []
        for kernel in kernels:
            if kernel not in FAMILY_FIELDS:
                raise InvalidConfigError(f"space {name!r}: kernel={kernel!r} is not a kernel family")
            own = FAMILY_FIELDS[kernel]
            factors: list[Factor] = []
            grouped: set[str] = set()
            for pname, fs in groups.items():
                if not set(fs) & set(own):
                    continue
                if not set(fs) <= set(own):
                    raise InvalidConfigError(
                        f"space {name!r}: group {pname} mixes {FAMILY_LABELS[kernel]} fields with others")
                grouped |= set(fs)
                if pname in choices:
                    combos = tuple(tuple(c) for c in choices[pname])
                    bad = [c for c in combos if not _valid(kernel, **dict(zip(fs, c, strict=True)))]
                    if bad:
                        raise InvalidConfigError(
                            f"space {name!r}: {pname} combinations {bad} are not valid")
                else:
                    combos = tuple(c for c in itertools.product(*(_given(name, choices, f) for f in fs))
                                   if _valid(kernel, **dict(zip(fs, c, strict=True))))
                factors.append(Factor(pname, tuple(fs), combos))
            factors += [_single(name, f, _given(name, choices, f)) for f in own if f not in grouped]
            families.append(Family(kernel, tuple(factors)))
        shared = tuple(_single(name, f, _given(name, choices, f)) for f in SHARED_FIELDS)
        return cls(name, tuple(families), shared, _given(name, choices, "recon_chunk_n"))

    # -- structure -----------------------------------------------------------------------------
    @property
    def kernel_factor(self) -> Factor:
        """The first parameter: which family a trial samples."""
        return Factor("kernel", ("kernel",), tuple((fam.kernel,) for fam in self.families),
                      tuple(fam.name for fam in self.families))

    @property
    def all_factors(self) -> tuple[Factor, ...]:
        return (self.kernel_factor, *(f for fam in self.families for f in fam.factors), *self.shared)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter name of the space (a trial has `kernel`, its family's and the shared)."""
        return tuple(f.name for f in self.all_factors)

    def for_device(self, compute_capability: str) -> Space:
        """This space without the families the card cannot run (the device decides; the name
        stays, so studies keep theirs: the device fingerprint is in a study's name already)."""
        keep = families_on(compute_capability)
        families = tuple(fam for fam in self.families if fam.kernel in keep)
        if families == self.families:
            return self
        if not families:
            raise InvalidConfigError(
                f"space {self.name!r} has no kernel family a sm_{compute_capability} card runs")
        return Space(self.name, families, self.shared, self.recon_chunk_n)

    @property
    def study_label(self) -> str:
        """The space's part of a study name: its name, plus `+wgmma` when the wgmma family is in
        it. Optuna ties the `kernel` parameter to one set of choices per study, so a tune resumed
        with `GEMMTUNE_WGMMA=0` flipped on the same card must be another study (it failed with
        "CategoricalDistribution does not support dynamic value space"). The suffix dates from
        when the family was opt-in; keeping it lets the studies stored then resume."""
        return f"{self.name}+wgmma" if any(fam.kernel == WGMMA for fam in self.families) else self.name

    def family(self, kernel: int) -> Family:
        for fam in self.families:
            if fam.kernel == kernel:
                return fam
        raise InvalidConfigError(
            f"the {self.name!r} space has no {FAMILY_LABELS.get(kernel, kernel)} kernel family")

    def trial_factors(self, kernel: int) -> tuple[Factor, ...]:
        """The factors a trial of `kernel`'s family samples, in order (after `kernel` itself)."""
        return (*self.family(kernel).factors, *self.shared)

    # -- size and enumeration ------------------------------------------------------------------
    def family_size(self, kernel: int) -> int:
        return math.prod(len(f.combos) for f in self.trial_factors(kernel))

    @property
    def size(self) -> int:
        """Number of kernel variants (points of every family). Chunk and threshold are not
        multiplied in: they are computed per trial."""
        return sum(self.family_size(fam.kernel) for fam in self.families)

    def _points(self, fam: Family) -> Iterator[dict[str, int]]:
        factors = self.trial_factors(fam.kernel)
        for combos in itertools.product(*(f.combos for f in factors)):
            yield {name: v for factor, combo in zip(factors, combos, strict=True)
                   for name, v in zip(factor.fields, combo, strict=True)}

    def variants(self) -> Iterator[KernelConfig]:
        """Every kernel variant of the space, family by family (threshold and chunk at their
        defaults)."""
        for fam in self.families:
            for kw in self._points(fam):
                yield KernelConfig(kernel=fam.kernel, **kw)

    # -- Optuna glue ---------------------------------------------------------------------------
    def suggest(self, trial: Any) -> KernelConfig:
        """Ask an Optuna trial for one variant, define-by-run: the family first, then only its
        parameters and the shared ones. Every answer is valid by construction."""
        kf = self.kernel_factor
        params: dict[str, Any] = {kf.name: trial.suggest_categorical(kf.name, kf.choices)}
        for f in self.trial_factors(kf.parse(params[kf.name])[0]):
            params[f.name] = trial.suggest_categorical(f.name, f.choices)
        return self.from_params(params)

    def from_params(self, params: Mapping[str, Any], base: KernelConfig | None = None) -> KernelConfig:
        """Trial parameters -> `KernelConfig` (computed fields come from `base`). Parameters of
        the family `kernel` does not pick are not read."""
        kf = self.kernel_factor
        kernel = kf.parse(params[kf.name])[0]
        values: dict[str, int] = {f: getattr(base or KernelConfig(), f) for f in COMPUTED_FIELDS}
        for factor in self.trial_factors(kernel):
            values.update(zip(factor.fields, factor.parse(params[factor.name]), strict=True))
        return KernelConfig(kernel=kernel, **values)

    def params(self, config: KernelConfig) -> dict[str, Any]:
        """`KernelConfig` -> the trial parameters naming its variant (for `enqueue_trial`), in
        the order `suggest` asks for them. Raises if the variant is not in the space."""
        if not self.contains(config, check_chunk=False):
            raise InvalidConfigError(f"{config.key()} is not in the {self.name!r} space")
        kf = self.kernel_factor
        return {kf.name: kf.label(kf.of(config)),
                **{f.name: f.label(f.of(config)) for f in self.trial_factors(config.kernel)}}

    def contains(self, config: KernelConfig, check_chunk: bool = True) -> bool:
        """Whether the tuner can reach `config`: its family is in the space, its variant is a
        point of the family and its chunk is a choice. Any valid `max_q_gemm_rows` is reachable
        (it is computed, not sampled)."""
        if check_chunk and config.recon_chunk_n not in self.recon_chunk_n:
            return False
        if config.kernel not in {fam.kernel for fam in self.families}:
            return False
        return all(f.of(config) in f.combos for f in self.trial_factors(config.kernel))

    def describe(self) -> str:
        """One line for logs and `--help`."""
        def listed(factors: Iterable[Factor]) -> str:
            return ", ".join(f"{f.name} ({'/'.join(str(c) for c in f.choices)})" for f in factors)

        fams = "; ".join(f"{fam.name} {self.family_size(fam.kernel)} over {listed(fam.factors)}"
                         for fam in self.families)
        return (f"{self.name}: {self.size} variants, kernel {'/'.join(self.kernel_factor.choices)}: "
                f"{fams}; both with {listed(self.shared)}; recon_chunk_n {self.recon_chunk_n} and "
                "the fused/reconstruct threshold chosen exactly per trial")


def _given(space: str, choices: Mapping[str, Iterable[Any]], field: str) -> tuple[Any, ...]:
    try:
        return tuple(choices[field])
    except KeyError:
        raise InvalidConfigError(f"space {space!r}: no choices for {field}") from None


def _single(space: str, field: str, values: Iterable[Any]) -> Factor:
    """A factor of one field, its choices checked against the field's declared range."""
    values = tuple(values)
    t = _TUNABLE[field]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not t.lo <= v <= t.hi]
    if bad:
        raise InvalidConfigError(f"space {space!r}: {field} choices {bad} are outside {t.lo}..{t.hi}")
    return Factor(field, (field,), tuple((v,) for v in values))


GROUPS: dict[str, tuple[str, ...]] = {
    "rows_unroll": ("max_q_gemm_rows_kernel", "k_unroll"),
    "tile": ("block_n", "threads"),
    "tiled_tile": ("tile_m", "tile_n", "tile_k", "stages"),
    "wgmma_tile": WGMMA_FIELDS,
    "stream_tile": STREAM_FIELDS,
}
"""Fields validation couples: sampled together (labels `"16x4"`, `"64x128"`, `"64x128x64x4"`)."""

def _pipelines(tiles: Iterable[tuple[int, int]], tile_ks: Iterable[int]) -> tuple[tuple[int, ...], ...]:
    """(tile_m, tile_n, tile_k, stages) for each tile and stage length: 3 and 4 stages where the
    rule allows them at every bit width, else 2 where that fits (as the lead's kernel bench
    sweeps: 2 stages leave one stage of loads in flight, which only a tile that fits no deeper
    pipeline should settle for)."""
    out: list[tuple[int, ...]] = []
    for (tm, tn), tk in itertools.product(tiles, tile_ks):
        fits = [st for st in (2, 3, 4) if _valid(TILED, tile_m=tm, tile_n=tn, tile_k=tk, stages=st)]
        out += [(tm, tn, tk, st) for st in ([st for st in fits if st >= 3] or fits[:1])]
    return tuple(out)


def _wgmma_pipelines(tiles: Iterable[tuple[int, int]], wgmma_ks: Iterable[int]) -> tuple[tuple[int, ...], ...]:
    """(wgmma_m, wgmma_n, wgmma_k, wgmma_stages): each tile and stage length at the deepest of
    2..4 stages the wgmma rule allows at every bit width (the weights stream through STAGES - 1
    stages in flight: more is better until shared memory runs out)."""
    out: list[tuple[int, ...]] = []
    for (tm, tn), tk in itertools.product(tiles, wgmma_ks):
        fits = [st for st in (2, 3, 4) if _valid(WGMMA, wgmma_m=tm, wgmma_n=tn, wgmma_k=tk, wgmma_stages=st)]
        out += [(tm, tn, tk, fits[-1])] if fits else []
    return tuple(out)


STREAM_TILES = ((1, 8, 8, 2), (1, 8, 4, 4), (1, 4, 8, 4), (1, 16, 8, 2), (1, 16, 4, 2), (1, 8, 16, 2),
                (1, 4, 8, 3), (1, 8, 8, 3), (1, 16, 4, 3))
"""The stream family's (warps_n, warps_k, chunk, slots) in the standard space."""

STANDARD = Space.build(
    "standard",
    {
        "kernel": (DECODE, TILED, WGMMA, STREAM),
        # ExLlamaV2's 4 and 8 rows per block, 16, the default 32, and 64 (measured on an H100 to
        # win from M = 48 on the 70B shapes). Fewer than 4 rows change nothing at M <= 8 (a block
        # holds every row anyway) and only lose above; they stay in `full`.
        "max_q_gemm_rows_kernel": (4, 8, 16, 32, 64),
        "k_unroll": (1, 2, 4),
        # (block_n, threads): 64 and 128 wide with 1, 2 or 4 (64) / 1 or 2 (128) warps along K,
        # and 32 wide (many small blocks, for narrow N) with 4 warps along K. 64x128 is default.
        "tile": ((32, 128), (64, 64), (64, 128), (64, 256), (128, 128), (128, 256)),
        # Tiled: 16 to 128 rows by 128 or 256 columns (the 64-column tiles stay in `full`),
        # stages of 64 and 128. 64x256 fits only stages of 64, 128x256 only 2 of them and 8-bit
        # 16x256x128 only 2 (ptxas spills otherwise): kept, at 2, rather than losing the widest.
        "tiled_tile": _pipelines(itertools.product((16, 32, 64, 128), (128, 256)), (64, 128)),
        # wgmma (sm_90 cards only, `Space.for_device`): every built tile, stages of 64.
        "wgmma_tile": _wgmma_pipelines(WGMMA_TILES, (64,)),
        # stream (warps_n, warps_k, chunk, slots): 8 or 16 warps a block, 16-64 KB of weights in
        # flight a block in chunks of 2-8 KB; split_k is its cluster size.
        "stream_tile": STREAM_TILES,
        # 0 lets the launcher choose from the SM count; 1 = no split; 2..8 explicit.
        "split_k": (0, 1, 2, 4, 8),
        "recon_chunk_n": (0, 4096),
    },
    GROUPS,
)
"""decode: rows_unroll 12 (32 rows with unroll <= 2, 64 with 1) x tile 6 x split_k 5 = 360;
tiled: tiled_tile 23 x split_k 5 = 115; wgmma: wgmma_tile 8 x split_k 5 = 40 (sm_90 only);
stream: stream_tile 9 x split_k 5 = 45; 2 chunks resolved per trial (`STANDARD.size` variants)."""

FULL = Space.build("full", {t.name: t.choices for t in TUNABLES}, GROUPS)
"""Every TUNABLES choice that is a valid config: decode rows_unroll 36 x tile 9 x split_k 9 = 2916;
tiled tiled_tile 58 (12 tiles x tile_k 2 x stages 3, less what the rule refuses at 4 or 8 bits)
x split_k 9 = 522; 3438 variants, 6 chunks resolved per trial."""

SPACES: dict[str, Space] = {"standard": STANDARD, "full": FULL}

STREAM_START = KernelConfig(kernel=STREAM)
"""The stream kernel's default (8 warps along K, 2 slots of 8 steps, cluster chosen per M), tried
after the block-tile defaults."""

WGMMA_START = KernelConfig(kernel=WGMMA)
"""The wgmma kernel's default (64x256, 4 stages of 64, automatic split), tried after the tiled
default where the card runs the family."""

TILED_START = KernelConfig(kernel=TILED)
"""The tiled kernel's default (64x128, 4 stages of 64, automatic split), tried right after the
presets (which are all decode configs): one measured point on the tiled branch from the start
gives a model-based sampler something to compare the families by, where otherwise only its
random start-up trials would land there. Not a preset: the runtime's default stays the decode
kernel's."""


def get_space(name: str) -> Space:
    try:
        return SPACES[name]
    except KeyError:
        raise InvalidConfigError(f"unknown space {name!r} (known: {', '.join(SPACES)})") from None


def warm_start_configs(space: Space) -> list[tuple[str, KernelConfig]]:
    """Presets the study tries first (`default` first), then the tiled default, each where its
    variant lies in the space. A start point outside a custom space is left out rather than
    failing the run."""
    starts = [*PRESETS.items(), ("tiled-default", TILED_START), ("wgmma-default", WGMMA_START),
              ("stream-default", STREAM_START)]
    return [(n, c) for n, c in starts if space.contains(c, check_chunk=False)]
