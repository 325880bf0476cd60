"""The search space, declared once: which `KernelConfig` values the tuner may try.

`KernelConfig` (with its `TUNABLES` table) says what the kernels *can* run with; a `Space` says
what the tuner *tries*. Two named spaces exist:

- `standard` (the default): 360 kernel variants, small enough that `--sampler grid` (exhaustive)
  finishes in minutes on a GPU (a trial costs ~0.2-1 s), and every model-based sampler sees a
  good share of it in ~60 trials.
- `full`: every choice of `TUNABLES` that passes `KernelConfig` validation, 5616 variants.

What Optuna samples, and what it does not:

- The fused-kernel variant fields are sampled: `max_q_gemm_rows_kernel`, `split_k`, `k_unroll`
  and one `tile` parameter naming the pair `(block_n, threads)` as `"64x128"`. Block shape is one
  categorical rather than two numbers because its constraints (threads a power-of-two multiple of
  block_n, threads <= 1024) couple the two: a product of independent choices would contain
  combinations the kernel cannot launch, and an invalid combination must never be sampled.
- `max_q_gemm_rows` and `recon_chunk_n` are *not* sampled. Measurements are memoised per
  (variant, M) and per (recon_chunk_n, M), and the workload objective separates into a fused part
  and a reconstruct part, so for each sampled variant the best threshold and the best chunk are
  computed exactly (`gemmtune.autotune.study.complete_variant`). Sampling them would only spend
  trials on a choice that arithmetic settles. The space still declares the chunk choices.

Every point of a space is a valid `KernelConfig`, and the ExLlamaV2 presets and `default` lie in
both named spaces (`Space.contains`); tests hold both facts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gemmtune.kernels.config import PRESETS, TUNABLES, KernelConfig
from gemmtune.kernels.errors import InvalidConfigError

_TUNABLE = {t.name: t for t in TUNABLES}

MAX_THREADS = 1024
"""CUDA's limit on threads per block (every current NVIDIA and AMD card)."""

PARAM_NAMES: tuple[str, ...] = ("max_q_gemm_rows_kernel", "tile", "split_k", "k_unroll")
"""The Optuna parameters of a trial, in display order."""


def tile_name(block_n: int, threads: int) -> str:
    """Spelling of the `tile` parameter: `"{block_n}x{threads}"`."""
    return f"{block_n}x{threads}"


def parse_tile(name: str) -> tuple[int, int]:
    """`"64x128"` -> `(64, 128)` (block_n, threads)."""
    try:
        bn, t = name.split("x")
        return int(bn), int(t)
    except ValueError:
        raise InvalidConfigError(f"not a tile: {name!r} (expected block_nxthreads, e.g. 64x128)") from None


def _valid_tile(block_n: int, threads: int) -> bool:
    if threads > MAX_THREADS:
        return False
    try:
        KernelConfig(block_n=block_n, threads=threads)
    except InvalidConfigError:
        return False
    return True


@dataclass(frozen=True)
class Space:
    """A product of per-field choices (block shape taken as whole tiles), all of them valid.

    Construction checks every choice against `TUNABLES` ranges and `KernelConfig` validation, so
    a `Space` cannot describe a config the kernels reject.
    """

    name: str
    max_q_gemm_rows_kernel: tuple[int, ...]
    tiles: tuple[tuple[int, int], ...]
    """(block_n, threads) pairs."""
    split_k: tuple[int, ...]
    k_unroll: tuple[int, ...]
    recon_chunk_n: tuple[int, ...]
    """Chunk choices for the reconstruct path: chosen exactly per trial, never sampled."""

    def __post_init__(self) -> None:
        for fname in ("max_q_gemm_rows_kernel", "split_k", "k_unroll", "recon_chunk_n"):
            values = getattr(self, fname)
            t = _TUNABLE[fname]
            if not values:
                raise InvalidConfigError(f"space {self.name!r}: no choices for {fname}")
            if len(set(values)) != len(values):
                raise InvalidConfigError(f"space {self.name!r}: {fname} repeats a choice")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not t.lo <= v <= t.hi:
                    raise InvalidConfigError(
                        f"space {self.name!r}: {fname}={v!r} is outside {t.lo}..{t.hi}"
                    )
        for chunk in self.recon_chunk_n:
            KernelConfig(recon_chunk_n=chunk)  # raises for a chunk that is not a multiple of 256
        if not self.tiles or len(set(self.tiles)) != len(self.tiles):
            raise InvalidConfigError(f"space {self.name!r}: tiles empty or repeated")
        for bn, t in self.tiles:
            if not _valid_tile(bn, t):
                raise InvalidConfigError(
                    f"space {self.name!r}: tile block_n={bn} threads={t} is not launchable "
                    f"(threads must be a power-of-two multiple of block_n, at most {MAX_THREADS})"
                )

    # -- size and enumeration ------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of kernel variants (grid points). Chunk and threshold are not multiplied in:
        they are computed per trial."""
        return math.prod(len(v) for v in self._choices().values())

    def _choices(self) -> dict[str, tuple[Any, ...]]:
        return {
            "max_q_gemm_rows_kernel": self.max_q_gemm_rows_kernel,
            "tile": tuple(tile_name(bn, t) for bn, t in self.tiles),
            "split_k": self.split_k,
            "k_unroll": self.k_unroll,
        }

    def grid(self) -> dict[str, list[Any]]:
        """The search space in `optuna.samplers.GridSampler`'s format."""
        return {k: list(v) for k, v in self._choices().items()}

    def variants(self) -> Iterator[KernelConfig]:
        """Every kernel variant of the space (threshold and chunk left at their defaults)."""
        choices = self._choices()
        for values in itertools.product(*choices.values()):
            yield self.from_params(dict(zip(choices, values, strict=True)))

    # -- Optuna glue ---------------------------------------------------------------------------
    def suggest(self, trial: Any) -> KernelConfig:
        """Ask an Optuna trial for one variant. Every answer is a valid config by construction."""
        params = {name: trial.suggest_categorical(name, list(values))
                  for name, values in self._choices().items()}
        return self.from_params(params)

    @staticmethod
    def from_params(params: Mapping[str, Any], base: KernelConfig | None = None) -> KernelConfig:
        """Trial parameters -> `KernelConfig` (fields not sampled come from `base`)."""
        bn, threads = parse_tile(str(params["tile"]))
        return (base or KernelConfig()).replace(
            max_q_gemm_rows_kernel=int(params["max_q_gemm_rows_kernel"]),
            block_n=bn,
            threads=threads,
            split_k=int(params["split_k"]),
            k_unroll=int(params["k_unroll"]),
        )

    @staticmethod
    def params(config: KernelConfig) -> dict[str, Any]:
        """`KernelConfig` -> the trial parameters that name its variant (for `enqueue_trial`)."""
        return {
            "max_q_gemm_rows_kernel": config.max_q_gemm_rows_kernel,
            "tile": tile_name(config.block_n, config.threads),
            "split_k": config.split_k,
            "k_unroll": config.k_unroll,
        }

    def contains(self, config: KernelConfig) -> bool:
        """Whether the tuner can reach `config`: its variant is a grid point and its chunk is a
        choice. Any valid `max_q_gemm_rows` is reachable in principle (it is computed, not
        sampled), so it is not checked."""
        return (
            config.max_q_gemm_rows_kernel in self.max_q_gemm_rows_kernel
            and (config.block_n, config.threads) in self.tiles
            and config.split_k in self.split_k
            and config.k_unroll in self.k_unroll
            and config.recon_chunk_n in self.recon_chunk_n
        )

    def describe(self) -> str:
        """One line for `--help` and logs."""
        tiles = ",".join(tile_name(bn, t) for bn, t in self.tiles)
        return (
            f"{self.name}: {self.size} variants = rows/block {self.max_q_gemm_rows_kernel} x "
            f"tiles (block_n x threads) [{tiles}] x split_k {self.split_k} x "
            f"k_unroll {self.k_unroll}; recon chunk {self.recon_chunk_n} and the fused/reconstruct "
            "threshold chosen exactly per trial"
        )


def _full() -> Space:
    bns = _TUNABLE["block_n"].choices
    threads = _TUNABLE["threads"].choices
    return Space(
        name="full",
        max_q_gemm_rows_kernel=_TUNABLE["max_q_gemm_rows_kernel"].choices,
        tiles=tuple((bn, t) for bn in bns for t in threads if _valid_tile(bn, t)),
        split_k=_TUNABLE["split_k"].choices,
        k_unroll=_TUNABLE["k_unroll"].choices,
        recon_chunk_n=_TUNABLE["recon_chunk_n"].choices,
    )


STANDARD = Space(
    name="standard",
    # 1..32 rows per block: ExLlamaV2's 4 and 8 and the default 16 plus the neighbours that
    # matter for decode (1, 2) and small batches (32). 64-row blocks only pay off far above the
    # thresholds ExLlamaV2 ever used; they stay in `full`.
    max_q_gemm_rows_kernel=(1, 2, 4, 8, 16, 32),
    # block_n 32/64/128 with 1, 2 or 4 warps along K: 64 and 128 wide with their useful K
    # splits, 32 wide (many small blocks, for narrow N) only with 4 warps along K.
    tiles=((32, 128), (64, 64), (64, 128), (64, 256), (128, 128), (128, 256)),
    # split_k 0 lets the launcher choose from the SM count; 1 = no split; 2..8 explicit.
    split_k=(0, 1, 2, 4, 8),
    k_unroll=(2, 4),
    recon_chunk_n=(0, 4096),
)
"""6 x 6 x 5 x 2 = 360 variants (plus 2 chunk choices, resolved per trial)."""

FULL = _full()
"""Every TUNABLES choice that is a valid config: 12 x 13 x 9 x 4 = 5616 variants (x 6 chunks,
resolved per trial)."""

SPACES: dict[str, Space] = {"standard": STANDARD, "full": FULL}


def get_space(name: str) -> Space:
    try:
        return SPACES[name]
    except KeyError:
        raise InvalidConfigError(f"unknown space {name!r} (known: {', '.join(SPACES)})") from None


def warm_start_configs(space: Space) -> list[tuple[str, KernelConfig]]:
    """The presets the study tries first (default first), in the space. A preset outside the
    space (a custom space) is left out rather than failing the run."""
    return [(name, cfg) for name, cfg in PRESETS.items() if space.contains(cfg)]
